//! The map writer: turns the proxy model into per-entry map updates.
//!
//! Per service, updates go in Cilium's order so a concurrent lookup never follows a missing entry:
//! new backends → reverse NAT → slots → master entry with the new count (the commit point) → surplus
//! slots deleted → orphan backends deleted. When a frontend switches to a Local policy its node-local
//! (`SCOPE_INT`) entries are written before the cluster (`SCOPE_EXT`) master is flagged; when it leaves
//! Local the master is unflagged first. Only entries that differ from what is in the maps are written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ebpf_common::{
    Addr, BACKEND_FLAG_LOCAL, BackendValue, MAX_SERVICE_ID, RevNatValue, SCOPE_EXT, SCOPE_INT, SVC_FLAG_AFFINITY,
    SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_LOCAL_SCOPE, SVC_FLAG_NO_ENDPOINTS,
    SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGE, ServiceCounters, ServiceKey, ServiceValue, addr_from_v4,
};
use proxier::backend::SyncReport;
use proxier::model::{Changes, Endpoint, IpFamily, ServicePortName, ServicePortState, Snapshot};
use tracing::{debug, info, warn};

use crate::EbpfError;
use crate::maps::LbMaps;

/// A frontend: address, port (network order), protocol.
type FrontendId = (Addr, u16, u8);
/// A backend's identity inside one service: address, port (network order), protocol.
type BackendKey = (Addr, u16, u8);
/// A `loadBalancerSourceRanges` entry: network address (16-byte form) and prefix length over all 128 bits
/// (IPv4 ranges are IPv4-mapped, so a /24 is 120).
pub type SrcRange = (Addr, u8);

/// The 16-byte map form of an address (IPv4 stored IPv4-mapped).
pub fn addr16(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => addr_from_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
        }
    }
}

/// The address a 16-byte map form stands for (IPv4-mapped forms come back as IPv4).
pub fn ip_from_addr16(a: &Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    std::net::Ipv6Addr::from(o).to_canonical()
}

/// What one scope of one frontend currently holds in the maps.
#[derive(Debug, Clone, Default)]
struct ScopeEntries {
    master: Option<ServiceValue>,
    /// `slots[i]` is the backend id in slot `i + 1`; 0 marks a hole seen when adopting.
    slots: Vec<u32>,
}

/// What one service id currently holds in the maps.
#[derive(Debug, Default)]
struct ServiceState {
    rev: Option<RevNatValue>,
    entries: BTreeMap<(FrontendId, u8), ScopeEntries>,
    backends: BTreeMap<BackendKey, u32>,
    /// `BACKEND_FLAG_*` of each backend id as written.
    backend_flags: BTreeMap<u32, u8>,
    /// Source ranges written for this service id.
    src_ranges: BTreeSet<SrcRange>,
    /// Backend ids found in the maps that duplicate another id of the same backend; deleted on reconcile.
    stray_backends: Vec<u32>,
}

/// What one service should hold.
struct Desired {
    rev: RevNatValue,
    /// (frontend, scope) → (master template without count, backends in slot order).
    entries: BTreeMap<(FrontendId, u8), (ServiceValue, Vec<BackendKey>)>,
    /// Backends with their `BACKEND_FLAG_*`.
    backends: BTreeMap<BackendKey, u8>,
    src_ranges: BTreeSet<SrcRange>,
}

/// Per-service counters as read from the BPF counters map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCounterSample {
    /// IP family of the service port.
    pub family: IpFamily,
    /// The service port.
    pub service: ServicePortName,
    /// The service id (reverse-NAT index) in the maps.
    pub service_id: u32,
    /// Connections/datagrams translated, and rejected for lack of endpoints.
    pub counters: ServiceCounters,
}

/// Writes the model into [`LbMaps`], remembering what the maps hold so partial syncs write only changes.
pub struct MapWriter<M> {
    maps: M,
    services: BTreeMap<u32, ServiceState>,
    names: BTreeMap<(IpFamily, ServicePortName), u32>,
    by_cluster_ip: HashMap<FrontendId, u32>,
    backend_ids: BTreeSet<u32>,
    next_service_id: u32,
    next_backend_id: u32,
    updates: u64,
    deletes: u64,
}

impl<M: LbMaps> MapWriter<M> {
    /// A writer over `maps`, adopting whatever they already hold (service and backend ids included).
    pub fn adopt(maps: M) -> Result<Self, EbpfError> {
        let mut w = MapWriter {
            maps,
            services: BTreeMap::new(),
            names: BTreeMap::new(),
            by_cluster_ip: HashMap::new(),
            backend_ids: BTreeSet::new(),
            next_service_id: 1,
            next_backend_id: 1,
            updates: 0,
            deletes: 0,
        };
        w.reload()?;
        Ok(w)
    }

    /// The underlying maps.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The underlying maps, mutably (tests use it to inspect or reset a fake's log).
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Service id of a service port programmed by this writer.
    pub fn service_id(&self, family: IpFamily, name: &ServicePortName) -> Option<u32> {
        self.names.get(&(family, name.clone())).copied()
    }

    /// Every service port this writer has programmed, with its family and service id.
    pub fn service_names(&self) -> impl Iterator<Item = (IpFamily, &ServicePortName, u32)> {
        self.names.iter().map(|((family, name), id)| (*family, name, *id))
    }

    /// Number of service ids with state in the maps.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Rebuilds the in-memory view (and the id allocation) from the map contents.
    fn reload(&mut self) -> Result<(), EbpfError> {
        self.services.clear();
        self.by_cluster_ip.clear();
        self.backend_ids.clear();
        for (k, v) in self.maps.dump_services()? {
            let fe = (k.addr, k.port, k.proto);
            let e = self.services.entry(v.service_id).or_default().entries.entry((fe, k.scope)).or_default();
            if k.backend_slot == 0 {
                e.master = Some(v);
            } else {
                let idx = usize::from(k.backend_slot - 1);
                if e.slots.len() <= idx {
                    e.slots.resize(idx + 1, 0);
                }
                e.slots[idx] = v.backend_id;
            }
        }
        for (id, b) in self.maps.dump_backends()? {
            self.backend_ids.insert(id);
            let st = self.services.entry(b.service_id).or_default();
            st.backend_flags.insert(id, b.flags);
            if let Some(prev) = st.backends.insert((b.addr, b.port, b.proto), id) {
                st.stray_backends.push(prev);
            }
        }
        for (id, range) in self.maps.dump_src_ranges()? {
            self.services.entry(id).or_default().src_ranges.insert(range);
        }
        for (id, r) in self.maps.dump_rev_nat()? {
            self.services.entry(id).or_default().rev = Some(r);
            self.by_cluster_ip.insert((r.addr, r.port, r.proto), id);
        }
        // Names are not in the maps; they are re-derived from the ClusterIP frontend on the next sync.
        self.names.retain(|_, id| self.services.contains_key(id));
        debug!(services = self.services.len(), backends = self.backend_ids.len(), "adopted map contents");
        Ok(())
    }

    /// Applies a sync: only `changes` on a partial sync; everything (and removal of stale services) on a
    /// full one.
    pub fn sync(
        &mut self,
        families: &[IpFamily],
        snapshot: &Snapshot,
        changes: &Changes,
    ) -> Result<SyncReport, EbpfError> {
        self.updates = 0;
        self.deletes = 0;
        let mut programmed = 0usize;
        if changes.full {
            // Diff against what the kernel really holds, so a full sync also repairs drift after errors.
            self.reload()?;
            let mut claimed = BTreeSet::new();
            for &family in families {
                for (name, svc) in &snapshot.family(family).services {
                    let id = self.service_id_for(family, name, svc, Some(&claimed))?;
                    claimed.insert(id);
                    self.reconcile(id, family, name, svc, snapshot)?;
                    programmed += 1;
                }
            }
            let stale: Vec<u32> = self.services.keys().copied().filter(|id| !claimed.contains(id)).collect();
            for id in stale {
                self.delete_service(id)?;
                programmed += 1;
            }
            self.names.retain(|_, id| claimed.contains(id));
        } else {
            // Removals first, so a re-created service can take over the ClusterIP of a deleted one.
            for &family in families {
                for name in &changes.family(family).services {
                    if snapshot.family(family).services.contains_key(name) {
                        continue;
                    }
                    if let Some(id) = self.names.remove(&(family, name.clone())) {
                        self.delete_service(id)?;
                        programmed += 1;
                    }
                }
            }
            for &family in families {
                for name in &changes.family(family).services {
                    if let Some(svc) = snapshot.family(family).services.get(name) {
                        let id = self.service_id_for(family, name, svc, None)?;
                        self.reconcile(id, family, name, svc, snapshot)?;
                        programmed += 1;
                    }
                }
            }
        }
        Ok(SyncReport {
            full: changes.full,
            service_ports_programmed: programmed,
            details: vec![
                ("map_updates", self.updates),
                ("map_deletes", self.deletes),
                ("service_ids", self.services.len() as u64),
                ("backends", self.backend_ids.len() as u64),
            ],
        })
    }

    /// The per-service counters of every programmed service port.
    pub fn counters(&self) -> Result<Vec<ServiceCounterSample>, EbpfError> {
        self.names
            .iter()
            .map(|((family, service), &service_id)| {
                Ok(ServiceCounterSample {
                    family: *family,
                    service: service.clone(),
                    service_id,
                    counters: self.maps.counters(service_id)?,
                })
            })
            .collect()
    }

    /// The service id for a name: the one it had, else the one owning its ClusterIP frontend in the maps
    /// (adoption after a restart), else a new one. An id can be adopted only if no other name holds it:
    /// `claimed` lists the ids taken so far in a full sync; on a partial sync (`None`) the names are asked,
    /// only in the rare adoption case, so a partial sync does no work proportional to all services.
    fn service_id_for(
        &mut self,
        family: IpFamily,
        name: &ServicePortName,
        svc: &ServicePortState,
        claimed: Option<&BTreeSet<u32>>,
    ) -> Result<u32, EbpfError> {
        let key = (family, name.clone());
        if let Some(&id) = self.names.get(&key) {
            return Ok(id);
        }
        let fe = (addr16(svc.info.cluster_ip), svc.info.port.to_be(), svc.info.protocol.number());
        let id = match self.by_cluster_ip.get(&fe) {
            Some(&id) if !claimed.map_or_else(|| self.names.values().any(|&v| v == id), |c| c.contains(&id)) => {
                debug!(service = %name, id, "adopted service id");
                id
            }
            _ => {
                let id = self.alloc_service_id(name)?;
                self.maps.counters_reset(id)?;
                self.services.insert(id, ServiceState::default());
                id
            }
        };
        self.names.insert(key, id);
        Ok(id)
    }

    fn alloc_service_id(&mut self, name: &ServicePortName) -> Result<u32, EbpfError> {
        for _ in 0..MAX_SERVICE_ID {
            let id = self.next_service_id;
            self.next_service_id = if id >= MAX_SERVICE_ID { 1 } else { id + 1 };
            // Every named id is also in `services` (names are pruned whenever services are), so this one
            // lookup suffices; scanning the names here made a full sync quadratic in the service count.
            if !self.services.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(EbpfError::IdsExhausted { what: "service ids", input: name.to_string() })
    }

    fn alloc_backend_id(&mut self, name: &ServicePortName) -> Result<u32, EbpfError> {
        // Bounded scan: the backend map holds far fewer entries than the id space.
        for _ in 0..=ebpf_common::BACKENDS_MAX_ENTRIES {
            let id = self.next_backend_id;
            self.next_backend_id = if id >= u32::MAX - 1 { 1 } else { id + 1 };
            if self.backend_ids.insert(id) {
                return Ok(id);
            }
        }
        Err(EbpfError::IdsExhausted { what: "backend ids", input: name.to_string() })
    }

    fn desired(family: IpFamily, svc: &ServicePortState, snapshot: &Snapshot) -> Desired {
        let info = &svc.info;
        let proto = info.protocol.number();
        let port = info.port.to_be();
        let to_keys = |eps: &[Endpoint]| -> Vec<BackendKey> {
            let mut v: Vec<BackendKey> = eps
                .iter()
                .filter(|e| IpFamily::of(&e.ip) == family)
                .map(|e| (addr16(e.ip), e.port.to_be(), proto))
                .collect();
            v.dedup();
            v
        };
        // Endpoints on this node are reached by the tc programs without SNAT.
        let local_eps: BTreeSet<BackendKey> = svc
            .endpoints
            .iter()
            .chain(svc.selected.local.iter())
            .filter(|e| e.is_local && IpFamily::of(&e.ip) == family)
            .map(|e| (addr16(e.ip), e.port.to_be(), proto))
            .collect();
        let src_ranges: BTreeSet<SrcRange> = info
            .load_balancer_source_ranges
            .iter()
            .filter(|n| IpFamily::of(&n.addr()) == family)
            .map(|n| {
                let bits = if family == IpFamily::V4 { 96 } else { 0 };
                (addr16(n.network()), n.prefix_len() + bits)
            })
            .collect();
        let cluster = to_keys(&svc.selected.cluster);
        let local = to_keys(&svc.selected.local);
        let (aff_flag, timeout) = match info.session_affinity_timeout {
            Some(t) => (SVC_FLAG_AFFINITY, t),
            None => (0, 0),
        };

        let mut frontends: Vec<(FrontendId, u8, bool)> = Vec::new();
        frontends.push(((addr16(info.cluster_ip), port, proto), SVC_FLAG_CLUSTER_IP, info.internal_policy_local));
        let ext = info.external_policy_local;
        for ip in info.external_ips.iter().filter(|ip| IpFamily::of(ip) == family) {
            frontends.push(((addr16(*ip), port, proto), SVC_FLAG_EXTERNAL_IP, ext));
        }
        for ip in info.load_balancer_vips.iter().filter(|ip| IpFamily::of(ip) == family) {
            frontends.push(((addr16(*ip), port, proto), SVC_FLAG_LOAD_BALANCER, ext));
        }
        if info.node_port != 0 {
            for ip in snapshot.node.addresses.iter().filter(|ip| IpFamily::of(ip) == family) {
                frontends.push(((addr16(*ip), info.node_port.to_be(), proto), SVC_FLAG_NODE_PORT, ext));
            }
        }

        let mut entries = BTreeMap::new();
        let mut backends = BTreeMap::new();
        for (fe, kind, local_policy) in frontends {
            // Source ranges restrict LoadBalancer frontends only, as upstream.
            let range_flag =
                if kind == SVC_FLAG_LOAD_BALANCER && !src_ranges.is_empty() { SVC_FLAG_SOURCE_RANGE } else { 0 };
            let flags = kind | aff_flag | range_flag | if local_policy { SVC_FLAG_LOCAL_SCOPE } else { 0 };
            // No endpoint anywhere: the tc programs reject (upstream's REJECT) instead of dropping.
            let flags = flags | if svc.selected.has_any { 0 } else { SVC_FLAG_NO_ENDPOINTS };
            let master = ServiceValue { affinity_timeout: timeout, flags, ..Default::default() };
            if entries.contains_key(&(fe, SCOPE_EXT)) {
                // The same address:port listed twice (e.g. an external IP equal to a node address): first wins.
                continue;
            }
            entries.insert((fe, SCOPE_EXT), (master, cluster.clone()));
            backends.extend(cluster.iter().map(|k| (*k, if local_eps.contains(k) { BACKEND_FLAG_LOCAL } else { 0 })));
            if local_policy {
                entries.insert((fe, SCOPE_INT), (master, local.clone()));
                backends.extend(local.iter().map(|k| (*k, if local_eps.contains(k) { BACKEND_FLAG_LOCAL } else { 0 })));
            }
        }
        Desired {
            rev: RevNatValue { addr: addr16(info.cluster_ip), port, proto, _pad: 0 },
            entries,
            backends,
            src_ranges,
        }
    }

    fn reconcile(
        &mut self,
        id: u32,
        family: IpFamily,
        name: &ServicePortName,
        svc: &ServicePortState,
        snapshot: &Snapshot,
    ) -> Result<(), EbpfError> {
        let desired = Self::desired(family, svc, snapshot);
        let mut state = self.services.remove(&id).unwrap_or_default();
        let result = self.reconcile_state(id, name, &desired, &mut state);
        // Keep whatever was written even on error, so the in-memory view matches the maps.
        self.services.insert(id, state);
        if let Some(old) = self.by_cluster_ip.iter().find(|(_, v)| **v == id).map(|(k, _)| *k)
            && old != (desired.rev.addr, desired.rev.port, desired.rev.proto)
        {
            self.by_cluster_ip.remove(&old);
        }
        self.by_cluster_ip.insert((desired.rev.addr, desired.rev.port, desired.rev.proto), id);
        result
    }

    fn reconcile_state(
        &mut self,
        id: u32,
        name: &ServicePortName,
        desired: &Desired,
        state: &mut ServiceState,
    ) -> Result<(), EbpfError> {
        // 1. New backends first: a slot never names a backend that is not there yet.
        for (bk, &flags) in &desired.backends {
            let bid = match state.backends.get(bk) {
                // Flags (locality) change in place: same id, so conntrack entries keep their backend.
                Some(&bid) if state.backend_flags.get(&bid) == Some(&flags) => continue,
                Some(&bid) => bid,
                None => self.alloc_backend_id(name)?,
            };
            let value = BackendValue { addr: bk.0, port: bk.1, proto: bk.2, flags, service_id: id };
            self.update(|m| m.backend_update(bid, &value))?;
            state.backends.insert(*bk, bid);
            state.backend_flags.insert(bid, flags);
        }
        // Source ranges before the masters that start checking them.
        for r in desired.src_ranges.difference(&state.src_ranges.clone()) {
            self.update(|m| m.src_range_update(id, r))?;
            state.src_ranges.insert(*r);
        }
        // 2. Reverse NAT (the service's identity; read by restart adoption and future tc programs).
        if state.rev != Some(desired.rev) {
            self.update(|m| m.rev_nat_update(id, &desired.rev))?;
            state.rev = Some(desired.rev);
        }
        // 3. Slots then master, node-local sets before the cluster masters that point at them.
        for scope in [SCOPE_INT, SCOPE_EXT] {
            for ((fe, _), (template, keys)) in desired.entries.iter().filter(|((_, s), _)| *s == scope) {
                let ids: Vec<u32> = keys.iter().map(|k| state.backends[k]).collect();
                let count = u16::try_from(ids.len())
                    .map_err(|_| EbpfError::TooManyBackends { service: name.to_string(), count: ids.len() })?;
                let master = ServiceValue { count, service_id: id, ..*template };
                let cur = state.entries.entry((*fe, scope)).or_default();
                let old_slots = std::mem::take(&mut cur.slots);
                let old_master = cur.master;
                for (i, bid) in ids.iter().enumerate() {
                    if old_slots.get(i) != Some(bid) {
                        let key = service_key(fe, scope, i as u16 + 1);
                        let value = ServiceValue { backend_id: *bid, service_id: id, ..Default::default() };
                        self.update(|m| m.service_update(&key, &value))?;
                    }
                }
                // Commit point: the new count becomes visible only now.
                if old_master != Some(master) {
                    let key = service_key(fe, scope, 0);
                    self.update(|m| m.service_update(&key, &master))?;
                }
                for i in ids.len()..old_slots.len() {
                    let key = service_key(fe, scope, i as u16 + 1);
                    self.delete(|m| m.service_delete(&key))?;
                }
                let cur = state.entries.entry((*fe, scope)).or_default();
                cur.master = Some(master);
                cur.slots = ids;
            }
        }
        // 4. Entries no longer wanted: masters (cluster scope first) before their slots.
        let gone: Vec<(FrontendId, u8)> =
            state.entries.keys().filter(|k| !desired.entries.contains_key(k)).copied().collect();
        self.delete_entries(state, &gone)?;
        // 5. Orphan backends and source ranges last: no slot or master uses them any more.
        let orphans: Vec<(BackendKey, u32)> =
            state.backends.iter().filter(|(k, _)| !desired.backends.contains_key(k)).map(|(k, v)| (*k, *v)).collect();
        for (k, bid) in orphans {
            self.delete(|m| m.backend_delete(bid))?;
            state.backends.remove(&k);
            state.backend_flags.remove(&bid);
            self.backend_ids.remove(&bid);
        }
        let stale_ranges: Vec<SrcRange> = state.src_ranges.difference(&desired.src_ranges).copied().collect();
        for r in stale_ranges {
            self.delete(|m| m.src_range_delete(id, &r))?;
            state.src_ranges.remove(&r);
        }
        for bid in std::mem::take(&mut state.stray_backends) {
            self.delete(|m| m.backend_delete(bid))?;
            self.backend_ids.remove(&bid);
        }
        Ok(())
    }

    fn delete_entries(&mut self, state: &mut ServiceState, gone: &[(FrontendId, u8)]) -> Result<(), EbpfError> {
        for scope in [SCOPE_EXT, SCOPE_INT] {
            for (fe, s) in gone.iter().filter(|(_, s)| *s == scope) {
                if let Some(e) = state.entries.get_mut(&(*fe, *s))
                    && e.master.take().is_some()
                {
                    let key = service_key(fe, *s, 0);
                    self.delete(|m| m.service_delete(&key))?;
                }
            }
        }
        for k in gone {
            if let Some(e) = state.entries.remove(k) {
                for i in 0..e.slots.len() {
                    let key = service_key(&k.0, k.1, i as u16 + 1);
                    self.delete(|m| m.service_delete(&key))?;
                }
            }
        }
        Ok(())
    }

    /// Removes every entry of a service id: masters, slots, backends, reverse NAT.
    fn delete_service(&mut self, id: u32) -> Result<(), EbpfError> {
        let Some(mut state) = self.services.remove(&id) else {
            return Ok(());
        };
        info!(id, "removing service from maps");
        let gone: Vec<(FrontendId, u8)> = state.entries.keys().copied().collect();
        let result = (|| {
            self.delete_entries(&mut state, &gone)?;
            let backends: Vec<(BackendKey, u32)> = state.backends.iter().map(|(k, v)| (*k, *v)).collect();
            for (k, bid) in backends {
                self.delete(|m| m.backend_delete(bid))?;
                state.backends.remove(&k);
                self.backend_ids.remove(&bid);
            }
            for bid in std::mem::take(&mut state.stray_backends) {
                self.delete(|m| m.backend_delete(bid))?;
                self.backend_ids.remove(&bid);
            }
            for r in std::mem::take(&mut state.src_ranges) {
                self.delete(|m| m.src_range_delete(id, &r))?;
            }
            if state.rev.take().is_some() {
                self.delete(|m| m.rev_nat_delete(id))?;
            }
            Ok(())
        })();
        if result.is_err() {
            warn!(id, "service removal failed part way; keeping the rest for the next sync");
            self.services.insert(id, state);
        } else {
            self.by_cluster_ip.retain(|_, v| *v != id);
        }
        result
    }

    fn update(&mut self, f: impl FnOnce(&mut M) -> Result<(), EbpfError>) -> Result<(), EbpfError> {
        self.updates += 1;
        f(&mut self.maps)
    }

    fn delete(&mut self, f: impl FnOnce(&mut M) -> Result<(), EbpfError>) -> Result<(), EbpfError> {
        self.deletes += 1;
        f(&mut self.maps)
    }
}

fn service_key(fe: &FrontendId, scope: u8, slot: u16) -> ServiceKey {
    ServiceKey { addr: fe.0, port: fe.1, backend_slot: slot, proto: fe.2, scope, _pad: [0; 2] }
}

#[cfg(test)]
mod tests;
