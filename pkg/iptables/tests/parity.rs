//! Parity: for a mixed API state, the chains and (table, chain, rule) triples we program equal what an
//! independent, deliberately naive model of reference §3.3 yields. The model builds the expected set directly
//! from the rule list in the reference (items 1–11); it shares only the hash functions (tested on their own
//! against independently computed values) and the endpoint selection (the shared model's).

mod common;

use std::collections::BTreeSet;

use common::model::*;
use proxier::model::{IpFamily, Protocol, ServicePortState};
use proxy_iptables::LocalDetector;
use proxy_iptables::hash::{endpoint_chain_name, port_proto_hash};
use proxy_iptables::rules::{RuleConfig, SyncInput, generate};
use proxy_iptables::save::Ruleset;

type Triple = (String, String, String);

/// A tiny deterministic generator so the state is varied but reproducible.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn mixed_state() -> Vec<Svc> {
    let mut r = Lcg(42);
    let mut out = Vec::new();
    for i in 0..60u16 {
        let proto = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][r.next(3) as usize];
        let port_name = if r.next(2) == 0 { "" } else { "p" };
        let mut s =
            svc(&format!("ns{}", i % 7), &format!("svc{i}"), port_name, proto, &format!("172.30.1.{i}"), 80 + i);
        if r.next(2) == 0 {
            s = s.node_port(30000 + i);
        }
        if r.next(4) == 0 {
            s = s.external_ips(&[&format!("192.168.50.{i}")]);
        }
        if r.next(3) == 0 {
            s = s.lb(&[&format!("5.5.5.{i}")]);
            if r.next(2) == 0 {
                s = s.ranges(&["203.0.113.0/25", "192.168.0.0/16"][..1 + r.next(2) as usize]);
            }
        }
        if r.next(3) == 0 && s.info.externally_accessible() {
            s = s.etp_local(32000 + i);
        }
        if r.next(5) == 0 {
            s = s.itp_local();
        }
        if r.next(4) == 0 {
            s = s.affinity(100 + u32::from(i));
        }
        let n = r.next(5);
        let eps = (0..n)
            .map(|k| {
                let addr = format!("10.{}.{}.{}", 180 + k, i / 200, i % 200 + 1);
                let local = r.next(2) == 0;
                match r.next(6) {
                    0 => terminating(&addr, 8000 + i, local),
                    1 => proxier::model::Endpoint { serving: false, ..terminating(&addr, 8000 + i, local) },
                    _ => ep(&addr, 8000 + i, local),
                }
            })
            .collect();
        out.push(s.eps(eps));
    }
    out
}

/// Reference §3.2 fixed part plus §3.3 per service, as a set.
fn model(cfg: &RuleConfig, svcs: &[(String, ServicePortState)]) -> (BTreeSet<(String, String)>, BTreeSet<Triple>) {
    let mut chains = BTreeSet::new();
    let mut rules = BTreeSet::new();
    let mut chain = |t: &str, c: &str| {
        chains.insert((t.to_string(), c.to_string()));
    };
    let mut rule = |t: &str, c: &str, spec: String| {
        rules.insert((t.to_string(), c.to_string(), spec));
    };
    let m = &cfg.masquerade_mark;
    for c in ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"] {
        chain("filter", c);
    }
    for c in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        chain("nat", c);
    }
    rule("nat", "KUBE-POSTROUTING", format!("-m mark ! --mark {m}/{m} -j RETURN"));
    rule("nat", "KUBE-POSTROUTING", format!("-j MARK --xor-mark {m}"));
    rule(
        "nat",
        "KUBE-POSTROUTING",
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
    );
    rule("nat", "KUBE-MARK-MASQ", format!("-j MARK --or-mark {m}"));
    chain("filter", "KUBE-FIREWALL");
    rule("filter", "KUBE-FIREWALL", "-m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".into());
    rule("filter", "KUBE-FORWARD", "-m conntrack --ctstate INVALID -j DROP".into());
    rule(
        "filter",
        "KUBE-FORWARD",
        format!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {m}/{m} -j ACCEPT"),
    );
    rule("filter", "KUBE-FORWARD", "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into());
    rule("nat", "KUBE-SERVICES", "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into());

    let not_local = cfg.local_detector.if_not_local();
    let local = cfg.local_detector.if_local();
    for (name, st) in svcs {
        let i = &*st.info;
        let e = &st.selected;
        let p = i.protocol.lower();
        let h = port_proto_hash(name, p);
        let (svc, svl, ext, fw) =
            (format!("KUBE-SVC-{h}"), format!("KUBE-SVL-{h}"), format!("KUBE-EXT-{h}"), format!("KUBE-FW-{h}"));
        let has_eps = e.has_any;
        let internal_chain = if i.internal_policy_local { &svl } else { &svc };
        let has_internal = if i.internal_policy_local { has_eps && !e.local.is_empty() } else { has_eps };
        let external_policy = if i.external_policy_local { &svl } else { &svc };
        let has_external = if i.external_policy_local { has_eps && !e.local.is_empty() } else { has_eps };
        let externally = i.node_port != 0 || !i.external_ips.is_empty() || !i.load_balancer_vips.is_empty();
        let uses_ext = has_eps && externally;
        let uses_fw = has_eps && !i.load_balancer_vips.is_empty() && !i.load_balancer_source_ranges.is_empty();
        let uses_cluster = !e.cluster.is_empty() && (!i.internal_policy_local || externally);
        let uses_local = !e.local.is_empty() && (i.internal_policy_local || (i.external_policy_local && externally));
        let (verdict, why) = if !has_eps { ("REJECT", "has no endpoints") } else { ("DROP", "has no local endpoints") };
        let mp = format!("-m {p} -p {p}");

        // 1. ClusterIP.
        if has_internal {
            rule(
                "nat",
                "KUBE-SERVICES",
                format!(
                    "-m comment --comment \"{name} cluster IP\" {mp} -d {} --dport {} -j {internal_chain}",
                    i.cluster_ip, i.port
                ),
            );
        } else {
            rule(
                "filter",
                "KUBE-SERVICES",
                format!(
                    "-m comment --comment \"{name} {why}\" {mp} -d {} --dport {} -j {verdict}",
                    i.cluster_ip, i.port
                ),
            );
        }
        // 2. External IPs.
        for x in &i.external_ips {
            if has_eps {
                rule(
                    "nat",
                    "KUBE-SERVICES",
                    format!("-m comment --comment \"{name} external IP\" {mp} -d {x} --dport {} -j {ext}", i.port),
                );
            }
            if !has_external {
                rule(
                    "filter",
                    "KUBE-EXTERNAL-SERVICES",
                    format!("-m comment --comment \"{name} {why}\" {mp} -d {x} --dport {} -j {verdict}", i.port),
                );
            }
        }
        // 3. LB IPs.
        for x in &i.load_balancer_vips {
            if has_eps {
                let to = if uses_fw { &fw } else { &ext };
                rule(
                    "nat",
                    "KUBE-SERVICES",
                    format!("-m comment --comment \"{name} loadbalancer IP\" {mp} -d {x} --dport {} -j {to}", i.port),
                );
            }
            if uses_fw {
                rule(
                    "filter",
                    "KUBE-PROXY-FIREWALL",
                    format!(
                        "-m comment --comment \"{name} traffic not accepted by {fw}\" {mp} -d {x} --dport {} -j DROP",
                        i.port
                    ),
                );
            }
            if !has_external {
                rule(
                    "filter",
                    "KUBE-EXTERNAL-SERVICES",
                    format!("-m comment --comment \"{name} {why}\" {mp} -d {x} --dport {} -j {verdict}", i.port),
                );
            }
        }
        // 4. NodePort (no nfacct counter in this configuration).
        if i.node_port != 0 {
            if has_eps {
                rule(
                    "nat",
                    "KUBE-NODEPORTS",
                    format!("-m comment --comment {name} {mp} --dport {} -j {ext}", i.node_port),
                );
            }
            if !has_external {
                rule(
                    "filter",
                    "KUBE-EXTERNAL-SERVICES",
                    format!(
                        "-m comment --comment \"{name} {why}\" -m addrtype --dst-type LOCAL {mp} --dport {} -j {verdict}",
                        i.node_port
                    ),
                );
            }
        }
        // 5. Health check NodePort.
        if i.health_check_node_port != 0 {
            rule(
                "filter",
                "KUBE-NODEPORTS",
                format!(
                    "-m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {} -j ACCEPT",
                    i.health_check_node_port
                ),
            );
        }
        // 7. Internal masquerade.
        if has_internal {
            rule(
                "nat",
                internal_chain,
                format!(
                    "-m comment --comment \"{name} cluster IP\" {mp} -d {} --dport {} {not_local} -j KUBE-MARK-MASQ",
                    i.cluster_ip, i.port
                ),
            );
        }
        // 8. EXT.
        if uses_ext {
            chain("nat", &ext);
            if !i.external_policy_local {
                rule(
                    "nat",
                    &ext,
                    format!(
                        "-m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
                    ),
                );
            } else {
                rule(
                    "nat",
                    &ext,
                    format!("-m comment --comment \"pod traffic for {name} external destinations\" {local} -j {svc}"),
                );
                rule(
                    "nat",
                    &ext,
                    format!(
                        "-m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                    ),
                );
                rule(
                    "nat",
                    &ext,
                    format!(
                        "-m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
                    ),
                );
            }
            if has_external {
                rule("nat", &ext, format!("-j {external_policy}"));
            }
        }
        // 9. FW.
        if uses_fw {
            chain("nat", &fw);
            let node = cfg.node_ip.unwrap();
            for c in &i.load_balancer_source_ranges {
                rule("nat", &fw, format!("-m comment --comment \"{name} loadbalancer IP\" -s {c} -j {ext}"));
            }
            if i.load_balancer_source_ranges.iter().any(|c| c.contains(&node)) {
                for x in &i.load_balancer_vips {
                    rule("nat", &fw, format!("-m comment --comment \"{name} loadbalancer IP\" -s {x} -j {ext}"));
                }
            }
            rule(
                "nat",
                &fw,
                format!("-m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""),
            );
        }
        // 10. SVC / SVL.
        for (used, c, eps) in [(uses_cluster, &svc, &e.cluster), (uses_local, &svl, &e.local)] {
            if !used {
                continue;
            }
            chain("nat", c);
            for (k, ep) in eps.iter().enumerate() {
                let a = ep.addr_string();
                let sep = endpoint_chain_name(name, p, &a);
                if let Some(t) = i.session_affinity_timeout {
                    rule(
                        "nat",
                        c,
                        format!(
                            "-m comment --comment \"{name} -> {a}\" -m recent --name {sep} --rcheck --seconds {t} --reap -j {sep}"
                        ),
                    );
                }
                let left = eps.len() - k;
                let stat = if left > 1 {
                    format!(" -m statistic --mode random --probability {:.10}", 1.0 / left as f64)
                } else {
                    String::new()
                };
                rule("nat", c, format!("-m comment --comment \"{name} -> {a}\"{stat} -j {sep}"));
            }
        }
        // 11. SEP.
        for ep in &e.all_reachable {
            let a = ep.addr_string();
            let sep = endpoint_chain_name(name, p, &a);
            chain("nat", &sep);
            rule("nat", &sep, format!("-m comment --comment {name} -s {} -j KUBE-MARK-MASQ", ep.ip));
            let recent = if i.session_affinity_timeout.is_some() {
                format!(" -m recent --name {sep} --set")
            } else {
                String::new()
            };
            rule("nat", &sep, format!("-m comment --comment {name}{recent} {mp} -j DNAT --to-destination {a}"));
        }
    }
    (chains, rules)
}

#[test]
fn generated_rules_equal_the_reference_model() {
    let svcs = mixed_state();
    let fs = family_snapshot(&svcs);
    let cfg = RuleConfig {
        local_detector: LocalDetector::Cidr(net("10.0.0.0/8")),
        node_ip: Some(ip("192.168.0.2")),
        ..RuleConfig::new(IpFamily::V4)
    };
    let generated =
        generate(&cfg, &SyncInput { services: &fs.services, changed: None, existing_nat_chains: None, extras: None });
    let parsed = Ruleset::parse(&generated.text).expect("generated input parses as a ruleset");
    let mut got_chains = BTreeSet::new();
    let mut got_rules = BTreeSet::new();
    let mut rule_count = 0;
    for t in &parsed.tables {
        for c in &t.chains {
            got_chains.insert((t.name.clone(), c.name.clone()));
            for r in &c.rules {
                rule_count += 1;
                got_rules.insert((t.name.clone(), c.name.clone(), r.spec.clone()));
            }
        }
    }
    assert_eq!(rule_count, got_rules.len(), "no rule is written twice");

    let states: Vec<(String, ServicePortState)> = fs.services.iter().map(|(n, s)| (n.to_string(), s.clone())).collect();
    let (want_chains, want_rules) = model(&cfg, &states);
    let missing: Vec<_> = want_rules.difference(&got_rules).collect();
    let extra: Vec<_> = got_rules.difference(&want_rules).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing: {missing:#?}\nextra: {extra:#?}");
    assert_eq!(got_chains, want_chains);

    // The mixed state really exercises the interesting cases.
    let text = &generated.text;
    for needle in ["-j REJECT", "has no local endpoints\"", "KUBE-SVL-", "KUBE-FW-", "--rcheck", "-m sctp", "-j DROP"] {
        assert!(text.contains(needle), "mixed state lacks {needle}");
    }
}
