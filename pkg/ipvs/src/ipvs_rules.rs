//! Pure computation of what IPVS mode programs for one IP family (reference §5.2–5.4): virtual servers with their
//! real servers, ipset entries, `kube-ipvs0` addresses, and the iptables rules IPVS mode still needs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use proxier::model::{Endpoint, IpFamily, Protocol, ServicePortName, ServicePortState};
use proxy_iptables::LocalDetector;
use proxy_iptables::rules::JumpChain;

use crate::netlink::{SVC_F_PERSISTENT, SVC_F_SCHED2};

/// Upstream's default scheduler (`--ipvs-scheduler=""`).
pub const DEFAULT_SCHEDULER: &str = "rr";
/// Schedulers upstream accepts.
pub const SCHEDULERS: &[&str] = &["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh"];
/// Default ClientIP affinity timeout (seconds) when the Service gives none.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// The ipvs dummy interface.
pub const KUBE_IPVS0: &str = "kube-ipvs0";

// Chains (upstream names).
const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";
const KUBE_IPVS_OUT_FILTER: &str = "KUBE-IPVS-OUT-FILTER";

/// Upstream `iptablesJumpChain` for IPVS mode, each prepended to its built-in chain.
pub const JUMP_CHAINS: &[JumpChain] = &[
    jc("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals"),
    jc("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals"),
    jc("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules"),
    jc("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules"),
    jc("filter", KUBE_NODE_PORT, "INPUT", "kubernetes health check rules"),
    jc("filter", KUBE_PROXY_FIREWALL, "INPUT", "kube-proxy firewall rules"),
    jc("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kube-proxy firewall rules"),
    jc("filter", KUBE_IPVS_FILTER, "INPUT", "kubernetes ipvs access filter"),
    jc("filter", KUBE_IPVS_OUT_FILTER, "OUTPUT", "kubernetes ipvs access filter"),
];

const fn jc(table: &'static str, dst: &'static str, src: &'static str, comment: &'static str) -> JumpChain {
    JumpChain { table, dst, src, comment, extra: "" }
}

/// An ipset type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetType {
    /// `hash:ip`.
    HashIp,
    /// `hash:ip,port`.
    HashIpPort,
    /// `hash:ip,port,ip`.
    HashIpPortIp,
    /// `hash:ip,port,net`.
    HashIpPortNet,
    /// `bitmap:port` (range 0-65535).
    BitmapPort,
}

impl SetType {
    /// ipset's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SetType::HashIp => "hash:ip",
            SetType::HashIpPort => "hash:ip,port",
            SetType::HashIpPortIp => "hash:ip,port,ip",
            SetType::HashIpPortNet => "hash:ip,port,net",
            SetType::BitmapPort => "bitmap:port",
        }
    }
}

/// Longest ipset name the kernel accepts (`IPSET_MAXNAMELEN` 32, including the NUL).
pub const IPSET_MAX_NAME_LEN: usize = 31;

/// One of upstream's ipsets: IPv4 name, type and the comment its iptables rule carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpSetDef {
    /// IPv4 name (`KUBE-CLUSTER-IP`); see [`IpSetDef::family_name`] for IPv6.
    pub name: &'static str,
    /// Set type.
    pub set_type: SetType,
    /// `-m comment` text of rules matching the set.
    pub comment: &'static str,
}

impl IpSetDef {
    /// The set's name in `family`, as upstream's `NewIPSet` names it: IPv4 keeps the name; IPv6 replaces the
    /// leading `KUBE-` with `KUBE-6-` and truncates to [`IPSET_MAX_NAME_LEN`] (so `KUBE-LOAD-BALANCER-SOURCE-CIDR`
    /// becomes `KUBE-6-LOAD-BALANCER-SOURCE-CID`).
    pub fn family_name(&self, family: IpFamily) -> String {
        match (family, self.name.strip_prefix("KUBE-")) {
            (IpFamily::V6, Some(rest)) => {
                let mut n = format!("KUBE-6-{rest}");
                n.truncate(IPSET_MAX_NAME_LEN);
                n
            }
            _ => self.name.to_string(),
        }
    }
}

macro_rules! sets {
    ($($id:ident = $name:literal, $ty:ident, $comment:literal;)*) => {
        $(#[doc = concat!("`", $name, "`.")] pub const $id: IpSetDef = IpSetDef { name: $name, set_type: SetType::$ty, comment: $comment };)*
        /// Every ipset IPVS mode creates, in upstream's order.
        pub const IPSETS: &[IpSetDef] = &[$($id),*];
    };
}

sets! {
    LOOP_BACK = "KUBE-LOOP-BACK", HashIpPortIp, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose";
    CLUSTER_IP = "KUBE-CLUSTER-IP", HashIpPort, "Kubernetes service cluster ip + port for masquerade purpose";
    EXTERNAL_IP = "KUBE-EXTERNAL-IP", HashIpPort, "Kubernetes service external ip + port for masquerade and filter purpose";
    EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL", HashIpPort, "Kubernetes service external ip + port with externalTrafficPolicy=local";
    LOAD_BALANCER = "KUBE-LOAD-BALANCER", HashIpPort, "Kubernetes service lb portal";
    LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW", HashIpPort, "Kubernetes service load balancer ip + port for load balancer with sourceRange";
    LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL", HashIpPort, "Kubernetes service load balancer ip + port with externalTrafficPolicy=local";
    LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP", HashIpPortIp, "Kubernetes service load balancer ip + port + source IP for packet filter purpose";
    LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR", HashIpPortNet, "Kubernetes service load balancer ip + port + source cidr for packet filter purpose";
    NODE_PORT_TCP = "KUBE-NODE-PORT-TCP", BitmapPort, "Kubernetes nodeport TCP port for masquerade purpose";
    NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP", BitmapPort, "Kubernetes nodeport TCP port with externalTrafficPolicy=local";
    NODE_PORT_UDP = "KUBE-NODE-PORT-UDP", BitmapPort, "Kubernetes nodeport UDP port for masquerade purpose";
    NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP", BitmapPort, "Kubernetes nodeport UDP port with externalTrafficPolicy=local";
    NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH", HashIpPort, "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'";
    NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH", HashIpPort, "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'";
    HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT", BitmapPort, "Kubernetes health check node port";
    IPVS_IPS = "KUBE-IPVS-IPS", HashIp, "Addresses on the ipvs interface";
}

/// Identity of a virtual server: address, protocol, port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    /// Virtual address.
    pub addr: IpAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Virtual port.
    pub port: u16,
}

impl std::fmt::Display for VsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.addr, self.port), self.protocol)
    }
}

/// A desired virtual server and its real servers (all weight 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    /// Scheduler.
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` flags (persistent for ClientIP affinity).
    pub flags: u32,
    /// Persistence timeout (seconds).
    pub timeout: u32,
    /// Real servers `ip:port`.
    pub real_servers: BTreeSet<(IpAddr, u16)>,
    /// The Service port this virtual server belongs to (for logs).
    pub service: String,
}

/// Parameters of one family's computation.
#[derive(Debug, Clone)]
pub struct Config {
    /// The family.
    pub family: IpFamily,
    /// Scheduler (already defaulted).
    pub scheduler: String,
    /// `masqueradeAll`.
    pub masquerade_all: bool,
    /// Masquerade mark, e.g. `0x00004000`.
    pub masquerade_mark: String,
    /// Local traffic detector for this family.
    pub local_detector: LocalDetector,
    /// Node addresses NodePorts are served on (one virtual server each).
    pub node_port_ips: Vec<IpAddr>,
    /// Addresses already local to the node: ExternalIPs among them are not bound to `kube-ipvs0`.
    pub local_addresses: BTreeSet<IpAddr>,
    /// The node IP checked against `loadBalancerSourceRanges` (upstream `nodeIP`).
    pub node_ip: Option<IpAddr>,
    /// `--random-fully` on the MASQUERADE rule.
    pub random_fully: bool,
}

/// Everything one family should hold after a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Virtual servers by identity.
    pub servers: BTreeMap<VsKey, VirtualServer>,
    /// ipset entries by IPv4 set name (all sets present, possibly empty).
    pub ipsets: BTreeMap<&'static str, BTreeSet<String>>,
    /// Addresses to bind to `kube-ipvs0`.
    pub bound_addrs: BTreeSet<IpAddr>,
    /// LB `ip:port/proto` whose source ranges exclude the node (KUBE-IPVS-OUT-FILTER drops).
    pub lb_out_filter: BTreeSet<VsKey>,
}

fn ip_port(ip: IpAddr, p: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", p.lower())
}

fn real_servers(eps: &[Endpoint]) -> BTreeSet<(IpAddr, u16)> {
    eps.iter().map(|e| (e.ip, e.port)).collect()
}

impl Desired {
    fn add(&mut self, set: IpSetDef, entry: String) {
        self.ipsets.entry(set.name).or_default().insert(entry);
    }

    /// The entries of `set`.
    pub fn entries(&self, set: IpSetDef) -> &BTreeSet<String> {
        static EMPTY: BTreeSet<String> = BTreeSet::new();
        self.ipsets.get(set.name).unwrap_or(&EMPTY)
    }
}

/// Computes the desired state of one family from its Service ports (upstream `syncProxyRules`' service loop).
pub fn compute(cfg: &Config, services: &BTreeMap<ServicePortName, ServicePortState>) -> Desired {
    let mut d = Desired::default();
    for set in IPSETS {
        d.ipsets.insert(set.name, BTreeSet::new());
    }
    for (name, st) in services {
        let info = &st.info;
        let proto = info.protocol;
        let (mut flags, timeout) = match info.session_affinity_timeout {
            Some(t) => (SVC_F_PERSISTENT, if t == 0 { DEFAULT_AFFINITY_TIMEOUT } else { t }),
            None => (0, 0),
        };
        // Upstream sets FlagSourceHash (0x10) for `mh`, so it hashes on source address and port.
        if cfg.scheduler == "mh" {
            flags |= SVC_F_SCHED2;
        }
        let vs = |rs: BTreeSet<(IpAddr, u16)>| VirtualServer {
            scheduler: cfg.scheduler.clone(),
            flags,
            timeout,
            real_servers: rs,
            service: name.to_string(),
        };
        // Real servers: ClusterIP uses the internal policy, everything else the external policy.
        let internal = real_servers(if info.internal_policy_local { &st.selected.local } else { &st.selected.cluster });
        let external = real_servers(if info.external_policy_local { &st.selected.local } else { &st.selected.cluster });

        for ep in st.endpoints.iter().filter(|e| e.is_local) {
            d.add(LOOP_BACK, format!("{},{}:{},{}", ep.ip, proto.lower(), ep.port, ep.ip));
        }

        d.add(CLUSTER_IP, ip_port(info.cluster_ip, proto, info.port));
        d.servers.insert(VsKey { addr: info.cluster_ip, protocol: proto, port: info.port }, vs(internal));
        d.bound_addrs.insert(info.cluster_ip);

        for &ext in &info.external_ips {
            let set = if info.external_policy_local { EXTERNAL_IP_LOCAL } else { EXTERNAL_IP };
            d.add(set, ip_port(ext, proto, info.port));
            d.servers.insert(VsKey { addr: ext, protocol: proto, port: info.port }, vs(external.clone()));
            if !cfg.local_addresses.contains(&ext) {
                d.bound_addrs.insert(ext);
            }
        }

        for &lb in &info.load_balancer_vips {
            let entry = ip_port(lb, proto, info.port);
            d.add(LOAD_BALANCER, entry.clone());
            if info.external_policy_local {
                d.add(LOAD_BALANCER_LOCAL, entry.clone());
            }
            if !info.load_balancer_source_ranges.is_empty() {
                d.add(LOAD_BALANCER_FW, entry);
                let mut allow_from_node = false;
                for cidr in &info.load_balancer_source_ranges {
                    d.add(LOAD_BALANCER_SOURCE_CIDR, format!("{lb},{}:{},{}", proto.lower(), info.port, cidr.trunc()));
                    allow_from_node |= cfg.node_ip.is_some_and(|ip| cidr.contains(&ip));
                }
                // Traffic from the node itself to its LB VIP loops back locally; allow it when a range covers it.
                if allow_from_node {
                    d.add(LOAD_BALANCER_SOURCE_IP, format!("{lb},{}:{},{lb}", proto.lower(), info.port));
                } else {
                    d.lb_out_filter.insert(VsKey { addr: lb, protocol: proto, port: info.port });
                }
            }
            d.servers.insert(VsKey { addr: lb, protocol: proto, port: info.port }, vs(external.clone()));
            // As for ExternalIPs, upstream does not bind an address the node already has.
            if !cfg.local_addresses.contains(&lb) {
                d.bound_addrs.insert(lb);
            }
        }

        if info.node_port != 0 {
            let (set, local_set) = match proto {
                Protocol::Tcp => (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP),
                Protocol::Udp => (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
                Protocol::Sctp => (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP),
            };
            let entries: Vec<String> = match proto {
                // SCTP uses hash:ip,port, so one entry per node IP.
                Protocol::Sctp => cfg.node_port_ips.iter().map(|ip| ip_port(*ip, proto, info.node_port)).collect(),
                _ => vec![info.node_port.to_string()],
            };
            for e in entries {
                if info.external_policy_local {
                    d.add(local_set, e.clone());
                }
                d.add(set, e);
            }
            for &ip in &cfg.node_port_ips {
                d.servers.insert(VsKey { addr: ip, protocol: proto, port: info.node_port }, vs(external.clone()));
            }
        }
        if info.health_check_node_port != 0 {
            d.add(HEALTH_CHECK_NODE_PORT, info.health_check_node_port.to_string());
        }
    }
    for ip in &d.bound_addrs.clone() {
        d.add(IPVS_IPS, ip.to_string());
    }
    d
}

/// Normalises an entry as ipset prints it back (`/32` and `/128` nets are printed bare).
pub fn normalize_entry(e: &str) -> String {
    e.split(',').map(|p| p.trim_end_matches("/32").trim_end_matches("/128")).collect::<Vec<_>>().join(",")
}

/// Parses `ipset save` output into entries per set name (normalised).
pub fn parse_ipset_save(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("create") => {
                if let Some(n) = w.next() {
                    out.entry(n.to_string()).or_default();
                }
            }
            Some("add") => {
                if let (Some(n), Some(e)) = (w.next(), w.next()) {
                    out.entry(n.to_string()).or_default().insert(normalize_entry(e));
                }
            }
            _ => {}
        }
    }
    out
}

/// The `ipset restore` input bringing `current` (from `ipset save`) to `desired` for `family`: every set created
/// with `-exist` (upstream's parameters), stale entries deleted, missing ones added. One process per sync.
pub fn ipset_restore(family: IpFamily, desired: &Desired, current: &BTreeMap<String, BTreeSet<String>>) -> String {
    let inet = if family == IpFamily::V6 { "inet6" } else { "inet" };
    let mut out = String::new();
    for set in IPSETS {
        let name = set.family_name(family);
        match set.set_type {
            SetType::BitmapPort => {
                let _ = writeln!(out, "create {name} bitmap:port range 0-65535 -exist");
            }
            t => {
                let _ = writeln!(out, "create {name} {} family {inet} hashsize 1024 maxelem 65536 -exist", t.as_str());
            }
        }
        let want: BTreeSet<String> = desired.entries(*set).iter().map(|e| normalize_entry(e)).collect();
        let have = current.get(&name);
        for e in have.into_iter().flatten().filter(|e| !want.contains(*e)) {
            let _ = writeln!(out, "del {name} {e} -exist");
        }
        for e in want.iter().filter(|e| !have.is_some_and(|h| h.contains(*e))) {
            let _ = writeln!(out, "add {name} {e} -exist");
        }
    }
    out
}

/// `(set, from chain, to, match, protocol, table)`: upstream `ipsetWithIptablesChain`, written for non-empty sets.
const IPSET_CHAINS: &[(IpSetDef, &str, &str, &str, &str, &str)] = &[
    (LOOP_BACK, KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", "", "nat"),
    (LOAD_BALANCER, KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", "", "nat"),
    (LOAD_BALANCER_LOCAL, KUBE_LOAD_BALANCER, "RETURN", "dst,dst", "", "nat"),
    (NODE_PORT_LOCAL_TCP, KUBE_NODE_PORT, "RETURN", "dst", "tcp", "nat"),
    (NODE_PORT_TCP, KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp", "nat"),
    (NODE_PORT_LOCAL_UDP, KUBE_NODE_PORT, "RETURN", "dst", "udp", "nat"),
    (NODE_PORT_UDP, KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp", "nat"),
    (NODE_PORT_LOCAL_SCTP, KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp", "nat"),
    (NODE_PORT_SCTP, KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp", "nat"),
    (LOAD_BALANCER_FW, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", "", "filter"),
    (LOAD_BALANCER_SOURCE_CIDR, KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", "", "filter"),
    (LOAD_BALANCER_SOURCE_IP, KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", "", "filter"),
];

/// The `iptables-restore --noflush` input for one family (reference §5.4); `missing_jumps` are prepended.
pub fn iptables_restore(cfg: &Config, d: &Desired, missing_jumps: &[JumpChain]) -> String {
    let fam = cfg.family;
    let n = |s: IpSetDef| s.family_name(fam);
    let mark = &cfg.masquerade_mark;
    let mut nat = Vec::<String>::new();
    let mut filter = Vec::<String>::new();
    let lo = if fam == IpFamily::V6 { "::1/128" } else { "127.0.0.0/8" };
    nat.push(format!("-A {KUBE_SERVICES} -s {lo} -j RETURN"));
    for (set, from, to, m, proto, table) in IPSET_CHAINS {
        if d.entries(*set).is_empty() {
            continue;
        }
        let p = if proto.is_empty() { String::new() } else { format!(" -p {proto}") };
        let line =
            format!("-A {from}{p} -m comment --comment \"{}\" -m set --match-set {} {m} -j {to}", set.comment, n(*set));
        if *table == "nat" { nat.push(line) } else { filter.push(line) }
    }
    if !d.entries(CLUSTER_IP).is_empty() {
        let base = format!(
            "-A {KUBE_SERVICES} -m comment --comment \"{}\" -m set --match-set {}",
            CLUSTER_IP.comment,
            n(CLUSTER_IP)
        );
        if cfg.masquerade_all {
            nat.push(format!("{base} dst,dst -j {KUBE_MARK_MASQ}"));
        } else if cfg.local_detector.is_implemented() {
            nat.push(format!("{base} dst,dst {} -j {KUBE_MARK_MASQ}", cfg.local_detector.if_not_local()));
        } else {
            // Node-originated traffic picks a VIP of kube-ipvs0 as source; masquerade it.
            nat.push(format!("{base} src,dst -j {KUBE_MARK_MASQ}"));
        }
    }
    for (set, masq) in [(EXTERNAL_IP, true), (EXTERNAL_IP_LOCAL, false)] {
        if d.entries(set).is_empty() {
            continue;
        }
        let base = format!(
            "-A {KUBE_SERVICES} -m comment --comment \"{}\" -m set --match-set {} dst,dst",
            set.comment,
            n(set)
        );
        if masq {
            nat.push(format!("{base} -j {KUBE_MARK_MASQ}"));
        }
        nat.push(format!("{base} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT"));
        nat.push(format!("{base} -m addrtype --dst-type LOCAL -j ACCEPT"));
    }
    nat.push(format!("-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}"));
    nat.push(format!("-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}"));
    filter.push(format!("-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP"));
    for k in &d.lb_out_filter {
        filter.push(format!(
            "-A {KUBE_IPVS_OUT_FILTER} -s {a} -m ipvs --vaddr {a} --vproto {p} --vport {port} -j DROP",
            a = k.addr,
            p = k.protocol.lower(),
            port = k.port
        ));
    }
    // Accept traffic to virtual services in case other rules would drop it; must end KUBE-SERVICES.
    for set in [CLUSTER_IP, LOAD_BALANCER] {
        if !d.entries(set).is_empty() {
            nat.push(format!("-A {KUBE_SERVICES} -m set --match-set {} dst,dst -j ACCEPT", n(set)));
        }
    }
    filter.push(format!(
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    ));
    filter.push(format!("-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"));
    filter.push(format!(
        "-A {KUBE_NODE_PORT} -m comment --comment \"{}\" -m set --match-set {} dst -j ACCEPT",
        HEALTH_CHECK_NODE_PORT.comment,
        n(HEALTH_CHECK_NODE_PORT)
    ));
    for (set, m) in [
        (LOAD_BALANCER, "dst,dst"),
        (CLUSTER_IP, "dst,dst"),
        (EXTERNAL_IP, "dst,dst"),
        (EXTERNAL_IP_LOCAL, "dst,dst"),
        (HEALTH_CHECK_NODE_PORT, "dst"),
    ] {
        filter.push(format!("-A {KUBE_IPVS_FILTER} -m set --match-set {} {m} -j RETURN", n(set)));
    }
    // Closes host ports on VIP addresses (upstream issue 72236).
    filter.push(format!(
        "-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW -m set --match-set {} dst -j REJECT",
        n(IPVS_IPS)
    ));
    nat.push(format!("-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"));
    nat.push(format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"));
    let rf = if cfg.random_fully { " --random-fully" } else { "" };
    nat.push(format!(
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{rf}"
    ));
    nat.push(format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}"));

    let mut out = String::from("*filter\n");
    for c in [
        KUBE_FORWARD,
        KUBE_NODE_PORT,
        KUBE_PROXY_FIREWALL,
        KUBE_SOURCE_RANGES_FIREWALL,
        KUBE_IPVS_FILTER,
        KUBE_IPVS_OUT_FILTER,
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for j in missing_jumps.iter().filter(|j| j.table == "filter") {
        let _ = writeln!(out, "{}", j.insert_line());
    }
    for l in filter {
        let _ = writeln!(out, "{l}");
    }
    out.push_str("COMMIT\n*nat\n");
    for c in [KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for j in missing_jumps.iter().filter(|j| j.table == "nat") {
        let _ = writeln!(out, "{}", j.insert_line());
    }
    for l in nat {
        let _ = writeln!(out, "{l}");
    }
    out.push_str("COMMIT\n");
    out
}
