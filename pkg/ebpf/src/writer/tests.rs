//! Writer logic against in-memory maps: update order, partial vs full syncs, adoption.

use std::net::IpAddr;
use std::sync::Arc;

use ebpf_common::{SCOPE_EXT, SCOPE_INT, SVC_FLAG_AFFINITY, SVC_FLAG_LOCAL_SCOPE, ServiceKey};
use proxier::model::{
    Changes, Endpoint, IpFamily, Protocol, SelectedEndpoints, ServicePortInfo, ServicePortName, ServicePortState,
    Snapshot,
};

use super::*;
use crate::maps::{FakeMaps, MapOp};

const V4: [IpFamily; 1] = [IpFamily::V4];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(addr: &str, port: u16, local: bool) -> Endpoint {
    Endpoint { is_local: local, ..Endpoint::new(ip(addr), port) }
}

fn info(cluster_ip: &str, port: u16) -> ServicePortInfo {
    ServicePortInfo::new(ip(cluster_ip), port, Protocol::Tcp)
}

fn state(info: ServicePortInfo, eps: Vec<Endpoint>) -> ServicePortState {
    let local: Vec<Endpoint> = eps.iter().filter(|e| e.is_local).cloned().collect();
    ServicePortState {
        info: Arc::new(info),
        endpoints: Arc::new(eps.clone()),
        selected: SelectedEndpoints {
            has_any: !eps.is_empty(),
            cluster: eps.clone().into(),
            local: local.into(),
            all_reachable: eps.into(),
        },
    }
}

fn name(n: &str) -> ServicePortName {
    ServicePortName::new("default", n, "http", Protocol::Tcp)
}

fn changed(names: &[&str]) -> Changes {
    let mut c = Changes::default();
    for n in names {
        c.v4.services.insert(name(n));
    }
    c
}

fn full() -> Changes {
    Changes { full: true, ..Default::default() }
}

fn master_key(vip: &str, port: u16, scope: u8) -> ServiceKey {
    ServiceKey { addr: addr16(ip(vip)), port: port.to_be(), backend_slot: 0, proto: 6, scope, _pad: [0; 2] }
}

fn slot_key(vip: &str, port: u16, scope: u8, slot: u16) -> ServiceKey {
    ServiceKey { backend_slot: slot, ..master_key(vip, port, scope) }
}

fn pos(log: &[MapOp], pred: impl Fn(&MapOp) -> bool) -> usize {
    log.iter().position(pred).unwrap_or_else(|| panic!("op not found in {log:#?}"))
}

fn writer() -> MapWriter<FakeMaps> {
    MapWriter::adopt(FakeMaps::default()).unwrap()
}

#[test]
fn addr16_round_trip() {
    for s in ["198.18.0.1", "2001:db8::1", "::ffff:198.18.0.1"] {
        let a = addr16(ip(s));
        let back = ip_from_addr16(&a);
        assert_eq!(back, ip(s).to_canonical(), "{s}");
    }
    // IPv4 and IPv4-mapped IPv6 share one map form (so connect6 to ::ffff:VIP hits the v4 service).
    assert_eq!(addr16(ip("198.18.0.1")), addr16(ip("::ffff:198.18.0.1")));
}

#[test]
fn new_service_writes_backends_then_slots_then_master() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    snap.v4.services.insert(
        name("a"),
        state(info("198.19.0.10", 80), vec![ep("198.18.0.2", 8080, false), ep("198.18.0.3", 8080, false)]),
    );
    let rep = w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    assert_eq!(rep.service_ports_programmed, 1);
    let log = &w.maps().log;
    let last_backend = log.iter().rposition(|o| matches!(o, MapOp::BackendUpdate(..))).unwrap();
    let first_slot = pos(log, |o| matches!(o, MapOp::ServiceUpdate(k, _) if k.backend_slot > 0));
    let master =
        pos(log, |o| matches!(o, MapOp::ServiceUpdate(k, _) if *k == master_key("198.19.0.10", 80, SCOPE_EXT)));
    assert!(last_backend < first_slot && first_slot < master, "{log:#?}");
    assert_eq!(master, log.len() - 1, "master is the last write: {log:#?}");
    let m = w.maps().services[&master_key("198.19.0.10", 80, SCOPE_EXT)];
    assert_eq!(m.count, 2);
    let id = w.service_id(IpFamily::V4, &name("a")).unwrap();
    assert_eq!(m.service_id, id);
    assert_eq!(w.maps().rev_nat[&id].addr, addr16(ip("198.19.0.10")));
    assert_eq!(w.maps().backends.len(), 2);
}

#[test]
fn scaling_down_commits_count_before_deleting_slots_and_backends() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    let eps = vec![ep("198.18.0.2", 8080, false), ep("198.18.0.3", 8080, false), ep("198.18.0.4", 8080, false)];
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), eps));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    w.maps_mut().log.clear();

    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), vec![ep("198.18.0.2", 8080, false)]));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    let log = &w.maps().log;
    let master = pos(log, |o| matches!(o, MapOp::ServiceUpdate(k, v) if k.backend_slot == 0 && v.count == 1));
    let slot_del = pos(log, |o| matches!(o, MapOp::ServiceDelete(k) if k.backend_slot == 3));
    let be_del = pos(log, |o| matches!(o, MapOp::BackendDelete(_)));
    assert!(master < slot_del && slot_del < be_del, "{log:#?}");
    // Slot 1 already named .2: not rewritten.
    assert!(!log.iter().any(|o| matches!(o, MapOp::ServiceUpdate(k, _) if k.backend_slot == 1)), "{log:#?}");
    assert_eq!(w.maps().services.len(), 2);
    assert_eq!(w.maps().backends.len(), 1);

    // 1 -> 0: master stays with count 0 (reject), every slot and backend goes.
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), vec![]));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    assert_eq!(w.maps().services.len(), 1);
    assert_eq!(w.maps().services[&master_key("198.19.0.10", 80, SCOPE_EXT)].count, 0);
    assert!(w.maps().backends.is_empty());
}

#[test]
fn partial_sync_touches_only_changed_services() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), vec![ep("198.18.0.2", 8080, false)]));
    snap.v4.services.insert(name("b"), state(info("198.19.0.11", 80), vec![ep("198.18.0.3", 8080, false)]));
    w.sync(&V4, &snap, &full()).unwrap();
    w.maps_mut().log.clear();

    snap.v4.services.insert(name("b"), state(info("198.19.0.11", 80), vec![ep("198.18.0.4", 8080, false)]));
    // "a" changed in the snapshot too, but is not named in the changes: must not be written.
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), vec![ep("198.18.0.9", 8080, false)]));
    w.sync(&V4, &snap, &changed(&["b"])).unwrap();
    let a_id = w.service_id(IpFamily::V4, &name("a")).unwrap();
    for op in &w.maps().log {
        match op {
            MapOp::ServiceUpdate(k, _) | MapOp::ServiceDelete(k) => assert_ne!(k.addr, addr16(ip("198.19.0.10"))),
            MapOp::BackendUpdate(_, b) => assert_ne!(b.service_id, a_id),
            _ => {}
        }
    }
    // Unchanged sync writes nothing.
    w.maps_mut().log.clear();
    w.sync(&V4, &snap, &changed(&["b"])).unwrap();
    assert!(w.maps().log.is_empty(), "{:#?}", w.maps().log);
}

#[test]
fn removed_service_deletes_master_first_and_everything_else() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), vec![ep("198.18.0.2", 8080, false)]));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    w.maps_mut().log.clear();
    snap.v4.services.clear();
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    let log = &w.maps().log;
    assert!(matches!(log[0], MapOp::ServiceDelete(k) if k.backend_slot == 0), "{log:#?}");
    let m = w.maps();
    assert!(m.services.is_empty() && m.backends.is_empty() && m.rev_nat.is_empty(), "{m:#?}");
    assert_eq!(w.service_id(IpFamily::V4, &name("a")), None);
}

#[test]
fn full_sync_removes_stale_services_and_adopts_ids() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), vec![ep("198.18.0.2", 8080, false)]));
    snap.v4.services.insert(name("b"), state(info("198.19.0.11", 80), vec![ep("198.18.0.3", 8080, false)]));
    w.sync(&V4, &snap, &full()).unwrap();
    let a_id = w.service_id(IpFamily::V4, &name("a")).unwrap();
    let maps = w.maps().clone();

    // A restarted proxy: a new writer over the same maps keeps ids and writes nothing for unchanged state.
    let mut fresh = MapWriter::adopt(FakeMaps { log: vec![], ..maps }).unwrap();
    assert_eq!(fresh.service_count(), 2);
    snap.v4.services.remove(&name("b"));
    fresh.sync(&V4, &snap, &full()).unwrap();
    assert_eq!(fresh.service_id(IpFamily::V4, &name("a")), Some(a_id));
    let m = fresh.maps();
    assert!(!m.log.iter().any(|o| matches!(o, MapOp::ServiceUpdate(k, _) if k.addr == addr16(ip("198.19.0.10")))));
    assert!(!m.services.keys().any(|k| k.addr == addr16(ip("198.19.0.11"))), "stale service b removed");
    assert_eq!(m.backends.len(), 1);
    assert_eq!(m.rev_nat.len(), 1);
}

#[test]
fn full_sync_repairs_half_written_state() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), vec![ep("198.18.0.2", 8080, false)]));
    w.sync(&V4, &snap, &full()).unwrap();
    // Simulate a crash that left a surplus slot and an orphan backend behind.
    let mut maps = w.maps().clone();
    let id = w.service_id(IpFamily::V4, &name("a")).unwrap();
    maps.services.insert(
        slot_key("198.19.0.10", 80, SCOPE_EXT, 2),
        ServiceValue { backend_id: 77, service_id: id, ..Default::default() },
    );
    maps.backends.insert(
        77,
        BackendValue { addr: addr16(ip("198.18.0.7")), port: 8080u16.to_be(), proto: 6, flags: 0, service_id: id },
    );
    let mut w = MapWriter::adopt(maps).unwrap();
    w.sync(&V4, &snap, &full()).unwrap();
    assert!(!w.maps().services.contains_key(&slot_key("198.19.0.10", 80, SCOPE_EXT, 2)));
    assert!(!w.maps().backends.contains_key(&77));
}

#[test]
fn internal_policy_local_writes_local_scope_before_flagging_master() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    let eps = vec![ep("198.18.0.2", 8080, true), ep("198.18.0.3", 8080, false)];
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), eps.clone()));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    w.maps_mut().log.clear();

    let mut i = info("198.19.0.10", 80);
    i.internal_policy_local = true;
    snap.v4.services.insert(name("a"), state(i, eps.clone()));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    let log = &w.maps().log;
    let int_master =
        pos(log, |o| matches!(o, MapOp::ServiceUpdate(k, _) if *k == master_key("198.19.0.10", 80, SCOPE_INT)));
    let ext_master = pos(
        log,
        |o| matches!(o, MapOp::ServiceUpdate(k, v) if *k == master_key("198.19.0.10", 80, SCOPE_EXT) && v.flags & SVC_FLAG_LOCAL_SCOPE != 0),
    );
    assert!(int_master < ext_master, "{log:#?}");
    assert_eq!(w.maps().services[&master_key("198.19.0.10", 80, SCOPE_INT)].count, 1);
    let local_slot = w.maps().services[&slot_key("198.19.0.10", 80, SCOPE_INT, 1)];
    assert_eq!(w.maps().backends[&local_slot.backend_id].addr, addr16(ip("198.18.0.2")));

    // Back to Cluster: the master loses the flag before the local entries go.
    w.maps_mut().log.clear();
    snap.v4.services.insert(name("a"), state(info("198.19.0.10", 80), eps));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    let log = &w.maps().log;
    let ext_master = pos(
        log,
        |o| matches!(o, MapOp::ServiceUpdate(k, v) if *k == master_key("198.19.0.10", 80, SCOPE_EXT) && v.flags & SVC_FLAG_LOCAL_SCOPE == 0),
    );
    let int_del = pos(log, |o| matches!(o, MapOp::ServiceDelete(k) if *k == master_key("198.19.0.10", 80, SCOPE_INT)));
    assert!(ext_master < int_del, "{log:#?}");
    assert!(!w.maps().services.keys().any(|k| k.scope == SCOPE_INT));
}

#[test]
fn external_frontends_follow_external_policy() {
    let mut w = writer();
    let mut snap = Snapshot::default();
    snap.node.addresses = vec![ip("198.18.1.1"), ip("2001:db8::1:1")];
    let mut i = info("198.19.0.10", 80);
    i.node_port = 30080;
    i.external_ips = vec![ip("198.18.9.9")];
    i.load_balancer_vips = vec![ip("198.18.9.10")];
    i.external_policy_local = true;
    i.session_affinity_timeout = Some(60);
    snap.v4.services.insert(name("a"), state(i, vec![ep("198.18.0.2", 8080, true), ep("198.18.0.3", 8080, false)]));
    w.sync(&V4, &snap, &changed(&["a"])).unwrap();
    let m = &w.maps().services;
    // ClusterIP: internal policy Cluster.
    let cip = m[&master_key("198.19.0.10", 80, SCOPE_EXT)];
    assert_eq!((cip.count, cip.flags & SVC_FLAG_LOCAL_SCOPE), (2, 0));
    assert!(cip.flags & SVC_FLAG_AFFINITY != 0 && cip.affinity_timeout == 60);
    // External frontends: Local → local scope with the one local endpoint.
    for (vip, port) in [("198.18.1.1", 30080), ("198.18.9.9", 80), ("198.18.9.10", 80)] {
        let ext = m[&master_key(vip, port, SCOPE_EXT)];
        assert!(ext.flags & SVC_FLAG_LOCAL_SCOPE != 0, "{vip}");
        assert_eq!(m[&master_key(vip, port, SCOPE_INT)].count, 1, "{vip}");
    }
    // The IPv6 node address is not used for an IPv4 service.
    assert!(!m.keys().any(|k| k.addr == addr16(ip("2001:db8::1:1"))));
    // One backend entry per endpoint, shared by all frontends of the service.
    assert_eq!(w.maps().backends.len(), 2);
}
