//! kube-rs (the client kube-proxy uses) against the test server over real HTTP.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use test_apiserver::ApiServer;

const PROXY_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

async fn start() -> ApiServer {
    ApiServer::start("127.0.0.1:0".parse().unwrap()).await.expect("server starts")
}

#[tokio::test]
async fn services_list_and_watch_with_kube_proxy_selectors() {
    let server = start().await;
    let api: Api<Service> = Api::all(client(&server).await);
    server.apply(&service("default", "a", "10.0.0.1", &[])).unwrap();
    server.apply(&service("default", "headless", "None", &[])).unwrap();
    server
        .apply(&service("default", "other-proxy", "10.0.0.2", &[("service.kubernetes.io/service-proxy-name", "x")]))
        .unwrap();
    server.apply(&service("kube-system", "labelled", "10.0.0.3", &[("service.kubernetes.io/headless", "")])).unwrap();
    server.apply(&service("kube-system", "dns", "10.0.0.10", &[])).unwrap();

    let lp = ListParams::default().labels(PROXY_SELECTOR).fields("spec.clusterIP!=None");
    let listed = api.list(&lp).await.unwrap();
    let names: Vec<_> = listed.items.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["a", "dns"]);
    assert_eq!(listed.metadata.resource_version, Some(server.resource_version().to_string()));
    assert_eq!(api.list(&ListParams::default()).await.unwrap().items.len(), 5);

    let cfg = watcher::Config::default().labels(PROXY_SELECTOR).fields("spec.clusterIP!=None");
    let mut stream = watcher(api.clone(), cfg).default_backoff().boxed();
    let mut errors = Vec::new();
    assert_eq!(
        until_init_done(&mut stream, &mut errors).await,
        ["Init", "InitApply(default/a)", "InitApply(kube-system/dns)", "InitDone"]
    );

    server.apply(&service("default", "e", "10.0.0.5", &[])).unwrap();
    let mut a = server.get::<Service>("default", "a").unwrap().unwrap();
    a.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 8080;
    server.replace(&a).unwrap();
    // Changes that must not show: objects that never match.
    server.apply(&service("default", "headless", "None", &[("x", "y")])).unwrap();
    // Stops matching the label selector, then the field selector: each must arrive as a DELETED.
    server.apply(&service("default", "e", "10.0.0.5", &[("service.kubernetes.io/headless", "")])).unwrap();
    server.apply(&service("kube-system", "dns", "None", &[])).unwrap();
    // Starts matching: ADDED.
    server.apply(&service("default", "headless", "10.0.0.9", &[])).unwrap();
    server.delete::<Service>("default", "a").unwrap();

    let seen = take_events(&mut stream, 6, &mut errors).await;
    assert_eq!(
        seen,
        [
            "Apply(default/e)",
            "Apply(default/a)",
            "Delete(default/e)",
            "Delete(kube-system/dns)",
            "Apply(default/headless)",
            "Delete(default/a)",
        ]
    );
    assert!(errors.is_empty(), "{errors:?}");

    // The update went through with a bumped generation; the deleted one is gone over HTTP.
    let listed = api.list(&lp).await.unwrap();
    let names: Vec<_> = listed.items.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["headless"]);
    assert_eq!(server.counts::<Service>().watches, 1);
}

#[tokio::test]
async fn writes_through_kube_client() {
    let server = start().await;
    let api: Api<Service> = Api::namespaced(client(&server).await, "web");
    let created = api.create(&PostParams::default(), &service("web", "front", "10.1.0.1", &[])).await.unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let err = api.create(&PostParams::default(), &service("web", "front", "10.1.0.1", &[])).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"), "{err:?}");

    let mut changed = created.clone();
    changed.spec.as_mut().unwrap().cluster_ip = Some("10.1.0.2".into());
    let replaced = api.replace("front", &PostParams::default(), &changed).await.unwrap();
    assert_ne!(replaced.metadata.resource_version.as_deref(), Some(rv.as_str()));
    assert_eq!(replaced.metadata.generation, Some(2));
    // Replacing with the stale resourceVersion is a conflict.
    let err = api.replace("front", &PostParams::default(), &changed).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{err:?}");

    let patch = serde_json::json!({"metadata": {"labels": {"tier": "fe"}}});
    let patched =
        api.patch("front", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    assert_eq!(patched.metadata.labels.unwrap()["tier"], "fe");
    assert_eq!(api.get("front").await.unwrap().spec.unwrap().cluster_ip.as_deref(), Some("10.1.0.2"));

    api.delete("front", &Default::default()).await.unwrap();
    let err = api.get("front").await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"), "{err:?}");
    assert!(server.get::<Service>("web", "front").unwrap().is_none());
}

#[tokio::test]
async fn endpointslices_and_nodes() {
    let server = start().await;
    let client = client(&server).await;
    server.apply(&slice("default", "web-abc", "web", &["198.18.0.1"])).unwrap();
    server.apply(&node("node-a")).unwrap();
    server.apply(&node("node-b")).unwrap();

    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let lp = ListParams::default().labels("kubernetes.io/service-name=web");
    assert_eq!(slices.list(&lp).await.unwrap().items.len(), 1);
    let mut slice_stream = watcher(slices, watcher::Config::default().labels(PROXY_SELECTOR)).default_backoff().boxed();
    let nodes: Api<Node> = Api::all(client);
    let listed = nodes.list(&ListParams::default().fields("metadata.name=node-a")).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    let mut node_stream =
        watcher(nodes, watcher::Config::default().fields("metadata.name=node-a")).default_backoff().boxed();

    let mut errors = Vec::new();
    assert_eq!(
        until_init_done(&mut slice_stream, &mut errors).await,
        ["Init", "InitApply(default/web-abc)", "InitDone"]
    );
    assert_eq!(until_init_done(&mut node_stream, &mut errors).await, ["Init", "InitApply(node-a)", "InitDone"]);

    server.apply(&slice("default", "web-abc", "web", &["198.18.0.1", "198.18.0.2"])).unwrap();
    server.apply(&slice("default", "web-def", "web", &["198.18.0.3"])).unwrap();
    server.delete::<EndpointSlice>("default", "web-abc").unwrap();
    let seen = take_events(&mut slice_stream, 3, &mut errors).await;
    assert_eq!(seen, ["Apply(default/web-abc)", "Apply(default/web-def)", "Delete(default/web-abc)"]);

    server.apply(&node("node-b")).unwrap();
    server.delete::<Node>("", "node-b").unwrap();
    let mut a = server.get::<Node>("", "node-a").unwrap().unwrap();
    a.metadata.labels = Some(BTreeMap::from([("topology.kubernetes.io/zone".to_string(), "z1".to_string())]));
    server.apply(&a).unwrap();
    server.delete::<Node>("", "node-a").unwrap();
    let seen = take_events(&mut node_stream, 2, &mut errors).await;
    assert_eq!(seen, ["Apply(node-a)", "Delete(node-a)"]);
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn pagination_returns_each_object_once() {
    let server = start().await;
    let objs: Vec<Service> = (0..1234)
        .map(|i| {
            service(&format!("ns-{}", i % 7), &format!("svc-{i:04}"), &format!("10.2.{}.{}", i / 250, i % 250), &[])
        })
        .collect();
    server.apply_many(&objs).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);

    let mut seen = BTreeMap::<String, usize>::new();
    let mut token: Option<String> = None;
    let mut snapshot_rv = None;
    let mut pages = 0;
    for _ in 0..100 {
        let mut lp = ListParams::default().limit(100);
        lp.continue_token = token.clone();
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 100);
        snapshot_rv.get_or_insert(page.metadata.resource_version.clone());
        assert_eq!(Some(&page.metadata.resource_version), snapshot_rv.as_ref(), "pages share one snapshot");
        for s in &page.items {
            let id = format!("{}/{}", s.metadata.namespace.as_deref().unwrap(), s.metadata.name.as_deref().unwrap());
            *seen.entry(id).or_default() += 1;
        }
        if pages == 3 {
            // Writes during pagination must not show up in (or shift) the remaining pages.
            server.delete::<Service>("ns-4", "svc-1222").unwrap();
            server.apply(&service("ns-6", "svc-1222b", "10.3.0.1", &[])).unwrap();
            server.apply(&service("ns-0", "svc-0000-late", "10.3.0.2", &[])).unwrap();
        }
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert!(token.is_none(), "pagination did not finish");
    assert_eq!(pages, 13);
    assert_eq!(seen.len(), 1234);
    assert!(seen.values().all(|&n| n == 1));
    assert!(seen.contains_key("ns-4/svc-1222") && !seen.contains_key("ns-6/svc-1222b"));
    assert_eq!(server.counts::<Service>().lists, 13);

    // A continue token from before a compaction is 410 Gone.
    let first = api.list(&ListParams::default().limit(10)).await.unwrap();
    server.apply(&service("ns-1", "after", "10.3.0.3", &[])).unwrap();
    server.compact();
    let mut lp = ListParams::default().limit(10);
    lp.continue_token = first.metadata.continue_;
    let err = api.list(&lp).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"), "{err:?}");
}

/// Applies a watcher event to a local cache the way a reflector does.
fn fold(state: &mut BTreeMap<String, String>, staging: &mut BTreeMap<String, String>, ev: &watcher::Event<Service>) {
    let key = |s: &Service| s.metadata.name.clone().unwrap();
    let ip = |s: &Service| s.spec.as_ref().and_then(|sp| sp.cluster_ip.clone()).unwrap_or_default();
    match ev {
        watcher::Event::Init => staging.clear(),
        watcher::Event::InitApply(s) => {
            staging.insert(key(s), ip(s));
        }
        watcher::Event::InitDone => *state = std::mem::take(staging),
        watcher::Event::Apply(s) => {
            state.insert(key(s), ip(s));
        }
        watcher::Event::Delete(s) => {
            state.remove(&key(s));
        }
    }
}

fn server_state(server: &ApiServer) -> BTreeMap<String, String> {
    server
        .list::<Service>()
        .unwrap()
        .into_iter()
        .map(|s| (s.metadata.name.unwrap(), s.spec.and_then(|sp| sp.cluster_ip).unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn watcher_relists_after_410_gone() {
    let server = start().await;
    for i in 0..5 {
        server.apply(&service("default", &format!("s{i}"), &format!("10.4.0.{i}"), &[])).unwrap();
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let mut stream = forward(watcher(api, watcher::Config::default()).default_backoff().boxed());
    let (mut state, mut staging, mut errors) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
    for _ in 0..20 {
        let ev = next_event(&mut stream, &mut errors).await;
        fold(&mut state, &mut staging, &ev);
        if matches!(ev, watcher::Event::InitDone) {
            break;
        }
    }
    assert_eq!(state, server_state(&server));
    assert_eq!(server.counts::<Service>(), test_apiserver::RequestCounts { lists: 1, watches: 0 });
    eventually("the watch to open", || server.counts::<Service>().watches == 1).await;

    // Revisions move on elsewhere, then history is compacted: the open Service watch's position
    // (still the list's revision) is now too old, which it learns at its next event.
    server.apply(&node("n1")).unwrap();
    server.apply(&node("n2")).unwrap();
    server.compact();
    server.delete::<Service>("default", "s0").unwrap();
    server.apply(&service("default", "s1", "10.4.1.1", &[])).unwrap();
    server.apply(&service("default", "s9", "10.4.0.9", &[])).unwrap();

    // ERROR 410 → relist → Init … InitDone with the current state.
    let mut relisted = false;
    for _ in 0..50 {
        let ev = next_event(&mut stream, &mut errors).await;
        fold(&mut state, &mut staging, &ev);
        if matches!(ev, watcher::Event::InitDone) {
            relisted = true;
            break;
        }
    }
    assert!(relisted, "no relist");
    assert!(errors.iter().any(|e| e.contains("410") || e.contains("too old")), "{errors:?}");
    assert_eq!(server.counts::<Service>().lists, 2);
    assert_eq!(state, server_state(&server));
    assert!(!state.contains_key("s0") && state["s1"] == "10.4.1.1" && state.contains_key("s9"));

    // And it keeps watching from the new list.
    server.apply(&service("default", "s10", "10.4.0.10", &[])).unwrap();
    let ev = next_event(&mut stream, &mut errors).await;
    assert_eq!(describe(&ev), "Apply(default/s10)");
}

#[tokio::test]
async fn close_watches_reconnects_without_missing_events() {
    let server = start().await;
    server.apply(&service("default", "before", "10.5.0.1", &[])).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);
    let mut stream = forward(watcher(api, watcher::Config::default()).default_backoff().boxed());
    let mut errors = Vec::new();
    until_init_done(&mut stream, &mut errors).await;
    eventually("the watch to open", || server.counts::<Service>().watches == 1).await;

    for round in 0..3 {
        server.close_watches();
        // Written while the watcher is (most likely) between its old and new watch.
        for i in 0..5 {
            server.apply(&service("default", &format!("r{round}-{i}"), "10.5.1.1", &[])).unwrap();
        }
        let seen = take_events(&mut stream, 5, &mut errors).await;
        let expected: Vec<String> = (0..5).map(|i| format!("Apply(default/r{round}-{i})")).collect();
        assert_eq!(seen, expected);
        eventually("the watch to reopen", || server.counts::<Service>().watches == round + 2).await;
    }
    // Resumed from its resourceVersion every time: never a relist.
    assert_eq!(server.counts::<Service>().lists, 1);
}

#[tokio::test]
async fn streaming_list_and_bookmarks() {
    let server = start().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    server.apply(&service("default", "one", "10.6.0.1", &[])).unwrap();
    server.apply(&service("default", "two", "10.6.0.2", &[])).unwrap();
    let api: Api<Service> = Api::all(client(&server).await);

    // sendInitialEvents=true: the initial state arrives as events, ended by the initial-events-end bookmark.
    let mut stream = watcher(api.clone(), watcher::Config::default().streaming_lists()).default_backoff().boxed();
    let mut errors = Vec::new();
    assert_eq!(
        until_init_done(&mut stream, &mut errors).await,
        ["Init", "InitApply(default/one)", "InitApply(default/two)", "InitDone"]
    );
    assert_eq!(server.counts::<Service>().lists, 0);
    server.apply(&service("default", "three", "10.6.0.3", &[])).unwrap();
    assert_eq!(take_events(&mut stream, 1, &mut errors).await, ["Apply(default/three)"]);

    // Plain watch with bookmarks: they keep coming and carry the current revision.
    let mut events = api.watch(&kube::api::WatchParams::default().timeout(5), "0").await.unwrap().boxed();
    let mut bookmarks = 0;
    for _ in 0..100 {
        let ev = tokio::time::timeout(WAIT, events.next()).await.expect("event in time").expect("stream open");
        if let kube::api::WatchEvent::Bookmark(b) = ev.unwrap() {
            assert_eq!(b.metadata.resource_version, server.resource_version().to_string());
            bookmarks += 1;
            if bookmarks == 3 {
                break;
            }
        }
    }
    assert_eq!(bookmarks, 3);
}

/// Resident set size of a process, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Kills the server process on drop so a failing assertion cannot leak it.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Scale check, not a timed assertion: `cargo test -p test-apiserver --release --test kube_client -- --ignored
/// --nocapture scale`. Runs the `test-apiserver` binary (so its RSS is the server's alone), loads 100k Services +
/// 100k EndpointSlices over `POST /bulk`, then times kube-rs watchers' initial lists to InitDone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale check; run in release by hand"]
async fn scale_100k_services_and_endpointslices() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_test-apiserver"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
            .arg(&kubeconfig)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let mut url = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.take().unwrap()), &mut url).unwrap();
    let addr: std::net::SocketAddr = url.trim().trim_start_matches("http://").parse().unwrap();
    let rss_empty = rss_mib(pid);

    let svc = |i: usize| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 100), "labels": {"app": format!("app-{i}")}},
            "spec": {"type": "ClusterIP", "clusterIP": format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256),
                     "clusterIPs": [format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256)],
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
                     "internalTrafficPolicy": "Cluster", "selector": {"app": format!("app-{i}")},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                               {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443}]}
        })
    };
    let eps = |i: usize| {
        let endpoints: Vec<_> = (0..3)
            .map(|j| {
                serde_json::json!({
                    "addresses": [format!("198.18.{}.{}", (i * 3 + j) / 256 % 256, (i * 3 + j) % 256)],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": format!("node-{}", j), "zone": "z1",
                    "targetRef": {"kind": "Pod", "namespace": format!("ns-{}", i % 100), "name": format!("app-{i}-{j}")}
                })
            })
            .collect();
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": format!("svc-{i}-abcde"), "namespace": format!("ns-{}", i % 100),
                         "labels": {"kubernetes.io/service-name": format!("svc-{i}"),
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "https", "port": 8443, "protocol": "TCP"}]
        })
    };

    // Request bodies are built first so the load time below is the server's (plus loopback transfer).
    let bodies: Vec<Vec<u8>> = (0..N)
        .collect::<Vec<_>>()
        .chunks(10_000)
        .map(|chunk| {
            let body: Vec<serde_json::Value> = chunk.iter().flat_map(|&i| [svc(i), eps(i)]).collect();
            serde_json::to_vec(&body).unwrap()
        })
        .collect();
    let bytes_sent: usize = bodies.iter().map(Vec::len).sum();
    let started = std::time::Instant::now();
    for body in bodies {
        let r = http(addr, "POST", "/bulk", "application/json", &body).await;
        assert_eq!(r.status, 200);
    }
    let load = started.elapsed();
    let rss_loaded = rss_mib(pid);
    println!(
        "scale: loaded {N} Services + {N} EndpointSlices ({:.0} MiB JSON) over POST /bulk in {load:.2?}; \
         RSS {rss_empty:.0} -> {rss_loaded:.0} MiB",
        bytes_sent as f64 / 1048576.0
    );

    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let client = kube::Client::try_from(config).unwrap();
    for (what, run) in [("Services", 0), ("EndpointSlices", 1)] {
        let started = std::time::Instant::now();
        let mut errors = Vec::new();
        let applied = if run == 0 {
            let api: Api<Service> = Api::all(client.clone());
            let mut s = watcher(api, watcher::Config::default().labels(PROXY_SELECTOR)).boxed();
            count_init(&mut s, N, &mut errors).await
        } else {
            let api: Api<EndpointSlice> = Api::all(client.clone());
            let mut s = watcher(api, watcher::Config::default().labels(PROXY_SELECTOR)).boxed();
            count_init(&mut s, N, &mut errors).await
        };
        assert_eq!(applied, N);
        assert!(errors.is_empty(), "{errors:?}");
        println!(
            "scale: kube-rs watcher initial list of {N} {what} to InitDone: {:.2?} (page size 500); RSS {:.0} MiB",
            started.elapsed(),
            rss_mib(pid)
        );
    }

    // Latency of one change through an open watch at this size.
    let api: Api<Service> = Api::all(client);
    let mut s = forward(watcher(api, watcher::Config::default().labels(PROXY_SELECTOR)).boxed());
    let mut errors = Vec::new();
    assert_eq!(count_init(&mut s, N + 1, &mut errors).await, N);
    // Give the watcher time to open its watch, so the timing below is delivery, not watch setup.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = serde_json::to_vec(&svc(1)).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        http(addr, "PUT", "/api/v1/namespaces/ns-1/services/svc-1", "application/json", &body).await.status,
        200
    );
    let ev = next_event(&mut s, &mut errors).await;
    assert_eq!(describe(&ev), "Apply(ns-1/svc-1)");
    println!(
        "scale: one update over HTTP to the watcher at 100k objects: {:.2?}; final server RSS {:.0} MiB",
        started.elapsed(),
        rss_mib(pid)
    );
}
