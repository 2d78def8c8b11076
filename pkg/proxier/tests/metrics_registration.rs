//! Metric names, types, labels, buckets and help texts per proxy mode, as seen in the text exposition.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use proxier::metrics::{CONTENT_TYPE, FnCounter, IptablesTable, Metrics, ObjectKind, TrafficPolicy};
use proxier::model::IpFamily;

/// One metric family as parsed from the exposition.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    /// Label names of the samples (without `le`).
    labels: BTreeSet<String>,
    /// `le` values of the first series' buckets, in order.
    buckets: Vec<String>,
    samples: Vec<(String, String)>,
    /// The first series' `_sum` was seen: its buckets are complete.
    buckets_done: bool,
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    // Label values here never contain `,` or `"` escapes, except build info, which has no commas either.
    s.split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once("=\"").unwrap();
            (k.to_string(), v.trim_end_matches('"').to_string())
        })
        .collect()
}

fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            fams.entry(name.to_string()).or_default().help = help.to_string();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            fams.entry(name.to_string()).or_default().kind = kind.to_string();
        } else if !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| fams.get(*b).is_some_and(|f| f.kind == "histogram")))
                .unwrap_or(name);
            let fam = fams.get_mut(base).unwrap_or_else(|| panic!("sample before TYPE: {line}"));
            for (k, v) in &labels {
                if k == "le" {
                    if !fam.buckets_done {
                        fam.buckets.push(v.clone());
                    }
                } else {
                    fam.labels.insert(k.clone());
                }
            }
            fam.buckets_done |= name.ends_with("_sum");
            fam.samples.push((series.to_string(), value.to_string()));
        }
    }
    fams
}

/// Updates every metric once, for IPv4 (and a few for IPv6).
fn touch_all(m: &Metrics) {
    use IpFamily::{V4, V6};
    m.observe_sync(V4, Duration::from_millis(5), Some(true));
    m.observe_sync(V6, Duration::from_millis(5), Some(false));
    m.set_last_sync_timestamp(V4);
    m.set_last_queued_timestamp(V4);
    m.observe_network_programming(V4, 1.5);
    m.observe_network_programming_since(V6, SystemTime::now() - Duration::from_secs(2));
    m.inc_service_changes();
    m.service_changes_total.inc();
    m.set_service_changes_pending(3);
    m.inc_endpoint_changes();
    m.set_endpoint_changes_pending(4);
    m.set_no_local_endpoints(TrafficPolicy::Internal, V4, 1);
    m.set_no_local_endpoints(TrafficPolicy::External, V4, 2);
    m.inc_invalid_object(ObjectKind::Service);
    m.inc_invalid_object(ObjectKind::EndpointSlice);
    m.inc_proxy_healthz(200);
    m.inc_proxy_livez(503);
    m.inc_iptables_restore_failure(V4);
    m.inc_iptables_partial_restore_failure(V4);
    m.set_iptables_rules_total(IptablesTable::Nat, V4, 10);
    m.set_iptables_rules_total(IptablesTable::Filter, V4, 5);
    m.set_iptables_rules_last(IptablesTable::Nat, V4, 7);
    m.inc_nftables_sync_failure(V4);
    m.inc_nftables_cleanup_failure(V4);
    m.observe_conntrack_reconcile(V4, Duration::from_millis(3));
    m.add_conntrack_deleted_entries(V4, 9);
}

const IP: &[&str] = &["ip_family"];

/// (name, type, labels, help without the `[ALPHA] ` prefix)
type Spec = (&'static str, &'static str, &'static [&'static str], &'static str);

const COMMON: &[Spec] = &[
    ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram", IP, "SyncProxyRules latency in seconds"),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        IP,
        "The last time proxy rules were successfully synced",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        IP,
        "The last time a sync of proxy rules was queued",
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        IP,
        "In Cluster Network Programming Latency in seconds",
    ),
    ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge", &[], "Pending proxy rules Endpoint changes"),
    ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "counter", &[], "Cumulative proxy rules Endpoint changes"),
    ("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge", &[], "Pending proxy rules Service changes"),
    ("kubeproxy_sync_proxy_rules_service_changes_total", "counter", &[], "Cumulative proxy rules Service changes"),
    ("kubeproxy_proxy_healthz_total", "counter", &["code"], "Cumulative proxy healthz HTTP status"),
    ("kubeproxy_proxy_livez_total", "counter", &["code"], "Cumulative proxy livez HTTP status"),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        &["ip_family", "traffic_policy"],
        "Number of services with a Local traffic policy and no endpoints",
    ),
    (
        "kubeproxy_invalid_objects_total",
        "counter",
        &["kind"],
        "Services and EndpointSlices skipped because they are malformed (kube-proxy-rs)",
    ),
];

const FULL_PARTIAL: &[Spec] = &[
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        IP,
        "SyncProxyRules latency in seconds for full resyncs",
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        IP,
        "SyncProxyRules latency in seconds for partial resyncs",
    ),
];

const RESTORE: &[Spec] = &[(
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "counter",
    IP,
    "Cumulative proxy iptables restore failures",
)];

const IPTABLES_ONLY: &[Spec] = &[
    (
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
        "counter",
        IP,
        "Cumulative proxy iptables partial restore failures",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_total",
        "gauge",
        &["ip_family", "table"],
        "Total number of iptables rules owned by kube-proxy",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_last",
        "gauge",
        &["ip_family", "table"],
        "Number of iptables rules written by kube-proxy in last sync",
    ),
];

const NFTABLES: &[Spec] = &[
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "counter",
        IP,
        "Cumulative proxy nftables sync failures",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "counter",
        IP,
        "Cumulative proxy nftables cleanup failures",
    ),
];

const CONNTRACK: &[Spec] = &[
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
        IP,
        "ReconcileConntrackFlowsLatency latency in seconds",
    ),
    (
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "counter",
        IP,
        "Cumulative conntrack flows deleted by conntrack reconciler",
    ),
];

fn sync_buckets() -> Vec<String> {
    let mut v: Vec<String> = [
        "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256", "0.512", "1.024", "2.048",
        "4.096", "8.192", "16.384",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("+Inf".into());
    v
}

fn network_programming_buckets() -> Vec<String> {
    let mut v: Vec<String> = vec!["0".into(), "0.25".into(), "0.5".into()];
    v.extend((1..=59).map(|i| i.to_string()));
    v.extend((60..=115).step_by(5).map(|i| i.to_string()));
    v.extend((120..=300).step_by(30).map(|i| i.to_string()));
    v.push("+Inf".into());
    v
}

#[test]
fn registration_per_mode() {
    let modes: &[(&str, &[&[Spec]])] = &[
        ("iptables", &[COMMON, FULL_PARTIAL, RESTORE, IPTABLES_ONLY, CONNTRACK]),
        ("ipvs", &[COMMON, RESTORE, CONNTRACK]),
        ("nftables", &[COMMON, FULL_PARTIAL, NFTABLES, CONNTRACK]),
        ("ebpf", &[COMMON, FULL_PARTIAL]),
        ("kernelspace", &[COMMON]),
    ];
    for (mode, groups) in modes {
        let m = Metrics::new(mode);
        assert_eq!(m.mode(), *mode);
        touch_all(&m);
        let fams = parse(&m.encode());
        let want: BTreeMap<&str, &Spec> = groups.iter().flat_map(|g| g.iter()).map(|s| (s.0, s)).collect();
        let got: BTreeSet<&str> = fams.keys().map(String::as_str).filter(|n| n.starts_with("kubeproxy_")).collect();
        assert_eq!(got, want.keys().copied().collect::<BTreeSet<_>>(), "mode {mode}");

        for (name, kind, labels, help) in want.values() {
            let f = &fams[*name];
            assert_eq!(f.kind, *kind, "{mode} {name}");
            assert_eq!(f.help, format!("[ALPHA] {help}"), "{mode} {name}");
            let labels: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
            assert_eq!(f.labels, labels, "{mode} {name}");
            if *kind == "histogram" {
                let want_buckets =
                    if name.contains("network_programming") { network_programming_buckets() } else { sync_buckets() };
                assert_eq!(f.buckets, want_buckets, "{mode} {name}");
            }
        }

        // Process metrics and build info are there in every mode.
        for name in ["process_cpu_seconds_total", "process_start_time_seconds", "process_resident_memory_bytes"] {
            assert!(fams.contains_key(name), "{mode}: {name}");
        }
        let info = &fams["kubernetes_build_info"];
        assert_eq!(info.kind, "gauge");
        assert!(info.help.starts_with("[ALPHA] A metric with a constant '1' value"));
        let want_labels = [
            "build_date",
            "compiler",
            "git_commit",
            "git_tree_state",
            "git_version",
            "go_version",
            "major",
            "minor",
            "platform",
        ];
        assert_eq!(info.labels, want_labels.iter().map(|s| s.to_string()).collect());
        assert_eq!(info.samples[0].1, "1");
    }
}

#[test]
fn values_and_label_values() {
    let m = Metrics::new("iptables");
    touch_all(&m);
    let text = m.encode();
    let has = |line: &str| assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    has(r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1"#);
    has(r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv6"} 1"#);
    has(r#"kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1"#);
    has(r#"kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family="IPv6"} 1"#);
    has(r#"kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.004"} 0"#);
    has(r#"kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.008"} 1"#);
    has(r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="1"} 0"#);
    has(r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="2"} 1"#);
    has(r#"kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv6",le="3"} 1"#);
    has("kubeproxy_sync_proxy_rules_service_changes_total 2");
    has("kubeproxy_sync_proxy_rules_service_changes_pending 3");
    has("kubeproxy_sync_proxy_rules_endpoint_changes_total 1");
    has("kubeproxy_sync_proxy_rules_endpoint_changes_pending 4");
    has(r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="internal"} 1"#);
    has(r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"} 2"#);
    has(r#"kubeproxy_invalid_objects_total{kind="Service"} 1"#);
    has(r#"kubeproxy_invalid_objects_total{kind="EndpointSlice"} 1"#);
    has(r#"kubeproxy_proxy_healthz_total{code="200"} 1"#);
    has(r#"kubeproxy_proxy_livez_total{code="503"} 1"#);
    has(r#"kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"} 1"#);
    has(r#"kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family="IPv4"} 1"#);
    has(r#"kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 10"#);
    has(r#"kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="filter"} 5"#);
    has(r#"kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="nat"} 7"#);
    has(r#"kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family="IPv4"} 1"#);
    has(r#"kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} 9"#);

    let ts = |name: &str| -> f64 {
        let prefix = format!("{name}{{ip_family=\"IPv4\"}} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap().parse().unwrap()
    };
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    for name in [
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    ] {
        let v = ts(name);
        assert!((now - 60.0..=now + 1.0).contains(&v), "{name} = {v}");
    }
}

#[test]
fn labelled_metrics_appear_only_once_used() {
    let m = Metrics::new("iptables");
    let fams = parse(&m.encode());
    // Like upstream, a vector without series is not exposed at all; plain gauges and counters start at 0.
    assert!(!fams.contains_key("kubeproxy_proxy_healthz_total"));
    assert!(!fams.contains_key("kubeproxy_sync_proxy_rules_duration_seconds"));
    assert_eq!(fams["kubeproxy_sync_proxy_rules_service_changes_total"].samples[0].1, "0");
    assert_eq!(fams["kubeproxy_sync_proxy_rules_endpoint_changes_pending"].samples[0].1, "0");
}

#[test]
fn exposition_format() {
    assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    let m = Metrics::new("ebpf");
    let text = m.encode();
    let lines: Vec<&str> = text.lines().collect();
    let i = lines
        .iter()
        .position(|l| *l == "# HELP kubeproxy_sync_proxy_rules_service_changes_total [ALPHA] Cumulative proxy rules Service changes")
        .expect("help line");
    assert_eq!(lines[i + 1], "# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter");
    assert_eq!(lines[i + 2], "kubeproxy_sync_proxy_rules_service_changes_total 0");
    // Families come sorted by name, as Go's registry sorts them.
    let names: Vec<&str> =
        lines.iter().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

#[test]
fn fn_counters_for_nfacct() {
    let m = Metrics::new("iptables");
    let value = Arc::new(AtomicU64::new(42));
    let v = value.clone();
    m.registry()
        .register(Box::new(FnCounter::iptables_ct_state_invalid_dropped(move || Some(v.load(Ordering::SeqCst)))))
        .unwrap();
    // nfacct unavailable: nothing is exported.
    m.registry().register(Box::new(FnCounter::iptables_localhost_nodeports_accepted(|| None))).unwrap();

    let fams = parse(&m.encode());
    let f = &fams["kubeproxy_iptables_ct_state_invalid_dropped_packets_total"];
    assert_eq!(f.kind, "counter");
    assert_eq!(f.help, "[ALPHA] packets dropped by iptables to work around conntrack problems");
    assert_eq!(f.samples, vec![("kubeproxy_iptables_ct_state_invalid_dropped_packets_total".to_string(), "42".into())]);
    assert!(!fams.contains_key("kubeproxy_iptables_localhost_nodeports_accepted_packets_total"));

    value.store(43, Ordering::SeqCst);
    assert!(m.encode().lines().any(|l| l == "kubeproxy_iptables_ct_state_invalid_dropped_packets_total 43"));
}
