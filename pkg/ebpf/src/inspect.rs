//! Read-only inspection of the programmed maps: the data and formatting behind `kpctl services` and
//! `kpctl maps`, and the map statistics the metrics collector exports.
//!
//! Everything here only reads. Service listings work on any [`LbMaps`] (the pinned [`AyaMaps`] or the
//! in-memory [`crate::FakeMaps`]); map statistics need the pinned maps themselves.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapError, MapType};
use ebpf_common::{
    LAYOUT_VERSION, SCOPE_EXT, SCOPE_INT, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_LOCAL_SCOPE, SVC_FLAG_NODE_PORT, ServiceKey, ServiceValue, map_names,
};
use serde::Serialize;

use crate::EbpfError;
use crate::maps::LbMaps;
use crate::names::{NAMES_MAP, ServiceName, protocol_of};
use crate::writer::ip_from_addr16;

/// Default `--bpffs-root` of kube-proxy and kpctl.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/kube-proxy-rs";

/// `<bpffs_root>/<LAYOUT_VERSION>/maps`: where the maps are pinned.
pub fn maps_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(LAYOUT_VERSION).join("maps")
}

/// The kind of a frontend, from its master entry's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum FrontendKind {
    /// `SVC_FLAG_CLUSTER_IP`.
    ClusterIP,
    /// `SVC_FLAG_EXTERNAL_IP`.
    ExternalIP,
    /// `SVC_FLAG_LOAD_BALANCER`.
    LoadBalancer,
    /// `SVC_FLAG_NODE_PORT`.
    NodePort,
    /// No kind flag set (should not happen).
    Unknown,
}

impl FrontendKind {
    /// The kind named by master `flags`.
    pub fn from_flags(flags: u8) -> Self {
        if flags & SVC_FLAG_CLUSTER_IP != 0 {
            FrontendKind::ClusterIP
        } else if flags & SVC_FLAG_EXTERNAL_IP != 0 {
            FrontendKind::ExternalIP
        } else if flags & SVC_FLAG_LOAD_BALANCER != 0 {
            FrontendKind::LoadBalancer
        } else if flags & SVC_FLAG_NODE_PORT != 0 {
            FrontendKind::NodePort
        } else {
            FrontendKind::Unknown
        }
    }

    /// The display name (Kubernetes' service type spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::ExternalIP => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::Unknown => "Unknown",
        }
    }
}

/// One backend selectable by a frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendInfo {
    /// Backend id (key of `KP_BACKENDS`).
    pub id: u32,
    /// Backend address and port.
    pub address: SocketAddr,
}

/// One frontend (master entry at [`SCOPE_EXT`]) with the backends it actually selects from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendInfo {
    /// Service id (reverse-NAT index); shared by every frontend of one service port.
    pub service_id: u32,
    /// Frontend address and port.
    pub address: SocketAddr,
    /// `TCP`, `UDP`, `SCTP` (or the protocol number when unknown).
    pub protocol: String,
    /// Frontend type.
    #[serde(rename = "type")]
    pub kind: FrontendKind,
    /// Traffic policy Local: backends come from the node-local set.
    pub local: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// Backends in slot order (of the node-local set when `local`); empty means connections are refused.
    pub backends: Vec<BackendInfo>,
    /// Inconsistencies found while reading (missing slots or backends); normally empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// `namespace/name:port` when the name map knows the service id.
    pub service: Option<String>,
    /// Connections/datagrams translated for the service id (all its frontends together).
    pub translated: u64,
    /// Connections/datagrams refused for lack of endpoints (all frontends of the service id).
    pub no_endpoint_rejects: u64,
}

impl FrontendInfo {
    /// `ip:port/PROTO` (IPv6 in brackets), as `cilium service list` prints frontends.
    pub fn frontend(&self) -> String {
        format!("{}/{}", self.address, self.protocol)
    }

    /// The flags column: `local`, `affinity=<n>s`, or `-`.
    pub fn flags(&self) -> String {
        let mut f = Vec::new();
        if self.local {
            f.push("local".to_string());
        }
        if let Some(t) = self.affinity_timeout {
            f.push(format!("affinity={t}s"));
        }
        if f.is_empty() { "-".into() } else { f.join(",") }
    }
}

fn proto_name(proto: u8) -> String {
    protocol_of(proto).map_or_else(|| proto.to_string(), |p| p.as_str().to_string())
}

/// Every programmed frontend with its backends and counters, ordered by service id, type and address.
pub fn list_services(maps: &impl LbMaps, names: &BTreeMap<u32, ServiceName>) -> Result<Vec<FrontendInfo>, EbpfError> {
    let entries: BTreeMap<ServiceKey, ServiceValue> = maps.dump_services()?.into_iter().collect();
    let backends: BTreeMap<u32, _> = maps.dump_backends()?.into_iter().collect();
    let mut counters = BTreeMap::new();
    let mut out = Vec::new();
    for (key, master) in entries.iter().filter(|(k, _)| k.backend_slot == 0 && k.scope == SCOPE_EXT) {
        let local = master.flags & SVC_FLAG_LOCAL_SCOPE != 0;
        let mut problems = Vec::new();
        // The datapath selects from the node-local set when the master is flagged Local.
        let (scope, count) = if local {
            let int_key = ServiceKey { scope: SCOPE_INT, ..*key };
            match entries.get(&int_key) {
                Some(m) => (SCOPE_INT, m.count),
                None => {
                    problems.push("local master entry missing (refusing)".to_string());
                    (SCOPE_INT, 0)
                }
            }
        } else {
            (SCOPE_EXT, master.count)
        };
        let mut list = Vec::with_capacity(usize::from(count));
        for slot in 1..=count {
            let skey = ServiceKey { scope, backend_slot: slot, ..*key };
            let Some(sv) = entries.get(&skey) else {
                problems.push(format!("slot {slot} missing"));
                continue;
            };
            match backends.get(&sv.backend_id) {
                Some(b) => list.push(BackendInfo {
                    id: sv.backend_id,
                    address: SocketAddr::new(ip_from_addr16(&b.addr), u16::from_be(b.port)),
                }),
                None => problems.push(format!("slot {slot}: backend {} missing", sv.backend_id)),
            }
        }
        let id = master.service_id;
        let c = match counters.get(&id) {
            Some(c) => *c,
            None => {
                let c = maps.counters(id)?;
                counters.insert(id, c);
                c
            }
        };
        out.push(FrontendInfo {
            service_id: id,
            address: SocketAddr::new(ip_from_addr16(&key.addr), u16::from_be(key.port)),
            protocol: proto_name(key.proto),
            kind: FrontendKind::from_flags(master.flags),
            local,
            affinity_timeout: (master.flags & SVC_FLAG_AFFINITY != 0).then_some(master.affinity_timeout),
            backends: list,
            problems,
            service: names.get(&id).map(|n| n.name.clone()),
            translated: c.translated,
            no_endpoint_rejects: c.no_endpoints,
        });
    }
    out.sort_by(|a, b| {
        (a.service_id, a.kind, a.address.ip(), a.address.port()).cmp(&(
            b.service_id,
            b.kind,
            b.address.ip(),
            b.address.port(),
        ))
    });
    Ok(out)
}

/// Lays rows out in left-aligned columns separated by three spaces (trailing spaces trimmed).
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 < r.len() {
                let _ = write!(line, "{cell:<w$}   ", w = widths[c]);
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `kpctl services` table: one row per frontend, continuation rows for further backends (like
/// `cilium service list`). Counters are per service id, so every frontend of a service shows the same.
pub fn format_services(rows: &[FrontendInfo]) -> String {
    let mut t = vec![
        ["ID", "FRONTEND", "TYPE", "FLAGS", "BACKENDS", "TRANSLATED", "NO-EP-REJECTS", "SERVICE"]
            .map(str::to_string)
            .to_vec(),
    ];
    for f in rows {
        let mut backends: Vec<String> =
            f.backends.iter().map(|b| format!("{} => {}/{}", b.id, b.address, f.protocol)).collect();
        if backends.is_empty() {
            backends.push("(none: refused)".into());
        }
        backends.extend(f.problems.iter().map(|p| format!("! {p}")));
        for (i, b) in backends.into_iter().enumerate() {
            if i == 0 {
                t.push(vec![
                    f.service_id.to_string(),
                    f.frontend(),
                    f.kind.as_str().to_string(),
                    f.flags(),
                    b,
                    f.translated.to_string(),
                    f.no_endpoint_rejects.to_string(),
                    f.service.clone().unwrap_or_else(|| "-".into()),
                ]);
            } else {
                t.push(vec![String::new(), String::new(), String::new(), String::new(), b]);
            }
        }
    }
    table(&t)
}

/// Statistics of one pinned map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapStats {
    /// Map name (and pin file name).
    pub name: String,
    /// Kernel map type (`HashMap`, `LruHashMap`, `PerCpuArray`, …).
    pub map_type: String,
    /// Kernel map id.
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Entries present; arrays always hold `max_entries`.
    pub entries: u64,
    /// Kernel memory charged to the map (`memlock` in its fdinfo), when the kernel reports it.
    pub memory_bytes: Option<u64>,
}

/// `kpctl maps` table.
pub fn format_maps(stats: &[MapStats]) -> String {
    let mut t = vec![["MAP", "TYPE", "ID", "KEY", "VALUE", "ENTRIES", "MAX", "MEMORY"].map(str::to_string).to_vec()];
    for s in stats {
        t.push(vec![
            s.name.clone(),
            s.map_type.clone(),
            s.id.to_string(),
            s.key_size.to_string(),
            s.value_size.to_string(),
            s.entries.to_string(),
            s.max_entries.to_string(),
            s.memory_bytes.map_or_else(|| "-".into(), human_bytes),
        ]);
    }
    table(&t)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// One opened pinned map.
struct PinnedMap {
    name: String,
    path: PathBuf,
    data: MapData,
}

/// Read-only handles to every map pinned under `<bpffs_root>/v1/maps/` (the datapath maps plus the
/// service-name map when present).
pub struct PinnedMaps {
    maps: Vec<PinnedMap>,
}

fn stat_err(map: &str, path: &Path, op: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    // MapOp names a static map; pins are known names, anything else is reported by path.
    let known = map_names::ALL.iter().chain([&NAMES_MAP]).find(|n| **n == map).copied().unwrap_or("pinned map");
    let key = path.display().to_string();
    move |source| EbpfError::MapOp { map: known, op, key, source: Box::new(source) }
}

impl PinnedMaps {
    /// Opens the pins; the datapath maps must exist, the name map is optional.
    pub fn open(bpffs_root: &Path) -> Result<Self, EbpfError> {
        let dir = maps_dir(bpffs_root);
        let mut maps = Vec::new();
        for name in map_names::ALL.iter().chain([&NAMES_MAP]) {
            let path = dir.join(name);
            if *name == NAMES_MAP && !path.exists() {
                continue;
            }
            let data = MapData::from_pin(&path).map_err(stat_err(name, &path, "open pin"))?;
            maps.push(PinnedMap { name: name.to_string(), path, data });
        }
        Ok(PinnedMaps { maps })
    }

    /// Statistics of every opened map.
    ///
    /// Counting a hash map walks its keys (one `BPF_MAP_GET_NEXT_KEY` per entry), so this is O(entries):
    /// up to ~260k syscalls for a full `KP_SOCK_REVNAT`, a few hundred milliseconds at worst.
    pub fn stats(&self) -> Result<Vec<MapStats>, EbpfError> {
        self.maps.iter().map(|m| map_stats(m, u32::MAX)).collect()
    }

    /// [`stats`](Self::stats) with each hash-map walk stopped after `count_cap` keys (a walk of a million keys
    /// would stall a metrics scrape; `kpctl maps` counts fully): a count equal to the cap means "at least".
    pub fn stats_capped(&self, count_cap: u32) -> Result<Vec<MapStats>, EbpfError> {
        self.maps.iter().map(|m| map_stats(m, count_cap)).collect()
    }
}

fn map_stats(m: &PinnedMap, count_cap: u32) -> Result<MapStats, EbpfError> {
    let info = m.data.info().map_err(stat_err(&m.name, &m.path, "info"))?;
    let map_type = info.map_type().map_err(stat_err(&m.name, &m.path, "info"))?;
    let entries = match map_type {
        // Arrays are fully allocated: every index exists.
        MapType::Array | MapType::PerCpuArray => u64::from(info.max_entries()),
        _ => count_entries(&m.data, info.key_size() as usize, info.max_entries().min(count_cap))
            .map_err(|e| stat_err(&m.name, &m.path, "count")(MapError::IoError(e)))?,
    };
    let memory_bytes = fdinfo_field(m.data.fd().as_fd().as_raw_fd(), "memlock")
        .map_err(|source| EbpfError::Io { what: format!("reading fdinfo of map {}", m.name), source })?;
    Ok(MapStats {
        name: m.name.clone(),
        map_type: format!("{map_type:?}"),
        id: info.id(),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        entries,
        memory_bytes,
    })
}

/// Number of keys of a hash-like map. Bounded by `max_entries`: when the key we continue from is deleted
/// concurrently, the kernel restarts from the first key, so under churn (LRU maps) the walk could
/// otherwise go on forever; the count is then approximate, which is fine for a gauge.
fn count_entries(map: &MapData, key_size: usize, max_entries: u32) -> std::io::Result<u64> {
    let fd = map.fd().as_fd();
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0u64;
    let mut first = true;
    while n < u64::from(max_entries) {
        // SAFETY: both buffers are at least the key size the kernel reported for this same fd.
        let more = unsafe { crate::sys::map_get_next_key(fd, (!first).then_some(&key[..]), &mut next)? };
        if !more {
            break;
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}

/// A numeric field of `/proc/self/fdinfo/<fd>` (`None` when the kernel does not report it).
fn fdinfo_field(fd: i32, field: &str) -> std::io::Result<Option<u64>> {
    let f = File::open(format!("/proc/self/fdinfo/{fd}"))?;
    for line in BufReader::new(f).lines() {
        let line = line?;
        if let Some((k, v)) = line.split_once(':')
            && k.trim() == field
        {
            return Ok(v.trim().parse().ok());
        }
    }
    Ok(None)
}

/// The frontends' addresses, for tests and scripts: `ip:port/PROTO` of every row.
pub fn frontends(rows: &[FrontendInfo]) -> Vec<String> {
    rows.iter().map(FrontendInfo::frontend).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::FakeMaps;
    use crate::writer::MapWriter;
    use ebpf_common::ServiceCounters;
    use proxier::model::{
        Changes, Endpoint, IpFamily, Protocol, SelectedEndpoints, ServicePortInfo, ServicePortName, ServicePortState,
        Snapshot,
    };
    use std::sync::Arc;

    fn ep(a: &str, local: bool) -> Endpoint {
        Endpoint { is_local: local, ..Endpoint::new(a.parse().unwrap(), 8080) }
    }

    fn svc(
        cip: &str,
        port: u16,
        proto: Protocol,
        eps: Vec<Endpoint>,
        f: impl FnOnce(&mut ServicePortInfo),
    ) -> ServicePortState {
        let mut info = ServicePortInfo::new(cip.parse().unwrap(), port, proto);
        f(&mut info);
        let local: Vec<Endpoint> = eps.iter().filter(|e| e.is_local).cloned().collect();
        ServicePortState {
            info: Arc::new(info),
            endpoints: Arc::new(eps.clone()),
            selected: SelectedEndpoints {
                has_any: !eps.is_empty(),
                cluster: eps.clone().into(),
                local: local.into(),
                all_reachable: eps.into(),
            },
        }
    }

    /// Two services written by the real writer into fake maps, with counters and names.
    fn programmed() -> (FakeMaps, BTreeMap<u32, ServiceName>) {
        let mut w = MapWriter::adopt(FakeMaps::default()).unwrap();
        let mut snap = Snapshot::default();
        snap.node.addresses = vec!["192.0.2.1".parse().unwrap()];
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        let dns = ServicePortName::new("kube-system", "dns", "", Protocol::Udp);
        snap.v4.services.insert(
            web.clone(),
            svc("10.96.0.10", 80, Protocol::Tcp, vec![ep("10.0.0.2", false), ep("10.0.0.3", true)], |i| {
                i.node_port = 30080;
                i.external_ips = vec!["192.0.2.99".parse().unwrap()];
                i.external_policy_local = true;
                i.session_affinity_timeout = Some(10800);
            }),
        );
        snap.v6.services.insert(dns.clone(), svc("fd00::a", 53, Protocol::Udp, vec![], |_| {}));
        w.sync(&[IpFamily::V4, IpFamily::V6], &snap, &Changes { full: true, ..Default::default() }).unwrap();
        let mut names = BTreeMap::new();
        for (f, n, id) in w.service_names() {
            names.insert(id, ServiceName::new(f, n));
        }
        let web_id = w.service_id(IpFamily::V4, &web).unwrap();
        let mut maps = w.maps().clone();
        maps.counters.insert(web_id, ServiceCounters { translated: 7, no_endpoints: 1 });
        (maps, names)
    }

    #[test]
    fn lists_frontends_types_flags_and_backends() {
        let (maps, names) = programmed();
        let rows = list_services(&maps, &names).unwrap();
        let got: Vec<(String, &str, String, Vec<String>)> = rows
            .iter()
            .map(|r| {
                (r.frontend(), r.kind.as_str(), r.flags(), r.backends.iter().map(|b| b.address.to_string()).collect())
            })
            .collect();
        let cluster = vec!["10.0.0.2:8080".to_string(), "10.0.0.3:8080".to_string()];
        let local = vec!["10.0.0.3:8080".to_string()];
        assert_eq!(
            got,
            vec![
                ("10.96.0.10:80/TCP".into(), "ClusterIP", "affinity=10800s".into(), cluster),
                ("192.0.2.99:80/TCP".into(), "ExternalIP", "local,affinity=10800s".into(), local.clone()),
                ("192.0.2.1:30080/TCP".into(), "NodePort", "local,affinity=10800s".into(), local),
                ("[fd00::a]:53/UDP".into(), "ClusterIP", "-".into(), vec![]),
            ]
        );
        assert!(rows.iter().all(|r| r.problems.is_empty()), "{rows:?}");
        assert_eq!(rows[0].service.as_deref(), Some("default/web:http"));
        assert_eq!(rows[3].service.as_deref(), Some("kube-system/dns"));
        assert_eq!((rows[1].translated, rows[1].no_endpoint_rejects), (7, 1));
    }

    #[test]
    fn formats_services_like_cilium() {
        let (maps, names) = programmed();
        let rows = list_services(&maps, &names).unwrap();
        let (w, d) = (rows[0].service_id, rows[3].service_id);
        let expected = format!(
            "\
ID   FRONTEND              TYPE         FLAGS                   BACKENDS                 TRANSLATED   NO-EP-REJECTS   SERVICE
{w}    10.96.0.10:80/TCP     ClusterIP    affinity=10800s         1 => 10.0.0.2:8080/TCP   7            1               default/web:http
                                                                2 => 10.0.0.3:8080/TCP
{w}    192.0.2.99:80/TCP     ExternalIP   local,affinity=10800s   2 => 10.0.0.3:8080/TCP   7            1               default/web:http
{w}    192.0.2.1:30080/TCP   NodePort     local,affinity=10800s   2 => 10.0.0.3:8080/TCP   7            1               default/web:http
{d}    [fd00::a]:53/UDP      ClusterIP    -                       (none: refused)          0            0               kube-system/dns
"
        );
        assert_eq!(format_services(&rows), expected);
    }

    #[test]
    fn reports_inconsistent_maps() {
        let (mut maps, names) = programmed();
        // Drop a backend behind a slot: the row says so instead of failing.
        let (&bid, _) = maps.backends.iter().next().unwrap();
        maps.backends.remove(&bid);
        let rows = list_services(&maps, &names).unwrap();
        assert!(rows[0].problems.iter().any(|p| p.contains(&format!("backend {bid} missing"))), "{rows:?}");
        assert!(format_services(&rows).contains("! slot 1: backend"));
        // Unknown ids print without a name.
        let rows = list_services(&maps, &BTreeMap::new()).unwrap();
        assert!(rows.iter().all(|r| r.service.is_none()));
    }

    #[test]
    fn formats_maps_and_json() {
        let stats = vec![MapStats {
            name: "KP_SERVICES".into(),
            map_type: "HashMap".into(),
            id: 12,
            key_size: 24,
            value_size: 16,
            max_entries: 65536,
            entries: 3,
            memory_bytes: Some(5_400_000),
        }];
        assert_eq!(
            format_maps(&stats),
            "MAP           TYPE      ID   KEY   VALUE   ENTRIES   MAX     MEMORY\n\
             KP_SERVICES   HashMap   12   24    16      3         65536   5.1 MiB\n"
        );
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json[0]["memory_bytes"], 5_400_000);
        let (maps, names) = programmed();
        let rows = list_services(&maps, &names).unwrap();
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["type"], "ClusterIP");
        assert_eq!(json[0]["address"], "10.96.0.10:80");
        assert_eq!(json[0]["backends"][1]["address"], "10.0.0.3:8080");
        assert_eq!(json[3]["affinity_timeout"], serde_json::Value::Null);
    }

    #[test]
    fn fdinfo_parses_memlock_of_self() {
        // Any fd has fdinfo; a plain file has no memlock line.
        let f = File::open("/proc/self/status").unwrap();
        assert_eq!(fdinfo_field(f.as_raw_fd(), "memlock").unwrap(), None);
        assert!(fdinfo_field(f.as_raw_fd(), "flags").is_ok());
    }
}
