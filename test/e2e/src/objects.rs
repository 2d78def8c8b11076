//! Kubernetes objects for the suites, built from JSON so they read like manifests.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

/// A ClusterIP Service with one TCP port 80 named `http`, then `patch` merged in (RFC 7386).
pub fn service(ns: &str, name: &str, cluster_ip: &str, patch: Value) -> Service {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    });
    merge(&mut v, patch);
    serde_json::from_value(v).expect("service")
}

/// An EndpointSlice for Service `svc` with port `http` 8080 and one ready endpoint per `(ip, node)`.
pub fn slice(ns: &str, svc: &str, name: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let eps: Vec<Value> = endpoints.iter().map(|(ip, node)| endpoint(ip, node, true)).collect();
    slice_json(ns, svc, name, Value::Array(eps), json!({}))
}

/// An EndpointSlice for Service `svc` with port `http` 8080, the given endpoint objects, then `patch` merged in.
pub fn slice_json(ns: &str, svc: &str, name: &str, endpoints: Value, patch: Value) -> EndpointSlice {
    let mut v = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    });
    merge(&mut v, patch);
    serde_json::from_value(v).expect("slice")
}

/// One slice endpoint on `node`, ready (and serving) or not.
pub fn endpoint(ip: &str, node: &str, ready: bool) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": ready, "serving": ready, "terminating": false}})
}

/// A Node in zone `zone-a` with an InternalIP.
pub fn node(name: &str, ip: &str) -> Node {
    node_in_zone(name, Some("zone-a"), ip)
}

/// A Node with an optional zone label and an InternalIP.
pub fn node_in_zone(name: &str, zone: Option<&str>, ip: &str) -> Node {
    let labels = match zone {
        Some(z) => json!({"topology.kubernetes.io/zone": z}),
        None => json!({}),
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    }))
    .expect("node")
}

/// JSON merge patch: objects merge, `null` deletes, anything else replaces.
pub fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}
