//! `--socket-lb-scope` in the lab (ebpf mode only): pods that bypass socket LB reach Services per packet
//! through the tc program on their node's pod-facing devices, and keep seeing the ClusterIP on the wire.
//!
//! "On the wire" is observed with an nftables counter in the client's own network namespace (a lab
//! namespace; the machine's rulesets are never touched): socket LB rewrites the destination before any
//! packet exists, so a counted packet to the ClusterIP proves the socket was not translated. Lab of 2 nodes
//! × 2 pods: `pod-0-*` on node 0, `pod-1-*` on node 1. Without root, cgroup2 or bpffs every test prints
//! `SKIP <test>: <reason>` and returns.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::lab::{Ep, Family, Lab, LabConfig, Place, Probe, Proto, answers_by_pod, client_summary, pods_answered};
use e2e::lab::{netns_path, scenario::Scenario};
use k8s_openapi::api::core::v1::Node;
use serde_json::json;

/// Bound of waiting for a change to show in the datapath.
const T: Duration = Duration::from_secs(30);

fn config(scope: &str) -> LabConfig {
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_lab-echo")).parent().map(PathBuf::from);
    LabConfig {
        mode: "ebpf".into(),
        bin_dir,
        verbose: true,
        proxy_args: vec![format!("--socket-lb-scope={scope}")],
        // A backend port per phase: per-packet flows keep the pod's source port, so a phase reusing an earlier
        // phase's backend tuple could meet its TIME_WAIT (README, known limits).
        tcp_ports: vec![8080, 8081, 8082],
        ..LabConfig::default()
    }
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

/// An nftables table in `place`'s own namespace counting the packets it sends to `vips`.
fn count_packets_to(lab: &Lab, place: &Place, vips: &[IpAddr]) {
    let nft = |args: &[&str]| {
        let out = lab.exec_in(place.clone(), "nft", args, T).expect("nft");
        assert!(out.status.success(), "nft {args:?} at {place:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    nft(&["add", "table", "inet", "kpscope"]);
    nft(&["add", "chain", "inet", "kpscope", "out", "{ type filter hook output priority 0; }"]);
    for vip in vips {
        let fam = if vip.is_ipv4() { "ip" } else { "ip6" };
        nft(&["add", "rule", "inet", "kpscope", "out", fam, "daddr", &vip.to_string(), "counter"]);
    }
}

/// The counters of [`count_packets_to`], summed.
fn packets_to(lab: &Lab, place: &Place) -> u64 {
    let out = lab.exec_in(place.clone(), "nft", &["list", "chain", "inet", "kpscope", "out"], T).expect("nft list");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "packets")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

fn tcp_udp_service(lab: &mut Lab, name: &str, family: Family, eps: &[&str], extra: serde_json::Value) {
    tcp_udp_service_to(lab, name, family, eps, 8080, extra)
}

/// A Service with ports `tcp` 80 → `tcp_target` and `udp` 53 → 8053, backed by `eps`.
fn tcp_udp_service_to(
    lab: &mut Lab,
    name: &str,
    family: Family,
    eps: &[&str],
    tcp_target: u16,
    extra: serde_json::Value,
) {
    let mut patch = json!({"spec": {"ports": [
        {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": tcp_target},
        {"name": "udp", "port": 53, "protocol": "UDP", "targetPort": 8053}]}});
    if let (Some(s), Some(e)) = (patch["spec"].as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    lab.apply_service(name, family, patch).unwrap();
    let eps: Vec<Ep> = eps.iter().map(|p| Ep::ready(p)).collect();
    lab.set_endpoints(name, &eps).unwrap();
}

/// A pod namespace created after the proxies started (a new device on node 0's `cbr0`), deleted on drop.
struct LatePod {
    netns: String,
}

impl LatePod {
    fn new(lab: &Lab) -> LatePod {
        let node = lab.node(0).unwrap().clone();
        let late = LatePod { netns: format!("{}-late", lab.tag()) };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &late.netns]);
        ip(&["-n", &node.netns, "link", "add", "vplate", "type", "veth", "peer", "name", "eth0", "netns", &late.netns]);
        ip(&["-n", &node.netns, "link", "set", "vplate", "master", "cbr0", "up"]);
        let addr4 = format!("{}/24", late_ip4(lab));
        ip(&["-n", &late.netns, "addr", "add", &addr4, "dev", "eth0"]);
        ip(&["-n", &late.netns, "link", "set", "lo", "up"]);
        ip(&["-n", &late.netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &late.netns, "route", "add", "default", "via", &node.gw4.to_string()]);
        late
    }

    /// `lab-client args` inside the late pod (in no cgroup: host-only never translates a pod anyway).
    fn client(&self, args: &[&str]) -> Vec<Probe> {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_lab-client"));
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(&bin)
            .args(args)
            .output()
            .expect("lab-client in the late pod");
        e2e::lab::parse_probes(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for LatePod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

fn late_ip4(lab: &Lab) -> String {
    // Node 0's pod CIDR, far above the lab's own pods (.10 + k).
    let gw = lab.node(0).unwrap().gw4.octets();
    format!("{}.{}.{}.200", gw[0], gw[1], gw[2])
}

/// Host-only: pods reach ClusterIPs (TCP and UDP, IPv4 and IPv6, local and remote backends) per packet and
/// see the ClusterIP on the wire; node processes keep socket LB; a pod created after the proxy is served;
/// ClientIP affinity sticks; an established per-packet connection survives kill -9 and restart.
#[test]
fn ebpf_host_only_pods_go_per_packet() {
    let Some(mut s) = Scenario::up("host_only_pods_go_per_packet", config("host-only")) else { return };
    let lab = s.lab();
    let client = Place::from("pod-0-0");
    tcp_udp_service(lab, "web", Family::V4, &["pod-0-1", "pod-1-0"], json!({}));
    tcp_udp_service(lab, "web6", Family::V6, &["pod-0-1", "pod-1-0"], json!({}));
    let (tcp4, udp4) = (lab.service_addr("web", "tcp").unwrap(), lab.service_addr("web", "udp").unwrap());
    let (tcp6, udp6) = (lab.service_addr("web6", "tcp").unwrap(), lab.service_addr("web6", "udp").unwrap());
    for (proto, addr) in [(Proto::Tcp, tcp4), (Proto::Udp, udp4), (Proto::Tcp, tcp6), (Proto::Udp, udp6)] {
        lab.wait_programmed(client.clone(), proto, addr, &["pod-0-1", "pod-1-0"], T)
            .unwrap_or_else(|e| panic!("{proto:?} {addr} from a pod: {e:#}"));
    }
    count_packets_to(lab, &client, &[tcp4.ip(), tcp6.ip()]);
    for (proto, addr) in [(Proto::Tcp, tcp4), (Proto::Udp, udp4), (Proto::Tcp, tcp6), (Proto::Udp, udp6)] {
        let probes = lab.probe(client.clone(), proto, &[addr], 16).unwrap();
        assert_answered(&probes, &["pod-0-1", "pod-1-0"], &format!("{proto:?} {addr} from pod-0-0"));
        // The backend sees the pod itself (no SNAT per packet), the pod sees the ClusterIP.
        let pod_ip = lab.pod("pod-0-0").unwrap().ip(if addr.is_ipv4() { Family::V4 } else { Family::V6 });
        assert!(probes.iter().all(|p| p.seen_client_ip() == Some(pod_ip.to_string())), "{probes:#?}");
        assert!(probes.iter().all(|p| p.peer.as_deref() == Some(&addr.to_string())), "{probes:#?}");
    }
    let on_wire = packets_to(lab, &client);
    assert!(on_wire >= 4 * 16, "the pod's packets must carry the ClusterIP: {on_wire} counted");

    // Node processes: socket LB, nothing leaves addressed to the ClusterIP.
    let node = Place::Node(0);
    count_packets_to(lab, &node, &[tcp4.ip(), tcp6.ip()]);
    assert_answered(&lab.probe_tcp(node.clone(), tcp4, 10).unwrap(), &["pod-0-1", "pod-1-0"], "node 0 process");
    assert_answered(&lab.probe_tcp(node.clone(), tcp6, 10).unwrap(), &["pod-0-1", "pod-1-0"], "node 0 process v6");
    assert_eq!(packets_to(lab, &node), 0, "a node process must be translated at connect()");

    // A pod whose device appears after the proxy started: served within a short bound.
    let late = LatePod::new(lab);
    let deadline = Instant::now() + Duration::from_secs(10);
    let tcp4s = tcp4.to_string();
    let probe_args = ["tcp", tcp4s.as_str(), "--count", "4", "--timeout-ms", "500", "--deadline-ms", "5000"];
    loop {
        let probes = late.client(&probe_args);
        if !probes.is_empty() && probes.iter().all(|p| p.ok) {
            let late_ip = late_ip4(lab);
            assert!(probes.iter().all(|p| p.seen_client_ip() == Some(late_ip.clone())), "{probes:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "late pod not served: {probes:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(late);

    // sessionAffinity ClientIP on the per-packet path.
    // Another backend port than "web": per-packet flows never meet a backend-side TIME_WAIT of the same tuple.
    let affinity = json!({"sessionAffinity": "ClientIP"});
    tcp_udp_service_to(lab, "sticky", Family::V4, &["pod-0-1", "pod-1-0", "pod-1-1"], 8081, affinity);
    let sticky = lab.service_addr("sticky", "tcp").unwrap();
    let deadline = Instant::now() + T;
    let probes = loop {
        let probes = lab.probe_tcp(client.clone(), sticky, 20).unwrap();
        if probes.iter().all(|p| p.ok) || Instant::now() > deadline {
            break probes;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(probes.iter().all(|p| p.ok), "{probes:#?}");
    assert_eq!(pods_answered(&probes).len(), 1, "affinity: {:?}", answers_by_pod(&probes));

    // kill -9 and restart of node 0's proxy: an established per-packet connection to a remote backend lives.
    tcp_udp_service_to(lab, "hold", Family::V4, &["pod-1-0"], 8082, json!({}));
    let hold_addr = lab.service_addr("hold", "tcp").unwrap();
    lab.wait_programmed(client.clone(), Proto::Tcp, hold_addr, &["pod-1-0"], T).unwrap();
    let args: Vec<String> = ["tcp-hold", &hold_addr.to_string(), "--duration-ms", "6000", "--timeout-ms", "3000"]
        .map(String::from)
        .to_vec();
    let hold = lab.spawn_client(client.clone(), &args).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // The restarted proxy lists its Node last: its first sync must wait for it (without the Node's addresses
    // it would detach the tc programs this connection's replies need).
    lab.api().set_list_delay::<Node>(Duration::from_millis(1500));
    lab.kill_proxy(0).unwrap();
    assert!(!lab.proxy_running(0));
    std::thread::sleep(Duration::from_millis(1000));
    lab.start_proxy(0).unwrap();
    lab.wait_proxy_healthy(0, T).expect("restarted proxy healthy");
    let out = hold.finish(T).unwrap();
    lab.api().set_list_delay::<Node>(Duration::ZERO);
    let sum = client_summary(&String::from_utf8_lossy(&out.stdout)).expect("hold summary");
    println!("tcp-hold through a ClusterIP per packet across kill -9: {sum}");
    assert_eq!(sum["failed"], false, "{sum}");
    assert_answered(&lab.probe_tcp(client, hold_addr, 8).unwrap(), &["pod-1-0"], "after restart");
}

/// Opt-out: `kpctl socket-lb skip` moves one pod to the per-packet path (it sees the ClusterIP on the wire)
/// while its neighbour keeps socket LB; `unskip` restores socket LB.
#[test]
fn ebpf_opt_out_kpctl_skip_one_pod() {
    let Some(mut s) = Scenario::up("opt_out_kpctl_skip_one_pod", config("opt-out")) else { return };
    let lab = s.lab();
    // Two Services on different backend ports: the skipped pod's per-packet connections never reuse a
    // 4-tuple its socket-LB connections just left in TIME_WAIT on a backend (a NAT artefact, as with any
    // DNAT without port remapping; see README).
    tcp_udp_service(lab, "web", Family::V4, &["pod-0-1", "pod-1-0"], json!({}));
    tcp_udp_service_to(lab, "web2", Family::V4, &["pod-0-1", "pod-1-0"], 8081, json!({}));
    let tcp = lab.service_addr("web", "tcp").unwrap();
    let (tcp2, udp2) = (lab.service_addr("web2", "tcp").unwrap(), lab.service_addr("web2", "udp").unwrap());
    let (skipped, other) = (Place::from("pod-0-0"), Place::from("pod-0-1"));
    for place in [&skipped, &other] {
        lab.wait_programmed(place.clone(), Proto::Tcp, tcp, &["pod-0-1", "pod-1-0"], T).unwrap();
        count_packets_to(lab, place, &[tcp.ip(), tcp2.ip()]);
    }
    let kpctl = |args: &[&str]| -> String {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_lab-echo")).with_file_name("kpctl");
        let bpffs = lab.node(0).unwrap().bpffs.display().to_string();
        let out = Command::new(&bin).arg("--bpffs-root").arg(&bpffs).args(args).output().expect("kpctl");
        assert!(out.status.success(), "kpctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ns = netns_path(&lab.pod("pod-0-0").unwrap().netns).display().to_string();

    let before = lab.probe_tcp(skipped.clone(), tcp, 16).unwrap();
    assert_answered(&before, &["pod-0-1", "pod-1-0"], "before skip");
    assert_eq!(packets_to(lab, &skipped), 0, "not skipped: socket LB");

    let out = kpctl(&["socket-lb", "skip", "--netns", &ns]);
    assert!(out.starts_with("skipped "), "{out}");
    let list = kpctl(&["socket-lb", "list"]);
    assert!(list.contains("scope: opt-out") && list.lines().count() == 4, "{list}");
    for (proto, addr) in [(Proto::Tcp, tcp2), (Proto::Udp, udp2)] {
        let probes = lab.probe(skipped.clone(), proto, &[addr], 16).unwrap();
        assert_answered(&probes, &["pod-0-1", "pod-1-0"], &format!("skipped pod, {proto:?}"));
    }
    assert!(packets_to(lab, &skipped) >= 16, "skipped: the ClusterIP must be on the wire");
    assert_answered(&lab.probe_tcp(other.clone(), tcp, 16).unwrap(), &["pod-0-1", "pod-1-0"], "neighbour");
    assert_eq!(packets_to(lab, &other), 0, "the neighbour keeps socket LB");

    let out = kpctl(&["socket-lb", "unskip", "--netns", &ns]);
    assert!(out.starts_with("unskipped "), "{out}");
    let n = packets_to(lab, &skipped);
    assert_answered(&lab.probe_tcp(skipped.clone(), tcp, 16).unwrap(), &["pod-0-1", "pod-1-0"], "after unskip");
    assert_eq!(packets_to(lab, &skipped), n, "unskipped: socket LB again");
}

/// Host-only: a pod's connect to a ClusterIP without endpoints (IPv4 and IPv6) is refused at once per packet
/// (a TCP reset from the tc program on its node's pod device, as upstream's REJECT), while the packets carry
/// the ClusterIP on the wire.
#[test]
fn ebpf_host_only_no_endpoints_refused_at_once() {
    let Some(mut s) = Scenario::up("host_only_no_endpoints_refused_at_once", config("host-only")) else { return };
    let lab = s.lab();
    tcp_udp_service(lab, "empty", Family::V4, &[], json!({}));
    tcp_udp_service(lab, "empty6", Family::V6, &[], json!({}));
    // Applied last: once it is served, the proxies have seen the two above.
    tcp_udp_service(lab, "ctl", Family::V4, &["pod-1-0"], json!({}));
    let client = Place::from("pod-0-0");
    let ctl = lab.service_addr("ctl", "tcp").unwrap();
    lab.wait_programmed(client.clone(), Proto::Tcp, ctl, &["pod-1-0"], T).unwrap();
    let (tcp4, tcp6) = (lab.service_addr("empty", "tcp").unwrap(), lab.service_addr("empty6", "tcp").unwrap());
    count_packets_to(lab, &client, &[tcp4.ip(), tcp6.ip()]);
    for addr in [tcp4, tcp6] {
        let probes = lab.probe_tcp(client.clone(), addr, 4).unwrap();
        assert_eq!(probes.len(), 4, "{probes:#?}");
        for p in &probes {
            assert!(
                !p.ok && p.stage.as_deref() == Some("connect") && p.errno == Some(111),
                "{addr} from {client:?}: wanted ECONNREFUSED at connect, got {p:#?}"
            );
        }
    }
    let on_wire = packets_to(lab, &client);
    assert!(on_wire >= 8, "refused per packet, so the SYNs must carry the ClusterIP: {on_wire} counted");
}

/// Host-only: a pod talks from ONE source port to the ClusterIPs of two Services that share one backend, both
/// flows alive at once (TCP: two sockets bound to the port; UDP: one socket `sendto`ing both), over IPv4 to a
/// backend on its node and over IPv6 to one on the other node. Every reply comes from the ClusterIP it was
/// sent to and the backend sees the pod's address: the first flow with the pod's port, the second with a
/// remapped one (the reply tuples would clash otherwise; netfilter's NAT does the same).
#[test]
fn ebpf_host_only_one_port_to_two_cluster_ips_of_one_backend() {
    let Some(mut s) = Scenario::up("host_only_one_port_two_cluster_ips", config("host-only")) else { return };
    let lab = s.lab();
    let client = Place::from("pod-0-0");
    // Below the ephemeral range: no other socket of the pod takes it.
    let port = 23001u16;
    for (family, backend, tag) in [(Family::V4, "pod-0-1", "v4"), (Family::V6, "pod-1-0", "v6")] {
        let names = [format!("share-a-{tag}"), format!("share-b-{tag}")];
        for n in &names {
            tcp_udp_service(lab, n, family, &[backend], json!({}));
        }
        let pod_ip = lab.pod("pod-0-0").unwrap().ip(family).to_string();
        for (proto, port_name, mode) in [(Proto::Tcp, "tcp", "tcp"), (Proto::Udp, "udp", "udp")] {
            let vips =
                [lab.service_addr(&names[0], port_name).unwrap(), lab.service_addr(&names[1], port_name).unwrap()];
            for vip in vips {
                lab.wait_programmed(client.clone(), proto, vip, &[backend], T).unwrap();
            }
            let args: Vec<String> = ["shared-port", mode, &vips[0].to_string(), &vips[1].to_string()]
                .into_iter()
                .map(String::from)
                .chain(["--source-port", &port.to_string(), "--rounds", "2", "--timeout-ms", "2000"].map(String::from))
                .collect();
            let out = lab.client(client.clone(), &args, T).unwrap();
            let probes = e2e::lab::parse_probes(&out);
            let what = format!("{tag} {mode} from {pod_ip} port {port}");
            assert_eq!(probes.len(), 4, "{what}: {out}");
            let mut seen: [Vec<std::net::SocketAddr>; 2] = Default::default();
            for p in &probes {
                assert!(p.ok && p.pod() == Some(backend), "{what}: {p:#?}");
                let i = vips.iter().position(|v| p.target.as_deref() == Some(&v.to_string())).expect("target");
                assert_eq!(p.peer.as_deref(), Some(&vips[i].to_string()[..]), "{what}: reply from another VIP: {p:#?}");
                let c: std::net::SocketAddr = p.seen_client().and_then(|c| c.parse().ok()).expect("seen client");
                assert_eq!(c.ip().to_string(), pod_ip, "{what}: the backend must see the pod: {p:#?}");
                seen[i].push(c);
            }
            assert!(seen[0].iter().all(|c| c.port() == port), "{what}: first flow keeps the pod's port: {seen:?}");
            assert!(seen[1].iter().all(|c| c.port() != port && *c == seen[1][0]), "{what}: remapped once: {seen:?}");
        }
    }
}
