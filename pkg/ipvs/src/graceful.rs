//! Graceful termination of real servers (upstream `GracefulTerminationManager`, reference §5.2).
//!
//! A TCP real server that leaves its Service while it still has connections is set to weight 0 and put on the
//! [`DrainList`]; it is deleted once `active + inactive == 0`. The list is re-checked by every sync and, as
//! upstream's `rsCheckDeleteInterval` does, by a [`DrainTicker`] thread every [`DRAIN_CHECK_INTERVAL`], so a
//! drained server goes even when no sync comes (long `syncPeriod`). UDP and SCTP servers are never listed:
//! they are deleted at once and their flows expire on the next packet (`expire_nodest_conn=1`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proxier::model::Protocol;
use tracing::{debug, info, warn};

use crate::ipvs_rules::VsKey;
use crate::kernel::IpvsKernel;
use crate::netlink::{Destination, Service};

/// Upstream's `rsCheckDeleteInterval`.
pub const DRAIN_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Identity of a listed real server: its virtual server, address and port.
pub type DrainKey = (VsKey, IpAddr, u16);

/// Real servers at weight 0 waiting for their connections to end, with the virtual server each belongs to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainList {
    items: BTreeMap<DrainKey, Service>,
}

impl DrainList {
    /// Number of real servers draining.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is draining.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether `key` is draining.
    pub fn contains(&self, key: &DrainKey) -> bool {
        self.items.contains_key(key)
    }

    /// The draining real servers.
    pub fn keys(&self) -> impl Iterator<Item = &DrainKey> {
        self.items.keys()
    }

    pub(crate) fn insert(&mut self, key: DrainKey, svc: &Service) {
        self.items.insert(key, svc.clone());
    }

    pub(crate) fn remove(&mut self, key: &DrainKey) -> bool {
        self.items.remove(key).is_some()
    }

    /// Forgets every real server of virtual server `vs` (it was deleted with them).
    pub(crate) fn forget_service(&mut self, vs: &VsKey) {
        self.items.retain(|k, _| k.0 != *vs);
    }
}

/// Upstream `IsRsGracefulTerminationNeeded`: only TCP waits for its connections.
pub fn needs_drain(protocol: Protocol) -> bool {
    protocol == Protocol::Tcp
}

/// Whether `d` can go now: not TCP, or no connection left.
pub fn can_delete(protocol: Protocol, d: &Destination) -> bool {
    !needs_drain(protocol) || d.active_conns.saturating_add(d.inact_conns) == 0
}

/// What one pass over the drain list did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetryReport {
    /// Real servers deleted (connections gone, or the server vanished).
    pub deleted: Vec<DrainKey>,
    /// Real servers still draining.
    pub remaining: usize,
    /// Errors, each naming its request.
    pub errors: Vec<String>,
}

/// Upstream `tryDeleteRs`: deletes every listed real server whose connections are gone; one no longer in the
/// kernel is dropped from the list. A listing error keeps the item for the next pass.
pub fn retry_draining(kernel: &mut dyn IpvsKernel, list: &mut DrainList) -> RetryReport {
    let mut r = RetryReport::default();
    // One listing per virtual server, however many of its servers drain.
    let mut by_service: BTreeMap<VsKey, (Service, Vec<(IpAddr, u16)>)> = BTreeMap::new();
    for ((vs, ip, port), svc) in &list.items {
        by_service.entry(*vs).or_insert_with(|| (svc.clone(), Vec::new())).1.push((*ip, *port));
    }
    for (vs, (svc, servers)) in by_service {
        let dests = match kernel.destinations(&svc) {
            Ok(d) => d,
            Err(e) => {
                r.errors.push(e.to_string());
                continue;
            }
        };
        for (ip, port) in servers {
            let key = (vs, ip, port);
            match dests.iter().find(|d| d.addr == ip && d.port == port) {
                None => {
                    debug!(virtual_server = %vs, real_server = %SocketAddr::new(ip, port), "Draining real server already gone");
                    list.remove(&key);
                    r.deleted.push(key);
                }
                Some(d) if can_delete(vs.protocol, d) => match kernel.delete_dest(&svc, d) {
                    Ok(()) => {
                        info!(virtual_server = %vs, real_server = %SocketAddr::new(ip, port), "Deleted drained real server");
                        list.remove(&key);
                        r.deleted.push(key);
                    }
                    Err(e) => r.errors.push(e.to_string()),
                },
                Some(d) => debug!(
                    virtual_server = %vs,
                    real_server = %SocketAddr::new(ip, port),
                    active = d.active_conns,
                    inactive = d.inact_conns,
                    "Real server still has connections"
                ),
            }
        }
    }
    r.remaining = list.len();
    r
}

/// The kernel handle and the drain list, shared by syncs and the [`DrainTicker`].
pub struct IpvsState {
    /// The IPVS table.
    pub kernel: Box<dyn IpvsKernel>,
    /// Real servers draining.
    pub draining: DrainList,
}

impl IpvsState {
    /// State around `kernel` with nothing draining.
    pub fn new(kernel: Box<dyn IpvsKernel>) -> Self {
        IpvsState { kernel, draining: DrainList::default() }
    }

    /// One pass of [`retry_draining`].
    pub fn retry_draining(&mut self) -> RetryReport {
        retry_draining(self.kernel.as_mut(), &mut self.draining)
    }
}

/// Locks `state`, taking it over from a thread that panicked while holding it (the state stays consistent
/// with the kernel: every change is one request).
pub fn lock(state: &Mutex<IpvsState>) -> MutexGuard<'_, IpvsState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The thread re-checking the drain list every interval; stopped and joined on drop.
pub struct DrainTicker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DrainTicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainTicker").field("running", &self.thread.is_some()).finish()
    }
}

impl DrainTicker {
    /// Starts re-checking `state`'s drain list every `interval` (upstream: [`DRAIN_CHECK_INTERVAL`]).
    pub fn spawn(state: Arc<Mutex<IpvsState>>, interval: Duration) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("ipvs-graceful-termination".into()).spawn(move || {
            let (flag, cv) = &*stop2;
            let mut next = Instant::now() + interval;
            loop {
                let mut stopped = flag.lock().unwrap_or_else(|p| p.into_inner());
                while !*stopped && Instant::now() < next {
                    let wait = next.saturating_duration_since(Instant::now());
                    stopped = cv.wait_timeout(stopped, wait).unwrap_or_else(|p| p.into_inner()).0;
                }
                if *stopped {
                    return;
                }
                drop(stopped);
                next = Instant::now() + interval;
                let mut st = lock(&state);
                if st.draining.is_empty() {
                    continue;
                }
                let r = st.retry_draining();
                drop(st);
                for e in &r.errors {
                    warn!(error = %e, "Try delete real server failed");
                }
                debug!(deleted = r.deleted.len(), remaining = r.remaining, "Graceful termination check");
            }
        })?;
        Ok(DrainTicker { stop, thread: Some(thread) })
    }
}

impl Drop for DrainTicker {
    fn drop(&mut self) {
        let (flag, cv) = &*self.stop;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
