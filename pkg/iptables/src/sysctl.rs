//! Reading and writing the few sysctls iptables mode needs (`net/ipv4/conf/all/route_localnet`,
//! `net/netfilter/nf_conntrack_tcp_be_liberal`), behind a trait so tests run them inside their network namespace
//! (or not at all) and never change the host.

use std::path::PathBuf;

use crate::runner::Exec;

/// `route_localnet`, set for IPv4 localhost NodePorts.
pub const ROUTE_LOCALNET: &str = "net/ipv4/conf/all/route_localnet";
/// `nf_conntrack_tcp_be_liberal`; when set, the INVALID-drop rule is not needed.
pub const CONNTRACK_TCP_BE_LIBERAL: &str = "net/netfilter/nf_conntrack_tcp_be_liberal";

/// An error reading or writing a sysctl, naming it.
#[derive(Debug, thiserror::Error)]
#[error("sysctl {name}: {message}")]
pub struct SysctlError {
    /// The sysctl, slash-separated.
    pub name: String,
    /// What failed.
    pub message: String,
}

/// Access to sysctls (names slash-separated, as upstream spells them).
pub trait Sysctl: Send + Sync + std::fmt::Debug {
    /// The current value, trimmed.
    fn get(&self, name: &str) -> Result<String, SysctlError>;
    /// Sets a value.
    fn set(&self, name: &str, value: &str) -> Result<(), SysctlError>;
}

/// Sets `name` to `value` unless it already has it (upstream `EnsureSysctl`).
pub fn ensure(sysctl: &dyn Sysctl, name: &str, value: &str) -> Result<(), SysctlError> {
    if sysctl.get(name).ok().as_deref() == Some(value) {
        return Ok(());
    }
    sysctl.set(name, value)
}

/// Sysctls under `/proc/sys` of this process's namespaces.
#[derive(Debug, Clone)]
pub struct ProcSysctl {
    root: PathBuf,
}

impl Default for ProcSysctl {
    fn default() -> Self {
        ProcSysctl { root: PathBuf::from("/proc/sys") }
    }
}

impl ProcSysctl {
    /// Sysctls under `root` instead of `/proc/sys` (for tests with a fake tree).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        ProcSysctl { root: root.into() }
    }
}

impl Sysctl for ProcSysctl {
    fn get(&self, name: &str) -> Result<String, SysctlError> {
        std::fs::read_to_string(self.root.join(name))
            .map(|s| s.trim().to_string())
            .map_err(|e| SysctlError { name: name.into(), message: e.to_string() })
    }

    fn set(&self, name: &str, value: &str) -> Result<(), SysctlError> {
        std::fs::write(self.root.join(name), value)
            .map_err(|e| SysctlError { name: name.into(), message: e.to_string() })
    }
}

/// Sysctls read and written with the `sysctl` tool through an [`Exec`] prefix (e.g. `ip netns exec NS`), so the
/// values are those of that network namespace.
#[derive(Debug, Clone)]
pub struct ExecSysctl {
    exec: Exec,
}

impl ExecSysctl {
    /// Runs `sysctl` through `exec`.
    pub fn new(exec: Exec) -> Self {
        ExecSysctl { exec }
    }
}

impl Sysctl for ExecSysctl {
    fn get(&self, name: &str) -> Result<String, SysctlError> {
        let dotted = name.replace('/', ".");
        self.exec
            .run_ok("sysctl", &["-n", &dotted], None)
            .map(|s| s.trim().to_string())
            .map_err(|e| SysctlError { name: name.into(), message: e.to_string() })
    }

    fn set(&self, name: &str, value: &str) -> Result<(), SysctlError> {
        let arg = format!("{}={value}", name.replace('/', "."));
        self.exec
            .run_ok("sysctl", &["-q", "-w", &arg], None)
            .map(|_| ())
            .map_err(|e| SysctlError { name: name.into(), message: e.to_string() })
    }
}

/// Sysctls that are never touched: reads fail, writes are ignored (logged). For unit tests.
#[derive(Debug, Clone, Default)]
pub struct NoSysctl;

impl Sysctl for NoSysctl {
    fn get(&self, name: &str) -> Result<String, SysctlError> {
        Err(SysctlError { name: name.into(), message: "sysctl access disabled".into() })
    }

    fn set(&self, name: &str, value: &str) -> Result<(), SysctlError> {
        tracing::debug!(name, value, "sysctl access disabled; not setting");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_sysctl_on_a_fake_tree() {
        let dir = std::env::temp_dir().join(format!("kp-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("net/ipv4/conf/all")).unwrap();
        std::fs::write(dir.join(ROUTE_LOCALNET), "0\n").unwrap();
        let s = ProcSysctl::with_root(&dir);
        assert_eq!(s.get(ROUTE_LOCALNET).unwrap(), "0");
        ensure(&s, ROUTE_LOCALNET, "1").unwrap();
        assert_eq!(s.get(ROUTE_LOCALNET).unwrap(), "1");
        let err = s.get(CONNTRACK_TCP_BE_LIBERAL).unwrap_err();
        assert!(err.to_string().contains(CONNTRACK_TCP_BE_LIBERAL), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
