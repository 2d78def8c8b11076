//! tc attachment of the north-south programs to the node devices.
//!
//! The node devices are the interfaces carrying one of the node's addresses (the Node object's addresses,
//! which the writer also uses as NodePort frontends) in the proxy's network namespace. Device discovery
//! and link creation run on a thread that entered that namespace (recorded when the backend was created),
//! so nothing is ever attached to an interface of another namespace, whichever thread calls `sync`.
//!
//! Programs attach with tcx bpf_links (kernel ≥ 6.6) pinned under `<bpffs_root>/v1/links/tc-<ifindex>-
//! <ifname>-{ingress,egress}`. A restarted proxy swaps its programs into the pinned links
//! (`BPF_LINK_UPDATE`), so translation never stops; a link whose device vanished is re-created. Removing a
//! pin detaches (no process holds the link open). `KP_NODE_ADDRS` gets each device's node address per
//! family: the SNAT source for remote backends.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use ebpf_common::{Addr, FAMILY_V4, FAMILY_V6, NodeAddrKey, map_names};
use tracing::{info, warn};

use crate::EbpfError;
use crate::loader::ProgramUpdate;
use crate::loader::io_err;
use crate::sys::{self, BPF_TCX_EGRESS, BPF_TCX_INGRESS, IfAddr};
use crate::writer::addr16;

/// Prefix of every tc link pin in the links directory.
const PIN_PREFIX: &str = "tc-";

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
}

impl TcManager {
    /// A manager for the namespace `netns` (an open `/proc/…/ns/net` or `/run/netns/…` file).
    pub(crate) fn new(
        netns: fs::File,
        links_dir: &Path,
        ingress: OwnedFd,
        egress: OwnedFd,
        update: ProgramUpdate,
        node_addrs: aya::maps::Map,
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

        // Links to create, per device, after trying to adopt the pinned ones.
        let mut create: Vec<(NodeDevice, &'static str, u32)> = Vec::new();
        for d in &desired {
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
        self.remove_stale_pins(&keep)?;
        let stale_keys: Vec<NodeAddrKey> =
            self.node_addrs.keys().filter_map(Result::ok).filter(|k| !keep.contains_key(&k.ifindex)).collect();
        for k in stale_keys {
            let _ = self.node_addrs.remove(&k);
        }
        self.attached = keep;
        self.last_addresses = Some(node_addresses.to_vec());
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
                info!(pin = %p.display(), "tc program detached (device no longer carries a node address)");
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
