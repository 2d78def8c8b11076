//! Service id → service port name, for metrics and `kpctl`.
//!
//! Names live in userspace (the writer's allocation table), so the datapath maps alone cannot say which
//! Service a service id belongs to. Two copies are kept:
//! - [`ServiceNameTable`], shared in memory with the Prometheus collector (read at scrape time);
//! - the pinned map [`NAMES_MAP`] (`<bpffs_root>/v1/maps/KP_SVC_NAMES`), written by userspace only and
//!   never read by the kernel programs, so `kpctl` and a restarted proxy can name services too.
//!
//! Both are derived from the writer after every sync; a failure to write the pinned copy is logged and
//! never fails a sync (it is diagnostics only).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use aya::maps::{HashMap, Map, MapData, MapError};
use proxier::model::{Changes, IpFamily, Protocol, ServicePortName};
use tracing::warn;

use crate::EbpfError;
use crate::maps::AyaMaps;
use crate::writer::MapWriter;

/// Name of the pinned service-name map (userspace-only; not part of the kernel object).
pub const NAMES_MAP: &str = "KP_SVC_NAMES";
/// Longest name stored: namespace (63) + `/` + name (63) + `:` + port name (15) is 143 bytes.
pub const NAME_MAX_LEN: usize = 156;
/// `BPF_F_NO_PREALLOC`: entries are allocated on insert, so the map costs memory only for live services.
const BPF_F_NO_PREALLOC: u32 = 1;

/// What userspace knows about one service id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    /// IP family of the service port.
    pub family: IpFamily,
    /// Protocol of the service port.
    pub protocol: Protocol,
    /// Upstream's `ServicePortName` string: `namespace/name:port` (`namespace/name` for an unnamed port).
    pub name: String,
}

impl ServiceName {
    /// The entry for a service port of `family`.
    pub fn new(family: IpFamily, name: &ServicePortName) -> Self {
        ServiceName { family, protocol: name.protocol, name: name.to_string() }
    }
}

/// The service id → name table shared between the backend (writer side) and its metrics collector.
#[derive(Debug, Clone, Default)]
pub struct ServiceNameTable(Arc<RwLock<BTreeMap<u32, ServiceName>>>);

impl ServiceNameTable {
    /// A table holding `entries` (tests and tools).
    pub fn from_entries(entries: BTreeMap<u32, ServiceName>) -> Self {
        ServiceNameTable(Arc::new(RwLock::new(entries)))
    }

    /// A copy of the current table.
    pub fn snapshot(&self) -> BTreeMap<u32, ServiceName> {
        // A panicking writer cannot leave the map half-updated (single insert/remove calls), so a poisoned
        // lock still holds a usable table.
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The name of one service id.
    pub fn get(&self, id: u32) -> Option<ServiceName> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).get(&id).cloned()
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, ServiceName>> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Value of [`NAMES_MAP`] (key: service id, `u32`).
#[repr(C)]
#[derive(Clone, Copy)]
struct NameValue {
    /// 4 or 6.
    family: u8,
    /// IANA protocol number.
    proto: u8,
    /// Bytes of `name` in use.
    len: u8,
    _pad: u8,
    /// UTF-8 `ServicePortName` string, truncated to [`NAME_MAX_LEN`].
    name: [u8; NAME_MAX_LEN],
}
// A layout change needs a new map name (or layout version): the pin is reused by path.
const _: () = assert!(size_of::<NameValue>() == 160);

// SAFETY: #[repr(C)], Copy, only integers and byte arrays with explicit padding: every bit pattern is valid.
unsafe impl aya::Pod for NameValue {}

impl NameValue {
    fn encode(n: &ServiceName) -> Self {
        let mut name = [0u8; NAME_MAX_LEN];
        // Truncate on a char boundary so the stored bytes stay valid UTF-8.
        let mut len = n.name.len().min(NAME_MAX_LEN);
        while !n.name.is_char_boundary(len) {
            len -= 1;
        }
        name[..len].copy_from_slice(&n.name.as_bytes()[..len]);
        let family = match n.family {
            IpFamily::V4 => 4,
            IpFamily::V6 => 6,
        };
        NameValue { family, proto: n.protocol.number(), len: len as u8, _pad: 0, name }
    }

    fn decode(&self) -> Option<ServiceName> {
        let family = match self.family {
            4 => IpFamily::V4,
            6 => IpFamily::V6,
            _ => return None,
        };
        let protocol = protocol_of(self.proto)?;
        let bytes = self.name.get(..usize::from(self.len))?;
        Some(ServiceName { family, protocol, name: String::from_utf8_lossy(bytes).into_owned() })
    }
}

/// The [`Protocol`] of an IANA protocol number, if it is one Kubernetes services use.
pub fn protocol_of(proto: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].into_iter().find(|p| p.number() == proto)
}

fn map_err(op: &'static str, key: String) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::MapOp { map: NAMES_MAP, op, key, source: Box::new(source) }
}

/// The pinned [`NAMES_MAP`].
pub(crate) struct NameMap {
    map: HashMap<MapData, u32, NameValue>,
}

impl NameMap {
    /// Opens the pin under `maps_dir`, creating and pinning the map when there is none.
    pub(crate) fn open_or_create(maps_dir: &Path) -> Result<Self, EbpfError> {
        let path = maps_dir.join(NAMES_MAP);
        if path.exists() {
            return Self::open(maps_dir);
        }
        let max = ebpf_common::REV_NAT_MAX_ENTRIES;
        let map = HashMap::<MapData, u32, NameValue>::create(max, BPF_F_NO_PREALLOC)
            .map_err(map_err("create", path.display().to_string()))?;
        use aya::maps::IterableMap;
        map.map().pin(&path).map_err(|e| EbpfError::MapOp {
            map: NAMES_MAP,
            op: "pin",
            key: path.display().to_string(),
            source: Box::new(MapError::PinError { name: Some(NAMES_MAP.into()), error: e }),
        })?;
        Ok(NameMap { map })
    }

    /// Opens an existing pin under `maps_dir` (fails when absent or of another layout).
    pub(crate) fn open(maps_dir: &Path) -> Result<Self, EbpfError> {
        let path = maps_dir.join(NAMES_MAP);
        let key = path.display().to_string();
        let data = MapData::from_pin(&path).map_err(map_err("open pin", key.clone()))?;
        let map = Map::from_map_data(data).and_then(HashMap::try_from).map_err(map_err("open pin", key))?;
        Ok(NameMap { map })
    }

    /// Every entry that decodes; undecodable ones (should not happen) are skipped.
    pub(crate) fn dump(&self) -> Result<BTreeMap<u32, ServiceName>, EbpfError> {
        let mut out = BTreeMap::new();
        for item in self.map.iter() {
            let (id, v) = item.map_err(map_err("dump", String::new()))?;
            if let Some(n) = v.decode() {
                out.insert(id, n);
            }
        }
        Ok(out)
    }

    fn update(&mut self, id: u32, name: &ServiceName) -> Result<(), EbpfError> {
        self.map.insert(id, NameValue::encode(name), 0).map_err(map_err("update", id.to_string()))
    }

    fn delete(&mut self, id: u32) -> Result<(), EbpfError> {
        match self.map.remove(&id) {
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
            r => r.map_err(map_err("delete", id.to_string())),
        }
    }
}

/// Reads the names pinned under `<bpffs_root>/v1/maps/`; empty when the pin does not exist (a proxy that
/// predates it).
pub fn read_pinned_names(bpffs_root: &Path) -> Result<BTreeMap<u32, ServiceName>, EbpfError> {
    let dir = bpffs_root.join(ebpf_common::LAYOUT_VERSION).join("maps");
    if !dir.join(NAMES_MAP).exists() {
        return Ok(BTreeMap::new());
    }
    NameMap::open(&dir)?.dump()
}

/// Keeps [`ServiceNameTable`] and [`NAMES_MAP`] in step with the writer's name → id allocation.
pub(crate) struct NamePublisher {
    table: ServiceNameTable,
    /// What was last published, by name (the writer's key), to find the entries a partial sync changed.
    published: BTreeMap<(IpFamily, ServicePortName), u32>,
    pin: Option<NameMap>,
}

impl NamePublisher {
    /// Opens (or creates) the pinned map and seeds the table from it, so names are known before the first
    /// sync of a restarted proxy. Without a usable pin, names are only kept in memory.
    pub(crate) fn new(maps_dir: &Path) -> Self {
        let pin = match NameMap::open_or_create(maps_dir) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(error = %e, "service names will not be pinned; kpctl will show ids only");
                None
            }
        };
        let seed = match pin.as_ref().map(NameMap::dump) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                warn!(error = %e, "reading pinned service names failed");
                BTreeMap::new()
            }
            None => BTreeMap::new(),
        };
        NamePublisher { table: ServiceNameTable::from_entries(seed), published: BTreeMap::new(), pin }
    }

    /// The shared table.
    pub(crate) fn table(&self) -> ServiceNameTable {
        self.table.clone()
    }

    /// Publishes the writer's names after a sync: everything on a full sync, else only `changes`.
    pub(crate) fn publish(&mut self, writer: &MapWriter<AyaMaps>, changes: &Changes) {
        let mut removes: Vec<u32> = Vec::new();
        let mut inserts: Vec<(u32, ServiceName)> = Vec::new();
        if changes.full {
            let now: BTreeMap<(IpFamily, ServicePortName), u32> =
                writer.service_names().map(|(f, n, id)| ((f, n.clone()), id)).collect();
            let want: BTreeMap<u32, ServiceName> =
                now.iter().map(|((f, n), id)| (*id, ServiceName::new(*f, n))).collect();
            let have = self.table.snapshot();
            removes.extend(have.keys().filter(|id| !want.contains_key(id)));
            inserts.extend(want.into_iter().filter(|(id, n)| have.get(id) != Some(n)));
            self.published = now;
        } else {
            for family in IpFamily::ALL {
                for name in &changes.family(family).services {
                    let key = (family, name.clone());
                    let new = writer.service_id(family, name);
                    let old = self.published.get(&key).copied();
                    if old == new {
                        continue;
                    }
                    removes.extend(old);
                    match new {
                        Some(id) => {
                            inserts.push((id, ServiceName::new(family, name)));
                            self.published.insert(key, id);
                        }
                        None => {
                            self.published.remove(&key);
                        }
                    }
                }
            }
        }
        if removes.is_empty() && inserts.is_empty() {
            return;
        }
        // Removals first: an id freed by one name may have been taken by another in the same sync.
        {
            let mut table = self.table.write();
            for id in &removes {
                table.remove(id);
            }
            for (id, n) in &inserts {
                table.insert(*id, n.clone());
            }
        }
        if let Some(pin) = self.pin.as_mut() {
            let inserted: std::collections::BTreeSet<u32> = inserts.iter().map(|(id, _)| *id).collect();
            let result = removes
                .iter()
                .filter(|id| !inserted.contains(id))
                .try_for_each(|id| pin.delete(*id))
                .and_then(|()| inserts.iter().try_for_each(|(id, n)| pin.update(*id, n)));
            if let Err(e) = result {
                warn!(error = %e, "updating pinned service names failed; kpctl may show stale names");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_value_round_trip_and_truncation() {
        let n = ServiceName { family: IpFamily::V6, protocol: Protocol::Udp, name: "kube-system/kube-dns:dns".into() };
        assert_eq!(NameValue::encode(&n).decode(), Some(n));
        let long = ServiceName { family: IpFamily::V4, protocol: Protocol::Tcp, name: "é".repeat(100) };
        let back = NameValue::encode(&long).decode().unwrap();
        assert!(back.name.len() <= NAME_MAX_LEN && long.name.starts_with(&back.name), "{back:?}");
    }

    #[test]
    fn protocol_numbers() {
        assert_eq!(protocol_of(6), Some(Protocol::Tcp));
        assert_eq!(protocol_of(132), Some(Protocol::Sctp));
        assert_eq!(protocol_of(1), None);
    }
}
