//! The per-packet Service path for pods that bypass socket LB (`--socket-lb-scope=opt-out|host-only`):
//! `kp_tc_pod_ingress` on every pod-facing device, i.e. every device of the proxy's network namespace that
//! is neither `lo` nor a node device (one carrying a node address, which runs the node programs).
//!
//! Pods come and go all the time, so a thread that entered the proxy's namespace listens for rtnetlink link
//! events (`RTM_NEWLINK`/`RTM_DELLINK`) and rescans the devices on each (and every [`RESCAN`] as a safety
//! net); a new device is attached within one receive timeout ([`EVENT_WAIT`]) of its creation. Nothing is
//! attached before the node devices are known (the first sync with node addresses), so a node device can
//! never get the pod program.
//!
//! Under tcx, links are bpf_links pinned as `<bpffs_root>/v1/links/pod-<ifindex>-<ifname>-ingress`, adopted
//! and updated in place by a restarted proxy like the node-device ones (no window without translation); pins
//! of vanished devices are removed. Under clsact, the program is our filter with handle
//! [`POD_FILTER_HANDLE`] on the ingress hook, replaced in place by a restarted proxy and removed from devices
//! that stop being pod-facing (e.g. a device that became a node device).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ebpf_common::program_names;
use tracing::{debug, info, warn};

use crate::EbpfError;
use crate::loader::{ProgramUpdate, io_err};
use crate::sys::{self, BPF_TCX_INGRESS, TC_PARENT_INGRESS};
use crate::tc::{POD_FILTER_HANDLE, TcAttachMode, clsact_attach, clsact_remove};

/// Prefix of every pod-device link pin in the links directory.
const PIN_PREFIX: &str = "pod-";
/// Receive timeout of the link-event socket: the latency of noticing a stop request or node-device change.
const EVENT_WAIT: Duration = Duration::from_millis(100);
/// Full rescan period, in case an event was lost (netlink overruns drop messages).
const RESCAN: Duration = Duration::from_secs(2);
/// `RTMGRP_LINK`: the multicast group of link events.
const RTMGRP_LINK: u32 = 1;

/// A pod-facing device carrying the per-packet program.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodDevice {
    /// Interface index in the proxy's network namespace.
    pub ifindex: u32,
    /// Interface name.
    pub name: String,
}

impl PodDevice {
    fn pin_name(&self) -> String {
        format!("{PIN_PREFIX}{}-{}-ingress", self.ifindex, self.name)
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Node device ifindices; `None` until the first sync found some.
    node_devices: Mutex<Option<BTreeSet<u32>>>,
    generation: AtomicU64,
    attached: Mutex<Vec<PodDevice>>,
}

/// Keeps `kp_tc_pod_ingress` attached to exactly the pod-facing devices; stops (and joins) on drop.
pub(crate) struct PodWatcher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl PodWatcher {
    /// Starts the watcher thread in the namespace `netns`; `mode` is resolved (`Tcx` or `Clsact`).
    pub(crate) fn start(
        netns: fs::File,
        links_dir: &Path,
        prog: OwnedFd,
        update: ProgramUpdate,
        mode: TcAttachMode,
    ) -> Result<PodWatcher, EbpfError> {
        let shared = Arc::new(Shared::default());
        let mut state =
            State { links_dir: links_dir.to_path_buf(), prog, update, mode, attached: Vec::new(), swept: false };
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kp-pod-devices".into())
            .spawn(move || {
                // SAFETY: a valid namespace fd; only this dedicated thread changes namespace.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    warn!(error = %e, "entering the proxy's network namespace failed; pods get no per-packet path");
                    return;
                }
                let events = match link_event_socket() {
                    Ok(s) => Some(s),
                    Err(e) => {
                        warn!(error = %e, "no rtnetlink link events; rescanning devices every {RESCAN:?} only");
                        None
                    }
                };
                state.run(&sh, events.as_ref());
            })
            .map_err(io_err("starting the pod-device watcher thread"))?;
        Ok(PodWatcher { shared, thread: Some(thread) })
    }

    /// Records the node devices (never attached to); an empty list keeps the previous one.
    pub(crate) fn set_node_devices(&self, ifindices: impl IntoIterator<Item = u32>) {
        let set: BTreeSet<u32> = ifindices.into_iter().collect();
        if set.is_empty() {
            return;
        }
        let mut cur = self.shared.node_devices.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref() != Some(&set) {
            *cur = Some(set);
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The devices the pod program is attached to now.
    pub(crate) fn devices(&self) -> Vec<PodDevice> {
        self.shared.attached.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for PodWatcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Removes every pod-device pin and our pod filter from every device of `netns` (detaching the pod
/// program): for scope `all`.
pub(crate) fn remove_all(links_dir: &Path, netns: &fs::File) -> Result<(), EbpfError> {
    remove_pins_except(links_dir, &[])?;
    let removed = sys::in_netns(netns, || clsact_remove(POD_FILTER_HANDLE, &[TC_PARENT_INGRESS], |_| true))
        .and_then(|r| r)
        .map_err(io_err("removing pod tc filters in the proxy's network namespace"))?;
    for r in removed {
        info!(filter = %r, "pod tc program detached");
    }
    Ok(())
}

fn remove_pins_except(links_dir: &Path, wanted: &[String]) -> Result<(), EbpfError> {
    let entries = fs::read_dir(links_dir).map_err(io_err(format!("listing {}", links_dir.display())))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(PIN_PREFIX) && !wanted.contains(&name) {
            let p = e.path();
            fs::remove_file(&p).map_err(io_err(format!("removing {}", p.display())))?;
            info!(pin = %p.display(), "pod tc program detached");
        }
    }
    Ok(())
}

struct State {
    links_dir: PathBuf,
    prog: OwnedFd,
    update: ProgramUpdate,
    mode: TcAttachMode,
    attached: Vec<PodDevice>,
    /// Whether what the other mode (or a previous run) left on non-pod devices was removed.
    swept: bool,
}

impl State {
    fn run(&mut self, shared: &Shared, events: Option<&OwnedFd>) {
        let mut last_gen = u64::MAX;
        let mut last_scan: Option<Instant> = None;
        // Ends when the backend is dropped.
        while !shared.stop.load(Ordering::SeqCst) {
            let event = match events {
                Some(s) => wait_event(s),
                None => {
                    std::thread::sleep(EVENT_WAIT);
                    false
                }
            };
            let generation = shared.generation.load(Ordering::SeqCst);
            let Some(node) = shared.node_devices.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                continue;
            };
            if event || generation != last_gen || last_scan.is_none_or(|t| t.elapsed() >= RESCAN) {
                if let Err(e) = self.scan(&node) {
                    warn!(error = %e, "reconciling the pod-facing devices failed; retrying");
                }
                last_gen = generation;
                last_scan = Some(Instant::now());
                *shared.attached.lock().unwrap_or_else(|p| p.into_inner()) = self.attached.clone();
            }
        }
    }

    fn scan(&mut self, node: &BTreeSet<u32>) -> Result<(), EbpfError> {
        let desired: Vec<PodDevice> = list_links()
            .map_err(io_err("listing the devices of the proxy's network namespace"))?
            .into_iter()
            .filter(|d| d.name != "lo" && !node.contains(&d.ifindex))
            .collect();
        let mut attached = Vec::with_capacity(desired.len());
        for d in &desired {
            if self.attached.contains(d) {
                attached.push(d.clone());
                continue;
            }
            match self.attach(d) {
                Ok(()) => attached.push(d.clone()),
                // Typically the device vanished between listing and attaching; the next scan settles it.
                Err(e) => debug!(device = %d.name, error = %e, "pod tc program not attached"),
            }
        }
        let previous = std::mem::replace(&mut self.attached, attached);
        if self.mode == TcAttachMode::Clsact {
            // Pod filters now in place, tcx pins of a previous run can go. Stale filters: on devices this
            // process attached to, and once on every device (a previous run's).
            remove_pins_except(&self.links_dir, &[])?;
            let full = !self.swept;
            let removed = clsact_remove(POD_FILTER_HANDLE, &[TC_PARENT_INGRESS], |i| {
                !desired.iter().any(|d| d.ifindex == i) && (full || previous.iter().any(|d| d.ifindex == i))
            })
            .map_err(io_err("removing stale pod tc filters"))?;
            for r in removed {
                info!(filter = %r, "pod tc program detached (no longer a pod-facing device)");
            }
        } else {
            let wanted: Vec<String> = self.attached.iter().map(PodDevice::pin_name).collect();
            remove_pins_except(&self.links_dir, &wanted)?;
            if !self.swept {
                let removed = clsact_remove(POD_FILTER_HANDLE, &[TC_PARENT_INGRESS], |_| true)
                    .map_err(io_err("removing pod clsact filters of a previous run"))?;
                for r in removed {
                    info!(filter = %r, "pod clsact filter of a previous run removed (tcx attached)");
                }
            }
        }
        self.swept = true;
        Ok(())
    }

    /// Attaches the pod program to `d`: our clsact filter (created or replaced in place), or under tcx the
    /// device's pin of a previous run (swapping the program in) or a new pinned link.
    fn attach(&self, d: &PodDevice) -> Result<(), EbpfError> {
        if self.mode == TcAttachMode::Clsact {
            let name = program_names::TC_POD_INGRESS;
            clsact_attach(d.ifindex, TC_PARENT_INGRESS, POD_FILTER_HANDLE, self.prog.as_fd(), name, self.update)
                .map_err(io_err(format!(
                    "attaching the pod tc ingress program to {} ({}) (clsact)",
                    d.name, d.ifindex
                )))?;
            debug!(device = %d.name, ifindex = d.ifindex, "pod tc program attached (clsact)");
            return Ok(());
        }
        let pin = self.links_dir.join(d.pin_name());
        if pin.exists() {
            match sys::obj_get(&pin) {
                Ok(link) if self.update == ProgramUpdate::Keep => {
                    drop(link);
                    return Ok(());
                }
                Ok(link) => match sys::link_update(link.as_fd(), self.prog.as_fd()) {
                    Ok(()) => {
                        debug!(device = %d.name, "replaced pod tc program in pinned link");
                        return Ok(());
                    }
                    Err(e) => warn!(device = %d.name, error = %e, "pinned pod tc link cannot be updated; re-attaching"),
                },
                Err(e) => warn!(pin = %pin.display(), error = %e, "unusable pod tc link pin; re-attaching"),
            }
            fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
        }
        let link = sys::tcx_link_create(self.prog.as_fd(), d.ifindex, BPF_TCX_INGRESS)
            .map_err(io_err(format!("attaching the pod tc ingress program to {} ({})", d.name, d.ifindex)))?;
        sys::obj_pin(&link, &pin).map_err(io_err(format!("pinning tc link at {}", pin.display())))?;
        info!(device = %d.name, ifindex = d.ifindex, pin = %pin.display(), "pod tc program attached");
        Ok(())
    }
}

/// Every device of the calling thread's network namespace.
fn list_links() -> io::Result<Vec<PodDevice>> {
    Ok(sys::list_links()?.into_iter().map(|(ifindex, name)| PodDevice { ifindex, name }).collect())
}

/// A NETLINK_ROUTE socket subscribed to link events, with a receive timeout of [`EVENT_WAIT`].
fn link_event_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; we set family and groups.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = RTMGRP_LINK;
    // SAFETY: `sa` is a valid sockaddr_nl of the size passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: EVENT_WAIT.as_micros() as libc::suseconds_t };
    // SAFETY: `tv` is a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Waits up to [`EVENT_WAIT`] for link events and drains what is queued; true when any arrived (or some
/// were lost: `ENOBUFS`). The messages themselves are not parsed: any link change triggers a rescan.
fn wait_event(sock: &OwnedFd) -> bool {
    let mut buf = vec![0u8; 16384];
    let mut got = false;
    let mut flags = 0;
    // Bounded drain: at most 1024 messages per wake-up; the rest wait for the next one.
    for _ in 0..1024 {
        // SAFETY: `buf` is a writable buffer of the length passed.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n > 0 {
            got = true;
            flags = libc::MSG_DONTWAIT;
            continue;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
            got = true;
            flags = libc::MSG_DONTWAIT;
            continue;
        }
        break;
    }
    got
}
