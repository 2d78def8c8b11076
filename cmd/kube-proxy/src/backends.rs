//! Chooses the datapath backend for `--proxy-mode` and runs `--cleanup`.

use std::path::Path;

use std::sync::Arc;

use proxier::backend::Backend;
use proxier::metrics::Metrics;
use proxier::model::IpFamily;
use proxier::record::RecordingBackend;

use crate::config::ProxyMode;
use crate::options::ProxyRunConfig;

/// Test-only: `record:<path>` replaces the datapath with a backend that programs nothing and appends each
/// sync's changes to `<path>`, so end-to-end tests can run the real binary without touching the node.
pub const TEST_BACKEND_ENV: &str = "KUBE_PROXY_RS_TEST_BACKEND";

/// Why no backend could be built.
#[derive(Debug, thiserror::Error)]
pub enum BackendInitError {
    /// The mode exists upstream but its backend is not part of this build yet.
    #[error("proxy mode {0:?} is not built yet in kube-proxy-rs; use --proxy-mode=ebpf")]
    NotBuilt(&'static str),
    /// The test backend variable is malformed.
    #[error("{TEST_BACKEND_ENV}={0:?}: expected record:<path>")]
    BadTestBackend(String),
    /// The backend failed to start.
    #[error(transparent)]
    Backend(#[from] proxier::backend::BackendError),
    /// The backend's environment (cgroup, bpffs, kernel programs) could not be set up.
    #[error("setting up the datapath: {0:#}")]
    Setup(anyhow::Error),
}

/// The mode name `/proxyMode` reports.
pub fn mode_name(mode: ProxyMode) -> &'static str {
    match mode {
        ProxyMode::Ebpf => "ebpf",
        ProxyMode::Iptables => "iptables",
        ProxyMode::Ipvs => "ipvs",
        ProxyMode::Nftables => "nftables",
    }
}

/// Whether the test backend replaces the datapath.
pub fn test_backend_requested() -> bool {
    std::env::var_os(TEST_BACKEND_ENV).is_some()
}

/// The datapath backend plus the metrics collector it contributes (read at scrape time).
pub struct BuiltBackend {
    /// The backend the sync runner takes over.
    pub backend: Box<dyn Backend>,
    /// eBPF counters and map statistics; `None` for other modes.
    pub ebpf_metrics: Option<proxy_ebpf::EbpfCollector>,
}

impl BuiltBackend {
    fn plain(backend: Box<dyn Backend>) -> Self {
        BuiltBackend { backend, ebpf_metrics: None }
    }
}

/// Builds the backend for the configured mode; backends record their own metrics into `metrics`.
pub fn build(run: &ProxyRunConfig, metrics: &Arc<Metrics>) -> Result<BuiltBackend, BackendInitError> {
    if let Some(spec) = std::env::var_os(TEST_BACKEND_ENV) {
        let spec = spec.to_string_lossy().into_owned();
        let path = spec.strip_prefix("record:").ok_or_else(|| BackendInitError::BadTestBackend(spec.clone()))?;
        tracing::warn!(path, "Test backend: recording syncs instead of programming a datapath");
        return Ok(BuiltBackend::plain(Box::new(RecordingBackend::new(Path::new(path))?)));
    }
    match run.mode {
        ProxyMode::Ebpf => {
            // Migration: leftovers of upstream's (or our) iptables/ipvs/nftables modes would translate
            // packets a second time; remove them before our programs take over.
            let ipt = proxy_iptables::Iptables::new(IpFamily::V4);
            if let Err(e) = proxy_iptables::cleanup_for_mode(&ipt, proxy_iptables::ProxyMode::Ebpf) {
                tracing::warn!(error = %e, "Cleaning up other proxy modes' rules failed; continuing");
            }
            let cgroup_root = crate::app::cgroup_root(run.cgroup_root.as_ref()).map_err(BackendInitError::Setup)?;
            let mut opts = proxy_ebpf::EbpfOptions::new(cgroup_root, &run.bpffs_root, IpFamily::ALL.to_vec());
            if let Some(entries) = bpf_conntrack_entries(run) {
                opts.ct_max_entries = entries;
            }
            opts.socket_lb_scope = run.socket_lb_scope;
            let backend = proxy_ebpf::EbpfBackend::new(opts).map_err(|e| BackendInitError::Setup(e.into()))?;
            // Opened before the backend moves into the runner thread; it holds its own map handles.
            let ebpf_metrics = match backend.metrics_collector() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "eBPF metrics unavailable");
                    None
                }
            };
            Ok(BuiltBackend { backend: Box::new(backend), ebpf_metrics })
        }
        ProxyMode::Iptables => {
            // Migration (upstream platformCleanup): our eBPF programs and pins, and the ipvs/nftables modes'
            // leftovers, would handle packets before or beside our rules. Best-effort, as upstream.
            match crate::app::cgroup_root(run.cgroup_root.as_ref()) {
                Ok(cg) => {
                    if let Err(e) = proxy_ebpf::EbpfBackend::cleanup_all(&run.bpffs_root, &cg) {
                        tracing::warn!(error = %e, "Removing eBPF leftovers failed; continuing");
                    }
                }
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "No cgroup2 root; skipping eBPF leftover cleanup"),
            }
            if let Err(e) = proxy_ebpf::EbpfBackend::cleanup_tc_filters(Path::new("/proc/self/ns/net")) {
                tracing::warn!(error = %e, "Removing eBPF tc filters failed; continuing");
            }
            let ipt = proxy_iptables::Iptables::new(IpFamily::V4);
            if let Err(e) = proxy_iptables::cleanup_for_mode(&ipt, proxy_iptables::ProxyMode::Iptables) {
                tracing::warn!(error = %e, "Cleaning up other proxy modes' rules failed; continuing");
            }
            let mut opts = iptables_options(run)?;
            opts.metrics = Some(metrics.clone());
            Ok(BuiltBackend::plain(Box::new(proxy_iptables::IptablesBackend::new(opts)?)))
        }
        ProxyMode::Ipvs => {
            let c = &run.config;
            let ipt_opts = iptables_options(run)?; // the same local-detector and nodePortAddresses parsing
            let mut o = proxy_ipvs::IpvsOptions::new();
            o.scheduler = c.ipvs.scheduler.clone();
            o.strict_arp = c.ipvs.strict_arp;
            o.exclude_cidrs = c
                .ipvs
                .exclude_cidrs
                .iter()
                .flatten()
                .map(|s| {
                    s.parse().map_err(|e| BackendInitError::Setup(anyhow::anyhow!("ipvs.excludeCIDRs {s:?}: {e}")))
                })
                .collect::<Result<_, _>>()?;
            let secs = |d: crate::config::GoDuration| u32::try_from(d.to_std().as_secs()).unwrap_or(u32::MAX);
            o.timeouts = (secs(c.ipvs.tcp_timeout), secs(c.ipvs.tcp_fin_timeout), secs(c.ipvs.udp_timeout));
            o.masquerade_all = run.masquerade_all();
            o.masquerade_bit = u32::try_from(run.masquerade_bit()).unwrap_or(14);
            o.local_detector = ipt_opts.local_detector;
            o.node_port_addresses = ipt_opts.node_port_addresses;
            o.metrics = Some(metrics.clone());
            // Fails first, naming the missing kernel module, before anything on the node is touched.
            let backend = proxy_ipvs::IpvsBackend::new(o).map_err(|e| BackendInitError::Setup(e.into()))?;
            let ipt = proxy_iptables::Iptables::new(IpFamily::V4);
            if let Err(e) = proxy_iptables::cleanup_for_mode(&ipt, proxy_iptables::ProxyMode::Ipvs) {
                tracing::warn!(error = %e, "Cleaning up other proxy modes' rules failed; continuing");
            }
            Ok(BuiltBackend::plain(Box::new(backend)))
        }
        other => Err(BackendInitError::NotBuilt(mode_name(other))),
    }
}

/// Sizes the BPF conntrack map the way upstream sizes `nf_conntrack_max`: `max(maxPerCore × CPUs, min)` flows,
/// two map entries per flow; `None` (keep the default) when `maxPerCore` is 0, as upstream leaves the limit alone.
fn bpf_conntrack_entries(run: &ProxyRunConfig) -> Option<u32> {
    let ct = &run.config.conntrack;
    let per_core = u64::try_from(ct.max_per_core.unwrap_or(32768)).ok().filter(|n| *n > 0)?;
    let min = u64::try_from(ct.min.unwrap_or(131072)).unwrap_or(0);
    // Upstream counts the CPUs of the process's cpuset; available_parallelism honours it too.
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let flows = (per_core * cpus).max(min);
    Some(u32::try_from(flows * 2).unwrap_or(u32::MAX))
}

/// The iptables backend's options from the effective configuration.
fn iptables_options(run: &ProxyRunConfig) -> Result<proxy_iptables::IptablesOptions, BackendInitError> {
    use crate::config::LocalMode;
    use proxy_iptables::LocalDetectorConfig;
    let c = &run.config;
    let local_detector = match c.local_mode() {
        Some(LocalMode::ClusterCidr) => {
            let cidrs = c.cluster_cidrs().map_err(|e| BackendInitError::Setup(e.into()))?;
            if cidrs.is_empty() { LocalDetectorConfig::None } else { LocalDetectorConfig::ClusterCidr(cidrs) }
        }
        Some(LocalMode::NodeCidr) => LocalDetectorConfig::NodeCidr,
        Some(LocalMode::BridgeInterface) => {
            LocalDetectorConfig::BridgeInterface(c.detect_local.bridge_interface.clone())
        }
        Some(LocalMode::InterfaceNamePrefix) => {
            LocalDetectorConfig::InterfaceNamePrefix(c.detect_local.interface_name_prefix.clone())
        }
        None => LocalDetectorConfig::None,
    };
    let mut o = proxy_iptables::IptablesOptions::new(run.hostname.clone());
    o.masquerade_all = run.masquerade_all();
    o.masquerade_bit = u32::try_from(run.masquerade_bit()).unwrap_or(14);
    o.local_detector = local_detector;
    o.node_port_addresses = proxy_iptables::NodePortAddresses::parse(&c.effective_node_port_addresses())
        .map_err(|e| BackendInitError::Setup(anyhow::anyhow!(e)))?;
    o.localhost_nodeports = c.iptables.localhost_node_ports.unwrap_or(true);
    // Upstream checks its canary every syncPeriod.
    o.canary_check_interval = run.sync_period();
    Ok(o)
}

/// `--cleanup`: removes what any of our backends, and upstream's modes, may have left on this node
/// (iptables chains of both families, nftables tables, IPVS ipsets and `kube-ipvs0`).
pub fn cleanup(run: &ProxyRunConfig) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    let ipt = proxy_iptables::Iptables::new(IpFamily::V4);
    match proxy_iptables::cleanup_leftovers(&ipt) {
        Ok(report) => tracing::info!(?report, "Cleaned up iptables, nftables and IPVS leftovers"),
        Err(e) => failed.push(format!("iptables/nftables/ipvs: {e}")),
    }
    match crate::app::cgroup_root(run.cgroup_root.as_ref()) {
        Ok(cg) => match proxy_ebpf::EbpfBackend::cleanup_all(&run.bpffs_root, &cg) {
            Ok(()) => tracing::info!(pins = %run.bpffs_root.display(), "Removed eBPF programs and pinned maps"),
            Err(e) => failed.push(format!("ebpf: {e}")),
        },
        Err(e) => failed.push(format!("ebpf: {e:#}")),
    }
    // clsact filters (kernels without tcx) have no pin: only ours go, from this namespace's devices.
    if let Err(e) = proxy_ebpf::EbpfBackend::cleanup_tc_filters(Path::new("/proc/self/ns/net")) {
        failed.push(format!("ebpf tc filters: {e}"));
    }
    if failed.is_empty() { Ok(()) } else { anyhow::bail!("cleanup failed: {}", failed.join("; ")) }
}
