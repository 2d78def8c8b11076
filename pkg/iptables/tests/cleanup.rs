//! Cleanup against real iptables/ip6tables/nft/ipset/ip, each test inside its own network namespace.

mod common;

use common::{Netns, upstream_iptables_ruleset};
use proxier::model::IpFamily;
use proxy_iptables::cleanup::is_kube_proxy_chain;
use proxy_iptables::{Error, ProxyMode, RestoreFlags, Ruleset, cleanup_for_mode, cleanup_leftovers};

const IPTABLES_TOOLS: &[&str] = &["iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"];

fn saved(ns: &Netns, family: IpFamily) -> Ruleset {
    ns.iptables(family).save_parsed().expect("iptables-save in netns")
}

/// Every kube-proxy chain and every jump to one is gone; kubelet's and the user's rules are intact.
fn assert_only_foreign_rules_left(ns: &Netns, family: IpFamily) {
    let rs = saved(ns, family);
    for table in &rs.tables {
        for chain in &table.chains {
            assert!(
                !is_kube_proxy_chain(&table.name, &chain.name, None),
                "{family:?}: {}/{} survived cleanup",
                table.name,
                chain.name
            );
            for rule in &chain.rules {
                let target = rule.target().unwrap_or("");
                assert!(
                    !is_kube_proxy_chain(&table.name, target, None),
                    "{family:?}: rule survived: {}",
                    rule.append_line()
                );
            }
        }
    }
    let filter = rs.table("filter").expect("filter table");
    let jumps_to =
        |chain: &str, target: &str| filter.chain(chain).unwrap().rules.iter().any(|r| r.target() == Some(target));
    assert!(jumps_to("INPUT", "KUBE-FIREWALL"), "kubelet's INPUT jump was removed");
    assert!(jumps_to("OUTPUT", "KUBE-FIREWALL"), "kubelet's OUTPUT jump was removed");
    assert!(jumps_to("INPUT", "USER-INPUT"), "the user's INPUT jump was removed");
    assert_eq!(filter.chain("USER-INPUT").unwrap().rules.len(), 1, "the user's chain was changed");
    let kubelet_rules = if family == IpFamily::V4 { 1 } else { 0 };
    assert_eq!(filter.chain("KUBE-FIREWALL").unwrap().rules.len(), kubelet_rules, "kubelet's KUBE-FIREWALL changed");
    for table in ["mangle", "filter", "nat"] {
        assert!(rs.table(table).unwrap().has_chain("KUBE-KUBELET-CANARY"), "{table}/KUBE-KUBELET-CANARY removed");
    }
    assert_eq!(rs.table("nat").unwrap().chain("KUBE-MARK-DROP").unwrap().rules.len(), 1, "kubelet's KUBE-MARK-DROP");
}

fn load_upstream(ns: &Netns) {
    for family in IpFamily::ALL {
        ns.load(family, &upstream_iptables_ruleset(family));
        // Sanity: the fixture really is there.
        assert!(saved(ns, family).table("nat").unwrap().has_chain("KUBE-SVC-XPGD46QRK7WJZT7O"));
    }
}

#[test]
fn cleanup_removes_upstream_iptables_rules_for_both_families_and_is_idempotent() {
    let Some(ns) = Netns::create(IPTABLES_TOOLS) else { return };
    load_upstream(&ns);

    let report = cleanup_leftovers(&ns.iptables(IpFamily::V4)).unwrap_or_else(|e| panic!("{e}"));
    for family in IpFamily::ALL {
        let fr = report.family(family).unwrap_or_else(|| panic!("no {family:?} report: {report:?}"));
        // mangle 1 + filter 6 + nat 12 kube-proxy chains; 9 filter + 3 nat jumps from built-in chains.
        assert_eq!(fr.chains_removed.len(), 19, "{family:?}: {:#?}", fr.chains_removed);
        assert_eq!(fr.rules_removed.len(), 12, "{family:?}: {:#?}", fr.rules_removed);
        assert!(
            fr.rules_removed
                .iter()
                .all(|r| ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"].contains(&r.chain.as_str()))
        );
        assert!(fr.chains_kept.is_empty(), "{:?}", fr.chains_kept);
        assert_only_foreign_rules_left(&ns, family);
    }
    if !std::path::Path::new("/proc/net/ip_vs").exists() {
        assert!(report.skipped.iter().any(|s| s.contains("IPVS is not available")), "{:?}", report.skipped);
    }

    let again = cleanup_leftovers(&ns.iptables(IpFamily::V4)).unwrap_or_else(|e| panic!("second cleanup: {e}"));
    assert!(again.is_empty(), "second cleanup removed something: {again:#?}");
    for family in IpFamily::ALL {
        assert_only_foreign_rules_left(&ns, family);
    }
}

#[test]
fn ebpf_mode_removes_all_kube_proxy_iptables_state() {
    let Some(ns) = Netns::create(IPTABLES_TOOLS) else { return };
    load_upstream(&ns);
    let report = cleanup_for_mode(&ns.iptables(IpFamily::V6), ProxyMode::Ebpf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.iptables.len(), 2);
    for family in IpFamily::ALL {
        assert_only_foreign_rules_left(&ns, family);
    }
    assert!(cleanup_for_mode(&ns.iptables(IpFamily::V6), ProxyMode::Ebpf).unwrap().is_empty());
}

#[test]
fn iptables_mode_keeps_its_own_chains() {
    let Some(ns) = Netns::create(IPTABLES_TOOLS) else { return };
    load_upstream(&ns);
    let before = saved(&ns, IpFamily::V4);
    let report = cleanup_for_mode(&ns.iptables(IpFamily::V4), ProxyMode::Iptables).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.iptables.iter().all(|f| f.is_empty()), "{report:#?}");
    assert_eq!(saved(&ns, IpFamily::V4), before);
}

#[test]
fn chains_used_by_someone_else_are_kept() {
    let Some(ns) = Netns::create(IPTABLES_TOOLS) else { return };
    ns.load(IpFamily::V4, &upstream_iptables_ruleset(IpFamily::V4));
    // A CNI hostport chain that reuses kube-proxy's masquerade-mark chain.
    ns.load(IpFamily::V4, "*nat\n:CNI-HOSTPORT-SETMARK - [0:0]\n-A CNI-HOSTPORT-SETMARK -j KUBE-MARK-MASQ\nCOMMIT\n");
    let report = cleanup_leftovers(&ns.iptables(IpFamily::V4)).unwrap_or_else(|e| panic!("{e}"));
    let v4 = report.family(IpFamily::V4).unwrap();
    assert_eq!(v4.chains_kept.len(), 1, "{:?}", v4.chains_kept);
    assert_eq!(v4.chains_kept[0].item, "nat/KUBE-MARK-MASQ");
    let nat = saved(&ns, IpFamily::V4).table("nat").unwrap().clone();
    assert_eq!(nat.chain("KUBE-MARK-MASQ").unwrap().rules.len(), 1, "a kept chain must be left untouched");
    assert!(!nat.has_chain("KUBE-SERVICES") && !nat.has_chain("KUBE-SEP-SXIVWICOYRO3J4NJ"));
}

#[test]
fn restore_error_names_the_bad_line_and_table() {
    let Some(ns) = Netns::create(IPTABLES_TOOLS) else { return };
    let input = "*nat\n:KUBE-TEST - [0:0]\nCOMMIT\n*filter\n:KUBE-TEST - [0:0]\n-A KUBE-TEST -j ACCEPT\n-A KUBE-TEST -m no-such-match -j DROP\nCOMMIT\n";
    let err = ns.iptables(IpFamily::V4).restore(input, RestoreFlags::NOFLUSH_COUNTERS).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, Error::Restore(f) if f.line == 7), "{err:?}");
    assert!(msg.contains("iptables-restore"), "{msg}");
    assert!(msg.contains("table filter"), "{msg}");
    assert!(msg.contains("`-A KUBE-TEST -m no-such-match -j DROP`"), "{msg}");

    // A jump to a missing chain: nf_tables blames the COMMIT line; the error still points at the culprit.
    let input = "*filter\n:KUBE-TEST2 - [0:0]\n-A KUBE-TEST2 -j KUBE-MISSING\nCOMMIT\n";
    let err = ns.iptables(IpFamily::V6).restore(input, RestoreFlags::NOFLUSH_COUNTERS).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ip6tables-restore") && msg.contains("table filter"), "{msg}");
    assert!(msg.contains("-A KUBE-TEST2 -j KUBE-MISSING"), "{msg}");
}

#[test]
fn nftables_kube_proxy_tables_are_deleted_unless_running_nftables_mode() {
    let Some(ns) = Netns::create(&["nft"]) else { return };
    for (family, table) in [("ip", "kube-proxy"), ("ip6", "kube-proxy"), ("inet", "other")] {
        let (ok, _, err) = ns.sh("nft", &["add", "table", family, table]);
        assert!(ok, "nft add table {family} {table}: {err}");
        let (ok, _, err) = ns.sh("nft", &["add", "chain", family, table, "services"]);
        assert!(ok, "nft add chain {family} {table}: {err}");
    }
    let tables = || ns.sh("nft", &["list", "tables"]).1;

    let report = cleanup_for_mode(&ns.iptables(IpFamily::V4), ProxyMode::Nftables).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.nftables_tables_deleted.is_empty());
    assert!(tables().contains("table ip kube-proxy"));

    let report = cleanup_for_mode(&ns.iptables(IpFamily::V4), ProxyMode::Iptables).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.nftables_tables_deleted, ["ip kube-proxy", "ip6 kube-proxy"]);
    let left = tables();
    assert!(!left.contains("kube-proxy"), "{left}");
    assert!(left.contains("table inet other"), "an unrelated table was deleted: {left}");

    let again = cleanup_leftovers(&ns.iptables(IpFamily::V4)).unwrap_or_else(|e| panic!("{e}"));
    assert!(again.is_empty(), "{again:#?}");
}

#[test]
fn kube_ipvs0_dummy_link_is_deleted() {
    let Some(ns) = Netns::create(&[]) else { return };
    let (ok, _, err) = ns.sh("ip", &["link", "add", "kube-ipvs0", "type", "dummy"]);
    if !ok {
        eprintln!("SKIP: this kernel cannot create dummy links: {}", err.trim());
        return;
    }
    let report = cleanup_leftovers(&ns.iptables(IpFamily::V4)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.links_deleted, ["kube-ipvs0"]);
    assert!(!ns.sh("ip", &["link", "show", "kube-ipvs0"]).0, "kube-ipvs0 still exists");
    assert!(cleanup_leftovers(&ns.iptables(IpFamily::V4)).unwrap().links_deleted.is_empty());
}

#[test]
fn a_non_dummy_kube_ipvs0_is_left_alone() {
    let Some(ns) = Netns::create(&[]) else { return };
    let (ok, _, err) = ns.sh("ip", &["link", "add", "kube-ipvs0", "type", "bridge"]);
    if !ok {
        eprintln!("SKIP: this kernel cannot create bridge links: {}", err.trim());
        return;
    }
    let report = cleanup_leftovers(&ns.iptables(IpFamily::V4)).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.links_deleted.is_empty());
    assert!(report.kept.iter().any(|k| k.item == "kube-ipvs0" && k.reason.contains("bridge")), "{:?}", report.kept);
    assert!(ns.sh("ip", &["link", "show", "kube-ipvs0"]).0, "a bridge called kube-ipvs0 was deleted");
}

/// An ipvs-mode ruleset (reference §5.4, abridged) that matches on ipvs ipsets.
const IPVS_RULESET: &str = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN
-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
COMMIT
"#;

#[test]
fn switching_from_ipvs_removes_ipvs_state() {
    let Some(ns) = Netns::create(&["iptables-save", "iptables-restore", "ipset"]) else { return };
    for (name, kind, family) in [
        ("KUBE-CLUSTER-IP", "hash:ip,port", "inet"),
        ("KUBE-IPVS-IPS", "hash:ip", "inet"),
        ("KUBE-6-CLUSTER-IP", "hash:ip,port", "inet6"),
        // kube-router-style set: KUBE- prefix, not kube-proxy's.
        ("KUBE-SRC-ROUTER", "hash:ip", "inet"),
    ] {
        let (ok, _, err) = ns.sh("ipset", &["create", name, kind, "family", family]);
        if !ok {
            eprintln!("SKIP: cannot create ipsets here: {}", err.trim());
            return;
        }
    }
    let ipt = ns.iptables(IpFamily::V4);
    if let Err(e) = ipt.restore(IPVS_RULESET, RestoreFlags { noflush: true, counters: false }) {
        eprintln!("SKIP: this kernel cannot load ipvs-mode rules (xt_set?): {e}");
        return;
    }
    let sets = || ns.sh("ipset", &["list", "-n"]).1;

    // Starting in iptables mode: ipvs-only chains go, shared chains stay for the first sync to rewrite, and a set
    // those shared chains still match on stays too.
    let report = cleanup_for_mode(&ipt, ProxyMode::Iptables).unwrap_or_else(|e| panic!("{e}"));
    let v4 = report.family(IpFamily::V4).unwrap();
    let mut removed: Vec<String> = v4.chains_removed.iter().map(|c| c.to_string()).collect();
    removed.sort();
    assert_eq!(
        removed,
        [
            "filter/KUBE-IPVS-FILTER",
            "filter/KUBE-IPVS-OUT-FILTER",
            "filter/KUBE-NODE-PORT",
            "filter/KUBE-SOURCE-RANGES-FIREWALL",
            "nat/KUBE-LOAD-BALANCER",
            "nat/KUBE-NODE-PORT",
        ]
    );
    let rs = saved(&ns, IpFamily::V4);
    assert!(rs.table("nat").unwrap().has_chain("KUBE-SERVICES"));
    assert!(rs.table("nat").unwrap().rules_jumping_to("KUBE-NODE-PORT").next().is_none());
    assert!(rs.table("filter").unwrap().has_chain("KUBE-FORWARD"));
    assert_eq!(report.ipsets_destroyed, ["KUBE-IPVS-IPS", "KUBE-6-CLUSTER-IP"]);
    assert!(report.kept.iter().any(|k| k.item == "KUBE-CLUSTER-IP"), "{:?}", report.kept);

    // `--cleanup` then removes the rest.
    let report = cleanup_leftovers(&ipt).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.ipsets_destroyed, ["KUBE-CLUSTER-IP"]);
    let left = sets();
    assert_eq!(left.trim(), "KUBE-SRC-ROUTER", "only the foreign set may remain");
    let rs = saved(&ns, IpFamily::V4);
    for table in &rs.tables {
        assert!(table.chains.iter().all(|c| !is_kube_proxy_chain(&table.name, &c.name, None)), "{rs:#?}");
    }
    assert!(cleanup_leftovers(&ipt).unwrap().is_empty());
}
