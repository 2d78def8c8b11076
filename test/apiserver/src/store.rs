//! The object store: one global resourceVersion (like etcd's revision), and per resource the current
//! objects plus a bounded ring of past events that watches replay from.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::resource::{self, ResourceInfo};
use crate::selector::Selector;

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects. Sorting by it is etcd's key order.
pub(crate) type Key = (String, String);

/// One object version as stored: serialized once, shared by the store, the history and every reader.
#[derive(Debug)]
pub(crate) struct StoredObject {
    pub(crate) key: Key,
    pub(crate) rv: u64,
    /// Labels sorted by key, so selectors never parse the body.
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) json: Bytes,
}

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change in the history. `prev` lets filtered watches turn "stopped matching" into DELETED and lets
/// paginated lists reconstruct the state at their snapshot revision.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) ty: EventType,
    /// The new state; for DELETED the last state stamped with the deletion revision.
    pub(crate) object: Arc<StoredObject>,
    pub(crate) prev: Option<Arc<StoredObject>>,
}

/// Per-resource request counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) lists: AtomicU64,
    pub(crate) watches: AtomicU64,
}

struct Resource {
    info: Arc<ResourceInfo>,
    objects: BTreeMap<Key, Arc<StoredObject>>,
    history: VecDeque<Arc<Event>>,
    /// Every event with `rv > history_start` is still in `history`.
    history_start: u64,
    /// Carries the latest revision written to this resource; watches wait on it.
    notify: watch::Sender<u64>,
    counters: Arc<Counters>,
}

struct Inner {
    rv: u64,
    resources: Vec<Resource>,
    uid_seq: u64,
}

/// How a write treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Fail with 409 AlreadyExists if present.
    Create,
    /// Fail with 404 if absent; a non-empty `metadata.resourceVersion` must match (409 Conflict).
    Update,
    /// Create or replace, ignoring any `metadata.resourceVersion` in the input.
    Upsert,
}

/// What a list request asks for.
pub(crate) struct ListQuery<'a> {
    pub(crate) namespace: Option<&'a str>,
    pub(crate) after: Option<Key>,
    /// `None` or 0 means everything.
    pub(crate) limit: Option<usize>,
    /// Serve the state as of this revision (continue tokens, `resourceVersionMatch=Exact`); `None` = now.
    pub(crate) at: Option<u64>,
    pub(crate) selector: &'a Selector,
}

/// One page of a list.
pub(crate) struct ListPage {
    pub(crate) items: Vec<Arc<StoredObject>>,
    /// Revision the page reflects.
    pub(crate) rv: u64,
    /// Last key returned when more may follow.
    pub(crate) next: Option<Key>,
}

/// The store. All access goes through one `RwLock`; readers copy out `Arc`s and serialize outside it.
pub(crate) struct Store {
    inner: RwLock<Inner>,
    history_limit: usize,
    uid_seed: u64,
}

/// Objects written per lock acquisition in bulk loads, so readers and watches keep making progress.
const BULK_CHUNK: usize = 1000;

impl Store {
    pub(crate) fn new(history_limit: usize) -> Self {
        let uid_seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let store = Self {
            inner: RwLock::new(Inner { rv: 0, resources: Vec::new(), uid_seq: 0 }),
            history_limit: history_limit.max(1),
            uid_seed,
        };
        for info in resource::builtin() {
            store.ensure_resource(&info);
        }
        store
    }

    // A panic while holding the lock cannot leave the maps half-updated in a way readers care about,
    // so poisoning is ignored rather than propagated to every test.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds or registers a resource type; returns its id.
    pub(crate) fn ensure_resource(&self, info: &ResourceInfo) -> usize {
        let find = |inner: &Inner| {
            inner.resources.iter().position(|r| {
                r.info.group == info.group && r.info.version == info.version && r.info.plural == info.plural
            })
        };
        if let Some(id) = find(&self.read()) {
            return id;
        }
        let mut inner = self.write();
        if let Some(id) = find(&inner) {
            return id;
        }
        let rv = inner.rv;
        inner.resources.push(Resource {
            info: Arc::new(info.clone()),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_start: rv,
            notify: watch::channel(rv).0,
            counters: Arc::default(),
        });
        inner.resources.len() - 1
    }

    /// Looks a resource up by URL parts.
    pub(crate) fn find_resource(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.read()
            .resources
            .iter()
            .position(|r| r.info.group == group && r.info.version == version && r.info.plural == plural)
    }

    /// Looks a resource up by `apiVersion` and `kind`, as found in an object.
    pub(crate) fn find_by_kind(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.read().resources.iter().position(|r| r.info.kind == kind && r.info.api_version() == api_version)
    }

    pub(crate) fn resources(&self) -> Vec<Arc<ResourceInfo>> {
        self.read().resources.iter().map(|r| r.info.clone()).collect()
    }

    pub(crate) fn info(&self, id: usize) -> Arc<ResourceInfo> {
        self.read().resources[id].info.clone()
    }

    pub(crate) fn counters(&self, id: usize) -> Arc<Counters> {
        self.read().resources[id].counters.clone()
    }

    pub(crate) fn subscribe(&self, id: usize) -> watch::Receiver<u64> {
        self.read().resources[id].notify.subscribe()
    }

    /// Current global revision.
    pub(crate) fn resource_version(&self) -> u64 {
        self.read().rv
    }

    /// Writes one object.
    pub(crate) fn put(&self, id: usize, obj: Value, mode: WriteMode) -> Result<Arc<StoredObject>, ApiError> {
        let now = now_rfc3339();
        let stored = {
            let mut inner = self.write();
            put_locked(&mut inner, id, obj, mode, &now, self.uid_seed, self.history_limit)?
        };
        self.notify(&[id], stored.rv);
        Ok(stored)
    }

    /// Creates or replaces many objects, a chunk per lock acquisition; returns the last revision.
    /// Fails before writing anything if an object lacks a name.
    pub(crate) fn put_many(&self, items: Vec<(usize, Value)>) -> Result<u64, ApiError> {
        for (id, obj) in &items {
            if object_name(obj).is_none() {
                return Err(ApiError::invalid(&self.info(*id), "", "metadata.name: Required value"));
            }
        }
        let now = now_rfc3339();
        let mut last = self.resource_version();
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut touched = Vec::new();
            {
                let mut inner = self.write();
                for (id, obj) in items.by_ref().take(BULK_CHUNK) {
                    last =
                        put_locked(&mut inner, id, obj, WriteMode::Upsert, &now, self.uid_seed, self.history_limit)?.rv;
                    if !touched.contains(&id) {
                        touched.push(id);
                    }
                }
            }
            self.notify(&touched, last);
        }
        Ok(last)
    }

    /// Deletes an object; `precondition` is a resourceVersion that must match.
    pub(crate) fn delete(
        &self,
        id: usize,
        namespace: &str,
        name: &str,
        precondition: Option<u64>,
    ) -> Result<Arc<StoredObject>, ApiError> {
        let tomb = {
            let mut inner = self.write();
            let rv = inner.rv + 1;
            let limit = self.history_limit;
            let res = &mut inner.resources[id];
            let key = (if res.info.namespaced { namespace.to_string() } else { String::new() }, name.to_string());
            let Some(old) = res.objects.get(&key) else {
                return Err(ApiError::not_found(&res.info, name));
            };
            if precondition.is_some_and(|p| p != old.rv) {
                return Err(ApiError::conflict(&res.info, name));
            }
            let old = res.objects.remove(&key).expect("checked above");
            // The DELETED event carries the last state stamped with the deletion revision, as upstream.
            let mut value: Value =
                serde_json::from_slice(&old.json).map_err(|e| ApiError::bad_request(e.to_string()))?;
            value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            let json = to_exact_bytes(&value)?;
            let tomb = Arc::new(StoredObject { key, rv, labels: old.labels.clone(), json });
            res.push_event(Event { rv, ty: EventType::Deleted, object: tomb.clone(), prev: Some(old) }, limit);
            inner.rv = rv;
            tomb
        };
        self.notify(&[id], tomb.rv);
        Ok(tomb)
    }

    pub(crate) fn get(&self, id: usize, namespace: &str, name: &str) -> Option<Arc<StoredObject>> {
        let inner = self.read();
        let res = &inner.resources[id];
        let ns = if res.info.namespaced { namespace } else { "" };
        res.objects.get(&(ns.to_string(), name.to_string())).cloned()
    }

    /// Every object (of one namespace if given) and the revision they reflect, for watch initial events.
    pub(crate) fn snapshot(&self, id: usize, namespace: Option<&str>) -> (Vec<Arc<StoredObject>>, u64) {
        let inner = self.read();
        let res = &inner.resources[id];
        let items = match namespace {
            Some(ns) => res
                .objects
                .range((ns.to_string(), String::new())..)
                .take_while(|(k, _)| k.0 == ns)
                .map(|(_, o)| o.clone())
                .collect(),
            None => res.objects.values().cloned().collect(),
        };
        (items, inner.rv)
    }

    /// One page of a list, consistent as of `query.at` (or now).
    pub(crate) fn list(&self, id: usize, query: &ListQuery<'_>) -> Result<ListPage, ApiError> {
        let inner = self.read();
        let res = &inner.resources[id];
        let at = query.at.filter(|&a| a < inner.rv);
        let in_ns = |k: &Key| query.namespace.is_none_or(|ns| k.0 == ns);
        let in_range = |k: &Key| in_ns(k) && query.after.as_ref().is_none_or(|a| k > a);

        // Keys changed after the snapshot map to their state at the snapshot (None = did not exist).
        let mut overrides: BTreeMap<&Key, Option<&Arc<StoredObject>>> = BTreeMap::new();
        if let Some(at) = at {
            if at < res.history_start {
                return Err(ApiError::expired(format!(
                    "too old resource version: {at} ({}); the list snapshot has been compacted, start a new list",
                    res.history_start
                )));
            }
            let pos = res.history.partition_point(|e| e.rv <= at);
            for e in res.history.range(pos..) {
                if in_range(&e.object.key) {
                    overrides.entry(&e.object.key).or_insert(e.prev.as_ref());
                }
            }
        }

        let lower = match (&query.after, query.namespace) {
            (Some(k), _) => Bound::Excluded(k.clone()),
            (None, Some(ns)) => Bound::Included((ns.to_string(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let mut cur = res.objects.range((lower, Bound::Unbounded)).take_while(|(k, _)| in_ns(k)).peekable();
        let mut ov = overrides.into_iter().peekable();
        let limit = query.limit.filter(|&l| l > 0).unwrap_or(usize::MAX);
        let mut items: Vec<Arc<StoredObject>> = Vec::new();
        let mut next = None;
        loop {
            let candidate = match (cur.peek(), ov.peek()) {
                (None, None) => break,
                (Some((ck, _)), Some((ok, _))) => match (*ck).cmp(*ok) {
                    Ordering::Less => cur.next().map(|(_, o)| Some(o)),
                    Ordering::Equal => {
                        cur.next();
                        ov.next().map(|(_, o)| o)
                    }
                    Ordering::Greater => ov.next().map(|(_, o)| o),
                },
                (Some(_), None) => cur.next().map(|(_, o)| Some(o)),
                (None, Some(_)) => ov.next().map(|(_, o)| o),
            };
            let Some(Some(obj)) = candidate else { continue };
            if items.len() == limit {
                next = items.last().map(|o| o.key.clone());
                break;
            }
            if query.selector.matches(obj) {
                items.push(obj.clone());
            }
        }
        Ok(ListPage { items, rv: at.unwrap_or(inner.rv), next })
    }

    /// Up to `max` events after `cursor`, and the revision the caller has seen everything up to afterwards.
    /// Fails with 410 when `cursor` is older than the retained history.
    pub(crate) fn events_after(&self, id: usize, cursor: u64, max: usize) -> Result<(Vec<Arc<Event>>, u64), ApiError> {
        let inner = self.read();
        let res = &inner.resources[id];
        if cursor < res.history_start {
            return Err(ApiError::expired(format!("too old resource version: {cursor} ({})", res.history_start)));
        }
        let pos = res.history.partition_point(|e| e.rv <= cursor);
        let end = pos.saturating_add(max).min(res.history.len());
        let batch: Vec<_> = res.history.range(pos..end).cloned().collect();
        // Having read to the end under the lock means nothing else of this resource exists up to the global rv.
        let seen = if end == res.history.len() { inner.rv.max(cursor) } else { batch.last().map_or(cursor, |e| e.rv) };
        Ok((batch, seen))
    }

    /// Forgets all history: watches and continue tokens from older revisions get 410 Gone.
    pub(crate) fn compact(&self) {
        let mut inner = self.write();
        let rv = inner.rv;
        for res in &mut inner.resources {
            res.history.clear();
            res.history_start = rv;
        }
    }

    fn notify(&self, ids: &[usize], rv: u64) {
        let inner = self.read();
        for &id in ids {
            inner.resources[id].notify.send_replace(rv);
        }
    }
}

impl Resource {
    fn push_event(&mut self, event: Event, limit: usize) {
        self.history.push_back(Arc::new(event));
        while self.history.len() > limit {
            if let Some(old) = self.history.pop_front() {
                self.history_start = old.rv;
            }
        }
    }
}

fn object_name(obj: &Value) -> Option<&str> {
    let meta = obj.get("metadata")?;
    meta.get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .or_else(|| meta.get("generateName").and_then(Value::as_str).filter(|n| !n.is_empty()))
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn generation_relevant(obj: &Value) -> Vec<(&String, &Value)> {
    obj.as_object()
        .map(|m| m.iter().filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status")).collect())
        .unwrap_or_default()
}

/// The write itself, under the lock: stamps metadata, serializes once, records the event.
fn put_locked(
    inner: &mut Inner,
    id: usize,
    mut obj: Value,
    mode: WriteMode,
    now: &str,
    uid_seed: u64,
    history_limit: usize,
) -> Result<Arc<StoredObject>, ApiError> {
    inner.uid_seq += 1;
    let uid_seq = inner.uid_seq;
    let rv = inner.rv + 1;
    let res = &mut inner.resources[id];
    let info = res.info.clone();
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request("object must be a JSON object"));
    };
    map.insert("apiVersion".into(), Value::String(info.api_version()));
    map.insert("kind".into(), Value::String(info.kind.clone()));
    let meta = map.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return Err(ApiError::bad_request("metadata must be a JSON object"));
    };

    let mut name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
    if name.is_empty() {
        let prefix = meta.get("generateName").and_then(Value::as_str).unwrap_or_default();
        if prefix.is_empty() || mode != WriteMode::Create {
            return Err(ApiError::invalid(
                &info,
                "",
                "metadata.name: Required value: name or generateName is required",
            ));
        }
        name = format!("{prefix}{}", suffix(uid_seed ^ uid_seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        meta.insert("name".into(), Value::String(name.clone()));
    }
    let namespace = if info.namespaced {
        let ns = meta.get("namespace").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or("default");
        let ns = ns.to_string();
        meta.insert("namespace".into(), Value::String(ns.clone()));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    let key = (namespace, name);

    let existing = res.objects.get(&key).cloned();
    let requested_rv = meta.get("resourceVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    match (mode, &existing) {
        (WriteMode::Create, Some(_)) => return Err(ApiError::already_exists(&info, &key.1)),
        (WriteMode::Update, None) => return Err(ApiError::not_found(&info, &key.1)),
        (WriteMode::Update, Some(old)) if !requested_rv.is_empty() && requested_rv != old.rv.to_string() => {
            return Err(ApiError::conflict(&info, &key.1));
        }
        _ => {}
    }

    let old_value: Option<Value> = existing.as_ref().and_then(|o| serde_json::from_slice(&o.json).ok());
    let old_meta = old_value.as_ref().and_then(|v| v.get("metadata"));
    let keep = |field: &str| old_meta.and_then(|m| m.get(field)).cloned();
    let uid = keep("uid").unwrap_or_else(|| Value::String(uid(uid_seed, uid_seq)));
    let created = keep("creationTimestamp").unwrap_or_else(|| Value::String(now.to_string()));
    meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    meta.insert("uid".into(), uid);
    meta.insert("creationTimestamp".into(), created);
    let mut labels: Vec<(String, String)> = meta
        .get("labels")
        .and_then(Value::as_object)
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    labels.sort();

    let generation = match &old_value {
        None => 1,
        Some(old) => {
            let old_gen = old_meta.and_then(|m| m.get("generation")).and_then(Value::as_u64).unwrap_or(1);
            if generation_relevant(old) == generation_relevant(&obj) { old_gen } else { old_gen + 1 }
        }
    };
    obj["metadata"]["generation"] = Value::from(generation);

    let json = to_exact_bytes(&obj)?;
    let stored = Arc::new(StoredObject { key: key.clone(), rv, labels, json });
    let prev = res.objects.insert(key, stored.clone());
    let ty = if prev.is_some() { EventType::Modified } else { EventType::Added };
    res.push_event(Event { rv, ty, object: stored.clone(), prev }, history_limit);
    inner.rv = rv;
    Ok(stored)
}

/// Serializes into an exactly-sized buffer: `to_vec`'s doubling growth would keep up to 2x per stored object.
fn to_exact_bytes(value: &Value) -> Result<Bytes, ApiError> {
    let mut json = serde_json::to_vec(value).map_err(|e| ApiError::bad_request(e.to_string()))?;
    json.shrink_to_fit();
    Ok(Bytes::from(json))
}

/// A UUID-shaped, unique-per-process id.
fn uid(seed: u64, seq: u64) -> String {
    let a = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ seq;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        a as u16 & 0xfff,
        (seq >> 48) as u16 & 0xfff,
        seq & 0xffff_ffff_ffff
    )
}

/// Five lowercase alphanumerics, like the apiserver's generateName suffix.
fn suffix(mut n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// Current time as RFC 3339 with second precision, the format of `metav1.Time`.
pub(crate) fn now_rfc3339() -> String {
    // Via Unix seconds: jiff's SystemTime support needs a feature k8s-openapi does not always enable.
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {"clusterIP": "10.0.0.1"}})
    }

    #[test]
    fn rfc3339_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn paginated_list_is_consistent_with_its_snapshot() {
        let store = Store::new(1000);
        let id = store.find_resource("", "v1", "services").unwrap();
        for i in 0..10 {
            store.put(id, svc(&format!("s{i}")), WriteMode::Create).unwrap();
        }
        let all = Selector::default();
        let q = |after, at| ListQuery { namespace: None, after, limit: Some(4), at, selector: &all };
        let p1 = store.list(id, &q(None, None)).unwrap();
        assert_eq!(p1.items.len(), 4);
        let snap = p1.rv;
        // Mutations after the snapshot must not leak into later pages.
        store.delete(id, "ns", "s5", None).unwrap();
        store.put(id, svc("s6"), WriteMode::Upsert).unwrap();
        store.put(id, svc("s55"), WriteMode::Create).unwrap();
        let p2 = store.list(id, &q(p1.next.clone(), Some(snap))).unwrap();
        let names: Vec<_> = p2.items.iter().map(|o| o.key.1.as_str()).collect();
        assert_eq!(names, ["s4", "s5", "s6", "s7"]);
        assert!(p2.items.iter().all(|o| o.rv <= snap));
        let p3 = store.list(id, &q(p2.next.clone(), Some(snap))).unwrap();
        let names: Vec<_> = p3.items.iter().map(|o| o.key.1.as_str()).collect();
        assert_eq!(names, ["s8", "s9"]);
        assert!(p3.next.is_none());
        store.compact();
        assert_eq!(store.list(id, &q(p2.next, Some(snap))).err().map(|e| e.code), Some(410));
    }

    #[test]
    fn history_ring_is_bounded() {
        let store = Store::new(3);
        let id = store.find_resource("", "v1", "services").unwrap();
        for i in 0..5 {
            store.put(id, svc(&format!("s{i}")), WriteMode::Create).unwrap();
        }
        assert_eq!(store.events_after(id, 1, 10).err().map(|e| e.code), Some(410));
        let (events, seen) = store.events_after(id, 2, 10).unwrap();
        assert_eq!(events.iter().map(|e| e.rv).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(seen, 5);
    }

    #[test]
    fn writes_stamp_metadata() {
        let store = Store::new(10);
        let id = store.find_resource("", "v1", "services").unwrap();
        let a = store.put(id, svc("a"), WriteMode::Create).unwrap();
        assert_eq!(store.put(id, svc("a"), WriteMode::Create).unwrap_err().code, 409);
        let mut stale = svc("a");
        stale["metadata"]["resourceVersion"] = json!("999");
        assert_eq!(store.put(id, stale, WriteMode::Update).unwrap_err().code, 409);
        let mut changed = svc("a");
        changed["spec"]["clusterIP"] = json!("10.0.0.2");
        let b = store.put(id, changed, WriteMode::Update).unwrap();
        let (va, vb): (Value, Value) =
            (serde_json::from_slice(&a.json).unwrap(), serde_json::from_slice(&b.json).unwrap());
        assert_eq!(va["metadata"]["uid"], vb["metadata"]["uid"]);
        assert_eq!(vb["metadata"]["generation"], 2);
        assert_eq!(vb["metadata"]["resourceVersion"], "2");
        assert_eq!(vb["kind"], "Service");
    }
}
