//! The map operations the writer needs, behind a trait so its logic runs against in-memory maps in unit
//! tests and against the pinned kernel maps in production.

use std::collections::BTreeMap;

use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use ebpf_common::{
    BackendValue, LAYOUT_VERSION, RevNatValue, ServiceCounters, ServiceKey, ServiceValue, SrcRangeKey, map_names,
};

use crate::EbpfError;
use crate::writer::SrcRange;

/// Per-entry access to the service, backend and reverse-NAT maps (plus the counters).
///
/// Deleting a missing key is not an error: deletes must be idempotent so a sync can be retried.
pub trait LbMaps {
    /// Inserts or replaces a service entry (master or slot).
    fn service_update(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), EbpfError>;
    /// Deletes a service entry.
    fn service_delete(&mut self, key: &ServiceKey) -> Result<(), EbpfError>;
    /// Inserts or replaces a backend.
    fn backend_update(&mut self, id: u32, value: &BackendValue) -> Result<(), EbpfError>;
    /// Deletes a backend.
    fn backend_delete(&mut self, id: u32) -> Result<(), EbpfError>;
    /// Inserts or replaces the reverse-NAT entry of a service id.
    fn rev_nat_update(&mut self, id: u32, value: &RevNatValue) -> Result<(), EbpfError>;
    /// Deletes the reverse-NAT entry of a service id.
    fn rev_nat_delete(&mut self, id: u32) -> Result<(), EbpfError>;
    /// Zeroes the counters of a service id (done when an id is (re)allocated).
    fn counters_reset(&mut self, id: u32) -> Result<(), EbpfError>;
    /// The counters of a service id, summed over CPUs.
    fn counters(&self, id: u32) -> Result<ServiceCounters, EbpfError>;
    /// Every service entry.
    fn dump_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, EbpfError>;
    /// Every backend.
    fn dump_backends(&self) -> Result<Vec<(u32, BackendValue)>, EbpfError>;
    /// Every reverse-NAT entry.
    fn dump_rev_nat(&self) -> Result<Vec<(u32, RevNatValue)>, EbpfError>;
    /// Adds a `loadBalancerSourceRanges` entry of a service id.
    fn src_range_update(&mut self, id: u32, range: &SrcRange) -> Result<(), EbpfError>;
    /// Deletes a `loadBalancerSourceRanges` entry of a service id.
    fn src_range_delete(&mut self, id: u32, range: &SrcRange) -> Result<(), EbpfError>;
    /// Every source-range entry, by service id.
    fn dump_src_ranges(&self) -> Result<Vec<(u32, SrcRange)>, EbpfError>;
}

/// The LPM key of a source range: the service id is always matched in full (32 bits) before the address.
pub(crate) fn src_range_key(id: u32, range: &SrcRange) -> LpmKey<SrcRangeKey> {
    LpmKey::new(32 + u32::from(range.1), SrcRangeKey { service_id_be: id.to_be(), addr: range.0 })
}

/// One map operation, as recorded by [`FakeMaps`] (for asserting the update order in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    /// `service_update`.
    ServiceUpdate(ServiceKey, ServiceValue),
    /// `service_delete`.
    ServiceDelete(ServiceKey),
    /// `backend_update`.
    BackendUpdate(u32, BackendValue),
    /// `backend_delete`.
    BackendDelete(u32),
    /// `rev_nat_update`.
    RevNatUpdate(u32, RevNatValue),
    /// `rev_nat_delete`.
    RevNatDelete(u32),
    /// `src_range_update`.
    SrcRangeUpdate(u32, SrcRange),
    /// `src_range_delete`.
    SrcRangeDelete(u32, SrcRange),
}

/// In-memory maps with an operation log; no kernel needed.
#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    /// Service map contents.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Backend map contents.
    pub backends: BTreeMap<u32, BackendValue>,
    /// Reverse-NAT map contents.
    pub rev_nat: BTreeMap<u32, RevNatValue>,
    /// Counters by service id.
    pub counters: BTreeMap<u32, ServiceCounters>,
    /// Source ranges by service id.
    pub src_ranges: std::collections::BTreeSet<(u32, SrcRange)>,
    /// Every mutating operation, in order.
    pub log: Vec<MapOp>,
}

impl LbMaps for FakeMaps {
    fn service_update(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), EbpfError> {
        self.services.insert(*key, *value);
        self.log.push(MapOp::ServiceUpdate(*key, *value));
        Ok(())
    }
    fn service_delete(&mut self, key: &ServiceKey) -> Result<(), EbpfError> {
        self.services.remove(key);
        self.log.push(MapOp::ServiceDelete(*key));
        Ok(())
    }
    fn backend_update(&mut self, id: u32, value: &BackendValue) -> Result<(), EbpfError> {
        self.backends.insert(id, *value);
        self.log.push(MapOp::BackendUpdate(id, *value));
        Ok(())
    }
    fn backend_delete(&mut self, id: u32) -> Result<(), EbpfError> {
        self.backends.remove(&id);
        self.log.push(MapOp::BackendDelete(id));
        Ok(())
    }
    fn rev_nat_update(&mut self, id: u32, value: &RevNatValue) -> Result<(), EbpfError> {
        self.rev_nat.insert(id, *value);
        self.log.push(MapOp::RevNatUpdate(id, *value));
        Ok(())
    }
    fn rev_nat_delete(&mut self, id: u32) -> Result<(), EbpfError> {
        self.rev_nat.remove(&id);
        self.log.push(MapOp::RevNatDelete(id));
        Ok(())
    }
    fn counters_reset(&mut self, id: u32) -> Result<(), EbpfError> {
        self.counters.insert(id, ServiceCounters::default());
        Ok(())
    }
    fn counters(&self, id: u32) -> Result<ServiceCounters, EbpfError> {
        Ok(self.counters.get(&id).copied().unwrap_or_default())
    }
    fn dump_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, EbpfError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn dump_backends(&self) -> Result<Vec<(u32, BackendValue)>, EbpfError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn dump_rev_nat(&self) -> Result<Vec<(u32, RevNatValue)>, EbpfError> {
        Ok(self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn src_range_update(&mut self, id: u32, range: &SrcRange) -> Result<(), EbpfError> {
        self.src_ranges.insert((id, *range));
        self.log.push(MapOp::SrcRangeUpdate(id, *range));
        Ok(())
    }
    fn src_range_delete(&mut self, id: u32, range: &SrcRange) -> Result<(), EbpfError> {
        self.src_ranges.remove(&(id, *range));
        self.log.push(MapOp::SrcRangeDelete(id, *range));
        Ok(())
    }
    fn dump_src_ranges(&self) -> Result<Vec<(u32, SrcRange)>, EbpfError> {
        Ok(self.src_ranges.iter().copied().collect())
    }
}

/// The pinned kernel maps.
pub struct AyaMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    rev_nat: HashMap<MapData, u32, RevNatValue>,
    counters: PerCpuArray<MapData, ServiceCounters>,
    /// Absent only when opening pins of an older build that had no tc programs.
    src_ranges: Option<LpmTrie<MapData, SrcRangeKey, u8>>,
    ncpus: usize,
}

fn map_err(map: &'static str, op: &'static str, key: String) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::MapOp { map, op, key, source: Box::new(source) }
}

/// `true` when a delete failed only because the key was already gone.
fn is_enoent(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
        || matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
}

impl AyaMaps {
    /// Wraps the maps of a loaded (or adopted) object.
    pub(crate) fn new(
        services: Map,
        backends: Map,
        rev_nat: Map,
        counters: Map,
        src_ranges: Option<Map>,
    ) -> Result<Self, EbpfError> {
        let ncpus = aya::util::nr_cpus().map_err(|(what, source)| EbpfError::Io { what: what.to_string(), source })?;
        Ok(AyaMaps {
            services: HashMap::try_from(services).map_err(map_err(map_names::SERVICES, "open", String::new()))?,
            backends: HashMap::try_from(backends).map_err(map_err(map_names::BACKENDS, "open", String::new()))?,
            rev_nat: HashMap::try_from(rev_nat).map_err(map_err(map_names::REV_NAT, "open", String::new()))?,
            counters: PerCpuArray::try_from(counters).map_err(map_err(map_names::COUNTERS, "open", String::new()))?,
            src_ranges: src_ranges.map(LpmTrie::try_from).transpose().map_err(map_err(
                map_names::SRC_RANGES,
                "open",
                String::new(),
            ))?,
            ncpus,
        })
    }
}

impl AyaMaps {
    /// Opens the maps pinned under `<bpffs_root>/<LAYOUT_VERSION>/maps/` without loading any program
    /// (for inspection tools and tests).
    pub fn from_pins(bpffs_root: &Path) -> Result<Self, EbpfError> {
        let dir = bpffs_root.join(LAYOUT_VERSION).join("maps");
        let open = |name: &'static str| -> Result<Map, EbpfError> {
            let path = dir.join(name);
            MapData::from_pin(&path).and_then(Map::from_map_data).map_err(map_err(
                name,
                "open pin",
                path.display().to_string(),
            ))
        };
        let ranges = if dir.join(map_names::SRC_RANGES).exists() { Some(open(map_names::SRC_RANGES)?) } else { None };
        AyaMaps::new(
            open(map_names::SERVICES)?,
            open(map_names::BACKENDS)?,
            open(map_names::REV_NAT)?,
            open(map_names::COUNTERS)?,
            ranges,
        )
    }
}

impl LbMaps for AyaMaps {
    fn service_update(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), EbpfError> {
        self.services.insert(key, value, 0).map_err(map_err(map_names::SERVICES, "update", format!("{key:?}")))
    }
    fn service_delete(&mut self, key: &ServiceKey) -> Result<(), EbpfError> {
        match self.services.remove(key) {
            Err(e) if !is_enoent(&e) => Err(map_err(map_names::SERVICES, "delete", format!("{key:?}"))(e)),
            _ => Ok(()),
        }
    }
    fn backend_update(&mut self, id: u32, value: &BackendValue) -> Result<(), EbpfError> {
        self.backends.insert(id, value, 0).map_err(map_err(map_names::BACKENDS, "update", id.to_string()))
    }
    fn backend_delete(&mut self, id: u32) -> Result<(), EbpfError> {
        match self.backends.remove(&id) {
            Err(e) if !is_enoent(&e) => Err(map_err(map_names::BACKENDS, "delete", id.to_string())(e)),
            _ => Ok(()),
        }
    }
    fn rev_nat_update(&mut self, id: u32, value: &RevNatValue) -> Result<(), EbpfError> {
        self.rev_nat.insert(id, value, 0).map_err(map_err(map_names::REV_NAT, "update", id.to_string()))
    }
    fn rev_nat_delete(&mut self, id: u32) -> Result<(), EbpfError> {
        match self.rev_nat.remove(&id) {
            Err(e) if !is_enoent(&e) => Err(map_err(map_names::REV_NAT, "delete", id.to_string())(e)),
            _ => Ok(()),
        }
    }
    fn counters_reset(&mut self, id: u32) -> Result<(), EbpfError> {
        let zeros = PerCpuValues::try_from(vec![ServiceCounters::default(); self.ncpus])
            .map_err(|source| EbpfError::Io { what: "per-CPU counter buffer".into(), source })?;
        self.counters.set(id, zeros, 0).map_err(map_err(map_names::COUNTERS, "reset", id.to_string()))
    }
    fn counters(&self, id: u32) -> Result<ServiceCounters, EbpfError> {
        let values = self.counters.get(&id, 0).map_err(map_err(map_names::COUNTERS, "read", id.to_string()))?;
        Ok(values.iter().fold(ServiceCounters::default(), |acc, v| ServiceCounters {
            translated: acc.translated + v.translated,
            no_endpoints: acc.no_endpoints + v.no_endpoints,
        }))
    }
    fn dump_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, EbpfError> {
        self.services.iter().collect::<Result<_, _>>().map_err(map_err(map_names::SERVICES, "dump", String::new()))
    }
    fn dump_backends(&self) -> Result<Vec<(u32, BackendValue)>, EbpfError> {
        self.backends.iter().collect::<Result<_, _>>().map_err(map_err(map_names::BACKENDS, "dump", String::new()))
    }
    fn dump_rev_nat(&self) -> Result<Vec<(u32, RevNatValue)>, EbpfError> {
        self.rev_nat.iter().collect::<Result<_, _>>().map_err(map_err(map_names::REV_NAT, "dump", String::new()))
    }
    fn src_range_update(&mut self, id: u32, range: &SrcRange) -> Result<(), EbpfError> {
        let key = src_range_key(id, range);
        let err = map_err(map_names::SRC_RANGES, "update", format!("service {id} {range:?}"));
        match self.src_ranges.as_mut() {
            Some(m) => m.insert(&key, 1u8, 0).map_err(err),
            None => Err(err(MapError::KeyNotFound)),
        }
    }
    fn src_range_delete(&mut self, id: u32, range: &SrcRange) -> Result<(), EbpfError> {
        let Some(m) = self.src_ranges.as_mut() else { return Ok(()) };
        match m.remove(&src_range_key(id, range)) {
            Err(e) if !is_enoent(&e) => {
                Err(map_err(map_names::SRC_RANGES, "delete", format!("service {id} {range:?}"))(e))
            }
            _ => Ok(()),
        }
    }
    fn dump_src_ranges(&self) -> Result<Vec<(u32, SrcRange)>, EbpfError> {
        let Some(m) = self.src_ranges.as_ref() else { return Ok(vec![]) };
        m.keys()
            .map(|k| {
                k.map(|k| {
                    let d = k.data();
                    (u32::from_be(d.service_id_be), (d.addr, (k.prefix_len() - 32) as u8))
                })
            })
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::SRC_RANGES, "dump", String::new()))
    }
}
