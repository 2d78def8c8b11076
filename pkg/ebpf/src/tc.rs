//! tc attachment of the north-south programs to the node devices.
//!
//! The node devices are the interfaces carrying one of the node's addresses (the Node object's addresses,
//! which the writer also uses as NodePort frontends) in the proxy's network namespace. Device discovery
//! and attachment run on a thread that entered that namespace (recorded when the backend was created),
//! so nothing is ever attached to an interface of another namespace, whichever thread calls `sync`.
//!
//! Two ways to attach ([`TcAttachMode`], probed once at start-up, forced with `KUBE_PROXY_RS_TC_ATTACH`):
//! - tcx bpf_links (kernel ≥ 6.6) pinned under `<bpffs_root>/v1/links/tc-<ifindex>-<ifname>-{ingress,
//!   egress}`. A restarted proxy swaps its programs into the pinned links (`BPF_LINK_UPDATE`), so
//!   translation never stops; a link whose device vanished is re-created. Removing a pin detaches (no
//!   process holds the link open).
//! - clsact (older kernels): a direct-action cls_bpf filter on the clsact qdisc's ingress and egress hooks,
//!   with priority [`CLSACT_PRIORITY`] and handle [`NODE_FILTER_HANDLE`] (pod devices: [`POD_FILTER_HANDLE`]).
//!   Filters outlive the process without pins; a restarted proxy replaces the program of its filter in place
//!   (create-or-replace on the same priority and handle, never delete-then-add). Filters are found again by
//!   priority, handle and program name (`kp_tc_*`), which is how stale ones and `--cleanup` find only ours.
//!
//! Switching modes attaches the new way first and removes the old one after: tcx runs before clsact
//! filters, and a packet the first of our programs translates ends the hook there (untouched packets go on,
//! `TC_ACT_UNSPEC`, and are left alone by the second too), so a device is never without a program.
//! `KP_NODE_ADDRS` gets each device's node address per family: the SNAT source for remote backends.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aya::maps::{HashMap, MapData};
use ebpf_common::{Addr, FAMILY_V4, FAMILY_V6, NodeAddrKey, map_names, program_names};
use tracing::{info, warn};

use crate::EbpfError;
use crate::loader::ProgramUpdate;
use crate::loader::io_err;
use crate::sys::{self, BPF_TCX_EGRESS, BPF_TCX_INGRESS, IfAddr, TC_PARENT_EGRESS, TC_PARENT_INGRESS, TcFilter};
use crate::writer::addr16;

/// Prefix of every tc link pin in the links directory.
const PIN_PREFIX: &str = "tc-";

/// Environment variable forcing the tc attachment: `tcx`, `clsact` or `auto` (the default).
pub const TC_ATTACH_ENV: &str = "KUBE_PROXY_RS_TC_ATTACH";

/// Priority (`pref` in `tc filter show`) of our clsact filters: 0x4b50 ("KP"), far from the values tools
/// use (Cilium's default 1, tc's automatic 49152 counting down), so we never take over a foreign
/// priority. Lower runs first; packets our programs leave untouched go on to later filters (`TC_ACT_UNSPEC`).
pub const CLSACT_PRIORITY: u16 = 0x4b50;
/// Handle of our clsact filters on node devices (ingress and egress).
pub const NODE_FILTER_HANDLE: u32 = 0x4b01;
/// Handle of our clsact filter on pod-facing devices (ingress).
pub const POD_FILTER_HANDLE: u32 = 0x4b02;
/// Prefix of our programs' names, as the filters carry them (`TCA_BPF_NAME`).
const PROGRAM_PREFIX: &str = "kp_tc_";

/// How the tc programs attach to devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TcAttachMode {
    /// [`TC_ATTACH_ENV`] when set, else tcx where the kernel has it (probed), else clsact.
    #[default]
    Auto,
    /// tcx bpf_links (kernel ≥ 6.6), pinned.
    Tcx,
    /// cls_bpf filters on the clsact qdisc (any kernel with clsact, 4.5+).
    Clsact,
}

impl FromStr for TcAttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "" => Ok(TcAttachMode::Auto),
            "tcx" => Ok(TcAttachMode::Tcx),
            "clsact" => Ok(TcAttachMode::Clsact),
            other => Err(format!("unknown tc attach mode {other:?} (expected tcx, clsact or auto)")),
        }
    }
}

impl fmt::Display for TcAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcAttachMode::Auto => "auto",
            TcAttachMode::Tcx => "tcx",
            TcAttachMode::Clsact => "clsact",
        })
    }
}

impl TcAttachMode {
    /// The concrete mode (`Tcx` or `Clsact`): `Auto` reads [`TC_ATTACH_ENV`], then probes the kernel with
    /// `prog` (a loaded tc program; nothing is attached, see [`sys::tcx_supported`]).
    pub(crate) fn resolve(self, prog: impl AsFd) -> Result<TcAttachMode, EbpfError> {
        let mode = match self {
            TcAttachMode::Auto => match std::env::var(TC_ATTACH_ENV) {
                Ok(v) => v.parse().map_err(|e| EbpfError::Options(format!("{TC_ATTACH_ENV}={v:?}: {e}")))?,
                Err(_) => TcAttachMode::Auto,
            },
            m => m,
        };
        if mode != TcAttachMode::Auto {
            return Ok(mode);
        }
        match sys::tcx_supported(prog) {
            Ok(true) => Ok(TcAttachMode::Tcx),
            Ok(false) => Ok(TcAttachMode::Clsact),
            Err(e) => Err(EbpfError::Io { what: "probing the kernel for tcx (BPF_LINK_CREATE)".into(), source: e }),
        }
    }
}

/// Whether `f` is our filter with `handle`: our priority and a program name of ours.
pub(crate) fn is_ours(f: &TcFilter, handle: u32) -> bool {
    f.prio == CLSACT_PRIORITY
        && f.handle == handle
        && f.kind == "bpf"
        && f.name.as_deref().is_some_and(|n| n.starts_with(PROGRAM_PREFIX))
}

/// Attaches `prog` as our filter `handle` on a clsact hook of a device of the calling thread's namespace,
/// adding the qdisc if missing; an existing filter of ours gets the new program in place (or is kept
/// under [`ProgramUpdate::Keep`]).
pub(crate) fn clsact_attach(
    ifindex: u32,
    parent: u32,
    handle: u32,
    prog: impl AsFd,
    name: &str,
    update: ProgramUpdate,
) -> io::Result<()> {
    sys::clsact_add(ifindex)?;
    if update == ProgramUpdate::Keep && sys::tc_filters(ifindex, parent)?.iter().any(|f| is_ours(f, handle)) {
        return Ok(());
    }
    sys::tc_filter_replace(ifindex, parent, CLSACT_PRIORITY, handle, prog, name)
}

/// Removes our filter `handle` from `parents` of the devices of the calling thread's namespace that
/// `remove(ifindex)` selects; returns `device/hook` of each filter removed.
pub(crate) fn clsact_remove(handle: u32, parents: &[u32], remove: impl Fn(u32) -> bool) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for (ifindex, name) in sys::list_links()? {
        if !remove(ifindex) {
            continue;
        }
        for &parent in parents {
            if sys::tc_filters(ifindex, parent)?.iter().any(|f| is_ours(f, handle))
                && sys::tc_filter_del(ifindex, parent, CLSACT_PRIORITY, handle)?
            {
                removed.push(format!("{name}/{}", hook_name(parent)));
            }
        }
    }
    Ok(removed)
}

/// Removes every filter of ours (node and pod handles) from every device of the calling thread's
/// namespace, and the clsact qdisc of a device where that left no filter at all; returns `device/hook` of
/// each filter removed.
pub(crate) fn clsact_remove_all() -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for (ifindex, name) in sys::list_links()? {
        let mut ours = false;
        let mut others = false;
        for parent in [TC_PARENT_INGRESS, TC_PARENT_EGRESS] {
            for f in sys::tc_filters(ifindex, parent)? {
                // Handle 0: the per-priority chain head, not a filter.
                if f.handle == 0 {
                    continue;
                }
                if (is_ours(&f, NODE_FILTER_HANDLE) || is_ours(&f, POD_FILTER_HANDLE))
                    && sys::tc_filter_del(ifindex, parent, f.prio, f.handle)?
                {
                    ours = true;
                    removed.push(format!("{name}/{}", hook_name(parent)));
                } else {
                    others = true;
                }
            }
        }
        // A qdisc another tool uses (or made without filters yet, when we never had one there) stays.
        if ours && !others {
            sys::clsact_del(ifindex)?;
        }
    }
    Ok(removed)
}

fn hook_name(parent: u32) -> &'static str {
    if parent == TC_PARENT_EGRESS { "egress" } else { "ingress" }
}

/// A device carrying node addresses, with the first node address of each family on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDevice {
    /// Interface name.
    pub name: String,
    /// Interface index in the proxy's network namespace.
    pub ifindex: u32,
    /// First IPv4 node address on the device.
    pub v4: Option<IpAddr>,
    /// First IPv6 node address on the device.
    pub v6: Option<IpAddr>,
}

impl NodeDevice {
    fn pin_name(&self, dir: &str) -> String {
        format!("{PIN_PREFIX}{}-{}-{dir}", self.ifindex, self.name)
    }
}

/// The devices of `addrs` that carry one of `node_addresses`; the order of `node_addresses` picks the
/// address per family.
pub(crate) fn node_devices(addrs: &[IfAddr], node_addresses: &[IpAddr]) -> Vec<NodeDevice> {
    let mut by_index: BTreeMap<u32, NodeDevice> = BTreeMap::new();
    for na in node_addresses {
        for a in addrs.iter().filter(|a| a.ip == *na) {
            let d = by_index.entry(a.ifindex).or_insert_with(|| NodeDevice {
                name: a.name.clone(),
                ifindex: a.ifindex,
                v4: None,
                v6: None,
            });
            match na {
                IpAddr::V4(_) if d.v4.is_none() => d.v4 = Some(*na),
                IpAddr::V6(_) if d.v6.is_none() => d.v6 = Some(*na),
                _ => {}
            }
        }
    }
    by_index.into_values().collect()
}

/// Keeps the tc programs attached to exactly the current node devices.
pub(crate) struct TcManager {
    netns: fs::File,
    links_dir: PathBuf,
    ingress: OwnedFd,
    egress: OwnedFd,
    update: ProgramUpdate,
    node_addrs: HashMap<MapData, NodeAddrKey, Addr>,
    attached: BTreeMap<u32, NodeDevice>,
    last_addresses: Option<Vec<IpAddr>>,
    mode: TcAttachMode,
    /// Whether filters (clsact) or links (tcx) a previous run left outside the current devices were swept.
    swept: bool,
}

impl TcManager {
    /// A manager for the namespace `netns` (an open `/proc/…/ns/net` or `/run/netns/…` file); `mode` is
    /// resolved (`Tcx` or `Clsact`).
    pub(crate) fn new(
        netns: fs::File,
        links_dir: &Path,
        (ingress, egress): (OwnedFd, OwnedFd),
        update: ProgramUpdate,
        node_addrs: aya::maps::Map,
        mode: TcAttachMode,
    ) -> Result<Self, EbpfError> {
        let node_addrs = HashMap::try_from(node_addrs).map_err(|source| EbpfError::MapOp {
            map: map_names::NODE_ADDRS,
            op: "open",
            key: String::new(),
            source: Box::new(source),
        })?;
        Ok(TcManager {
            netns,
            links_dir: links_dir.to_path_buf(),
            ingress,
            egress,
            update,
            node_addrs,
            attached: BTreeMap::new(),
            last_addresses: None,
            mode,
            swept: false,
        })
    }

    /// The devices the programs are attached to now.
    pub(crate) fn devices(&self) -> Vec<NodeDevice> {
        self.attached.values().cloned().collect()
    }

    /// Attaches to new node devices and detaches from devices that no longer carry a node address. Device
    /// discovery runs again when the addresses change or `rescan` is set (full syncs), so new interfaces
    /// and addresses are picked up without a restart.
    pub(crate) fn reconcile(&mut self, node_addresses: &[IpAddr], rescan: bool) -> Result<(), EbpfError> {
        if !rescan && self.last_addresses.as_deref() == Some(node_addresses) {
            return Ok(());
        }
        let addrs = sys::in_netns(&self.netns, sys::interface_addrs)
            .and_then(|r| r)
            .map_err(io_err("listing interface addresses in the proxy's network namespace"))?;
        let desired = node_devices(&addrs, node_addresses);
        if desired.is_empty() && !self.swept {
            // No node device known yet (no Node addresses): what a previous run attached keeps translating
            // its flows until we know which devices to keep.
            info!(addresses = ?node_addresses, "no device carries a node address yet; tc programs left as they are");
            return Ok(());
        }
        if self.mode == TcAttachMode::Clsact {
            self.attach_clsact(&desired)?;
        } else {
            self.attach_tcx(&desired)?;
        }

        // Node addresses before the device counts as attached; stale ones after.
        for d in &desired {
            for (family, ip) in [(FAMILY_V4, d.v4), (FAMILY_V6, d.v6)] {
                let key = NodeAddrKey { ifindex: d.ifindex, family, _pad: [0; 3] };
                let res = match ip {
                    Some(ip) => self.node_addrs.insert(key, addr16(ip), 0),
                    None => self.node_addrs.remove(&key).or(Ok(())),
                };
                res.map_err(|source| EbpfError::MapOp {
                    map: map_names::NODE_ADDRS,
                    op: "update",
                    key: format!("{} ({})", d.name, d.ifindex),
                    source: Box::new(source),
                })?;
            }
        }
        let keep: BTreeMap<u32, NodeDevice> = desired.into_iter().map(|d| (d.ifindex, d)).collect();
        self.remove_stale(&keep)?;
        let stale_keys: Vec<NodeAddrKey> =
            self.node_addrs.keys().filter_map(Result::ok).filter(|k| !keep.contains_key(&k.ifindex)).collect();
        for k in stale_keys {
            let _ = self.node_addrs.remove(&k);
        }
        self.attached = keep;
        self.last_addresses = Some(node_addresses.to_vec());
        Ok(())
    }

    /// Attaches (or replaces in place) our clsact filters on the devices of `desired` not attached yet.
    fn attach_clsact(&self, desired: &[NodeDevice]) -> Result<(), EbpfError> {
        let todo: Vec<&NodeDevice> =
            desired.iter().filter(|d| self.attached.get(&d.ifindex).is_none_or(|a| a.name != d.name)).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let (ingress, egress, update) = (self.ingress.as_fd(), self.egress.as_fd(), self.update);
        let hooks = [
            (TC_PARENT_INGRESS, ingress, program_names::TC_INGRESS),
            (TC_PARENT_EGRESS, egress, program_names::TC_EGRESS),
        ];
        let results = sys::in_netns(&self.netns, || {
            todo.iter()
                .flat_map(|d| {
                    hooks.iter().map(move |(parent, prog, name)| {
                        clsact_attach(d.ifindex, *parent, NODE_FILTER_HANDLE, prog, name, update)
                            .map_err(|e| (d.name.clone(), hook_name(*parent), e))
                    })
                })
                .collect::<Vec<_>>()
        })
        .map_err(io_err("entering the proxy's network namespace"))?;
        for r in results {
            r.map_err(|(dev, dir, e)| EbpfError::Io {
                what: format!(
                    "attaching the tc {dir} program to {dev} (clsact filter pref {CLSACT_PRIORITY} handle \
                     {NODE_FILTER_HANDLE:#x})"
                ),
                source: e,
            })?;
        }
        for d in todo {
            info!(device = %d.name, ifindex = d.ifindex, prio = CLSACT_PRIORITY, "tc programs attached (clsact)");
        }
        Ok(())
    }

    /// Adopts or creates and pins the tcx links of the devices of `desired` not attached yet.
    fn attach_tcx(&self, desired: &[NodeDevice]) -> Result<(), EbpfError> {
        // Links to create, per device, after trying to adopt the pinned ones.
        let mut create: Vec<(NodeDevice, &'static str, u32)> = Vec::new();
        for d in desired {
            if self.attached.get(&d.ifindex).is_some_and(|a| a.name == d.name) {
                continue;
            }
            for (dir, ty) in [("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS)] {
                if !self.adopt(d, dir)? {
                    create.push((d.clone(), dir, ty));
                }
            }
        }
        if !create.is_empty() {
            let (ingress, egress) = (self.ingress.as_fd(), self.egress.as_fd());
            let created = sys::in_netns(&self.netns, || {
                create
                    .iter()
                    .map(|(d, dir, ty)| {
                        let prog = if *ty == BPF_TCX_INGRESS { ingress } else { egress };
                        sys::tcx_link_create(prog, d.ifindex, *ty).map_err(|e| (d.name.clone(), *dir, e))
                    })
                    .collect::<Vec<_>>()
            })
            .map_err(io_err("entering the proxy's network namespace"))?;
            for ((d, dir, _), link) in create.iter().zip(created) {
                let link = link.map_err(|(dev, dir, e)| EbpfError::Io {
                    what: format!("attaching the tc {dir} program to {dev} (tcx, kernel >= 6.6)"),
                    source: e,
                })?;
                let pin = self.links_dir.join(d.pin_name(dir));
                sys::obj_pin(&link, &pin).map_err(io_err(format!("pinning tc link at {}", pin.display())))?;
                info!(device = %d.name, ifindex = d.ifindex, direction = dir, pin = %pin.display(), "tc program attached");
            }
        }
        Ok(())
    }

    /// Detaches from devices not in `keep`, and whatever the other mode left: every tcx pin under clsact
    /// (after our filters are in place), our clsact filters everywhere under tcx (once).
    fn remove_stale(&mut self, keep: &BTreeMap<u32, NodeDevice>) -> Result<(), EbpfError> {
        match self.mode {
            TcAttachMode::Clsact => {
                self.remove_stale_pins(&BTreeMap::new())?;
                // Devices this process attached to, plus, once, any device a previous run left a filter on.
                let full = !self.swept;
                let was: Vec<u32> = self.attached.keys().copied().filter(|i| !keep.contains_key(i)).collect();
                let removed = sys::in_netns(&self.netns, || {
                    clsact_remove(NODE_FILTER_HANDLE, &[TC_PARENT_INGRESS, TC_PARENT_EGRESS], |i| {
                        !keep.contains_key(&i) && (full || was.contains(&i))
                    })
                })
                .and_then(|r| r)
                .map_err(io_err("removing stale tc filters in the proxy's network namespace"))?;
                for r in removed {
                    info!(filter = %r, "tc program detached (device no longer carries a node address)");
                }
            }
            _ => {
                self.remove_stale_pins(keep)?;
                if !self.swept {
                    let removed = sys::in_netns(&self.netns, || {
                        clsact_remove(NODE_FILTER_HANDLE, &[TC_PARENT_INGRESS, TC_PARENT_EGRESS], |_| true)
                    })
                    .and_then(|r| r)
                    .map_err(io_err("removing clsact filters of a previous run in the proxy's network namespace"))?;
                    for r in removed {
                        info!(filter = %r, "clsact filter of a previous run removed (tcx attached)");
                    }
                }
            }
        }
        self.swept = true;
        Ok(())
    }

    /// Reuses a pinned link of a previous run for this device and direction; `false` when it must be created.
    fn adopt(&self, d: &NodeDevice, dir: &str) -> Result<bool, EbpfError> {
        let pin = self.links_dir.join(d.pin_name(dir));
        if !pin.exists() {
            return Ok(false);
        }
        let link = match sys::obj_get(&pin) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(pin = %pin.display(), error = %e, "unusable tc link pin; re-attaching");
                fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
                return Ok(false);
            }
        };
        if self.update == ProgramUpdate::Keep {
            info!(device = %d.name, direction = dir, "keeping the attached tc program of the previous run");
            return Ok(true);
        }
        let prog = if dir == "ingress" { &self.ingress } else { &self.egress };
        match sys::link_update(link.as_fd(), prog.as_fd()) {
            Ok(()) => {
                info!(device = %d.name, direction = dir, "replaced tc program in pinned link");
                Ok(true)
            }
            Err(e) => {
                // ENOLINK: the device the link was made for is gone (same ifindex reused by a new device).
                warn!(device = %d.name, direction = dir, error = %e, "pinned tc link cannot be updated; re-attaching");
                fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
                Ok(false)
            }
        }
    }

    /// Removes tc link pins of devices not in `keep` (detaching those programs).
    fn remove_stale_pins(&self, keep: &BTreeMap<u32, NodeDevice>) -> Result<(), EbpfError> {
        let wanted: Vec<String> = keep.values().flat_map(|d| [d.pin_name("ingress"), d.pin_name("egress")]).collect();
        let entries = fs::read_dir(&self.links_dir).map_err(io_err(format!("listing {}", self.links_dir.display())))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PIN_PREFIX) && !wanted.contains(&name) {
                let p = e.path();
                fs::remove_file(&p).map_err(io_err(format!("removing {}", p.display())))?;
                info!(pin = %p.display(), "tcx link removed (device no longer carries a node address, or clsact took over)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, ifindex: u32, ip: &str) -> IfAddr {
        IfAddr { name: name.into(), ifindex, ip: ip.parse().unwrap() }
    }

    #[test]
    fn node_devices_pick_devices_carrying_node_addresses() {
        let addrs = [
            a("lo", 1, "127.0.0.1"),
            a("eth0", 2, "198.18.0.10"),
            a("eth0", 2, "198.18.0.99"),
            a("eth0", 2, "2001:db8::10"),
            a("cbr0", 3, "198.18.16.1"),
        ];
        let node: Vec<IpAddr> = vec!["198.18.0.99".parse().unwrap(), "198.18.0.10".parse().unwrap()];
        let d = node_devices(&addrs, &node);
        assert_eq!(
            d,
            vec![NodeDevice { name: "eth0".into(), ifindex: 2, v4: Some("198.18.0.99".parse().unwrap()), v6: None }]
        );
        assert!(node_devices(&addrs, &[]).is_empty());
    }
}
