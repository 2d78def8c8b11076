//! Kubernetes Events, as upstream kube-proxy records them (events.k8s.io/v1, reporting controller
//! `kube-proxy`): `Starting` on the Node at start-up, Warnings on the Node when a server cannot bind under
//! `bindAddressHardFail`, and on the Service when its health-check node port cannot listen.
//!
//! Posting never blocks the caller: events go through a bounded queue to one task; a full queue or a failed
//! POST is logged and the event dropped (events are best effort upstream too). The same event (object,
//! reason, note) is posted at most once per [`REPEAT_WINDOW`], so a listen failure retried on every sync does
//! not flood the API server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::mpsc;

/// The reporting controller of every event, as upstream.
pub const REPORTING_CONTROLLER: &str = "kube-proxy";
/// Events waiting to be posted; more are dropped (with a log line).
const QUEUE: usize = 64;
/// An identical event is not posted again within this window.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(300);

/// `Normal` or `Warning`, the two event types Kubernetes knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Something expected happened.
    Normal,
    /// Something an operator should look at.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One event to post.
#[derive(Debug, Clone)]
struct Pending {
    regarding: ObjectReference,
    ty: EventType,
    reason: &'static str,
    action: &'static str,
    note: String,
}

/// What the posting task receives.
#[derive(Debug)]
enum Msg {
    Post(Box<Pending>),
    /// Answered once everything queued before it was handled.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Records events; cheap to clone. [`EventRecorder::disabled`] drops everything (no API client).
#[derive(Debug, Clone)]
pub struct EventRecorder {
    tx: Option<mpsc::Sender<Msg>>,
    node_name: String,
}

impl EventRecorder {
    /// Starts the posting task on `handle`. `node_name` is the Node events are about; the reporting instance
    /// is `kube-proxy-<hostname>`, as upstream's event broadcaster names it.
    pub fn start(client: kube::Client, node_name: &str, handle: &tokio::runtime::Handle) -> EventRecorder {
        let (tx, rx) = mpsc::channel(QUEUE);
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let instance = format!("{REPORTING_CONTROLLER}-{host}");
        handle.spawn(post_events(client, instance, rx));
        EventRecorder { tx: Some(tx), node_name: node_name.to_string() }
    }

    /// A recorder that records nothing (tests, `--cleanup`).
    pub fn disabled(node_name: &str) -> EventRecorder {
        EventRecorder { tx: None, node_name: node_name.to_string() }
    }

    /// An event about this proxy's Node (involved object kind Node, name and UID = the node name, as upstream).
    pub fn node_event(&self, ty: EventType, reason: &'static str, action: &'static str, note: impl Into<String>) {
        let regarding = ObjectReference {
            kind: Some("Node".into()),
            name: Some(self.node_name.clone()),
            uid: Some(self.node_name.clone()),
            ..ObjectReference::default()
        };
        self.send(Pending { regarding, ty, reason, action, note: note.into() });
    }

    /// An event about the Service `namespace/name` (UID = `namespace/name`, as upstream's health-check server).
    pub fn service_event(
        &self,
        namespace: &str,
        name: &str,
        ty: EventType,
        reason: &'static str,
        action: &'static str,
        note: impl Into<String>,
    ) {
        let regarding = ObjectReference {
            kind: Some("Service".into()),
            namespace: Some(namespace.to_string()),
            name: Some(name.to_string()),
            // As upstream's health-check server: the UID is the namespaced name.
            uid: Some(format!("{namespace}/{name}")),
            ..ObjectReference::default()
        };
        self.send(Pending { regarding, ty, reason, action, note: note.into() });
    }

    fn send(&self, ev: Pending) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(Msg::Post(Box::new(ev))).is_err() {
            tracing::warn!("Event queue full or closed; dropping event");
        }
    }

    /// Waits (at most `timeout`) until the events recorded so far are posted or given up: before an exit, so
    /// the event that explains it reaches the API server.
    pub async fn flush(&self, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = tokio::sync::oneshot::channel();
        if tx.try_send(Msg::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(timeout, wait).await;
        }
    }
}

/// The Event object for `ev`, named `<object>.<hex nanoseconds>` in the object's namespace (`default` for
/// cluster-scoped objects), as upstream's recorder does.
fn event_object(ev: &Pending, instance: &str, now: k8s_openapi::jiff::Timestamp) -> Event {
    let object = ev.regarding.name.clone().unwrap_or_default();
    let namespace = ev.regarding.namespace.clone().unwrap_or_else(|| "default".into());
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{object}.{:x}", now.as_nanosecond())),
            namespace: Some(namespace),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(ev.action.to_string()),
        reason: Some(ev.reason.to_string()),
        note: Some(ev.note.clone()),
        type_: Some(ev.ty.as_str().to_string()),
        regarding: Some(ev.regarding.clone()),
        reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
        reporting_instance: Some(instance.to_string()),
        ..Event::default()
    }
}

/// What makes two events the same: object namespace and name, reason, note.
type EventKey = (Option<String>, Option<String>, &'static str, String);

async fn post_events(client: kube::Client, instance: String, mut rx: mpsc::Receiver<Msg>) {
    let mut last_posted: HashMap<EventKey, Instant> = HashMap::new();
    while let Some(msg) = rx.recv().await {
        let ev = match msg {
            Msg::Post(ev) => ev,
            Msg::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let key = (ev.regarding.namespace.clone(), ev.regarding.name.clone(), ev.reason, ev.note.clone());
        let now = Instant::now();
        if last_posted.get(&key).is_some_and(|t| now.duration_since(*t) < REPEAT_WINDOW) {
            tracing::debug!(reason = ev.reason, note = %ev.note, "Repeated event not posted again");
            continue;
        }
        last_posted.retain(|_, t| now.duration_since(*t) < REPEAT_WINDOW);
        let obj = event_object(&ev, &instance, k8s_openapi::jiff::Timestamp::now());
        let ns = obj.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {
                last_posted.insert(key, now);
                tracing::debug!(reason = ev.reason, object = ?ev.regarding.name, "Event posted");
            }
            Err(e) => {
                tracing::warn!(reason = ev.reason, object = ?ev.regarding.name, error = %e, "Posting event failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_events_live_in_default_and_name_the_node_as_uid() {
        let rec = EventRecorder::disabled("node-a");
        let regarding = ObjectReference {
            kind: Some("Node".into()),
            name: Some(rec.node_name.clone()),
            uid: Some(rec.node_name.clone()),
            ..ObjectReference::default()
        };
        let ev =
            Pending { regarding, ty: EventType::Normal, reason: "Starting", action: "StartKubeProxy", note: "".into() };
        let now = k8s_openapi::jiff::Timestamp::from_nanosecond(0x1234_5678_9abc).unwrap();
        let obj = event_object(&ev, "kube-proxy-host", now);
        assert_eq!(obj.metadata.name.as_deref(), Some("node-a.123456789abc"));
        assert_eq!(obj.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(obj.type_.as_deref(), Some("Normal"));
        assert_eq!(obj.reporting_controller.as_deref(), Some("kube-proxy"));
        assert_eq!(obj.reporting_instance.as_deref(), Some("kube-proxy-host"));
        assert_eq!(obj.regarding.as_ref().and_then(|r| r.uid.as_deref()), Some("node-a"));
    }
}
