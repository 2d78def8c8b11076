//! HTTP side: routing of the Kubernetes REST paths onto the store, lists, writes and watches.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::selector::{FieldSelector, LabelSelector, Selector};
use crate::store::{Key, ListQuery, Store, StoredObject, WriteMode};
use crate::watch::{WatchRequest, WatchStream};

/// Response body: either a buffer or a stream of chunks.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Bytes gathered into one chunk of a streamed list response.
const LIST_CHUNK: usize = 64 * 1024;

/// State shared by the server tasks and the [`crate::ApiServer`] handle.
pub(crate) struct Shared {
    pub(crate) store: Store,
    /// Bumped by `close_watches()`; every open watch ends when it changes.
    pub(crate) close_tx: watch::Sender<u64>,
    bookmark_interval_ms: AtomicU64,
    pub(crate) default_watch_timeout: Duration,
    /// Per resource id: how long list requests wait before being answered (a slow apiserver).
    list_delays: std::sync::Mutex<std::collections::HashMap<usize, Duration>>,
}

impl Shared {
    pub(crate) fn new(history_limit: usize, bookmark_interval: Duration, default_watch_timeout: Duration) -> Self {
        let shared = Self {
            store: Store::new(history_limit),
            close_tx: watch::channel(0).0,
            bookmark_interval_ms: AtomicU64::new(0),
            default_watch_timeout,
            list_delays: Default::default(),
        };
        shared.set_bookmark_interval(bookmark_interval);
        shared
    }

    pub(crate) fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_interval_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn set_list_delay(&self, id: usize, d: Duration) {
        let mut delays = self.list_delays.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_zero() {
            delays.remove(&id);
        } else {
            delays.insert(id, d);
        }
    }

    fn list_delay(&self, id: usize) -> Option<Duration> {
        self.list_delays.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied()
    }

    pub(crate) fn set_bookmark_interval(&self, d: Duration) {
        // Zero would make watches spin on bookmarks.
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        self.bookmark_interval_ms.store(ms, Ordering::Relaxed);
    }
}

/// Accepts connections until `shutdown` turns true; connections end with it too.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(err) => {
                    // Usually EMFILE; back off instead of spinning.
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                res = conn => if let Err(err) = res {
                    tracing::debug!(%peer, "connection ended: {err}");
                },
                _ = stopped(&mut stop) => {}
            }
        });
    }
    tracing::debug!("test-apiserver stopped accepting");
}

/// Resolves once shutdown is signalled (or the handle is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here rather than hold it in callers' futures.
    let _ = rx.wait_for(|v| *v).await;
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match route(shared, req).await {
        Ok(resp) => resp,
        Err(err) => status_response(&err),
    };
    tracing::debug!(%method, %path, code = resp.status().as_u16(), "request");
    resp
}

/// Decoded query parameters (last value wins).
struct Query(HashMap<String, String>);

impl Query {
    fn parse(raw: &str) -> Self {
        let map = raw
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Self(map)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn flag(&self, k: &str) -> Option<bool> {
        self.get(k).map(|v| matches!(v, "true" | "1"))
    }

    fn number<T: std::str::FromStr>(&self, k: &str) -> Result<Option<T>, ApiError> {
        self.get(k)
            .filter(|v| !v.is_empty())
            .map(|v| v.parse().map_err(|_| ApiError::bad_request(format!("invalid {k}: {v:?}"))))
            .transpose()
    }

    fn selector(&self) -> Result<Selector, ApiError> {
        let labels = LabelSelector::parse(self.get("labelSelector").unwrap_or_default())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(self.get("fieldSelector").unwrap_or_default())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Selector { labels, fields })
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query().unwrap_or_default());
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    match segs.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => Ok(text(StatusCode::OK, "ok")),
        ["version"] => Ok(json_response(StatusCode::OK, &version())),
        [] => Ok(json_response(StatusCode::OK, &json!({"paths": ["/api", "/apis", "/healthz", "/version", "/bulk"]}))),
        ["bulk"] if method == Method::POST => bulk(&shared, req).await,
        ["bulk"] => Err(ApiError::method_not_allowed(method.as_str())),
        ["api"] => Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        )),
        ["apis"] => Ok(json_response(StatusCode::OK, &group_list(&shared))),
        ["api", v] => resource_list(&shared, "", v, &path),
        ["apis", g, v] => resource_list(&shared, g, v, &path),
        ["api", v, rest @ ..] => {
            let (v, rest) = (v.to_string(), rest.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            resource_route(shared, req, query, "", &v, &rest).await
        }
        ["apis", g, v, rest @ ..] => {
            let (g, v) = (g.to_string(), v.to_string());
            let rest = rest.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            resource_route(shared, req, query, &g, &v, &rest).await
        }
        _ => Err(ApiError::no_route(&path)),
    }
}

/// Where a resource path points.
struct Target {
    id: usize,
    namespace: Option<String>,
    name: Option<String>,
}

fn resolve(shared: &Shared, group: &str, version: &str, rest: &[String], path: &str) -> Result<Target, ApiError> {
    let store = &shared.store;
    let namespaced = |plural: &str| store.find_resource(group, version, plural).filter(|&id| store.info(id).namespaced);
    let (id, namespace, tail) = match rest {
        [ns_word, ns, plural, tail @ ..] if ns_word == "namespaces" && namespaced(plural).is_some() => {
            (namespaced(plural).unwrap_or_default(), Some(ns.clone()), tail)
        }
        [plural, tail @ ..] => {
            let id = store.find_resource(group, version, plural).ok_or_else(|| ApiError::no_route(path))?;
            (id, None, tail)
        }
        [] => return Err(ApiError::no_route(path)),
    };
    let name = match tail {
        [] => None,
        // `/status` and the like address the same stored object here.
        [name] | [name, _] => Some(name.clone()),
        _ => return Err(ApiError::no_route(path)),
    };
    Ok(Target { id, namespace, name })
}

async fn resource_route(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    query: Query,
    group: &str,
    version: &str,
    rest: &[String],
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    // Legacy `/watch/` prefix: same as `?watch=true`.
    let (legacy_watch, rest) = match rest.split_first() {
        Some((first, tail)) if first == "watch" => (true, tail),
        _ => (false, rest),
    };
    let target = resolve(&shared, group, version, rest, &path)?;
    let info = shared.store.info(target.id);
    if info.namespaced && target.name.is_some() && target.namespace.is_none() {
        return Err(ApiError::no_route(&path));
    }
    let method = req.method().clone();
    let watching = legacy_watch || query.flag("watch").unwrap_or(false);
    match (&method, &target.name) {
        (&Method::GET, _) if watching => watch(shared, &target, &query),
        (&Method::GET, None) => {
            if let Some(d) = shared.list_delay(target.id) {
                tokio::time::sleep(d).await;
            }
            list(&shared, &target, &query)
        }
        (&Method::GET, Some(name)) => {
            let ns = target.namespace.as_deref().unwrap_or_default();
            let obj = shared.store.get(target.id, ns, name).ok_or_else(|| ApiError::not_found(&info, name))?;
            Ok(raw_json_response(StatusCode::OK, obj.json.clone()))
        }
        (&Method::POST, None) if target.namespace.is_some() || !info.namespaced => {
            let mut obj = read_json(req).await?;
            set_namespace(&mut obj, target.namespace.as_deref())?;
            let stored = shared.store.put(target.id, obj, WriteMode::Create)?;
            Ok(raw_json_response(StatusCode::CREATED, stored.json.clone()))
        }
        (&Method::PUT, Some(name)) => {
            let mut obj = read_json(req).await?;
            set_namespace(&mut obj, target.namespace.as_deref())?;
            check_name(&obj, name)?;
            let stored = shared.store.put(target.id, obj, WriteMode::Update)?;
            Ok(raw_json_response(StatusCode::OK, stored.json.clone()))
        }
        (&Method::PATCH, Some(name)) => patch(&shared, &target, name, req).await,
        (&Method::DELETE, Some(name)) => {
            let opts = read_body(req).await?;
            // DeleteOptions may carry a resourceVersion precondition.
            let precondition = serde_json::from_slice::<Value>(&opts)
                .ok()
                .and_then(|o| o["preconditions"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()));
            let ns = target.namespace.as_deref().unwrap_or_default();
            let tomb = shared.store.delete(target.id, ns, name, precondition)?;
            Ok(raw_json_response(StatusCode::OK, tomb.json.clone()))
        }
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

/// Applies the URL namespace to a body; a different non-empty namespace in the body is an error, as upstream.
fn set_namespace(obj: &mut Value, namespace: Option<&str>) -> Result<(), ApiError> {
    let Some(ns) = namespace else { return Ok(()) };
    if !obj.is_object() {
        return Err(ApiError::bad_request("object must be a JSON object"));
    }
    match obj["metadata"]["namespace"].as_str() {
        Some(body_ns) if !body_ns.is_empty() && body_ns != ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            obj["metadata"]["namespace"] = Value::String(ns.to_string());
            Ok(())
        }
    }
}

fn check_name(obj: &Value, name: &str) -> Result<(), ApiError> {
    match obj["metadata"]["name"].as_str() {
        Some(n) if n == name => Ok(()),
        _ => Err(ApiError::bad_request("the name of the object does not match the name on the URL")),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| ApiError::bad_request(format!("reading body: {e}")))
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Merge patch (strategic merge and apply patches are approximated by it); retried on concurrent writes.
async fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ct = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let ct_base = ct.split(';').next().unwrap_or_default().trim();
    let apply = ct_base == "application/apply-patch+yaml";
    if !apply && ct_base != "application/merge-patch+json" && ct_base != "application/strategic-merge-patch+json" {
        return Err(ApiError::unsupported_media_type(&ct));
    }
    // Server-side apply bodies from kube-rs are JSON, which is valid YAML; anything else is not supported.
    let patch = read_json(req).await.map_err(|_| ApiError::unsupported_media_type(&ct))?;
    let info = shared.store.info(target.id);
    let ns = target.namespace.as_deref().unwrap_or_default();
    let explicit_rv = patch["metadata"]["resourceVersion"].as_str().is_some();
    for _ in 0..16 {
        let (mut obj, mode) = match shared.store.get(target.id, ns, name) {
            Some(cur) => (
                serde_json::from_slice(&cur.json).map_err(|e| ApiError::bad_request(e.to_string()))?,
                WriteMode::Update,
            ),
            None if apply => (json!({"metadata": {"name": name}}), WriteMode::Create),
            None => return Err(ApiError::not_found(&info, name)),
        };
        merge_patch(&mut obj, &patch);
        set_namespace(&mut obj, target.namespace.as_deref())?;
        check_name(&obj, name)?;
        match shared.store.put(target.id, obj, mode) {
            Ok(stored) => return Ok(raw_json_response(StatusCode::OK, stored.json.clone())),
            Err(err) if err.code == 409 && !explicit_rv => continue,
            Err(err) => return Err(err),
        }
    }
    Err(ApiError::conflict(&info, name))
}

/// Continue token: the snapshot revision and the last key, hex-encoded JSON (opaque to clients).
fn encode_continue(rv: u64, key: &Key) -> String {
    let raw = json!({"rv": rv, "ns": key.0, "name": key.1}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<(u64, Key), ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = v["rv"].as_u64().ok_or_else(bad)?;
    let ns = v["ns"].as_str().ok_or_else(bad)?.to_string();
    let name = v["name"].as_str().ok_or_else(bad)?.to_string();
    Ok((rv, (ns, name)))
}

fn list(shared: &Shared, target: &Target, query: &Query) -> Result<Response<Body>, ApiError> {
    let counters = shared.store.counters(target.id);
    counters.lists.fetch_add(1, Ordering::Relaxed);
    let selector = query.selector()?;
    let limit: Option<usize> = query.number("limit")?;
    let continued = query.get("continue").filter(|c| !c.is_empty());
    let (at, after) = match continued {
        Some(token) => {
            let (rv, key) = decode_continue(token)?;
            (Some(rv), Some(key))
        }
        None => {
            let rv: Option<u64> = query.number("resourceVersion")?;
            match (query.get("resourceVersionMatch"), rv) {
                (Some("Exact"), Some(rv)) if rv > 0 => (Some(rv), None),
                (Some("Exact"), _) => {
                    return Err(ApiError::bad_request("resourceVersionMatch=Exact needs a non-zero resourceVersion"));
                }
                // "0", unset and NotOlderThan are all served from the current state.
                _ => (None, None),
            }
        }
    };
    let q = ListQuery { namespace: target.namespace.as_deref(), after, limit, at, selector: &selector };
    let page = shared.store.list(target.id, &q).map_err(|err| match continued {
        Some(_) if err.code == 410 => ApiError::expired(
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        ),
        _ => err,
    })?;
    let info = shared.store.info(target.id);
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(key) = &page.next {
        meta["continue"] = Value::String(encode_continue(page.rv, key));
    }
    let head = format!(
        "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{},\"items\":[",
        Value::String(info.list_kind()),
        Value::String(info.api_version()),
        meta
    );
    let chunks = ListChunks { head: Some(Bytes::from(head)), items: page.items.into_iter(), first: true, done: false };
    let body = StreamBody::new(stream::iter(chunks.map(|b| Ok(Frame::data(b))))).boxed_unsync();
    Ok(with_json_type(Response::new(body)))
}

/// Streams `head`, the comma-separated items, and `]}` in chunks, so a 100k-item list is never one buffer.
struct ListChunks {
    head: Option<Bytes>,
    items: std::vec::IntoIter<Arc<StoredObject>>,
    first: bool,
    done: bool,
}

impl Iterator for ListChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut buf = BytesMut::with_capacity(LIST_CHUNK + 4096);
        if let Some(head) = self.head.take() {
            buf.put_slice(&head);
        }
        while buf.len() < LIST_CHUNK {
            match self.items.next() {
                Some(obj) => {
                    if !self.first {
                        buf.put_u8(b',');
                    }
                    self.first = false;
                    buf.put_slice(&obj.json);
                }
                None => {
                    buf.put_slice(b"]}");
                    self.done = true;
                    break;
                }
            }
        }
        Some(buf.freeze())
    }
}

fn watch(shared: Arc<Shared>, target: &Target, query: &Query) -> Result<Response<Body>, ApiError> {
    shared.store.counters(target.id).watches.fetch_add(1, Ordering::Relaxed);
    let mut selector = query.selector()?;
    if let Some(name) = &target.name {
        // Watching a single object is a watch with a name field selector.
        let mut fields = query.get("fieldSelector").unwrap_or_default().to_string();
        if !fields.is_empty() {
            fields.push(',');
        }
        fields.push_str(&format!("metadata.name={name}"));
        selector.fields = FieldSelector::parse(&fields).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let rv = query.get("resourceVersion").unwrap_or_default();
    let send_initial = query.flag("sendInitialEvents");
    let from = match (rv, send_initial) {
        (_, Some(true)) | ("" | "0", None) => None,
        ("" | "0", Some(false)) => Some(shared.store.resource_version()),
        (n, _) => Some(n.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {n:?}")))?),
    };
    let timeout = query.number::<u64>("timeoutSeconds")?.map_or(shared.default_watch_timeout, Duration::from_secs);
    let req = WatchRequest {
        id: target.id,
        namespace: target.namespace.clone(),
        selector,
        from,
        initial_events_end: send_initial == Some(true),
        bookmarks: query.flag("allowWatchBookmarks").unwrap_or(false),
        timeout,
    };
    let stream = WatchStream::new(shared, req);
    let body = StreamBody::new(stream::unfold(stream, WatchStream::next_chunk)).boxed_unsync();
    Ok(with_json_type(Response::new(body)))
}

/// Test-only extension: `POST /bulk` with a JSON array of objects (or a `List`), each created or replaced.
/// Not atomic: objects before a bad one stay written.
async fn bulk(shared: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = read_body(req).await?;
    let mut loader =
        BulkLoader { shared, pending: Vec::new(), count: 0, rv: shared.store.resource_version(), err: None };
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        // Stream the array: only a chunk of parsed objects is alive at a time, not a tree of the whole body.
        let mut de = serde_json::Deserializer::from_slice(&body);
        let parsed = serde::Deserializer::deserialize_seq(&mut de, &mut loader).and_then(|()| de.end());
        if let Some(err) = loader.err.take() {
            return Err(err);
        }
        parsed.map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    } else {
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        let Some(Value::Array(items)) = value.get("items").cloned() else {
            return Err(ApiError::bad_request("expected a JSON array or an object with items"));
        };
        for obj in items {
            loader.push(obj)?;
        }
    }
    loader.flush()?;
    Ok(json_response(StatusCode::OK, &json!({"count": loader.count, "resourceVersion": loader.rv.to_string()})))
}

/// Objects parsed per store write in a bulk load.
const BULK_BATCH: usize = 1000;

struct BulkLoader<'a> {
    shared: &'a Shared,
    pending: Vec<(usize, Value)>,
    count: usize,
    rv: u64,
    /// The API error that stopped a streamed load (the JSON error only says "custom").
    err: Option<ApiError>,
}

impl BulkLoader<'_> {
    fn push(&mut self, obj: Value) -> Result<(), ApiError> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        let id = self
            .shared
            .store
            .find_by_kind(api_version, kind)
            .ok_or_else(|| ApiError::bad_request(format!("unknown apiVersion/kind {api_version:?}/{kind:?}")))?;
        self.pending.push((id, obj));
        self.count += 1;
        if self.pending.len() >= BULK_BATCH { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<(), ApiError> {
        if !self.pending.is_empty() {
            self.rv = self.shared.store.put_many(std::mem::take(&mut self.pending))?;
        }
        Ok(())
    }
}

impl<'de> serde::de::Visitor<'de> for &mut BulkLoader<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of Kubernetes objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(obj) = seq.next_element::<Value>()? {
            if let Err(err) = self.push(obj) {
                self.err = Some(err);
                return Err(serde::de::Error::custom("bulk load stopped"));
            }
        }
        Ok(())
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-test-apiserver",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

fn group_list(shared: &Shared) -> Value {
    let mut groups: Vec<(String, String)> = shared
        .store
        .resources()
        .iter()
        .filter(|r| !r.group.is_empty())
        .map(|r| (r.group.clone(), r.version.clone()))
        .collect();
    groups.sort();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(shared: &Shared, group: &str, version: &str, path: &str) -> Result<Response<Body>, ApiError> {
    let resources: Vec<Value> = shared
        .store
        .resources()
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    if resources.is_empty() {
        return Err(ApiError::no_route(path));
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    let body = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources});
    Ok(json_response(StatusCode::OK, &body))
}

fn with_json_type(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn raw_json_response(code: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = with_json_type(Response::new(Full::new(body).boxed_unsync()));
    *resp.status_mut() = code;
    resp
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    raw_json_response(code, Bytes::from(serde_json::to_vec(body).unwrap_or_default()))
}

fn text(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync());
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn status_response(err: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &err.status_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = Query::parse("&labelSelector=%21a%2C%21b&fieldSelector=spec.clusterIP%21%3DNone&x=a+b&watch=1");
        assert_eq!(q.get("labelSelector"), Some("!a,!b"));
        assert_eq!(q.get("fieldSelector"), Some("spec.clusterIP!=None"));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(q.flag("watch"), Some(true));
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn continue_token_round_trip() {
        let key = ("ns".to_string(), "n\"ame".to_string());
        assert_eq!(decode_continue(&encode_continue(42, &key)).unwrap(), (42, key));
        assert!(decode_continue("zz").is_err());
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut t, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }
}
