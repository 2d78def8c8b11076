//! Prometheus metrics read from BPF at scrape time.
//!
//! [`EbpfCollector`] is a [`Collector`]: nothing is copied into Prometheus handles between scrapes, every
//! scrape reads the per-CPU counters of each named service id and the statistics of each pinned map.
//! Upstream kube-proxy has no such metrics; names follow its `kubeproxy_` prefix and `[ALPHA]` help style:
//!
//! - `kubeproxy_ebpf_service_connections_translated_total{service_port_name, protocol, ip_family}`
//! - `kubeproxy_ebpf_service_no_endpoint_rejects_total{service_port_name, protocol, ip_family}`
//! - `kubeproxy_ebpf_map_entries{map}`
//! - `kubeproxy_ebpf_map_memory_bytes{map}`
//! - `kubeproxy_ebpf_datapath_events_total{event}`: the tc programs' counters (conntrack inserts and
//!   insert failures, SNAT port exhaustion, drops for no endpoint / source range, translated packets,
//!   client ports remapped on reply-tuple clashes (`port_remapped`, `port_remap_exhausted`), …)
//! - `kubeproxy_ebpf_conntrack_entries`, `kubeproxy_ebpf_conntrack_map_pressure` (entries / capacity),
//!   `kubeproxy_ebpf_conntrack_gc_runs_total`, `kubeproxy_ebpf_conntrack_gc_deleted_total`,
//!   `kubeproxy_ebpf_conntrack_gc_pressure_runs_total`: from the conntrack GC (the entry count is the one of
//!   its last pass, so a scrape never walks the map)

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use aya::maps::{Map, MapData, PerCpuArray};
use ebpf_common::{LAYOUT_VERSION, ServiceCounters, dp_counter, map_names};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tracing::warn;

/// Largest hash map whose entries a scrape counts; larger ones are left out of `kubeproxy_ebpf_map_entries`.
const MAP_ENTRY_COUNT_CAP: u32 = 65_536;

use crate::EbpfError;
use crate::ct::CtStats;
use crate::inspect::{MapStats, PinnedMaps};
use crate::maps::{FakeMaps, LbMaps};
use crate::names::ServiceNameTable;

const TRANSLATED: &str = "kubeproxy_ebpf_service_connections_translated_total";
const REJECTS: &str = "kubeproxy_ebpf_service_no_endpoint_rejects_total";
const MAP_ENTRIES: &str = "kubeproxy_ebpf_map_entries";
const MAP_MEMORY: &str = "kubeproxy_ebpf_map_memory_bytes";
const DP_EVENTS: &str = "kubeproxy_ebpf_datapath_events_total";
const CT_ENTRIES: &str = "kubeproxy_ebpf_conntrack_entries";
const CT_PRESSURE: &str = "kubeproxy_ebpf_conntrack_map_pressure";
const CT_GC_RUNS: &str = "kubeproxy_ebpf_conntrack_gc_runs_total";
const CT_GC_DELETED: &str = "kubeproxy_ebpf_conntrack_gc_deleted_total";
const CT_GC_PRESSURE_RUNS: &str = "kubeproxy_ebpf_conntrack_gc_pressure_runs_total";
const SERVICE_LABELS: [&str; 3] = ["service_port_name", "protocol", "ip_family"];

/// Where the collector reads BPF state from: the pinned maps in production, [`FakeMaps`] in unit tests.
pub trait BpfStatsSource: Send + Sync {
    /// The counters of a service id, summed over CPUs.
    fn service_counters(&self, id: u32) -> Result<ServiceCounters, EbpfError>;
    /// Entry count and memory of every map.
    fn map_stats(&self) -> Result<Vec<MapStats>, EbpfError>;
    /// The tc datapath counters summed over CPUs, indexed by `dp_counter::*` (empty when unavailable).
    fn datapath_counters(&self) -> Result<Vec<u64>, EbpfError> {
        Ok(Vec::new())
    }
}

/// The pinned maps, opened read-only by the collector itself (the backend's own handles live in the runner).
pub struct PinnedStats {
    counters: PerCpuArray<MapData, ServiceCounters>,
    dp_counters: Option<PerCpuArray<MapData, u64>>,
    maps: PinnedMaps,
}

impl PinnedStats {
    /// Opens the pins under `<bpffs_root>/v1/maps/`.
    pub fn open(bpffs_root: &Path) -> Result<Self, EbpfError> {
        let path = bpffs_root.join(LAYOUT_VERSION).join("maps").join(map_names::COUNTERS);
        let err = |op: &'static str| {
            let key = path.display().to_string();
            move |source| EbpfError::MapOp { map: map_names::COUNTERS, op, key, source: Box::new(source) }
        };
        let data = MapData::from_pin(&path).map_err(err("open pin"))?;
        let counters = Map::from_map_data(data).and_then(PerCpuArray::try_from).map_err(err("open pin"))?;
        let dp_path = bpffs_root.join(LAYOUT_VERSION).join("maps").join(map_names::DP_COUNTERS);
        let dp_counters = match MapData::from_pin(&dp_path).and_then(Map::from_map_data) {
            Ok(m) => PerCpuArray::try_from(m).ok(),
            Err(_) => None,
        };
        Ok(PinnedStats { counters, dp_counters, maps: PinnedMaps::open(bpffs_root)? })
    }
}

impl BpfStatsSource for PinnedStats {
    fn service_counters(&self, id: u32) -> Result<ServiceCounters, EbpfError> {
        let values = self.counters.get(&id, 0).map_err(|source| EbpfError::MapOp {
            map: map_names::COUNTERS,
            op: "read",
            key: id.to_string(),
            source: Box::new(source),
        })?;
        Ok(values.iter().fold(ServiceCounters::default(), |acc, v| ServiceCounters {
            translated: acc.translated + v.translated,
            no_endpoints: acc.no_endpoints + v.no_endpoints,
        }))
    }

    fn map_stats(&self) -> Result<Vec<MapStats>, EbpfError> {
        // Bounded walk per map so a scrape stays fast at 100k services (millions of service-map entries).
        self.maps.stats_capped(MAP_ENTRY_COUNT_CAP)
    }

    fn datapath_counters(&self) -> Result<Vec<u64>, EbpfError> {
        let Some(dp) = &self.dp_counters else { return Ok(Vec::new()) };
        (0..dp_counter::COUNT)
            .map(|i| {
                dp.get(&i, 0).map(|v| v.iter().sum()).map_err(|source| EbpfError::MapOp {
                    map: map_names::DP_COUNTERS,
                    op: "read",
                    key: i.to_string(),
                    source: Box::new(source),
                })
            })
            .collect()
    }
}

/// In-memory maps report their entry counts and no memory (there is no kernel object behind them).
impl BpfStatsSource for FakeMaps {
    fn service_counters(&self, id: u32) -> Result<ServiceCounters, EbpfError> {
        self.counters(id)
    }

    fn map_stats(&self) -> Result<Vec<MapStats>, EbpfError> {
        let stat = |name: &str, entries: usize| MapStats {
            name: name.to_string(),
            map_type: "Fake".into(),
            id: 0,
            key_size: 0,
            value_size: 0,
            max_entries: 0,
            entries: entries as u64,
            memory_bytes: None,
        };
        Ok(vec![
            stat(map_names::SERVICES, self.services.len()),
            stat(map_names::BACKENDS, self.backends.len()),
            stat(map_names::REV_NAT, self.rev_nat.len()),
        ])
    }
}

/// Prometheus collector of the eBPF datapath's counters and map statistics, read at scrape time.
pub struct EbpfCollector {
    source: Box<dyn BpfStatsSource>,
    names: ServiceNameTable,
    /// Empty prototypes: their descriptors are what the registry checks; each scrape fills fresh vectors
    /// (never these), so concurrent scrapes cannot see each other's values.
    translated: IntCounterVec,
    rejects: IntCounterVec,
    entries: IntGaugeVec,
    memory: IntGaugeVec,
    dp_events: IntCounterVec,
    ct: Option<Arc<CtStats>>,
}

fn alpha(help: &str) -> String {
    format!("[ALPHA] {help}")
}

impl EbpfCollector {
    /// A collector over `source`, naming service ids through `names`.
    pub fn new(source: Box<dyn BpfStatsSource>, names: ServiceNameTable) -> Self {
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, alpha(help)), &SERVICE_LABELS).expect("valid counter options")
        };
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, alpha(help)), &["map"]).expect("valid gauge options")
        };
        EbpfCollector {
            source,
            names,
            translated: counter(
                TRANSLATED,
                "Cumulative number of connections and unconnected datagrams the eBPF socket load balancer \
                 translated to a backend of the service port",
            ),
            rejects: counter(
                REJECTS,
                "Cumulative number of connections and datagrams the eBPF socket load balancer refused \
                 (ECONNREFUSED) because the service port had no endpoints",
            ),
            entries: gauge(MAP_ENTRIES, "Number of entries in the eBPF map (arrays report their fixed size)"),
            memory: gauge(MAP_MEMORY, "Kernel memory charged to the eBPF map (memlock), in bytes"),
            dp_events: IntCounterVec::new(
                Opts::new(DP_EVENTS, alpha("Cumulative number of events of the eBPF north-south (tc) datapath")),
                &["event"],
            )
            .expect("valid counter options"),
            ct: None,
        }
    }

    /// Also exports the conntrack GC's statistics.
    pub fn with_conntrack(mut self, stats: Arc<CtStats>) -> Self {
        self.ct = Some(stats);
        self
    }

    /// A collector over the maps pinned under `bpffs_root`.
    pub fn from_pins(bpffs_root: &Path, names: ServiceNameTable) -> Result<Self, EbpfError> {
        Ok(EbpfCollector::new(Box::new(PinnedStats::open(bpffs_root)?), names))
    }

    /// Registers this collector (convenience for callers that do not depend on `prometheus` themselves).
    pub fn register(self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self))
    }
}

/// An empty vector with the prototype's name, help and labels.
fn fresh_counter(proto: &IntCounterVec) -> IntCounterVec {
    let d = proto.desc()[0];
    IntCounterVec::new(Opts::new(d.fq_name.clone(), d.help.clone()), &SERVICE_LABELS).expect("valid counter options")
}

/// An empty vector with the prototype's name, help and labels.
fn fresh_gauge(proto: &IntGaugeVec) -> IntGaugeVec {
    let d = proto.desc()[0];
    IntGaugeVec::new(Opts::new(d.fq_name.clone(), d.help.clone()), &["map"]).expect("valid gauge options")
}

impl Collector for EbpfCollector {
    fn desc(&self) -> Vec<&Desc> {
        [self.translated.desc(), self.rejects.desc(), self.entries.desc(), self.memory.desc(), self.dp_events.desc()]
            .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let translated = fresh_counter(&self.translated);
        let rejects = fresh_counter(&self.rejects);
        let mut failed = 0usize;
        for (id, n) in self.names.snapshot() {
            match self.source.service_counters(id) {
                Ok(c) => {
                    let labels = [n.name.as_str(), n.protocol.as_str(), n.family.as_str()];
                    translated.with_label_values(&labels).inc_by(c.translated);
                    rejects.with_label_values(&labels).inc_by(c.no_endpoints);
                }
                Err(e) => {
                    // One line per scrape, not per service.
                    if failed == 0 {
                        warn!(error = %e, service_id = id, "reading eBPF service counters failed");
                    }
                    failed += 1;
                }
            }
        }
        let entries = fresh_gauge(&self.entries);
        let memory = fresh_gauge(&self.memory);
        match self.source.map_stats() {
            Ok(stats) => {
                for s in stats {
                    // A walk that hit the cap is only a lower bound: leave that map's gauge out.
                    let exact = s.entries < u64::from(MAP_ENTRY_COUNT_CAP) || s.entries == u64::from(s.max_entries);
                    if exact {
                        entries.with_label_values(&[&s.name]).set(i64::try_from(s.entries).unwrap_or(i64::MAX));
                    }
                    if let Some(m) = s.memory_bytes {
                        memory.with_label_values(&[&s.name]).set(i64::try_from(m).unwrap_or(i64::MAX));
                    }
                }
            }
            Err(e) => warn!(error = %e, "reading eBPF map statistics failed"),
        }
        let mut out = Vec::with_capacity(10);
        out.extend(translated.collect());
        out.extend(rejects.collect());
        out.extend(entries.collect());
        out.extend(memory.collect());
        match self.source.datapath_counters() {
            Ok(values) if !values.is_empty() => {
                let d = self.dp_events.desc()[0];
                let events = IntCounterVec::new(Opts::new(d.fq_name.clone(), d.help.clone()), &["event"])
                    .expect("valid counter options");
                for (name, v) in dp_counter::NAMES.iter().zip(values) {
                    events.with_label_values(&[name]).inc_by(v);
                }
                out.extend(events.collect());
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "reading eBPF datapath counters failed"),
        }
        if let Some(ct) = &self.ct {
            let entries = ct.entries.load(Ordering::Relaxed);
            let max = ct.max_entries.load(Ordering::Relaxed);
            let g = IntGauge::with_opts(Opts::new(
                CT_ENTRIES,
                alpha("Entries in the eBPF conntrack map after the last GC pass (two per flow)"),
            ))
            .expect("valid gauge options");
            g.set(i64::try_from(entries).unwrap_or(i64::MAX));
            out.extend(g.collect());
            let p = Gauge::with_opts(Opts::new(
                CT_PRESSURE,
                alpha("Fill ratio of the eBPF conntrack map (entries / max entries) after the last GC pass"),
            ))
            .expect("valid gauge options");
            p.set(if max == 0 { 0.0 } else { entries as f64 / max as f64 });
            out.extend(p.collect());
            for (name, help, v) in [
                (CT_GC_RUNS, "Cumulative number of eBPF conntrack GC passes", ct.runs.load(Ordering::Relaxed)),
                (
                    CT_GC_DELETED,
                    "Cumulative number of eBPF conntrack entries removed by the GC",
                    ct.deleted.load(Ordering::Relaxed),
                ),
                (
                    CT_GC_PRESSURE_RUNS,
                    "Cumulative number of eBPF conntrack GC passes started early because the map was filling up",
                    ct.pressure_runs.load(Ordering::Relaxed),
                ),
            ] {
                let c = IntCounter::with_opts(Opts::new(name, alpha(help))).expect("valid counter options");
                c.inc_by(v);
                out.extend(c.collect());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ebpf_common::{ServiceKey, ServiceValue};
    use prometheus::{Encoder, TextEncoder};
    use proxier::model::{IpFamily, Protocol};

    use super::*;
    use crate::names::ServiceName;

    fn encode(r: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn exposition_format() {
        let mut maps = FakeMaps::default();
        maps.services.insert(ServiceKey::default(), ServiceValue::default());
        maps.counters.insert(3, ServiceCounters { translated: 42, no_endpoints: 2 });
        let names = ServiceNameTable::from_entries(BTreeMap::from([
            (3, ServiceName { family: IpFamily::V4, protocol: Protocol::Tcp, name: "default/web:http".into() }),
            (9, ServiceName { family: IpFamily::V6, protocol: Protocol::Udp, name: "kube-system/dns".into() }),
        ]));
        let registry = Registry::new();
        EbpfCollector::new(Box::new(maps), names.clone()).register(&registry).unwrap();
        let expected = "\
# HELP kubeproxy_ebpf_map_entries [ALPHA] Number of entries in the eBPF map (arrays report their fixed size)
# TYPE kubeproxy_ebpf_map_entries gauge
kubeproxy_ebpf_map_entries{map=\"KP_BACKENDS\"} 0
kubeproxy_ebpf_map_entries{map=\"KP_REV_NAT\"} 0
kubeproxy_ebpf_map_entries{map=\"KP_SERVICES\"} 1
# HELP kubeproxy_ebpf_service_connections_translated_total [ALPHA] Cumulative number of connections and unconnected datagrams the eBPF socket load balancer translated to a backend of the service port
# TYPE kubeproxy_ebpf_service_connections_translated_total counter
kubeproxy_ebpf_service_connections_translated_total{ip_family=\"IPv4\",protocol=\"TCP\",service_port_name=\"default/web:http\"} 42
kubeproxy_ebpf_service_connections_translated_total{ip_family=\"IPv6\",protocol=\"UDP\",service_port_name=\"kube-system/dns\"} 0
# HELP kubeproxy_ebpf_service_no_endpoint_rejects_total [ALPHA] Cumulative number of connections and datagrams the eBPF socket load balancer refused (ECONNREFUSED) because the service port had no endpoints
# TYPE kubeproxy_ebpf_service_no_endpoint_rejects_total counter
kubeproxy_ebpf_service_no_endpoint_rejects_total{ip_family=\"IPv4\",protocol=\"TCP\",service_port_name=\"default/web:http\"} 2
kubeproxy_ebpf_service_no_endpoint_rejects_total{ip_family=\"IPv6\",protocol=\"UDP\",service_port_name=\"kube-system/dns\"} 0
";
        assert_eq!(encode(&registry), expected);

        // A service removed from the table disappears from the next scrape (no stale series).
        let mut m = names.snapshot();
        m.remove(&9);
        *names.write() = m;
        let out = encode(&registry);
        assert!(!out.contains("kube-system/dns"), "{out}");
        assert!(out.contains("service_port_name=\"default/web:http\"} 42"), "{out}");
    }

    #[test]
    fn conntrack_gc_statistics() {
        let stats = Arc::new(CtStats::default());
        stats.entries.store(950, Ordering::Relaxed);
        stats.max_entries.store(1000, Ordering::Relaxed);
        stats.runs.store(7, Ordering::Relaxed);
        stats.deleted.store(40, Ordering::Relaxed);
        stats.pressure_runs.store(3, Ordering::Relaxed);
        let registry = Registry::new();
        EbpfCollector::new(Box::new(FakeMaps::default()), ServiceNameTable::default())
            .with_conntrack(stats)
            .register(&registry)
            .unwrap();
        let out = encode(&registry);
        for line in [
            "kubeproxy_ebpf_conntrack_entries 950",
            "kubeproxy_ebpf_conntrack_map_pressure 0.95",
            "kubeproxy_ebpf_conntrack_gc_runs_total 7",
            "kubeproxy_ebpf_conntrack_gc_deleted_total 40",
            "# TYPE kubeproxy_ebpf_conntrack_gc_pressure_runs_total counter",
            "kubeproxy_ebpf_conntrack_gc_pressure_runs_total 3",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
        }
    }
}
