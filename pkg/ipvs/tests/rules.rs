//! Desired state, ipset entries and iptables rules for the scenario set.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use proxier::model::{
    Endpoint, IpFamily, Protocol, SelectedEndpoints, ServicePortInfo, ServicePortName, ServicePortState,
};
use proxy_iptables::LocalDetector;
use proxy_ipvs::ipvs_rules::{self, Config, VsKey};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg(family: IpFamily, node: &str) -> Config {
    Config {
        family,
        scheduler: "rr".into(),
        masquerade_all: false,
        masquerade_mark: "0x00004000".into(),
        local_detector: LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
        node_port_ips: vec![ip(node)],
        local_addresses: BTreeSet::from([ip(node)]),
        node_ip: Some(ip(node)),
        random_fully: true,
    }
}

fn state(info: ServicePortInfo, eps: Vec<Endpoint>) -> ServicePortState {
    let ready: Vec<Endpoint> = eps.iter().filter(|e| e.ready).cloned().collect();
    let local: Vec<Endpoint> = ready.iter().filter(|e| e.is_local).cloned().collect();
    let has_any = !ready.is_empty();
    ServicePortState {
        info: Arc::new(info),
        endpoints: Arc::new(eps),
        selected: SelectedEndpoints { cluster: ready.clone(), local, all_reachable: ready, has_any },
    }
}

fn ep(s: &str, port: u16, local: bool) -> Endpoint {
    let mut e = Endpoint::new(ip(s), port);
    e.is_local = local;
    e
}

fn scenario() -> BTreeMap<ServicePortName, ServicePortState> {
    let mut m = BTreeMap::new();
    // ClusterIP with affinity, two endpoints (one local).
    let mut a = ServicePortInfo::new(ip("10.96.0.10"), 80, Protocol::Tcp);
    a.session_affinity_timeout = Some(10800);
    m.insert(
        ServicePortName::new("ns", "web", "http", Protocol::Tcp),
        state(a, vec![ep("10.244.0.5", 8080, true), ep("10.244.1.5", 8080, false)]),
    );
    // LoadBalancer, ETP Local, source range excluding the node, NodePort, health check.
    let mut b = ServicePortInfo::new(ip("10.96.0.20"), 443, Protocol::Tcp);
    b.node_port = 30443;
    b.load_balancer_vips = vec![ip("203.0.113.7")];
    b.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    b.external_policy_local = true;
    b.health_check_node_port = 31000;
    b.external_ips = vec![ip("192.0.2.50")];
    m.insert(
        ServicePortName::new("ns", "lb", "", Protocol::Tcp),
        state(b, vec![ep("10.244.0.6", 8443, true), ep("10.244.1.6", 8443, false)]),
    );
    // UDP without endpoints.
    let c = ServicePortInfo::new(ip("10.96.0.53"), 53, Protocol::Udp);
    m.insert(ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp), state(c, vec![]));
    m
}

fn key(a: &str, p: Protocol, port: u16) -> VsKey {
    VsKey { addr: ip(a), protocol: p, port }
}

#[test]
fn virtual_and_real_servers() {
    let d = ipvs_rules::compute(&cfg(IpFamily::V4, "172.18.0.2"), &scenario());
    let keys: Vec<String> = d.servers.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        keys,
        [
            "10.96.0.10:80/TCP",
            "10.96.0.20:443/TCP",
            "10.96.0.53:53/UDP",
            "172.18.0.2:30443/TCP",
            "192.0.2.50:443/TCP",
            "203.0.113.7:443/TCP"
        ]
    );
    let web = &d.servers[&key("10.96.0.10", Protocol::Tcp, 80)];
    assert_eq!((web.flags, web.timeout, web.real_servers.len()), (1, 10800, 2));
    // ClusterIP uses cluster endpoints; external addresses with ETP Local only the local one.
    assert_eq!(d.servers[&key("10.96.0.20", Protocol::Tcp, 443)].real_servers.len(), 2);
    for k in [
        key("203.0.113.7", Protocol::Tcp, 443),
        key("172.18.0.2", Protocol::Tcp, 30443),
        key("192.0.2.50", Protocol::Tcp, 443),
    ] {
        assert_eq!(d.servers[&k].real_servers, BTreeSet::from([(ip("10.244.0.6"), 8443)]), "{k}");
    }
    assert!(d.servers[&key("10.96.0.53", Protocol::Udp, 53)].real_servers.is_empty());
    let bound: Vec<String> = d.bound_addrs.iter().map(|a| a.to_string()).collect();
    assert_eq!(bound, ["10.96.0.10", "10.96.0.20", "10.96.0.53", "192.0.2.50", "203.0.113.7"]);
}

#[test]
fn ipset_restore_golden() {
    let d = ipvs_rules::compute(&cfg(IpFamily::V4, "172.18.0.2"), &scenario());
    let current = ipvs_rules::parse_ipset_save(
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\nadd KUBE-CLUSTER-IP 10.96.0.99,tcp:80\nadd KUBE-CLUSTER-IP 10.96.0.10,tcp:80\n",
    );
    let got = ipvs_rules::ipset_restore(IpFamily::V4, &d, &current);
    let want = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/ipset-v4.txt")).unwrap();
    assert_eq!(got, want, "got:\n{got}");
}

#[test]
fn iptables_golden() {
    let c = cfg(IpFamily::V4, "172.18.0.2");
    let d = ipvs_rules::compute(&c, &scenario());
    let got = ipvs_rules::iptables_restore(&c, &d, &ipvs_rules::JUMP_CHAINS[..1]);
    let want = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/iptables-v4.txt")).unwrap();
    assert_eq!(got, want, "got:\n{got}");
}

#[test]
fn ipv6_sets_are_prefixed() {
    let mut m = BTreeMap::new();
    m.insert(
        ServicePortName::new("ns", "v6", "", Protocol::Tcp),
        state(ServicePortInfo::new(ip("fd00::10"), 80, Protocol::Tcp), vec![ep("fd00:244::5", 80, false)]),
    );
    let c = cfg(IpFamily::V6, "fd00:18::2");
    let d = ipvs_rules::compute(&c, &m);
    let r = ipvs_rules::ipset_restore(IpFamily::V6, &d, &BTreeMap::new());
    assert!(
        r.contains("create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536 -exist\n"),
        "{r}"
    );
    assert!(r.contains("add KUBE-6-CLUSTER-IP fd00::10,tcp:80 -exist\n"), "{r}");
    let t = ipvs_rules::iptables_restore(&c, &d, &[]);
    assert!(t.contains("-A KUBE-SERVICES -s ::1/128 -j RETURN\n"), "{t}");
}
