//! Real-kernel tests of the socket load balancer: programs verified and attached to a test cgroup, a
//! client namespace and a "pod" namespace joined by a veth pair, traffic from a client process inside
//! both. Privileged: each test prints a SKIP reason and returns when it cannot run (not root, no cgroup2,
//! no bpffs, no `ip`).
//!
//! Safety rules: only 198.18.0.0/15 and 2001:db8::/32 addresses, namespaces without any route off the
//! machine, programs attached only to a cgroup the test creates, pins only under a test-owned bpffs
//! directory, nothing dialled from the host namespace; everything is removed by `Lab::drop`, also on panic.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use proxier::backend::Backend;
use proxier::model::{Changes, Endpoint, IpFamily, Protocol, ServicePortInfo, Snapshot};
use proxy_ebpf::{EbpfBackend, EbpfOptions};

#[test]
fn cluster_ip_tcp_udp_and_reverse_translation() {
    let Some(mut lab) = Lab::new("cluster_ip_tcp_udp_and_reverse_translation") else { return };
    let mut snap = Snapshot::default();
    apply(&mut lab, &mut snap, name("web", Protocol::Tcp), Some(svc(CIP4, 80, Protocol::Tcp, v4_eps(1), |_| {})));
    apply(&mut lab, &mut snap, name("dns", Protocol::Udp), Some(svc(CIP4, 53, Protocol::Udp, v4_eps(1), |_| {})));

    let out = lab.client(true, &[("tcp", CIP4, 80), ("udp", CIP4, 53), ("udpc", CIP4, 53)]);
    assert!(out[0].starts_with("tcp ok"), "{out:?}");
    // getpeername shows the ClusterIP, the backend saw the client's own address.
    assert_eq!(peer_of(&out[0]), Some("198.19.0.10:80"), "{out:?}");
    assert_eq!(backend_of(&out[0]).as_deref(), Some("198.18.0.2"), "{out:?}");
    assert!(out[0].contains("reply=backend=198.18.0.2") && out[0].contains(" peer=198.18.0.1:"), "{out:?}");
    // Unconnected UDP: recvfrom reports the ClusterIP as the sender.
    assert!(out[1].starts_with("udp ok"), "{out:?}");
    assert_eq!(peer_of(&out[1]), Some("198.19.0.10:53"), "{out:?}");
    // Connected UDP: the reply arrives and getpeername shows the ClusterIP.
    assert!(out[2].starts_with("udpc ok"), "{out:?}");
    assert_eq!(peer_of(&out[2]), Some("198.19.0.10:53"), "{out:?}");

    // A process outside the cgroup is not translated: the ClusterIP is simply unroutable there.
    let out = lab.client(false, &[("tcp", CIP4, 80)]);
    assert!(out[0].contains(ENETUNREACH), "{out:?}");

    let counters = lab.backend().service_counters().unwrap();
    let web = counters.iter().find(|c| c.service == name("web", Protocol::Tcp)).unwrap();
    assert!(web.counters.translated >= 1, "{counters:?}");
}

#[test]
fn scaling_and_no_endpoints_refuse() {
    let Some(mut lab) = Lab::new("scaling_and_no_endpoints_refuse") else { return };
    let mut snap = Snapshot::default();
    let web = name("web", Protocol::Tcp);
    let dns = name("dns", Protocol::Udp);
    let set = |lab: &mut Lab, snap: &mut Snapshot, n: usize| {
        apply(lab, snap, web.clone(), Some(svc(CIP4, 80, Protocol::Tcp, v4_eps(n), |_| {})));
        apply(lab, snap, dns.clone(), Some(svc(CIP4, 53, Protocol::Udp, v4_eps(n), |_| {})));
    };

    set(&mut lab, &mut snap, 1);
    let seen: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 5).into_iter().collect();
    assert_eq!(seen, BTreeSet::from(["198.18.0.2".to_string()]));

    set(&mut lab, &mut snap, 3);
    // 30 uniform picks over 3 backends miss one with probability ~1.5e-5.
    let seen: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 30).into_iter().collect();
    assert_eq!(seen.len(), 3, "{seen:?}");

    set(&mut lab, &mut snap, 0);
    let t = Instant::now();
    let out = lab.client(true, &[("tcp", CIP4, 80), ("udp", CIP4, 53)]);
    assert!(out[0].contains(ECONNREFUSED), "TCP without endpoints: {out:?}");
    assert!(out[1].contains(ECONNREFUSED), "UDP without endpoints: {out:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "refusal must be immediate, took {:?}", t.elapsed());

    set(&mut lab, &mut snap, 2);
    let seen: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 20).into_iter().collect();
    assert_eq!(seen, BTreeSet::from(["198.18.0.2".to_string(), "198.18.0.3".to_string()]));

    let counters = lab.backend().service_counters().unwrap();
    let by_name: BTreeMap<_, _> = counters.iter().map(|c| (c.service.clone(), c.counters)).collect();
    assert!(by_name[&web].no_endpoints >= 1 && by_name[&web].translated >= 55, "{counters:?}");
    assert!(by_name[&dns].no_endpoints >= 1, "{counters:?}");

    // Deleting the service: the ClusterIP is no longer translated at all.
    apply(&mut lab, &mut snap, web.clone(), None);
    let out = lab.client(true, &[("tcp", CIP4, 80)]);
    assert!(out[0].contains(ENETUNREACH), "{out:?}");
}

#[test]
fn ipv6_cluster_ip_and_v4_mapped() {
    let Some(mut lab) = Lab::new("ipv6_cluster_ip_and_v4_mapped") else { return };
    let mut snap = Snapshot::default();
    let v6_eps: Vec<Endpoint> = POD_V6.iter().map(|a| ep(a, false)).collect();
    apply(&mut lab, &mut snap, name("web6", Protocol::Tcp), Some(svc(CIP6, 80, Protocol::Tcp, v6_eps.clone(), |_| {})));
    apply(&mut lab, &mut snap, name("dns6", Protocol::Udp), Some(svc(CIP6, 53, Protocol::Udp, v6_eps, |_| {})));
    apply(&mut lab, &mut snap, name("web", Protocol::Tcp), Some(svc(CIP4, 80, Protocol::Tcp, v4_eps(1), |_| {})));
    apply(&mut lab, &mut snap, name("dns", Protocol::Udp), Some(svc(CIP4, 53, Protocol::Udp, v4_eps(1), |_| {})));

    let mapped = "::ffff:198.19.0.10";
    let out = lab.client(true, &[("tcp", CIP6, 80), ("udp", CIP6, 53), ("tcp", mapped, 80), ("udp", mapped, 53)]);
    assert!(out[0].starts_with("tcp ok"), "{out:?}");
    assert_eq!(peer_of(&out[0]), Some("[2001:db8:ffff::10]:80"), "{out:?}");
    assert!(backend_of(&out[0]).is_some_and(|b| POD_V6.contains(&b.as_str())), "{out:?}");
    assert_eq!(peer_of(&out[1]), Some("[2001:db8:ffff::10]:53"), "{out:?}");
    // IPv4-mapped destination on an IPv6 socket uses the IPv4 service and is reverse-translated.
    assert!(out[2].starts_with("tcp ok"), "{out:?}");
    assert_eq!(peer_of(&out[2]), Some("[::ffff:198.19.0.10]:80"), "{out:?}");
    assert_eq!(backend_of(&out[2]).as_deref(), Some("198.18.0.2"), "{out:?}");
    assert!(out[3].starts_with("udp ok"), "{out:?}");
    assert_eq!(peer_of(&out[3]), Some("[::ffff:198.19.0.10]:53"), "{out:?}");
}

#[test]
fn session_affinity_client_ip_sticks() {
    let Some(mut lab) = Lab::new("session_affinity_client_ip_sticks") else { return };
    let mut snap = Snapshot::default();
    let st = svc(CIP4, 80, Protocol::Tcp, v4_eps(3), |i| i.session_affinity_timeout = Some(60));
    apply(&mut lab, &mut snap, name("sticky", Protocol::Tcp), Some(st));
    let seen: Vec<String> = lab.tcp_backends(CIP4, 80, 12);
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), 1, "affinity must pin one backend: {seen:?}");
    // A second process in the same namespace (same client) keeps the backend.
    let again = lab.tcp_backends(CIP4, 80, 3);
    assert!(again.iter().all(|b| b == &seen[0]), "{seen:?} then {again:?}");
}

#[test]
fn internal_traffic_policy_local_uses_local_endpoints() {
    let Some(mut lab) = Lab::new("internal_traffic_policy_local_uses_local_endpoints") else { return };
    let mut snap = Snapshot::default();
    let eps = vec![ep(POD_V4[0], false), ep(POD_V4[1], true), ep(POD_V4[2], false)];
    let n = name("local", Protocol::Tcp);
    apply(&mut lab, &mut snap, n.clone(), Some(svc(CIP4, 80, Protocol::Tcp, eps, |i| i.internal_policy_local = true)));
    let seen: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 15).into_iter().collect();
    assert_eq!(seen, BTreeSet::from([POD_V4[1].to_string()]));
    // No local endpoint left: refused, even though remote ones exist.
    let eps = vec![ep(POD_V4[0], false), ep(POD_V4[2], false)];
    apply(
        &mut lab,
        &mut snap,
        n.clone(),
        Some(svc(CIP4, 80, Protocol::Tcp, eps.clone(), |i| i.internal_policy_local = true)),
    );
    let out = lab.client(true, &[("tcp", CIP4, 80)]);
    assert!(out[0].contains(ECONNREFUSED), "{out:?}");
    // Back to Cluster: every endpoint again.
    apply(&mut lab, &mut snap, n, Some(svc(CIP4, 80, Protocol::Tcp, eps, |_| {})));
    let seen: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 20).into_iter().collect();
    assert_eq!(seen, BTreeSet::from([POD_V4[0].to_string(), POD_V4[2].to_string()]));
}

#[test]
fn pins_survive_restart_and_are_adopted() {
    let Some(mut lab) = Lab::new("pins_survive_restart_and_are_adopted") else { return };
    let mut snap = Snapshot::default();
    let web = name("web", Protocol::Tcp);
    apply(&mut lab, &mut snap, web.clone(), Some(svc(CIP4, 80, Protocol::Tcp, v4_eps(2), |_| {})));
    let id = lab.backend().service_id(IpFamily::V4, &web).unwrap();

    // The proxy "exits": programs stay attached through the pinned links, maps stay pinned.
    drop(lab.backend.take());
    assert!(lab.bpffs.join("v1/links/kp_connect4").exists() && lab.bpffs.join("v1/maps/KP_SERVICES").exists());
    let out = lab.client(true, &[("tcp", CIP4, 80)]);
    assert!(out[0].starts_with("tcp ok") && peer_of(&out[0]) == Some("198.19.0.10:80"), "{out:?}");

    // A new process adopts pins, swaps its programs into the links and works before any sync.
    let opts = EbpfOptions::new(&lab.cgroup, &lab.bpffs, vec![IpFamily::V4, IpFamily::V6]);
    lab.backend = Some(EbpfBackend::new(opts).expect("adopt"));
    let out = lab.client(true, &[("tcp", CIP4, 80)]);
    assert!(out[0].starts_with("tcp ok"), "{out:?}");

    // The first (full) sync finds everything in place: same service id, no map writes.
    let report = lab.backend().sync(&snap, &Changes { full: true, ..Default::default() }).unwrap();
    let detail = |k: &str| report.details.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    assert_eq!((detail("map_updates"), detail("map_deletes")), (Some(0), Some(0)), "{report:?}");
    assert_eq!(lab.backend().service_id(IpFamily::V4, &web), Some(id));
    let seen: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 20).into_iter().collect();
    assert_eq!(seen.len(), 2, "{seen:?}");

    // A control-plane-only restart can keep the running programs instead of replacing them.
    drop(lab.backend.take());
    let mut keep = EbpfOptions::new(&lab.cgroup, &lab.bpffs, vec![IpFamily::V4, IpFamily::V6]);
    keep.program_update = proxy_ebpf::ProgramUpdate::Keep;
    lab.backend = Some(EbpfBackend::new(keep).expect("adopt, keeping programs"));
    assert_eq!(lab.backend().service_id(IpFamily::V4, &web), None, "names are re-derived on the first sync");
    lab.backend().sync(&snap, &Changes { full: true, ..Default::default() }).unwrap();
    assert_eq!(lab.backend().service_id(IpFamily::V4, &web), Some(id));
    let out = lab.client(true, &[("tcp", CIP4, 80)]);
    assert!(out[0].starts_with("tcp ok"), "{out:?}");

    // --cleanup: pins gone, programs detached. bpffs releases an unlinked pin's link after an RCU grace
    // period, so the detach is observed within a short, bounded wait.
    lab.backend().cleanup().unwrap();
    assert!(!lab.bpffs.exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = lab.client(true, &[("tcp", CIP4, 80)]);
    while !out[0].contains(ENETUNREACH) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        out = lab.client(true, &[("tcp", CIP4, 80)]);
    }
    assert!(out[0].contains(ENETUNREACH), "still translated after cleanup: {out:?}");
}

#[test]
fn external_ip_and_node_port_frontends() {
    let Some(mut lab) = Lab::new("external_ip_and_node_port_frontends") else { return };
    let mut snap = Snapshot::default();
    // The client's own address stands in for the node address (socket LB on the node itself).
    snap.node.addresses = vec!["198.18.0.1".parse().unwrap()];
    let eps = vec![ep(POD_V4[0], false), ep(POD_V4[1], true)];
    let n = name("ext", Protocol::Tcp);
    let with_ext = |local: bool| {
        move |i: &mut ServicePortInfo| {
            i.external_ips = vec!["198.18.9.9".parse().unwrap()];
            i.node_port = 30080;
            i.external_policy_local = local;
        }
    };
    apply(&mut lab, &mut snap, n.clone(), Some(svc(CIP4, 80, Protocol::Tcp, eps.clone(), with_ext(false))));
    let out = lab.client(true, &[("tcp", "198.18.9.9", 80), ("tcp", "198.18.0.1", 30080)]);
    assert!(out.iter().all(|l| l.starts_with("tcp ok")), "{out:?}");
    assert_eq!(peer_of(&out[0]), Some("198.18.9.9:80"), "{out:?}");
    assert_eq!(peer_of(&out[1]), Some("198.18.0.1:30080"), "{out:?}");

    // externalTrafficPolicy: Local → external frontends use only the local endpoint; ClusterIP does not.
    apply(&mut lab, &mut snap, n, Some(svc(CIP4, 80, Protocol::Tcp, eps, with_ext(true))));
    let ext: BTreeSet<String> = lab.tcp_backends("198.18.0.1", 30080, 12).into_iter().collect();
    assert_eq!(ext, BTreeSet::from([POD_V4[1].to_string()]));
    let cip: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 20).into_iter().collect();
    assert_eq!(cip.len(), 2, "{cip:?}");
}

/// Map dumps in a stable order (hash-map iteration order is arbitrary).
fn sorted<K: std::fmt::Debug, V>(mut v: Vec<(K, V)>) -> Vec<(K, V)> {
    v.sort_by_key(|x| format!("{:?}", x.0));
    v
}

#[test]
fn writer_on_real_maps_matches_fake_maps() {
    use proxy_ebpf::{AyaMaps, FakeMaps, LbMaps, MapWriter};
    let Some(mut lab) = Lab::new("writer_on_real_maps_matches_fake_maps") else { return };
    let mut fake = MapWriter::adopt(FakeMaps::default()).unwrap();
    let families = [IpFamily::V4, IpFamily::V6];
    let mut snap = Snapshot::default();
    let mut steps: Vec<(Snapshot, Changes)> = Vec::new();
    let a = name("a", Protocol::Tcp);
    let b = name("b", Protocol::Udp);
    let c = name("c6", Protocol::Tcp);
    snap.v4.services.insert(a.clone(), svc(CIP4, 80, Protocol::Tcp, v4_eps(3), |_| {}));
    snap.v4.services.insert(b.clone(), svc(CIP4, 53, Protocol::Udp, v4_eps(2), |_| {}));
    let v6_eps: Vec<Endpoint> = POD_V6.iter().map(|x| ep(x, false)).collect();
    snap.v6.services.insert(c.clone(), svc(CIP6, 80, Protocol::Tcp, v6_eps, |_| {}));
    steps.push((snap.clone(), Changes { full: true, ..Default::default() }));
    let eps = vec![ep(POD_V4[0], true), ep(POD_V4[2], false)];
    snap.v4.services.insert(a.clone(), svc(CIP4, 80, Protocol::Tcp, eps, |i| i.internal_policy_local = true));
    snap.v4.services.remove(&b);
    let mut ch = Changes::default();
    ch.v4.services.extend([a.clone(), b.clone()]);
    steps.push((snap.clone(), ch));
    snap.v6.services.clear();
    steps.push((snap.clone(), Changes { full: true, ..Default::default() }));

    for (s, ch) in &steps {
        lab.backend().sync(s, ch).expect("real sync");
        fake.sync(&families, s, ch).expect("fake sync");
        let real = AyaMaps::from_pins(&lab.bpffs).expect("open pins");
        assert_eq!(sorted(real.dump_services().unwrap()), sorted(fake.maps().dump_services().unwrap()));
        assert_eq!(sorted(real.dump_backends().unwrap()), sorted(fake.maps().dump_backends().unwrap()));
        assert_eq!(sorted(real.dump_rev_nat().unwrap()), sorted(fake.maps().dump_rev_nat().unwrap()));
    }
    // And the real maps still serve traffic after all that.
    let seen: BTreeSet<String> = lab.tcp_backends(CIP4, 80, 5).into_iter().collect();
    assert_eq!(seen, BTreeSet::from([POD_V4[0].to_string()]));
}

/// `bpf(BPF_MAP_CREATE)` + `bpf(BPF_OBJ_PIN)`: a map of another shape where the proxy pins one of its own.
fn pin_foreign_map(path: &std::path::Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) {
    use std::os::unix::ffi::OsStrExt;
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries].iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: attr is a zeroed bpf_attr large enough for MAP_CREATE (BPF_MAP_CREATE = 0).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut pin = [0u8; 128];
    pin[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: BPF_OBJ_PIN = 6 with pathname and bpf_fd set; cpath outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), pin.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {}", path.display(), std::io::Error::last_os_error());
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn pinned_maps_of_another_shape_are_recreated_or_refused() {
    let Some(mut lab) = Lab::new("pinned_maps_of_another_shape") else { return };
    let mut snap = Snapshot::default();
    apply(&mut lab, &mut snap, name("web", Protocol::Tcp), Some(svc(CIP4, 80, Protocol::Tcp, v4_eps(2), |_| {})));
    drop(lab.backend.take());
    let maps = lab.bpffs.join("v1/maps");
    let opts = || EbpfOptions::new(&lab.cgroup, &lab.bpffs, vec![IpFamily::V4, IpFamily::V6]);

    // An earlier build's datapath counters had fewer slots: disposable, so re-created with this build's size.
    let counters = maps.join(ebpf_common::map_names::DP_COUNTERS);
    std::fs::remove_file(&counters).unwrap();
    pin_foreign_map(&counters, 6, 4, 8, 3);
    lab.backend = Some(EbpfBackend::new(opts()).expect("counters re-created"));
    let info = aya::maps::MapInfo::from_pin(&counters).unwrap();
    assert_eq!(info.max_entries(), ebpf_common::dp_counter::COUNT);
    let out = lab.client(true, &[("tcp", CIP4, 80)]);
    assert!(out[0].starts_with("tcp ok"), "{out:?}");
    drop(lab.backend.take());

    // Conntrack holds live flows: another shape is refused with the pin named, nothing replaced.
    let ct = maps.join(ebpf_common::map_names::CT);
    std::fs::remove_file(&ct).unwrap();
    pin_foreign_map(&ct, 1, 4, 4, 16);
    let err = EbpfBackend::new(opts()).err().expect("a conntrack map of another shape is refused").to_string();
    assert!(err.contains("KP_CT") && err.contains("key size 4, value size 4"), "{err}");
    assert_eq!(aya::maps::MapInfo::from_pin(&ct).unwrap().value_size(), 4, "the foreign pin was left alone");
    std::fs::remove_file(&ct).unwrap();
    lab.backend = Some(EbpfBackend::new(opts()).expect("a fresh conntrack map"));
}
