//! Builders for Kubernetes objects used by the tests, from JSON so each test reads like a manifest.
#![allow(dead_code)]

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

/// A ClusterIP Service `ns/name` with `clusterIP` and one TCP port 80 named "http", then `patch` merged in.
pub fn service(ns: &str, name: &str, cluster_ip: &str, patch: Value) -> Service {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    });
    merge(&mut v, patch);
    serde_json::from_value(v).expect("service fixture")
}

/// An EndpointSlice `slice` of Service `svc` with port "http" 8080 and the given endpoints, then `patch` merged in.
pub fn slice(ns: &str, svc: &str, slice: &str, endpoints: Value, patch: Value) -> EndpointSlice {
    let mut v = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": slice, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    });
    merge(&mut v, patch);
    serde_json::from_value(v).expect("slice fixture")
}

/// One slice endpoint.
pub fn endpoint(ip: &str, node: &str, ready: bool) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": ready, "serving": ready, "terminating": false}})
}

/// A Node with a zone label and an InternalIP.
pub fn node(name: &str, zone: Option<&str>, ip: &str) -> Node {
    let mut labels = serde_json::Map::new();
    if let Some(z) = zone {
        labels.insert("topology.kubernetes.io/zone".into(), json!(z));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    }))
    .expect("node fixture")
}

/// JSON merge patch (RFC 7386): objects merge, `null` deletes, anything else replaces.
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
