//! An in-process Kubernetes API server for tests, the lab and benchmarks.
//!
//! It speaks enough of the real kube-apiserver's HTTP API (JSON only, plain HTTP, no auth) that kube-rs
//! clients and `kube::runtime::watcher` work against it unchanged:
//!
//! - core/v1 `services`, `endpoints`, `nodes`, `namespaces`, `events`; discovery.k8s.io/v1 `endpointslices`;
//!   events.k8s.io/v1 `events`; any other k8s-openapi type is registered on first in-process use.
//! - GET list with `labelSelector`, `fieldSelector` (dotted-path `=`/`==`/`!=` on the object JSON),
//!   `limit`/`continue` (pages are consistent with the first page's revision; 410 once compacted) and
//!   `resourceVersion`/`resourceVersionMatch`.
//! - watch (`?watch=true`) from a revision, replayed from a bounded per-resource history; `ERROR` 410
//!   `Expired` when it is too old; `allowWatchBookmarks`; `sendInitialEvents` (streaming lists);
//!   `timeoutSeconds`; selectors, with "stopped matching" sent as DELETED like upstream.
//! - POST / PUT (with `metadata.resourceVersion` precondition) / DELETE / PATCH (merge patch; strategic
//!   merge and apply patches are approximated as merge patches).
//! - Test-only extension: `POST /bulk` with a JSON array of objects (or `{"items": [...]}`), each created
//!   or replaced, answering `{"count": n, "resourceVersion": "N"}`.
//!
//! There is one global, monotonically increasing resourceVersion, like etcd's revision.
//!
//! kube-rs' `watcher` with its default `Config` lists in pages of 500 (omitting `resourceVersion` because a
//! `limit` is set), then watches from the list's revision with `allowWatchBookmarks=true` and
//! `timeoutSeconds=290`; `Config::streaming_lists()` sends `sendInitialEvents=true` instead. Both work here.
//!
//! Objects are stored serialized once (`Bytes`, shared by the store, the event history and every reader), with
//! their labels pre-extracted; field selectors other than `metadata.name`/`metadata.namespace` parse the
//! object per evaluation. Watches read the shared history ring under a read lock and never copy the store.
//!
//! ```no_run
//! # fn main() -> Result<(), test_apiserver::Error> {
//! use k8s_openapi::api::core::v1::Service;
//! let server = test_apiserver::ApiServer::start_background("127.0.0.1:0".parse().unwrap())?;
//! server.write_kubeconfig("/tmp/kubeconfig")?;
//! let mut svc = Service::default();
//! svc.metadata.name = Some("web".into());
//! svc.metadata.namespace = Some("default".into());
//! let rv = server.apply(&svc)?;
//! # let _ = rv; Ok(()) }
//! ```

#![warn(missing_docs)]

mod error;
mod resource;
mod selector;
mod server;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpListener;

pub use error::{ApiError, Error, Result};
pub use resource::ResourceInfo;
pub use selector::{FieldSelector, LabelSelector, SelectorError};

use server::Shared;
use store::{ListQuery, WriteMode};

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Events kept per resource for watches to resume from; older revisions get 410 Gone.
    pub history_limit: usize,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Watch duration when the client sends no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            history_limit: 250_000,
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
        }
    }
}

/// How many list and watch requests a resource has served (for asserting that a relist happened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// GET list requests, one per page.
    pub lists: u64,
    /// Watch requests.
    pub watches: u64,
}

/// A running server plus direct access to its store. Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Binds `bind` (port 0 picks one) and serves on the current tokio runtime.
    pub async fn start(bind: SocketAddr) -> Result<Self> {
        Self::start_with(bind, Config::default()).await
    }

    /// [`ApiServer::start`] with explicit settings.
    pub async fn start_with(bind: SocketAddr, config: Config) -> Result<Self> {
        let listener = TcpListener::bind(bind).await.map_err(|e| Error::io(format!("bind {bind}"), e))?;
        let addr = listener.local_addr().map_err(|e| Error::io("local_addr", e))?;
        let shared =
            Arc::new(Shared::new(config.history_limit, config.bookmark_interval, config.default_watch_timeout));
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(server::serve(listener, shared.clone(), rx));
        tracing::info!(%addr, "test-apiserver listening");
        Ok(Self { shared, addr, shutdown, thread: None })
    }

    /// Starts the server on its own thread with its own runtime, for tests that are not async.
    pub fn start_background(bind: SocketAddr) -> Result<Self> {
        Self::start_background_with(bind, Config::default())
    }

    /// [`ApiServer::start_background`] with explicit settings.
    pub fn start_background_with(bind: SocketAddr, config: Config) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(Error::io("tokio runtime", e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    match Self::start_with(bind, config).await {
                        Ok(server) => {
                            let mut stop = server.shutdown.subscribe();
                            if tx.send(Ok(server)).is_ok() {
                                server::stopped(&mut stop).await;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
                rt.shutdown_background();
            })
            .map_err(|e| Error::io("spawn server thread", e))?;
        let mut server = rx.recv().map_err(|_| Error::Startup)??;
        server.thread = Some(thread);
        Ok(server)
    }

    /// The socket the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig with one cluster (`server: http://ADDR`), one user without credentials and a current context.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test-apiserver\n  cluster:\n    server: {}\n\
             users:\n- name: test-apiserver\n  user: {{}}\ncontexts:\n- name: test-apiserver\n  context:\n    \
             cluster: test-apiserver\n    user: test-apiserver\n    namespace: default\n\
             current-context: test-apiserver\npreferences: {{}}\n",
            self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// Stops accepting, ends open connections (and watches) and, for a background server, joins its thread.
    pub fn shutdown(self) {
        drop(self);
    }

    fn resource_id<K: k8s_openapi::Resource>(&self) -> usize
    where
        K::Scope: 'static,
    {
        self.shared.store.ensure_resource(&ResourceInfo::of::<K>())
    }

    /// Creates an object (409 AlreadyExists if present); returns its resourceVersion. An empty namespace of a
    /// namespaced object means `default`.
    pub fn create<K>(&self, obj: &K) -> Result<u64>
    where
        K: k8s_openapi::Resource + Serialize,
        K::Scope: 'static,
    {
        let value = serde_json::to_value(obj)?;
        Ok(self.shared.store.put(self.resource_id::<K>(), value, WriteMode::Create)?.rv)
    }

    /// Creates or replaces an object, ignoring its `metadata.resourceVersion`; returns the new resourceVersion.
    /// Stamps `resourceVersion`, `uid`, `creationTimestamp` and `generation` like the apiserver.
    pub fn apply<K>(&self, obj: &K) -> Result<u64>
    where
        K: k8s_openapi::Resource + Serialize,
        K::Scope: 'static,
    {
        let value = serde_json::to_value(obj)?;
        Ok(self.shared.store.put(self.resource_id::<K>(), value, WriteMode::Upsert)?.rv)
    }

    /// Replaces an existing object (404 if absent); a non-empty `metadata.resourceVersion` must be current (409).
    pub fn replace<K>(&self, obj: &K) -> Result<u64>
    where
        K: k8s_openapi::Resource + Serialize,
        K::Scope: 'static,
    {
        let value = serde_json::to_value(obj)?;
        Ok(self.shared.store.put(self.resource_id::<K>(), value, WriteMode::Update)?.rv)
    }

    /// Creates or replaces many objects with few lock acquisitions (the bulk path for benchmarks);
    /// returns the last resourceVersion.
    pub fn apply_many<K>(&self, objs: &[K]) -> Result<u64>
    where
        K: k8s_openapi::Resource + Serialize,
        K::Scope: 'static,
    {
        let id = self.resource_id::<K>();
        let items = objs.iter().map(|o| Ok((id, serde_json::to_value(o)?))).collect::<Result<Vec<_>>>()?;
        Ok(self.shared.store.put_many(items)?)
    }

    /// Creates or replaces objects given as JSON with `apiVersion` and `kind` (any registered resource);
    /// returns the last resourceVersion.
    pub fn apply_json(&self, objs: Vec<Value>) -> Result<u64> {
        let mut items = Vec::with_capacity(objs.len());
        for obj in objs {
            let api_version = obj["apiVersion"].as_str().unwrap_or_default();
            let kind = obj["kind"].as_str().unwrap_or_default();
            let id = self.shared.store.find_by_kind(api_version, kind).ok_or_else(|| ApiError {
                code: 400,
                reason: "BadRequest".into(),
                message: format!("unknown {api_version}/{kind}"),
                details: None,
            })?;
            items.push((id, obj));
        }
        Ok(self.shared.store.put_many(items)?)
    }

    /// Deletes an object (404 if absent); returns the deletion's resourceVersion.
    /// `namespace` is ignored for cluster-scoped kinds.
    pub fn delete<K>(&self, namespace: &str, name: &str) -> Result<u64>
    where
        K: k8s_openapi::Resource,
        K::Scope: 'static,
    {
        Ok(self.shared.store.delete(self.resource_id::<K>(), namespace, name, None)?.rv)
    }

    /// The current object, if any. `namespace` is ignored for cluster-scoped kinds.
    pub fn get<K>(&self, namespace: &str, name: &str) -> Result<Option<K>>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
        K::Scope: 'static,
    {
        match self.shared.store.get(self.resource_id::<K>(), namespace, name) {
            Some(obj) => Ok(Some(serde_json::from_slice(&obj.json)?)),
            None => Ok(None),
        }
    }

    /// Every object of a kind, sorted by namespace and name.
    pub fn list<K>(&self) -> Result<Vec<K>>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
        K::Scope: 'static,
    {
        let selector = selector::Selector::default();
        let q = ListQuery { namespace: None, after: None, limit: None, at: None, selector: &selector };
        let page = self.shared.store.list(self.resource_id::<K>(), &q)?;
        page.items.iter().map(|o| Ok(serde_json::from_slice(&o.json)?)).collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.resource_version()
    }

    /// Forgets all history, like an etcd compaction: watches from older revisions get an `ERROR` 410
    /// `Expired`, and so do list continue tokens from before. An open watch whose position predates the
    /// compaction (e.g. a quiet one, whose position only advances with its own resource's events or bookmarks)
    /// gets the 410 at its next event, so kube-rs relists.
    pub fn compact(&self) {
        self.shared.store.compact();
    }

    /// Ends every open watch stream, as an apiserver restart or a load balancer would.
    pub fn close_watches(&self) {
        self.shared.close_tx.send_modify(|epoch| *epoch += 1);
    }

    /// Sets the bookmark period for watches that asked for bookmarks (takes effect at each watch's next one).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.set_bookmark_interval(interval);
    }

    /// Makes every list request for a kind wait `delay` before it is answered (zero: no delay), as a slow or
    /// overloaded apiserver would; watches are not delayed.
    pub fn set_list_delay<K>(&self, delay: Duration)
    where
        K: k8s_openapi::Resource,
        K::Scope: 'static,
    {
        self.shared.set_list_delay(self.resource_id::<K>(), delay);
    }

    /// List and watch requests served for a kind so far.
    pub fn counts<K>(&self) -> RequestCounts
    where
        K: k8s_openapi::Resource,
        K::Scope: 'static,
    {
        let c = self.shared.store.counters(self.resource_id::<K>());
        RequestCounts { lists: c.lists.load(Ordering::Relaxed), watches: c.watches.load(Ordering::Relaxed) }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}
