//! The iptables [`Backend`]: upstream's `syncProxyRules` driven by the shared model.
//!
//! Per family and per sync, ONE `iptables-restore --noflush --counters` transaction. A full sync (first sync,
//! `changes.full`, after any failure, after the canary vanished, when the local detector changed) first reads the
//! ruleset with `iptables-save` to find stale service chains, missing jump rules and missing canaries, and folds
//! their repair into the same transaction. A partial sync rewrites the fixed chains and only the per-service chains
//! of Services that changed, and deletes the chains that stopped being used (known from our own bookkeeping, so
//! no `iptables-save` is needed between full syncs).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxier::backend::{Backend, BackendError, SyncReport};
use proxier::metrics::{IptablesTable, Metrics};
use proxier::model::{Changes, IpFamily, NamespacedName, Snapshot};
use tracing::{debug, error, info, warn};

use crate::conntrack::{ConntrackTable, NetlinkConntrack};
use crate::detect::{LocalDetector, LocalDetectorConfig, NodePortAddresses};
use crate::rules::{self, CANARY, Extras, JUMP_CHAINS, KUBELET_FIREWALL, NodePortDestinations, RuleConfig, SyncInput};
use crate::runner::{Exec, Iptables, RestoreFlags, Table, Variant};
use crate::save::Ruleset;
use crate::sysctl::{self, ExecSysctl, ProcSysctl, Sysctl};

const NAME: &str = "iptables";

/// Default time limit for one iptables command of the backend (a full restore of a very large ruleset).
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// How to build an [`IptablesBackend`].
pub struct IptablesOptions {
    /// Families to program (both by default); a family whose tools are missing is dropped with a warning.
    pub families: Vec<IpFamily>,
    /// `masqueradeAll`.
    pub masquerade_all: bool,
    /// `masqueradeBit` (default 14 → mark `0x4000`).
    pub masquerade_bit: u32,
    /// `detectLocalMode` and its parameters.
    pub local_detector: LocalDetectorConfig,
    /// `nodePortAddresses`.
    pub node_port_addresses: NodePortAddresses,
    /// `iptables.localhostNodePorts` (default true); only IPv4, and only when `nodePortAddresses` includes 127/8.
    pub localhost_nodeports: bool,
    /// Metrics to record restore failures, rule counts and conntrack reconciliation into.
    pub metrics: Option<Arc<Metrics>>,
    /// This node's name (for logs).
    pub hostname: String,
    /// Command runner for every iptables/ip/sysctl command (`ip netns exec NS` prefix in tests); its timeout
    /// bounds each command ([`DEFAULT_RESTORE_TIMEOUT`] by default).
    pub exec: Exec,
    /// iptables binaries to use.
    pub variant: Variant,
    /// Sysctl access; default: `/proc/sys` without an exec prefix, the `sysctl` tool through it otherwise.
    pub sysctl: Option<Arc<dyn Sysctl>>,
    /// Conntrack table access; default: ctnetlink in this process's network namespace.
    pub conntrack: Option<Box<dyn ConntrackTable>>,
    /// How often partial syncs check that the canary chains still exist (upstream checks every `syncPeriod`);
    /// zero checks on every sync.
    pub canary_check_interval: Duration,
    /// Fallback primary node IPs (the Node object's addresses are preferred) for `loadBalancerSourceRanges` that
    /// contain the node.
    pub node_ips: Vec<IpAddr>,
}

impl IptablesOptions {
    /// Upstream defaults for node `hostname`: both families, bit 14, no masquerade-all, no local detection,
    /// NodePorts on all addresses, localhost NodePorts on, host commands, canary checked on every sync.
    pub fn new(hostname: impl Into<String>) -> Self {
        IptablesOptions {
            families: IpFamily::ALL.to_vec(),
            masquerade_all: false,
            masquerade_bit: 14,
            local_detector: LocalDetectorConfig::None,
            node_port_addresses: NodePortAddresses::default(),
            localhost_nodeports: true,
            metrics: None,
            hostname: hostname.into(),
            // Upstream never times restores out; iptables-nft needs minutes for very large rulesets.
            exec: Exec::new().with_timeout(DEFAULT_RESTORE_TIMEOUT),
            variant: Variant::Default,
            sysctl: None,
            conntrack: None,
            canary_check_interval: Duration::ZERO,
            node_ips: Vec::new(),
        }
    }
}

impl std::fmt::Debug for IptablesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IptablesBackend").field("families", &self.families).field("states", &self.states).finish()
    }
}

/// Per-family bookkeeping between syncs.
#[derive(Debug)]
struct FamilyState {
    ipt: Iptables,
    /// The next sync must be full (start, after a failure, after a flush).
    need_full: bool,
    /// Per-service nat chains programmed by the last successful sync.
    known_nat_chains: HashSet<String>,
    last_canary_check: Option<Instant>,
    /// The detector the programmed rules were written with.
    last_detector: Option<LocalDetector>,
}

/// What one family's sync did.
#[derive(Debug, Default)]
struct FamilyOutcome {
    full: bool,
    services_written: usize,
    filter_rules: usize,
    nat_rules: usize,
    chains_deleted: usize,
}

/// kube-proxy's iptables mode for one or both IP families.
pub struct IptablesBackend {
    families: Vec<IpFamily>,
    states: BTreeMap<IpFamily, FamilyState>,
    masquerade_all: bool,
    masquerade_mark: String,
    local_detector: LocalDetectorConfig,
    node_port_addresses: NodePortAddresses,
    localhost_nodeports: bool,
    conntrack_tcp_liberal: bool,
    random_fully: bool,
    metrics: Option<Arc<Metrics>>,
    exec: Exec,
    conntrack: Box<dyn ConntrackTable>,
    canary_check_interval: Duration,
    node_ips: Vec<IpAddr>,
}

impl IptablesBackend {
    /// Checks the tools, sets `route_localnet` when IPv4 localhost NodePorts are in use (as upstream does) and
    /// reads `nf_conntrack_tcp_be_liberal`. Nothing is programmed until the first (full) sync.
    pub fn new(opts: IptablesOptions) -> Result<Self, BackendError> {
        let base = Iptables::new(IpFamily::V4).with_exec(opts.exec.clone()).with_variant(opts.variant);
        let mut states = BTreeMap::new();
        for &family in &opts.families {
            let ipt = base.for_family(family);
            if !ipt.is_available() {
                warn!(family = %family, program = %ipt.restore_program(), "iptables tools missing; not programming this family");
                continue;
            }
            // Upstream's `Present()`: the kernel must have this family's nat table (IPv6 may be disabled).
            match ipt.chain_exists(Table::Nat, "POSTROUTING") {
                Ok(true) => {}
                Ok(false) => {
                    warn!(family = %family, "No iptables support for this IP family (no nat POSTROUTING); not programming it");
                    continue;
                }
                Err(e) => {
                    warn!(family = %family, error = %e, "No iptables support for this IP family; not programming it");
                    continue;
                }
            }
            states.insert(
                family,
                FamilyState {
                    ipt,
                    need_full: true,
                    known_nat_chains: HashSet::new(),
                    last_canary_check: None,
                    last_detector: None,
                },
            );
        }
        if states.is_empty() {
            return Err(BackendError::msg(
                NAME,
                format!(
                    "no usable iptables for families {:?} ({} not installed?)",
                    opts.families,
                    base.restore_program()
                ),
            ));
        }
        let families: Vec<IpFamily> = states.keys().copied().collect();
        let sysctl: Arc<dyn Sysctl> = match opts.sysctl {
            Some(s) => s,
            None if opts.exec.prefix().is_empty() => Arc::new(ProcSysctl::default()),
            None => Arc::new(ExecSysctl::new(opts.exec.clone())),
        };

        // localhost NodePorts only make sense when nodePortAddresses lets NodePorts be served on 127/8.
        let localhost_nodeports = opts.localhost_nodeports && opts.node_port_addresses.contains_ipv4_loopback();
        if localhost_nodeports && families.contains(&IpFamily::V4) {
            info!(
                "Setting route_localnet=1 to allow node-ports on localhost; to change this either disable \
                 iptables.localhostNodePorts (--iptables-localhost-nodeports) or set nodePortAddresses \
                 (--nodeport-addresses) to filter loopback addresses"
            );
            sysctl::ensure(sysctl.as_ref(), sysctl::ROUTE_LOCALNET, "1")
                .map_err(|e| BackendError::with_source(NAME, "enabling localhost NodePorts", e))?;
        }
        let conntrack_tcp_liberal =
            sysctl.get(sysctl::CONNTRACK_TCP_BE_LIBERAL).ok().is_some_and(|v| v.parse::<i64>().is_ok_and(|n| n != 0));
        if conntrack_tcp_liberal {
            info!("nf_conntrack_tcp_be_liberal set, not installing DROP rules for INVALID packets");
        }
        // --random-fully needs iptables >= 1.6.2.
        let random_fully = base.version().is_some_and(|v| v >= (1, 6, 2));
        info!(node = %opts.hostname, ?families, masquerade_all = opts.masquerade_all, random_fully, "Using iptables Proxier");

        Ok(IptablesBackend {
            families,
            states,
            masquerade_all: opts.masquerade_all,
            masquerade_mark: rules::masquerade_mark(opts.masquerade_bit),
            local_detector: opts.local_detector,
            node_port_addresses: opts.node_port_addresses,
            localhost_nodeports,
            conntrack_tcp_liberal,
            random_fully,
            metrics: opts.metrics,
            exec: opts.exec,
            conntrack: opts.conntrack.unwrap_or_else(|| Box::new(NetlinkConntrack::new())),
            canary_check_interval: opts.canary_check_interval,
            node_ips: opts.node_ips,
        })
    }

    /// Whether every canary chain of `family` is still there (mangle first, as upstream's monitor looks there).
    fn canaries_present(ipt: &Iptables) -> Result<bool, crate::runner::Error> {
        for table in [Table::Mangle, Table::Nat, Table::Filter] {
            if !ipt.chain_exists(table, CANARY)? {
                info!(family = %ipt.family(), table = %table, chain = CANARY, "IPTables canary deleted");
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn rule_config(&self, family: IpFamily, detector: LocalDetector, snapshot: &Snapshot) -> RuleConfig {
        let node_ip =
            snapshot.node.addresses.iter().chain(&self.node_ips).find(|ip| IpFamily::of(ip) == family).copied();
        let node_ports = if self.node_port_addresses.match_all(family) {
            NodePortDestinations::All
        } else {
            let locals = local_addresses(&self.exec);
            NodePortDestinations::Ips(self.node_port_addresses.node_ips(family, &locals, &snapshot.node))
        };
        RuleConfig {
            family,
            masquerade_mark: self.masquerade_mark.clone(),
            masquerade_all: self.masquerade_all,
            local_detector: detector,
            node_ports,
            localhost_nodeports: self.localhost_nodeports,
            conntrack_tcp_liberal: self.conntrack_tcp_liberal,
            random_fully: self.random_fully,
            nfacct_ct_invalid: false,
            nfacct_localhost_nodeports: false,
            node_ip,
        }
    }

    fn sync_family(
        &mut self,
        family: IpFamily,
        snapshot: &Snapshot,
        changes: &Changes,
    ) -> Result<FamilyOutcome, BackendError> {
        let start = Instant::now();
        let detector = self.local_detector.resolve(family, &snapshot.node);
        let cfg = self.rule_config(family, detector.clone(), snapshot);
        let canary_interval = self.canary_check_interval;
        let st = self.states.get_mut(&family).expect("family state");

        let mut full = changes.full || st.need_full || st.last_detector.as_ref() != Some(&detector);
        if !full && st.last_canary_check.is_none_or(|t| t.elapsed() >= canary_interval) {
            st.last_canary_check = Some(Instant::now());
            match Self::canaries_present(&st.ipt) {
                Ok(true) => {}
                Ok(false) => {
                    info!(family = %family, "Reloading after iptables flush");
                    full = true;
                }
                Err(e) => warn!(family = %family, error = %e, "Could not check for iptables canary"),
            }
        }
        debug!(family = %family, full_sync = full, "Syncing iptables rules");

        let (existing, extras) = if full {
            // Saved once per full sync: stale chains from before our start, jump rules and canaries to repair.
            let saved = st.ipt.save_parsed().map_err(|e| {
                st.need_full = true;
                BackendError::with_source(NAME, format!("{family}: reading the current rules for a full sync"), e)
            })?;
            (existing_nat_chains(&saved), Some(extras_for(&saved)))
        } else {
            (st.known_nat_chains.clone(), None)
        };
        let changed: HashSet<NamespacedName> =
            changes.family(family).services.iter().map(|n| n.service().clone()).collect();
        let fs = snapshot.family(family);
        let generated = rules::generate(
            &cfg,
            &SyncInput {
                services: &fs.services,
                changed: (!full).then_some(&changed),
                existing_nat_chains: Some(&existing),
                extras: extras.as_ref(),
            },
        );
        debug!(
            family = %family,
            num_services = fs.services.len(),
            num_endpoints = generated.total_endpoints,
            num_filter_rules = generated.filter_rules,
            num_nat_rules = generated.nat_rules,
            "Reloading service iptables data"
        );
        tracing::trace!(family = %family, rules = %generated.text, "Restoring iptables");

        if let Err(e) = st.ipt.restore(&generated.text, RestoreFlags::NOFLUSH_COUNTERS) {
            error!(family = %family, error = %e, "Failed to execute iptables-restore");
            if let Some(m) = &self.metrics {
                m.inc_iptables_restore_failure(family);
                if !full {
                    m.inc_iptables_partial_restore_failure(family);
                }
            }
            // The changes since the last good sync are no longer known in detail: start over.
            st.need_full = true;
            return Err(BackendError::with_source(NAME, format!("{family}: iptables-restore"), e));
        }
        st.need_full = false;
        st.known_nat_chains = generated.active_nat_chains.clone();
        st.last_detector = Some(detector);
        if full {
            // The full sync recreated any missing canary.
            st.last_canary_check = Some(Instant::now());
        }
        if let Some(m) = &self.metrics {
            m.set_iptables_rules_total(IptablesTable::Filter, family, generated.filter_rules);
            m.set_iptables_rules_last(IptablesTable::Filter, family, generated.filter_rules);
            m.set_iptables_rules_total(IptablesTable::Nat, family, generated.nat_rules_total());
            m.set_iptables_rules_last(IptablesTable::Nat, family, generated.nat_rules_last());
        }
        if !generated.deleted_chains.is_empty() {
            debug!(family = %family, chains = ?generated.deleted_chains, "Deleted stale service chains");
        }
        info!(family = %family, full_sync = full, elapsed = ?start.elapsed(), "SyncProxyRules complete");

        if changes.family(family).conntrack_cleanup_required {
            // Failures are logged, not fatal: the rules are in place and the next cleanup retries.
            if let Err(e) =
                crate::conntrack::reconcile(self.conntrack.as_mut(), family, &fs.services, self.metrics.as_deref())
            {
                error!(family = %family, error = %e, "Failed to clear stale conntrack entries");
            }
        }
        Ok(FamilyOutcome {
            full,
            services_written: generated.services_written,
            filter_rules: generated.filter_rules,
            nat_rules: generated.nat_rules_total(),
            chains_deleted: generated.deleted_chains.len(),
        })
    }
}

/// Every chain of the nat table.
fn existing_nat_chains(saved: &Ruleset) -> HashSet<String> {
    saved.table("nat").map(|t| t.chains.iter().map(|c| c.name.clone()).collect()).unwrap_or_default()
}

/// What a full sync must add besides the rules: canaries, jump rules and kubelet's chain where missing.
pub fn extras_for(saved: &Ruleset) -> Extras {
    let missing_canaries = ["mangle", "nat", "filter"]
        .into_iter()
        .filter(|t| !saved.table(t).is_some_and(|d| d.has_chain(CANARY)))
        .collect();
    let missing_jumps = JUMP_CHAINS
        .iter()
        .filter(|j| {
            let present = saved.table(j.table).and_then(|t| t.chain(j.src)).is_some_and(|c| {
                c.rules.iter().any(|r| {
                    // Compare by target and comment: iptables-save may reorder or respell the other matches.
                    r.target() == Some(j.dst) && (j.comment.is_empty() || r.args.iter().any(|a| a == j.comment))
                })
            });
            !present
        })
        .copied()
        .collect();
    let create_kubelet_firewall = !saved.table("filter").is_some_and(|t| t.has_chain(KUBELET_FIREWALL));
    Extras { missing_canaries, missing_jumps, create_kubelet_firewall }
}

/// The node's interface addresses (`ip -o addr show`, through the exec prefix); empty if it cannot be run.
fn local_addresses(exec: &Exec) -> Vec<IpAddr> {
    match exec.run_ok("ip", &["-o", "addr", "show"], None) {
        Ok(out) => parse_ip_addr_output(&out),
        Err(e) => {
            error!(error = %e, "Failed to get node ip address matching nodeport cidrs, services with nodeport may not work as intended");
            Vec::new()
        }
    }
}

fn parse_ip_addr_output(out: &str) -> Vec<IpAddr> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

impl Backend for IptablesBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self) -> &[IpFamily] {
        &self.families
    }

    fn sync(&mut self, snapshot: &Snapshot, changes: &Changes) -> Result<SyncReport, BackendError> {
        let mut report = SyncReport::default();
        let mut errors = Vec::new();
        let (mut filter, mut nat, mut deleted) = (0u64, 0u64, 0u64);
        for family in self.families.clone() {
            match self.sync_family(family, snapshot, changes) {
                Ok(o) => {
                    report.full |= o.full;
                    report.service_ports_programmed += o.services_written;
                    filter += o.filter_rules as u64;
                    nat += o.nat_rules as u64;
                    deleted += o.chains_deleted as u64;
                }
                Err(e) => errors.push(e),
            }
        }
        report.details = vec![("filter_rules", filter), ("nat_rules", nat), ("nat_chains_deleted", deleted)];
        match errors.len() {
            0 => Ok(report),
            1 => Err(errors.remove(0)),
            _ => Err(BackendError::msg(
                NAME,
                errors.iter().map(|e| format!("{e}: {}", source_text(e))).collect::<Vec<_>>().join("; "),
            )),
        }
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let mut failures = Vec::new();
        for st in self.states.values_mut() {
            st.need_full = true;
            st.known_nat_chains.clear();
            if let Err(e) = crate::cleanup::cleanup_iptables_family(&st.ipt, None) {
                failures.push(format!("{}: {e}", st.ipt.family()));
            }
        }
        if failures.is_empty() { Ok(()) } else { Err(BackendError::msg(NAME, failures.join("; "))) }
    }
}

fn source_text(e: &BackendError) -> String {
    std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_addr_output() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                   1: lo    inet6 ::1/128 scope host noprefixroute \\       valid_lft forever\n\
                   2: eth0    inet 198.18.0.2/24 brd 198.18.0.255 scope global eth0\n\
                   2: eth0    link/ether 00:11:22:33:44:55\n";
        let ips = parse_ip_addr_output(out);
        let want: Vec<IpAddr> = ["127.0.0.1", "::1", "198.18.0.2"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(ips, want);
    }

    #[test]
    fn extras_from_a_saved_ruleset() {
        let saved = Ruleset::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
             :KUBE-PROXY-CANARY - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n",
        )
        .unwrap();
        let extras = extras_for(&saved);
        assert_eq!(extras.missing_canaries, vec!["mangle", "filter"]);
        assert!(extras.create_kubelet_firewall);
        let missing: Vec<_> = extras.missing_jumps.iter().map(|j| (j.table, j.src, j.dst)).collect();
        assert!(!missing.contains(&("nat", "PREROUTING", "KUBE-SERVICES")));
        assert!(missing.contains(&("nat", "OUTPUT", "KUBE-SERVICES")));
        assert_eq!(missing.len(), JUMP_CHAINS.len() - 1);
    }
}
