//! Helpers shared by the integration tests: a kube-rs client, object builders, a raw HTTP client.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher;
use test_apiserver::ApiServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

/// A kube-rs client built from the server's kubeconfig, as kube-proxy would build it.
pub async fn client(server: &ApiServer) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    kube::Client::try_from(config).expect("client builds")
}

pub fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: ns.map(str::to_string),
        labels: (!labels.is_empty())
            .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()),
        ..ObjectMeta::default()
    }
}

pub fn service(ns: &str, name: &str, cluster_ip: &str, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(Some(ns), name, labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.to_string()),
            ports: Some(vec![ServicePort { port: 80, protocol: Some("TCP".into()), ..ServicePort::default() }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub fn slice(ns: &str, name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(Some(ns), name, &[("kubernetes.io/service-name", service)]),
        address_type: "IPv4".into(),
        endpoints: addresses
            .iter()
            .map(|a| Endpoint { addresses: vec![a.to_string()], ..Endpoint::default() })
            .collect(),
        ports: None,
    }
}

pub fn node(name: &str) -> Node {
    Node { metadata: meta(None, name, &[]), ..Node::default() }
}

/// `Init`, `InitApply(ns/name)`, `InitDone`, `Apply(ns/name)`, `Delete(ns/name)`.
pub fn describe<K: kube::Resource>(ev: &watcher::Event<K>) -> String {
    let id = |o: &K| match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.meta().name.as_deref().unwrap_or_default()),
        None => o.meta().name.clone().unwrap_or_default(),
    };
    match ev {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply({})", id(o)),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply({})", id(o)),
        watcher::Event::Delete(o) => format!("Delete({})", id(o)),
    }
}

/// The next watcher event; errors (expected around 410 and reconnects) are collected in `errors`.
pub async fn next_event<K, S>(stream: &mut S, errors: &mut Vec<String>) -> watcher::Event<K>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    for _ in 0..50 {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(ev))) => return ev,
            Ok(Some(Err(err))) => errors.push(err.to_string()),
            Ok(None) => panic!("watcher stream ended"),
            Err(_) => panic!("no watcher event within {WAIT:?}"),
        }
    }
    panic!("too many watcher errors: {errors:?}");
}

/// Described events up to and including the next `InitDone`.
pub async fn until_init_done<K, S>(stream: &mut S, errors: &mut Vec<String>) -> Vec<String>
where
    K: kube::Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let ev = describe(&next_event(stream, errors).await);
        let done = ev == "InitDone";
        seen.push(ev);
        if done {
            return seen;
        }
    }
    panic!("no InitDone after 10000 events, last: {:?}", &seen[seen.len() - 5..]);
}

/// The next `n` described events.
pub async fn take_events<K, S>(stream: &mut S, n: usize, errors: &mut Vec<String>) -> Vec<String>
where
    K: kube::Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(describe(&next_event(stream, errors).await));
    }
    seen
}

/// Polls `cond` every 20 ms until it holds, for at most [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Decodes as many complete chunks of a chunked body as `raw` holds; returns (decoded, finished, consumed).
fn dechunk(raw: &[u8]) -> (Vec<u8>, bool, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = raw[pos..].windows(2).position(|w| w == b"\r\n") else { return (out, false, pos) };
        let size_str = String::from_utf8_lossy(&raw[pos..pos + eol]).to_string();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
        let start = pos + eol + 2;
        if size == 0 {
            return (out, true, start);
        }
        if raw.len() < start + size + 2 {
            return (out, false, pos);
        }
        out.extend_from_slice(&raw[start..start + size]);
        pos = start + size + 2;
    }
}

async fn send(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    stream
}

fn split_head(raw: &[u8]) -> Option<(u16, String, usize)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    Some((status, head, end + 4))
}

/// One request on a fresh connection; the whole response, bounded by [`WAIT`].
pub async fn http(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> HttpResponse {
    let mut stream = send(addr, method, path, content_type, body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw)).await.expect("response in time").expect("read");
    let (status, headers, body_start) = split_head(&raw).expect("complete head");
    let body = if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let (decoded, finished, _) = dechunk(&raw[body_start..]);
        assert!(finished, "truncated chunked body");
        decoded
    } else {
        raw[body_start..].to_vec()
    };
    HttpResponse { status, headers, body }
}

/// GET shorthand.
pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http(addr, "GET", path, "application/json", b"").await
}

/// Opens a watch and returns its JSON lines until `stop` says so, the stream ends, or `wait` passes.
pub async fn watch_lines(
    addr: SocketAddr,
    path: &str,
    wait: Duration,
    mut stop: impl FnMut(&[serde_json::Value]) -> bool,
) -> (u16, Vec<serde_json::Value>) {
    let mut stream = send(addr, "GET", path, "application/json", b"").await;
    let deadline = tokio::time::Instant::now() + wait;
    let (mut raw, mut body, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    let mut head: Option<(u16, usize)> = None;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => break,
        };
        raw.extend_from_slice(&buf[..n]);
        if head.is_none()
            && let Some((status, _, start)) = split_head(&raw)
        {
            head = Some((status, start));
            raw.drain(..start);
        }
        if head.is_some() {
            let (decoded, finished, consumed) = dechunk(&raw);
            raw.drain(..consumed);
            body.extend_from_slice(&decoded);
            while let Some(nl) = body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = body.drain(..=nl).collect();
                lines.push(serde_json::from_slice(&line).expect("watch line is JSON"));
            }
            if finished || stop(&lines) {
                break;
            }
        }
        if n == 0 {
            break;
        }
    }
    (head.map_or(0, |h| h.0), lines)
}

/// Polls a watcher on its own task (so its watch stays open while the test waits) and hands events over.
pub fn forward<K: Send + 'static>(
    mut stream: futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
) -> futures::channel::mpsc::UnboundedReceiver<Result<watcher::Event<K>, watcher::Error>> {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            if tx.unbounded_send(item).is_err() {
                break;
            }
        }
    });
    rx
}

/// Counts `InitApply` events up to the next `InitDone` (for big lists; at most `max`).
pub async fn count_init<K, S>(stream: &mut S, max: usize, errors: &mut Vec<String>) -> usize
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    let mut applied = 0;
    for _ in 0..max + 2 {
        match next_event(stream, errors).await {
            watcher::Event::InitApply(_) => applied += 1,
            watcher::Event::InitDone => return applied,
            _ => {}
        }
    }
    panic!("no InitDone within {max} objects");
}
