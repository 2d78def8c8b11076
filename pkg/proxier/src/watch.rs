//! Watches Services, EndpointSlices and this proxy's Node with kube-rs, with upstream's selectors, and feeds
//! the [`ChangeTracker`].

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::tracker::ChangeTracker;

/// Services labelled with either key are not ours: another proxy owns them, or they are headless.
pub const PROXY_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Headless Services have nothing to proxy.
pub const SERVICE_FIELD_SELECTOR: &str = "spec.clusterIP!=None";

/// A watch that ended for good (the stream only ends when the client is dropped).
#[derive(Debug, thiserror::Error)]
#[error("watch of {resource} ended unexpectedly")]
pub struct WatchEnded {
    /// The resource whose watch ended.
    pub resource: &'static str,
}

trait Sink<K>: Send + Sync {
    fn apply(&self, obj: &K);
    fn delete(&self, namespace: &str, name: &str);
    fn synced(&self) {}
}

struct ServiceSink(Arc<ChangeTracker>);
impl Sink<Service> for ServiceSink {
    fn apply(&self, obj: &Service) {
        self.0.on_service(obj);
    }
    fn delete(&self, ns: &str, name: &str) {
        self.0.on_service_delete(ns, name);
    }
    fn synced(&self) {
        self.0.services_synced();
    }
}

struct SliceSink(Arc<ChangeTracker>);
impl Sink<EndpointSlice> for SliceSink {
    fn apply(&self, obj: &EndpointSlice) {
        self.0.on_endpoint_slice(obj);
    }
    fn delete(&self, ns: &str, name: &str) {
        self.0.on_endpoint_slice_delete(ns, name);
    }
    fn synced(&self) {
        self.0.endpoint_slices_synced();
    }
}

struct NodeSink(Arc<ChangeTracker>);
impl Sink<Node> for NodeSink {
    fn apply(&self, obj: &Node) {
        self.0.on_node(obj);
    }
    fn delete(&self, _ns: &str, _name: &str) {
        self.0.on_node_delete();
    }
    fn synced(&self) {
        self.0.node_synced();
    }
}

fn key_of<K: Resource>(obj: &K) -> (String, String) {
    let m = obj.meta();
    (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default())
}

/// Runs one watch forever, turning relists into deletions of objects that vanished meanwhile.
async fn run_watch<K>(api: Api<K>, config: watcher::Config, sink: impl Sink<K>, resource: &'static str) -> WatchEnded
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut live: HashSet<(String, String)> = HashSet::new();
    let mut relist: HashSet<(String, String)> = HashSet::new();
    let mut synced = false;
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    loop {
        match stream.try_next().await {
            Ok(Some(Event::Init)) => relist.clear(),
            Ok(Some(Event::InitApply(obj))) => {
                relist.insert(key_of(&obj));
                sink.apply(&obj);
            }
            Ok(Some(Event::InitDone)) => {
                for (ns, name) in live.difference(&relist) {
                    sink.delete(ns, name);
                }
                live = std::mem::take(&mut relist);
                if !synced {
                    synced = true;
                    tracing::info!(resource, objects = live.len(), "Initial list done");
                    sink.synced();
                }
            }
            Ok(Some(Event::Apply(obj))) => {
                live.insert(key_of(&obj));
                sink.apply(&obj);
            }
            Ok(Some(Event::Delete(obj))) => {
                let (ns, name) = key_of(&obj);
                live.remove(&(ns.clone(), name.clone()));
                sink.delete(&ns, &name);
            }
            Ok(None) => return WatchEnded { resource },
            // The backoff wrapper retries; an error here is transient (network, 410 handled by relist).
            Err(e) => tracing::warn!(resource, error = %e, "Watch error; retrying"),
        }
    }
}

/// Watches Services, EndpointSlices and the Node `node_name` and feeds `tracker` until a watch ends.
pub async fn run_watchers(client: Client, tracker: Arc<ChangeTracker>, node_name: &str) -> WatchEnded {
    let svc_cfg = watcher::Config::default().labels(PROXY_LABEL_SELECTOR).fields(SERVICE_FIELD_SELECTOR);
    let slice_cfg = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let services = run_watch(Api::<Service>::all(client.clone()), svc_cfg, ServiceSink(tracker.clone()), "services");
    let slices =
        run_watch(Api::<EndpointSlice>::all(client.clone()), slice_cfg, SliceSink(tracker.clone()), "endpointslices");
    let nodes = run_watch(Api::<Node>::all(client), node_cfg, NodeSink(tracker), "nodes");
    tokio::select! {
        e = services => e,
        e = slices => e,
        e = nodes => e,
    }
}
