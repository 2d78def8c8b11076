//! Pure rule generation: the `iptables-restore` input of one sync of one IP family, line for line what upstream's
//! `syncProxyRules` writes (reference §3.2–§3.3), plus the start-up/repair extras (jump rules into built-in chains,
//! canary chains) that upstream runs as separate `iptables` commands and we fold into the same transaction.
//!
//! Nothing here runs a command; [`crate::proxier`] decides full vs partial, gathers the existing state and feeds
//! the text to iptables-restore.

use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use proxier::metrics::{NFACCT_CT_STATE_INVALID_DROPPED, NFACCT_LOCALHOST_NODEPORTS_ACCEPTED};
use proxier::model::{Endpoint, IpFamily, NamespacedName, ServicePortName, ServicePortState};

use crate::detect::LocalDetector;
use crate::hash::{ServiceChains, endpoint_chain_name, is_service_chain_name};

/// filter/nat `KUBE-SERVICES`.
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// filter `KUBE-EXTERNAL-SERVICES`.
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
/// filter `KUBE-FORWARD`.
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
/// filter/nat `KUBE-NODEPORTS`.
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
/// filter `KUBE-PROXY-FIREWALL`.
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// nat `KUBE-POSTROUTING`.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// nat `KUBE-MARK-MASQ`.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// filter `KUBE-FIREWALL`, kubelet's chain that kube-proxy also writes (IPv4 with localhost NodePorts).
pub const KUBELET_FIREWALL: &str = "KUBE-FIREWALL";
/// The canary chain in mangle, nat and filter whose disappearance means someone flushed our rules.
pub const CANARY: &str = "KUBE-PROXY-CANARY";

/// Upstream `largeClusterEndpointsThreshold`: above this many endpoints, per-endpoint comments are dropped.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// A jump from a built-in chain into one of ours (upstream `iptablesJumpChain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpChain {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// Our chain.
    pub dst: &'static str,
    /// The built-in chain.
    pub src: &'static str,
    /// The `-m comment` text (empty: no comment).
    pub comment: &'static str,
    /// Matches before the comment.
    pub extra: &'static str,
}

const NEW: &str = "-m conntrack --ctstate NEW";

/// Upstream `iptablesJumpChains` followed by `iptablesKubeletJumpChains`, in the order they are ensured; each is
/// prepended (`-I <src> 1`) so the last one ends up first.
pub const JUMP_CHAINS: &[JumpChain] = &[
    j("filter", KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", NEW),
    j("filter", KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", NEW),
    j("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports", ""),
    j("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", NEW),
    j("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", NEW),
    j("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules", ""),
    j("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", NEW),
    j("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", NEW),
    j("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", NEW),
    j("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", ""),
    j("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals", ""),
    j("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules", ""),
    j("filter", KUBELET_FIREWALL, "INPUT", "", ""),
    j("filter", KUBELET_FIREWALL, "OUTPUT", "", ""),
];

const fn j(
    table: &'static str,
    dst: &'static str,
    src: &'static str,
    comment: &'static str,
    extra: &'static str,
) -> JumpChain {
    JumpChain { table, dst, src, comment, extra }
}

impl JumpChain {
    /// The restore line that prepends this jump: `-I <src> 1 [extra] [-m comment --comment "<c>"] -j <dst>`.
    pub fn insert_line(&self) -> String {
        let mut s = format!("-I {} 1", self.src);
        if !self.extra.is_empty() {
            s.push(' ');
            s.push_str(self.extra);
        }
        if !self.comment.is_empty() {
            let _ = write!(s, " -m comment --comment \"{}\"", self.comment);
        }
        let _ = write!(s, " -j {}", self.dst);
        s
    }
}

/// The masquerade mark as upstream prints it: Go's `fmt.Sprintf("%#08x", 1<<bit)`, i.e. eight zero-padded hex
/// digits after `0x` (bit 14 → `0x00004000`).
pub fn masquerade_mark(bit: u32) -> String {
    format!("0x{:08x}", 1u64 << bit.min(31))
}

/// Upstream `computeProbability`: `%0.10f` of `1/n`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Where the final `KUBE-SERVICES → KUBE-NODEPORTS` jump applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortDestinations {
    /// `nodePortAddresses` matches every local address: `-m addrtype --dst-type LOCAL`.
    All,
    /// One jump per node address (loopback ones are filtered by the generator as upstream does).
    Ips(Vec<IpAddr>),
}

/// Everything besides the Services that shapes one family's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    /// The family written.
    pub family: IpFamily,
    /// The masquerade mark (see [`masquerade_mark`]).
    pub masquerade_mark: String,
    /// `masqueradeAll`.
    pub masquerade_all: bool,
    /// The family's local-traffic detector.
    pub local_detector: LocalDetector,
    /// Node addresses that accept NodePorts.
    pub node_ports: NodePortDestinations,
    /// Effective localhost NodePorts (`--iptables-localhost-nodeports` and `nodePortAddresses` includes 127/8);
    /// only meaningful for IPv4.
    pub localhost_nodeports: bool,
    /// `nf_conntrack_tcp_be_liberal` is set: no INVALID-drop rule.
    pub conntrack_tcp_liberal: bool,
    /// iptables supports `MASQUERADE --random-fully`.
    pub random_fully: bool,
    /// The `ct_state_invalid_dropped_pkts` nfacct counter exists.
    pub nfacct_ct_invalid: bool,
    /// The `localhost_nps_accepted_pkts` nfacct counter exists.
    pub nfacct_localhost_nodeports: bool,
    /// This node's primary address of the family (LB source ranges containing it also allow the LB VIPs).
    pub node_ip: Option<IpAddr>,
}

impl RuleConfig {
    /// Upstream defaults for `family`: mark bit 14, no masquerade-all, no detector, NodePorts on all addresses,
    /// localhost NodePorts on, `--random-fully`, no nfacct counters.
    pub fn new(family: IpFamily) -> Self {
        RuleConfig {
            family,
            masquerade_mark: masquerade_mark(14),
            masquerade_all: false,
            local_detector: LocalDetector::None,
            node_ports: NodePortDestinations::All,
            localhost_nodeports: true,
            conntrack_tcp_liberal: false,
            random_fully: true,
            nfacct_ct_invalid: false,
            nfacct_localhost_nodeports: false,
            node_ip: None,
        }
    }

    fn ipv4_localhost_nodeports(&self) -> bool {
        self.family == IpFamily::V4 && self.localhost_nodeports
    }
}

/// Start-up/repair additions to a full sync, computed from what `iptables-save` showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// Tables that lack the canary chain (`mangle`, `nat`, `filter`).
    pub missing_canaries: Vec<&'static str>,
    /// Jump rules to prepend (absent from their built-in chain).
    pub missing_jumps: Vec<JumpChain>,
    /// kubelet's `KUBE-FIREWALL` does not exist and must be created (without flushing an existing one).
    pub create_kubelet_firewall: bool,
}

/// What to write for one sync.
#[derive(Debug, Clone, Copy)]
pub struct SyncInput<'a> {
    /// Every Service port of the family.
    pub services: &'a BTreeMap<ServicePortName, ServicePortState>,
    /// `None` for a full sync; otherwise the Services whose per-service chains must be rewritten.
    pub changed: Option<&'a HashSet<NamespacedName>>,
    /// nat chains that exist now (or that we believe exist); service chains among them that are no longer used
    /// are flushed and deleted. `None` skips stale-chain cleanup.
    pub existing_nat_chains: Option<&'a HashSet<String>>,
    /// Start-up/repair additions (full syncs).
    pub extras: Option<&'a Extras>,
}

/// The restore input and the numbers upstream derives from it.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    /// The complete `iptables-restore` input.
    pub text: String,
    /// Rules in the filter section (`-A` lines we own; all of them are rewritten every sync).
    pub filter_rules: usize,
    /// nat rule lines written (including `-X` lines).
    pub nat_rules: usize,
    /// nat rules of unchanged Services left out of a partial sync (still programmed).
    pub nat_rules_skipped: usize,
    /// Stale service chains deleted.
    pub deleted_chains: Vec<String>,
    /// Every per-service nat chain this state uses.
    pub active_nat_chains: HashSet<String>,
    /// Service ports whose per-service chains were written.
    pub services_written: usize,
    /// Total endpoints (for large-cluster mode).
    pub total_endpoints: usize,
    /// Large-cluster mode was on (per-endpoint comments dropped).
    pub large_cluster: bool,
}

impl Generated {
    /// Upstream `iptables_total{table="nat"}`: every nat rule we own, written or not.
    pub fn nat_rules_total(&self) -> usize {
        (self.nat_rules + self.nat_rules_skipped).saturating_sub(self.deleted_chains.len())
    }

    /// Upstream `iptables_last{table="nat"}`: nat rules written by this sync.
    pub fn nat_rules_last(&self) -> usize {
        self.nat_rules.saturating_sub(self.deleted_chains.len())
    }
}

/// Lines of one section part; a discarding buffer only counts (upstream `NewDiscardLineBuffer`).
#[derive(Default)]
struct Buf {
    text: String,
    lines: usize,
    discard: bool,
}

impl Buf {
    fn line(&mut self, args: fmt::Arguments<'_>) {
        self.lines += 1;
        if !self.discard {
            let _ = self.text.write_fmt(args);
            self.text.push('\n');
        }
    }

    fn chain(&mut self, name: &str) {
        self.line(format_args!(":{name} - [0:0]"));
    }
}

macro_rules! w {
    ($buf:expr, $($arg:tt)*) => { $buf.line(format_args!($($arg)*)) };
}

/// Builds the restore input for one family.
pub fn generate(cfg: &RuleConfig, input: &SyncInput<'_>) -> Generated {
    let mut filter_chains = Buf::default();
    let mut filter_rules = Buf::default();
    let mut nat_chains = Buf::default();
    let mut nat_rules = Buf::default();
    let mut skipped_chains = Buf { discard: true, ..Buf::default() };
    let mut skipped_rules = Buf { discard: true, ..Buf::default() };
    let mut out = Generated::default();
    let mark = &cfg.masquerade_mark;

    for c in [KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL] {
        filter_chains.chain(c);
    }
    for c in [KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ] {
        nat_chains.chain(c);
    }

    w!(nat_rules, "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN");
    // Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
    w!(nat_rules, "-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}");
    let random_fully = if cfg.random_fully { " --random-fully" } else { "" };
    w!(
        nat_rules,
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{random_fully}"
    );
    w!(nat_rules, "-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}");

    if cfg.ipv4_localhost_nodeports() {
        // route_localnet opens a hole (CVE-2020-8558); this copy of kubelet's rule closes it.
        filter_chains.chain(KUBELET_FIREWALL);
        w!(
            filter_rules,
            "-A {KUBELET_FIREWALL} -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        );
    }

    out.total_endpoints = input.services.values().map(|s| s.endpoints.len()).sum();
    out.large_cluster = out.total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;

    for (name, svc) in input.services {
        let write_chains = input.changed.is_none_or(|c| c.contains(name.service()));
        if write_chains {
            out.services_written += 1;
        }
        let name_string = name.to_string();
        let chains = ServiceChains::new(&name_string, name.protocol.lower());
        let sw = ServiceWriter::new(cfg, name_string, svc, chains, out.large_cluster);
        sw.write_top_level(&mut filter_rules, &mut nat_rules);
        // Unchanged Services' chains are computed (for the active set and the rule count) but not written.
        let (c, r) =
            if write_chains { (&mut nat_chains, &mut nat_rules) } else { (&mut skipped_chains, &mut skipped_rules) };
        sw.write_service_chains(c, r, &mut out.active_nat_chains);
    }
    out.nat_rules_skipped = skipped_rules.lines;

    if let Some(existing) = input.existing_nat_chains {
        let mut stale: Vec<&String> = existing
            .iter()
            .filter(|c| is_service_chain_name(c) && !out.active_nat_chains.contains(c.as_str()))
            .collect();
        stale.sort();
        for chain in stale {
            // A chain line flushes it, so the -X cannot fail on rules inside it.
            nat_chains.chain(chain);
            w!(nat_rules, "-X {chain}");
            out.deleted_chains.push(chain.clone());
        }
    }

    // Must stay the last rule of nat KUBE-SERVICES.
    const NODEPORTS_COMMENT: &str =
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    match &cfg.node_ports {
        NodePortDestinations::All => {
            let extra = match cfg.family {
                IpFamily::V6 => " ! -d ::1/128",
                IpFamily::V4 if !cfg.localhost_nodeports => " ! -d 127.0.0.0/8",
                IpFamily::V4 => "",
            };
            w!(
                nat_rules,
                "-A {KUBE_SERVICES} {NODEPORTS_COMMENT} -m addrtype --dst-type LOCAL{extra} -j {KUBE_NODEPORTS}"
            );
        }
        NodePortDestinations::Ips(ips) => {
            for ip in ips {
                if ip.is_loopback() && (cfg.family == IpFamily::V6 || !cfg.localhost_nodeports) {
                    tracing::error!(
                        address = %ip,
                        "--nodeport-addresses includes localhost but localhost NodePorts are not supported here"
                    );
                    continue;
                }
                w!(nat_rules, "-A {KUBE_SERVICES} {NODEPORTS_COMMENT} -d {ip} -j {KUBE_NODEPORTS}");
            }
        }
    }

    if !cfg.conntrack_tcp_liberal {
        // INVALID packets would otherwise cause spurious resets (kubernetes issues 74839, 117924).
        let nfacct = if cfg.nfacct_ct_invalid {
            format!(" -m nfacct --nfacct-name {NFACCT_CT_STATE_INVALID_DROPPED}")
        } else {
            String::new()
        };
        w!(filter_rules, "-A {KUBE_FORWARD} -m conntrack --ctstate INVALID{nfacct} -j DROP");
    }
    w!(
        filter_rules,
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    );
    w!(
        filter_rules,
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );

    out.filter_rules = filter_rules.lines;
    out.nat_rules = nat_rules.lines;

    // Assemble; extras (full syncs only) go after our own chains and rules so the chains they jump to exist.
    let extras = input.extras.cloned().unwrap_or_default();
    let mut text = String::with_capacity(
        filter_chains.text.len() + filter_rules.text.len() + nat_chains.text.len() + nat_rules.text.len() + 512,
    );
    if extras.missing_canaries.contains(&"mangle") {
        let _ = writeln!(text, "*mangle\n:{CANARY} - [0:0]\nCOMMIT");
    }
    for (table, chains, rules) in [("filter", &filter_chains, &filter_rules), ("nat", &nat_chains, &nat_rules)] {
        let _ = writeln!(text, "*{table}");
        text.push_str(&chains.text);
        if table == "filter" && extras.create_kubelet_firewall && !cfg.ipv4_localhost_nodeports() {
            let _ = writeln!(text, ":{KUBELET_FIREWALL} - [0:0]");
        }
        if extras.missing_canaries.contains(&table) {
            let _ = writeln!(text, ":{CANARY} - [0:0]");
        }
        text.push_str(&rules.text);
        for jump in extras.missing_jumps.iter().filter(|j| j.table == table) {
            text.push_str(&jump.insert_line());
            text.push('\n');
        }
        text.push_str("COMMIT\n");
    }
    out.text = text;
    out
}

/// Writes one Service port (reference §3.3).
struct ServiceWriter<'a> {
    cfg: &'a RuleConfig,
    name: String,
    svc: &'a ServicePortState,
    chains: ServiceChains,
    large_cluster: bool,
    has_endpoints: bool,
    has_internal: bool,
    has_external: bool,
    uses_fw_chain: bool,
}

impl<'a> ServiceWriter<'a> {
    fn new(cfg: &'a RuleConfig, name: String, svc: &'a ServicePortState, chains: ServiceChains, large: bool) -> Self {
        let info = &*svc.info;
        let sel = &svc.selected;
        let has_endpoints = sel.has_any;
        // With a Local policy and no local endpoint, that kind of traffic has nowhere to go.
        let has_internal = has_endpoints && (!info.internal_policy_local || !sel.local.is_empty());
        let has_external = has_endpoints && (!info.external_policy_local || !sel.local.is_empty());
        let uses_fw_chain =
            has_endpoints && !info.load_balancer_vips.is_empty() && !info.load_balancer_source_ranges.is_empty();
        ServiceWriter {
            cfg,
            name,
            svc,
            chains,
            large_cluster: large,
            has_endpoints,
            has_internal,
            has_external,
            uses_fw_chain,
        }
    }

    fn internal_chain(&self) -> &str {
        if self.svc.info.internal_policy_local { &self.chains.local } else { &self.chains.cluster }
    }

    /// The rules in the always-rewritten chains: nat KUBE-SERVICES/KUBE-NODEPORTS and the filter chains.
    fn write_top_level(&self, filter_rules: &mut Buf, services_nat_rules: &mut Buf) {
        let info = &*self.svc.info;
        let name = &self.name;
        let proto = info.protocol.lower();
        let port = info.port;
        let cluster_ip = info.cluster_ip;
        let ch = &self.chains;
        let (has_endpoints, has_internal, has_external) = (self.has_endpoints, self.has_internal, self.has_external);
        let internal_chain = self.internal_chain();
        let ext_chain = &ch.external;
        let uses_fw_chain = self.uses_fw_chain;
        let lb_chain = if uses_fw_chain { &ch.firewall } else { ext_chain };

        let (internal_target, internal_comment, external_target, external_comment) = if !has_endpoints {
            let c = format!("\"{name} has no endpoints\"");
            ("REJECT", c.clone(), "REJECT", c)
        } else {
            let c = format!("\"{name} has no local endpoints\"");
            ("DROP", c.clone(), "DROP", c)
        };

        // ClusterIP.
        if has_internal {
            w!(
                services_nat_rules,
                "-A {KUBE_SERVICES} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {cluster_ip} --dport {port} -j {internal_chain}"
            );
        } else {
            w!(
                filter_rules,
                "-A {KUBE_SERVICES} -m comment --comment {internal_comment} -m {proto} -p {proto} -d {cluster_ip} --dport {port} -j {internal_target}"
            );
        }

        // ExternalIPs.
        for ip in &info.external_ips {
            if has_endpoints {
                w!(
                    services_nat_rules,
                    "-A {KUBE_SERVICES} -m comment --comment \"{name} external IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {ext_chain}"
                );
            }
            if !has_external {
                w!(
                    filter_rules,
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} -m {proto} -p {proto} -d {ip} --dport {port} -j {external_target}"
                );
            }
        }

        // LoadBalancer ingress IPs.
        for ip in &info.load_balancer_vips {
            if has_endpoints {
                w!(
                    services_nat_rules,
                    "-A {KUBE_SERVICES} -m comment --comment \"{name} loadbalancer IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {lb_chain}"
                );
            }
            if uses_fw_chain {
                w!(
                    filter_rules,
                    "-A {KUBE_PROXY_FIREWALL} -m comment --comment \"{name} traffic not accepted by {}\" -m {proto} -p {proto} -d {ip} --dport {port} -j DROP",
                    ch.firewall
                );
            }
        }
        if !has_external {
            for ip in &info.load_balancer_vips {
                w!(
                    filter_rules,
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} -m {proto} -p {proto} -d {ip} --dport {port} -j {external_target}"
                );
            }
        }

        // NodePort. (NodePorts are not subject to loadBalancerSourceRanges, as upstream.)
        let node_port = info.node_port;
        if node_port != 0 {
            if has_endpoints {
                if self.cfg.ipv4_localhost_nodeports() && self.cfg.nfacct_localhost_nodeports {
                    w!(
                        services_nat_rules,
                        "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name {NFACCT_LOCALHOST_NODEPORTS_ACCEPTED} -j {ext_chain}"
                    );
                }
                w!(
                    services_nat_rules,
                    "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {ext_chain}"
                );
            }
            if !has_external {
                w!(
                    filter_rules,
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {node_port} -j {external_target}"
                );
            }
        }

        // Health check NodePort: accepted whether or not there are local endpoints.
        if info.health_check_node_port != 0 {
            w!(
                filter_rules,
                "-A {KUBE_NODEPORTS} -m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {} -j ACCEPT",
                info.health_check_node_port
            );
        }
    }

    /// The per-service chains (into discarding buffers for unchanged Services on partial syncs).
    fn write_service_chains(&self, nat_chains: &mut Buf, nat_rules: &mut Buf, active: &mut HashSet<String>) {
        let info = &*self.svc.info;
        let sel = &self.svc.selected;
        let name = &self.name;
        let proto = info.protocol.lower();
        let port = info.port;
        let cluster_ip = info.cluster_ip;
        let ch = &self.chains;
        let internal_chain = self.internal_chain();
        let external_policy_chain = if info.external_policy_local { &ch.local } else { &ch.cluster };
        let ext_chain = &ch.external;
        // Even without usable external endpoints, the EXT chain carries the short-circuit rules for local traffic.
        let uses_ext_chain = self.has_endpoints && info.externally_accessible();
        let uses_cluster_chain = !sel.cluster.is_empty() && info.uses_cluster_endpoints();
        let uses_local_chain = !sel.local.is_empty() && info.uses_local_endpoints();

        if self.has_internal {
            let base = format!(
                "-m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {cluster_ip} --dport {port}"
            );
            if self.cfg.masquerade_all {
                w!(nat_rules, "-A {internal_chain} {base} -j {KUBE_MARK_MASQ}");
            } else if self.cfg.local_detector.is_implemented() {
                // Off-cluster traffic to a VIP (e.g. via a static route to the Service range) may bounce off-node.
                w!(
                    nat_rules,
                    "-A {internal_chain} {base} {} -j {KUBE_MARK_MASQ}",
                    self.cfg.local_detector.if_not_local()
                );
            }
        }

        if uses_ext_chain {
            nat_chains.chain(ext_chain);
            active.insert(ext_chain.clone());
            if !info.external_policy_local {
                // Cluster policy may cross nodes: masquerade.
                w!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
                );
            } else {
                if self.cfg.local_detector.is_implemented() {
                    // Pod → external destination behaves as if it went out to the LB and came back.
                    w!(
                        nat_rules,
                        "-A {ext_chain} -m comment --comment \"pod traffic for {name} external destinations\" {} -j {}",
                        self.cfg.local_detector.if_local(),
                        ch.cluster
                    );
                }
                // Host-originated traffic has a local (VIP) source and must be masqueraded and served cluster-wide.
                w!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
                );
                w!(
                    nat_rules,
                    "-A {ext_chain} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}",
                    ch.cluster
                );
            }
            if self.has_external {
                w!(nat_rules, "-A {ext_chain} -j {external_policy_chain}");
            }
        }

        if self.uses_fw_chain {
            let fw = &ch.firewall;
            nat_chains.chain(fw);
            active.insert(fw.clone());
            let mut allow_from_node = false;
            for cidr in &info.load_balancer_source_ranges {
                w!(
                    nat_rules,
                    "-A {fw} -m comment --comment \"{name} loadbalancer IP\" -s {} -j {ext_chain}",
                    cidr.trunc()
                );
                if self.cfg.node_ip.is_some_and(|ip| cidr.contains(&ip)) {
                    allow_from_node = true;
                }
            }
            // A VIP bound locally loops node → VIP traffic back with the VIP as source.
            if allow_from_node {
                for ip in &info.load_balancer_vips {
                    w!(nat_rules, "-A {fw} -m comment --comment \"{name} loadbalancer IP\" -s {ip} -j {ext_chain}");
                }
            }
            // Falls through un-DNATed, to be dropped by filter KUBE-PROXY-FIREWALL.
            w!(
                nat_rules,
                "-A {fw} -m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""
            );
        }

        if uses_cluster_chain {
            nat_chains.chain(&ch.cluster);
            active.insert(ch.cluster.clone());
            self.write_endpoint_jumps(nat_rules, &ch.cluster, &sel.cluster);
        }
        if uses_local_chain {
            nat_chains.chain(&ch.local);
            active.insert(ch.local.clone());
            self.write_endpoint_jumps(nat_rules, &ch.local, &sel.local);
        }

        for ep in &sel.all_reachable {
            let addr = ep.addr_string();
            let sep = endpoint_chain_name(name, proto, &addr);
            nat_chains.chain(&sep);
            let comment = self.comment(name, false);
            // Hairpin: a pod reaching itself through the Service needs SNAT.
            w!(nat_rules, "-A {sep}{comment} -s {} -j {KUBE_MARK_MASQ}", ep.ip);
            let recent = if info.session_affinity_timeout.is_some() {
                format!(" -m recent --name {sep} --set")
            } else {
                String::new()
            };
            w!(nat_rules, "-A {sep}{comment}{recent} -m {proto} -p {proto} -j DNAT --to-destination {addr}");
            active.insert(sep);
        }
    }

    /// ` -m comment --comment <text>` unless in large-cluster mode (upstream `appendServiceCommentLocked`).
    fn comment(&self, text: &str, quoted: bool) -> String {
        match (self.large_cluster, quoted) {
            (true, _) => String::new(),
            (false, true) => format!(" -m comment --comment \"{text}\""),
            (false, false) => format!(" -m comment --comment {text}"),
        }
    }

    /// Upstream `writeServiceToEndpointRules`: affinity checks, then the probability cascade.
    fn write_endpoint_jumps(&self, nat_rules: &mut Buf, chain: &str, endpoints: &[Endpoint]) {
        let name = &self.name;
        let proto = self.svc.info.protocol.lower();
        if let Some(timeout) = self.svc.info.session_affinity_timeout {
            for ep in endpoints {
                let addr = ep.addr_string();
                let sep = endpoint_chain_name(name, proto, &addr);
                let comment = self.comment(&format!("{name} -> {addr}"), true);
                w!(
                    nat_rules,
                    "-A {chain}{comment} -m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}"
                );
            }
        }
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let addr = ep.addr_string();
            let sep = endpoint_chain_name(name, proto, &addr);
            let comment = self.comment(&format!("{name} -> {addr}"), true);
            if i < n - 1 {
                w!(
                    nat_rules,
                    "-A {chain}{comment} -m statistic --mode random --probability {} -j {sep}",
                    probability(n - i)
                );
            } else {
                w!(nat_rules, "-A {chain}{comment} -j {sep}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_and_probability_formatting() {
        assert_eq!(masquerade_mark(14), "0x00004000");
        assert_eq!(masquerade_mark(0), "0x00000001");
        assert_eq!(masquerade_mark(31), "0x80000000");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(7), "0.1428571429");
        assert_eq!(probability(1), "1.0000000000");
    }

    #[test]
    fn jump_insert_lines() {
        assert_eq!(
            JUMP_CHAINS[0].insert_line(),
            "-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"
        );
        assert_eq!(JUMP_CHAINS[13].insert_line(), "-I OUTPUT 1 -j KUBE-FIREWALL");
    }
}
