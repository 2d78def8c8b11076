//! The benchmark (`hack/bench.sh`, the `bench` binary): per backend and per number of Services, the real
//! `kube-proxy` in the lab measured for full-sync time, update latency, per-connection cost, short-connection
//! throughput, bulk throughput, north-south NodePort throughput (TCP and UDP, from outside the cluster) and
//! its own cost (RSS, CPU, BPF map memory or iptables rule count).
//!
//! - [`agent`]: the probes, run inside a pod by re-executing the bench binary (`bench agent ...`);
//! - [`run`]: the matrix driver (one lab per backend, Services added as N grows);
//! - [`report`]: the JSON rows, the markdown tables and the gnuplot plots.

pub mod agent;
pub mod report;
pub mod run;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One result: the median of `reps` repetitions with their min and max (the `{backend, services, endpoints,
/// metric, value, unit}` row of `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `--proxy-mode`.
    pub backend: String,
    /// Number of bulk Services (the scale N).
    pub services: usize,
    /// Endpoints per bulk Service.
    pub endpoints: usize,
    /// Metric name (see [`METRICS`]).
    pub metric: String,
    /// Median over the repetitions.
    pub value: f64,
    /// Unit of `value`, `min` and `max`.
    pub unit: String,
    /// Smallest repetition.
    pub min: f64,
    /// Largest repetition.
    pub max: f64,
    /// Number of repetitions (or samples, for per-sample quantiles).
    pub reps: usize,
}

/// A metric the bench reports: name, unit, meaning.
pub struct MetricDef {
    /// Name in the JSON rows.
    pub name: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// One line for the tables.
    pub what: &'static str,
}

const fn m(name: &'static str, unit: &'static str, what: &'static str) -> MetricDef {
    MetricDef { name, unit, what }
}

/// Every metric, in table order. The `*_failed` ones appear only when something failed; the last two are
/// backend-specific (see [`expected_metrics`]).
pub const METRICS: &[MetricDef] = &[
    m("full_sync", "s", "cold start (after --cleanup) until the last Service answers"),
    m("proxy_sync", "s", "kubeproxy_sync_proxy_rules_duration_seconds sum over that start"),
    m("update_p50", "ms", "one endpoint changed: API write until the first connection reaches it, p50"),
    m("update_p99", "ms", "same, p99"),
    m("conn_clusterip_p50", "us", "connect+request+close via the ClusterIP, p50"),
    m("conn_clusterip_p99", "us", "same, p99"),
    m("conn_direct_p50", "us", "connect+request+close to the pod IPs, p50"),
    m("conn_direct_p99", "us", "same, p99"),
    m("conn_ratio_p50", "x", "ClusterIP / direct, p50 (1.0 is the physical limit)"),
    m("conn_ratio_p99", "x", "ClusterIP / direct, p99"),
    m("conn_clusterip_failed", "%", "exchanges via the ClusterIP not done within the 1 s connect bound (only if any)"),
    m("conn_direct_failed", "%", "same to the pod IPs (only if any)"),
    m("rps_clusterip", "req/s", "new connection per request, concurrent clients, via the ClusterIP"),
    m("rps_direct", "req/s", "same to the pod IPs"),
    m("rps_ratio", "x", "ClusterIP / direct"),
    m("rps_clusterip_failed", "%", "throughput exchanges via the ClusterIP that failed (only if any)"),
    m(
        "np_rps",
        "req/s",
        "north-south: new connection per request, concurrent clients outside the cluster, to node-0's NodePort \
         (backends on node-1: DNAT + SNAT)",
    ),
    m(
        "np_rps_direct",
        "req/s",
        "same clients to the backends' pod IPs over the same route (node-0, node-1), no Service",
    ),
    m("np_rps_ratio", "x", "NodePort / direct"),
    m("np_rps_failed", "%", "NodePort exchanges that failed (only if any)"),
    m(
        "np_udp_pps",
        "pkt/s",
        "north-south: small UDP request + reply (2 packets) per exchange, one flow per client, via the NodePort",
    ),
    m("np_udp_direct", "pkt/s", "same to the backends' pod IPs over the same route"),
    m("np_udp_ratio", "x", "NodePort / direct"),
    m("np_udp_failed", "%", "UDP requests via the NodePort without a reply within 200 ms (only if any)"),
    m("bulk_clusterip", "Gbit/s", "one iperf3 TCP stream via the ClusterIP"),
    m("bulk_direct", "Gbit/s", "same to the pod IP"),
    m("bulk_ratio", "x", "ClusterIP / direct"),
    m("rss", "MiB", "proxy resident set size after the cell"),
    m(
        "cpu_full_sync",
        "s",
        "proxy CPU (user+system, with finished children) from start until the last Service answered",
    ),
    m("cpu_per_update", "ms", "proxy CPU (with finished children) per endpoint update"),
    m("bpf_map_memory", "MiB", "kernel memory of the pinned BPF maps (fdinfo memlock), ebpf only"),
    m("iptables_rules", "rules", "`-A` lines of iptables-save in the node namespace, iptables only"),
];

/// The metric definition called `name`.
pub fn metric_def(name: &str) -> Option<&'static MetricDef> {
    METRICS.iter().find(|d| d.name == name)
}

/// The metrics every cell of `backend` reports (bulk ones only when iperf3 is installed).
pub fn expected_metrics(backend: &str, with_bulk: bool) -> Vec<&'static str> {
    METRICS
        .iter()
        .map(|d| d.name)
        .filter(|n| with_bulk || !n.starts_with("bulk_"))
        // Failure rows exist only when something failed.
        .filter(|n| !n.ends_with("_failed"))
        .filter(|n| match *n {
            "bpf_map_memory" => backend == "ebpf",
            "iptables_rules" => backend == "iptables",
            _ => true,
        })
        .collect()
}

/// What a run covered, written next to the rows as `meta.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Backends that ran.
    pub backends: Vec<String>,
    /// Backends skipped, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Cells that failed or were left out (backend, N, reason).
    pub failed: Vec<(String, usize, String)>,
    /// The scales asked for.
    pub scales: Vec<usize>,
    /// Endpoints per bulk Service.
    pub endpoints: usize,
    /// Whether iperf3 ran (bulk metrics present).
    pub bulk: bool,
    /// `--quick`.
    pub quick: bool,
    /// Machine: cores, kernel, CPU model.
    pub machine: String,
    /// Wall time of the run in seconds.
    pub seconds: f64,
}

/// Summary statistics of repetitions: (median, min, max).
pub fn stats(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
    Some((median, v[0], v[v.len() - 1]))
}

/// The `q` quantile (nearest rank) of samples.
pub fn quantile_f(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the machine (the lab adds no time
/// namespace), so a pod's agent and the driver compare timestamps directly.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Bulk Services the address plan holds (see [`bulk_vip`]).
pub const MAX_BULK_SERVICES: usize = 65_280 + 32_768 + 8_192;

/// ClusterIP of bulk Service `i`: 198.19.1.0–198.19.255.255, then 198.18.128.0/17, then 198.18.96.0/19 —
/// inside the lab's 198.18.0.0/15 and clear of the lab's own addresses (underlay 198.18.0.0/24, pod CIDRs
/// 198.18.16–79.0/24, the lab's Services from 198.19.0.10).
pub fn bulk_vip(i: usize) -> Option<Ipv4Addr> {
    let base = |a: [u8; 4], off: usize| Ipv4Addr::from(u32::from(Ipv4Addr::from(a)) + off as u32);
    match i {
        _ if i < 65_280 => Some(base([198, 19, 1, 0], i)),
        _ if i < 65_280 + 32_768 => Some(base([198, 18, 128, 0], i - 65_280)),
        _ if i < MAX_BULK_SERVICES => Some(base([198, 18, 96, 0], i - 65_280 - 32_768)),
        _ => None,
    }
}

/// Name of bulk Service `i` (zero-padded, so the last one also sorts last).
pub fn bulk_name(i: usize) -> String {
    format!("bench-{i:06}")
}

/// An endpoint of a bulk Service: (pod IP, node name, pod name).
pub type BulkEndpoint = (Ipv4Addr, String, String);

/// Service `bench-<i>` (ClusterIP, TCP 80 → 8080) and its EndpointSlice with `eps`, as JSON for
/// `ApiServer::apply_json`.
pub fn bulk_objects(i: usize, eps: &[BulkEndpoint]) -> Option<[Value; 2]> {
    let name = bulk_name(i);
    let vip = bulk_vip(i)?.to_string();
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": crate::lab::NAMESPACE, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ipFamilies": ["IPv4"],
                 "ipFamilyPolicy": "SingleStack",
                 "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    });
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, node, pod)| {
            json!({"addresses": [ip.to_string()], "nodeName": node,
                   "targetRef": {"kind": "Pod", "namespace": crate::lab::NAMESPACE, "name": pod},
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": crate::lab::NAMESPACE, "name": format!("{name}-0"),
                     "labels": {"kubernetes.io/service-name": name,
                                "endpointslice.kubernetes.io/managed-by": "kp-bench"}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    });
    Some([svc, slice])
}

/// CPU time (user + system) of process `pid` and its finished children (`iptables-restore` and friends do the
/// iptables backend's work) in seconds: every thread's scheduler run time (`/proc/<pid>/task/*/schedstat`,
/// nanoseconds) when the kernel has it, else `utime + stime` of `/proc/<pid>/stat` (10 ms ticks; too coarse
/// for a single small update), plus `cutime + cstime`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(own_cpu_seconds(pid)? + stat_fields(pid, 13, 14).unwrap_or(0.0))
}

fn own_cpu_seconds(pid: u32) -> Option<f64> {
    let from_sched = std::fs::read_dir(format!("/proc/{pid}/task")).ok().and_then(|dir| {
        let mut ns = 0u64;
        let mut any = false;
        for t in dir.flatten() {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
            any = true;
        }
        any.then_some(ns as f64 / 1e9)
    });
    from_sched.or_else(|| stat_cpu_seconds(pid))
}

/// `utime + stime` of `/proc/<pid>/stat` in seconds (dead threads included, 1/CLK_TCK resolution).
pub fn stat_cpu_seconds(pid: u32) -> Option<f64> {
    stat_fields(pid, 11, 12)
}

/// The sum of two tick fields of `/proc/<pid>/stat` in seconds; indexes count from the state field (field 3),
/// so 11/12 are utime/stime and 13/14 cutime/cstime.
fn stat_fields(pid: u32, a: usize, b: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (x, y): (u64, u64) = (f.get(a)?.parse().ok()?, f.get(b)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((x + y) as f64 / tck)
}

/// Cores, kernel and CPU model of this machine, for the results.
pub fn machine_description() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib as f64 / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cores} cores ({model}), {mem_gib:.0} GiB RAM, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_are_distinct_and_in_range() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..MAX_BULK_SERVICES {
            let ip = bulk_vip(i).unwrap();
            let o = ip.octets();
            assert!(o[0] == 198 && (o[1] == 18 || o[1] == 19), "{ip}");
            if o[1] == 18 {
                assert!(o[2] >= 96, "{ip} would hit the underlay or a pod CIDR");
            } else {
                assert!(o[2] >= 1, "{ip} would hit the lab's own Services");
            }
            assert!(seen.insert(ip), "{ip} twice");
        }
        assert_eq!(bulk_vip(MAX_BULK_SERVICES), None);
    }

    #[test]
    fn statistics() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(&[]), None);
        assert_eq!(quantile_f(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.99), Some(5.0));
        assert!(expected_metrics("ebpf", true).contains(&"bpf_map_memory"));
        assert!(!expected_metrics("ebpf", true).contains(&"iptables_rules"));
        assert!(!expected_metrics("iptables", false).contains(&"bulk_ratio"));
        assert!(!expected_metrics("iptables", true).contains(&"conn_clusterip_failed"));
        assert!(expected_metrics("iptables", false).contains(&"np_udp_ratio"));
        assert!(!expected_metrics("ebpf", true).contains(&"np_udp_failed"));
        assert!(METRICS.iter().all(|d| metric_def(d.name).is_some()));
    }
}
