//! The kernel's IPVS table behind a trait, and the sync diff (upstream `syncService`/`syncEndpoint`, legacy
//! service cleanup and graceful termination), computed against what the kernel lists on every sync.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use proxier::model::{IpFamily, Protocol};

use crate::graceful::{DrainList, can_delete};
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

/// Brings the kernel's virtual servers of `family` to `desired` (upstream `syncService`, `syncEndpoint` and
/// `cleanLegacyService`).
///
/// * Missing servers are added, changed ones (scheduler, flags, timeout; the kernel's `HASHED` flag ignored)
///   updated; every other virtual server of `family` is deleted unless its address is inside `exclude_cidrs`
///   (upstream deletes any it did not sync, whoever created it: `excludeCIDRs` is how an operator protects theirs).
/// * Real servers not desired go through graceful termination ([`crate::graceful`]): deleted at once for UDP/SCTP
///   or when they have no connections, otherwise set to weight 0 and put on `draining`. A listed server is
///   re-checked here too, and deleted once `active + inactive == 0`. Desired real servers found at weight 0
///   (draining, or after a restart) are restored to 1 and taken off the list.
pub fn sync_ipvs(
    kernel: &mut dyn IpvsKernel,
    draining: &mut DrainList,
    family: IpFamily,
    desired: &BTreeMap<VsKey, VirtualServer>,
    exclude_cidrs: &[IpNet],
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
    // Servers drained from a virtual server someone else deleted are gone with it.
    let vanished: BTreeSet<VsKey> = draining
        .keys()
        .map(|k| k.0)
        .filter(|vs| IpFamily::of(&vs.addr) == family && !current.contains_key(vs))
        .collect();
    for vs in &vanished {
        draining.forget_service(vs);
    }

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
        sync_dests(kernel, draining, k, &want, &vs.real_servers, &dests, &mut r);
    }

    for (k, have) in &current {
        if desired.contains_key(k) || exclude_cidrs.iter().any(|c| c.contains(&k.addr)) {
            continue;
        }
        match kernel.delete_service(have) {
            Ok(()) => {
                r.services_deleted += 1;
                draining.forget_service(k);
            }
            Err(e) => r.errors.push(e.to_string()),
        }
    }
    r
}

fn sync_dests(
    kernel: &mut dyn IpvsKernel,
    draining: &mut DrainList,
    vs: &VsKey,
    svc: &Service,
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
            Some(_) => {
                draining.remove(&(*vs, ip, port));
                continue;
            }
        };
        match res {
            Ok(()) => {
                r.dests_added += 1;
                draining.remove(&(*vs, ip, port));
            }
            Err(e) => r.errors.push(e.to_string()),
        }
    }
    for (&(ip, port), h) in &have_by {
        if want.contains(&(ip, port)) {
            continue;
        }
        let key = (*vs, ip, port);
        // Upstream `GracefulDeleteRS`: delete now if possible, else weight 0 and onto the list.
        let res = if can_delete(vs.protocol, h) {
            kernel.delete_dest(svc, h).map(|()| {
                r.dests_deleted += 1;
                draining.remove(&key);
            })
        } else {
            let res = if h.weight != 0 {
                let mut d = (*h).clone();
                d.weight = 0;
                kernel.update_dest(svc, &d)
            } else {
                Ok(())
            };
            res.map(|()| {
                r.dests_draining += 1;
                draining.insert(key, svc);
            })
        };
        if let Err(e) = res {
            r.errors.push(e.to_string());
        }
    }
}

/// Tables and request log of a [`FakeKernel`].
#[derive(Debug, Default)]
pub struct FakeState {
    /// Services and their destinations.
    pub table: BTreeMap<VsKey, (Service, Vec<Destination>)>,
    /// Every mutating request, e.g. `add_service 10.0.0.1:80/TCP`.
    pub log: Vec<String>,
}

impl FakeState {
    fn entry(&mut self, s: &Service) -> Result<&mut (Service, Vec<Destination>), netlink::Error> {
        let k = fake_key(s);
        self.table.get_mut(&k).ok_or_else(|| netlink::Error::Kernel {
            request: format!("service {k}"),
            source: std::io::Error::from_raw_os_error(libc::ESRCH),
        })
    }

    /// Sets the connection counters of every real server of `vs` (what the kernel reports as traffic goes on).
    pub fn set_conns(&mut self, vs: &VsKey, active: u32, inactive: u32) {
        for d in self.table.get_mut(vs).map(|e| e.1.iter_mut()).into_iter().flatten() {
            d.active_conns = active;
            d.inact_conns = inactive;
        }
    }
}

fn fake_key(s: &Service) -> VsKey {
    key_of(s).expect("fake kernel: address/port service")
}

/// An in-memory IPVS table for tests: records requests, reports connection counts set by the test. Clones
/// share one table, so a test keeps a handle on a kernel it gave away.
#[derive(Debug, Default, Clone)]
pub struct FakeKernel {
    state: Arc<Mutex<FakeState>>,
}

impl FakeKernel {
    /// The table and log.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl IpvsKernel for FakeKernel {
    fn services(&mut self) -> Result<Vec<Service>, netlink::Error> {
        Ok(self
            .state()
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
        Ok(self.state().entry(svc)?.1.clone())
    }
    fn add_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        let mut st = self.state();
        st.log.push(format!("add_service {}", fake_key(svc)));
        st.table.insert(fake_key(svc), (svc.clone(), Vec::new()));
        Ok(())
    }
    fn update_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        let mut st = self.state();
        st.log.push(format!("update_service {}", fake_key(svc)));
        st.entry(svc)?.0 = svc.clone();
        Ok(())
    }
    fn delete_service(&mut self, svc: &Service) -> Result<(), netlink::Error> {
        let mut st = self.state();
        st.log.push(format!("delete_service {}", fake_key(svc)));
        st.table.remove(&fake_key(svc));
        Ok(())
    }
    fn add_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        let mut st = self.state();
        st.log.push(format!("add_dest {} {} w{}", fake_key(svc), SocketAddr::new(d.addr, d.port), d.weight));
        st.entry(svc)?.1.push(d.clone());
        Ok(())
    }
    fn update_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        let mut st = self.state();
        st.log.push(format!("update_dest {} {} w{}", fake_key(svc), SocketAddr::new(d.addr, d.port), d.weight));
        let e = st.entry(svc)?;
        if let Some(x) = e.1.iter_mut().find(|x| x.addr == d.addr && x.port == d.port) {
            x.weight = d.weight;
        }
        Ok(())
    }
    fn delete_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), netlink::Error> {
        let mut st = self.state();
        st.log.push(format!("delete_dest {} {}", fake_key(svc), SocketAddr::new(d.addr, d.port)));
        st.entry(svc)?.1.retain(|x| !(x.addr == d.addr && x.port == d.port));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graceful::{DrainTicker, IpvsState, retry_draining};
    use std::time::{Duration, Instant};

    fn key(s: &str, p: Protocol) -> VsKey {
        let sa: SocketAddr = s.parse().unwrap();
        VsKey { addr: sa.ip(), protocol: p, port: sa.port() }
    }

    fn vs(rs: &[&str]) -> VirtualServer {
        VirtualServer {
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
            real_servers: rs.iter().map(|s| s.parse::<SocketAddr>().unwrap()).map(|a| (a.ip(), a.port())).collect(),
            service: "ns/svc".into(),
        }
    }

    fn sync(k: &mut FakeKernel, d: &mut DrainList, desired: &BTreeMap<VsKey, VirtualServer>) -> DiffReport {
        sync_ipvs(k, d, IpFamily::V4, desired, &[])
    }

    fn take_log(k: &FakeKernel) -> Vec<String> {
        std::mem::take(&mut k.state().log)
    }

    #[test]
    fn adds_then_converges_without_requests() {
        let (mut k, mut dl) = (FakeKernel::default(), DrainList::default());
        let desired =
            BTreeMap::from([(key("10.96.0.1:80", Protocol::Tcp), vs(&["10.244.0.5:8080", "10.244.1.5:8080"]))]);
        let r = sync(&mut k, &mut dl, &desired);
        assert_eq!((r.services_added, r.dests_added), (1, 2));
        assert_eq!(
            take_log(&k),
            [
                "add_service 10.96.0.1:80/TCP",
                "add_dest 10.96.0.1:80/TCP 10.244.0.5:8080 w1",
                "add_dest 10.96.0.1:80/TCP 10.244.1.5:8080 w1"
            ]
        );
        let r = sync(&mut k, &mut dl, &desired);
        assert_eq!(r, DiffReport::default());
        assert!(take_log(&k).is_empty());
    }

    #[test]
    fn graceful_termination_tcp_drains_udp_goes_at_once() {
        let (mut k, mut dl) = (FakeKernel::default(), DrainList::default());
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        let udp = key("10.96.0.10:53", Protocol::Udp);
        let d1 = BTreeMap::from([(tcp, vs(&["10.244.0.5:80", "10.244.0.6:80"])), (udp, vs(&["10.244.0.7:53"]))]);
        sync(&mut k, &mut dl, &d1);
        // Every real server has live connections.
        k.state().set_conns(&tcp, 2, 1);
        k.state().set_conns(&udp, 2, 1);
        take_log(&k);
        let d2 = BTreeMap::from([(tcp, vs(&["10.244.0.5:80"])), (udp, vs(&[]))]);
        let r = sync(&mut k, &mut dl, &d2);
        assert_eq!(
            take_log(&k),
            ["update_dest 10.96.0.1:80/TCP 10.244.0.6:80 w0", "delete_dest 10.96.0.10:53/UDP 10.244.0.7:53"]
        );
        assert_eq!((r.dests_draining, r.dests_deleted), (1, 1));
        let draining_key = (tcp, "10.244.0.6".parse().unwrap(), 80);
        assert_eq!(dl.keys().collect::<Vec<_>>(), [&draining_key]);
        // Still draining: neither a sync nor the periodic check changes anything.
        sync(&mut k, &mut dl, &d2);
        let rr = retry_draining(&mut k, &mut dl);
        assert_eq!((rr.deleted.len(), rr.remaining), (0, 1));
        assert!(take_log(&k).is_empty());
        // Connections gone: the next sync deletes it.
        k.state().set_conns(&tcp, 0, 0);
        sync(&mut k, &mut dl, &d2);
        assert_eq!(take_log(&k), ["delete_dest 10.96.0.1:80/TCP 10.244.0.6:80"]);
        assert!(dl.is_empty());
    }

    #[test]
    fn periodic_check_deletes_drained_server_without_a_sync() {
        let (mut k, mut dl) = (FakeKernel::default(), DrainList::default());
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, vs(&["10.244.0.5:80", "10.244.0.6:80"]))]));
        k.state().set_conns(&tcp, 1, 3);
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, vs(&["10.244.0.5:80"]))]));
        assert_eq!(dl.len(), 1);
        take_log(&k);
        // Only inactive connections left: still draining.
        k.state().set_conns(&tcp, 0, 1);
        assert_eq!(retry_draining(&mut k, &mut dl).remaining, 1);
        assert!(take_log(&k).is_empty());
        k.state().set_conns(&tcp, 0, 0);
        let rr = retry_draining(&mut k, &mut dl);
        assert_eq!(rr.deleted, [(tcp, "10.244.0.6".parse().unwrap(), 80)]);
        assert_eq!(take_log(&k), ["delete_dest 10.96.0.1:80/TCP 10.244.0.6:80"]);
        assert!(dl.is_empty());
        // The serving real server was never touched.
        assert_eq!(k.state().table[&tcp].1.len(), 1);
    }

    #[test]
    fn drain_ticker_thread_deletes_once_connections_reach_zero() {
        let k = FakeKernel::default();
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        let state = Arc::new(Mutex::new(IpvsState::new(Box::new(k.clone()))));
        {
            let mut st = crate::graceful::lock(&state);
            let st = &mut *st;
            let one = BTreeMap::from([(tcp, vs(&["10.244.0.6:80"]))]);
            sync_ipvs(st.kernel.as_mut(), &mut st.draining, IpFamily::V4, &one, &[]);
            k.state().set_conns(&tcp, 4, 0);
            sync_ipvs(st.kernel.as_mut(), &mut st.draining, IpFamily::V4, &BTreeMap::from([(tcp, vs(&[]))]), &[]);
            assert_eq!(st.draining.len(), 1);
        }
        let ticker = DrainTicker::spawn(state.clone(), Duration::from_millis(20)).unwrap();
        k.state().set_conns(&tcp, 0, 0);
        // Bounded wait for the thread's next pass; no sync runs meanwhile.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::graceful::lock(&state).draining.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(ticker);
        assert!(crate::graceful::lock(&state).draining.is_empty(), "ticker never deleted the drained server");
        assert!(k.state().table[&tcp].1.is_empty());
        assert_eq!(k.state().log.last().map(String::as_str), Some("delete_dest 10.96.0.1:80/TCP 10.244.0.6:80"));
    }

    #[test]
    fn draining_endpoint_that_returns_is_restored_and_unlisted() {
        let (mut k, mut dl) = (FakeKernel::default(), DrainList::default());
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, vs(&["10.244.0.5:80"]))]));
        k.state().set_conns(&tcp, 1, 0);
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, vs(&[]))]));
        assert_eq!(dl.len(), 1);
        take_log(&k);
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, vs(&["10.244.0.5:80"]))]));
        assert_eq!(take_log(&k), ["update_dest 10.96.0.1:80/TCP 10.244.0.5:80 w1"]);
        assert!(dl.is_empty());
    }

    #[test]
    fn weight_zero_found_after_restart_is_reset_to_one() {
        let (mut k, mut dl) = (FakeKernel::default(), DrainList::default());
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, vs(&["10.244.0.5:80"]))]));
        k.state().table.get_mut(&tcp).unwrap().1[0].weight = 0;
        take_log(&k);
        sync(&mut k, &mut DrainList::default(), &BTreeMap::from([(tcp, vs(&["10.244.0.5:80"]))]));
        assert_eq!(take_log(&k), ["update_dest 10.96.0.1:80/TCP 10.244.0.5:80 w1"]);
    }

    #[test]
    fn stale_services_deleted_except_excluded_cidrs_and_other_family() {
        let (mut k, mut dl) = (FakeKernel::default(), DrainList::default());
        for a in ["10.96.0.1:80", "192.168.5.1:80", "10.0.0.9:22", "[fd00::1]:80"] {
            k.add_service(&to_service(&key(a, Protocol::Tcp), &vs(&[]))).unwrap();
        }
        // A draining server of a service about to go is forgotten with it.
        dl.insert(
            (key("10.96.0.1:80", Protocol::Tcp), "10.244.0.5".parse().unwrap(), 80),
            &Service::new("10.96.0.1".parse().unwrap(), 6, 80, "rr"),
        );
        take_log(&k);
        let exclude: Vec<IpNet> = vec!["192.168.0.0/16".parse().unwrap()];
        let r = sync_ipvs(&mut k, &mut dl, IpFamily::V4, &BTreeMap::new(), &exclude);
        // Upstream's cleanLegacyService: anything of this family not synced and not excluded, whoever made it.
        assert_eq!(take_log(&k), ["delete_service 10.0.0.9:22/TCP", "delete_service 10.96.0.1:80/TCP"]);
        assert_eq!(r.services_deleted, 2);
        assert!(dl.is_empty());
        let left: Vec<String> = k.state().table.keys().map(|k| k.to_string()).collect();
        assert_eq!(left, ["192.168.5.1:80/TCP", "[fd00::1]:80/TCP"]);
    }

    #[test]
    fn changed_scheduler_or_affinity_updates_the_service() {
        let (mut k, mut dl) = (FakeKernel::default(), DrainList::default());
        let tcp = key("10.96.0.1:80", Protocol::Tcp);
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, vs(&[]))]));
        take_log(&k);
        let mut v = vs(&[]);
        v.flags = crate::netlink::SVC_F_PERSISTENT;
        v.timeout = 10800;
        sync(&mut k, &mut dl, &BTreeMap::from([(tcp, v)]));
        assert_eq!(take_log(&k), ["update_service 10.96.0.1:80/TCP"]);
        assert_eq!(k.state().table[&tcp].0.timeout, 10800);
    }
}
