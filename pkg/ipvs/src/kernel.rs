//! The kernel's IPVS table behind a trait, and the sync diff (upstream `syncService`/`syncEndpoint`, legacy
//! service cleanup and `GracefulTerminationManager`), computed against what the kernel lists on every sync.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use proxier::model::{IpFamily, Protocol};

use crate::ipvs_rules::{VirtualServer, VsKey};
use crate::netlink::{self, Destination, IpvsClient, SVC_F_HASHED, Service};

/// What a sync needs from the kernel's IPVS table.
pub trait IpvsKernel: Send {
    /// Every virtual server.
    fn services(&mut self) -> Result<Vec<Service>, netlink::Error>;
    /// The real servers of one virtual server, with connection counts.
    fn destinations(&mut self, svc: &Service) -> Result<Vec<Destination>, netlink::Error>;
    /// Adds a virtual server.
    fn add_service(&mut self, svc: &Service) -> Result<(), netlink::Error>;
    /// Updates a virtual server's scheduler, flags or timeout.
    fn update_service(&mut self, svc: &Service) -> Result<(), netlink::Error>;
    /// Deletes a virtual server.
    fn delete_service(&mut self, svc: &Service) -> Result<(), netlink::Error>;
    /// Adds a real server.
    fn add_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error>;
    /// Updates a real server (weight).
    fn update_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error>;
    /// Deletes a real server.
    fn delete_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error>;
}

impl IpvsKernel for IpvsClient {
    fn services(&mut self) -> Result<Vec<Service>, netlink::Error> {
        IpvsClient::services(self)
    }
    fn destinations(&mut self, svc: &Service) -> Result<Vec<Destination>, netlink::Error> {
        IpvsClient::destinations(self, svc)
    }
    fn add_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        self.new_service(svc)
    }
    fn update_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        self.set_service(svc)
    }
    fn delete_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        self.del_service(svc)
    }
    fn add_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        self.new_dest(svc, d)
    }
    fn update_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        self.set_dest(svc, d)
    }
    fn delete_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        self.del_dest(svc, d)
    }
}

fn proto_of(n: u16) -> Option<Protocol> {
    match n {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

fn to_service(k: &VsKey, vs: &VirtualServer) -> Service {
    let mut s = Service::new(k.addr, u16::from(k.protocol.number()), k.port, &vs.scheduler);
    s.flags = vs.flags;
    s.timeout = vs.timeout;
    s
}

/// The identity of a listed service, if it is an address/port service of a protocol we use.
pub fn key_of(s: &Service) -> Option<VsKey> {
    if s.fwmark != 0 {
        return None;
    }
    Some(VsKey { addr: s.addr, protocol: proto_of(s.protocol)?, port: s.port })
}

/// What one IPVS sync did, and what it could not do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiffReport {
    /// Virtual servers added.
    pub services_added: usize,
    /// Virtual servers updated.
    pub services_updated: usize,
    /// Virtual servers deleted.
    pub services_deleted: usize,
    /// Real servers added (or restored to weight 1).
    pub dests_added: usize,
    /// Real servers deleted.
    pub dests_deleted: usize,
    /// Real servers left at weight 0 until their connections drain.
    pub dests_draining: usize,
    /// Errors, each naming its request; the sync continues past them as upstream does.
    pub errors: Vec<String>,
}

/// Brings the kernel's virtual servers of `family` to `desired`.
///
/// * Missing servers are added, changed ones (scheduler, flags, timeout; the kernel's `HASHED` flag ignored)
///   updated; servers not desired are deleted unless their address is inside `exclude_cidrs` (and are only
///   touched when `owned` says they could be ours: address bound to `kube-ipvs0` or a NodePort address).
/// * Real servers not desired are deleted at once for UDP/SCTP or when they have no connections; otherwise their
///   weight goes to 0 and a later sync deletes them once `active + inactive == 0` (graceful termination).
///   Desired real servers found at weight 0 are restored to 1.
pub fn sync_ipvs(
    kernel: &mut dyn IpvsKernel,
    family: IpFamily,
    desired: &BTreeMap<VsKey, VirtualServer>,
    exclude_cidrs: &[IpNet],
    owned: &dyn Fn(&IpAddr) -> bool,
) -> DiffReport {
    let mut r = DiffReport::default();
    let listed = match kernel.services() {
        Ok(l) => l,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    let current: BTreeMap<VsKey, Service> = listed
        .into_iter()
        .filter(|s| IpFamily::of(&s.addr) == family)
        .filter_map(|s| key_of(&s).map(|k| (k, s)))
        .collect();

    for (k, vs) in desired {
        let want = to_service(k, vs);
        match current.get(k) {
            None => match kernel.add_service(&want) {
                Ok(()) => r.services_added += 1,
                Err(e) => {
                    r.errors.push(e.to_string());
                    continue;
                }
            },
            Some(have) => {
                let same = have.sched_name == want.sched_name
                    && have.flags & !SVC_F_HASHED == want.flags
                    && have.timeout == want.timeout;
                if !same {
                    match kernel.update_service(&want) {
                        Ok(()) => r.services_updated += 1,
                        Err(e) => r.errors.push(e.to_string()),
                    }
                }
            }
        }
        let dests = if current.contains_key(k) {
            match kernel.destinations(&want) {
                Ok(d) => d,
                Err(e) => {
                    r.errors.push(e.to_string());
                    continue;
                }
            }
        } else {
            Vec::new()
        };
        sync_dests(kernel, &want, k.protocol, &vs.real_servers, &dests, &mut r);
    }

    for (k, have) in &current {
        if desired.contains_key(k) || !owned(&k.addr) {
            continue;
        }
        if exclude_cidrs.iter().any(|c| c.contains(&k.addr)) {
            continue;
        }
        match kernel.delete_service(have) {
            Ok(()) => r.services_deleted += 1,
            Err(e) => r.errors.push(e.to_string()),
        }
    }
    r
}

fn sync_dests(
    kernel: &mut dyn IpvsKernel,
    svc: &Service,
    protocol: Protocol,
    want: &BTreeSet<(IpAddr, u16)>,
    have: &[Destination],
    r: &mut DiffReport,
) {
    let have_by: BTreeMap<(IpAddr, u16), &Destination> = have.iter().map(|d| ((d.addr, d.port), d)).collect();
    for &(ip, port) in want {
        let d = Destination::new(ip, port, 1);
        let res = match have_by.get(&(ip, port)) {
            None => kernel.add_dest(svc, &d),
            // Back from draining (or found at weight 0 after a restart): serve again.
            Some(h) if h.weight != 1 => kernel.update_dest(svc, &d),
            Some(_) => continue,
        };
        match res {
            Ok(()) => r.dests_added += 1,
            Err(e) => r.errors.push(e.to_string()),
        }
    }
    for (key, h) in &have_by {
        if want.contains(key) {
            continue;
        }
        // UDP/SCTP flows are expired on their next packet (expire_nodest_conn), so delete at once.
        let immediate = protocol != Protocol::Tcp || h.active_conns + h.inact_conns == 0;
        let res = if immediate {
            kernel.delete_dest(svc, h).map(|()| r.dests_deleted += 1)
        } else if h.weight != 0 {
            let mut d = (*h).clone();
            d.weight = 0;
            kernel.update_dest(svc, &d).map(|()| r.dests_draining += 1)
        } else {
            r.dests_draining += 1;
            Ok(())
        };
        if let Err(e) = res {
            r.errors.push(e.to_string());
        }
    }
}

/// An in-memory IPVS table for tests: records requests, reports connection counts set by the test.
#[derive(Debug, Default, Clone)]
pub struct FakeKernel {
    /// Services and their destinations.
    pub table: BTreeMap<VsKey, (Service, Vec<Destination>)>,
    /// Every mutating request, e.g. `add_service 10.0.0.1:80/TCP`.
    pub log: Vec<String>,
}

impl FakeKernel {
    fn key(s: &Service) -> VsKey {
        key_of(s).expect("fake kernel: address/port service")
    }
    fn entry(&mut self, s: &Service) -> Result<&mut (Service, Vec<Destination>), netlink::Error> {
        let k = Self::key(s);
        self.table.get_mut(&k).ok_or_else(|| netlink::Error::Kernel {
            request: format!("service {k}"),
            source: std::io::Error::from_raw_os_error(libc::ESRCH),
        })
    }
}

impl IpvsKernel for FakeKernel {
    fn services(&mut self) -> Result<Vec<Service>, netlink::Error> {
        Ok(self
            .table
            .values()
            .map(|(s, _)| {
                let mut s = s.clone();
                s.flags |= SVC_F_HASHED;
                s
            })
            .collect())
    }
    fn destinations(&mut self, svc: &Service) -> Result<Vec<Destination>, netlink::Error> {
        Ok(self.entry(svc)?.1.clone())
    }
    fn add_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        self.log.push(format!("add_service {}", Self::key(svc)));
        self.table.insert(Self::key(svc), (svc.clone(), Vec::new()));
        Ok(())
    }
    fn update_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        self.log.push(format!("update_service {}", Self::key(svc)));
        self.entry(svc)?.0 = svc.clone();
        Ok(())
    }
    fn delete_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        self.log.push(format!("delete_service {}", Self::key(svc)));
        self.table.remove(&Self::key(svc));
        Ok(())
    }
    fn add_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        self.log.push(format!(
            "add_dest {} {} w{}",
            Self::key(svc),
            std::net::SocketAddr::new(d.addr, d.port),
            d.weight
        ));
        self.entry(svc)?.1.push(d.clone());
        Ok(())
    }
    fn update_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        self.log.push(format!(
            "update_dest {} {} w{}",
            Self::key(svc),
            std::net::SocketAddr::new(d.addr, d.port),
            d.weight
        ));
        let e = self.entry(svc)?;
        if let Some(x) = e.1.iter_mut().find(|x| x.addr == d.addr && x.port == d.port) {
            x.weight = d.weight;
        }
        Ok(())
    }
    fn delete_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        self.log.push(format!("delete_dest {} {}", Self::key(svc), std::net::SocketAddr::new(d.addr, d.port)));
        self.entry(svc)?.1.retain(|x| !(x.addr == d.addr && x.port == d.port));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, p: Protocol) -> VsKey {
        let sa: std::net::SocketAddr = s.parse().unwrap();
        VsKey { addr: sa.ip(), protocol: p, port: sa.port() }
    }

    fn vs(rs: &[&str]) -> VirtualServer {
        VirtualServer {
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
            real_servers: rs
                .iter()
                .map(|s| s.parse::<std::net::SocketAddr>().unwrap())
                .map(|a| (a.ip(), a.port()))
                .collect(),
            service: "ns/svc".into(),
        }
    }

    fn all(_: &IpAddr) -> bool {
        true
    }

    #[test]
    fn adds_then_converges_without_requests() {
        let mut k = FakeKernel::default();
        let desired =
            BTreeMap::from([(key("10.96.0.1:80", Protocol::Tcp), vs(&["10.244.0.5:8080", "10.244.1.5:8080"]))]);
        let r = sync_ipvs(&mut k, IpFamily::V4, &desired, &[], &all);
        assert_eq!((r.services_added, r.dests_added), (1, 2));
        assert_eq!(
            k.log,
            [
                "add_service 10.96.0.1:80/TCP",
                "add_dest 10.96.0.1:80/TCP 10.244.0.5:8080 w1",
                "add_dest 10.96.0.1:80/TCP 10.244.1.5:8080 w1"
            ]
        );
        k.log.clear();
        let r = sync_ipvs(&mut k, IpFamily::V4, &desired, &[], &all);
        assert_eq!(r, DiffReport::default());
        assert!(k.log.is_empty(), "{:?}", k.log);
    }

    #[test]
    fn graceful_termination_tcp_drains_udp_goes_at_once() {
        let mut k = FakeKernel::default();
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        let udp = key("10.96.0.10:53", Protocol::Udp);
        let d1 = BTreeMap::from([(tcp, vs(&["10.244.0.5:80", "10.244.0.6:80"])), (udp, vs(&["10.244.0.7:53"]))]);
        sync_ipvs(&mut k, IpFamily::V4, &d1, &[], &all);
        // The TCP endpoint has live connections; the UDP one too.
        for (_, dests) in k.table.values_mut() {
            for d in dests.iter_mut() {
                d.active_conns = 2;
                d.inact_conns = 1;
            }
        }
        k.log.clear();
        let d2 = BTreeMap::from([(tcp, vs(&["10.244.0.5:80"])), (udp, vs(&[]))]);
        let r = sync_ipvs(&mut k, IpFamily::V4, &d2, &[], &all);
        assert_eq!(
            k.log,
            ["update_dest 10.96.0.1:80/TCP 10.244.0.6:80 w0", "delete_dest 10.96.0.10:53/UDP 10.244.0.7:53"]
        );
        assert_eq!((r.dests_draining, r.dests_deleted), (1, 1));
        // Still draining: nothing happens.
        k.log.clear();
        sync_ipvs(&mut k, IpFamily::V4, &d2, &[], &all);
        assert!(k.log.is_empty(), "{:?}", k.log);
        // Connections gone: deleted.
        for d in &mut k.table.get_mut(&tcp).unwrap().1 {
            d.active_conns = 0;
            d.inact_conns = 0;
        }
        sync_ipvs(&mut k, IpFamily::V4, &d2, &[], &all);
        assert_eq!(k.log, ["delete_dest 10.96.0.1:80/TCP 10.244.0.6:80"]);
    }

    #[test]
    fn draining_endpoint_that_returns_is_restored() {
        let mut k = FakeKernel::default();
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        sync_ipvs(&mut k, IpFamily::V4, &BTreeMap::from([(tcp, vs(&["10.244.0.5:80"]))]), &[], &all);
        k.table.get_mut(&tcp).unwrap().1[0].weight = 0;
        k.log.clear();
        sync_ipvs(&mut k, IpFamily::V4, &BTreeMap::from([(tcp, vs(&["10.244.0.5:80"]))]), &[], &all);
        assert_eq!(k.log, ["update_dest 10.96.0.1:80/TCP 10.244.0.5:80 w1"]);
    }

    #[test]
    fn stale_services_deleted_except_excluded_and_foreign_family_or_unowned() {
        let mut k = FakeKernel::default();
        for (a, p) in
            [("10.96.0.1:80", Protocol::Tcp), ("192.168.5.1:80", Protocol::Tcp), ("10.0.0.9:22", Protocol::Tcp)]
        {
            let kk = key(a, p);
            k.add_service(&to_service(&kk, &vs(&[]))).unwrap();
        }
        k.add_service(&to_service(&key("[fd00::1]:80", Protocol::Tcp), &vs(&[]))).unwrap();
        k.log.clear();
        let exclude: Vec<IpNet> = vec!["192.168.0.0/16".parse().unwrap()];
        let owned = |ip: &IpAddr| ip.to_string() != "10.0.0.9";
        let r = sync_ipvs(&mut k, IpFamily::V4, &BTreeMap::new(), &exclude, &owned);
        assert_eq!(k.log, ["delete_service 10.96.0.1:80/TCP"]);
        assert_eq!(r.services_deleted, 1);
    }

    #[test]
    fn changed_scheduler_or_affinity_updates_the_service() {
        let mut k = FakeKernel::default();
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        sync_ipvs(&mut k, IpFamily::V4, &BTreeMap::from([(tcp, vs(&[]))]), &[], &all);
        k.log.clear();
        let mut v = vs(&[]);
        v.flags = crate::netlink::SVC_F_PERSISTENT;
        v.timeout = 10800;
        sync_ipvs(&mut k, IpFamily::V4, &BTreeMap::from([(tcp, v)]), &[], &all);
        assert_eq!(k.log, ["update_service 10.96.0.1:80/TCP"]);
        assert_eq!(k.table[&tcp].0.timeout, 10800);
    }
}
