//! The wire protocol checked with a raw HTTP/1.1 client, and the `test-apiserver` binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use test_apiserver::{ApiServer, Config};

const JSON: &str = "application/json";

fn svc_json(ns: &str, name: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "10.9.0.1", "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .unwrap()
}

#[tokio::test]
async fn discovery_and_health() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.addr();
    for path in ["/healthz", "/livez", "/readyz"] {
        let r = get(addr, path).await;
        assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()), "{path}");
    }
    assert_eq!(get(addr, "/version").await.json()["major"], "1");
    assert_eq!(get(addr, "/api").await.json()["versions"], json!(["v1"]));
    let groups = get(addr, "/apis").await.json();
    assert!(groups["groups"].as_array().unwrap().iter().any(|g| g["name"] == "discovery.k8s.io"));
    let core = get(addr, "/api/v1").await.json();
    let services = core["resources"].as_array().unwrap().iter().find(|r| r["name"] == "services").unwrap().clone();
    assert_eq!((services["kind"].clone(), services["namespaced"].clone()), (json!("Service"), json!(true)));
    let nodes = core["resources"].as_array().unwrap().iter().find(|r| r["name"] == "nodes").unwrap().clone();
    assert_eq!(nodes["namespaced"], false);
    let missing = get(addr, "/apis/nope/v1/things").await;
    assert_eq!((missing.status, missing.json()["kind"].clone()), (404, json!("Status")));
}

#[tokio::test]
async fn crud_status_codes() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.addr();
    let base = "/api/v1/namespaces/default/services";
    let created = http(addr, "POST", base, JSON, &svc_json("default", "a")).await;
    assert_eq!(created.status, 201);
    let obj = created.json();
    assert_eq!(obj["metadata"]["resourceVersion"], "1");
    assert_eq!(obj["metadata"]["generation"], 1);
    let dup = http(addr, "POST", base, JSON, &svc_json("default", "a")).await;
    assert_eq!(dup.status, 409);
    let status = dup.json();
    assert_eq!(
        (status["kind"].clone(), status["reason"].clone(), status["code"].clone()),
        (json!("Status"), json!("AlreadyExists"), json!(409))
    );
    assert_eq!(status["details"], json!({"name": "a", "kind": "services"}));
    // Body namespace disagreeing with the URL.
    assert_eq!(http(addr, "POST", base, JSON, &svc_json("other", "b")).await.status, 400);
    // Malformed JSON.
    assert_eq!(http(addr, "POST", base, JSON, b"{nope").await.status, 400);

    let missing = get(addr, &format!("{base}/zzz")).await;
    assert_eq!((missing.status, missing.json()["reason"].clone()), (404, json!("NotFound")));
    assert_eq!(http(addr, "PUT", &format!("{base}/zzz"), JSON, &svc_json("default", "zzz")).await.status, 404);

    let mut stale = obj.clone();
    stale["metadata"]["resourceVersion"] = json!("999");
    let conflict = http(addr, "PUT", &format!("{base}/a"), JSON, &serde_json::to_vec(&stale).unwrap()).await;
    assert_eq!((conflict.status, conflict.json()["reason"].clone()), (409, json!("Conflict")));
    let mut fresh = obj.clone();
    fresh["spec"]["clusterIP"] = json!("10.9.0.2");
    let updated = http(addr, "PUT", &format!("{base}/a"), JSON, &serde_json::to_vec(&fresh).unwrap()).await;
    assert_eq!(updated.status, 200);
    assert_eq!(updated.json()["metadata"]["generation"], 2);
    assert_eq!(updated.json()["metadata"]["uid"], obj["metadata"]["uid"]);

    // Lists carry the list kind and the current revision.
    let list = get(addr, "/api/v1/services").await.json();
    assert_eq!((list["kind"].clone(), list["apiVersion"].clone()), (json!("ServiceList"), json!("v1")));
    assert_eq!(list["metadata"]["resourceVersion"], server.resource_version().to_string());
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    let deleted = http(addr, "DELETE", &format!("{base}/a"), JSON, b"").await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.json()["metadata"]["resourceVersion"], server.resource_version().to_string());
    assert_eq!(http(addr, "DELETE", &format!("{base}/a"), JSON, b"").await.status, 404);
    // Namespaced objects cannot be addressed without their namespace; writes to all-namespaces are refused.
    assert_eq!(get(addr, "/api/v1/services/a").await.status, 404);
    assert_eq!(http(addr, "POST", "/api/v1/services", JSON, &svc_json("default", "c")).await.status, 405);
}

#[tokio::test]
async fn events_can_be_posted_and_patched() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.addr();
    let event = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"generateName": "kube-proxy-", "namespace": "default"},
        "reason": "Starting", "note": "Starting kube-proxy", "action": "StartKubeProxy",
        "reportingController": "kube-proxy", "reportingInstance": "kube-proxy-node-a",
        "eventTime": "2025-01-01T00:00:00.000000Z", "type": "Normal"
    });
    let path = "/apis/events.k8s.io/v1/namespaces/default/events";
    let created = http(addr, "POST", path, JSON, &serde_json::to_vec(&event).unwrap()).await;
    assert_eq!(created.status, 201);
    let name = created.json()["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("kube-proxy-") && name.len() == "kube-proxy-".len() + 5, "{name}");

    let patch = serde_json::to_vec(&json!({"series": {"count": 2, "lastObservedTime": "2025-01-01T00:01:00.000000Z"}}))
        .unwrap();
    let patched = http(addr, "PATCH", &format!("{path}/{name}"), "application/merge-patch+json", &patch).await;
    assert_eq!(patched.status, 200);
    assert_eq!(patched.json()["series"]["count"], 2);
    assert_eq!(patched.json()["note"], "Starting kube-proxy");
    let core = "/api/v1/namespaces/default/events";
    let core_event = json!({"metadata": {"name": "e1"}, "reason": "Started", "count": 1});
    assert_eq!(http(addr, "POST", core, JSON, &serde_json::to_vec(&core_event).unwrap()).await.status, 201);
    let smp =
        http(addr, "PATCH", &format!("{core}/e1"), "application/strategic-merge-patch+json", br#"{"count":2}"#).await;
    assert_eq!((smp.status, smp.json()["count"].clone()), (200, json!(2)));
    let jsonpatch = http(addr, "PATCH", &format!("{core}/e1"), "application/json-patch+json", b"[]").await;
    assert_eq!(jsonpatch.status, 415);
    assert_eq!(http(addr, "PATCH", &format!("{core}/nope"), "application/merge-patch+json", b"{}").await.status, 404);
}

#[tokio::test]
async fn bulk_load_and_selectors_over_http() {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.addr();
    let items = json!([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web", "tier": "fe"}},
         "spec": {"clusterIP": "10.0.0.1"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "x", "labels": {"app": "db"}},
         "spec": {"clusterIP": "None"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c", "namespace": "y"}, "spec": {}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4", "endpoints": [],
         "metadata": {"name": "a-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "a"}}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}},
    ]);
    let r = http(addr, "POST", "/bulk", JSON, &serde_json::to_vec(&items).unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"count": 5, "resourceVersion": "5"}));
    assert_eq!(server.list::<EndpointSlice>().unwrap().len(), 1);
    assert!(server.get::<Node>("", "node-a").unwrap().is_some());
    let unknown = json!([{"apiVersion": "v9", "kind": "Nope", "metadata": {"name": "n"}}]);
    assert_eq!(http(addr, "POST", "/bulk", JSON, &serde_json::to_vec(&unknown).unwrap()).await.status, 400);

    let names = |v: Value| -> Vec<String> {
        v["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()).collect()
    };
    let q = |sel: &str| format!("/api/v1/services?{sel}");
    let cases: &[(&str, &[&str])] = &[
        ("labelSelector=app", &["a", "b"]),
        ("labelSelector=%21app", &["c"]),
        ("labelSelector=app%3Dweb", &["a"]),
        ("labelSelector=app%3D%3Dweb", &["a"]),
        ("labelSelector=app%21%3Dweb", &["b", "c"]),
        ("labelSelector=app+in+%28db%2Cweb%29", &["a", "b"]),
        ("labelSelector=app%20notin%20(web)", &["b", "c"]),
        ("labelSelector=app%3Dweb%2Ctier%3Dbe", &[]),
        ("fieldSelector=spec.clusterIP%21%3DNone", &["a", "c"]),
        ("fieldSelector=metadata.namespace%3Dx%2Cmetadata.name%21%3Da", &["b"]),
        ("fieldSelector=metadata.name%3Dc&labelSelector=%21app", &["c"]),
    ];
    for (sel, want) in cases {
        let r = get(addr, &q(sel)).await;
        assert_eq!(r.status, 200, "{sel}");
        assert_eq!(names(r.json()), *want, "{sel}");
    }
    assert_eq!(names(get(addr, "/api/v1/namespaces/y/services").await.json()), ["c"]);
    assert_eq!(get(addr, &q("labelSelector=a%20b")).await.status, 400);
    assert_eq!(get(addr, &q("fieldSelector=nonsense")).await.status, 400);
}

#[tokio::test]
async fn watch_wire_format_410_and_bookmarks() {
    let config = Config { bookmark_interval: Duration::from_millis(100), ..Config::default() };
    let server = ApiServer::start_with("127.0.0.1:0".parse().unwrap(), config).await.unwrap();
    let addr = server.addr();
    let mut first = service("default", "w1", "10.0.0.1", &[]);
    server.apply(&first).unwrap();
    first.metadata.labels = Some([("k".to_string(), "v".to_string())].into());
    server.apply(&first).unwrap();

    // Replay the history after revision 1.
    let (status, lines) =
        watch_lines(addr, "/api/v1/services?watch=true&resourceVersion=1", WAIT, |l| !l.is_empty()).await;
    assert_eq!(status, 200);
    assert_eq!(lines[0]["type"], "MODIFIED");
    assert_eq!(lines[0]["object"]["metadata"]["resourceVersion"], "2");

    // Bookmarks when asked for, with kind/apiVersion and the revision.
    let path = "/apis/discovery.k8s.io/v1/endpointslices?watch=1&resourceVersion=2&allowWatchBookmarks=true";
    let (_, lines) = watch_lines(addr, path, WAIT, |l| l.iter().any(|e| e["type"] == "BOOKMARK")).await;
    let bookmark = lines.iter().find(|e| e["type"] == "BOOKMARK").expect("a bookmark");
    assert_eq!(
        bookmark["object"],
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": "2"}})
    );
    // ...and none when not asked for.
    let (_, lines) =
        watch_lines(addr, "/api/v1/nodes?watch=1&resourceVersion=2", Duration::from_millis(400), |_| false).await;
    assert!(lines.is_empty(), "{lines:?}");

    // Watch without a resourceVersion: the current state as ADDED, then live events.
    let (_, lines) = watch_lines(addr, "/api/v1/services?watch=1", Duration::from_millis(300), |l| !l.is_empty()).await;
    assert_eq!(
        (lines[0]["type"].clone(), lines[0]["object"]["metadata"]["name"].clone()),
        (json!("ADDED"), json!("w1"))
    );

    // timeoutSeconds ends the stream (the reader sees the terminating chunk well before its own deadline).
    let started = std::time::Instant::now();
    let (status, _) =
        watch_lines(addr, "/api/v1/services?watch=1&resourceVersion=2&timeoutSeconds=1", WAIT, |_| false).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));

    // After compaction an old revision gets one ERROR event with a 410 Expired Status, then the end.
    server.apply(&service("default", "w2", "10.0.0.2", &[])).unwrap();
    server.compact();
    let (status, lines) = watch_lines(addr, "/api/v1/services?watch=true&resourceVersion=1", WAIT, |_| false).await;
    assert_eq!(status, 200);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "ERROR");
    let st = &lines[0]["object"];
    assert_eq!(
        (st["kind"].clone(), st["apiVersion"].clone(), st["status"].clone()),
        (json!("Status"), json!("v1"), json!("Failure"))
    );
    assert_eq!((st["reason"].clone(), st["code"].clone()), (json!("Expired"), json!(410)));
    assert_eq!(st["message"], "too old resource version: 1 (3)");
    // From the compaction point on it works.
    let (_, lines) =
        watch_lines(addr, "/api/v1/services?watch=true&resourceVersion=3", Duration::from_millis(300), |_| false).await;
    assert!(lines.is_empty());

    // close_watches ends a live watch promptly.
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.close_watches();
        server
    });
    let started = std::time::Instant::now();
    watch_lines(addr, "/api/v1/services?watch=true&resourceVersion=3", WAIT, |_| false).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(closer.await.unwrap());
}

#[test]
fn background_server_for_sync_tests() {
    let server = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    server.apply(&service("default", "bg", "10.0.0.1", &[])).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let list = rt.block_on(get(server.addr(), "/api/v1/namespaces/default/services")).json();
    assert_eq!(list["items"][0]["metadata"]["name"], "bg");
    assert_eq!(server.list::<Service>().unwrap().len(), 1);
    server.shutdown();
}

/// Kills the child on drop so a failing assertion cannot leak the process.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_serves_and_writes_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_test-apiserver"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
            .arg(&kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let url = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line.trim().to_string())
        }),
    )
    .await
    .expect("URL printed in time")
    .unwrap()
    .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let yaml = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(yaml.contains(&format!("server: {url}")), "{yaml}");
    let addr = url.trim_start_matches("http://").parse().unwrap();

    let created = http(addr, "POST", "/api/v1/namespaces/lab/services", JSON, &svc_json("lab", "web")).await;
    assert_eq!(created.status, 201);
    let got = get(addr, "/api/v1/namespaces/lab/services/web").await;
    assert_eq!((got.status, got.json()["spec"]["clusterIP"].clone()), (200, json!("10.9.0.1")));

    // kube-rs works from the written kubeconfig file too.
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let api: kube::Api<Service> = kube::Api::all(kube::Client::try_from(config).unwrap());
    assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 1);
}
