//! The no-local-endpoints gauge follows each sync's changes, as upstream's does after every sync.

use std::sync::Arc;
use std::time::Duration;

use e2e::metric_value;
use e2e::objects::{endpoint, service, slice_json};
use proxier::backend::SyncReport;
use proxier::healthcheck::ProxyHealth;
use proxier::metrics::Metrics;
use proxier::model::{IpFamily, Snapshot};
use proxier::observe::ProxyObserver;
use proxier::runner::SyncObserver;
use proxier::tracker::{ChangeTracker, NoopObserver, apply_checkout};
use serde_json::json;

#[test]
fn no_local_endpoints_gauge_tracks_partial_syncs() {
    let metrics = Metrics::new("ebpf");
    let health = Arc::new(ProxyHealth::new(&[IpFamily::V4], Duration::from_secs(30)));
    let observer = ProxyObserver::new(metrics.clone(), health, None, vec![IpFamily::V4]);
    let tracker = ChangeTracker::new("node-a", true, Arc::new(NoopObserver));
    let mut snap = Snapshot::default();
    let mut sync = |full: bool| {
        let checkout = tracker.checkout(full);
        let topo = tracker.topology(&checkout.node);
        let changes = apply_checkout(&mut snap, checkout, &topo, full);
        observer.synced(&[IpFamily::V4], Duration::ZERO, &SyncReport::default(), &snap, &changes);
        let m = metrics.encode();
        let get =
            |p: &str| metric_value(&m, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", &[("traffic_policy", p)]);
        (get("internal").unwrap_or(-1.0), get("external").unwrap_or(-1.0))
    };

    // Two ITP Local services whose only endpoint is on another node: both drop internal traffic here.
    for name in ["a", "b"] {
        tracker.on_service(&service("ns", name, "198.19.0.1", json!({"spec": {"internalTrafficPolicy": "Local"}})));
        tracker.on_endpoint_slice(&slice_json(
            "ns",
            name,
            name,
            json!([endpoint("198.18.1.1", "node-b", true)]),
            json!({}),
        ));
    }
    assert_eq!(sync(true), (2.0, 0.0));
    // A local endpoint for one of them, seen through a partial sync.
    tracker.on_endpoint_slice(&slice_json("ns", "a", "a", json!([endpoint("198.18.1.2", "node-a", true)]), json!({})));
    assert_eq!(sync(false), (1.0, 0.0));
    // The other one deleted: nothing left to drop.
    tracker.on_service_delete("ns", "b");
    assert_eq!(sync(false), (0.0, 0.0));
}
