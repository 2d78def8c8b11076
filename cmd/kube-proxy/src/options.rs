//! The `kube-proxy` command line: upstream's flags with pflag/cobra semantics (`--flag=value` or `--flag value`,
//! bare booleans, `-v 2` / `-v=2` / `-v2`, `--foo_bar` == `--foo-bar`, `--` ends flags), upstream's help and error
//! texts, and the precedence rules between flags and `--config` that yield one [`ProxyRunConfig`].
//!
//! Ours on top of upstream: `--proxy-mode=ebpf` (also what an empty mode means), `--cgroup-root`,
//! `--bpffs-root` and `--socket-lb-scope` (command line only, like `--hostname-override`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::{
    self, ConfigError, GoDuration, KUBERNETES_MINOR, KubeProxyConfiguration, LocalMode, ProxyMode, Quantity,
    VModuleItem, append_port_if_needed, go_quote, go_quote_list, parse_ip_sloppy, split_host_port,
};

/// Default of `--bpffs-root`.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/kube-proxy-rs";

/// The version `--version` reports: upstream's release we mirror, tagged with our crate version, e.g.
/// `v1.37.0-kube-proxy-rs.0.1.0`. `--version` prints `Kubernetes <this>`.
pub fn version_string() -> String {
    format!("v1.{KUBERNETES_MINOR}.0-kube-proxy-rs.{}", env!("CARGO_PKG_VERSION"))
}

// ---------------------------------------------------------------------------------------------------------------
// Flag table
// ---------------------------------------------------------------------------------------------------------------

/// The value type of a flag; decides parsing and the type name shown in `--help`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagKind {
    /// `true`/`false`; a bare `--flag` means true.
    Bool,
    /// Any string.
    Str,
    /// An IP address.
    Ip,
    /// An IP or `ip:port`; empty allowed.
    IpPort,
    /// A 32-bit integer (Go base-0 syntax: `0x10`, `010`).
    Int32,
    /// A 32-bit float.
    Float32,
    /// A Go duration.
    Duration,
    /// Comma-separated strings; repeating the flag appends.
    StringSlice,
    /// `key=bool,...`; repeating the flag merges.
    MapStringBool,
    /// Log verbosity (unsigned).
    Level,
    /// `pattern=N,...`; repeating the flag appends.
    VModule,
    /// A resource quantity.
    Quantity,
    /// A port range (`A-B`, `A+N`, `N`).
    PortRange,
    /// `--version[=true|false|raw|vX.Y.Z]`.
    Version,
    /// A proxy mode (checked by validation, not by the flag).
    ProxyMode,
    /// A local-traffic detection mode (checked by validation).
    LocalMode,
    /// `all`, `opt-out` or `host-only` (checked when parsed).
    SocketLbScope,
}

impl FlagKind {
    /// The type name pflag prints after the flag name in the usage (empty for booleans).
    pub fn type_name(self) -> &'static str {
        match self {
            FlagKind::Bool => "",
            FlagKind::Str => "string",
            FlagKind::Ip => "ip",
            FlagKind::IpPort => "ipport",
            FlagKind::Int32 => "int32",
            FlagKind::Float32 => "float32",
            FlagKind::Duration => "duration",
            FlagKind::StringSlice => "strings",
            FlagKind::MapStringBool => "mapStringBool",
            FlagKind::Level => "Level",
            FlagKind::VModule => "pattern=N,...",
            FlagKind::Quantity => "quantity",
            FlagKind::PortRange => "port-range",
            FlagKind::Version => "version",
            FlagKind::ProxyMode => "ProxyMode",
            FlagKind::LocalMode => "LocalMode",
            FlagKind::SocketLbScope => "string",
        }
    }

    /// The value a bare `--flag` (no `=value`) takes, for flags that do not need an argument.
    fn no_opt_default(self) -> Option<&'static str> {
        match self {
            FlagKind::Bool | FlagKind::Version => Some("true"),
            _ => None,
        }
    }
}

/// One command-line flag.
#[derive(Clone, Copy, Debug)]
pub struct FlagSpec {
    /// Long name, without dashes.
    pub name: &'static str,
    /// One-letter short form, if any.
    pub shorthand: Option<char>,
    /// Value type.
    pub kind: FlagKind,
    /// Default value as text (as pflag shows it).
    pub default: &'static str,
    /// Help text.
    pub usage: &'static str,
    /// Deprecation message: such flags still work, print a warning when used and are hidden from `--help`.
    pub deprecated: Option<&'static str>,
}

const fn flag(name: &'static str, kind: FlagKind, default: &'static str, usage: &'static str) -> FlagSpec {
    FlagSpec { name, shorthand: None, kind, default, usage, deprecated: None }
}

/// Every flag `kube-proxy` accepts (Linux and common upstream flags plus ours), sorted by name as in `--help`.
pub static FLAGS: &[FlagSpec] = &[
    flag(
        "bind-address",
        FlagKind::Ip,
        "0.0.0.0",
        "Overrides what kube-proxy takes as its node's primary IP (the name is historical: nothing binds to this \
         address). 0.0.0.0 or :: leave the choice to the Node object. Ignored when a config file is given with \
         --config.",
    ),
    flag(
        "bind-address-hard-fail",
        FlagKind::Bool,
        "false",
        "If true, failing to bind the healthz, metrics or service health-check ports is fatal and kube-proxy exits.",
    ),
    flag(
        "boot-id-file",
        FlagKind::Str,
        "/proc/sys/kernel/random/boot_id",
        "Comma-separated files to read the boot id from; the first that exists wins. (Accepted for compatibility; \
         kube-proxy does not use it.)",
    ),
    flag(
        "bpffs-root",
        FlagKind::Str,
        DEFAULT_BPFFS_ROOT,
        "[kube-proxy-rs] Directory on a bpffs mount where ebpf mode pins its maps and links (a layout version is \
         appended), so a restarted proxy keeps established connections. Command line only; not in the config file.",
    ),
    flag(
        "cgroup-root",
        FlagKind::Str,
        "",
        "[kube-proxy-rs] cgroup v2 directory whose subtree gets the socket load-balancing programs in ebpf mode. \
         Empty means the root of the detected cgroup2 mount. Command line only; not in the config file.",
    ),
    flag(
        "cleanup",
        FlagKind::Bool,
        "false",
        "If true, remove the rules and programs of every proxy mode (iptables, ipvs, nftables, ebpf) and exit.",
    ),
    flag(
        "cluster-cidr",
        FlagKind::Str,
        "",
        "The pods' CIDR range in the cluster (a comma-separated dual-stack pair for dual-stack clusters). With \
         --detect-local-mode=ClusterCIDR, traffic from this range counts as local; otherwise unused. Ignored when a \
         config file is given with --config.",
    ),
    flag("config", FlagKind::Str, "", "Path to the configuration file (KubeProxyConfiguration, v1alpha1)."),
    flag(
        "config-sync-period",
        FlagKind::Duration,
        "15m0s",
        "How often the watched API objects are resynchronised. Must be greater than 0.",
    ),
    flag(
        "conntrack-max-per-core",
        FlagKind::Int32,
        "32768",
        "Conntrack entries to allow per CPU core (0 leaves the kernel limit alone and ignores conntrack-min).",
    ),
    flag(
        "conntrack-min",
        FlagKind::Int32,
        "131072",
        "Least number of conntrack entries to allow whatever conntrack-max-per-core says (set \
         conntrack-max-per-core=0 to leave the limit alone).",
    ),
    flag(
        "conntrack-tcp-be-liberal",
        FlagKind::Bool,
        "false",
        "Turn on liberal TCP tracking by setting nf_conntrack_tcp_be_liberal to 1.",
    ),
    flag(
        "conntrack-tcp-timeout-close-wait",
        FlagKind::Duration,
        "1h0m0s",
        "NAT timeout for TCP connections in the CLOSE_WAIT state.",
    ),
    flag(
        "conntrack-tcp-timeout-established",
        FlagKind::Duration,
        "24h0m0s",
        "Idle timeout of established TCP connections (0 leaves it alone).",
    ),
    flag(
        "conntrack-udp-timeout",
        FlagKind::Duration,
        "0s",
        "Idle timeout of UNREPLIED UDP connections (0 leaves it alone).",
    ),
    flag(
        "conntrack-udp-timeout-stream",
        FlagKind::Duration,
        "0s",
        "Idle timeout of ASSURED UDP connections (0 leaves it alone).",
    ),
    flag(
        "detect-local-mode",
        FlagKind::LocalMode,
        "",
        "How to recognise traffic from local pods: ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix. \
         Ignored when a config file is given with --config.",
    ),
    flag(
        "feature-gates",
        FlagKind::MapStringBool,
        "",
        "Comma-separated key=value pairs that turn alpha/experimental features on or off. Known to kube-proxy-rs:\n\
         AllAlpha=true|false (ALPHA - default=false)\n\
         AllBeta=true|false (BETA - default=false)\n\
         KubeProxyNFTablesLocalhostNodePorts=true|false (ALPHA - default=false)\n\
         LoggingAlphaOptions=true|false (ALPHA - default=false)\n\
         LoggingBetaOptions=true|false (BETA - default=true)\n\
         Other upstream gates are accepted and logged as unknown.\n\
         Ignored when a config file is given with --config.",
    ),
    flag(
        "healthz-bind-address",
        FlagKind::IpPort,
        "0.0.0.0:10256",
        "IP address and port the health check server listens on (a bare IP gets port 10256). Empty disables it. \
         Ignored when a config file is given with --config.",
    ),
    FlagSpec {
        deprecated: Some(
            "This flag is deprecated and will be removed in a future release. Please use --healthz-bind-address \
             instead.",
        ),
        ..flag("healthz-port", FlagKind::Int32, "10256", "Port of the health check server; 0 disables it.")
    },
    FlagSpec { shorthand: Some('h'), ..flag("help", FlagKind::Bool, "false", "help for kube-proxy") },
    flag(
        "hostname-override",
        FlagKind::Str,
        "",
        "Name of the Node kube-proxy runs on, if it differs from the host name. Takes precedence over the config \
         file.",
    ),
    flag(
        "init-only",
        FlagKind::Bool,
        "false",
        "If true, do the setup that needs full root privileges, then exit; kube-proxy can afterwards run with only \
         CAP_NET_ADMIN.",
    ),
    flag(
        "iptables-localhost-nodeports",
        FlagKind::Bool,
        "true",
        "If false, stop accepting NodePort connections on localhost (the legacy behaviour of iptables mode, IPv4 \
         only; other modes never allow it).",
    ),
    flag(
        "iptables-masquerade-bit",
        FlagKind::Int32,
        "14",
        "Bit of the fwmark space that marks packets needing SNAT in iptables and ipvs modes. Must be in [0, 31].",
    ),
    flag(
        "iptables-min-sync-period",
        FlagKind::Duration,
        "1s",
        "Least time between rule resyncs (e.g. '5s', '1m', '2h22m'); 0 resyncs on every Service or EndpointSlice \
         change. Used by every mode except ipvs.",
    ),
    flag(
        "iptables-sync-period",
        FlagKind::Duration,
        "30s",
        "Longest time between full resyncs and cleanups (e.g. '5s', '1m', '2h22m'). Must be greater than 0. Used by \
         every mode except ipvs.",
    ),
    flag(
        "ipvs-exclude-cidrs",
        FlagKind::StringSlice,
        "[]",
        "Comma-separated CIDRs the ipvs proxier leaves alone when cleaning up IPVS rules.",
    ),
    flag(
        "ipvs-min-sync-period",
        FlagKind::Duration,
        "1s",
        "Least time between IPVS rule resyncs (e.g. '5s', '1m', '2h22m'); 0 resyncs on every Service or \
         EndpointSlice change.",
    ),
    flag("ipvs-scheduler", FlagKind::Str, "", "IPVS scheduler to use in ipvs mode (empty means rr)."),
    flag(
        "ipvs-strict-arp",
        FlagKind::Bool,
        "false",
        "Turn on strict ARP by setting arp_ignore to 1 and arp_announce to 2.",
    ),
    flag(
        "ipvs-sync-period",
        FlagKind::Duration,
        "30s",
        "Longest time between full IPVS resyncs and cleanups (e.g. '5s', '1m', '2h22m'). Must be greater than 0.",
    ),
    flag(
        "ipvs-tcp-timeout",
        FlagKind::Duration,
        "0s",
        "Timeout of idle IPVS TCP connections; 0 leaves it alone (e.g. '5s', '1m', '2h22m').",
    ),
    flag(
        "ipvs-tcpfin-timeout",
        FlagKind::Duration,
        "0s",
        "Timeout of IPVS TCP connections after a FIN; 0 leaves it alone (e.g. '5s', '1m', '2h22m').",
    ),
    flag(
        "ipvs-udp-timeout",
        FlagKind::Duration,
        "0s",
        "Timeout of IPVS UDP packets; 0 leaves it alone (e.g. '5s', '1m', '2h22m').",
    ),
    flag("kube-api-burst", FlagKind::Int32, "10", "Burst allowed when talking to the Kubernetes API server."),
    flag(
        "kube-api-content-type",
        FlagKind::Str,
        config::DEFAULT_CONTENT_TYPE,
        "Content type of requests sent to the API server.",
    ),
    flag(
        "kube-api-qps",
        FlagKind::Float32,
        "5",
        "Queries per second allowed when talking to the Kubernetes API server.",
    ),
    flag(
        "kubeconfig",
        FlagKind::Str,
        "",
        "Path to a kubeconfig file with the API server location and credentials (--master overrides the server).",
    ),
    flag("log-flush-frequency", FlagKind::Duration, "5s", "Longest time between log flushes."),
    flag(
        "log-json-info-buffer-size",
        FlagKind::Quantity,
        "0",
        "[Alpha] With the JSON format and split streams, buffer info messages up to this size (bytes, or with a \
         suffix such as 1K, 2Ki, 5Mi); 0 disables buffering. Needs the LoggingAlphaOptions feature gate.",
    ),
    flag(
        "log-json-split-stream",
        FlagKind::Bool,
        "false",
        "[Alpha] With the JSON format, write errors to stderr and info messages to stdout instead of one stream to \
         stdout. Needs the LoggingAlphaOptions feature gate.",
    ),
    flag(
        "log-text-info-buffer-size",
        FlagKind::Quantity,
        "0",
        "[Alpha] With the text format and split streams, buffer info messages up to this size (bytes, or with a \
         suffix such as 1K, 2Ki, 5Mi); 0 disables buffering. Needs the LoggingAlphaOptions feature gate.",
    ),
    flag(
        "log-text-split-stream",
        FlagKind::Bool,
        "false",
        "[Alpha] With the text format, write errors to stderr and info messages to stdout instead of one stream to \
         stdout. Needs the LoggingAlphaOptions feature gate.",
    ),
    flag("logging-format", FlagKind::Str, "text", "Log format: \"json\" or \"text\"."),
    flag(
        "machine-id-file",
        FlagKind::Str,
        "/etc/machine-id,/var/lib/dbus/machine-id",
        "Comma-separated files to read the machine id from; the first that exists wins. (Accepted for \
         compatibility; kube-proxy does not use it.)",
    ),
    flag(
        "masquerade-all",
        FlagKind::Bool,
        "false",
        "SNAT all traffic sent to Service cluster IPs (some CNI plugins need this).",
    ),
    flag("master", FlagKind::Str, "", "Address of the Kubernetes API server (overrides the one in the kubeconfig)."),
    flag(
        "metrics-bind-address",
        FlagKind::IpPort,
        "127.0.0.1:10249",
        "IP address and port the metrics server listens on (a bare IP gets port 10249; use 0.0.0.0:10249 or \
         [::]:10249 for all interfaces). Empty disables it. Ignored when a config file is given with --config.",
    ),
    FlagSpec {
        deprecated: Some(
            "This flag is deprecated and will be removed in a future release. Please use --metrics-bind-address \
             instead.",
        ),
        ..flag("metrics-port", FlagKind::Int32, "10249", "Port of the metrics server; 0 disables it.")
    },
    flag(
        "nodeport-addresses",
        FlagKind::StringSlice,
        "[]",
        "CIDR ranges holding the node IPs that accept NodePort connections, or the single word 'primary' for the \
         node's primary IPs from the Node object. Unset means all local IPs. Ignored when a config file is given \
         with --config.",
    ),
    flag(
        "oom-score-adj",
        FlagKind::Int32,
        "-999",
        "OOM score adjustment of the kube-proxy process, in [-1000, 1000]. Ignored when a config file is given with \
         --config.",
    ),
    flag(
        "pod-bridge-interface",
        FlagKind::Str,
        "",
        "Bridge interface whose traffic counts as local when --detect-local-mode is BridgeInterface.",
    ),
    flag(
        "pod-interface-name-prefix",
        FlagKind::Str,
        "",
        "Interface name prefix whose traffic counts as local when --detect-local-mode is InterfaceNamePrefix.",
    ),
    flag(
        "profiling",
        FlagKind::Bool,
        "false",
        "If true, serve profiling data under /debug/pprof on the metrics server. Ignored when a config file is given \
         with --config.",
    ),
    flag(
        "proxy-mode",
        FlagKind::ProxyMode,
        "",
        "Proxy mode: 'ebpf' (kube-proxy-rs, the default when empty), 'iptables', 'ipvs' or 'nftables'. Ignored when \
         a config file is given with --config.",
    ),
    FlagSpec {
        deprecated: Some("This flag has no effect and will be removed in a future release."),
        ..flag("proxy-port-range", FlagKind::PortRange, "", "Formerly the userspace proxy's port range; no effect.")
    },
    flag(
        "show-hidden-metrics-for-version",
        FlagKind::Str,
        "",
        "Previous minor version (<major>.<minor>, e.g. '1.36') whose hidden metrics to show again; only the \
         previous minor version is accepted. Ignored when a config file is given with --config.",
    ),
    flag(
        "socket-lb-scope",
        FlagKind::SocketLbScope,
        "all",
        "[kube-proxy-rs] Which sockets ebpf mode load-balances at connect(): 'all' (every process in the cgroup \
         subtree), 'opt-out' (all but pods listed with `kpctl socket-lb skip`) or 'host-only' (only the node's \
         network namespace). Pods left out (e.g. sidecar meshes that must see the ClusterIP) are translated per \
         packet by tc programs on the pod-facing devices. Command line only; not in the config file.",
    ),
    FlagSpec { shorthand: Some('v'), ..flag("v", FlagKind::Level, "0", "Log verbosity level.") },
    flag(
        "version",
        FlagKind::Version,
        "false",
        "--version or --version=raw prints version information and exits; --version=vX.Y.Z... sets the reported \
         version.",
    ),
    flag(
        "vmodule",
        FlagKind::VModule,
        "",
        "Comma-separated pattern=N settings for per-file log verbosity (text format only).",
    ),
    flag("write-config-to", FlagKind::Str, "", "If set, write the effective configuration to this file and exit."),
];

/// Looks up a flag by its (normalised) long name.
pub fn lookup_flag(name: &str) -> Option<&'static FlagSpec> {
    FLAGS.iter().find(|f| f.name == name)
}

fn lookup_shorthand(c: char) -> Option<&'static FlagSpec> {
    FLAGS.iter().find(|f| f.shorthand == Some(c))
}

// ---------------------------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------------------------

/// What `--version` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionRequest {
    /// Not given, or `--version=false`.
    No,
    /// `--version` / `--version=true`: print `Kubernetes <version>` and exit.
    Print,
    /// `--version=raw`: print the detailed version record and exit.
    Raw,
    /// `--version=vX.Y.Z`: report this version instead of ours (does not exit, as upstream).
    Override(String),
}

/// A parsed flag value.
#[derive(Clone, Debug, PartialEq)]
pub enum FlagValue {
    /// Bool flags.
    Bool(bool),
    /// String-like flags (string, ip, ipport, modes, quantity, port range).
    Str(String),
    /// int32 flags.
    Int(i32),
    /// float32 flags.
    Float(f32),
    /// Duration flags.
    Duration(GoDuration),
    /// String slices.
    List(Vec<String>),
    /// Feature gates.
    Gates(BTreeMap<String, bool>),
    /// `-v`.
    Level(u32),
    /// `--vmodule`.
    VModule(Vec<VModuleItem>),
    /// `--version`.
    Version(VersionRequest),
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("strconv.ParseBool: parsing {}: invalid syntax", go_quote(s))),
    }
}

/// Go's `strconv.ParseInt(s, 0, 32)`: optional sign, `0x`/`0o`/`0b`/leading-`0` prefixes, underscores between
/// digits when a prefix is used.
fn parse_go_int32(s: &str) -> Result<i32, String> {
    let syntax = || format!("strconv.ParseInt: parsing {}: invalid syntax", go_quote(s));
    let range = || format!("strconv.ParseInt: parsing {}: value out of range", go_quote(s));
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string(), true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string(), true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string(), true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string(), true)
    } else {
        (10, lower.clone(), false)
    };
    if digits.is_empty() || (!prefixed && digits.contains('_')) || digits.starts_with('_') || digits.ends_with('_') {
        return Err(syntax());
    }
    let cleaned: String = digits.chars().filter(|c| *c != '_').collect();
    if !cleaned.chars().all(|c| c.is_digit(radix)) {
        return Err(syntax());
    }
    let magnitude = i64::from_str_radix(&cleaned, radix).map_err(|_| range())?;
    let value = if neg { -magnitude } else { magnitude };
    i32::try_from(value).map_err(|_| range())
}

fn parse_go_float32(s: &str) -> Result<f32, String> {
    let ok = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit() || "+-.eE_xXpP".contains(c) || c.is_ascii_hexdigit())
        || matches!(s.to_ascii_lowercase().as_str(), "inf" | "+inf" | "-inf" | "infinity" | "nan");
    match s.parse::<f32>() {
        Ok(v) if ok => Ok(v),
        _ => Err(format!("strconv.ParseFloat: parsing {}: invalid syntax", go_quote(s))),
    }
}

fn parse_vmodule(s: &str) -> Result<Vec<VModuleItem>, String> {
    let mut items = Vec::new();
    for part in s.split(',') {
        if part.is_empty() {
            continue;
        }
        let Some((pattern, level)) = part.split_once('=') else {
            return Err(format!("{} does not have the pattern=N format", go_quote(part)));
        };
        if pattern.is_empty() {
            return Err(format!("{} does not have the pattern=N format", go_quote(part)));
        }
        let verbosity =
            level.parse::<u32>().map_err(|_| format!("parsing verbosity in {}: invalid syntax", go_quote(part)))?;
        items.push(VModuleItem { file_pattern: pattern.to_string(), verbosity });
    }
    Ok(items)
}

/// Parses one occurrence of a flag's value. `previous` is the current value and `first` says whether this is the
/// first explicit occurrence (list-like flags replace their default first, then accumulate).
fn parse_value(spec: &FlagSpec, raw: &str, previous: &FlagValue, first: bool) -> Result<FlagValue, String> {
    Ok(match spec.kind {
        FlagKind::Bool => FlagValue::Bool(parse_go_bool(raw)?),
        FlagKind::Str | FlagKind::ProxyMode | FlagKind::LocalMode => FlagValue::Str(raw.to_string()),
        FlagKind::SocketLbScope => {
            raw.parse::<proxy_ebpf::SocketLbScope>().map_err(|e| e.to_string())?;
            FlagValue::Str(raw.to_string())
        }
        FlagKind::Ip => {
            if parse_ip_sloppy(raw).is_none() {
                return Err(format!("{} is not a valid IP address", go_quote(raw)));
            }
            FlagValue::Str(raw.to_string())
        }
        FlagKind::IpPort => {
            if !raw.is_empty() && parse_ip_sloppy(raw).is_none() {
                let (host, port) = split_host_port(raw)
                    .map_err(|e| format!("{} is not in a valid format (ip or ip:port): {e}", go_quote(raw)))?;
                if parse_ip_sloppy(&host).is_none() {
                    return Err(format!("{} is not a valid IP address", go_quote(&host)));
                }
                if !matches!(port.parse::<u32>(), Ok(p) if p <= 65535) {
                    return Err(format!("{} is not a valid number", go_quote(&port)));
                }
            }
            FlagValue::Str(raw.to_string())
        }
        FlagKind::Int32 => FlagValue::Int(parse_go_int32(raw)?),
        FlagKind::Float32 => FlagValue::Float(parse_go_float32(raw)?),
        FlagKind::Duration => FlagValue::Duration(GoDuration::parse(raw).map_err(|e| e.to_string())?),
        FlagKind::StringSlice => {
            let new: Vec<String> =
                if raw.is_empty() { Vec::new() } else { raw.split(',').map(str::to_string).collect() };
            match (first, previous) {
                (false, FlagValue::List(old)) => FlagValue::List(old.iter().cloned().chain(new).collect()),
                _ => FlagValue::List(new),
            }
        }
        FlagKind::MapStringBool => {
            let mut map = match (first, previous) {
                (false, FlagValue::Gates(old)) => old.clone(),
                _ => BTreeMap::new(),
            };
            for pair in raw.split(',') {
                if pair.is_empty() {
                    continue;
                }
                let Some((k, v)) = pair.split_once('=') else {
                    return Err(format!("missing bool value for {pair}"));
                };
                let b = parse_go_bool(v.trim()).map_err(|e| format!("invalid value of {k}={v}, err: {e}"))?;
                map.insert(k.trim().to_string(), b);
            }
            FlagValue::Gates(map)
        }
        FlagKind::Level => FlagValue::Level(
            raw.parse::<u32>().map_err(|_| format!("strconv.ParseUint: parsing {}: invalid syntax", go_quote(raw)))?,
        ),
        FlagKind::VModule => {
            let new = parse_vmodule(raw)?;
            match (first, previous) {
                (false, FlagValue::VModule(old)) => FlagValue::VModule(old.iter().cloned().chain(new).collect()),
                _ => FlagValue::VModule(new),
            }
        }
        FlagKind::Quantity => FlagValue::Str(Quantity::parse(raw)?.0),
        FlagKind::PortRange => {
            config::parse_port_range(raw)?;
            FlagValue::Str(raw.to_string())
        }
        FlagKind::Version => FlagValue::Version(match raw {
            "raw" => VersionRequest::Raw,
            v if v.starts_with('v') => {
                let parts: Vec<&str> = v[1..].split(['-', '+']).next().unwrap_or("").split('.').collect();
                if parts.len() != 3 || !parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
                    return Err(format!("invalid version {}: expected vMAJOR.MINOR.PATCH", go_quote(v)));
                }
                VersionRequest::Override(v.to_string())
            }
            other => {
                if parse_go_bool(other)? {
                    VersionRequest::Print
                } else {
                    VersionRequest::No
                }
            }
        }),
    })
}

fn default_value(spec: &FlagSpec) -> FlagValue {
    match spec.kind {
        FlagKind::StringSlice => FlagValue::List(Vec::new()),
        FlagKind::MapStringBool => FlagValue::Gates(BTreeMap::new()),
        FlagKind::VModule => FlagValue::VModule(Vec::new()),
        FlagKind::Version => FlagValue::Version(VersionRequest::No),
        // The table's defaults are valid by construction (checked by a unit test).
        _ => parse_value(spec, spec.default, &FlagValue::Bool(false), true).unwrap_or(FlagValue::Str(String::new())),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------------------------

/// The parsed command line: every flag's value (defaults included), which flags were given explicitly, and the
/// deprecation warnings to print.
#[derive(Clone, Debug)]
pub struct CommandLine {
    values: BTreeMap<&'static str, FlagValue>,
    /// Canonical names of the flags given on the command line.
    pub changed: BTreeSet<&'static str>,
    /// pflag's deprecation notices (`Flag --healthz-port has been deprecated, ...`), one per use; the caller prints
    /// them to stderr (or logs them).
    pub warnings: Vec<String>,
}

/// How the process should end instead of running: exit code plus what to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliExit {
    /// Process exit code (0 for help/version, 1 for errors).
    pub code: i32,
    /// Text for stdout.
    pub stdout: String,
    /// Text for stderr.
    pub stderr: String,
}

impl CliExit {
    fn error(message: &str, with_usage: bool) -> Self {
        // Upstream (component-base cli.Run) prints the usage first and the error last, so the error stays visible.
        let mut stderr = if with_usage { format!("{}\n", usage_text()) } else { String::new() };
        stderr.push_str(&format!("Error: {message}\n"));
        CliExit { code: 1, stdout: String::new(), stderr }
    }
}

/// A bad command line, before help or usage are decided.
#[derive(Debug)]
struct ParseError(String);

impl CommandLine {
    /// A command line with every flag at its default.
    pub fn defaults() -> Self {
        let values = FLAGS.iter().map(|f| (f.name, default_value(f))).collect();
        CommandLine { values, changed: BTreeSet::new(), warnings: Vec::new() }
    }

    /// The value of a flag (its default when not given). Panics on a name that is not in [`FLAGS`], which is a
    /// programming error.
    pub fn value(&self, name: &str) -> &FlagValue {
        self.values.get(name).unwrap_or_else(|| panic!("unknown flag name {name:?}"))
    }

    /// True when the flag was given on the command line.
    pub fn is_set(&self, name: &str) -> bool {
        self.changed.contains(name)
    }

    fn str(&self, name: &str) -> &str {
        match self.value(name) {
            FlagValue::Str(s) => s,
            _ => "",
        }
    }

    fn bool(&self, name: &str) -> bool {
        matches!(self.value(name), FlagValue::Bool(true))
    }

    fn int(&self, name: &str) -> i32 {
        match self.value(name) {
            FlagValue::Int(i) => *i,
            _ => 0,
        }
    }

    fn duration(&self, name: &str) -> GoDuration {
        match self.value(name) {
            FlagValue::Duration(d) => *d,
            _ => GoDuration::ZERO,
        }
    }

    fn list(&self, name: &str) -> Vec<String> {
        match self.value(name) {
            FlagValue::List(l) => l.clone(),
            _ => Vec::new(),
        }
    }

    fn set(&mut self, spec: &'static FlagSpec, raw: &str) -> Result<(), ParseError> {
        let first = !self.changed.contains(spec.name);
        let parsed = parse_value(spec, raw, self.value(spec.name), first).map_err(|e| {
            let shown = match spec.shorthand {
                Some(c) => format!("-{c}, --{}", spec.name),
                None => format!("--{}", spec.name),
            };
            ParseError(format!("invalid argument {} for {} flag: {e}", go_quote(raw), go_quote(&shown)))
        })?;
        self.values.insert(spec.name, parsed);
        self.changed.insert(spec.name);
        if let Some(msg) = spec.deprecated {
            self.warnings.push(format!("Flag --{} has been deprecated, {msg}", spec.name));
        }
        Ok(())
    }

    /// Parses the arguments after the program name with pflag's rules; returns the positional arguments.
    fn parse_args(&mut self, args: &[String]) -> Result<Vec<String>, ParseError> {
        let mut positional = Vec::new();
        let mut i = 0;
        // Every iteration consumes at least one argument.
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            if arg.len() < 2 || !arg.starts_with('-') {
                positional.push(arg.clone());
                continue;
            }
            if arg == "--" {
                positional.extend(args[i..].iter().cloned());
                break;
            }
            if let Some(body) = arg.strip_prefix("--") {
                if body.starts_with('-') || body.starts_with('=') {
                    return Err(ParseError(format!("bad flag syntax: {arg}")));
                }
                let (name, inline) = match body.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (body, None),
                };
                // cliflag.WordSepNormalizeFunc: underscores separate words like dashes.
                let normalized = name.replace('_', "-");
                let Some(spec) = lookup_flag(&normalized) else {
                    return Err(ParseError(format!("unknown flag: --{name}")));
                };
                let value = match (inline, spec.kind.no_opt_default()) {
                    (Some(v), _) => v.to_string(),
                    (None, Some(d)) => d.to_string(),
                    (None, None) if i < args.len() => {
                        i += 1;
                        args[i - 1].clone()
                    }
                    (None, None) => return Err(ParseError(format!("flag needs an argument: {arg}"))),
                };
                self.set(spec, &value)?;
                continue;
            }
            // Shorthand cluster such as -v3, -v=3, -h.
            let shorts = &arg[1..];
            let mut rest = shorts;
            while let Some(c) = rest.chars().next() {
                let after = &rest[c.len_utf8()..];
                let Some(spec) = lookup_shorthand(c) else {
                    return Err(ParseError(format!("unknown shorthand flag: {c:?} in {arg}")));
                };
                let value;
                if let Some(v) = after.strip_prefix('=') {
                    value = v.to_string();
                    rest = "";
                } else if let Some(d) = spec.kind.no_opt_default() {
                    value = d.to_string();
                    rest = after;
                } else if !after.is_empty() {
                    value = after.to_string();
                    rest = "";
                } else if i < args.len() {
                    value = args[i].clone();
                    i += 1;
                    rest = "";
                } else {
                    return Err(ParseError(format!("flag needs an argument: {c:?} in -{c}")));
                }
                self.set(spec, &value)?;
            }
        }
        Ok(positional)
    }

    /// The `--version` request.
    pub fn version_request(&self) -> VersionRequest {
        match self.value("version") {
            FlagValue::Version(v) => v.clone(),
            _ => VersionRequest::No,
        }
    }
}

/// Parses the process arguments (the first item is the program name, as from `std::env::args_os()`).
///
/// `Err(CliExit)` means "do not run": `--help` (code 0, help on stdout), `--version` / `--version=raw` (code 0,
/// version on stdout), or a bad command line (code 1; for flag errors the usage followed by `Error: ...` on stderr,
/// as upstream prints it).
pub fn parse_command_line<I: IntoIterator<Item = OsString>>(args: I) -> Result<CommandLine, CliExit> {
    let mut strings = Vec::new();
    for a in args.into_iter().skip(1) {
        match a.into_string() {
            Ok(s) => strings.push(s),
            Err(bad) => return Err(CliExit::error(&format!("argument {bad:?} is not valid UTF-8"), false)),
        }
    }
    let mut cmd = CommandLine::defaults();
    let positional = match cmd.parse_args(&strings) {
        Ok(p) => p,
        Err(ParseError(msg)) => return Err(CliExit::error(&msg, true)),
    };
    if cmd.bool("help") {
        return Err(CliExit { code: 0, stdout: help_text(), stderr: String::new() });
    }
    // Like upstream, empty positional arguments are tolerated (they come from unset shell variables).
    if positional.iter().any(|a| !a.is_empty()) {
        let msg = format!("\"kube-proxy\" does not take any arguments, got {}", go_quote_list(&positional));
        return Err(CliExit::error(&msg, false));
    }
    match cmd.version_request() {
        VersionRequest::Print => {
            return Err(CliExit {
                code: 0,
                stdout: format!("Kubernetes {}\n", version_string()),
                stderr: String::new(),
            });
        }
        VersionRequest::Raw => {
            let v = version_string();
            let raw = format!(
                "version.Info{{Major:\"1\", Minor:\"{KUBERNETES_MINOR}\", GitVersion:\"{v}\", GitCommit:\"\", \
                 GitTreeState:\"\", BuildDate:\"\", GoVersion:\"\", Compiler:\"rustc\", Platform:\"{}/{}\"}}\n",
                std::env::consts::OS,
                std::env::consts::ARCH
            );
            return Err(CliExit { code: 0, stdout: raw, stderr: String::new() });
        }
        VersionRequest::No | VersionRequest::Override(_) => {}
    }
    Ok(cmd)
}

// ---------------------------------------------------------------------------------------------------------------
// Help
// ---------------------------------------------------------------------------------------------------------------

const LONG_DESCRIPTION: &str = "The Kubernetes network proxy runs on every node. It watches Services and \
EndpointSlices in the\nKubernetes API and programs the node so that connections to a Service's cluster IP, node \
ports,\nexternal IPs and load-balancer IPs reach one of its endpoints. kube-proxy-rs takes the same flags and\n\
configuration file as the upstream kube-proxy and adds an eBPF datapath, its default mode.";

/// The flag list as pflag formats it: sorted, aligned, defaults appended, deprecated flags hidden.
pub fn flag_usages() -> String {
    let mut lines = Vec::new();
    for f in FLAGS.iter().filter(|f| f.deprecated.is_none()) {
        let mut line = match f.shorthand {
            Some(c) => format!("  -{c}, --{}", f.name),
            None => format!("      --{}", f.name),
        };
        let type_name = f.kind.type_name();
        if !type_name.is_empty() {
            line.push(' ');
            line.push_str(type_name);
        }
        if f.kind == FlagKind::Version {
            line.push_str("[=true]");
        }
        let mut usage = f.usage.to_string();
        if !matches!(f.default, "" | "0" | "0s" | "false" | "[]") {
            if matches!(f.kind, FlagKind::Str) {
                usage.push_str(&format!(" (default {})", go_quote(f.default)));
            } else {
                usage.push_str(&format!(" (default {})", f.default));
            }
        }
        lines.push((line, usage));
    }
    // pflag's column: the longest name part plus one (its sentinel), then two separating spaces.
    let max = lines.iter().map(|(l, _)| l.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (line, usage) in lines {
        let pad = " ".repeat(max - line.len());
        let indented = usage.replace('\n', &format!("\n{}", " ".repeat(max + 2)));
        out.push_str(&format!("{line} {pad} {indented}\n"));
    }
    out
}

/// cobra's usage text (`Usage:` line plus the flag list), printed on stderr before flag errors.
pub fn usage_text() -> String {
    let flags = flag_usages();
    format!("Usage:\n  kube-proxy [flags]\n\nFlags:\n{}\n", flags.trim_end())
}

/// The `--help` text: description then usage.
pub fn help_text() -> String {
    format!("{LONG_DESCRIPTION}\n\n{}", usage_text())
}

// ---------------------------------------------------------------------------------------------------------------
// Resolution into the run configuration
// ---------------------------------------------------------------------------------------------------------------

/// Everything the wiring needs, after flags, config file, defaulting, precedence and validation.
#[derive(Clone, Debug)]
pub struct ProxyRunConfig {
    /// The effective configuration (v1alpha1 form, defaulted, validated; `mode` may still be "").
    pub config: KubeProxyConfiguration,
    /// The effective proxy mode ("" resolved to ebpf).
    pub mode: ProxyMode,
    /// The node name: `hostnameOverride` trimmed and lower-cased, else the OS host name lower-cased.
    pub hostname: String,
    /// `--master`, if given.
    pub master: Option<String>,
    /// `--cleanup`.
    pub cleanup: bool,
    /// `--init-only`.
    pub init_only: bool,
    /// `--write-config-to`, if given: write [`KubeProxyConfiguration::to_yaml`] there and exit.
    pub write_config_to: Option<PathBuf>,
    /// `--config`, if given (the wiring should exit when this file changes, as upstream does).
    pub config_file: Option<PathBuf>,
    /// `--cgroup-root`; None means "detect the cgroup2 mount".
    pub cgroup_root: Option<PathBuf>,
    /// `--bpffs-root`.
    pub bpffs_root: PathBuf,
    /// `--socket-lb-scope`.
    pub socket_lb_scope: proxy_ebpf::SocketLbScope,
    /// Effective log verbosity (`logging.verbosity`).
    pub verbosity: u32,
    /// Effective per-file verbosity (`logging.vmodule`).
    pub vmodule: Vec<VModuleItem>,
    /// Effective log format (`text` or `json`).
    pub logging_format: String,
    /// Effective feature gates.
    pub feature_gates: BTreeMap<String, bool>,
    /// `--version=vX.Y.Z`, if given.
    pub version_override: Option<String>,
    /// The strict-decoding error when the config file was decoded leniently.
    pub lenient_decoding_error: Option<String>,
}

impl ProxyRunConfig {
    /// Longest time between full syncs for the mode.
    pub fn sync_period(&self) -> Duration {
        self.config.mode_settings().0.to_std()
    }

    /// Least time between syncs for the mode.
    pub fn min_sync_period(&self) -> Duration {
        self.config.mode_settings().1.to_std()
    }

    /// Whether all cluster-IP traffic is masqueraded in this mode.
    pub fn masquerade_all(&self) -> bool {
        self.config.mode_settings().2
    }

    /// The mode's masquerade mark bit.
    pub fn masquerade_bit(&self) -> i32 {
        self.config.masquerade_bit()
    }

    /// Informer resync period.
    pub fn config_sync_period(&self) -> Duration {
        self.config.config_sync_period.to_std()
    }

    /// Parsed `clusterCIDR` (empty when unset).
    pub fn cluster_cidrs(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.config.cluster_cidrs()
    }

    /// Effective local-traffic detection mode.
    pub fn detect_local_mode(&self) -> LocalMode {
        self.config.local_mode().unwrap_or(LocalMode::ClusterCidr)
    }

    /// Healthz server address; None when disabled.
    pub fn healthz_bind_address(&self) -> Option<SocketAddr> {
        self.config.healthz_socket_addr()
    }

    /// Metrics server address; None when disabled.
    pub fn metrics_bind_address(&self) -> Option<SocketAddr> {
        self.config.metrics_socket_addr()
    }

    /// Effective `nodePortAddresses` (CIDRs, or `["primary"]`; empty = all local IPs).
    pub fn node_port_addresses(&self) -> Vec<String> {
        self.config.effective_node_port_addresses()
    }

    /// Feature gates set in the configuration that kube-proxy-rs does not know (upstream would reject them; we
    /// accept them, and [`resolve`] logs each once).
    pub fn unknown_feature_gates(&self) -> Vec<&str> {
        self.feature_gates.keys().map(String::as_str).filter(|g| !KNOWN_FEATURE_GATES.contains(g)).collect()
    }

    /// The `/configz` body.
    pub fn configz_json(&self) -> serde_json::Value {
        self.config.configz_json()
    }
}

fn non_empty_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// upstream `addressFromDeprecatedFlags`: port 0 disables the server, otherwise a bare IP gets the port.
fn address_from_deprecated_flags(addr: &str, port: i32) -> String {
    if port == 0 {
        return String::new();
    }
    append_port_if_needed(addr, u16::try_from(port).unwrap_or(0))
}

impl CommandLine {
    /// The configuration the flags describe when there is no `--config`: the defaults overridden by every flag,
    /// the sync-period flags applied to the section of the selected mode (iptables flags for every mode but ipvs),
    /// and, unless `--write-config-to` is set, the deprecated `--healthz-port` / `--metrics-port` folded in.
    pub fn config_from_flags(&self) -> KubeProxyConfiguration {
        let mut c = KubeProxyConfiguration::defaulted();
        c.feature_gates = match self.value("feature-gates") {
            FlagValue::Gates(g) => g.clone(),
            _ => BTreeMap::new(),
        };
        c.client_connection.kubeconfig = self.str("kubeconfig").to_string();
        c.client_connection.content_type = self.str("kube-api-content-type").to_string();
        c.client_connection.burst = self.int("kube-api-burst");
        if let FlagValue::Float(q) = self.value("kube-api-qps") {
            c.client_connection.qps = *q;
        }
        c.bind_address = self.str("bind-address").to_string();
        c.healthz_bind_address = self.str("healthz-bind-address").to_string();
        c.metrics_bind_address = self.str("metrics-bind-address").to_string();
        c.bind_address_hard_fail = self.bool("bind-address-hard-fail");
        c.enable_profiling = self.bool("profiling");
        c.show_hidden_metrics_for_version = self.str("show-hidden-metrics-for-version").to_string();
        c.mode = self.str("proxy-mode").to_string();
        c.iptables.masquerade_bit = Some(self.int("iptables-masquerade-bit"));
        // Upstream keeps one internal masqueradeAll that converts back into both sections.
        c.iptables.masquerade_all = self.bool("masquerade-all");
        c.nftables.masquerade_all = self.bool("masquerade-all");
        c.iptables.localhost_node_ports = Some(self.bool("iptables-localhost-nodeports"));
        c.ipvs.scheduler = self.str("ipvs-scheduler").to_string();
        let exclude = self.list("ipvs-exclude-cidrs");
        c.ipvs.exclude_cidrs = (!exclude.is_empty()).then_some(exclude);
        c.ipvs.strict_arp = self.bool("ipvs-strict-arp");
        c.ipvs.tcp_timeout = self.duration("ipvs-tcp-timeout");
        c.ipvs.tcp_fin_timeout = self.duration("ipvs-tcpfin-timeout");
        c.ipvs.udp_timeout = self.duration("ipvs-udp-timeout");
        c.detect_local_mode = self.str("detect-local-mode").to_string();
        c.detect_local.bridge_interface = self.str("pod-bridge-interface").to_string();
        c.detect_local.interface_name_prefix = self.str("pod-interface-name-prefix").to_string();
        c.cluster_cidr = self.str("cluster-cidr").to_string();
        let npa = self.list("nodeport-addresses");
        c.node_port_addresses = (!npa.is_empty()).then_some(npa);
        c.oom_score_adj = Some(self.int("oom-score-adj"));
        c.conntrack.max_per_core = Some(self.int("conntrack-max-per-core"));
        c.conntrack.min = Some(self.int("conntrack-min"));
        c.conntrack.tcp_established_timeout = Some(self.duration("conntrack-tcp-timeout-established"));
        c.conntrack.tcp_close_wait_timeout = Some(self.duration("conntrack-tcp-timeout-close-wait"));
        c.conntrack.tcp_be_liberal = self.bool("conntrack-tcp-be-liberal");
        c.conntrack.udp_timeout = self.duration("conntrack-udp-timeout");
        c.conntrack.udp_stream_timeout = self.duration("conntrack-udp-timeout-stream");
        c.config_sync_period = self.duration("config-sync-period");
        c.port_range = self.str("proxy-port-range").to_string();
        self.apply_logging_flags(&mut c, false);

        // Upstream's internal config has one sync/min-sync pair, defaulted from the iptables section (30s/1s);
        // the flags of the selected mode's family override it and it lands in that mode's section.
        let is_ipvs = c.mode == "ipvs";
        let (sync_flag, min_flag) = if is_ipvs {
            ("ipvs-sync-period", "ipvs-min-sync-period")
        } else {
            ("iptables-sync-period", "iptables-min-sync-period")
        };
        let mut sync = GoDuration::from_secs(30);
        let mut min_sync = GoDuration::from_secs(1);
        if self.is_set(sync_flag) {
            sync = self.duration(sync_flag);
        }
        if self.is_set(min_flag) {
            min_sync = self.duration(min_flag);
        }
        match c.mode.as_str() {
            "ipvs" => (c.ipvs.sync_period, c.ipvs.min_sync_period) = (sync, min_sync),
            "nftables" => (c.nftables.sync_period, c.nftables.min_sync_period) = (sync, min_sync),
            _ => (c.iptables.sync_period, c.iptables.min_sync_period) = (sync, min_sync),
        }

        if self.str("write-config-to").is_empty() {
            c.healthz_bind_address = address_from_deprecated_flags(&c.healthz_bind_address, self.int("healthz-port"));
            c.metrics_bind_address = address_from_deprecated_flags(&c.metrics_bind_address, self.int("metrics-port"));
        }
        c
    }

    /// Copies logging flags into `c.logging`: all of them (`only_changed == false`), or only those given on the
    /// command line, which then win over the config file (`--vmodule` entries go before the file's).
    fn apply_logging_flags(&self, c: &mut KubeProxyConfiguration, only_changed: bool) {
        let take = |name: &str| !only_changed || self.is_set(name);
        if take("v")
            && let FlagValue::Level(v) = self.value("v")
        {
            c.logging.verbosity = *v;
        }
        if take("vmodule")
            && let FlagValue::VModule(items) = self.value("vmodule")
        {
            let file_items = if only_changed { std::mem::take(&mut c.logging.vmodule) } else { Vec::new() };
            c.logging.vmodule = items.iter().cloned().chain(file_items).collect();
        }
        if take("logging-format") {
            c.logging.format = self.str("logging-format").to_string();
        }
        if take("log-flush-frequency") {
            c.logging.flush_frequency = self.duration("log-flush-frequency");
        }
        if take("log-json-split-stream") {
            c.logging.options.json.split_stream = self.bool("log-json-split-stream");
        }
        if take("log-text-split-stream") {
            c.logging.options.text.split_stream = self.bool("log-text-split-stream");
        }
        if take("log-json-info-buffer-size") {
            c.logging.options.json.info_buffer_size = Quantity(self.str("log-json-info-buffer-size").to_string());
        }
        if take("log-text-info-buffer-size") {
            c.logging.options.text.info_buffer_size = Quantity(self.str("log-text-info-buffer-size").to_string());
        }
    }
}

/// The OS host name (Linux reads it from /proc like Go's `os.Hostname`, falling back to `gethostname(2)`).
pub fn os_hostname() -> Result<String, String> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        return Ok(s.trim_end_matches('\n').to_string());
    }
    nix::unistd::gethostname()
        .map_err(|e| format!("couldn't determine hostname: {e}"))?
        .into_string()
        .map_err(|s| format!("couldn't determine hostname: {s:?} is not valid UTF-8"))
}

/// upstream `nodeutil.GetHostname`: the override, else the OS host name; trimmed, lower-cased, never empty.
pub fn resolve_hostname(
    hostname_override: &str,
    os_hostname: impl FnOnce() -> Result<String, String>,
) -> Result<String, ConfigError> {
    let name = if hostname_override.is_empty() {
        os_hostname().map_err(ConfigError::Hostname)?
    } else {
        hostname_override.to_string()
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(ConfigError::Hostname("empty hostname is invalid".into()));
    }
    Ok(name.to_lowercase())
}

/// Turns a parsed command line into the run configuration: loads `--config` (which then replaces every non-logging
/// flag; logging flags given on the command line still win), applies `--hostname-override`, validates, and
/// resolves the node name from the OS.
pub fn resolve(cmd: CommandLine) -> Result<ProxyRunConfig, ConfigError> {
    resolve_with_hostname(cmd, os_hostname)
}

/// [`resolve`] with the OS host name lookup supplied by the caller (for tests).
pub fn resolve_with_hostname(
    cmd: CommandLine,
    os_hostname: impl FnOnce() -> Result<String, String>,
) -> Result<ProxyRunConfig, ConfigError> {
    let config_file = non_empty_path(cmd.str("config"));
    let mut lenient_decoding_error = None;
    let mut cfg = match &config_file {
        Some(path) => {
            let decoded = config::load_config_file(path)?;
            lenient_decoding_error = decoded.strict_error;
            let mut c = decoded.config;
            cmd.apply_logging_flags(&mut c, true);
            c
        }
        None => cmd.config_from_flags(),
    };

    let override_flag = cmd.str("hostname-override");
    if !override_flag.is_empty() {
        let trimmed = override_flag.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::EmptyHostnameOverride);
        }
        cfg.hostname_override = trimmed.to_lowercase();
    }

    config::validate(&cfg)?;

    for gate in cfg.feature_gates.keys() {
        if !KNOWN_FEATURE_GATES.contains(&gate.as_str()) {
            tracing::warn!(gate = %gate, "Unrecognized feature gate; kube-proxy-rs does not use it");
        }
    }

    let hostname = resolve_hostname(&cfg.hostname_override, os_hostname)?;
    let mode = cfg.proxy_mode().unwrap_or(ProxyMode::Ebpf);
    let version_override = match cmd.version_request() {
        VersionRequest::Override(v) => Some(v),
        _ => None,
    };
    Ok(ProxyRunConfig {
        mode,
        hostname,
        master: Some(cmd.str("master").to_string()).filter(|s| !s.is_empty()),
        cleanup: cmd.bool("cleanup"),
        init_only: cmd.bool("init-only"),
        write_config_to: non_empty_path(cmd.str("write-config-to")),
        config_file,
        cgroup_root: non_empty_path(cmd.str("cgroup-root")),
        bpffs_root: PathBuf::from(cmd.str("bpffs-root")),
        // Checked when the flag was parsed.
        socket_lb_scope: cmd.str("socket-lb-scope").parse().unwrap_or_default(),
        verbosity: cfg.logging.verbosity,
        vmodule: cfg.logging.vmodule.clone(),
        logging_format: cfg.logging.format.clone(),
        feature_gates: cfg.feature_gates.clone(),
        version_override,
        lenient_decoding_error,
        config: cfg,
    })
}

/// Feature gates kube-proxy-rs knows by name; others are accepted with a warning.
pub const KNOWN_FEATURE_GATES: &[&str] =
    &["AllAlpha", "AllBeta", "KubeProxyNFTablesLocalhostNodePorts", "LoggingAlphaOptions", "LoggingBetaOptions"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_table_is_sorted_unique_and_defaults_parse() {
        let names: Vec<&str> = FLAGS.iter().map(|f| f.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        for f in FLAGS {
            if matches!(f.kind, FlagKind::StringSlice | FlagKind::MapStringBool | FlagKind::VModule | FlagKind::Version)
            {
                continue;
            }
            assert!(parse_value(f, f.default, &FlagValue::Bool(false), true).is_ok(), "default of --{}", f.name);
        }
    }

    #[test]
    fn go_int_parsing() {
        assert_eq!(parse_go_int32("14"), Ok(14));
        assert_eq!(parse_go_int32("-999"), Ok(-999));
        assert_eq!(parse_go_int32("0x10"), Ok(16));
        assert_eq!(parse_go_int32("010"), Ok(8));
        assert_eq!(parse_go_int32("abc").unwrap_err(), "strconv.ParseInt: parsing \"abc\": invalid syntax");
        assert_eq!(
            parse_go_int32("99999999999").unwrap_err(),
            "strconv.ParseInt: parsing \"99999999999\": value out of range"
        );
    }

    #[test]
    fn go_bool_parsing() {
        assert_eq!(parse_go_bool("T"), Ok(true));
        assert_eq!(parse_go_bool("0"), Ok(false));
        assert_eq!(parse_go_bool("yes").unwrap_err(), "strconv.ParseBool: parsing \"yes\": invalid syntax");
    }

    #[test]
    fn socket_lb_scope_flag() {
        let spec = FLAGS.iter().find(|f| f.name == "socket-lb-scope").expect("flag");
        let prev = FlagValue::Str(String::new());
        for v in ["all", "opt-out", "host-only"] {
            assert!(matches!(parse_value(spec, v, &prev, true), Ok(FlagValue::Str(s)) if s == v));
        }
        let err = parse_value(spec, "hostonly", &prev, true).unwrap_err();
        assert!(err.contains("\"hostonly\"") && err.contains("host-only"), "{err}");
        let run = |args: &[&str]| {
            let argv = std::iter::once("kube-proxy").chain(args.iter().copied()).map(OsString::from);
            let cmd = parse_command_line(argv).map_err(|_| "parse").unwrap();
            resolve_with_hostname(cmd, || Ok("n".into())).unwrap().socket_lb_scope
        };
        assert_eq!(run(&[]), proxy_ebpf::SocketLbScope::All);
        assert_eq!(run(&["--socket-lb-scope=host-only"]), proxy_ebpf::SocketLbScope::HostOnly);
        assert_eq!(run(&["--socket-lb-scope", "opt-out"]), proxy_ebpf::SocketLbScope::OptOut);
    }

    #[test]
    fn hostname_resolution() {
        assert_eq!(resolve_hostname("", || Ok("Node-A\n".into())).unwrap(), "node-a");
        assert_eq!(resolve_hostname(" MyNode ", || Err("unused".into())).unwrap(), "mynode");
        assert_eq!(resolve_hostname("", || Ok("  ".into())).unwrap_err().to_string(), "empty hostname is invalid");
    }
}
