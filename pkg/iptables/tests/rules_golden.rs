//! The exact iptables-restore input for small scenarios, compared with golden files under `tests/golden/`.
//!
//! The golden files were written from reference §3 (and reviewed rule by rule against it), not copied from
//! upstream's test. `UPDATE_GOLDEN=1 cargo test -p proxy-iptables --test rules_golden` rewrites them; review the
//! diff before keeping it.

mod common;

use std::collections::HashSet;

use common::model::*;
use proxier::model::{FamilySnapshot, IpFamily, NamespacedName, Protocol};
use proxy_iptables::LocalDetector;
use proxy_iptables::rules::{Generated, NodePortDestinations, RuleConfig, SyncInput, generate};

fn cfg(family: IpFamily) -> RuleConfig {
    let detector = match family {
        IpFamily::V4 => LocalDetector::Cidr(net("10.0.0.0/8")),
        IpFamily::V6 => LocalDetector::Cidr(net("fd00:10::/64")),
    };
    RuleConfig {
        local_detector: detector,
        node_ip: Some(match family {
            IpFamily::V4 => ip("192.168.0.2"),
            IpFamily::V6 => ip("2001:db8::2"),
        }),
        ..RuleConfig::new(family)
    }
}

fn full(cfg: &RuleConfig, fs: &FamilySnapshot) -> Generated {
    generate(cfg, &SyncInput { services: &fs.services, changed: None, existing_nat_chains: None, extras: None })
}

fn check_golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if expected != actual {
        let exp: Vec<&str> = expected.lines().collect();
        let act: Vec<&str> = actual.lines().collect();
        let mut diff = String::new();
        for l in &exp {
            if !act.contains(l) {
                diff.push_str(&format!("- {l}\n"));
            }
        }
        for l in &act {
            if !exp.contains(l) {
                diff.push_str(&format!("+ {l}\n"));
            }
        }
        panic!("{name}: generated rules differ from {}:\n{diff}\n--- full output ---\n{actual}", path.display());
    }
}

fn clusterip() -> Svc {
    svc("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80).eps(vec![ep("10.180.0.1", 80, false)])
}

fn nodeport() -> Svc {
    svc("ns3", "svc3", "p80", Protocol::Tcp, "172.30.0.43", 80).node_port(3003).eps(vec![ep("10.180.0.3", 80, false)])
}

fn lb_local() -> Svc {
    svc("ns2", "svc2", "p80", Protocol::Tcp, "172.30.0.42", 80)
        .node_port(3002)
        .external_ips(&["192.168.99.22"])
        .lb(&["1.2.3.4"])
        .ranges(&["203.0.113.0/25", "192.168.0.0/24"])
        .etp_local(30002)
        .eps(vec![ep("10.180.0.2", 80, true), ep("10.180.1.2", 80, false)])
}

fn affinity() -> Svc {
    svc("ns5", "svc5", "p80", Protocol::Tcp, "172.30.0.45", 80).affinity(10800).eps(vec![
        ep("10.180.0.5", 80, false),
        ep("10.180.1.5", 80, false),
        ep("10.180.2.5", 80, false),
    ])
}

fn no_endpoints() -> Svc {
    svc("ns6", "svc6", "p80", Protocol::Tcp, "172.30.0.46", 80)
        .node_port(3006)
        .external_ips(&["192.168.99.66"])
        .lb(&["5.6.7.8"])
}

fn itp_local_without_local() -> Svc {
    svc("ns7", "svc7", "p80", Protocol::Udp, "172.30.0.47", 53).itp_local().eps(vec![ep("10.180.1.7", 53, false)])
}

fn etp_local_without_local() -> Svc {
    svc("ns4", "svc4", "p80", Protocol::Tcp, "172.30.0.44", 80)
        .node_port(3004)
        .lb(&["5.6.7.9"])
        .etp_local(30004)
        .eps(vec![ep("10.180.1.4", 80, false)])
}

fn terminating_fallback() -> Svc {
    svc("ns8", "svc8", "", Protocol::Tcp, "172.30.0.48", 8080).eps(vec![
        terminating("10.180.0.8", 8080, false),
        Endpoint { serving: false, ..terminating("10.180.1.8", 8080, false) },
    ])
}

use proxier::model::Endpoint;

#[test]
fn golden_clusterip() {
    check_golden("clusterip", &full(&cfg(IpFamily::V4), &family_snapshot(&[clusterip()])).text);
}

#[test]
fn golden_nodeport() {
    check_golden("nodeport", &full(&cfg(IpFamily::V4), &family_snapshot(&[nodeport()])).text);
}

#[test]
fn golden_loadbalancer_etp_local_source_ranges() {
    check_golden("loadbalancer_etp_local", &full(&cfg(IpFamily::V4), &family_snapshot(&[lb_local()])).text);
}

#[test]
fn golden_etp_local_without_local_endpoints() {
    check_golden("etp_local_no_local", &full(&cfg(IpFamily::V4), &family_snapshot(&[etp_local_without_local()])).text);
}

#[test]
fn golden_session_affinity() {
    check_golden("session_affinity", &full(&cfg(IpFamily::V4), &family_snapshot(&[affinity()])).text);
}

#[test]
fn golden_no_endpoints_reject() {
    check_golden("no_endpoints", &full(&cfg(IpFamily::V4), &family_snapshot(&[no_endpoints()])).text);
}

#[test]
fn golden_itp_local_without_local_endpoints_drop() {
    check_golden("itp_local_no_local", &full(&cfg(IpFamily::V4), &family_snapshot(&[itp_local_without_local()])).text);
}

#[test]
fn golden_terminating_fallback() {
    check_golden("terminating_fallback", &full(&cfg(IpFamily::V4), &family_snapshot(&[terminating_fallback()])).text);
}

#[test]
fn golden_masquerade_all_and_explicit_node_port_addresses() {
    let c = RuleConfig {
        masquerade_all: true,
        localhost_nodeports: false,
        random_fully: false,
        conntrack_tcp_liberal: true,
        masquerade_mark: proxy_iptables::rules::masquerade_mark(5),
        node_ports: NodePortDestinations::Ips(vec![ip("192.168.0.2"), ip("127.0.0.1")]),
        ..cfg(IpFamily::V4)
    };
    check_golden("masquerade_all", &full(&c, &family_snapshot(&[nodeport()])).text);
}

#[test]
fn golden_dual_stack() {
    let v4 = svc("ns9", "svc9", "p80", Protocol::Tcp, "172.30.0.49", 80)
        .node_port(3009)
        .eps(vec![ep("10.180.0.9", 80, true), ep("10.180.1.9", 80, false)]);
    let v6 = svc("ns9", "svc9", "p80", Protocol::Tcp, "fd00:30::49", 80)
        .node_port(3009)
        .eps(vec![ep("fd00:10::9", 80, true), ep("fd00:10:1::9", 80, false)]);
    check_golden("dual_stack_v4", &full(&cfg(IpFamily::V4), &family_snapshot(&[v4])).text);
    check_golden("dual_stack_v6", &full(&cfg(IpFamily::V6), &family_snapshot(&[v6])).text);
}

#[test]
fn golden_all_together() {
    let all = [
        clusterip(),
        nodeport(),
        lb_local(),
        affinity(),
        no_endpoints(),
        itp_local_without_local(),
        etp_local_without_local(),
        terminating_fallback(),
    ];
    check_golden("overall", &full(&cfg(IpFamily::V4), &family_snapshot(&all)).text);
}

/// A partial sync writes every service's rules in the always-rewritten chains, but declares and fills only the
/// changed Service's own chains.
#[test]
fn partial_sync_only_writes_changed_service_chains() {
    let all = [clusterip(), nodeport(), lb_local(), affinity()];
    let fs = family_snapshot(&all);
    let c = cfg(IpFamily::V4);
    let full_out = full(&c, &fs);
    let changed: HashSet<NamespacedName> = [NamespacedName::new("ns2", "svc2")].into_iter().collect();
    let partial = generate(
        &c,
        &SyncInput {
            services: &fs.services,
            changed: Some(&changed),
            existing_nat_chains: Some(&full_out.active_nat_chains),
            extras: None,
        },
    );
    let fixed: HashSet<&str> = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-FIREWALL",
    ]
    .into_iter()
    .collect();
    let svc2_hash = proxy_iptables::hash::port_proto_hash("ns2/svc2:p80", "tcp");
    let svc2_seps: HashSet<String> = lb_local()
        .state()
        .selected
        .all_reachable
        .iter()
        .map(|e| proxy_iptables::hash::endpoint_chain_name("ns2/svc2:p80", "tcp", &e.addr_string()))
        .collect();
    let is_svc2_chain = |c: &str| c.ends_with(&svc2_hash) || svc2_seps.contains(c);
    for line in partial.text.lines() {
        let chain = if let Some(decl) = line.strip_prefix(':') {
            decl.split_whitespace().next().unwrap()
        } else if let Some(rule) = line.strip_prefix("-A ") {
            rule.split_whitespace().next().unwrap()
        } else {
            continue;
        };
        assert!(fixed.contains(chain) || is_svc2_chain(chain), "partial sync wrote unchanged chain {chain}: {line}");
    }
    // Every fixed-chain rule of the full sync is in the partial one too (they are always rewritten).
    for line in full_out.text.lines() {
        let in_fixed =
            line.strip_prefix("-A ").and_then(|r| r.split_whitespace().next()).is_some_and(|c| fixed.contains(c));
        if in_fixed || line.starts_with(":KUBE-SERVICES") {
            assert!(partial.text.contains(line), "partial sync lacks {line}");
        }
    }
    assert!(partial.text.contains(&format!(":KUBE-SVL-{svc2_hash} - [0:0]")));
    assert!(partial.text.contains(&format!(":KUBE-FW-{svc2_hash} - [0:0]")));
    assert_eq!(partial.services_written, 1);
    assert!(partial.deleted_chains.is_empty());
    assert_eq!(partial.nat_rules_total(), full_out.nat_rules_total(), "the total counts skipped rules too");
    assert!(partial.nat_rules_last() < full_out.nat_rules_last());

    // Deleting svc2: its chains are flushed and deleted; nobody else's are touched.
    let remaining = family_snapshot(&[clusterip(), nodeport(), affinity()]);
    let deleted = generate(
        &c,
        &SyncInput {
            services: &remaining.services,
            changed: Some(&changed),
            existing_nat_chains: Some(&full_out.active_nat_chains),
            extras: None,
        },
    );
    let mut gone: Vec<String> = deleted.deleted_chains.clone();
    gone.sort();
    let mut want: Vec<String> = svc2_seps.iter().cloned().collect();
    want.extend(["KUBE-EXT-", "KUBE-FW-", "KUBE-SVC-", "KUBE-SVL-"].iter().map(|p| format!("{p}{svc2_hash}")));
    want.sort();
    assert_eq!(gone, want);
    for chain in &want {
        assert!(deleted.text.contains(&format!(":{chain} - [0:0]\n")), "{chain} not flushed");
        assert!(deleted.text.contains(&format!("-X {chain}\n")), "{chain} not deleted");
    }
}

#[test]
fn large_cluster_mode_drops_per_endpoint_comments() {
    let eps: Vec<_> = (0..1001).map(|i| ep(&format!("10.181.{}.{}", i / 250, i % 250 + 1), 80, false)).collect();
    let big = svc("ns1", "big", "p80", Protocol::Tcp, "172.30.1.1", 80).eps(eps);
    let g = full(&cfg(IpFamily::V4), &family_snapshot(&[big, clusterip()]));
    assert!(g.large_cluster);
    let sep = proxy_iptables::hash::endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.0.1:80");
    assert!(g.text.contains(&format!("-A {sep} -s 10.180.0.1 -j KUBE-MARK-MASQ\n")), "{}", &g.text[..2000]);
    assert!(g.text.contains(&format!("-A {sep} -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80\n")));
    // Comments on the fixed and KUBE-SERVICES rules stay.
    assert!(g.text.contains("--comment \"ns1/svc1:p80 cluster IP\""));
    assert!(!g.text.contains("--comment \"ns1/svc1:p80 -> "));
}

#[test]
fn extras_are_folded_into_the_transaction() {
    let extras = proxy_iptables::rules::Extras {
        missing_canaries: vec!["mangle", "nat", "filter"],
        missing_jumps: proxy_iptables::rules::JUMP_CHAINS.to_vec(),
        create_kubelet_firewall: true,
    };
    let fs = family_snapshot(&[]);
    let g = generate(
        &cfg(IpFamily::V6),
        &SyncInput { services: &fs.services, changed: None, existing_nat_chains: None, extras: Some(&extras) },
    );
    check_golden("extras_v6", &g.text);
}
