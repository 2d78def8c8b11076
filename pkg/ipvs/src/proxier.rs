//! [`IpvsBackend`]: kube-proxy's IPVS mode as a [`Backend`].

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;

use ipnet::IpNet;
use proxier::backend::{Backend, BackendError, SyncReport};
use proxier::model::{Changes, IpFamily, Snapshot};
use proxy_iptables::sysctl::{self, ProcSysctl, Sysctl};
use proxy_iptables::{Exec, Iptables, LocalDetectorConfig, NodePortAddresses, RestoreFlags};
use tracing::{info, warn};

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
    /// `ipvs.excludeCIDRs`: virtual servers inside these are never deleted.
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
}

impl From<InitError> for BackendError {
    fn from(e: InitError) -> Self {
        BackendError::with_source(NAME, "initialising", e)
    }
}

/// kube-proxy's IPVS mode.
pub struct IpvsBackend {
    families: Vec<IpFamily>,
    kernel: Box<dyn IpvsKernel>,
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
        for (name, value) in required_sysctls(opts.strict_arp, &opts.families) {
            sysctl::ensure(sysctl.as_ref(), name, value)?;
        }
        info!(scheduler, families = ?opts.families, "Using ipvs Proxier");
        Ok(IpvsBackend {
            families: opts.families,
            kernel,
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

    fn sync_family(&mut self, family: IpFamily, snapshot: &Snapshot) -> Result<usize, String> {
        let bound_now: BTreeSet<IpAddr> =
            self.addresses(Some(KUBE_IPVS0)).into_iter().filter(|a| IpFamily::of(a) == family).collect();
        let locals: BTreeSet<IpAddr> = self.addresses(None).into_iter().filter(|a| IpFamily::of(a) == family).collect();
        let node_port_ips: Vec<IpAddr> = if self.node_port_addresses.match_all(family) {
            // Upstream: every local address except loopback and those on kube-ipvs0.
            locals.iter().filter(|a| !a.is_loopback() && !bound_now.contains(a)).copied().collect()
        } else {
            let l: Vec<IpAddr> = locals.iter().copied().collect();
            self.node_port_addresses.node_ips(family, &l, &snapshot.node)
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
        let owned_ips: BTreeSet<IpAddr> =
            bound_now.iter().chain(&desired.bound_addrs).chain(&node_port_ips).copied().collect();
        let report = sync_ipvs(self.kernel.as_mut(), family, &desired.servers, &self.exclude_cidrs, &|ip| {
            owned_ips.contains(ip)
        });
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
        ipt.restore(&text, RestoreFlags::NOFLUSH_COUNTERS).map_err(|e| e.to_string())?;
        Ok(fs.services.len())
    }
}

/// Sysctls upstream sets at start (reference §5.1).
pub fn required_sysctls(strict_arp: bool, families: &[IpFamily]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
    ];
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

    fn sync(&mut self, snapshot: &Snapshot, _changes: &Changes) -> Result<SyncReport, BackendError> {
        // IPVS mode has no partial syncs: every sync is a full diff against the kernel.
        let mut report = SyncReport { full: true, ..Default::default() };
        let mut errors = Vec::new();
        for family in self.families.clone() {
            match self.sync_family(family, snapshot) {
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
