//! North-south scenarios: NodePort, ExternalIPs and LoadBalancer IPs reached from the lab's external client
//! (`Place::External`, 198.18.0.200, in no node's cgroup), so the traffic is translated per packet by the
//! node's datapath (tc programs in ebpf mode, netfilter otherwise) rather than by the socket load balancer.
//!
//! Each scenario is a `fn name(mode)` with one `#[test]` per mode (`ebpf_<name>`, `iptables_<name>`). Without
//! root, cgroup2 or bpffs every test prints `SKIP <test>: <reason>` and returns. Lab of 2 nodes × 2 pods:
//! `pod-0-*` on node 0 (198.18.0.10), `pod-1-*` on node 1 (198.18.0.11).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use e2e::lab::{
    EXTERNAL_IP4, Ep, Family, LabConfig, Place, Probe, Proto, answers_by_pod, client_summary, pods_answered,
    scenario::Scenario,
};
use serde_json::{Value, json};

/// Bound of waiting for a change to show in the datapath.
const T: Duration = Duration::from_secs(30);

macro_rules! per_mode {
    ($($scenario:ident => $ebpf:ident, $iptables:ident;)*) => {$(
        #[test]
        fn $ebpf() {
            $scenario("ebpf")
        }
        #[test]
        fn $iptables() {
            $scenario("iptables")
        }
    )*};
}

per_mode! {
    node_port_from_external_cluster_and_local => ebpf_node_port_from_external_cluster_and_local,
        iptables_node_port_from_external_cluster_and_local;
    external_ip_and_lb_source_ranges_from_external => ebpf_external_ip_and_lb_source_ranges_from_external,
        iptables_external_ip_and_lb_source_ranges_from_external;
    node_port_1000_connections_spread => ebpf_node_port_1000_connections_spread,
        iptables_node_port_1000_connections_spread;
    node_port_connection_survives_kill_9 => ebpf_node_port_connection_survives_kill_9,
        iptables_node_port_connection_survives_kill_9;
}

fn config(mode: &str) -> LabConfig {
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_lab-echo")).parent().map(PathBuf::from);
    LabConfig { mode: mode.to_string(), bin_dir, verbose: true, ..LabConfig::default() }
}

#[track_caller]
fn assert_answered(probes: &[Probe], want: &[&str], what: &str) {
    assert!(!probes.is_empty(), "{what}: no probes");
    let bad: Vec<&Probe> = probes.iter().filter(|p| !p.ok).collect();
    assert!(bad.is_empty(), "{what}: {} of {} failed, e.g. {:#?}", bad.len(), probes.len(), bad.first());
    let got = pods_answered(probes);
    let want: std::collections::BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want, "{what}: answered by {:?}", answers_by_pod(probes));
}

#[track_caller]
fn assert_no_answer(probes: &[Probe], what: &str) {
    let answered: Vec<&Probe> = probes.iter().filter(|p| p.ok).collect();
    assert!(answered.is_empty(), "{what}: {} answered, e.g. {:#?}", answered.len(), answered.first());
}

/// Every probe's answering pod saw the client address `ip`.
#[track_caller]
fn assert_seen_client(probes: &[Probe], ip: &str, what: &str) {
    let seen: BTreeMap<String, usize> = probes.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.seen_client_ip().unwrap_or_default()).or_insert(0) += 1;
        m
    });
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec![ip], "{what}: pods saw clients {seen:?}");
}

fn node_port_spec(node_port: u16, extra: Value) -> Value {
    let mut spec = json!({"type": "NodePort", "ports": [
        {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": node_port},
        {"name": "udp", "port": 53, "protocol": "UDP", "targetPort": 8053, "nodePort": node_port}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({ "spec": spec })
}

/// NodePort from outside, on the node hosting the only backend and on the node that does not. Under
/// `Cluster` both answer and the pod sees the other node's address when that node forwards; under `Local`
/// only the hosting node answers and the pod sees the client.
fn node_port_from_external_cluster_and_local(mode: &str) {
    let Some(mut s) = Scenario::up("node_port_from_external_cluster_and_local", config(mode)) else { return };
    let lab = s.lab();
    let np = 30090;
    lab.apply_service("np", Family::V4, node_port_spec(np, json!({}))).unwrap();
    lab.set_endpoints("np", &[Ep::ready("pod-1-0")]).unwrap();
    let (n0, n1) = (lab.node(0).unwrap().ip4, lab.node(1).unwrap().ip4);
    let hosting = SocketAddr::new(n1.into(), np);
    let other = SocketAddr::new(n0.into(), np);
    for proto in [Proto::Tcp, Proto::Udp] {
        for addr in [hosting, other] {
            lab.wait_programmed(Place::External, proto, addr, &["pod-1-0"], T)
                .unwrap_or_else(|e| panic!("{proto:?} {addr} from outside: {e:#}"));
        }
        let probes = lab.probe(Place::External, proto, &[other], 10).unwrap();
        assert_answered(&probes, &["pod-1-0"], &format!("Cluster, {proto:?} via the other node {other}"));
        assert_seen_client(&probes, &n0.to_string(), &format!("Cluster, {proto:?} via {other}: SNAT to node 0"));
        let probes = lab.probe(Place::External, proto, &[hosting], 10).unwrap();
        assert_answered(&probes, &["pod-1-0"], &format!("Cluster, {proto:?} via the hosting node {hosting}"));
    }

    lab.apply_service("np", Family::V4, node_port_spec(np, json!({"externalTrafficPolicy": "Local"}))).unwrap();
    lab.wait_programmed(Place::External, Proto::Tcp, other, &[], T).expect("Local: the other node stops answering");
    for proto in [Proto::Tcp, Proto::Udp] {
        let probes = lab.probe(Place::External, proto, &[hosting], 10).unwrap();
        assert_answered(&probes, &["pod-1-0"], &format!("Local, {proto:?} via the hosting node"));
        assert_seen_client(&probes, &EXTERNAL_IP4.to_string(), &format!("Local, {proto:?}: client address kept"));
        assert_no_answer(
            &lab.probe(Place::External, proto, &[other], 3).unwrap(),
            &format!("Local, {proto:?} via the node without a local endpoint"),
        );
    }
}

/// ExternalIP and LoadBalancer IP from outside (routed to node 0), with `loadBalancerSourceRanges` that allow
/// and then exclude the client; the ranges never restrict the ExternalIP.
fn external_ip_and_lb_source_ranges_from_external(mode: &str) {
    let Some(mut s) = Scenario::up("external_ip_and_lb_source_ranges_from_external", config(mode)) else { return };
    let lab = s.lab();
    lab.route_external_via("198.19.254.0/24", 0).unwrap();
    let (external_ip, lb_ip) = ("198.19.254.1", "198.19.254.2");
    let backends = ["pod-0-1", "pod-1-0"];
    let spec = |ranges: &[&str]| {
        json!({"spec": {"type": "LoadBalancer", "externalIPs": [external_ip], "loadBalancerSourceRanges": ranges,
                        "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30091}]},
               "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}})
    };
    lab.apply_service("lb", Family::V4, spec(&["198.18.0.200/32"])).unwrap();
    lab.set_endpoints("lb", &backends.map(Ep::ready)).unwrap();
    let ext = SocketAddr::new(external_ip.parse().unwrap(), 80);
    let lb = SocketAddr::new(lb_ip.parse().unwrap(), 80);
    for addr in [ext, lb] {
        lab.wait_programmed(Place::External, Proto::Tcp, addr, &backends, T)
            .unwrap_or_else(|e| panic!("{addr} from outside: {e:#}"));
        assert_answered(&lab.probe_tcp(Place::External, addr, 20).unwrap(), &backends, &format!("{addr}, allowed"));
    }
    lab.apply_service("lb", Family::V4, spec(&["198.18.1.0/24"])).unwrap();
    lab.wait_programmed(Place::External, Proto::Tcp, lb, &[], T).expect("LB IP closed to a source outside the ranges");
    assert_no_answer(&lab.probe_tcp(Place::External, lb, 3).unwrap(), "LB IP, source outside the ranges");
    assert_answered(&lab.probe_tcp(Place::External, ext, 10).unwrap(), &backends, "ExternalIP ignores the ranges");
}

/// 1,000 connections from outside to one node's NodePort spread over four backends on both nodes within
/// ±20% of uniform.
fn node_port_1000_connections_spread(mode: &str) {
    let Some(mut s) = Scenario::up("node_port_1000_connections_spread", config(mode)) else { return };
    let lab = s.lab();
    let pods = ["pod-0-0", "pod-0-1", "pod-1-0", "pod-1-1"];
    lab.apply_service("spread", Family::V4, node_port_spec(30092, json!({}))).unwrap();
    lab.set_endpoints("spread", &pods.map(Ep::ready)).unwrap();
    let addr = SocketAddr::new(lab.node(0).unwrap().ip4.into(), 30092);
    lab.wait_programmed(Place::External, Proto::Tcp, addr, &pods, T).unwrap();
    let probes = lab.probe_tcp(Place::External, addr, 1000).unwrap();
    assert_answered(&probes, &pods, "1000 connections");
    let by_pod = answers_by_pod(&probes);
    println!("[{mode}] 1000 NodePort connections from outside: {by_pod:?}");
    for (pod, n) in &by_pod {
        assert!(n.abs_diff(250) <= 50, "{pod} got {n} of 1000: {by_pod:?}");
    }
}

/// A long-lived TCP connection from outside through a NodePort forwarded to the other node (SNAT) survives
/// `kill -9` and restart of that node's proxy.
fn node_port_connection_survives_kill_9(mode: &str) {
    let Some(mut s) = Scenario::up("node_port_connection_survives_kill_9", config(mode)) else { return };
    let lab = s.lab();
    lab.apply_service("hold", Family::V4, node_port_spec(30093, json!({}))).unwrap();
    lab.set_endpoints("hold", &[Ep::ready("pod-1-0")]).unwrap();
    let addr = SocketAddr::new(lab.node(0).unwrap().ip4.into(), 30093);
    lab.wait_programmed(Place::External, Proto::Tcp, addr, &["pod-1-0"], T).unwrap();
    let args: Vec<String> =
        ["tcp-hold", &addr.to_string(), "--duration-ms", "6000", "--timeout-ms", "3000"].map(String::from).to_vec();
    let hold = lab.spawn_client(Place::External, &args).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    lab.kill_proxy(0).unwrap();
    assert!(!lab.proxy_running(0));
    std::thread::sleep(Duration::from_millis(1000));
    lab.start_proxy(0).unwrap();
    lab.wait_proxy_healthy(0, T).expect("restarted proxy healthy");
    let out = hold.finish(T).unwrap();
    let sum = client_summary(&String::from_utf8_lossy(&out.stdout)).expect("hold summary");
    println!("[{mode}] tcp-hold through a NodePort across kill -9: {sum}");
    assert_eq!(sum["failed"], false, "{sum}");
    assert_answered(&lab.probe_tcp(Place::External, addr, 10).unwrap(), &["pod-1-0"], "new connections after restart");
}
