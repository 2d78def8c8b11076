//! The lab end to end: namespaces as 2 nodes x 2 pods, the real `kube-proxy` per node (`--proxy-mode=ebpf`),
//! a ClusterIP Service over pods of both nodes reached from a pod and from a node process, and a teardown
//! that leaves nothing behind. Privileged: prints a SKIP reason and returns when it cannot run.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use e2e::lab::{Ep, Family, Lab, LabConfig, Place, Proto, answers_by_pod, pods_answered, skip_reason};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn config() -> LabConfig {
    // The test binary's own binaries (lab-echo, lab-client) sit next to kube-proxy in target/<profile>/.
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_lab-echo")).parent().map(PathBuf::from);
    LabConfig { bin_dir, verbose: true, ..LabConfig::default() }
}

#[test]
fn cluster_ip_from_pods_and_node_processes_then_clean_teardown() {
    if let Some(reason) = skip_reason() {
        e2e::skip!("cluster_ip_from_pods_and_node_processes_then_clean_teardown: {reason}");
        return;
    }
    let mut lab = Lab::new(config()).expect("lab up");
    let footprint = lab.footprint();
    assert!(footprint.leftovers().len() == footprint.netns.len() + 2, "everything exists while the lab runs");

    let backends = ["pod-0-1", "pod-1-0"];
    lab.apply_service("web", Family::V4, json!({})).unwrap();
    lab.set_endpoints("web", &backends.map(Ep::ready)).unwrap();
    let vip = lab.service_addr("web", "tcp").unwrap();
    lab.wait_programmed("pod-0-0", Proto::Tcp, vip, &backends, T).expect("programmed");

    // A pod: both backends (one per node) answer over 50 requests; the ClusterIP is what getpeername shows,
    // and the backend saw the client pod's own address (no SNAT).
    let probes = lab.probe_tcp("pod-0-0", vip, 50).unwrap();
    assert!(probes.iter().all(|p| p.ok), "{probes:#?}");
    let by_pod = answers_by_pod(&probes);
    assert_eq!(by_pod.keys().map(String::as_str).collect::<Vec<_>>(), backends, "{by_pod:?}");
    assert!(probes.iter().all(|p| p.peer.as_deref() == Some(&vip.to_string())), "{probes:#?}");
    let client_ip = lab.pod("pod-0-0").unwrap().ip4.to_string();
    assert!(probes.iter().all(|p| p.seen_client_ip() == Some(client_ip.clone())), "{probes:#?}");

    // A node process (node netns + node cgroup) of the other node reaches it too.
    let probes = lab.probe_tcp(Place::Node(1), vip, 50).unwrap();
    assert!(probes.iter().all(|p| p.ok), "{probes:#?}");
    let want: BTreeSet<String> = backends.iter().map(|s| s.to_string()).collect();
    assert_eq!(pods_answered(&probes), want);

    // UDP on the same Service (replies come from the ClusterIP), and the proxy's metrics are reachable.
    lab.apply_service(
        "dns",
        Family::V4,
        json!({"spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8053}]}}),
    )
    .unwrap();
    lab.set_endpoints("dns", &backends.map(Ep::ready)).unwrap();
    let dns = lab.service_addr("dns", "dns").unwrap();
    lab.wait_programmed("pod-1-1", Proto::Udp, dns, &backends, T).expect("UDP programmed");
    let probes = lab.probe_udp("pod-1-1", dns, 20).unwrap();
    assert!(probes.iter().all(|p| p.ok && p.peer.as_deref() == Some(&dns.to_string())), "{probes:#?}");
    let metrics = lab.metrics(0).unwrap();
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"), "{metrics}");

    lab.shutdown().expect("clean teardown");
    let left = footprint.leftovers();
    assert!(left.is_empty(), "teardown left {left:?}");
}

#[test]
fn failed_build_and_drop_leave_nothing() {
    if let Some(reason) = skip_reason() {
        e2e::skip!("failed_build_and_drop_leave_nothing: {reason}");
        return;
    }
    // A lab dropped without shutdown() (as on panic) cleans up too; no proxies keeps this one fast.
    let lab = Lab::new(LabConfig { nodes: 1, pods_per_node: 1, start_proxies: false, ..config() }).expect("lab up");
    let footprint = lab.footprint();
    let out = lab.exec_in_pod("pod-0-0", &["ip", "-br", "addr"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("198.18.16.10/24"), "{text}");
    drop(lab);
    assert!(footprint.leftovers().is_empty(), "drop left {:?}", footprint.leftovers());
    // Nothing is stale from this process either.
    assert!(Lab::cleanup_stale().is_ok());
}

#[test]
fn proxy_kill_and_restart_keep_connections_and_service() {
    if let Some(reason) = skip_reason() {
        e2e::skip!("proxy_kill_and_restart_keep_connections_and_service: {reason}");
        return;
    }
    let mut lab = Lab::new(LabConfig { pods_per_node: 1, ..config() }).expect("lab up");
    lab.apply_service("web", Family::V4, json!({})).unwrap();
    lab.set_endpoints("web", &[Ep::ready("pod-1-0")]).unwrap();
    let vip = lab.service_addr("web", "tcp").unwrap();
    lab.wait_programmed("pod-0-0", Proto::Tcp, vip, &["pod-1-0"], T).expect("programmed");

    // A long-lived connection and a stream of new ones while node-0's proxy is SIGKILLed and restarted:
    // the pinned programs keep translating, so neither may see a failure.
    let args = |mode: &str| vec![mode.to_string(), vip.to_string(), "--duration-ms".into(), "4000".into()];
    let hold = lab.spawn_client("pod-0-0", &args("tcp-hold")).unwrap();
    let churn = lab.spawn_client("pod-0-0", &args("churn-client")).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    lab.kill_proxy(0).unwrap();
    assert!(!lab.proxy_running(0));
    std::thread::sleep(Duration::from_millis(700));
    lab.start_proxy(0).unwrap();
    lab.wait_proxy_healthy(0, T).expect("restarted proxy healthy");

    let out = hold.finish(T).unwrap();
    let hold = e2e::lab::client_summary(&String::from_utf8_lossy(&out.stdout)).expect("hold summary");
    assert_eq!(hold["failed"], false, "{hold}");
    assert!(hold["ok"].as_u64().unwrap() >= 25, "{hold}");
    let out = churn.finish(T).unwrap();
    let churn = e2e::lab::client_summary(&String::from_utf8_lossy(&out.stdout)).expect("churn summary");
    assert_eq!(churn["failed"], 0, "{churn}");
    assert!(churn["ok"].as_u64().unwrap() >= 100, "{churn}");

    // A graceful restart too, and the Service still answers afterwards.
    lab.restart_proxy(0).unwrap();
    let probes = lab.probe_tcp("pod-0-0", vip, 10).unwrap();
    assert!(probes.iter().all(|p| p.ok && p.pod() == Some("pod-1-0")), "{probes:#?}");
    lab.shutdown().expect("clean teardown");
}
