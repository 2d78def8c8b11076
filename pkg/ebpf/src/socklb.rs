//! Socket-LB scope (`--socket-lb-scope`) and the per-pod opt-out behind `kpctl socket-lb`.
//!
//! The cgroup programs read `KP_SOCK_LB_CFG[0]` first: under `all` every socket is translated; under
//! `host-only` only sockets of the proxy's own network namespace are (its netns cookie is stored there);
//! under `opt-out` sockets of namespaces whose cookie is in `KP_SOCK_LB_SKIP` are left alone. Sockets left
//! alone reach Services through the per-packet path on pod-facing devices (`pods.rs`).
//!
//! Network namespaces are named by their cookie (`SO_NETNS_COOKIE`, kernel ≥ 5.14): a 64-bit value the
//! kernel never reuses, so an entry left behind by a deleted pod can never match another pod.

use std::fmt;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::str::FromStr;

use aya::maps::{Array, HashMap, Map, MapData};
use ebpf_common::{SOCK_LB_SCOPE_ALL, SOCK_LB_SCOPE_HOST_ONLY, SOCK_LB_SCOPE_OPT_OUT, SockLbConfig, map_names};

use crate::EbpfError;
use crate::inspect::maps_dir;
use crate::loader::io_err;
use crate::sys;

/// Which sockets the cgroup programs translate (`--socket-lb-scope`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SocketLbScope {
    /// Every socket in the cgroup subtree (no per-packet path for pods).
    #[default]
    All,
    /// Every socket except those of network namespaces listed with `kpctl socket-lb skip`.
    OptOut,
    /// Only sockets of the proxy's (the node's) network namespace; pods go per packet.
    HostOnly,
}

impl SocketLbScope {
    /// Every value, as spelled on the command line.
    pub const NAMES: [&'static str; 3] = ["all", "opt-out", "host-only"];

    /// The value the kernel programs read.
    pub fn kernel_value(self) -> u32 {
        match self {
            SocketLbScope::All => SOCK_LB_SCOPE_ALL,
            SocketLbScope::OptOut => SOCK_LB_SCOPE_OPT_OUT,
            SocketLbScope::HostOnly => SOCK_LB_SCOPE_HOST_ONLY,
        }
    }

    /// Whether pods may bypass socket LB, so pod-facing devices need the per-packet path.
    pub fn per_packet_pods(self) -> bool {
        self != SocketLbScope::All
    }
}

impl fmt::Display for SocketLbScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketLbScope::All => "all",
            SocketLbScope::OptOut => "opt-out",
            SocketLbScope::HostOnly => "host-only",
        })
    }
}

/// An unknown `--socket-lb-scope` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid socket-LB scope {0:?}: expected one of all, opt-out, host-only")]
pub struct ParseScopeError(pub String);

impl FromStr for SocketLbScope {
    type Err = ParseScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(SocketLbScope::All),
            "opt-out" => Ok(SocketLbScope::OptOut),
            "host-only" => Ok(SocketLbScope::HostOnly),
            other => Err(ParseScopeError(other.to_string())),
        }
    }
}

/// The calling thread's network namespace cookie (`SO_NETNS_COOKIE` on a throw-away socket).
pub(crate) fn current_netns_cookie() -> std::io::Result<u64> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a u64 out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of the network namespace behind `netns` (an open `/run/netns/X` or `/proc/PID/ns/net`).
pub(crate) fn netns_cookie_of(netns: &fs::File, what: &Path) -> Result<u64, EbpfError> {
    sys::in_netns(netns, current_netns_cookie)
        .and_then(|r| r)
        .map_err(io_err(format!("reading the netns cookie of {} (SO_NETNS_COOKIE, kernel >= 5.14)", what.display())))
}

/// The cookie of the network namespace file `path` (`/run/netns/X` or `/proc/PID/ns/net`).
pub fn netns_cookie(path: &Path) -> Result<u64, EbpfError> {
    let f = fs::File::open(path).map_err(io_err(format!("opening network namespace {}", path.display())))?;
    netns_cookie_of(&f, path)
}

fn map_err(map: &'static str, op: &'static str, key: String) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::MapOp { map, op, key, source: Box::new(source) }
}

/// Writes the scope (and the proxy's netns cookie) the cgroup programs read.
pub(crate) fn write_config(map: &mut Map, scope: SocketLbScope, host_cookie: u64) -> Result<(), EbpfError> {
    let name = map_names::SOCK_LB_CONFIG;
    let mut arr: Array<&mut MapData, SockLbConfig> =
        Array::try_from(map).map_err(map_err(name, "open", String::new()))?;
    let cfg = SockLbConfig { scope: scope.kernel_value(), _pad: 0, host_netns_cookie: host_cookie };
    arr.set(0, cfg, 0).map_err(map_err(name, "update", "0".into()))
}

/// The pinned opt-out map of a running proxy (`<bpffs_root>/v1/maps/KP_SOCK_LB_SKIP`).
pub struct SkipMap {
    map: HashMap<MapData, u64, u8>,
    config: Option<SockLbConfig>,
}

impl SkipMap {
    /// Opens the pinned map (and reads the scope, for `list`).
    pub fn open(bpffs_root: &Path) -> Result<Self, EbpfError> {
        let dir = maps_dir(bpffs_root);
        let path = dir.join(map_names::SOCK_LB_SKIP);
        let key = path.display().to_string();
        let map = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .and_then(HashMap::try_from)
            .map_err(map_err(map_names::SOCK_LB_SKIP, "open pin", key))?;
        let cfg_path = dir.join(map_names::SOCK_LB_CONFIG);
        let config = MapData::from_pin(&cfg_path)
            .and_then(Map::from_map_data)
            .and_then(Array::<MapData, SockLbConfig>::try_from)
            .and_then(|a| a.get(&0, 0))
            .ok();
        Ok(SkipMap { map, config })
    }

    /// Excludes the sockets of namespace `cookie` from socket LB (effective under scope `opt-out`).
    pub fn skip(&mut self, cookie: u64) -> Result<(), EbpfError> {
        self.map.insert(cookie, 1, 0).map_err(map_err(map_names::SOCK_LB_SKIP, "update", cookie.to_string()))
    }

    /// Gives namespace `cookie` socket LB back; `Ok(false)` when it was not listed.
    pub fn unskip(&mut self, cookie: u64) -> Result<bool, EbpfError> {
        match self.map.remove(&cookie) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(map_err(map_names::SOCK_LB_SKIP, "delete", cookie.to_string())(e)),
        }
    }

    /// The listed namespace cookies, sorted.
    pub fn list(&self) -> Result<Vec<u64>, EbpfError> {
        let mut v = self.map.keys().collect::<Result<Vec<u64>, _>>().map_err(map_err(
            map_names::SOCK_LB_SKIP,
            "dump",
            String::new(),
        ))?;
        v.sort_unstable();
        Ok(v)
    }

    /// The scope the proxy runs with (`None` when the config map could not be read) and its netns cookie.
    pub fn scope(&self) -> Option<(SocketLbScope, u64)> {
        let c = self.config?;
        let scope = match c.scope {
            SOCK_LB_SCOPE_OPT_OUT => SocketLbScope::OptOut,
            SOCK_LB_SCOPE_HOST_ONLY => SocketLbScope::HostOnly,
            _ => SocketLbScope::All,
        };
        Some((scope, c.host_netns_cookie))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_round_trips_and_rejects_unknown() {
        for n in SocketLbScope::NAMES {
            assert_eq!(n.parse::<SocketLbScope>().unwrap().to_string(), n);
        }
        assert_eq!("hostonly".parse::<SocketLbScope>(), Err(ParseScopeError("hostonly".into())));
        assert_eq!(SocketLbScope::default(), SocketLbScope::All);
        assert!(!SocketLbScope::All.per_packet_pods() && SocketLbScope::HostOnly.per_packet_pods());
    }
}
