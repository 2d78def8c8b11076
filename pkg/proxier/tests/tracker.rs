//! The change tracker reports exactly the Service ports that changed, merges slices like upstream and
//! recomputes selection when the node's topology changes.

use std::collections::BTreeSet;
use std::sync::Arc;

use e2e::objects::{endpoint, node_in_zone as node, service, slice_json as slice};
use proxier::model::{Changes, IpFamily, Snapshot};
use proxier::tracker::{ChangeTracker, NoopObserver, apply_checkout};
use serde_json::json;

struct Harness {
    tracker: ChangeTracker,
    snap: Snapshot,
}

impl Harness {
    fn new() -> Self {
        Harness { tracker: ChangeTracker::new("node-a", true, Arc::new(NoopObserver)), snap: Snapshot::default() }
    }

    fn sync(&mut self, full: bool) -> Changes {
        let checkout = self.tracker.checkout(full);
        let topo = self.tracker.topology(&checkout.node);
        apply_checkout(&mut self.snap, checkout, &topo, full)
    }

    fn changed(&mut self) -> BTreeSet<String> {
        let c = self.sync(false);
        c.v4.services.iter().chain(c.v6.services.iter()).map(|s| format!("{s}/{}", s.protocol)).collect()
    }

    fn reachable(&self, spn: &str) -> Vec<String> {
        let st = self.snap.v4.services.iter().find(|(k, _)| k.to_string() == spn).expect(spn).1;
        st.selected.all_reachable.iter().map(|e| e.addr_string()).collect()
    }
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn only_changed_service_ports_are_reported() {
    let mut h = Harness::new();
    h.tracker.on_service(&service("ns", "a", "198.19.0.1", json!({})));
    h.tracker.on_service(&service("ns", "b", "198.19.0.2", json!({})));
    h.tracker.on_endpoint_slice(&slice("ns", "a", "a-1", json!([endpoint("198.18.1.1", "node-a", true)]), json!({})));
    assert_eq!(h.sync(true).v4.services.len(), 2);

    // One endpoint of a changes: only a's port.
    h.tracker.on_endpoint_slice(&slice(
        "ns",
        "a",
        "a-1",
        json!([endpoint("198.18.1.1", "node-a", true), endpoint("198.18.1.2", "node-b", true)]),
        json!({}),
    ));
    assert_eq!(h.changed(), set(&["ns/a:http/TCP"]));
    assert_eq!(h.reachable("ns/a:http"), ["198.18.1.1:8080", "198.18.1.2:8080"]);

    // Adding a port to b reports only the new port; the old one is unchanged.
    h.tracker.on_service(&service(
        "ns",
        "b",
        "198.19.0.2",
        json!({"spec": {"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    ));
    let c = h.sync(false);
    assert_eq!(c.v4.services.iter().map(|s| s.to_string()).collect::<Vec<_>>(), ["ns/b:dns"]);
    assert!(c.v4.conntrack_cleanup_required, "a UDP port changed");

    // Deleting a Service reports all its ports and removes them from the snapshot.
    h.tracker.on_service_delete("ns", "b");
    assert_eq!(h.changed(), set(&["ns/b:http/TCP", "ns/b:dns/UDP"]));
    assert!(h.snap.v4.services.keys().all(|k| k.name() == "a"));
    assert!(h.changed().is_empty());
}

#[test]
fn no_op_updates_and_reverted_changes_leave_nothing_pending() {
    let mut h = Harness::new();
    let svc = service("ns", "a", "198.19.0.1", json!({}));
    h.tracker.on_service(&svc);
    h.tracker.services_synced();
    h.tracker.endpoint_slices_synced();
    h.tracker.node_synced();
    h.sync(true);
    assert!(!h.tracker.has_pending());

    // A resync delivering the same object, or a change to a field the proxy ignores, is a no-op.
    h.tracker.on_service(&svc);
    h.tracker.on_service(&service("ns", "a", "198.19.0.1", json!({"metadata": {"labels": {"team": "x"}}})));
    assert!(h.changed().is_empty());

    // Changed and changed back before the sync: nothing to do.
    h.tracker.on_service(&service("ns", "a", "198.19.0.1", json!({"spec": {"sessionAffinity": "ClientIP"}})));
    h.tracker.on_service(&svc);
    assert!(h.changed().is_empty());
}

#[test]
fn slices_merge_per_port_name_and_duplicates_collapse_with_local_winning() {
    let mut h = Harness::new();
    h.tracker.on_service(&service(
        "ns",
        "m",
        "198.19.0.3",
        json!({"spec": {"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 81}]}}),
    ));
    // Two slices for the same port with an overlapping endpoint: remote in one, local in the other.
    h.tracker.on_endpoint_slice(&slice(
        "ns",
        "m",
        "m-1",
        json!([endpoint("198.18.1.10", "node-b", true), endpoint("198.18.1.2", "node-b", true)]),
        json!({}),
    ));
    h.tracker.on_endpoint_slice(&slice("ns", "m", "m-2", json!([endpoint("198.18.1.10", "node-a", true)]), json!({})));
    // The second port lives in a third slice (conformance: ports split across slices).
    h.tracker.on_endpoint_slice(&slice(
        "ns",
        "m",
        "m-3",
        json!([endpoint("198.18.1.7", "node-c", true)]),
        json!({"ports": [{"name": "admin", "port": 9090}]}),
    ));
    h.sync(true);
    // Sorted by the "ip:port" string, as upstream sorts.
    assert_eq!(h.reachable("ns/m:http"), ["198.18.1.10:8080", "198.18.1.2:8080"]);
    let http = h.snap.v4.services.iter().find(|(k, _)| k.port() == "http").unwrap().1;
    assert!(http.endpoints.iter().find(|e| e.ip.to_string() == "198.18.1.10").unwrap().is_local);
    assert_eq!(h.reachable("ns/m:admin"), ["198.18.1.7:9090"]);

    // Deleting one slice changes only the port it carried.
    h.tracker.on_endpoint_slice_delete("ns", "m-3");
    assert_eq!(h.changed(), set(&["ns/m:admin/TCP"]));
    assert!(h.reachable("ns/m:admin").is_empty());
}

#[test]
fn endpoints_before_their_service_and_dual_stack() {
    let mut h = Harness::new();
    h.tracker.on_endpoint_slice(&slice("ns", "d", "d-4", json!([endpoint("198.18.1.1", "node-a", true)]), json!({})));
    h.tracker.on_endpoint_slice(&slice(
        "ns",
        "d",
        "d-6",
        json!([endpoint("2001:db8::1:1", "node-a", true)]),
        json!({"addressType": "IPv6"}),
    ));
    let c = h.sync(false);
    assert!(h.snap.v4.services.is_empty() && h.snap.v6.services.is_empty());
    assert!(c.v4.services.is_empty() || c.v4.services.iter().all(|s| !h.snap.v4.services.contains_key(s)));

    h.tracker.on_service(&service(
        "ns",
        "d",
        "198.19.0.4",
        json!({"spec": {"clusterIPs": ["198.19.0.4", "2001:db8:19::4"], "ipFamilies": ["IPv4", "IPv6"]}}),
    ));
    let c = h.sync(false);
    assert_eq!(c.family(IpFamily::V4).services.len(), 1);
    assert_eq!(c.family(IpFamily::V6).services.len(), 1);
    let v6 = h.snap.v6.services.values().next().unwrap();
    assert_eq!(v6.info.cluster_ip.to_string(), "2001:db8:19::4");
    assert_eq!(v6.selected.cluster[0].addr_string(), "[2001:db8::1:1]:8080");
}

#[test]
fn node_zone_change_recomputes_topology_for_every_port() {
    let mut h = Harness::new();
    h.tracker.on_node(&node("node-a", Some("zone-a"), "198.18.0.1"));
    h.tracker.on_service(&service("ns", "t", "198.19.0.5", json!({})));
    let hinted = |ip: &str, zone: &str| {
        json!({"addresses": [ip], "nodeName": "node-x", "conditions": {"ready": true},
               "hints": {"forZones": [{"name": zone}]}})
    };
    h.tracker.on_endpoint_slice(&slice(
        "ns",
        "t",
        "t-1",
        json!([hinted("198.18.1.1", "zone-a"), hinted("198.18.1.2", "zone-b")]),
        json!({}),
    ));
    h.sync(true);
    assert_eq!(h.reachable("ns/t:http"), ["198.18.1.1:8080"]);
    assert_eq!(h.snap.node.zone.as_deref(), Some("zone-a"));

    h.tracker.on_node(&node("node-a", Some("zone-b"), "198.18.0.1"));
    let c = h.sync(false);
    assert!(c.full, "a topology change is a full sync");
    assert_eq!(h.reachable("ns/t:http"), ["198.18.1.2:8080"]);
}

#[test]
fn health_check_node_port_counts_distinct_local_ready_ips() {
    let mut h = Harness::new();
    h.tracker.on_service(&service(
        "ns",
        "lb",
        "198.19.0.6",
        json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                        "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "https", "port": 443, "nodePort": 30443}]}}),
    ));
    let eps = json!([
        endpoint("198.18.1.1", "node-a", true),
        endpoint("198.18.1.2", "node-a", false),
        endpoint("198.18.1.3", "node-b", true)
    ]);
    h.tracker.on_endpoint_slice(&slice(
        "ns",
        "lb",
        "lb-1",
        eps,
        json!({"ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]}),
    ));
    h.sync(true);
    let hc = h.snap.v4.health_checks.values().next().expect("health check entry");
    assert_eq!((hc.port, hc.local_endpoints), (32000, 1), "one local ready IP across both ports");
    let http = h.snap.v4.services.iter().find(|(k, _)| k.port() == "http").unwrap().1;
    assert_eq!(http.selected.local.len(), 1);
    assert_eq!(http.selected.cluster.len(), 2);

    // Switching to Cluster policy removes the health check.
    h.tracker.on_service(&service(
        "ns",
        "lb",
        "198.19.0.6",
        json!({"spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "https", "port": 443, "nodePort": 30443}]}}),
    ));
    h.sync(false);
    assert!(h.snap.v4.health_checks.is_empty());
}

#[test]
fn trigger_times_are_collected_from_changed_slices() {
    let mut h = Harness::new();
    h.tracker.on_service(&service("ns", "a", "198.19.0.1", json!({})));
    h.tracker.on_endpoint_slice(&slice(
        "ns",
        "a",
        "a-1",
        json!([endpoint("198.18.1.1", "node-a", true)]),
        json!({"metadata": {"annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-23T06:00:00Z"}}}),
    ));
    let c = h.sync(false);
    assert_eq!(c.v4.trigger_times.len(), 1);
}
