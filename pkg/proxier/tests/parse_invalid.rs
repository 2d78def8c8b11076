//! Malformed Services and EndpointSlices are rejected whole, with the object and field named; valid
//! neighbours are untouched.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use e2e::objects::{endpoint, service, slice_json as slice};
use proxier::model::IpFamily;
use proxier::parse::{parse_endpoint_slice, parse_service};
use proxier::tracker::{ChangeTracker, TrackerObserver, apply_checkout};
use serde_json::json;

#[test]
fn malformed_services_are_rejected_with_the_field_named() {
    let cases = [
        ("bad cluster IP", json!({"spec": {"clusterIP": "198.19.0.300", "clusterIPs": null}}), "spec.clusterIP"),
        ("bad clusterIPs entry", json!({"spec": {"clusterIPs": ["198.19.0.10", "nope"]}}), "spec.clusterIPs[1]"),
        ("port 0", json!({"spec": {"ports": [{"name": "a", "port": 0}]}}), "spec.ports[0].port"),
        ("port 70000", json!({"spec": {"ports": [{"name": "a", "port": 70000}]}}), "spec.ports[0].port"),
        ("negative port", json!({"spec": {"ports": [{"name": "a", "port": -5}]}}), "spec.ports[0].port"),
        (
            "unknown protocol",
            json!({"spec": {"ports": [{"name": "a", "port": 80, "protocol": "ICMP"}]}}),
            "spec.ports[0].protocol",
        ),
        (
            "lower-case protocol",
            json!({"spec": {"ports": [{"name": "a", "port": 80, "protocol": "tcp"}]}}),
            "spec.ports[0].protocol",
        ),
        (
            "duplicate port",
            json!({"spec": {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}}),
            "spec.ports[1].port",
        ),
        (
            "duplicate port name",
            json!({"spec": {"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}}),
            "spec.ports[1].name",
        ),
        (
            "unnamed port in a multi-port service",
            json!({"spec": {"ports": [{"name": "a", "port": 80}, {"port": 81}]}}),
            "spec.ports[1].name",
        ),
        ("no ports", json!({"spec": {"ports": []}}), "spec.ports"),
        ("missing ports", json!({"spec": {"ports": null}}), "spec.ports"),
        (
            "nodePort out of range",
            json!({"spec": {"type": "NodePort", "ports": [{"name": "a", "port": 80, "nodePort": 70000}]}}),
            "spec.ports[0].nodePort",
        ),
        ("bad external IP", json!({"spec": {"externalIPs": ["198.18.0.1", "x.y"]}}), "spec.externalIPs[1]"),
        (
            "bad source range",
            json!({"spec": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["198.18.0.0/33"]}}),
            "spec.loadBalancerSourceRanges[0]",
        ),
        (
            "bad LB ingress IP",
            json!({"status": {"loadBalancer": {"ingress": [{"ip": "1.2.3"}]}}}),
            "status.loadBalancer.ingress[0].ip",
        ),
        (
            "affinity timeout 0",
            json!({"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}}),
            "timeoutSeconds",
        ),
        (
            "affinity timeout too long",
            json!({"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}}}),
            "timeoutSeconds",
        ),
        ("unknown affinity", json!({"spec": {"sessionAffinity": "Cookie"}}), "spec.sessionAffinity"),
        ("unknown type", json!({"spec": {"type": "Magic"}}), "spec.type"),
    ];
    for (name, patch, field) in cases {
        let svc = service("ns", "bad", "198.19.0.10", patch);
        let err = parse_service(&svc).expect_err(name);
        assert_eq!(err.object, "ns/bad", "{name}");
        assert!(err.field.contains(field), "{name}: field {:?} should mention {field}", err.field);
    }
}

#[test]
fn services_that_are_not_proxied_parse_to_nothing() {
    for (name, patch) in [
        ("headless", json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}})),
        ("unallocated", json!({"spec": {"clusterIP": "", "clusterIPs": null}})),
        ("ExternalName", json!({"spec": {"type": "ExternalName", "externalName": "example.invalid"}})),
    ] {
        let p = parse_service(&service("ns", "s", "198.19.0.10", patch)).expect(name);
        assert!(p.v4.is_empty() && p.v6.is_empty(), "{name}");
    }
}

#[test]
fn malformed_endpoint_slices_are_rejected_with_the_field_named() {
    let ok = json!([endpoint("198.18.1.1", "node-a", true)]);
    let cases = [
        ("FQDN address type", ok.clone(), json!({"addressType": "FQDN"}), "addressType"),
        ("bad endpoint IP", json!([endpoint("198.18.1.999", "n", true)]), json!({}), "endpoints[0].addresses[0]"),
        (
            "IPv6 address in an IPv4 slice",
            json!([endpoint("2001:db8::1", "n", true)]),
            json!({}),
            "endpoints[0].addresses[0]",
        ),
        ("no address", json!([{"addresses": []}]), json!({}), "endpoints[0].addresses[0]"),
        ("port out of range", ok.clone(), json!({"ports": [{"name": "http", "port": 65536}]}), "ports[0].port"),
        ("missing port number", ok.clone(), json!({"ports": [{"name": "http"}]}), "ports[0].port"),
        (
            "unknown protocol",
            ok.clone(),
            json!({"ports": [{"name": "http", "port": 80, "protocol": "XTP"}]}),
            "ports[0].protocol",
        ),
        (
            "duplicate port",
            ok.clone(),
            json!({"ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]}),
            "ports[1].name",
        ),
        ("no service label", ok.clone(), json!({"metadata": {"labels": null}}), "kubernetes.io/service-name"),
    ];
    for (name, eps, patch, field) in cases {
        let s = slice("ns", "svc", "svc-abc", eps, patch);
        let err = parse_endpoint_slice(&s, "node-a").expect_err(name);
        assert_eq!(err.object, "ns/svc-abc", "{name}");
        assert!(err.field.contains(field), "{name}: field {:?} should mention {field}", err.field);
    }
}

#[derive(Default)]
struct CountInvalid(AtomicUsize);
impl TrackerObserver for CountInvalid {
    fn invalid_object(&self, _kind: &'static str) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_malformed_service_is_logged_once_skipped_and_does_not_disturb_others() {
    let observer = Arc::new(CountInvalid::default());
    let tracker = ChangeTracker::new("node-a", true, observer.clone());
    tracker.on_service(&service("ns", "good", "198.19.0.10", json!({})));
    tracker.on_endpoint_slice(&slice(
        "ns",
        "good",
        "good-1",
        json!([endpoint("198.18.1.1", "node-a", true)]),
        json!({}),
    ));
    let bad = service("ns", "bad", "198.19.0.11", json!({"spec": {"ports": [{"name": "a", "port": 99999}]}}));
    // The same bad object seen three times (informer resyncs) is logged and counted once.
    for _ in 0..3 {
        tracker.on_service(&bad);
    }
    tracker.on_endpoint_slice(&slice("ns", "bad", "bad-1", json!([endpoint("bogus", "n", true)]), json!({})));
    assert_eq!(observer.0.load(Ordering::SeqCst), 2);

    let mut snap = Default::default();
    let topo = tracker.topology(&Default::default());
    let changes = apply_checkout(&mut snap, tracker.checkout(true), &topo, true);
    let names: Vec<String> = snap.v4.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(names, ["ns/good:http"]);
    assert_eq!(snap.v4.services.values().next().unwrap().selected.cluster.len(), 1);
    assert!(changes.family(IpFamily::V4).services.iter().all(|s| s.name() == "good"));

    // A good Service turning bad disappears (nothing half-programmed); fixing it brings it back.
    tracker.on_service(&service("ns", "good", "198.19.0.10", json!({"spec": {"clusterIP": "x", "clusterIPs": null}})));
    let changes = apply_checkout(&mut snap, tracker.checkout(false), &topo, false);
    assert!(snap.v4.services.is_empty());
    assert_eq!(changes.v4.services.len(), 1);
    tracker.on_service(&service("ns", "good", "198.19.0.10", json!({})));
    apply_checkout(&mut snap, tracker.checkout(false), &topo, false);
    assert_eq!(snap.v4.services.len(), 1);
    assert_eq!(observer.0.load(Ordering::SeqCst), 3);
}
