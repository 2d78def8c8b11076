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
        selected: SelectedEndpoints {
            cluster: ready.clone().into(),
            local: local.into(),
            all_reachable: ready.into(),
            has_any,
        },
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

/// Upstream's ipset names, both families: `ipsetInfo` names, and for IPv6 `NewIPSet`'s rule (`KUBE-` →
/// `KUBE-6-`, cut to 31 characters). Written out by hand from that rule, not computed.
const UPSTREAM_SET_NAMES: &[(&str, &str)] = &[
    ("KUBE-LOOP-BACK", "KUBE-6-LOOP-BACK"),
    ("KUBE-CLUSTER-IP", "KUBE-6-CLUSTER-IP"),
    ("KUBE-EXTERNAL-IP", "KUBE-6-EXTERNAL-IP"),
    ("KUBE-EXTERNAL-IP-LOCAL", "KUBE-6-EXTERNAL-IP-LOCAL"),
    ("KUBE-LOAD-BALANCER", "KUBE-6-LOAD-BALANCER"),
    ("KUBE-LOAD-BALANCER-FW", "KUBE-6-LOAD-BALANCER-FW"),
    ("KUBE-LOAD-BALANCER-LOCAL", "KUBE-6-LOAD-BALANCER-LOCAL"),
    ("KUBE-LOAD-BALANCER-SOURCE-IP", "KUBE-6-LOAD-BALANCER-SOURCE-IP"),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-6-LOAD-BALANCER-SOURCE-CID"),
    ("KUBE-NODE-PORT-TCP", "KUBE-6-NODE-PORT-TCP"),
    ("KUBE-NODE-PORT-LOCAL-TCP", "KUBE-6-NODE-PORT-LOCAL-TCP"),
    ("KUBE-NODE-PORT-UDP", "KUBE-6-NODE-PORT-UDP"),
    ("KUBE-NODE-PORT-LOCAL-UDP", "KUBE-6-NODE-PORT-LOCAL-UDP"),
    ("KUBE-NODE-PORT-SCTP-HASH", "KUBE-6-NODE-PORT-SCTP-HASH"),
    ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"),
    ("KUBE-HEALTH-CHECK-NODE-PORT", "KUBE-6-HEALTH-CHECK-NODE-PORT"),
    ("KUBE-IPVS-IPS", "KUBE-6-IPVS-IPS"),
];

/// A scenario that fills every set, for both families.
fn all_sets_scenario(family: IpFamily) -> (Config, BTreeMap<ServicePortName, ServicePortState>) {
    let (node, cip, lb, ext, src, e1, e2) = match family {
        IpFamily::V4 => {
            ("172.18.0.2", "10.96.0.", "203.0.113.7", "192.0.2.50", "172.18.0.0/16", "10.244.0.6", "10.244.1.6")
        }
        IpFamily::V6 => (
            "fd00:18::2",
            "fd00:96::",
            "2001:db8:1::7",
            "2001:db8:2::50",
            "fd00:18::/64",
            "fd00:244::6",
            "fd00:244:1::6",
        ),
    };
    let mut m = BTreeMap::new();
    for (i, (proto, local)) in [
        (Protocol::Tcp, false),
        (Protocol::Tcp, true),
        (Protocol::Udp, false),
        (Protocol::Udp, true),
        (Protocol::Sctp, false),
        (Protocol::Sctp, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut info = ServicePortInfo::new(ip(&format!("{cip}{}", i + 1)), 80, proto);
        info.node_port = 30000 + i as u16;
        info.external_policy_local = local;
        info.load_balancer_vips = vec![ip(lb)];
        info.external_ips = vec![ip(ext)];
        info.load_balancer_source_ranges = if i % 2 == 0 {
            vec![src.parse().unwrap()]
        } else {
            vec![
                match family {
                    IpFamily::V4 => "198.51.100.0/24",
                    IpFamily::V6 => "2001:db8:3::/48",
                }
                .parse()
                .unwrap(),
            ]
        };
        if local {
            info.health_check_node_port = 32000 + i as u16;
        }
        m.insert(
            ServicePortName::new("ns", &format!("s{i}"), "", proto),
            state(info, vec![ep(e1, 8080, true), ep(e2, 8080, false)]),
        );
    }
    (cfg(family, node), m)
}

#[test]
fn every_set_name_fits_ipset_and_matches_upstream_in_both_families() {
    assert_eq!(ipvs_rules::IPSETS.len(), UPSTREAM_SET_NAMES.len());
    for (set, (v4, v6)) in ipvs_rules::IPSETS.iter().zip(UPSTREAM_SET_NAMES) {
        assert_eq!(set.family_name(IpFamily::V4), *v4);
        assert_eq!(set.family_name(IpFamily::V6), *v6);
    }
    let upstream: BTreeSet<&str> = UPSTREAM_SET_NAMES.iter().flat_map(|(a, b)| [*a, *b]).collect();
    for family in IpFamily::ALL {
        let (c, services) = all_sets_scenario(family);
        let d = ipvs_rules::compute(&c, &services);
        for set in ipvs_rules::IPSETS {
            assert!(!d.entries(*set).is_empty(), "{family}: scenario leaves {} empty", set.name);
        }
        // Every name the ipset and iptables inputs mention.
        let ipset = ipvs_rules::ipset_restore(family, &d, &BTreeMap::new());
        let ipt = ipvs_rules::iptables_restore(&c, &d, ipvs_rules::JUMP_CHAINS);
        let mut seen = BTreeSet::new();
        for line in ipset.lines() {
            seen.insert(line.split_whitespace().nth(1).unwrap().to_string());
        }
        for line in ipt.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            for pair in w.windows(2).filter(|p| p[0] == "--match-set") {
                seen.insert(pair[1].to_string());
            }
        }
        assert_eq!(seen.len(), ipvs_rules::IPSETS.len(), "{family}: {seen:?}");
        for name in &seen {
            assert!(name.len() <= ipvs_rules::IPSET_MAX_NAME_LEN, "{family}: {name} is {} long", name.len());
            assert!(upstream.contains(name.as_str()), "{family}: {name} is not an upstream name");
            assert_eq!(name.starts_with("KUBE-6-"), family == IpFamily::V6, "{name}");
        }
    }
}

#[test]
fn mh_scheduler_sets_source_hash_flag_like_upstream() {
    let mut c = cfg(IpFamily::V4, "172.18.0.2");
    c.scheduler = "mh".into();
    let d = ipvs_rules::compute(&c, &scenario());
    // FlagSourceHash (0x10) on every virtual server, plus persistence where ClientIP affinity is set.
    let web = &d.servers[&key("10.96.0.10", Protocol::Tcp, 80)];
    assert_eq!(web.flags, 0x10 | 0x1);
    assert_eq!(d.servers[&key("10.96.0.53", Protocol::Udp, 53)].flags, 0x10);
    let rr = ipvs_rules::compute(&cfg(IpFamily::V4, "172.18.0.2"), &scenario());
    assert_eq!(rr.servers[&key("10.96.0.53", Protocol::Udp, 53)].flags, 0);
}

#[test]
fn cleanup_destroys_exactly_the_sets_we_create() {
    let created: BTreeSet<String> =
        IpFamily::ALL.iter().flat_map(|f| ipvs_rules::IPSETS.iter().map(move |s| s.family_name(*f))).collect();
    let destroyed: BTreeSet<String> = proxy_iptables::cleanup::ipvs_ipset_names().collect();
    assert_eq!(created, destroyed);
}

#[test]
fn lb_and_external_ips_already_local_are_served_but_not_bound() {
    let mut c = cfg(IpFamily::V4, "172.18.0.2");
    c.local_addresses.extend([ip("203.0.113.7"), ip("192.0.2.50")]);
    let d = ipvs_rules::compute(&c, &scenario());
    for a in ["203.0.113.7", "192.0.2.50"] {
        assert!(!d.bound_addrs.contains(&ip(a)), "{a} bound");
        assert!(!d.entries(ipvs_rules::IPVS_IPS).contains(a), "{a} in KUBE-IPVS-IPS");
    }
    assert!(d.servers.contains_key(&key("203.0.113.7", Protocol::Tcp, 443)));
    assert!(d.servers.contains_key(&key("192.0.2.50", Protocol::Tcp, 443)));
}
