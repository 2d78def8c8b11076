//! The backend against real iptables-restore / ip6tables-restore / ctnetlink, each test inside its own network
//! namespace (deleted on drop), so the host's rules and conntrack table are never touched. Skips when not root.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use common::Netns;
use common::model::*;
use proxier::backend::Backend;
use proxier::metrics::Metrics;
use proxier::model::{Changes, FamilyChanges, IpFamily, Protocol, ServicePortName, Snapshot};
use proxy_iptables::conntrack::NetlinkConntrack;
use proxy_iptables::{IptablesBackend, IptablesOptions, LocalDetectorConfig, Ruleset};

const TOOLS: &[&str] =
    &["iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"];

fn backend(ns: &Netns, metrics: Option<Arc<Metrics>>) -> IptablesBackend {
    let mut o = IptablesOptions::new(NODE);
    o.exec = proxy_iptables::Exec::new().with_prefix(ns.prefix());
    o.local_detector = LocalDetectorConfig::ClusterCidr(vec![net("10.0.0.0/8"), net("fd00:10::/64")]);
    o.metrics = metrics;
    o.conntrack = Some(Box::new(NetlinkConntrack::in_netns(format!("/run/netns/{}", ns.name))));
    IptablesBackend::new(o).unwrap_or_else(|e| panic!("backend: {e}"))
}

fn v4_services() -> Vec<Svc> {
    vec![
        svc("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80).eps(vec![ep("10.180.0.1", 80, false)]),
        svc("ns2", "svc2", "p80", Protocol::Tcp, "172.30.0.42", 80)
            .node_port(3002)
            .lb(&["1.2.3.4"])
            .ranges(&["203.0.113.0/25"])
            .etp_local(30002)
            .affinity(10800)
            .eps(vec![ep("10.180.0.2", 80, true), ep("10.180.1.2", 80, false)]),
        svc("ns3", "dns", "dns", Protocol::Udp, "172.30.0.10", 53).node_port(3053).eps(vec![ep(
            "10.180.0.3",
            53,
            false,
        )]),
        svc("ns6", "svc6", "p80", Protocol::Tcp, "172.30.0.46", 80).node_port(3006),
    ]
}

fn v6_services() -> Vec<Svc> {
    vec![
        svc("ns1", "svc1", "p80", Protocol::Tcp, "fd00:30::41", 80).eps(vec![ep("fd00:10::1", 80, false)]),
        svc("ns2", "svc2", "p80", Protocol::Tcp, "fd00:30::42", 80)
            .node_port(3002)
            .eps(vec![ep("fd00:10::2", 80, true), ep("fd00:10:1::2", 80, false)]),
    ]
}

fn snapshot(v4: &[Svc], v6: &[Svc]) -> Snapshot {
    Snapshot { v4: family_snapshot(v4), v6: family_snapshot(v6), ..Snapshot::default() }
}

fn changes(full: bool, v4: &[&ServicePortName], v6: &[&ServicePortName]) -> Changes {
    let fc = |names: &[&ServicePortName]| FamilyChanges {
        services: names.iter().map(|n| (*n).clone()).collect(),
        ..FamilyChanges::default()
    };
    Changes { full, v4: fc(v4), v6: fc(v6) }
}

fn saved(ns: &Netns, family: IpFamily) -> Ruleset {
    ns.iptables(family).save_parsed().expect("iptables-save in netns")
}

fn chains(rs: &Ruleset, table: &str) -> BTreeSet<String> {
    rs.table(table).map(|t| t.chains.iter().map(|c| c.name.clone()).collect()).unwrap_or_default()
}

fn svc_chain(name: &str, proto: &str) -> String {
    format!("KUBE-SVC-{}", proxy_iptables::hash::port_proto_hash(name, proto))
}

fn jumps(rs: &Ruleset, table: &str, src: &str, dst: &str) -> usize {
    rs.table(table).and_then(|t| t.chain(src)).map_or(0, |c| c.rules.iter().filter(|r| r.target() == Some(dst)).count())
}

#[test]
fn full_partial_stale_and_canary_repair_both_families() {
    let Some(ns) = Netns::create(TOOLS) else { return };
    let metrics = Metrics::new("iptables");
    let mut b = backend(&ns, Some(metrics.clone()));
    assert_eq!(b.families(), &[IpFamily::V4, IpFamily::V6]);
    // route_localnet was set inside the namespace (never on the host).
    let (_, v, _) = ns.sh("sysctl", &["-n", "net.ipv4.conf.all.route_localnet"]);
    assert_eq!(v.trim(), "1");

    let mut v4 = v4_services();
    let mut v6 = v6_services();
    let report = b.sync(&snapshot(&v4, &v6), &changes(true, &[], &[])).unwrap_or_else(|e| panic!("full sync: {e:?}"));
    assert!(report.full);
    for family in IpFamily::ALL {
        let rs = saved(&ns, family);
        let nat = chains(&rs, "nat");
        assert!(nat.contains(&svc_chain("ns1/svc1:p80", "tcp")), "{family}: {nat:?}");
        let svl = format!("KUBE-SVL-{}", proxy_iptables::hash::port_proto_hash("ns2/svc2:p80", "tcp"));
        assert_eq!(nat.contains(&svl), family == IpFamily::V4, "{family}: only the IPv4 svc2 has ETP Local");
        for table in ["mangle", "nat", "filter"] {
            assert!(chains(&rs, table).contains("KUBE-PROXY-CANARY"), "{family}: no canary in {table}");
        }
        assert_eq!(jumps(&rs, "nat", "PREROUTING", "KUBE-SERVICES"), 1);
        assert_eq!(jumps(&rs, "nat", "OUTPUT", "KUBE-SERVICES"), 1);
        assert_eq!(jumps(&rs, "nat", "POSTROUTING", "KUBE-POSTROUTING"), 1);
        assert_eq!(jumps(&rs, "filter", "FORWARD", "KUBE-PROXY-FIREWALL"), 1);
        assert_eq!(jumps(&rs, "filter", "INPUT", "KUBE-FIREWALL"), 1);
    }
    let text = metrics.encode();
    assert!(text.contains("kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"}"), "{text}");

    // A second full sync does not duplicate the jump rules.
    b.sync(&snapshot(&v4, &v6), &changes(true, &[], &[])).unwrap();
    let rs = saved(&ns, IpFamily::V4);
    assert_eq!(jumps(&rs, "nat", "PREROUTING", "KUBE-SERVICES"), 1);
    assert_eq!(jumps(&rs, "filter", "INPUT", "KUBE-NODEPORTS"), 1);

    // Partial: svc1 gains an endpoint; its new SEP chain appears.
    v4[0].endpoints.push(ep("10.180.2.1", 80, false));
    let svc1 = v4[0].name.clone();
    let r = b.sync(&snapshot(&v4, &v6), &changes(false, &[&svc1], &[])).unwrap();
    assert!(!r.full);
    assert_eq!(r.service_ports_programmed, 1, "only svc1's chains in the IPv4 partial sync");
    let new_sep = proxy_iptables::hash::endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.2.1:80");
    let rs = saved(&ns, IpFamily::V4);
    assert!(chains(&rs, "nat").contains(&new_sep));
    let svc1_chain = rs.table("nat").unwrap().chain(&svc_chain("ns1/svc1:p80", "tcp")).unwrap();
    assert_eq!(svc1_chain.rules.iter().filter(|r| r.target().is_some_and(|t| t.starts_with("KUBE-SEP-"))).count(), 2);

    // Partial: svc2 deleted in both families; all of its chains vanish.
    let svc2 = v4.remove(1).name;
    v6.remove(1);
    b.sync(&snapshot(&v4, &v6), &changes(false, &[&svc2], &[&svc2])).unwrap();
    let h2 = proxy_iptables::hash::port_proto_hash("ns2/svc2:p80", "tcp");
    for family in IpFamily::ALL {
        let nat = chains(&saved(&ns, family), "nat");
        assert!(!nat.iter().any(|c| c.ends_with(&h2)), "{family}: svc2 chains left: {nat:?}");
        let seps = nat.iter().filter(|c| c.starts_with("KUBE-SEP-")).count();
        assert_eq!(seps, if family == IpFamily::V4 { 3 } else { 1 }, "{family}: stale SEP chains: {nat:?}");
    }

    // Another actor flushes and deletes everything in the IPv4 nat table: the canary tells, and the next
    // (otherwise partial) sync is a full one that restores everything.
    let (ok, _, err) = ns.sh("iptables", &["-t", "nat", "-F"]);
    assert!(ok, "{err}");
    let (ok, _, err) = ns.sh("iptables", &["-t", "nat", "-X"]);
    assert!(ok, "{err}");
    assert!(!chains(&saved(&ns, IpFamily::V4), "nat").contains("KUBE-PROXY-CANARY"));
    let r = b.sync(&snapshot(&v4, &v6), &changes(false, &[], &[])).unwrap_or_else(|e| panic!("repair sync: {e:?}"));
    assert!(r.full, "the flush was not detected");
    let rs = saved(&ns, IpFamily::V4);
    assert!(chains(&rs, "nat").contains("KUBE-PROXY-CANARY"));
    assert!(chains(&rs, "nat").contains(&svc_chain("ns1/svc1:p80", "tcp")));
    assert!(chains(&rs, "nat").contains(&new_sep));
    assert_eq!(jumps(&rs, "nat", "PREROUTING", "KUBE-SERVICES"), 1);

    // cleanup() removes everything we own.
    b.cleanup().unwrap();
    for family in IpFamily::ALL {
        let rs = saved(&ns, family);
        assert!(!chains(&rs, "nat").iter().any(|c| c.starts_with("KUBE-SVC-") || c == "KUBE-SERVICES"));
    }
}

#[test]
fn restore_failure_counts_and_forces_a_full_sync() {
    let Some(ns) = Netns::create(TOOLS) else { return };
    let metrics = Metrics::new("iptables");
    let mut b = backend(&ns, Some(metrics.clone()));
    let v4 = v4_services();
    b.sync(&snapshot(&v4, &[]), &changes(true, &[], &[])).unwrap();
    // Someone deletes a chain a partial sync relies on (but not the canary): KUBE-SERVICES jumps to the now-missing
    // svc1 chain, which the partial sync does not rewrite, so the restore fails.
    let chain = svc_chain("ns1/svc1:p80", "tcp");
    let sep = proxy_iptables::hash::endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.0.1:80");
    ns.load(
        IpFamily::V4,
        &format!("*nat\n-F KUBE-SERVICES\n:{chain} - [0:0]\n-X {chain}\n:{sep} - [0:0]\n-X {sep}\nCOMMIT\n"),
    );
    let err = b.sync(&snapshot(&v4, &[]), &changes(false, &[], &[])).unwrap_err();
    assert!(err.to_string().contains("iptables-restore"), "{err}");
    let text = metrics.encode();
    assert!(
        text.contains("kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1"),
        "{text}"
    );
    assert!(text.contains("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1"));
    // The next sync is full by itself and repairs it.
    let r = b.sync(&snapshot(&v4, &[]), &changes(false, &[], &[])).unwrap();
    assert!(r.full);
    assert!(chains(&saved(&ns, IpFamily::V4), "nat").contains(&chain));
}

#[test]
fn udp_conntrack_cleanup_in_netns() {
    let Some(ns) = Netns::create(&["iptables-restore", "iptables-save", "conntrack"]) else { return };
    let metrics = Metrics::new("iptables");
    let mut o = IptablesOptions::new(NODE);
    o.exec = proxy_iptables::Exec::new().with_prefix(ns.prefix());
    o.families = vec![IpFamily::V4];
    o.metrics = Some(metrics.clone());
    o.conntrack = Some(Box::new(NetlinkConntrack::in_netns(format!("/run/netns/{}", ns.name))));
    let mut b = IptablesBackend::new(o).unwrap();
    let dns = svc("ns3", "dns", "dns", Protocol::Udp, "172.30.0.10", 53).node_port(3053).eps(vec![ep(
        "10.180.0.3",
        53,
        false,
    )]);
    // Flows: one to the current endpoint (kept), one to a removed endpoint (stale), one black hole (stale),
    // one NodePort flow to a removed endpoint (stale), one TCP flow (kept).
    let insert = |args: &[&str]| {
        let mut all = vec!["-I", "--timeout", "120"];
        all.extend_from_slice(args);
        let (ok, _, err) = ns.sh("conntrack", &all);
        assert!(ok, "conntrack -I {args:?}: {err}");
    };
    let flow = |proto: &str, dst: &str, dport: &str, reply_src: &str, sport: &str| {
        let mut v = vec!["-p", proto, "-s", "10.99.0.1", "-d", dst, "--sport", sport, "--dport", dport];
        v.extend(["-r", reply_src, "-q", "10.99.0.1", "--reply-port-src", "53", "--reply-port-dst", sport]);
        if proto == "tcp" {
            v.extend(["--state", "ESTABLISHED"]);
        }
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let flows = [
        flow("udp", "172.30.0.10", "53", "10.180.0.3", "40001"),
        flow("udp", "172.30.0.10", "53", "10.180.9.9", "40002"),
        flow("udp", "172.30.0.10", "53", "172.30.0.10", "40003"),
        flow("udp", "198.18.0.1", "3053", "10.180.9.9", "40004"),
        flow("tcp", "172.30.0.10", "53", "10.180.9.9", "40005"),
    ];
    for f in &flows {
        insert(&f.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let mut c = changes(true, &[], &[]);
    c.v4.conntrack_cleanup_required = true;
    b.sync(&snapshot(&[dns], &[]), &c).unwrap();
    let (_, listing, _) = ns.sh("conntrack", &["-L"]);
    assert!(listing.contains("sport=40001"), "kept flow missing:\n{listing}");
    assert!(listing.contains("sport=40005"), "TCP flow must stay:\n{listing}");
    for gone in ["40002", "40003", "40004"] {
        assert!(!listing.contains(&format!("sport={gone} ")), "stale flow {gone} survived:\n{listing}");
    }
    assert!(metrics.encode().contains("kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 3"));
}

/// Sync times for 1k/10k/30k Services (two endpoints each) with real iptables-restore inside a netns.
/// `cargo test --release -p proxy-iptables --test netns_sync -- --ignored --nocapture sync_time`
#[test]
#[ignore]
fn sync_time_large_clusters() {
    // KP_BENCH_SIZES=1000,10000 and KP_BENCH_VARIANT=legacy|nft narrow or redirect the run.
    let sizes: Vec<usize> = std::env::var("KP_BENCH_SIZES")
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![1_000, 10_000, 30_000]);
    let variant = match std::env::var("KP_BENCH_VARIANT").as_deref() {
        Ok("legacy") => proxy_iptables::Variant::Legacy,
        Ok("nft") => proxy_iptables::Variant::Nft,
        _ => proxy_iptables::Variant::Default,
    };
    for n in sizes {
        let Some(ns) = Netns::create(TOOLS) else { return };
        let mut o = IptablesOptions::new(NODE);
        o.exec =
            proxy_iptables::Exec::new().with_prefix(ns.prefix()).with_timeout(std::time::Duration::from_secs(1800));
        o.variant = variant;
        o.families = vec![IpFamily::V4];
        o.local_detector = LocalDetectorConfig::ClusterCidr(vec![net("10.0.0.0/8")]);
        let mut b = IptablesBackend::new(o).unwrap();
        let mut svcs: Vec<Svc> = (0..n)
            .map(|i| {
                let (a, c) = (i / 250, i % 250 + 1);
                let s = svc(
                    &format!("ns{}", i % 50),
                    &format!("svc{i}"),
                    "http",
                    Protocol::Tcp,
                    &format!("172.30.{a}.{c}"),
                    80,
                );
                let s = if i % 4 == 0 { s.node_port(30000 + (i % 2000) as u16) } else { s };
                s.eps(vec![
                    ep(&format!("10.{}.{a}.{c}", 100), 8080, false),
                    ep(&format!("10.{}.{a}.{c}", 101), 8080, false),
                ])
            })
            .collect();
        let t = Instant::now();
        b.sync(&snapshot(&svcs, &[]), &changes(true, &[], &[])).unwrap();
        let full = t.elapsed();
        svcs[7].endpoints.push(ep("10.102.0.8", 8080, false));
        let name = svcs[7].name.clone();
        let t = Instant::now();
        let r = b.sync(&snapshot(&svcs, &[]), &changes(false, &[&name], &[])).unwrap();
        let partial = t.elapsed();
        assert!(!r.full);
        let t = Instant::now();
        b.sync(&snapshot(&svcs, &[]), &changes(true, &[], &[])).unwrap();
        let full2 = t.elapsed();
        let rules: u64 = r.details.iter().filter(|(k, _)| k.ends_with("rules")).map(|(_, v)| v).sum();
        println!(
            "BENCH variant={variant:?} services={n} rules={rules} first_full={full:?} partial_one_changed={partial:?} full_again={full2:?}"
        );
    }
}
