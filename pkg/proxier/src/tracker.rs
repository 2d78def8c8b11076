//! The change tracker: folds Service, EndpointSlice and Node events into pending changes and, at sync
//! time, into the [`Snapshot`] plus the set of [`ServicePortName`]s that changed.
//!
//! Watchers call the `on_*` methods from any thread; the sync runner calls [`ChangeTracker::checkout`]
//! and then [`apply_checkout`] on the snapshot it owns, so a long backend sync never blocks watchers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{
    Changes, Endpoint, HealthCheckService, IpFamily, NamespacedName, NodeInfo, Protocol, ServicePortInfo,
    ServicePortName, ServicePortState, Snapshot,
};
use crate::parse::{ParseError, ParsedService, ParsedSlice, parse_endpoint_slice, parse_service_named};
use crate::selection::{NodeTopology, categorize_shared};

/// Zone label on Nodes.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Taint the cluster autoscaler puts on nodes it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Receives the tracker's bookkeeping (metrics, health); all methods have no-op defaults.
pub trait TrackerObserver: Send + Sync {
    /// A Service change was recorded; `pending` Services now have pending changes.
    fn service_change(&self, _pending: usize) {}
    /// An EndpointSlice change was recorded; `pending` slices now have pending changes.
    fn endpoint_change(&self, _pending: usize) {}
    /// A change is queued for these families (upstream's `QueuedUpdate`).
    fn queued(&self, _families: &[IpFamily]) {}
    /// A malformed object of `kind` was skipped.
    fn invalid_object(&self, _kind: &'static str) {}
    /// The Node's eligibility for `/healthz` changed.
    fn node_eligible(&self, _eligible: bool) {}
}

/// An observer that ignores everything.
pub struct NoopObserver;
impl TrackerObserver for NoopObserver {}

type SpnEndpoints = HashMap<ServicePortName, Arc<Vec<Endpoint>>>;
/// A Service port's new state, `None` when the port is gone.
pub type PortUpdate = Option<(Arc<ServicePortInfo>, Arc<Vec<Endpoint>>)>;

#[derive(Default)]
struct State {
    // Committed as of the last checkout.
    services: HashMap<NamespacedName, Arc<ParsedService>>,
    slices: HashMap<NamespacedName, Arc<ParsedSlice>>,
    slices_by_service: HashMap<NamespacedName, BTreeSet<NamespacedName>>,
    endpoints: [SpnEndpoints; 2],
    endpoint_ports_by_service: [HashMap<NamespacedName, BTreeSet<ServicePortName>>; 2],
    node: NodeInfo,
    // Pending since the last checkout: the object's current state, `None` when deleted or invalid.
    pending_services: HashMap<NamespacedName, Option<Arc<ParsedService>>>,
    pending_slices: HashMap<NamespacedName, Option<Arc<ParsedSlice>>>,
    pending_node: Option<NodeInfo>,
    // Invalid objects already logged, with the error text, so each problem is logged once.
    invalid_logged: HashMap<(&'static str, NamespacedName), String>,
    services_synced: bool,
    slices_synced: bool,
    // The own Node's first list is done (found or not): node addresses feed NodePort and tc attachment,
    // and a first sync without them would detach what a previous run left attached.
    node_synced: bool,
    dirty: bool,
    shutdown: bool,
}

impl State {
    /// Every initial list is done, so a sync sees the whole state.
    fn ready(&self) -> bool {
        self.services_synced && self.slices_synced && self.node_synced
    }

    /// The name already held for Service `nn`, so a slice's names share its storage.
    fn known_service(&self, nn: &NamespacedName) -> Option<NamespacedName> {
        let held = self.services.get_key_value(nn).map(|(k, _)| k);
        held.or_else(|| self.slices_by_service.get_key_value(nn).map(|(k, _)| k)).cloned()
    }
}

/// Folds watch events into pending changes; see the module docs.
pub struct ChangeTracker {
    node_name: String,
    prefer_same_node_hints: bool,
    observer: Arc<dyn TrackerObserver>,
    state: Mutex<State>,
    wake: Condvar,
}

/// Everything a checkout found changed, with the current model values copied out of the tracker.
#[derive(Debug, Default)]
pub struct Checkout {
    /// Per family: changed Service ports and their new state (`None` when the port is gone).
    pub updates: [BTreeMap<ServicePortName, PortUpdate>; 2],
    /// Services whose health-check bookkeeping must be recomputed, per family.
    pub touched_services: [BTreeSet<NamespacedName>; 2],
    /// A UDP port's endpoints or frontends changed, per family.
    pub conntrack_cleanup: [bool; 2],
    /// Trigger times of changed EndpointSlices, per family.
    pub trigger_times: [Vec<SystemTime>; 2],
    /// The Node's topology or addresses changed: every port must be recomputed.
    pub node_changed: bool,
    /// The Node as now known.
    pub node: NodeInfo,
    /// Objects with pending changes that were folded in (for metrics), services then slices.
    pub folded: (usize, usize),
}

fn idx(f: IpFamily) -> usize {
    match f {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

fn nn_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> NamespacedName {
    NamespacedName::new(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

impl ChangeTracker {
    /// A tracker for the proxy on `node_name`; `prefer_same_node_hints` is the `PreferSameTrafficDistribution` gate.
    pub fn new(node_name: &str, prefer_same_node_hints: bool, observer: Arc<dyn TrackerObserver>) -> Self {
        let state = State { node: NodeInfo { name: node_name.to_string(), ..NodeInfo::default() }, ..State::default() };
        ChangeTracker {
            node_name: node_name.to_string(),
            prefer_same_node_hints,
            observer,
            state: Mutex::new(state),
            wake: Condvar::new(),
        }
    }

    /// The node this tracker selects endpoints for.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop the proxy from tracking; the state is plain data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_invalid(&self, st: &mut State, kind: &'static str, nn: NamespacedName, err: &ParseError) {
        let text = err.to_string();
        let key = (kind, nn);
        if st.invalid_logged.get(&key) != Some(&text) {
            tracing::error!(kind, object = %key.1, error = %text, "Skipping invalid object");
            self.observer.invalid_object(kind);
            st.invalid_logged.insert(key, text);
        }
    }

    fn mark_dirty(&self, st: &mut State, families: &[IpFamily]) {
        st.dirty = true;
        if st.ready() {
            self.observer.queued(families);
        }
        self.wake.notify_all();
    }

    /// A Service was added or updated.
    pub fn on_service(&self, svc: &Service) {
        let nn = nn_of(&svc.metadata);
        let parsed = match parse_service_named(svc, Some(&nn)) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                let mut st = self.lock();
                self.log_invalid(&mut st, "Service", nn.clone(), &e);
                drop(st);
                None
            }
        };
        if parsed.is_some() {
            self.lock().invalid_logged.remove(&("Service", nn.clone()));
        }
        self.record_service(nn, parsed);
    }

    /// A Service was deleted.
    pub fn on_service_delete(&self, namespace: &str, name: &str) {
        let nn = NamespacedName::new(namespace, name);
        self.lock().invalid_logged.remove(&("Service", nn.clone()));
        self.record_service(nn, None);
    }

    fn record_service(&self, nn: NamespacedName, new: Option<Arc<ParsedService>>) {
        let mut st = self.lock();
        let committed = st.services.get(&nn).cloned();
        let families = families_touched(committed.as_deref(), new.as_deref());
        if committed.as_deref() == new.as_deref() {
            // Back to the committed state: nothing pending for this Service.
            if st.pending_services.remove(&nn).is_none() {
                return;
            }
        } else {
            st.pending_services.insert(nn, new);
        }
        self.observer.service_change(st.pending_services.len());
        self.mark_dirty(&mut st, &families);
    }

    /// An EndpointSlice was added or updated.
    pub fn on_endpoint_slice(&self, slice: &EndpointSlice) {
        let key = nn_of(&slice.metadata);
        let parsed = match parse_endpoint_slice(slice, &self.node_name) {
            Ok(p) => Some(p),
            Err(e) => {
                let mut st = self.lock();
                self.log_invalid(&mut st, "EndpointSlice", key.clone(), &e);
                drop(st);
                None
            }
        };
        if parsed.is_some() {
            self.lock().invalid_logged.remove(&("EndpointSlice", key.clone()));
        }
        self.record_slice(key, parsed);
    }

    /// An EndpointSlice was deleted.
    pub fn on_endpoint_slice_delete(&self, namespace: &str, name: &str) {
        let key = NamespacedName::new(namespace, name);
        self.lock().invalid_logged.remove(&("EndpointSlice", key.clone()));
        self.record_slice(key, None);
    }

    fn record_slice(&self, key: NamespacedName, new: Option<ParsedSlice>) {
        let mut st = self.lock();
        let new = new.map(|mut s| {
            if let Some(nn) = st.known_service(&s.service) {
                s.service = nn;
            }
            Arc::new(s)
        });
        let committed = st.slices.get(&key).cloned();
        let families: Vec<IpFamily> = committed.iter().chain(new.iter()).map(|s| s.family).collect();
        if committed.as_deref() == new.as_deref() {
            if st.pending_slices.remove(&key).is_none() {
                return;
            }
        } else {
            st.pending_slices.insert(key, new);
        }
        self.observer.endpoint_change(st.pending_slices.len());
        self.mark_dirty(&mut st, &families);
    }

    /// This proxy's Node was added or updated.
    pub fn on_node(&self, node: &Node) {
        let info = node_info(node, &self.node_name);
        self.observer.node_eligible(info.eligible);
        let mut st = self.lock();
        let current = st.pending_node.as_ref().unwrap_or(&st.node);
        if *current == info {
            return;
        }
        st.pending_node = Some(info);
        self.mark_dirty(&mut st, &IpFamily::ALL);
    }

    /// This proxy's Node was deleted.
    pub fn on_node_delete(&self) {
        self.observer.node_eligible(false);
        let mut st = self.lock();
        let info = NodeInfo { name: self.node_name.clone(), ..NodeInfo::default() };
        st.pending_node = Some(info);
        self.mark_dirty(&mut st, &IpFamily::ALL);
    }

    /// The Service watch finished its first list.
    pub fn services_synced(&self) {
        let mut st = self.lock();
        st.services_synced = true;
        self.wake.notify_all();
    }

    /// The EndpointSlice watch finished its first list.
    pub fn endpoint_slices_synced(&self) {
        let mut st = self.lock();
        st.slices_synced = true;
        self.wake.notify_all();
    }

    /// The own Node's watch finished its first list (whether or not the Node exists).
    pub fn node_synced(&self) {
        let mut st = self.lock();
        st.node_synced = true;
        self.wake.notify_all();
    }

    /// Services, EndpointSlices and the own Node have been listed once.
    pub fn is_synced(&self) -> bool {
        self.lock().ready()
    }

    /// Changes are pending since the last checkout.
    pub fn has_pending(&self) -> bool {
        self.lock().dirty
    }

    /// Waits until changes are pending (after the initial sync) or `timeout` passes or shutdown is requested.
    /// Returns true when changes are pending.
    pub fn wait_for_changes(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let ready = st.ready();
            if st.shutdown || (ready && st.dirty) {
                return ready && st.dirty;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.wake.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits until every initial list is done; false on timeout or shutdown.
    pub fn wait_for_sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.ready() {
                return true;
            }
            let now = Instant::now();
            if st.shutdown || now >= deadline {
                return false;
            }
            st = self.wake.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Wakes every waiter and makes waits return at once (process exit, tests).
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        self.wake.notify_all();
    }

    /// The shutdown flag.
    pub fn is_shutdown(&self) -> bool {
        self.lock().shutdown
    }

    /// Folds pending changes into the committed state and returns what changed. With `full`, every
    /// known Service port is reported as an update.
    pub fn checkout(&self, full: bool) -> Checkout {
        let mut st = self.lock();
        let st = &mut *st;
        st.dirty = false;
        let mut out = Checkout::default();
        let mut changed: [BTreeSet<ServicePortName>; 2] = Default::default();

        let pending_services = std::mem::take(&mut st.pending_services);
        let pending_slices = std::mem::take(&mut st.pending_slices);
        out.folded = (pending_services.len(), pending_slices.len());

        for (nn, new) in pending_services {
            let old = match &new {
                Some(p) => st.services.insert(nn.clone(), p.clone()),
                None => st.services.remove(&nn),
            };
            for f in IpFamily::ALL {
                let empty = BTreeMap::new();
                let o = old.as_deref().map(|p| p.family(f)).unwrap_or(&empty);
                let n = new.as_deref().map(|p| p.family(f)).unwrap_or(&empty);
                let mut any = false;
                for spn in o.keys().chain(n.keys()) {
                    if o.get(spn) != n.get(spn) {
                        any = true;
                        if spn.protocol == Protocol::Udp {
                            out.conntrack_cleanup[idx(f)] = true;
                        }
                        changed[idx(f)].insert(spn.clone());
                    }
                }
                if any {
                    out.touched_services[idx(f)].insert(nn.clone());
                }
            }
        }

        let mut services_to_merge: BTreeSet<NamespacedName> = BTreeSet::new();
        for (key, new) in pending_slices {
            let old = match &new {
                Some(s) => st.slices.insert(key.clone(), s.clone()),
                None => st.slices.remove(&key),
            };
            for s in old.iter().chain(new.iter()) {
                services_to_merge.insert(s.service.clone());
                if let Some(t) = s.trigger_time {
                    out.trigger_times[idx(s.family)].push(t);
                }
            }
            if let Some(o) = &old
                && let Some(set) = st.slices_by_service.get_mut(&o.service)
            {
                set.remove(&key);
                if set.is_empty() {
                    st.slices_by_service.remove(&o.service);
                }
            }
            if let Some(n) = &new {
                st.slices_by_service.entry(n.service.clone()).or_default().insert(key.clone());
            }
        }
        for svc in services_to_merge {
            for f in IpFamily::ALL {
                let merged = merge_endpoints(st, &svc, f);
                let i = idx(f);
                let old_ports = st.endpoint_ports_by_service[i].remove(&svc).unwrap_or_default();
                let new_ports: BTreeSet<ServicePortName> = merged.keys().cloned().collect();
                for spn in old_ports.difference(&new_ports) {
                    st.endpoints[i].remove(spn);
                    if spn.protocol == Protocol::Udp {
                        out.conntrack_cleanup[i] = true;
                    }
                    changed[i].insert(spn.clone());
                    out.touched_services[i].insert(svc.clone());
                }
                for (spn, eps) in merged {
                    if st.endpoints[i].get(&spn).map(|e| e.as_slice()) != Some(eps.as_slice()) {
                        if spn.protocol == Protocol::Udp {
                            out.conntrack_cleanup[i] = true;
                        }
                        changed[i].insert(spn.clone());
                        out.touched_services[i].insert(svc.clone());
                        st.endpoints[i].insert(spn, Arc::new(eps));
                    }
                }
                if !new_ports.is_empty() {
                    st.endpoint_ports_by_service[i].insert(svc.clone(), new_ports);
                }
            }
        }

        if let Some(node) = st.pending_node.take() {
            out.node_changed = node.zone != st.node.zone
                || node.addresses != st.node.addresses
                || node.name != st.node.name
                || node.pod_cidrs != st.node.pod_cidrs;
            st.node = node;
        }
        out.node = st.node.clone();

        let all = full || out.node_changed;
        for f in IpFamily::ALL {
            let i = idx(f);
            if all {
                for (nn, svc) in &st.services {
                    changed[i].extend(svc.family(f).keys().cloned());
                    if !svc.family(f).is_empty() {
                        out.touched_services[i].insert(nn.clone());
                    }
                }
            }
            for spn in std::mem::take(&mut changed[i]) {
                let info = st.services.get(spn.service()).and_then(|s| s.family(f).get(&spn)).cloned();
                let value = info.map(|info| {
                    let eps = st.endpoints[i].get(&spn).cloned().unwrap_or_default();
                    (info, eps)
                });
                out.updates[i].insert(spn, value);
            }
        }
        out
    }

    /// The topology facts selection uses.
    pub fn topology(&self, node: &NodeInfo) -> NodeTopology {
        NodeTopology {
            node_name: self.node_name.clone(),
            zone: node.zone.clone(),
            prefer_same_node_hints: self.prefer_same_node_hints,
        }
    }
}

fn families_touched(a: Option<&ParsedService>, b: Option<&ParsedService>) -> Vec<IpFamily> {
    IpFamily::ALL
        .into_iter()
        .filter(|f| a.is_some_and(|s| !s.family(*f).is_empty()) || b.is_some_and(|s| !s.family(*f).is_empty()))
        .collect()
}

/// Merges every slice of `svc` of family `f` into per-port endpoint lists: duplicates collapse (a local copy
/// wins) and each list is sorted by `ip:port`, as upstream does.
fn merge_endpoints(st: &State, svc: &NamespacedName, f: IpFamily) -> BTreeMap<ServicePortName, Vec<Endpoint>> {
    let mut by_port: BTreeMap<ServicePortName, BTreeMap<(IpAddr, u16), Endpoint>> = BTreeMap::new();
    let declared = st.services.get(svc).map(|s| s.family(f));
    for key in st.slices_by_service.get(svc).into_iter().flatten() {
        let Some(slice) = st.slices.get(key) else { continue };
        if slice.family != f {
            continue;
        }
        for p in &slice.ports {
            // The Service's own name for this port when it declares it, so both share one allocation.
            let spn = declared
                .and_then(|d| d.keys().find(|k| k.port() == p.name && k.protocol == p.protocol))
                .cloned()
                .unwrap_or_else(|| ServicePortName::of_service(svc.clone(), &p.name, p.protocol));
            let entry = by_port.entry(spn).or_default();
            for ep in &slice.endpoints {
                let ep = Endpoint { port: p.port, ..ep.clone() };
                match entry.get(&(ep.ip, ep.port)) {
                    Some(existing) if existing.is_local || !ep.is_local => {}
                    _ => {
                        entry.insert((ep.ip, ep.port), ep);
                    }
                }
            }
        }
    }
    by_port
        .into_iter()
        .map(|(spn, eps)| {
            let mut v: Vec<Endpoint> = eps.into_values().collect();
            v.sort_by_cached_key(|e| e.addr_string());
            (spn, v)
        })
        .collect()
}

/// Reads what the proxy needs from its Node object.
pub fn node_info(node: &Node, node_name: &str) -> NodeInfo {
    let zone = node.metadata.labels.as_ref().and_then(|l| l.get(LABEL_ZONE)).cloned();
    let mut addresses = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for a in node.status.iter().flat_map(|s| s.addresses.iter().flatten()) {
            if a.type_ == kind
                && let Ok(ip) = a.address.parse::<IpAddr>()
                && !addresses.contains(&ip)
            {
                addresses.push(ip);
            }
        }
    }
    let pod_cidrs =
        node.spec.iter().flat_map(|s| s.pod_cidrs.iter().flatten()).filter_map(|c| c.parse().ok()).collect();
    let tainted = node.spec.iter().flat_map(|s| s.taints.iter().flatten()).any(|t| t.key == TAINT_TO_BE_DELETED);
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_else(|| node_name.to_string()),
        zone,
        addresses,
        pod_cidrs,
        eligible: node.metadata.deletion_timestamp.is_none() && !tainted,
    }
}

/// Applies a checkout to the snapshot the runner owns, running endpoint selection for each changed port,
/// and returns the [`Changes`] to hand to the backend.
pub fn apply_checkout(snapshot: &mut Snapshot, checkout: Checkout, topology: &NodeTopology, full: bool) -> Changes {
    // New node addresses or topology touch every frontend: treat it as a full sync.
    let full = full || checkout.node_changed;
    let mut changes = Changes { full, ..Changes::default() };
    snapshot.node = checkout.node;
    for f in IpFamily::ALL {
        let i = idx(f);
        let fam = snapshot.family_mut(f);
        let fc = changes.family_mut(f);
        fc.conntrack_cleanup_required = checkout.conntrack_cleanup[i];
        fc.trigger_times = checkout.trigger_times[i].clone();
        for (spn, value) in &checkout.updates[i] {
            match value {
                Some((info, eps)) => {
                    let selected = categorize_shared(eps, info, topology);
                    let state = ServicePortState { info: info.clone(), endpoints: eps.clone(), selected };
                    // A full recompute reports only ports whose programmed state really differs.
                    if fam.services.get(spn) != Some(&state) || full {
                        fc.services.insert(spn.clone());
                    }
                    fam.services.insert(spn.clone(), state);
                }
                None => {
                    if fam.services.remove(spn).is_some() || full {
                        fc.services.insert(spn.clone());
                    }
                }
            }
        }
        for nn in &checkout.touched_services[i] {
            update_health_check(fam, nn);
        }
    }
    changes
}

/// Recomputes the health-check entry of one Service from its ports in the snapshot.
fn update_health_check(fam: &mut crate::model::FamilySnapshot, nn: &NamespacedName) {
    // The smallest name of this Service: unnamed port, first protocol.
    let start = ServicePortName::of_service(nn.clone(), "", Protocol::Tcp);
    let mut port = 0u16;
    let mut local_ips: BTreeSet<IpAddr> = BTreeSet::new();
    for (spn, state) in fam.services.range(start..) {
        if spn.service() != nn {
            break;
        }
        if state.info.health_check_node_port != 0 {
            port = state.info.health_check_node_port;
        }
        local_ips.extend(state.endpoints.iter().filter(|e| e.is_local && e.ready).map(|e| e.ip));
    }
    if port == 0 {
        fam.health_checks.remove(nn);
    } else {
        fam.health_checks.insert(nn.clone(), HealthCheckService { port, local_endpoints: local_ips.len() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"clusterIP": "198.19.0.1", "clusterIPs": ["198.19.0.1", "2001:db8::1"],
                     "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))
        .unwrap()
    }

    fn slice(svc: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": format!("{svc}-1"), "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [ip]}]
        }))
        .unwrap()
    }

    fn sync(t: &ChangeTracker, snap: &mut Snapshot, full: bool) -> Changes {
        let checkout = t.checkout(full);
        let topology = t.topology(&checkout.node);
        apply_checkout(snap, checkout, &topology, full)
    }

    #[test]
    fn names_from_services_and_slices_share_storage() {
        let t = ChangeTracker::new("node-a", false, Arc::new(NoopObserver));
        let mut snap = Snapshot::default();
        t.on_service(&service("web"));
        sync(&t, &mut snap, true);
        let (v4, v6): (Vec<_>, Vec<_>) = (snap.v4.services.keys().collect(), snap.v6.services.keys().collect());
        assert_eq!(v4.len(), 2);
        // Both families and all ports of a Service share one name.
        for (a, b) in v4.iter().zip(&v6) {
            assert_eq!(a, b);
            assert!(std::ptr::eq(a.port(), b.port()), "{a} shares storage across families");
        }
        assert!(std::ptr::eq(v4[0].name(), v4[1].name()));

        // A slice's port names are the Service's own, not copies.
        t.on_endpoint_slice(&slice("web", "198.18.1.1"));
        let changes = sync(&t, &mut snap, false);
        assert_eq!(changes.v4.services.len(), 2);
        for (changed, held) in changes.v4.services.iter().zip(snap.v4.services.keys()) {
            assert_eq!(changed, held);
            assert!(std::ptr::eq(changed.port(), held.port()), "{changed} from the slice shares the Service's name");
            assert_eq!(snap.v4.services[held].endpoints.len(), 1);
        }
    }

    #[test]
    fn slices_before_their_service_still_match_it() {
        let t = ChangeTracker::new("node-a", false, Arc::new(NoopObserver));
        let mut snap = Snapshot::default();
        t.on_endpoint_slice(&slice("web", "198.18.1.1"));
        sync(&t, &mut snap, true);
        assert!(snap.v4.services.is_empty());
        t.on_service(&service("web"));
        let changes = sync(&t, &mut snap, false);
        let names: Vec<String> = changes.v4.services.iter().map(|s| format!("{s}/{}", s.protocol)).collect();
        assert_eq!(names, ["ns/web:dns/UDP", "ns/web:http/TCP"]);
        assert!(snap.v4.services.values().all(|s| s.endpoints.len() == 1));
    }
}
