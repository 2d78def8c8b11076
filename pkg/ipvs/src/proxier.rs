//! [`IpvsBackend`]: kube-proxy's IPVS mode as a [`Backend`].

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use proxier::backend::{Backend, BackendError, SyncReport};
use proxier::metrics::Metrics;
use proxier::model::{Changes, IpFamily, Snapshot};
use proxy_iptables::conntrack::{self, ConntrackTable, NetlinkConntrack};
use proxy_iptables::sysctl::{self, ProcSysctl, Sysctl};
use proxy_iptables::{Exec, Iptables, LocalDetectorConfig, NodePortAddresses, RestoreFlags};
use tracing::{error, info, warn};

use crate::graceful::{self, DRAIN_CHECK_INTERVAL, DrainTicker, IpvsState};
use crate::ipvs_rules::{self, Config, DEFAULT_SCHEDULER, KUBE_IPVS0, SCHEDULERS};
use crate::kernel::{IpvsKernel, sync_ipvs};
use crate::netlink::{self, IpvsClient};

const NAME: &str = "ipvs";

/// How to build an [`IpvsBackend`].
pub struct IpvsOptions {
    /// Families to program.
    pub families: Vec<IpFamily>,
    /// `ipvs.scheduler` (`""` → `rr`).
    pub scheduler: String,
    /// `ipvs.excludeCIDRs`: virtual servers inside these are never deleted by a sync.
    pub exclude_cidrs: Vec<IpNet>,
    /// `ipvs.strictARP`.
    pub strict_arp: bool,
    /// `ipvs.tcpTimeout`, `tcpFinTimeout`, `udpTimeout` in seconds (0 leaves one unchanged).
    pub timeouts: (u32, u32, u32),
    /// `masqueradeAll`.
    pub masquerade_all: bool,
    /// `iptables.masqueradeBit`.
    pub masquerade_bit: u32,
    /// `detectLocalMode` and its parameters.
    pub local_detector: LocalDetectorConfig,
    /// `nodePortAddresses`.
    pub node_port_addresses: NodePortAddresses,
    /// Command prefix for iptables/ipset/ip (`ip netns exec NS` in tests).
    pub exec: Exec,
    /// Sysctl access (default `/proc/sys`).
    pub sysctl: Option<Arc<dyn Sysctl>>,
    /// IPVS table access (default: the generic netlink client; tests pass a fake).
    pub kernel: Option<Box<dyn IpvsKernel>>,
    /// Metrics to record iptables restore failures and conntrack reconciliation into (the runner's observer
    /// records the metrics every mode shares).
    pub metrics: Option<Arc<Metrics>>,
    /// Conntrack table for stale UDP flow cleanup (default: ctnetlink in this network namespace).
    pub conntrack: Option<Box<dyn ConntrackTable>>,
    /// How often draining real servers are re-checked between syncs (upstream: 1 minute).
    pub graceful_check_interval: Duration,
}

impl IpvsOptions {
    /// Upstream defaults: both families, `rr`, bit 14, nothing excluded, no strict ARP.
    pub fn new() -> Self {
        IpvsOptions {
            families: IpFamily::ALL.to_vec(),
            scheduler: String::new(),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            timeouts: (0, 0, 0),
            masquerade_all: false,
            masquerade_bit: 14,
            local_detector: LocalDetectorConfig::None,
            node_port_addresses: NodePortAddresses::default(),
            exec: Exec::new(),
            sysctl: None,
            kernel: None,
            metrics: None,
            conntrack: None,
            graceful_check_interval: DRAIN_CHECK_INTERVAL,
        }
    }
}

impl Default for IpvsOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Why the IPVS backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The kernel has no IPVS (upstream `CanUseIPVSProxier`).
    #[error(
        "can't use the IPVS proxier: IPVS proxier will not be used because the kernel module ip_vs is not loaded \
         (generic netlink family \"IPVS\" is not registered)"
    )]
    ModuleMissing,
    /// `--ipvs-scheduler` names no scheduler upstream accepts.
    #[error("invalid --ipvs-scheduler {0:?}: expected one of rr wrr lc wlc lblc lblcr sh dh sed nq mh")]
    BadScheduler(String),
    /// Talking to the kernel failed.
    #[error("IPVS netlink: {0}")]
    Netlink(#[from] netlink::Error),
    /// A required sysctl could not be set.
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    /// The graceful-termination thread could not be started.
    #[error("starting the ipvs-graceful-termination thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<InitError> for BackendError {
    fn from(e: InitError) -> Self {
        BackendError::with_source(NAME, "initialising", e)
    }
}

/// kube-proxy's IPVS mode.
pub struct IpvsBackend {
    families: Vec<IpFamily>,
    /// Kernel handle and drain list, shared with `_drain_ticker`.
    state: Arc<Mutex<IpvsState>>,
    _drain_ticker: DrainTicker,
    metrics: Option<Arc<Metrics>>,
    conntrack: Box<dyn ConntrackTable>,
    scheduler: String,
    exclude_cidrs: Vec<IpNet>,
    masquerade_all: bool,
    masquerade_mark: String,
    local_detector: LocalDetectorConfig,
    node_port_addresses: NodePortAddresses,
    exec: Exec,
}

impl std::fmt::Debug for IpvsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsBackend").field("families", &self.families).field("scheduler", &self.scheduler).finish()
    }
}

impl IpvsBackend {
    /// Checks that the kernel has IPVS, sets upstream's sysctls and global timeouts.
    pub fn new(opts: IpvsOptions) -> Result<Self, InitError> {
        let scheduler = if opts.scheduler.is_empty() { DEFAULT_SCHEDULER.to_string() } else { opts.scheduler };
        if !SCHEDULERS.contains(&scheduler.as_str()) {
            return Err(InitError::BadScheduler(scheduler));
        }
        let kernel: Box<dyn IpvsKernel> = match opts.kernel {
            Some(k) => k,
            None => {
                let mut c = IpvsClient::new().map_err(|e| match e {
                    netlink::Error::FamilyNotFound => InitError::ModuleMissing,
                    e => InitError::Netlink(e),
                })?;
                let (tcp, fin, udp) = opts.timeouts;
                if tcp > 0 || fin > 0 || udp > 0 {
                    c.set_timeouts(tcp, fin, udp)?;
                }
                Box::new(c)
            }
        };
        let sysctl: Arc<dyn Sysctl> = opts.sysctl.unwrap_or_else(|| Arc::new(ProcSysctl::default()));
        let kernel_version = sysctl.get(OSRELEASE).ok().and_then(|r| parse_kernel_version(&r));
        if kernel_version.is_none() {
            warn!(sysctl = OSRELEASE, "Cannot read the kernel version; leaving net/ipv4/vs/conn_reuse_mode as-is");
        }
        for (name, value) in required_sysctls(opts.strict_arp, &opts.families, kernel_version) {
            sysctl::ensure(sysctl.as_ref(), name, value)?;
        }
        let state = Arc::new(Mutex::new(IpvsState::new(kernel)));
        let drain_ticker =
            DrainTicker::spawn(state.clone(), opts.graceful_check_interval).map_err(InitError::Thread)?;
        info!(scheduler, families = ?opts.families, "Using ipvs Proxier");
        Ok(IpvsBackend {
            families: opts.families,
            state,
            _drain_ticker: drain_ticker,
            metrics: opts.metrics,
            conntrack: opts.conntrack.unwrap_or_else(|| Box::new(NetlinkConntrack::new())),
            scheduler,
            exclude_cidrs: opts.exclude_cidrs,
            masquerade_all: opts.masquerade_all,
            masquerade_mark: proxy_iptables::rules::masquerade_mark(opts.masquerade_bit),
            local_detector: opts.local_detector,
            node_port_addresses: opts.node_port_addresses,
            exec: opts.exec,
        })
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut parts: Vec<&str> = self.exec.prefix().iter().map(String::as_str).collect();
        parts.push(program);
        parts.extend_from_slice(args);
        let line = parts.join(" ");
        let mut child = Command::new(parts[0])
            .args(&parts[1..])
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{line}: {e}"))?;
        if let (Some(mut p), Some(s)) = (child.stdin.take(), stdin) {
            let _ = p.write_all(s.as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| format!("{line}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{line}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn addresses(&self, dev: Option<&str>) -> Vec<IpAddr> {
        let mut args = vec!["-o", "addr", "show"];
        if let Some(d) = dev {
            args.extend(["dev", d]);
        }
        self.run("ip", &args, None)
            .map(|out| {
                out.lines()
                    .filter_map(|l| {
                        let mut w = l.split_whitespace();
                        w.find(|x| *x == "inet" || *x == "inet6")?;
                        w.next()?.split('/').next()?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn sync_family(&mut self, family: IpFamily, snapshot: &Snapshot, changes: &Changes) -> Result<usize, String> {
        let bound_now: BTreeSet<IpAddr> =
            self.addresses(Some(KUBE_IPVS0)).into_iter().filter(|a| IpFamily::of(a) == family).collect();
        let locals: BTreeSet<IpAddr> = self.addresses(None).into_iter().filter(|a| IpFamily::of(a) == family).collect();
        let node_port_ips: Vec<IpAddr> = if self.node_port_addresses.match_all(family) {
            // Upstream: every local address except loopback, IPv6 link-local and those on kube-ipvs0.
            locals
                .iter()
                .filter(|a| !a.is_loopback() && !is_v6_link_local(a) && !bound_now.contains(a))
                .copied()
                .collect()
        } else {
            let l: Vec<IpAddr> = locals.iter().copied().collect();
            // Upstream never serves NodePorts on loopback in IPVS mode.
            self.node_port_addresses
                .node_ips(family, &l, &snapshot.node)
                .into_iter()
                .filter(|a| !a.is_loopback())
                .collect()
        };
        let cfg = Config {
            family,
            scheduler: self.scheduler.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_mark: self.masquerade_mark.clone(),
            local_detector: self.local_detector.resolve(family, &snapshot.node),
            node_port_ips: node_port_ips.clone(),
            local_addresses: locals.iter().filter(|a| !bound_now.contains(a)).copied().collect(),
            node_ip: snapshot.node.addresses.iter().find(|a| IpFamily::of(a) == family).copied(),
            random_fully: true,
        };
        let fs = snapshot.family(family);
        let desired = ipvs_rules::compute(&cfg, &fs.services);

        // kube-ipvs0 and its addresses, one `ip -batch` process.
        if self.run("ip", &["link", "show", KUBE_IPVS0], None).is_err() {
            self.run("ip", &["link", "add", KUBE_IPVS0, "type", "dummy"], None)?;
        }
        let plen = if family == IpFamily::V6 { 128 } else { 32 };
        let mut batch = String::new();
        for a in desired.bound_addrs.difference(&bound_now) {
            batch.push_str(&format!("addr add {a}/{plen} dev {KUBE_IPVS0}\n"));
        }
        for a in bound_now.difference(&desired.bound_addrs) {
            batch.push_str(&format!("addr del {a}/{plen} dev {KUBE_IPVS0}\n"));
        }
        if !batch.is_empty() {
            self.run("ip", &["-force", "-batch", "-"], Some(&batch))?;
        }

        // ipsets: one `ipset restore` with the difference against `ipset save`.
        let current = ipvs_rules::parse_ipset_save(&self.run("ipset", &["save"], None)?);
        let restore = ipvs_rules::ipset_restore(family, &desired, &current);
        self.run("ipset", &["restore"], Some(&restore))?;

        // Virtual and real servers, against what the kernel lists.
        let report = {
            let mut st = graceful::lock(&self.state);
            let st = &mut *st;
            sync_ipvs(st.kernel.as_mut(), &mut st.draining, family, &desired.servers, &self.exclude_cidrs)
        };
        for e in &report.errors {
            warn!(family = %family, error = %e, "IPVS sync");
        }

        // iptables, after the sets they reference exist.
        let ipt = Iptables::new(family).with_exec(self.exec.clone());
        let saved = ipt.save_parsed().map_err(|e| e.to_string())?;
        let missing: Vec<_> = ipvs_rules::JUMP_CHAINS
            .iter()
            .filter(|j| {
                !saved.table(j.table).and_then(|t| t.chain(j.src)).is_some_and(|c| {
                    c.rules.iter().any(|r| r.target() == Some(j.dst) && r.args.iter().any(|a| a == j.comment))
                })
            })
            .copied()
            .collect();
        let text = ipvs_rules::iptables_restore(&cfg, &desired, &missing);
        if let Err(e) = ipt.restore(&text, RestoreFlags::NOFLUSH_COUNTERS) {
            error!(family = %family, error = %e, "Failed to execute iptables-restore");
            if let Some(m) = &self.metrics {
                m.inc_iptables_restore_failure(family);
            }
            return Err(e.to_string());
        }

        // Upstream: stale UDP flows are cleared after a successful sync that needs it.
        if changes.family(family).conntrack_cleanup_required
            && let Err(e) = conntrack::reconcile(self.conntrack.as_mut(), family, &fs.services, self.metrics.as_deref())
        {
            error!(family = %family, error = %e, "Failed to clear stale conntrack entries");
        }
        Ok(fs.services.len())
    }
}

/// `fe80::/10`.
fn is_v6_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The kernel release, read through the sysctl interface (`/proc/sys/kernel/osrelease`).
const OSRELEASE: &str = "kernel/osrelease";

/// `major.minor` of a kernel release such as `5.4.0-150-generic`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Sysctls upstream sets at start (reference §5.1). `conn_reuse_mode=0` only on kernels from 4.1 (where it
/// exists) up to 5.8: 5.9 fixed the connection-reuse delay it works around (kubernetes#93297), so it is left
/// alone there, as upstream does; also when the version is unknown.
pub fn required_sysctls(
    strict_arp: bool,
    families: &[IpFamily],
    kernel_version: Option<(u32, u32)>,
) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("net/ipv4/vs/conntrack", "1")];
    if kernel_version.is_some_and(|k| ((4, 1)..(5, 9)).contains(&k)) {
        v.push(("net/ipv4/vs/conn_reuse_mode", "0"));
    }
    v.push(("net/ipv4/vs/expire_nodest_conn", "1"));
    v.push(("net/ipv4/vs/expire_quiescent_template", "1"));
    if families.contains(&IpFamily::V4) {
        v.push(("net/ipv4/ip_forward", "1"));
    }
    if families.contains(&IpFamily::V6) {
        v.push(("net/ipv6/conf/all/forwarding", "1"));
    }
    if strict_arp {
        v.push(("net/ipv4/conf/all/arp_ignore", "1"));
        v.push(("net/ipv4/conf/all/arp_announce", "2"));
    }
    v
}

impl Backend for IpvsBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self) -> &[IpFamily] {
        &self.families
    }

    fn sync(&mut self, snapshot: &Snapshot, changes: &Changes) -> Result<SyncReport, BackendError> {
        // IPVS mode has no partial syncs: every sync is a full diff against the kernel.
        let mut report = SyncReport { full: true, ..Default::default() };
        let mut errors = Vec::new();
        for family in self.families.clone() {
            match self.sync_family(family, snapshot, changes) {
                Ok(n) => report.service_ports_programmed += n,
                Err(e) => errors.push(format!("{family}: {e}")),
            }
        }
        if errors.is_empty() { Ok(report) } else { Err(BackendError::msg(NAME, errors.join("; "))) }
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let ipt = Iptables::new(IpFamily::V4).with_exec(self.exec.clone());
        proxy_iptables::cleanup_leftovers(&ipt).map(|_| ()).map_err(|e| BackendError::with_source(NAME, "cleanup", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_reuse_mode_only_on_kernels_with_the_bug() {
        assert_eq!(parse_kernel_version("5.4.0-150-generic\n"), Some((5, 4)));
        assert_eq!(parse_kernel_version("6.18.2"), Some((6, 18)));
        assert_eq!(parse_kernel_version("garbage"), None);
        let has = |k| required_sysctls(false, &[IpFamily::V4], k).contains(&("net/ipv4/vs/conn_reuse_mode", "0"));
        assert!(has(Some((4, 1))));
        assert!(has(Some((5, 8))));
        assert!(!has(Some((5, 9))));
        assert!(!has(Some((6, 18))));
        assert!(!has(Some((3, 10))));
        assert!(!has(None));
        let all = required_sysctls(true, &IpFamily::ALL, Some((5, 4)));
        let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "net/ipv4/vs/conntrack",
                "net/ipv4/vs/conn_reuse_mode",
                "net/ipv4/vs/expire_nodest_conn",
                "net/ipv4/vs/expire_quiescent_template",
                "net/ipv4/ip_forward",
                "net/ipv6/conf/all/forwarding",
                "net/ipv4/conf/all/arp_ignore",
                "net/ipv4/conf/all/arp_announce"
            ]
        );
    }
}
