//! kube-proxy's Prometheus metrics (upstream `pkg/proxy/metrics`), owned by one [`Metrics`] value.
//!
//! Names, types, label names, buckets and help texts are upstream's, with component-base's `[ALPHA] `
//! help prefix. Which metrics are registered depends on the proxy mode, as in upstream's
//! `RegisterMetrics(mode)`; every handle exists in every mode (updating an unregistered one is a
//! harmless no-op for the exposition), so callers never need to check the mode.
//!
//! Our own additions are marked as such: `kubeproxy_invalid_objects_total`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc, Describer};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::model::IpFamily;

/// `Content-Type` of [`Metrics::encode`]'s output (Prometheus text exposition format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Label name for IP families; values are [`IpFamily::as_str`] (`IPv4`, `IPv6`).
const IP_FAMILY: &str = "ip_family";

/// nfacct object counting packets dropped because conntrack marked them INVALID (iptables mode).
pub const NFACCT_CT_STATE_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
/// nfacct object counting packets accepted on localhost NodePorts (iptables mode).
pub const NFACCT_LOCALHOST_NODEPORTS_ACCEPTED: &str = "localhost_nps_accepted_pkts";

/// Which `traffic_policy` a no-local-endpoints gauge is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    /// `internalTrafficPolicy: Local` (label `internal`).
    Internal,
    /// `externalTrafficPolicy: Local` (label `external`).
    External,
}

impl TrafficPolicy {
    /// The label value upstream uses.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficPolicy::Internal => "internal",
            TrafficPolicy::External => "external",
        }
    }
}

/// An iptables table, as the `table` label of the iptables rule-count gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IptablesTable {
    /// `filter`.
    Filter,
    /// `nat`.
    Nat,
    /// `mangle`.
    Mangle,
}

impl IptablesTable {
    /// The table name.
    pub fn as_str(self) -> &'static str {
        match self {
            IptablesTable::Filter => "filter",
            IptablesTable::Nat => "nat",
            IptablesTable::Mangle => "mangle",
        }
    }
}

/// The kind of a Kubernetes object skipped as malformed (label `kind` of our `kubeproxy_invalid_objects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A Service.
    Service,
    /// An EndpointSlice.
    EndpointSlice,
}

impl ObjectKind {
    /// Kubernetes' spelling of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// Which optional metric groups a mode registers (upstream's `RegisterMetrics` switch, plus `ebpf`).
#[derive(Debug, Clone, Copy, Default)]
struct ModeSet {
    full_partial: bool,
    iptables_restore: bool,
    iptables_only: bool,
    nftables: bool,
    conntrack: bool,
}

impl ModeSet {
    fn of(mode: &str) -> ModeSet {
        match mode {
            "iptables" => ModeSet {
                full_partial: true,
                iptables_restore: true,
                iptables_only: true,
                conntrack: true,
                ..ModeSet::default()
            },
            "ipvs" => ModeSet { iptables_restore: true, conntrack: true, ..ModeSet::default() },
            "nftables" => ModeSet { full_partial: true, nftables: true, conntrack: true, ..ModeSet::default() },
            // Ours: like nftables it distinguishes full from partial syncs; it has no rule-set failures of its own.
            "ebpf" => ModeSet { full_partial: true, ..ModeSet::default() },
            // kernelspace (and anything unknown): only the metrics common to all modes.
            _ => ModeSet::default(),
        }
    }
}

/// All kube-proxy metrics, registered in one [`Registry`] according to the proxy mode.
///
/// Unlabelled metrics are public handles; labelled ones are updated through typed methods so callers never
/// spell label values.
pub struct Metrics {
    registry: Registry,
    mode: String,

    sync_proxy_rules_duration: HistogramVec,
    sync_full_proxy_rules_duration: HistogramVec,
    sync_partial_proxy_rules_duration: HistogramVec,
    sync_proxy_rules_last_timestamp: GaugeVec,
    sync_proxy_rules_last_queued_timestamp: GaugeVec,
    network_programming_duration: HistogramVec,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_pending`: objects with pending EndpointSlice changes.
    pub endpoint_changes_pending: IntGauge,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`: EndpointSlice updates that recorded a change.
    pub endpoint_changes_total: IntCounter,
    /// `kubeproxy_sync_proxy_rules_service_changes_pending`: objects with pending Service changes.
    pub service_changes_pending: IntGauge,
    /// `kubeproxy_sync_proxy_rules_service_changes_total`: Service updates that recorded a change.
    pub service_changes_total: IntCounter,
    proxy_healthz_total: IntCounterVec,
    proxy_livez_total: IntCounterVec,
    no_local_endpoints: IntGaugeVec,
    iptables_restore_failures_total: IntCounterVec,
    iptables_partial_restore_failures_total: IntCounterVec,
    iptables_rules_total: IntGaugeVec,
    iptables_rules_last: IntGaugeVec,
    nftables_sync_failures_total: IntCounterVec,
    nftables_cleanup_failures_total: IntCounterVec,
    conntrack_reconciler_sync_duration: HistogramVec,
    conntrack_reconciler_deleted_entries_total: IntCounterVec,
    invalid_objects_total: IntCounterVec,
}

/// component-base prints the stability level in front of the help text.
fn alpha(help: &str) -> String {
    format!("[ALPHA] {help}")
}

/// Upstream's sync-latency buckets: `ExponentialBuckets(0.001, 2, 15)`, 1 ms … 16.384 s.
fn sync_buckets() -> Vec<f64> {
    let mut buckets = Vec::with_capacity(15);
    let mut b = 0.001;
    for _ in 0..15 {
        buckets.push(b);
        b *= 2.0;
    }
    buckets
}

/// Upstream's network-programming buckets. component-base's `MergeBuckets` starts from a zero-length-one
/// slice, so the first bucket is `0`, then 0.25, 0.5, 1…59, 60…115 by 5, 120…300 by 30 (81 buckets).
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.0, 0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, alpha(help)).buckets(buckets), labels).expect("valid histogram options")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, alpha(help)), labels).expect("valid gauge options")
}

fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, alpha(help)), labels).expect("valid gauge options")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, alpha(help)), labels).expect("valid counter options")
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl Metrics {
    /// Creates every metric and registers those upstream registers for `mode` (`iptables`, `ipvs`,
    /// `nftables`, `kernelspace`; ours: `ebpf`), plus process metrics and a build-info gauge.
    ///
    /// The mode must already be resolved (an empty mode registers only the common metrics).
    pub fn new(mode: &str) -> Arc<Metrics> {
        let ip = &[IP_FAMILY][..];
        let m = Metrics {
            registry: Registry::new(),
            mode: mode.to_string(),
            sync_proxy_rules_duration: histogram(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_buckets(),
                ip,
            ),
            sync_full_proxy_rules_duration: histogram(
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_buckets(),
                ip,
            ),
            sync_partial_proxy_rules_duration: histogram(
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_buckets(),
                ip,
            ),
            sync_proxy_rules_last_timestamp: gauge_vec(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                ip,
            ),
            sync_proxy_rules_last_queued_timestamp: gauge_vec(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                ip,
            ),
            network_programming_duration: histogram(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                network_programming_buckets(),
                ip,
            ),
            endpoint_changes_pending: IntGauge::with_opts(Opts::new(
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                alpha("Pending proxy rules Endpoint changes"),
            ))
            .expect("valid gauge options"),
            endpoint_changes_total: IntCounter::with_opts(Opts::new(
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                alpha("Cumulative proxy rules Endpoint changes"),
            ))
            .expect("valid counter options"),
            service_changes_pending: IntGauge::with_opts(Opts::new(
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                alpha("Pending proxy rules Service changes"),
            ))
            .expect("valid gauge options"),
            service_changes_total: IntCounter::with_opts(Opts::new(
                "kubeproxy_sync_proxy_rules_service_changes_total",
                alpha("Cumulative proxy rules Service changes"),
            ))
            .expect("valid counter options"),
            proxy_healthz_total: counter_vec(
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
                &["code"],
            ),
            proxy_livez_total: counter_vec(
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
                &["code"],
            ),
            no_local_endpoints: int_gauge_vec(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                &["traffic_policy", IP_FAMILY],
            ),
            iptables_restore_failures_total: counter_vec(
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "Cumulative proxy iptables restore failures",
                ip,
            ),
            iptables_partial_restore_failures_total: counter_vec(
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
                "Cumulative proxy iptables partial restore failures",
                ip,
            ),
            iptables_rules_total: int_gauge_vec(
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                &["table", IP_FAMILY],
            ),
            iptables_rules_last: int_gauge_vec(
                "kubeproxy_sync_proxy_rules_iptables_last",
                "Number of iptables rules written by kube-proxy in last sync",
                &["table", IP_FAMILY],
            ),
            nftables_sync_failures_total: counter_vec(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                "Cumulative proxy nftables sync failures",
                ip,
            ),
            nftables_cleanup_failures_total: counter_vec(
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
                "Cumulative proxy nftables cleanup failures",
                ip,
            ),
            conntrack_reconciler_sync_duration: histogram(
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                "ReconcileConntrackFlowsLatency latency in seconds",
                sync_buckets(),
                ip,
            ),
            conntrack_reconciler_deleted_entries_total: counter_vec(
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "Cumulative conntrack flows deleted by conntrack reconciler",
                ip,
            ),
            // Ours, not upstream's: upstream silently skips objects it cannot parse.
            invalid_objects_total: counter_vec(
                "kubeproxy_invalid_objects_total",
                "Services and EndpointSlices skipped because they are malformed (kube-proxy-rs)",
                &["kind"],
            ),
        };
        m.register_for_mode();
        Arc::new(m)
    }

    fn register<C: Collector + Clone + 'static>(&self, c: &C) {
        // Only a programming error (a duplicate name) can make this fail.
        self.registry.register(Box::new(c.clone())).expect("metric registered once");
    }

    fn register_for_mode(&self) {
        // Common to every mode (upstream registers network programming and no-local-endpoints for all
        // modes too, with a FIXME that winkernel never updates them).
        self.register(&self.sync_proxy_rules_duration);
        self.register(&self.sync_proxy_rules_last_queued_timestamp);
        self.register(&self.sync_proxy_rules_last_timestamp);
        self.register(&self.endpoint_changes_pending);
        self.register(&self.endpoint_changes_total);
        self.register(&self.service_changes_pending);
        self.register(&self.service_changes_total);
        self.register(&self.proxy_healthz_total);
        self.register(&self.proxy_livez_total);
        self.register(&self.network_programming_duration);
        self.register(&self.no_local_endpoints);
        self.register(&self.invalid_objects_total);

        let set = ModeSet::of(&self.mode);
        if set.full_partial {
            self.register(&self.sync_full_proxy_rules_duration);
            self.register(&self.sync_partial_proxy_rules_duration);
        }
        if set.iptables_restore {
            self.register(&self.iptables_restore_failures_total);
        }
        if set.iptables_only {
            self.register(&self.iptables_partial_restore_failures_total);
            self.register(&self.iptables_rules_total);
            self.register(&self.iptables_rules_last);
        }
        if set.nftables {
            self.register(&self.nftables_sync_failures_total);
            self.register(&self.nftables_cleanup_failures_total);
        }
        if set.conntrack {
            self.register(&self.conntrack_reconciler_sync_duration);
            self.register(&self.conntrack_reconciler_deleted_entries_total);
        }

        #[cfg(target_os = "linux")]
        if let Err(e) = self.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())) {
            tracing::warn!(error = %e, "Failed to register process metrics");
        }
        self.register(&build_info());
    }

    /// The proxy mode the metrics were registered for.
    pub fn mode(&self) -> &str {
        &self.mode
    }

    /// The registry, for backends that add their own collectors (e.g. [`FnCounter`] for nfacct counters).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything registered, in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            // Only a malformed collector can cause this; serve what was encoded rather than nothing.
            tracing::error!(error = %e, "Failed to encode metrics");
        }
        String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Records one sync of `family` that took `elapsed`: always the overall histogram, and the full or
    /// partial one when `full` says which kind it was (`None` for backends that do not distinguish).
    pub fn observe_sync(&self, family: IpFamily, elapsed: Duration, full: Option<bool>) {
        let secs = elapsed.as_secs_f64();
        let labels = &[family.as_str()];
        self.sync_proxy_rules_duration.with_label_values(labels).observe(secs);
        match full {
            Some(true) => self.sync_full_proxy_rules_duration.with_label_values(labels).observe(secs),
            Some(false) => self.sync_partial_proxy_rules_duration.with_label_values(labels).observe(secs),
            None => {}
        }
    }

    /// Sets `kubeproxy_sync_proxy_rules_last_timestamp_seconds{family}` to now (after a successful sync).
    pub fn set_last_sync_timestamp(&self, family: IpFamily) {
        self.sync_proxy_rules_last_timestamp.with_label_values(&[family.as_str()]).set(unix_seconds(SystemTime::now()));
    }

    /// Sets `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{family}` to now (a sync was requested,
    /// and once when the sync loop starts).
    pub fn set_last_queued_timestamp(&self, family: IpFamily) {
        self.sync_proxy_rules_last_queued_timestamp
            .with_label_values(&[family.as_str()])
            .set(unix_seconds(SystemTime::now()));
    }

    /// Observes one network-programming latency in seconds.
    pub fn observe_network_programming(&self, family: IpFamily, seconds: f64) {
        self.network_programming_duration.with_label_values(&[family.as_str()]).observe(seconds);
    }

    /// Observes now − `trigger_time` (an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`).
    /// Clock skew can make it negative; upstream observes it anyway.
    pub fn observe_network_programming_since(&self, family: IpFamily, trigger_time: SystemTime) {
        self.observe_network_programming(family, unix_seconds(SystemTime::now()) - unix_seconds(trigger_time));
    }

    /// Counts one Service update that recorded a change.
    pub fn inc_service_changes(&self) {
        self.service_changes_total.inc();
    }

    /// Sets the number of Services with pending changes.
    pub fn set_service_changes_pending(&self, n: usize) {
        self.service_changes_pending.set(saturating_i64(n));
    }

    /// Counts one EndpointSlice update that recorded a change.
    pub fn inc_endpoint_changes(&self) {
        self.endpoint_changes_total.inc();
    }

    /// Sets the number of Services with pending EndpointSlice changes.
    pub fn set_endpoint_changes_pending(&self, n: usize) {
        self.endpoint_changes_pending.set(saturating_i64(n));
    }

    /// Sets how many services of `family` with a Local `policy` have no local endpoints.
    pub fn set_no_local_endpoints(&self, policy: TrafficPolicy, family: IpFamily, n: usize) {
        self.no_local_endpoints.with_label_values(&[policy.as_str(), family.as_str()]).set(saturating_i64(n));
    }

    /// Ours: counts one object skipped as malformed.
    pub fn inc_invalid_object(&self, kind: ObjectKind) {
        self.invalid_objects_total.with_label_values(&[kind.as_str()]).inc();
    }

    /// Counts one `/healthz` response with HTTP status `code`.
    pub fn inc_proxy_healthz(&self, code: u16) {
        self.proxy_healthz_total.with_label_values(&[code.to_string().as_str()]).inc();
    }

    /// Counts one `/livez` response with HTTP status `code`.
    pub fn inc_proxy_livez(&self, code: u16) {
        self.proxy_livez_total.with_label_values(&[code.to_string().as_str()]).inc();
    }

    /// Counts one failed `iptables-restore` (iptables and ipvs modes).
    pub fn inc_iptables_restore_failure(&self, family: IpFamily) {
        self.iptables_restore_failures_total.with_label_values(&[family.as_str()]).inc();
    }

    /// Counts one failed partial `iptables-restore` that fell back to a full one (iptables mode).
    pub fn inc_iptables_partial_restore_failure(&self, family: IpFamily) {
        self.iptables_partial_restore_failures_total.with_label_values(&[family.as_str()]).inc();
    }

    /// Sets the number of rules kube-proxy owns in `table` (counted from `iptables-save`).
    pub fn set_iptables_rules_total(&self, table: IptablesTable, family: IpFamily, n: usize) {
        self.iptables_rules_total.with_label_values(&[table.as_str(), family.as_str()]).set(saturating_i64(n));
    }

    /// Sets the number of rules written to `table` by the last sync.
    pub fn set_iptables_rules_last(&self, table: IptablesTable, family: IpFamily, n: usize) {
        self.iptables_rules_last.with_label_values(&[table.as_str(), family.as_str()]).set(saturating_i64(n));
    }

    /// Counts one failed nftables sync (nftables mode).
    pub fn inc_nftables_sync_failure(&self, family: IpFamily) {
        self.nftables_sync_failures_total.with_label_values(&[family.as_str()]).inc();
    }

    /// Counts one failed nftables stale-chain cleanup (nftables mode).
    pub fn inc_nftables_cleanup_failure(&self, family: IpFamily) {
        self.nftables_cleanup_failures_total.with_label_values(&[family.as_str()]).inc();
    }

    /// Observes one conntrack reconciliation of `family` that took `elapsed`.
    pub fn observe_conntrack_reconcile(&self, family: IpFamily, elapsed: Duration) {
        self.conntrack_reconciler_sync_duration.with_label_values(&[family.as_str()]).observe(elapsed.as_secs_f64());
    }

    /// Adds `n` conntrack flows deleted by the reconciler.
    pub fn add_conntrack_deleted_entries(&self, family: IpFamily, n: u64) {
        self.conntrack_reconciler_deleted_entries_total.with_label_values(&[family.as_str()]).inc_by(n);
    }
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// component-base's `kubernetes_build_info`, filled with what we know about this build.
fn build_info() -> Gauge {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    let opts = Opts::new(
        "kubernetes_build_info",
        alpha(
            "A metric with a constant '1' value labeled by major, minor, git version, git commit, git tree state, \
             build date, Go version, and compiler from which Kubernetes was built, and platform on which it is running.",
        ),
    )
    .const_label("major", env!("CARGO_PKG_VERSION_MAJOR"))
    .const_label("minor", env!("CARGO_PKG_VERSION_MINOR"))
    .const_label("git_version", concat!("v", env!("CARGO_PKG_VERSION")))
    .const_label("git_commit", option_env!("KUBE_PROXY_RS_GIT_COMMIT").unwrap_or(""))
    .const_label("git_tree_state", option_env!("KUBE_PROXY_RS_GIT_TREE_STATE").unwrap_or(""))
    .const_label("build_date", option_env!("KUBE_PROXY_RS_BUILD_DATE").unwrap_or(""))
    // There is no Go; the crate's minimum Rust toolchain stands in for it.
    .const_label("go_version", concat!("rust", env!("CARGO_PKG_RUST_VERSION")))
    .const_label("compiler", "rustc")
    .const_label("platform", format!("{}/{}", std::env::consts::OS, arch));
    let g = Gauge::with_opts(opts).expect("valid gauge options");
    g.set(1.0);
    g
}

/// A counter whose value is read at scrape time, e.g. from an nfacct object (upstream's const-metric
/// collectors `kubeproxy_iptables_ct_state_invalid_dropped_packets_total` and
/// `kubeproxy_iptables_localhost_nodeports_accepted_packets_total`). When the read returns `None` nothing
/// is exported, as upstream does when nfacct is unavailable.
pub struct FnCounter {
    opts: Opts,
    desc: Desc,
    read: Box<dyn Fn() -> Option<u64> + Send + Sync>,
}

impl FnCounter {
    /// A counter named `name` with `help` (the `[ALPHA] ` prefix is added) whose value comes from `read`.
    ///
    /// # Errors
    ///
    /// An invalid metric name or an empty help text.
    pub fn new(
        name: &str,
        help: &str,
        read: impl Fn() -> Option<u64> + Send + Sync + 'static,
    ) -> prometheus::Result<FnCounter> {
        let opts = Opts::new(name, alpha(help));
        let desc = opts.describe()?;
        Ok(FnCounter { opts, desc, read: Box::new(read) })
    }

    /// Upstream's `kubeproxy_iptables_ct_state_invalid_dropped_packets_total` (nfacct
    /// [`NFACCT_CT_STATE_INVALID_DROPPED`]).
    pub fn iptables_ct_state_invalid_dropped(read: impl Fn() -> Option<u64> + Send + Sync + 'static) -> FnCounter {
        FnCounter::new(
            "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
            "packets dropped by iptables to work around conntrack problems",
            read,
        )
        .expect("valid counter options")
    }

    /// Upstream's `kubeproxy_iptables_localhost_nodeports_accepted_packets_total` (nfacct
    /// [`NFACCT_LOCALHOST_NODEPORTS_ACCEPTED`]).
    pub fn iptables_localhost_nodeports_accepted(read: impl Fn() -> Option<u64> + Send + Sync + 'static) -> FnCounter {
        FnCounter::new(
            "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
            "Number of packets accepted on nodeports of loopback interface",
            read,
        )
        .expect("valid counter options")
    }
}

impl Collector for FnCounter {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(value) = (self.read)() else { return Vec::new() };
        match IntCounter::with_opts(self.opts.clone()) {
            Ok(c) => {
                c.inc_by(value);
                c.collect()
            }
            Err(e) => {
                tracing::error!(error = %e, "Failed to create constant metric");
                Vec::new()
            }
        }
    }
}
