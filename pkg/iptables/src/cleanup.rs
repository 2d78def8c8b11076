//! `--cleanup` and mode switching: removing kube-proxy's iptables, ipvs and nftables leftovers.
//!
//! Mirrors upstream's `CleanupLeftovers` of the iptables, ipvs and nftables proxiers and `platformCleanup`:
//!
//! * iptables (both families): the jump rules kube-proxy put in built-in chains are deleted, then every
//!   kube-proxy-owned chain is flushed and deleted — all in ONE `iptables-restore --noflush` process per family.
//!   Kubelet's chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP`) and anyone else's are never touched.
//! * nftables: tables `ip kube-proxy` and `ip6 kube-proxy`, in one `nft -f -` transaction.
//! * ipvs: the `kube-ipvs0` dummy link, IPVS virtual servers (only where the kernel has IPVS and `ipvsadm` is
//!   installed; otherwise reported as skipped) and the ipsets kube-proxy's ipvs mode creates.
//!
//! Everything is best-effort like upstream: a failing step is recorded and the others still run. A second call
//! finds nothing left and removes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use proxier::model::IpFamily;
use tracing::{debug, info, warn};

use crate::runner::{Error, Exec, Iptables, RestoreFailure, RestoreFlags, Table};
use crate::save::{Rule, Ruleset, TableDump};

/// The proxy modes whose leftovers cleanup knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    /// `iptables` mode.
    Iptables,
    /// `ipvs` mode.
    Ipvs,
    /// `nftables` mode.
    Nftables,
    /// Our `ebpf` mode, which owns no iptables, ipvs or nftables state.
    Ebpf,
}

impl ProxyMode {
    /// The `--proxy-mode` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ebpf => "ebpf",
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Chains iptables mode owns (upstream `iptablesJumpChains` destinations plus the nat helpers and the canary).
pub const IPTABLES_MODE_CHAINS: &[(Table, &str)] = &[
    (Table::Nat, "KUBE-SERVICES"),
    (Table::Nat, "KUBE-NODEPORTS"),
    (Table::Nat, "KUBE-POSTROUTING"),
    (Table::Nat, "KUBE-MARK-MASQ"),
    (Table::Nat, "KUBE-PROXY-CANARY"),
    (Table::Filter, "KUBE-SERVICES"),
    (Table::Filter, "KUBE-EXTERNAL-SERVICES"),
    (Table::Filter, "KUBE-FORWARD"),
    (Table::Filter, "KUBE-NODEPORTS"),
    (Table::Filter, "KUBE-PROXY-FIREWALL"),
    (Table::Filter, "KUBE-PROXY-CANARY"),
    (Table::Mangle, "KUBE-PROXY-CANARY"),
];

/// Chains ipvs mode owns (upstream ipvs `iptablesCleanupChains`). Several are shared with iptables mode.
pub const IPVS_MODE_CHAINS: &[(Table, &str)] = &[
    (Table::Nat, "KUBE-SERVICES"),
    (Table::Nat, "KUBE-POSTROUTING"),
    (Table::Nat, "KUBE-NODE-PORT"),
    (Table::Nat, "KUBE-LOAD-BALANCER"),
    (Table::Nat, "KUBE-MARK-MASQ"),
    (Table::Filter, "KUBE-FORWARD"),
    (Table::Filter, "KUBE-NODE-PORT"),
    (Table::Filter, "KUBE-PROXY-FIREWALL"),
    (Table::Filter, "KUBE-SOURCE-RANGES-FIREWALL"),
    (Table::Filter, "KUBE-IPVS-FILTER"),
    (Table::Filter, "KUBE-IPVS-OUT-FILTER"),
];

/// Prefixes of iptables mode's per-service nat chains (upstream `isServiceChainName`), plus `KUBE-XLB-`, the
/// pre-1.24 name of `KUBE-SVL-`, so leftovers of old versions go too.
pub const SERVICE_CHAIN_PREFIXES: &[&str] =
    &["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-"];

/// Chains kubelet owns; cleanup never deletes them even though they start with `KUBE-`.
pub const KUBELET_CHAINS: &[&str] = &["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP"];

/// The dummy link ipvs mode binds service addresses to.
pub const IPVS_DUMMY_DEVICE: &str = "kube-ipvs0";

/// The nftables table nftables mode owns, in families `ip` and `ip6`.
pub const NFTABLES_TABLE: &str = "kube-proxy";

/// The ipsets ipvs mode creates (IPv4 names; the IPv6 ones are `KUBE-6-` + the rest, see [`ipvs_ipset_names`]).
/// Only these are destroyed: other software (e.g. kube-router) also names its sets `KUBE-...`.
pub const IPVS_IPSETS: &[&str] = &[
    "KUBE-LOOP-BACK",
    "KUBE-CLUSTER-IP",
    "KUBE-EXTERNAL-IP",
    "KUBE-EXTERNAL-IP-LOCAL",
    "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-FW",
    "KUBE-LOAD-BALANCER-LOCAL",
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "KUBE-NODE-PORT-TCP",
    "KUBE-NODE-PORT-LOCAL-TCP",
    "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP",
    "KUBE-NODE-PORT-SCTP-HASH",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT",
    "KUBE-IPVS-IPS",
];

/// Every ipset name ipvs mode may have created, IPv4 then IPv6.
pub fn ipvs_ipset_names() -> impl Iterator<Item = String> {
    // Upstream's IPv6 names are cut to ipset's 31-character limit (`KUBE-6-LOAD-BALANCER-SOURCE-CID`).
    let v6 = IPVS_IPSETS.iter().map(|n| {
        let mut v6 = format!("KUBE-6-{}", n.trim_start_matches("KUBE-"));
        v6.truncate(31);
        v6
    });
    IPVS_IPSETS.iter().map(|n| n.to_string()).chain(v6)
}

/// A chain in a table, printed `table/CHAIN`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChainRef {
    /// The table.
    pub table: String,
    /// The chain.
    pub chain: String,
}

impl fmt::Display for ChainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.table, self.chain)
    }
}

/// A rule that was deleted, printed `table: -A CHAIN spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// The table.
    pub table: String,
    /// The chain the rule was in.
    pub chain: String,
    /// The rule as iptables-save printed it, after `-A CHAIN`.
    pub spec: String,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: -A {} {}", self.table, self.chain, self.spec)
    }
}

/// Something cleanup found but deliberately left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// What was kept (`nat/KUBE-MARK-MASQ`, an ipset name, a link name).
    pub item: String,
    /// Why.
    pub reason: String,
}

/// What iptables cleanup did for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyReport {
    /// The family.
    pub family: IpFamily,
    /// Jump rules deleted from chains that stay (built-in chains, or kube-proxy chains the running mode keeps).
    pub rules_removed: Vec<RuleRef>,
    /// Chains flushed and deleted.
    pub chains_removed: Vec<ChainRef>,
    /// kube-proxy chains left in place because a chain that stays still jumps to them.
    pub chains_kept: Vec<Kept>,
}

impl FamilyReport {
    fn new(family: IpFamily) -> Self {
        FamilyReport { family, rules_removed: Vec::new(), chains_removed: Vec::new(), chains_kept: Vec::new() }
    }

    /// Whether nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.rules_removed.is_empty() && self.chains_removed.is_empty()
    }
}

/// What a cleanup removed, kept and skipped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CleanupReport {
    /// Per-family iptables results (families whose tools are missing are absent and listed in `skipped`).
    pub iptables: Vec<FamilyReport>,
    /// nftables tables deleted, as `family table` (`ip kube-proxy`).
    pub nftables_tables_deleted: Vec<String>,
    /// IPVS virtual servers flushed.
    pub ipvs_virtual_servers_flushed: usize,
    /// Links deleted (`kube-ipvs0`).
    pub links_deleted: Vec<String>,
    /// ipsets destroyed.
    pub ipsets_destroyed: Vec<String>,
    /// Things found but left alone (ipsets still referenced, a non-dummy `kube-ipvs0`, ...).
    pub kept: Vec<Kept>,
    /// Steps that could not run here and why (tool not installed, IPVS not in the kernel, ...). Not errors.
    pub skipped: Vec<String>,
}

impl CleanupReport {
    /// Whether nothing at all was removed (what a repeated cleanup reports).
    pub fn is_empty(&self) -> bool {
        self.iptables.iter().all(FamilyReport::is_empty)
            && self.nftables_tables_deleted.is_empty()
            && self.ipvs_virtual_servers_flushed == 0
            && self.links_deleted.is_empty()
            && self.ipsets_destroyed.is_empty()
    }

    /// The report for `family`, if its iptables was cleaned.
    pub fn family(&self, family: IpFamily) -> Option<&FamilyReport> {
        self.iptables.iter().find(|f| f.family == family)
    }
}

/// Cleanup ran but at least one step failed; `report` says what the other steps did.
#[derive(Debug, thiserror::Error)]
#[error("cleanup failed ({} error(s)): {}", errors.len(), errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct CleanupError {
    /// What the steps that worked did.
    pub report: Box<CleanupReport>,
    /// Every failure, in the order they happened.
    pub errors: Vec<Error>,
}

/// What one cleanup run removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// iptables chains the running mode owns and so keeps (None: keep none).
    keep_chains_of: Option<ProxyMode>,
    nftables: bool,
    ipvs_state: bool,
}

impl Plan {
    fn for_mode(mode: Option<ProxyMode>) -> Plan {
        match mode {
            // `--cleanup`, and modes that own no iptables chains: remove everything else.
            None | Some(ProxyMode::Ebpf) => Plan { keep_chains_of: None, nftables: true, ipvs_state: true },
            Some(ProxyMode::Nftables) => Plan { keep_chains_of: None, nftables: false, ipvs_state: true },
            Some(ProxyMode::Iptables) => {
                Plan { keep_chains_of: Some(ProxyMode::Iptables), nftables: true, ipvs_state: true }
            }
            Some(ProxyMode::Ipvs) => Plan { keep_chains_of: Some(ProxyMode::Ipvs), nftables: true, ipvs_state: false },
        }
    }
}

/// `--cleanup`: removes every iptables (both families), ipvs and nftables leftover of upstream kube-proxy and of
/// ours. `ipt`'s command prefix and binary variant are used for both families and for `nft`, `ip` and `ipset`.
pub fn cleanup_leftovers(ipt: &Iptables) -> Result<CleanupReport, CleanupError> {
    run(ipt, None)
}

/// Start-up cleanup when running in `mode` (upstream `platformCleanup`): removes the other modes' leftovers and
/// keeps the state `mode` itself owns. `Ebpf` removes all iptables, ipvs and nftables kube-proxy state; `Iptables`
/// removes nftables and ipvs state (ipvs-only chains, `kube-ipvs0`, unreferenced ipsets) but keeps the chains it
/// shares with ipvs mode, which its first full sync rewrites.
pub fn cleanup_for_mode(ipt: &Iptables, mode: ProxyMode) -> Result<CleanupReport, CleanupError> {
    run(ipt, Some(mode))
}

fn run(ipt: &Iptables, mode: Option<ProxyMode>) -> Result<CleanupReport, CleanupError> {
    let plan = Plan::for_mode(mode);
    info!(mode = mode.map_or("cleanup", ProxyMode::as_str), ?plan, "removing kube-proxy leftovers");
    let mut report = CleanupReport::default();
    let mut errors = Vec::new();
    let exec = ipt.exec();

    // iptables first: chains can reference ipsets, which can only be destroyed once unreferenced.
    let mut referenced_sets = BTreeSet::new();
    let mut iptables_failed = false;
    for family in IpFamily::ALL {
        let fam = ipt.for_family(family);
        if !fam.is_available() {
            report.skipped.push(format!("{} cleanup: {} is not installed", family.as_str(), fam.restore_program()));
            continue;
        }
        match cleanup_iptables_family(&fam, plan.keep_chains_of) {
            Ok((fr, sets)) => {
                referenced_sets.extend(sets);
                report.iptables.push(fr);
            }
            Err(e) => {
                warn!(family = family.as_str(), error = %e, "iptables cleanup failed");
                errors.push(e);
                iptables_failed = true;
            }
        }
    }
    if plan.nftables {
        step(&mut errors, cleanup_nftables(exec, &mut report));
    }
    if plan.ipvs_state {
        step(&mut errors, cleanup_ipvs_servers(exec, &mut report));
        step(&mut errors, cleanup_dummy_link(exec, &mut report));
        if iptables_failed {
            // Which sets remaining rules use is unknown, and a used set cannot be destroyed anyway.
            report.skipped.push("ipset cleanup: iptables cleanup failed, so ipsets may still be in use".into());
        } else {
            step(&mut errors, cleanup_ipsets(exec, &referenced_sets, &mut report));
        }
    }
    info!(removed_anything = !report.is_empty(), errors = errors.len(), "kube-proxy leftover cleanup done");
    if errors.is_empty() { Ok(report) } else { Err(CleanupError { report: Box::new(report), errors }) }
}

fn step(errors: &mut Vec<Error>, result: Result<(), Error>) {
    if let Err(e) = result {
        warn!(error = %e, "cleanup step failed");
        errors.push(e);
    }
}

/// Whether `chain` in `table` belongs to kube-proxy in `mode`'s (or, with `None`, any mode's) rule layout.
pub fn is_kube_proxy_chain(table: &str, chain: &str, mode: Option<ProxyMode>) -> bool {
    if KUBELET_CHAINS.contains(&chain) {
        return false;
    }
    let listed = |list: &[(Table, &str)]| list.iter().any(|(t, c)| t.as_str() == table && *c == chain);
    let iptables = listed(IPTABLES_MODE_CHAINS)
        || (table == Table::Nat.as_str() && SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)));
    let ipvs = listed(IPVS_MODE_CHAINS);
    match mode {
        None => iptables || ipvs,
        Some(ProxyMode::Iptables) => iptables,
        Some(ProxyMode::Ipvs) => ipvs,
        Some(ProxyMode::Nftables | ProxyMode::Ebpf) => false,
    }
}

/// The restore input that removes one table's kube-proxy chains, and what it removes.
#[derive(Debug, Default)]
struct TablePlan {
    delete: BTreeSet<String>,
    rules: Vec<RuleRef>,
    kept: Vec<Kept>,
}

fn plan_table(table: &TableDump, keep_chains_of: Option<ProxyMode>) -> TablePlan {
    let owned = |c: &str| is_kube_proxy_chain(&table.name, c, None);
    let retained = |c: &str| keep_chains_of.is_some_and(|m| is_kube_proxy_chain(&table.name, c, Some(m)));
    let mut delete: BTreeSet<String> = table
        .chains
        .iter()
        .filter(|c| !c.is_builtin() && owned(&c.name) && !retained(&c.name))
        .map(|c| c.name.clone())
        .collect();

    // A chain someone else's chain still jumps to cannot be deleted (iptables refuses, failing the whole
    // transaction), and removing that rule would change their firewall: keep it, and transitively what it uses.
    let mut kept: BTreeMap<String, String> = BTreeMap::new();
    let mut work: Vec<(String, String)> = Vec::new();
    for chain in table.chains.iter().filter(|c| !c.is_builtin() && !owned(&c.name)) {
        for rule in &chain.rules {
            if let Some(t) = rule.target().filter(|t| delete.contains(*t)) {
                work.push((t.to_string(), format!("chain {} (not kube-proxy's) jumps to it", chain.name)));
            }
        }
    }
    // Bounded: each chain moves from `delete` to `kept` at most once.
    while let Some((name, reason)) = work.pop() {
        if !delete.remove(&name) {
            continue;
        }
        if let Some(chain) = table.chain(&name) {
            for t in chain.rules.iter().filter_map(Rule::target).filter(|t| delete.contains(*t)) {
                work.push((t.to_string(), format!("kept chain {name} jumps to it")));
            }
        }
        kept.insert(name, reason);
    }

    // Jumps into deleted chains from chains that stay: built-in chains, and kube-proxy chains the running mode
    // keeps (it rewrites those on its first full sync anyway).
    let rules = table
        .chains
        .iter()
        .filter(|c| !delete.contains(&c.name) && (c.is_builtin() || owned(&c.name)))
        .flat_map(|c| c.rules.iter())
        .filter(|r| r.target().is_some_and(|t| delete.contains(t)))
        .map(|r| RuleRef { table: table.name.clone(), chain: r.chain.clone(), spec: r.spec.clone() })
        .collect();
    let kept = kept.into_iter().map(|(c, reason)| Kept { item: format!("{}/{c}", table.name), reason }).collect();
    TablePlan { delete, rules, kept }
}

/// Removes one family's kube-proxy chains (keeping those `keep_chains_of` owns) in one `iptables-restore
/// --noflush` process. Returns the report and the ipsets that rules left in place still match on.
pub fn cleanup_iptables_family(
    ipt: &Iptables,
    keep_chains_of: Option<ProxyMode>,
) -> Result<(FamilyReport, BTreeSet<String>), Error> {
    let family = ipt.family();
    // save_all, not `-t nat` etc.: with nf_tables, saving one table creates it when missing.
    let ruleset = Ruleset::parse(&ipt.save_all()?)?;
    let mut report = FamilyReport::new(family);
    let mut input = String::new();
    let mut referenced_sets = BTreeSet::new();
    for table in &ruleset.tables {
        let plan = plan_table(table, keep_chains_of);
        for chain in table.chains.iter().filter(|c| !plan.delete.contains(&c.name)) {
            for rule in &chain.rules {
                let deleted = plan.rules.iter().any(|r| r.chain == rule.chain && r.spec == rule.spec);
                if !deleted {
                    referenced_sets.extend(match_sets(rule));
                }
            }
        }
        for k in &plan.kept {
            warn!(family = family.as_str(), chain = %k.item, reason = %k.reason, "keeping kube-proxy chain");
        }
        report.chains_kept.extend(plan.kept);
        if plan.delete.is_empty() && plan.rules.is_empty() {
            continue;
        }
        input.push_str(&format!("*{}\n", table.name));
        // A chain line in a --noflush restore flushes the chain, which also drops its jumps to other chains.
        for chain in &plan.delete {
            input.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in &plan.rules {
            input.push_str(&format!("-D {} {}\n", rule.chain, rule.spec));
        }
        for chain in &plan.delete {
            input.push_str(&format!("-X {chain}\n"));
        }
        input.push_str("COMMIT\n");
        report.rules_removed.extend(plan.rules);
        report
            .chains_removed
            .extend(plan.delete.into_iter().map(|chain| ChainRef { table: table.name.clone(), chain }));
    }
    if input.is_empty() {
        debug!(family = family.as_str(), "no kube-proxy iptables leftovers");
        return Ok((report, referenced_sets));
    }
    ipt.restore(&input, RestoreFlags::NOFLUSH_COUNTERS)?;
    info!(
        family = family.as_str(),
        rules = report.rules_removed.len(),
        chains = report.chains_removed.len(),
        "removed kube-proxy iptables leftovers"
    );
    Ok((report, referenced_sets))
}

/// The ipsets a rule matches on (`-m set --match-set NAME dst`).
fn match_sets(rule: &Rule) -> impl Iterator<Item = String> + '_ {
    rule.args.windows(2).filter(|w| w[0] == "--match-set").map(|w| w[1].clone())
}

/// Deletes `ip kube-proxy` and `ip6 kube-proxy` in one nft transaction.
fn cleanup_nftables(exec: &Exec, report: &mut CleanupReport) -> Result<(), Error> {
    if !exec.has_tool("nft") {
        report.skipped.push("nftables cleanup: nft is not installed".into());
        return Ok(());
    }
    let listing = exec.run_ok("nft", &["list", "tables"], None)?;
    let present: Vec<String> = listing
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("table"), Some(fam @ ("ip" | "ip6")), Some(NFTABLES_TABLE), None) => {
                    Some(format!("{fam} {NFTABLES_TABLE}"))
                }
                _ => None,
            }
        })
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let script: String = present.iter().map(|t| format!("delete table {t}\n")).collect();
    exec.run_ok("nft", &["-f", "-"], Some(&script))?;
    info!(tables = ?present, "deleted kube-proxy nftables tables");
    report.nftables_tables_deleted.extend(present);
    Ok(())
}

/// Flushes IPVS virtual servers like upstream's ipvs cleanup (`ipvs.Flush()`), if the kernel has IPVS at all.
fn cleanup_ipvs_servers(exec: &Exec, report: &mut CleanupReport) -> Result<(), Error> {
    // /proc/net/ip_vs exists (per network namespace) exactly when the ip_vs module is loaded.
    let table = match exec.run("cat", &["/proc/net/ip_vs"], None) {
        Ok(out) if out.status.success() => out.stdout,
        Ok(_) => {
            report.skipped.push("IPVS virtual servers: IPVS is not available in this kernel".into());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let servers = table.lines().filter(|l| ["TCP", "UDP", "SCTP", "FWM"].iter().any(|p| l.starts_with(p))).count();
    if servers == 0 {
        return Ok(());
    }
    if !exec.has_tool("ipvsadm") {
        report
            .skipped
            .push(format!("IPVS virtual servers: {servers} present but ipvsadm is not installed to flush them"));
        return Ok(());
    }
    exec.run_ok("ipvsadm", &["--clear"], None)?;
    info!(servers, "flushed IPVS virtual servers");
    report.ipvs_virtual_servers_flushed = servers;
    Ok(())
}

/// Deletes the `kube-ipvs0` link, but only if it is a dummy link (as upstream's `DeleteDummyDevice` insists).
fn cleanup_dummy_link(exec: &Exec, report: &mut CleanupReport) -> Result<(), Error> {
    if !exec.has_tool("ip") {
        report.skipped.push(format!("{IPVS_DUMMY_DEVICE} cleanup: ip is not installed"));
        return Ok(());
    }
    let args = ["-details", "-json", "link", "show", "dev", IPVS_DUMMY_DEVICE];
    let out = exec.run("ip", &args, None)?;
    if !out.status.success() {
        if out.stderr.contains("does not exist") {
            return Ok(());
        }
        return Err(Error::Failed {
            command: exec.command_line("ip", &args),
            table: None,
            status: out.status,
            stderr: out.stderr.trim().to_string(),
        });
    }
    let kind = serde_json::from_str::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.get(0)?.get("linkinfo")?.get("info_kind")?.as_str().map(str::to_string));
    if kind.as_deref() != Some("dummy") {
        let kind = kind.unwrap_or_else(|| "unknown".into());
        warn!(link = IPVS_DUMMY_DEVICE, kind, "not deleting a non-dummy link");
        report.kept.push(Kept {
            item: IPVS_DUMMY_DEVICE.into(),
            reason: format!("it is a {kind} link, not the dummy link ipvs mode creates"),
        });
        return Ok(());
    }
    exec.run_ok("ip", &["link", "delete", IPVS_DUMMY_DEVICE], None)?;
    info!(link = IPVS_DUMMY_DEVICE, "deleted ipvs dummy link");
    report.links_deleted.push(IPVS_DUMMY_DEVICE.into());
    Ok(())
}

/// Destroys ipvs mode's ipsets that no remaining iptables rule matches on, in one `ipset restore` process.
fn cleanup_ipsets(exec: &Exec, referenced: &BTreeSet<String>, report: &mut CleanupReport) -> Result<(), Error> {
    if !exec.has_tool("ipset") {
        report.skipped.push("ipset cleanup: ipset is not installed".into());
        return Ok(());
    }
    let listing = exec.run_ok("ipset", &["list", "-n"], None)?;
    let existing: BTreeSet<&str> = listing.lines().map(str::trim).collect();
    let mut destroy = Vec::new();
    for name in ipvs_ipset_names().filter(|n| existing.contains(n.as_str())) {
        if referenced.contains(&name) {
            report.kept.push(Kept { item: name, reason: "still matched by an iptables rule".into() });
        } else {
            destroy.push(name);
        }
    }
    if destroy.is_empty() {
        return Ok(());
    }
    let script: String = destroy.iter().map(|n| format!("destroy {n}\n")).collect();
    let out = exec.run("ipset", &["restore"], Some(&script))?;
    if !out.status.success() {
        let stderr = out.stderr.trim().to_string();
        // ipset prints "Error in line N: ..."; quote that line like the iptables errors do.
        let line = stderr
            .split("line ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse::<usize>().ok());
        let command = exec.command_line("ipset", &["restore"]);
        return Err(match line.and_then(|n| Some((n, script.lines().nth(n.checked_sub(1)?)?))) {
            Some((line, text)) => Error::Restore(Box::new(RestoreFailure {
                command,
                table: "ipset".into(),
                line,
                text: text.to_string(),
                suspect: None,
                stderr,
            })),
            None => Error::Failed { command, table: None, status: out.status, stderr },
        });
    }
    info!(sets = ?destroy, "destroyed ipvs ipsets");
    report.ipsets_destroyed.extend(destroy);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-SVC-AAAA - [0:0]
:KUBE-SEP-BBBB - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-MARK-DROP - [0:0]
:CNI-HOSTPORT-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-AAAA
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-SVC-AAAA -j KUBE-SEP-BBBB
-A KUBE-SEP-BBBB -j KUBE-MARK-MASQ
-A CNI-HOSTPORT-MASQ -j KUBE-MARK-MASQ
COMMIT
"#;

    fn nat() -> TableDump {
        Ruleset::parse(SAVED).unwrap().tables.remove(0)
    }

    #[test]
    fn ownership_excludes_kubelet_chains() {
        assert!(is_kube_proxy_chain("nat", "KUBE-SVC-AAAA", None));
        assert!(is_kube_proxy_chain("filter", "KUBE-IPVS-FILTER", None));
        assert!(!is_kube_proxy_chain("filter", "KUBE-SVC-AAAA", None));
        assert!(!is_kube_proxy_chain("nat", "KUBE-MARK-DROP", None));
        assert!(!is_kube_proxy_chain("filter", "KUBE-FIREWALL", None));
        assert!(!is_kube_proxy_chain("filter", "KUBE-KUBELET-CANARY", None));
        assert!(is_kube_proxy_chain("nat", "KUBE-NODE-PORT", Some(ProxyMode::Ipvs)));
        assert!(!is_kube_proxy_chain("nat", "KUBE-NODE-PORT", Some(ProxyMode::Iptables)));
    }

    #[test]
    fn full_cleanup_keeps_chains_foreign_chains_use() {
        let plan = plan_table(&nat(), None);
        // CNI-HOSTPORT-MASQ still jumps to KUBE-MARK-MASQ: deleting it would fail the whole transaction.
        assert!(!plan.delete.contains("KUBE-MARK-MASQ"));
        assert_eq!(plan.kept.len(), 1);
        assert_eq!(plan.kept[0].item, "nat/KUBE-MARK-MASQ");
        let deleted: Vec<_> = plan.delete.iter().map(String::as_str).collect();
        assert_eq!(deleted, ["KUBE-NODE-PORT", "KUBE-SEP-BBBB", "KUBE-SERVICES", "KUBE-SVC-AAAA"]);
        assert_eq!(plan.rules.len(), 1);
        assert_eq!(plan.rules[0].chain, "PREROUTING");
    }

    #[test]
    fn iptables_mode_removes_only_ipvs_chains_and_their_jumps() {
        let plan = plan_table(&nat(), Some(ProxyMode::Iptables));
        let deleted: Vec<_> = plan.delete.iter().map(String::as_str).collect();
        assert_eq!(deleted, ["KUBE-NODE-PORT"]);
        // The jump lives in KUBE-SERVICES, which iptables mode keeps and will rewrite.
        assert_eq!(plan.rules.len(), 1);
        assert_eq!(
            (plan.rules[0].chain.as_str(), plan.rules[0].spec.as_str()),
            ("KUBE-SERVICES", "-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
        );
    }

    #[test]
    fn ipvs_mode_keeps_iptables_service_chains_still_in_use() {
        let plan = plan_table(&nat(), Some(ProxyMode::Ipvs));
        // KUBE-SERVICES is ipvs mode's too and still jumps to KUBE-SVC-AAAA: that rule goes, the chains go.
        let deleted: Vec<_> = plan.delete.iter().map(String::as_str).collect();
        assert_eq!(deleted, ["KUBE-SEP-BBBB", "KUBE-SVC-AAAA"]);
        assert_eq!(plan.rules.len(), 1);
        assert_eq!(plan.rules[0].spec, "-d 10.96.0.1/32 -j KUBE-SVC-AAAA");
    }

    #[test]
    fn ipset_names_cover_both_families() {
        let names: Vec<String> = ipvs_ipset_names().collect();
        assert!(names.contains(&"KUBE-CLUSTER-IP".to_string()));
        assert!(names.contains(&"KUBE-6-CLUSTER-IP".to_string()));
        assert!(names.contains(&"KUBE-6-NODE-PORT-LOCAL-SCTP-HAS".to_string()));
        assert!(names.contains(&"KUBE-6-LOAD-BALANCER-SOURCE-CID".to_string()));
        assert_eq!(names.len(), 2 * IPVS_IPSETS.len());
    }

    #[test]
    fn report_emptiness() {
        let mut r = CleanupReport::default();
        r.skipped.push("x".into());
        r.kept.push(Kept { item: "a".into(), reason: "b".into() });
        r.iptables.push(FamilyReport::new(IpFamily::V4));
        assert!(r.is_empty());
        r.links_deleted.push(IPVS_DUMMY_DEVICE.into());
        assert!(!r.is_empty());
    }
}
