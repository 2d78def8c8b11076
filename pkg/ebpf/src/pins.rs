//! Shape check of pinned maps before they are adopted.
//!
//! aya reuses a pinned map by name without comparing it with the object's definition, so a build whose
//! layout grew (a new counter index, a larger value) would run against the old map: lookups past its end
//! fail, values are misread. Maps whose content is disposable (counters, affinity, the scope config that is
//! rewritten at start) are re-created when their shape changed; any other mismatch is an error, because
//! dropping them would break established flows.

use std::path::Path;

use aya::maps::MapInfo;
use ebpf_common::map_names;
use tracing::warn;

use crate::EbpfError;
use crate::loader::io_err;

/// Maps that may be emptied by an upgrade: statistics, stickiness and configuration rewritten at start.
const DISPOSABLE: [&str; 5] = [
    map_names::COUNTERS,
    map_names::DP_COUNTERS,
    map_names::AFFINITY,
    map_names::AFFINITY_ADDR,
    map_names::SOCK_LB_CONFIG,
];

/// `BPF_MAP_TYPE_ARRAY` and `BPF_MAP_TYPE_PERCPU_ARRAY`: their size is part of the layout (indexes).
const ARRAY_TYPES: [u32; 2] = [2, 6];

/// Key size, value size and, for arrays, the number of entries; `None` entries are not compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: Option<u32>,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key size {}, value size {}", self.key_size, self.value_size)?;
        if let Some(n) = self.max_entries { write!(f, ", {n} entries") } else { Ok(()) }
    }
}

/// What to do with one pinned map.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Same shape: adopt it.
    Adopt,
    /// Different shape, disposable content: remove the pin so the loader creates a fresh map.
    Recreate,
    /// Different shape, live state: refuse.
    Refuse,
}

/// Decides for map `name` with `pinned` shape when this build wants `expected`.
pub(crate) fn verdict(name: &str, pinned: Shape, expected: Shape) -> Verdict {
    let compared = Shape { max_entries: expected.max_entries.and(pinned.max_entries), ..pinned };
    if compared == expected {
        Verdict::Adopt
    } else if DISPOSABLE.contains(&name) {
        Verdict::Recreate
    } else {
        Verdict::Refuse
    }
}

/// Checks every existing pin under `maps_dir` against the maps of `object` (the embedded ELF).
pub(crate) fn check_pinned_maps(object: &[u8], maps_dir: &Path) -> Result<(), EbpfError> {
    let obj = aya_obj::Object::parse(object)
        .map_err(|e| EbpfError::Options(format!("parsing the embedded eBPF object: {e}")))?;
    for name in map_names::ALL {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(def) = obj.maps.get(name) else { continue };
        let expected = Shape {
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: ARRAY_TYPES.contains(&def.map_type()).then(|| def.max_entries()),
        };
        let info = MapInfo::from_pin(&path)
            .map_err(|e| EbpfError::Options(format!("reading pinned map {}: {e}", path.display())))?;
        let pinned =
            Shape { key_size: info.key_size(), value_size: info.value_size(), max_entries: Some(info.max_entries()) };
        match verdict(name, pinned, expected) {
            Verdict::Adopt => {}
            Verdict::Recreate => {
                warn!(pin = %path.display(), found = %pinned, expected = %expected, "pinned map changed shape; re-creating it empty");
                std::fs::remove_file(&path).map_err(io_err(format!("removing pin {}", path.display())))?;
            }
            Verdict::Refuse => {
                return Err(EbpfError::PinnedMapShape {
                    path,
                    found: pinned.to_string(),
                    expected: expected.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(k: u32, v: u32, n: Option<u32>) -> Shape {
        Shape { key_size: k, value_size: v, max_entries: n }
    }

    #[test]
    fn same_shape_is_adopted_whatever_a_hash_map_size() {
        // Hash and LRU maps keep the size they were created with (the conntrack size is a flag).
        assert_eq!(verdict(map_names::CT, shape(40, 48, Some(1024)), shape(40, 48, None)), Verdict::Adopt);
        assert_eq!(verdict(map_names::DP_COUNTERS, shape(4, 8, Some(10)), shape(4, 8, Some(10))), Verdict::Adopt);
    }

    #[test]
    fn grown_counter_array_is_recreated() {
        assert_eq!(verdict(map_names::DP_COUNTERS, shape(4, 8, Some(9)), shape(4, 8, Some(10))), Verdict::Recreate);
        assert_eq!(verdict(map_names::AFFINITY, shape(16, 16, Some(1)), shape(16, 24, None)), Verdict::Recreate);
    }

    #[test]
    fn changed_state_map_is_refused() {
        assert_eq!(verdict(map_names::CT, shape(40, 48, Some(1024)), shape(40, 56, None)), Verdict::Refuse);
        assert_eq!(verdict(map_names::SERVICES, shape(24, 12, Some(10)), shape(24, 16, None)), Verdict::Refuse);
    }
}
