//! North-south scenarios: NodePort, ExternalIPs and LoadBalancer IPs reached from the lab's external client
//! (`Place::External`, 198.18.0.200, in no node's cgroup), so the traffic is translated per packet by the
//! node's datapath (tc programs in ebpf mode, netfilter otherwise) rather than by the socket load balancer.
//!
//! Each scenario is a `fn name(mode)` with one `#[test]` per mode (`ebpf_<name>`, `iptables_<name>`). Without
//! root, cgroup2 or bpffs every test prints `SKIP <test>: <reason>` and returns. Lab of 2 nodes × 2 pods:
//! `pod-0-*` on node 0 (198.18.0.10), `pod-1-*` on node 1 (198.18.0.11).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use e2e::lab::{
    EXTERNAL_IP4, EXTERNAL_IP6, Ep, Family, Lab, LabConfig, Place, Probe, Proto, answers_by_pod, client_summary,
    pods_answered, scenario::Scenario,
};
use k8s_openapi::api::core::v1::Node;
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
    node_port_from_external_ipv6_cluster_and_local => ebpf_node_port_from_external_ipv6_cluster_and_local,
        iptables_node_port_from_external_ipv6_cluster_and_local;
    external_ip_and_lb_source_ranges_from_external_ipv6 => ebpf_external_ip_and_lb_source_ranges_from_external_ipv6,
        iptables_external_ip_and_lb_source_ranges_from_external_ipv6;
    dual_stack_node_port_from_external => ebpf_dual_stack_node_port_from_external,
        iptables_dual_stack_node_port_from_external;
    health_check_node_port_steers_local_traffic => ebpf_health_check_node_port_steers_local_traffic,
        iptables_health_check_node_port_steers_local_traffic;
    node_port_multiple_ports_from_external => ebpf_node_port_multiple_ports_from_external,
        iptables_node_port_multiple_ports_from_external;
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

fn node_ip(lab: &Lab, i: usize, family: Family) -> IpAddr {
    let n = lab.node(i).unwrap();
    match family {
        Family::V4 => n.ip4.into(),
        Family::V6 => n.ip6.into(),
    }
}

fn external_ip(family: Family) -> IpAddr {
    match family {
        Family::V4 => EXTERNAL_IP4.into(),
        Family::V6 => EXTERNAL_IP6.into(),
    }
}

/// NodePort from outside, on the node hosting the only backend and on the node that does not. Under
/// `Cluster` both answer and the pod sees the other node's address when that node forwards; under `Local`
/// only the hosting node answers and the pod sees the client.
fn node_port_from_external_cluster_and_local(mode: &str) {
    node_port_cluster_and_local(mode, Family::V4, "node_port_from_external_cluster_and_local")
}

/// [`node_port_from_external_cluster_and_local`] over IPv6: an IPv6 Service, the nodes' IPv6 addresses.
fn node_port_from_external_ipv6_cluster_and_local(mode: &str) {
    node_port_cluster_and_local(mode, Family::V6, "node_port_from_external_ipv6_cluster_and_local")
}

fn node_port_cluster_and_local(mode: &str, family: Family, name: &str) {
    let Some(mut s) = Scenario::up(name, config(mode)) else { return };
    let lab = s.lab();
    let np = 30090;
    lab.apply_service("np", family, node_port_spec(np, json!({}))).unwrap();
    lab.set_endpoints("np", &[Ep::ready("pod-1-0")]).unwrap();
    let (n0, n1) = (node_ip(lab, 0, family), node_ip(lab, 1, family));
    let hosting = SocketAddr::new(n1, np);
    let other = SocketAddr::new(n0, np);
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

    lab.apply_service("np", family, node_port_spec(np, json!({"externalTrafficPolicy": "Local"}))).unwrap();
    // UDP flows of the Cluster phase stay translated (SNAT) as upstream keeps them: probes must not reuse
    // their source ports.
    lab.fresh_source_ports(Place::External).unwrap();
    lab.wait_programmed(Place::External, Proto::Tcp, other, &[], T).expect("Local: the other node stops answering");
    for proto in [Proto::Tcp, Proto::Udp] {
        let probes = lab.probe(Place::External, proto, &[hosting], 10).unwrap();
        assert_answered(&probes, &["pod-1-0"], &format!("Local, {proto:?} via the hosting node"));
        assert_seen_client(
            &probes,
            &external_ip(family).to_string(),
            &format!("Local, {proto:?}: client address kept"),
        );
        assert_no_answer(
            &lab.probe(Place::External, proto, &[other], 3).unwrap(),
            &format!("Local, {proto:?} via the node without a local endpoint"),
        );
    }
}

/// ExternalIP and LoadBalancer IP from outside (routed to node 0), with `loadBalancerSourceRanges` that allow
/// and then exclude the client; the ranges never restrict the ExternalIP.
fn external_ip_and_lb_source_ranges_from_external(mode: &str) {
    external_ip_and_lb_source_ranges(mode, Family::V4, "external_ip_and_lb_source_ranges_from_external")
}

/// [`external_ip_and_lb_source_ranges_from_external`] over IPv6.
fn external_ip_and_lb_source_ranges_from_external_ipv6(mode: &str) {
    external_ip_and_lb_source_ranges(mode, Family::V6, "external_ip_and_lb_source_ranges_from_external_ipv6")
}

fn external_ip_and_lb_source_ranges(mode: &str, family: Family, name: &str) {
    let Some(mut s) = Scenario::up(name, config(mode)) else { return };
    let lab = s.lab();
    // Inside the lab's Service ranges (which nodes route to the bridge namespace, never off the machine).
    let (prefix, external_ip, lb_ip, client_range, other_range) = match family {
        Family::V4 => ("198.19.254.0/24", "198.19.254.1", "198.19.254.2", "198.18.0.200/32", "198.18.1.0/24"),
        Family::V6 => {
            ("2001:db8:19::fe:0/112", "2001:db8:19::fe:1", "2001:db8:19::fe:2", "2001:db8::200/128", "2001:db8:1::/64")
        }
    };
    lab.route_external_via(prefix, 0).unwrap();
    let backends = ["pod-0-1", "pod-1-0"];
    let spec = |ranges: &[&str]| {
        json!({"spec": {"type": "LoadBalancer", "externalIPs": [external_ip], "loadBalancerSourceRanges": ranges,
                        "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30091}]},
               "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}})
    };
    lab.apply_service("lb", family, spec(&[client_range])).unwrap();
    lab.set_endpoints("lb", &backends.map(Ep::ready)).unwrap();
    let ext = SocketAddr::new(external_ip.parse().unwrap(), 80);
    let lb = SocketAddr::new(lb_ip.parse().unwrap(), 80);
    for addr in [ext, lb] {
        lab.wait_programmed(Place::External, Proto::Tcp, addr, &backends, T)
            .unwrap_or_else(|e| panic!("{addr} from outside: {e:#}"));
        assert_answered(&lab.probe_tcp(Place::External, addr, 20).unwrap(), &backends, &format!("{addr}, allowed"));
    }
    lab.apply_service("lb", family, spec(&[other_range])).unwrap();
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
    println!("[{mode}] tcp-hold through a NodePort across kill -9: {sum}");
    assert_eq!(sum["failed"], false, "{sum}");
    assert_answered(&lab.probe_tcp(Place::External, addr, 10).unwrap(), &["pod-1-0"], "new connections after restart");
}

/// A dual-stack NodePort Service (one slice per family) from outside: each node answers on its IPv4 and its
/// IPv6 address, through the other node with SNAT to that node's address of the same family.
fn dual_stack_node_port_from_external(mode: &str) {
    let Some(mut s) = Scenario::up("dual_stack_node_port_from_external", config(mode)) else { return };
    let lab = s.lab();
    let np = 30094;
    // ClusterIPs clear of what the lab hands out (from 198.19.0.10 and 2001:db8:19::10 up).
    let extra = json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                       "clusterIP": "198.19.0.250", "clusterIPs": ["198.19.0.250", "2001:db8:19::ff:1"]});
    lab.apply_service("ds", Family::V4, node_port_spec(np, extra)).unwrap();
    for family in [Family::V4, Family::V6] {
        lab.set_endpoints_family("ds", family, &[Ep::ready("pod-1-1")]).unwrap();
    }
    for family in [Family::V4, Family::V6] {
        let (n0, n1) = (node_ip(lab, 0, family), node_ip(lab, 1, family));
        for proto in [Proto::Tcp, Proto::Udp] {
            for addr in [SocketAddr::new(n0, np), SocketAddr::new(n1, np)] {
                lab.wait_programmed(Place::External, proto, addr, &["pod-1-1"], T)
                    .unwrap_or_else(|e| panic!("{proto:?} {addr} from outside: {e:#}"));
            }
            let via_other = SocketAddr::new(n0, np);
            let probes = lab.probe(Place::External, proto, &[via_other], 10).unwrap();
            assert_answered(&probes, &["pod-1-1"], &format!("{family:?} {proto:?} via {via_other}"));
            assert_seen_client(&probes, &n0.to_string(), &format!("{family:?} {proto:?} via {via_other}: SNAT"));
        }
    }
}

/// `externalTrafficPolicy: Local` with a health-check node port, seen from outside: the node with the local
/// endpoint answers 200 on `/healthz` with upstream's body (`localEndpoints: 1`) and serves its NodePort with
/// the client's own address; the other node answers 503 (`localEndpoints: 0`) and drops NodePort traffic.
/// When the endpoint moves to the other node, both flip.
fn health_check_node_port_steers_local_traffic(mode: &str) {
    let Some(mut s) = Scenario::up("health_check_node_port_steers_local_traffic", config(mode)) else { return };
    let lab = s.lab();
    let (np, hc) = (30095, 32095);
    lab.apply_service(
        "hc",
        Family::V4,
        json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": hc,
                        "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": np}]}}),
    )
    .unwrap();
    let nodes = [node_ip(lab, 0, Family::V4), node_ip(lab, 1, Family::V4)];
    for (pod, with) in [("pod-1-0", 1usize), ("pod-0-1", 0)] {
        let without = 1 - with;
        lab.set_endpoints("hc", &[Ep::ready(pod)]).unwrap();
        let (np_with, np_without) = (SocketAddr::new(nodes[with], np), SocketAddr::new(nodes[without], np));
        let (hc_with, hc_without) = (SocketAddr::new(nodes[with], hc), SocketAddr::new(nodes[without], hc));
        let status = |addr: SocketAddr, want: u16| {
            e2e::wait_for(T, || {
                lab.http_get_in(Place::External, addr, "/healthz").unwrap().filter(|r| r.status == want)
            })
            .unwrap_or_else(|| panic!("{pod}: GET http://{addr}/healthz from outside never answered {want}"))
        };
        for (addr, want, local) in [(hc_with, 200, 1), (hc_without, 503, 0)] {
            let r = status(addr, want);
            let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{addr}: {e}: {}", r.body));
            assert_eq!(body["localEndpoints"], local, "{pod}: {addr}: {}", r.body);
            assert_eq!(body["service"], json!({"namespace": "default", "name": "hc"}), "{addr}: {}", r.body);
            assert_eq!(body["serviceProxyHealthy"], true, "{addr}: {}", r.body);
            assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some(local.to_string().as_str()), "{addr}");
        }
        lab.wait_programmed(Place::External, Proto::Tcp, np_with, &[pod], T)
            .unwrap_or_else(|e| panic!("{pod}: NodePort of its node {np_with}: {e:#}"));
        lab.wait_programmed(Place::External, Proto::Tcp, np_without, &[], T)
            .unwrap_or_else(|e| panic!("{pod}: NodePort of the node without it {np_without}: {e:#}"));
        let probes = lab.probe_tcp(Place::External, np_with, 10).unwrap();
        assert_answered(&probes, &[pod], &format!("{pod}: NodePort {np_with} of the node with the endpoint"));
        assert_seen_client(&probes, &EXTERNAL_IP4.to_string(), &format!("{pod}: client address kept"));
        // Dropped, not refused: the probes time out instead of getting a RST.
        let probes = lab.probe_tcp(Place::External, np_without, 3).unwrap();
        assert_no_answer(&probes, &format!("{pod}: NodePort {np_without} of the node without the endpoint"));
        assert!(
            probes.iter().all(|p| p.errno != Some(libc::ECONNREFUSED)),
            "{pod}: {np_without} refused instead of dropping: {probes:#?}"
        );
    }
}

/// One Service with several ports from outside: two TCP ports and two UDP ports on two node ports (TCP and
/// UDP share each number), each translated to its own target port. The TCP port whose target no pod listens
/// on is refused by the pod, so a node port mapped to the wrong target would show.
fn node_port_multiple_ports_from_external(mode: &str) {
    let Some(mut s) = Scenario::up("node_port_multiple_ports_from_external", config(mode)) else { return };
    let lab = s.lab();
    let (np_a, np_b, np_closed) = (30096, 30097, 30098);
    let backends = ["pod-0-0", "pod-1-1"];
    lab.apply_service(
        "multi",
        Family::V4,
        json!({"spec": {"type": "NodePort", "ports": [
            {"name": "tcp-a", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": np_a},
            {"name": "tcp-b", "port": 81, "protocol": "TCP", "targetPort": 8081, "nodePort": np_b},
            {"name": "tcp-closed", "port": 82, "protocol": "TCP", "targetPort": 8089, "nodePort": np_closed},
            {"name": "udp-a", "port": 53, "protocol": "UDP", "targetPort": 8053, "nodePort": np_a},
            {"name": "udp-b", "port": 54, "protocol": "UDP", "targetPort": 8080, "nodePort": np_b}]}}),
    )
    .unwrap();
    lab.set_endpoints("multi", &backends.map(Ep::ready)).unwrap();
    for i in 0..2 {
        let node = node_ip(lab, i, Family::V4);
        for (proto, port) in [(Proto::Tcp, np_a), (Proto::Tcp, np_b), (Proto::Udp, np_a), (Proto::Udp, np_b)] {
            let addr = SocketAddr::new(node, port);
            lab.wait_programmed(Place::External, proto, addr, &backends, T)
                .unwrap_or_else(|e| panic!("{proto:?} {addr} from outside: {e:#}"));
            assert_answered(
                &lab.probe(Place::External, proto, &[addr], 12).unwrap(),
                &backends,
                &format!("{proto:?} {addr}"),
            );
        }
        let closed = SocketAddr::new(node, np_closed);
        let probes = lab.probe_tcp(Place::External, closed, 6).unwrap();
        assert_no_answer(&probes, &format!("{closed} (target port 8089, no listener)"));
        assert!(
            probes.iter().all(|p| p.errno == Some(libc::ECONNREFUSED)),
            "{closed}: the pod's refusal expected (translated to a port nobody serves): {probes:#?}"
        );
    }
}

#[test]
fn ebpf_node_port_session_affinity_from_external() {
    node_port_session_affinity_from_external("ebpf")
}

#[test]
fn iptables_node_port_session_affinity_from_external() {
    node_port_session_affinity_from_external("iptables")
}

/// `sessionAffinity: ClientIP` on a NodePort from outside: every connection of the external client lands on
/// one backend (per node: each node keeps its own affinity table, as upstream).
fn node_port_session_affinity_from_external(mode: &str) {
    let Some(mut s) = Scenario::up("node_port_session_affinity_from_external", config(mode)) else { return };
    let lab = s.lab();
    let np = 30097;
    let backends = ["pod-0-1", "pod-1-0", "pod-1-1"];
    lab.apply_service("aff", Family::V4, node_port_spec(np, json!({}))).unwrap();
    lab.set_endpoints("aff", &backends.map(Ep::ready)).unwrap();
    let addr = SocketAddr::new(node_ip(lab, 0, Family::V4), np);
    lab.wait_programmed(Place::External, Proto::Tcp, addr, &backends, T).unwrap();
    lab.apply_service("aff", Family::V4, node_port_spec(np, json!({"sessionAffinity": "ClientIP"}))).unwrap();
    // Programmed once a round of connections sticks to one backend.
    let deadline = std::time::Instant::now() + T;
    let probes = loop {
        let probes = lab.probe_tcp(Place::External, addr, 30).unwrap();
        if (probes.iter().all(|p| p.ok) && pods_answered(&probes).len() == 1) || std::time::Instant::now() > deadline {
            break probes;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(probes.iter().all(|p| p.ok), "{probes:#?}");
    assert_eq!(pods_answered(&probes).len(), 1, "ClientIP affinity: {:?}", answers_by_pod(&probes));
    // And it keeps sticking.
    let again = lab.probe_tcp(Place::External, addr, 20).unwrap();
    assert_answered(&again, &[pods_answered(&probes).first().unwrap().as_str()], "affinity, second round");
}

#[test]
fn ebpf_node_port_short_connections_never_stall() {
    node_port_short_connections_never_stall("ebpf")
}

#[test]
fn iptables_node_port_short_connections_never_stall() {
    node_port_short_connections_never_stall("iptables")
}

/// The node's `kubeproxy_ebpf_datapath_events_total{event=...}` (0 when absent).
fn datapath_event(lab: &Lab, node: usize, event: &str) -> u64 {
    let prefix = format!("kubeproxy_ebpf_datapath_events_total{{event=\"{event}\"}}");
    lab.metrics(node)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Short connections (connect, one line, close; the client closes first) from outside, back to back through a
/// NodePort whose backends are remote, so every flow is source-NATed: none may need a retransmitted SYN (a
/// connect of 0.9 s or more) or fail. More flows per backend go through than the SNAT range has ports, well
/// within the conntrack closing lifetime, so closed flows' SNAT ports must be reused without stalling new
/// flows. The client is set up as the bench's (TIME_WAIT reuse, a wide port range), so it also reuses its
/// own ports while their flows' entries are still there.
fn node_port_short_connections_never_stall(mode: &str) {
    let Some(mut s) = Scenario::up("node_port_short_connections_never_stall", config(mode)) else { return };
    let lab = s.lab();
    let np = 30099;
    let backends = ["pod-1-0", "pod-1-1"];
    lab.apply_service("np", Family::V4, node_port_spec(np, json!({}))).unwrap();
    lab.set_endpoints("np", &backends.map(Ep::ready)).unwrap();
    let addr = SocketAddr::new(node_ip(lab, 0, Family::V4), np);
    lab.wait_programmed(Place::External, Proto::Tcp, addr, &backends, T).unwrap();
    let sysctls = ["net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=10000 65000"];
    let out = lab.exec_in(Place::External, "sysctl", &[&["-qw"], &sysctls[..]].concat(), T).unwrap();
    assert!(out.status.success(), "sysctl in the external namespace: {}", String::from_utf8_lossy(&out.stderr));

    // 12k flows over 2 backends: 6k SNAT tuples per backend, against 4536 ports (61000–65535).
    const FLOWS: u64 = 12_000;
    const WINDOW: Duration = Duration::from_secs(3);
    // A 3 s bound per attempt: a SYN that needed a retransmission still connects and is counted as slow.
    let args: Vec<String> =
        ["churn-client", &addr.to_string(), "--duration-ms", "3000", "--timeout-ms", "3000"].map(String::from).to_vec();
    let (mut ok, mut windows) = (0u64, 0);
    let start = std::time::Instant::now();
    while ok < FLOWS {
        windows += 1;
        assert!(windows <= 40, "only {ok} connections in {windows} windows of {WINDOW:?}");
        let out = lab.spawn_client(Place::External, &args).unwrap().finish(WINDOW + T).unwrap();
        let summary = client_summary(&String::from_utf8_lossy(&out.stdout)).expect("churn summary");
        let (n, failed, slow) = (summary["ok"].as_u64(), summary["failed"].as_u64(), summary["slow"].as_u64());
        assert_eq!((failed, slow), (Some(0), Some(0)), "window {windows}, after {ok} connections: {summary}");
        ok += n.unwrap_or(0);
    }
    let mut counters = String::new();
    if mode == "ebpf" {
        let (reused, exhausted) =
            (datapath_event(lab, 0, "snat_port_reused"), datapath_event(lab, 0, "snat_port_exhausted"));
        assert_eq!(exhausted, 0, "SNAT ports exhausted");
        assert!(reused > 0, "{ok} flows over 2 backends without reusing a SNAT port: the range was not exercised");
        counters = format!("; SNAT ports reused {reused}");
    }
    println!(
        "[{mode}] NUMBERS node_port_short_connections: {ok} connections through {addr} in {:.1} s, 0 failed, 0 slow{counters}",
        start.elapsed().as_secs_f64()
    );
}
