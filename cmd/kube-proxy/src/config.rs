//! The `KubeProxyConfiguration` file (`kubeproxy.config.k8s.io/v1alpha1`): types with upstream's JSON field names,
//! Go durations, defaulting, strict-then-lenient loading, validation with upstream's messages and YAML writing in
//! the canonical form `kube-proxy --write-config-to` produces.
//!
//! The struct keeps the external (v1alpha1) shape exactly as read or defaulted, so writing it back gives the same
//! file; platform defaults that upstream applies later (`mode: ""` means our best mode, `detectLocalMode: ""` means
//! `ClusterCIDR`, nftables without `nodePortAddresses` means `primary`) are exposed through accessor methods.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// The only `apiVersion` a configuration file may have.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The only `kind` a configuration file may have.
pub const KIND: &str = "KubeProxyConfiguration";
/// API group of the configuration; the key under which `/configz` serves it.
pub const GROUP_NAME: &str = "kubeproxy.config.k8s.io";
/// Default port of the proxier health server (`ports.ProxyHealthzPort`).
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;
/// Default port of the metrics server (`ports.ProxyStatusPort`).
pub const DEFAULT_METRICS_PORT: u16 = 10249;
/// Default OOM score adjustment of the process (`qos.KubeProxyOOMScoreAdj`).
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -999;
/// Default content type for requests to the API server.
pub const DEFAULT_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// The Kubernetes minor release whose kube-proxy we mirror; `showHiddenMetricsForVersion` must be the one before.
pub const KUBERNETES_MINOR: u32 = 37;
/// The keyword in `nodePortAddresses` meaning "the node's primary IPs".
pub const NODE_PORT_ADDRESSES_PRIMARY: &str = "primary";

const NANOS_PER_SECOND: i64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------------------------
// Go durations
// ---------------------------------------------------------------------------------------------------------------

/// A Go `time.Duration` (signed nanoseconds), parsed with Go's `time.ParseDuration` syntax (`1m30s`, `500ms`, `0`)
/// and printed like Go's `Duration.String()` (`1m30s`, `1h0m0s`, `0s`, `1.5s`). Serialised as that string, which is
/// what `metav1.Duration` does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(pub i64);

/// A string that is not a Go duration; the message is Go's and quotes the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationParseError(String);

impl GoDuration {
    /// The zero duration.
    pub const ZERO: GoDuration = GoDuration(0);

    /// A duration of `n` nanoseconds.
    pub const fn from_nanos(n: i64) -> Self {
        GoDuration(n)
    }

    /// A duration of `s` whole seconds.
    pub const fn from_secs(s: i64) -> Self {
        GoDuration(s * NANOS_PER_SECOND)
    }

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: i64) -> Self {
        GoDuration(ms * 1_000_000)
    }

    /// The length in nanoseconds.
    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// True for the zero duration (upstream's "unset").
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The duration as a `std::time::Duration`; negative durations clamp to zero.
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_nanos(u64::try_from(self.0).unwrap_or(0))
    }

    /// Parses Go's duration syntax: an optional sign, then one or more decimal numbers (with optional fraction)
    /// each followed by a unit (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`); a bare `0` is also accepted.
    pub fn parse(input: &str) -> Result<Self, DurationParseError> {
        let invalid = || DurationParseError(format!("time: invalid duration {}", go_quote(input)));
        let mut rest = input;
        let mut negative = false;
        if let Some(stripped) = rest.strip_prefix('-') {
            negative = true;
            rest = stripped;
        } else if let Some(stripped) = rest.strip_prefix('+') {
            rest = stripped;
        }
        if rest == "0" {
            return Ok(GoDuration(0));
        }
        if rest.is_empty() {
            return Err(invalid());
        }
        const LIMIT: u64 = 1 << 63;
        let mut total: u64 = 0;
        // Each iteration consumes at least one character, so the loop is bounded by the input length.
        while !rest.is_empty() {
            let first = rest.as_bytes()[0];
            if !(first == b'.' || first.is_ascii_digit()) {
                return Err(invalid());
            }
            // Integer part.
            let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let mut value: u64 = 0;
            for b in rest[..int_len].bytes() {
                value = value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    .filter(|v| *v <= LIMIT)
                    .ok_or_else(invalid)?;
            }
            let had_int = int_len > 0;
            rest = &rest[int_len..];
            // Fraction: digits past what fits are ignored, as Go does.
            let mut frac: u64 = 0;
            let mut scale: f64 = 1.0;
            let mut had_frac = false;
            if let Some(after_dot) = rest.strip_prefix('.') {
                let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                let mut overflowed = false;
                for b in after_dot[..frac_len].bytes() {
                    if overflowed {
                        continue;
                    }
                    match frac.checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0'))) {
                        Some(v) if v <= LIMIT => {
                            frac = v;
                            scale *= 10.0;
                        }
                        _ => overflowed = true,
                    }
                }
                had_frac = frac_len > 0;
                rest = &after_dot[frac_len..];
            }
            if !had_int && !had_frac {
                return Err(invalid());
            }
            let unit_len = rest.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(rest.len());
            if unit_len == 0 {
                return Err(DurationParseError(format!("time: missing unit in duration {}", go_quote(input))));
            }
            let unit_str = &rest[..unit_len];
            rest = &rest[unit_len..];
            let unit: u64 = match unit_str {
                "ns" => 1,
                "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60 * 1_000_000_000,
                "h" => 3600 * 1_000_000_000,
                _ => {
                    return Err(DurationParseError(format!(
                        "time: unknown unit {} in duration {}",
                        go_quote(unit_str),
                        go_quote(input)
                    )));
                }
            };
            if value > LIMIT / unit {
                return Err(invalid());
            }
            value *= unit;
            if frac > 0 {
                value += (frac as f64 * (unit as f64 / scale)) as u64;
                if value > LIMIT {
                    return Err(invalid());
                }
            }
            total = total.checked_add(value).filter(|v| *v <= LIMIT).ok_or_else(invalid)?;
        }
        if negative {
            return Ok(GoDuration((-(total as i128)) as i64));
        }
        if total > i64::MAX as u64 {
            return Err(invalid());
        }
        Ok(GoDuration(total as i64))
    }
}

/// Formats `v / 10^prec` fraction digits as `.ddd` without trailing zeros (nothing when the fraction is zero) and
/// returns the remaining integer part.
fn split_fraction(v: u64, prec: u32) -> (u64, String) {
    let pow = 10u64.pow(prec);
    let frac = v % pow;
    if frac == 0 {
        return (v / pow, String::new());
    }
    let digits = format!("{:0width$}", frac, width = prec as usize);
    (v / pow, format!(".{}", digits.trim_end_matches('0')))
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let negative = self.0 < 0;
        let u = self.0.unsigned_abs();
        let body = if u == 0 {
            "0s".to_string()
        } else if u < NANOS_PER_SECOND as u64 {
            // Below a second Go switches to the largest sub-second unit that keeps an integer part.
            let (prec, unit) = if u < 1_000 {
                (0, "ns")
            } else if u < 1_000_000 {
                (3, "\u{b5}s")
            } else {
                (6, "ms")
            };
            let (int, frac) = split_fraction(u, prec);
            format!("{int}{frac}{unit}")
        } else {
            let (secs_total, frac) = split_fraction(u, 9);
            let secs = secs_total % 60;
            let mins_total = secs_total / 60;
            if mins_total == 0 {
                format!("{secs}{frac}s")
            } else if mins_total < 60 {
                format!("{mins_total}m{secs}{frac}s")
            } else {
                format!("{}h{}m{secs}{frac}s", mins_total / 60, mins_total % 60)
            }
        };
        if negative { write!(f, "-{body}") } else { f.write_str(&body) }
    }
}

impl FromStr for GoDuration {
    type Err = DurationParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GoDuration::parse(s)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // metav1.Duration only accepts a JSON string.
        let s = String::deserialize(deserializer)?;
        GoDuration::parse(&s).map_err(de::Error::custom)
    }
}

/// component-base's `TimeOrMetaDuration` (logging `flushFrequency`): a duration string or a number of nanoseconds.
fn de_time_or_meta_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<GoDuration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Nanos(i64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Nanos(n) => Ok(GoDuration(n)),
        Raw::Text(s) => GoDuration::parse(&s).map_err(de::Error::custom),
    }
}

pub use proxier::gofmt::go_quote;

/// Formats a list of strings like Go's `%q` of a `[]string`: `["a" "b"]`.
pub fn go_quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", quoted.join(" "))
}

// ---------------------------------------------------------------------------------------------------------------
// Types (field order = JSON key order of the canonical YAML, i.e. sorted)
// ---------------------------------------------------------------------------------------------------------------

/// `KubeProxyConfiguration` in its external `v1alpha1` form. Zero values mean "unset" until [`Self::set_defaults`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubeProxyConfiguration {
    /// Must be [`API_VERSION`].
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Overrides the node's primary IP as kube-proxy sees it; `0.0.0.0` / `::` mean "use the Node object".
    #[serde(rename = "bindAddress")]
    pub bind_address: String,
    /// Treat failure to bind the healthz / metrics / health-check ports as fatal.
    #[serde(rename = "bindAddressHardFail")]
    pub bind_address_hard_fail: bool,
    /// How to talk to the API server.
    #[serde(rename = "clientConnection")]
    pub client_connection: ClientConnectionConfiguration,
    /// Pod CIDR(s) of the cluster, comma-separated (at most a dual-stack pair).
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    /// Informer resync period.
    #[serde(rename = "configSyncPeriod")]
    pub config_sync_period: GoDuration,
    /// Conntrack sysctls.
    pub conntrack: KubeProxyConntrackConfiguration,
    /// Parameters of the interface-based local traffic detectors.
    #[serde(rename = "detectLocal")]
    pub detect_local: DetectLocalConfiguration,
    /// How to tell cluster-local traffic (`ClusterCIDR`, `NodeCIDR`, `BridgeInterface`, `InterfaceNamePrefix`).
    #[serde(rename = "detectLocalMode")]
    pub detect_local_mode: String,
    /// Serve `/debug/pprof` on the metrics server.
    #[serde(rename = "enableProfiling")]
    pub enable_profiling: bool,
    /// Feature gates by name.
    #[serde(rename = "featureGates", skip_serializing_if = "BTreeMap::is_empty")]
    pub feature_gates: BTreeMap<String, bool>,
    /// `ip:port` of the proxier health server; empty disables it.
    #[serde(rename = "healthzBindAddress")]
    pub healthz_bind_address: String,
    /// Node name to use instead of the host name.
    #[serde(rename = "hostnameOverride")]
    pub hostname_override: String,
    /// iptables mode settings (also used by ebpf mode and, for the mark bit, by ipvs mode).
    pub iptables: KubeProxyIPTablesConfiguration,
    /// IPVS mode settings.
    pub ipvs: KubeProxyIPVSConfiguration,
    /// Must be [`KIND`].
    pub kind: String,
    /// component-base logging configuration.
    pub logging: LoggingConfiguration,
    /// `ip:port` of the metrics server; empty disables it.
    #[serde(rename = "metricsBindAddress")]
    pub metrics_bind_address: String,
    /// Proxy mode: `ebpf` (ours, the default for ""), `iptables`, `ipvs`, `nftables`.
    pub mode: String,
    /// nftables mode settings.
    pub nftables: KubeProxyNFTablesConfiguration,
    /// CIDRs (or the keyword `primary`) of node IPs that accept NodePort traffic; null means all local IPs.
    #[serde(rename = "nodePortAddresses")]
    pub node_port_addresses: Option<Vec<String>>,
    /// OOM score adjustment of the process, [-1000, 1000].
    #[serde(rename = "oomScoreAdj")]
    pub oom_score_adj: Option<i32>,
    /// Unused (was the userspace proxy's port range); must parse as a port range.
    #[serde(rename = "portRange")]
    pub port_range: String,
    /// Previous minor version whose hidden metrics to show.
    #[serde(rename = "showHiddenMetricsForVersion")]
    pub show_hidden_metrics_for_version: String,
    /// Windows only; kept so Windows files load.
    #[serde(rename = "windowsRunAsService", skip_serializing_if = "is_false")]
    pub windows_run_as_service: bool,
    /// Windows only; kept so Windows files load.
    pub winkernel: KubeProxyWinkernelConfiguration,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `clientConnection` (component-base `ClientConnectionConfiguration`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientConnectionConfiguration {
    /// `Accept` header for API requests.
    #[serde(rename = "acceptContentTypes")]
    pub accept_content_types: String,
    /// Burst of the client-side rate limiter.
    pub burst: i32,
    /// Content type of API requests.
    #[serde(rename = "contentType")]
    pub content_type: String,
    /// Path to a kubeconfig; empty means in-cluster config (unless `--master` is set).
    pub kubeconfig: String,
    /// Queries per second of the client-side rate limiter.
    #[serde(serialize_with = "ser_float32")]
    pub qps: f32,
}

/// Serialises a Go float32 the way Go's JSON does: integral values without a fraction, others in their shortest
/// decimal form (so `0.1` stays `0.1` instead of the widened `0.10000000149011612`).
fn ser_float32<S: Serializer>(v: &f32, serializer: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        serializer.serialize_i64(*v as i64)
    } else {
        let widened: f64 = v.to_string().parse().unwrap_or(f64::from(*v));
        serializer.serialize_f64(widened)
    }
}

/// `conntrack` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubeProxyConntrackConfiguration {
    /// Conntrack entries per CPU; 0 leaves the limit alone.
    #[serde(rename = "maxPerCore")]
    pub max_per_core: Option<i32>,
    /// Minimum conntrack entries regardless of `maxPerCore`.
    pub min: Option<i32>,
    /// Set `nf_conntrack_tcp_be_liberal`.
    #[serde(rename = "tcpBeLiberal")]
    pub tcp_be_liberal: bool,
    /// `nf_conntrack_tcp_timeout_close_wait`.
    #[serde(rename = "tcpCloseWaitTimeout")]
    pub tcp_close_wait_timeout: Option<GoDuration>,
    /// `nf_conntrack_tcp_timeout_established`.
    #[serde(rename = "tcpEstablishedTimeout")]
    pub tcp_established_timeout: Option<GoDuration>,
    /// `nf_conntrack_udp_timeout_stream` (0 leaves it alone).
    #[serde(rename = "udpStreamTimeout")]
    pub udp_stream_timeout: GoDuration,
    /// `nf_conntrack_udp_timeout` (0 leaves it alone).
    #[serde(rename = "udpTimeout")]
    pub udp_timeout: GoDuration,
}

/// `detectLocal` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DetectLocalConfiguration {
    /// Bridge whose traffic is local in `BridgeInterface` mode.
    #[serde(rename = "bridgeInterface")]
    pub bridge_interface: String,
    /// Interface name prefix whose traffic is local in `InterfaceNamePrefix` mode.
    #[serde(rename = "interfaceNamePrefix")]
    pub interface_name_prefix: String,
}

/// `iptables` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubeProxyIPTablesConfiguration {
    /// Allow NodePorts on localhost (iptables, IPv4).
    #[serde(rename = "localhostNodePorts")]
    pub localhost_node_ports: Option<bool>,
    /// SNAT all traffic to cluster IPs.
    #[serde(rename = "masqueradeAll")]
    pub masquerade_all: bool,
    /// fwmark bit for packets needing SNAT, [0, 31].
    #[serde(rename = "masqueradeBit")]
    pub masquerade_bit: Option<i32>,
    /// Minimum time between syncs.
    #[serde(rename = "minSyncPeriod")]
    pub min_sync_period: GoDuration,
    /// Maximum time between full syncs.
    #[serde(rename = "syncPeriod")]
    pub sync_period: GoDuration,
}

/// `ipvs` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubeProxyIPVSConfiguration {
    /// CIDRs the IPVS proxier leaves alone when cleaning up.
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    /// Minimum time between syncs.
    #[serde(rename = "minSyncPeriod")]
    pub min_sync_period: GoDuration,
    /// IPVS scheduler ("" = rr).
    pub scheduler: String,
    /// Set `arp_ignore=1` / `arp_announce=2`.
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    /// Maximum time between full syncs.
    #[serde(rename = "syncPeriod")]
    pub sync_period: GoDuration,
    /// IPVS TCP FIN timeout (0 leaves it alone).
    #[serde(rename = "tcpFinTimeout")]
    pub tcp_fin_timeout: GoDuration,
    /// IPVS TCP timeout (0 leaves it alone).
    #[serde(rename = "tcpTimeout")]
    pub tcp_timeout: GoDuration,
    /// IPVS UDP timeout (0 leaves it alone).
    #[serde(rename = "udpTimeout")]
    pub udp_timeout: GoDuration,
}

/// `nftables` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubeProxyNFTablesConfiguration {
    /// SNAT all traffic to cluster IPs.
    #[serde(rename = "masqueradeAll")]
    pub masquerade_all: bool,
    /// Mark bit for packets needing SNAT, [0, 31].
    #[serde(rename = "masqueradeBit")]
    pub masquerade_bit: Option<i32>,
    /// Minimum time between syncs.
    #[serde(rename = "minSyncPeriod")]
    pub min_sync_period: GoDuration,
    /// Maximum time between full syncs.
    #[serde(rename = "syncPeriod")]
    pub sync_period: GoDuration,
}

/// `winkernel` settings (Windows only; carried so such files load and write back unchanged).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubeProxyWinkernelConfiguration {
    /// Direct server return.
    #[serde(rename = "enableDSR")]
    pub enable_dsr: bool,
    /// Forward the health-check VIP.
    #[serde(rename = "forwardHealthCheckVip")]
    pub forward_health_check_vip: bool,
    /// HNS network name.
    #[serde(rename = "networkName")]
    pub network_name: String,
    /// HNS root endpoint name.
    #[serde(rename = "rootHnsEndpointName")]
    pub root_hns_endpoint_name: String,
    /// Source VIP for non-DSR.
    #[serde(rename = "sourceVip")]
    pub source_vip: String,
}

/// component-base `LoggingConfiguration`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoggingConfiguration {
    /// Maximum time between log flushes.
    #[serde(rename = "flushFrequency", deserialize_with = "de_time_or_meta_duration")]
    pub flush_frequency: GoDuration,
    /// `text` or `json`.
    pub format: String,
    /// Format-specific options.
    pub options: FormatOptions,
    /// Global verbosity (`-v`).
    pub verbosity: u32,
    /// Per-file verbosity overrides (`--vmodule`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vmodule: Vec<VModuleItem>,
}

/// One `--vmodule` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VModuleItem {
    /// File name pattern (without `.go`/`.rs`).
    #[serde(rename = "filePattern")]
    pub file_pattern: String,
    /// Verbosity for matching files.
    pub verbosity: u32,
}

/// `logging.options`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FormatOptions {
    /// JSON format options.
    pub json: OutputRoutingOptions,
    /// Text format options.
    pub text: OutputRoutingOptions,
}

/// Alpha split-stream options of a log format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OutputRoutingOptions {
    /// Buffer size for info messages when split (a Kubernetes quantity).
    #[serde(rename = "infoBufferSize")]
    pub info_buffer_size: Quantity,
    /// Write errors to stderr and info to stdout.
    #[serde(rename = "splitStream", skip_serializing_if = "is_false")]
    pub split_stream: bool,
}

/// A Kubernetes resource quantity kept as text (`"0"`, `512`, `1Ki`, `5Mi`); accepts a JSON number or string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quantity(pub String);

impl Default for Quantity {
    fn default() -> Self {
        Quantity("0".to_string())
    }
}

impl Quantity {
    /// Checks the text against the quantity grammar; the error quotes the input.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let body = t.strip_prefix(['+', '-']).unwrap_or(t);
        let num_len = body.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
        let suffix = &body[num_len..];
        let suffix_ok = matches!(
            suffix,
            "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
        ) || (suffix.starts_with(['e', 'E'])
            && suffix[1..].strip_prefix(['+', '-']).unwrap_or(&suffix[1..]).bytes().all(|b| b.is_ascii_digit())
            && suffix.len() > 1);
        if num_len == 0 || body[..num_len].matches('.').count() > 1 || !suffix_ok {
            return Err(format!(
                "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$' (got {})",
                go_quote(s)
            ));
        }
        Ok(Quantity(t.to_string()))
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
            Text(String),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Int(i) => i.to_string(),
            Raw::Float(f) => f.to_string(),
            Raw::Text(s) => s,
        };
        Quantity::parse(&text).map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------------------------------------------

/// The proxy backend selected by `mode` / `--proxy-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    /// Our eBPF datapath; what an empty mode means.
    Ebpf,
    /// Upstream's iptables mode.
    Iptables,
    /// Upstream's IPVS mode.
    Ipvs,
    /// Upstream's nftables mode.
    Nftables,
}

impl ProxyMode {
    /// The mode named by a config/flag value; `""` is our default ([`ProxyMode::Ebpf`]); None for anything else.
    pub fn from_config_str(s: &str) -> Option<Self> {
        match s {
            "" | "ebpf" => Some(ProxyMode::Ebpf),
            "iptables" => Some(ProxyMode::Iptables),
            "ipvs" => Some(ProxyMode::Ipvs),
            "nftables" => Some(ProxyMode::Nftables),
            _ => None,
        }
    }

    /// The mode's name as written in the config (`ebpf`, `iptables`, `ipvs`, `nftables`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Ebpf => "ebpf",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::Nftables => "nftables",
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How cluster-local traffic is recognised (`detectLocalMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LocalMode {
    /// Source IP inside `clusterCIDR` (the default for "").
    ClusterCidr,
    /// Source IP inside the Node's `podCIDRs`.
    NodeCidr,
    /// Arrived on `detectLocal.bridgeInterface`.
    BridgeInterface,
    /// Arrived on an interface starting with `detectLocal.interfaceNamePrefix`.
    InterfaceNamePrefix,
}

impl LocalMode {
    /// The mode named by a config/flag value; `""` means [`LocalMode::ClusterCidr`]; None for anything else.
    pub fn from_config_str(s: &str) -> Option<Self> {
        match s {
            "" | "ClusterCIDR" => Some(LocalMode::ClusterCidr),
            "NodeCIDR" => Some(LocalMode::NodeCidr),
            "BridgeInterface" => Some(LocalMode::BridgeInterface),
            "InterfaceNamePrefix" => Some(LocalMode::InterfaceNamePrefix),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

/// Why a configuration could not be loaded, resolved or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("failed to read config file {path:?}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not a decodable KubeProxyConfiguration.
    #[error("failed to decode config file {path:?}: {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The configuration is invalid (all problems, aggregated as upstream does).
    #[error("{0}")]
    Validation(#[from] ValidationErrors),
    /// `--hostname-override` was given but is only whitespace.
    #[error("empty hostname-override is invalid")]
    EmptyHostnameOverride,
    /// The node name could not be determined.
    #[error("{0}")]
    Hostname(String),
    /// A CIDR in the configuration does not parse.
    #[error("invalid CIDR {value:?} in {field}")]
    InvalidCidr {
        /// Config field.
        field: &'static str,
        /// The text.
        value: String,
    },
    /// The effective configuration could not be written.
    #[error("failed to write configuration to {path:?}: {source}")]
    Write {
        /// The destination.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration could not be serialised.
    #[error("failed to encode configuration: {0}")]
    Encode(String),
}

// ---------------------------------------------------------------------------------------------------------------
// Defaulting and accessors
// ---------------------------------------------------------------------------------------------------------------

/// True when `s` parses as an IP (Go's `ParseIPSloppy`: IPv4 octets may have leading zeros).
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // Leading zeros are decimal in Go's sloppy parser; std rejects them.
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() == 4 && parts.iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        let mut octets = [0u8; 4];
        for (o, p) in octets.iter_mut().zip(&parts) {
            *o = p.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(octets)));
    }
    None
}

/// Parses a CIDR the sloppy way (host bits allowed, IPv4 leading zeros allowed); the result keeps the address.
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net);
    }
    let (ip, len) = s.split_once('/')?;
    let ip = parse_ip_sloppy(ip)?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    IpNet::new(ip, len.parse().ok()?).ok()
}

/// Go's `net.SplitHostPort`: `host:port` or `[v6host]:port`; the error is Go's wording.
pub fn split_host_port(input: &str) -> Result<(String, String), String> {
    let missing = || format!("address {input}: missing port in address");
    let too_many = || format!("address {input}: too many colons in address");
    if let Some(rest) = input.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return Err(format!("address {input}: missing ']' in address"));
        };
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let Some(port) = after.strip_prefix(':') else {
            return Err(if after.is_empty() {
                missing()
            } else {
                format!("address {input}: unexpected ']' in address")
            });
        };
        if port.contains(':') {
            return Err(too_many());
        }
        return Ok((host.to_string(), port.to_string()));
    }
    let Some(idx) = input.rfind(':') else {
        return Err(missing());
    };
    let host = &input[..idx];
    if host.contains(':') {
        return Err(too_many());
    }
    if host.contains('[') || host.contains(']') {
        return Err(format!("address {input}: unexpected '[' in address"));
    }
    Ok((host.to_string(), input[idx + 1..].to_string()))
}

/// upstream `AppendPortIfNeeded`: leaves `ip:port` alone, appends `:port` to a bare IP (bracketing IPv6), and
/// returns anything else unchanged for validation to reject.
pub fn append_port_if_needed(addr: &str, port: u16) -> String {
    if split_host_port(addr).is_ok() {
        return addr.to_string();
    }
    match parse_ip_sloppy(addr) {
        Some(IpAddr::V4(_)) => format!("{addr}:{port}"),
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => format!("{addr}:{port}"),
        Some(IpAddr::V6(_)) => format!("[{addr}]:{port}"),
        None => addr.to_string(),
    }
}

/// Default healthz and metrics hosts for a bind address: IPv4 (or unparsable-as-v6) picks `0.0.0.0`/`127.0.0.1`.
fn default_addresses(bind_address: &str) -> (&'static str, &'static str) {
    let is_v4 = match parse_ip_sloppy(bind_address) {
        Some(IpAddr::V4(_)) => true,
        Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().is_some(),
        None => false,
    };
    if is_v4 { ("0.0.0.0", "127.0.0.1") } else { ("[::]", "[::1]") }
}

/// Parses a validated `ip:port` bind address into a socket address.
fn parse_bind_address(s: &str) -> Option<SocketAddr> {
    let (host, port) = split_host_port(s).ok()?;
    Some(SocketAddr::new(parse_ip_sloppy(&host)?, port.parse().ok()?))
}

impl KubeProxyConfiguration {
    /// The configuration with every default applied: what `--write-config-to` writes without other input.
    pub fn defaulted() -> Self {
        let mut c = KubeProxyConfiguration::default();
        c.set_defaults();
        c
    }

    /// Applies v1alpha1 defaulting: zero values count as unset. Note `iptables`/`nftables` `minSyncPeriod: 0s`
    /// becomes 1s while `ipvs.minSyncPeriod` stays 0, and a bare IP in the bind addresses gets the default port.
    pub fn set_defaults(&mut self) {
        if self.api_version.is_empty() {
            self.api_version = API_VERSION.to_string();
        }
        if self.kind.is_empty() {
            self.kind = KIND.to_string();
        }
        if self.bind_address.is_empty() {
            self.bind_address = "0.0.0.0".to_string();
        }
        let (healthz_host, metrics_host) = default_addresses(&self.bind_address);
        self.healthz_bind_address = if self.healthz_bind_address.is_empty() {
            format!("{healthz_host}:{DEFAULT_HEALTHZ_PORT}")
        } else {
            append_port_if_needed(&self.healthz_bind_address, DEFAULT_HEALTHZ_PORT)
        };
        self.metrics_bind_address = if self.metrics_bind_address.is_empty() {
            format!("{metrics_host}:{DEFAULT_METRICS_PORT}")
        } else {
            append_port_if_needed(&self.metrics_bind_address, DEFAULT_METRICS_PORT)
        };
        self.oom_score_adj.get_or_insert(DEFAULT_OOM_SCORE_ADJ);

        let ipt = &mut self.iptables;
        if ipt.sync_period.is_zero() {
            ipt.sync_period = GoDuration::from_secs(30);
        }
        if ipt.min_sync_period.is_zero() {
            ipt.min_sync_period = GoDuration::from_secs(1);
        }
        ipt.masquerade_bit.get_or_insert(14);
        ipt.localhost_node_ports.get_or_insert(true);

        if self.ipvs.sync_period.is_zero() {
            self.ipvs.sync_period = GoDuration::from_secs(30);
        }

        let nft = &mut self.nftables;
        if nft.sync_period.is_zero() {
            nft.sync_period = GoDuration::from_secs(30);
        }
        if nft.min_sync_period.is_zero() {
            nft.min_sync_period = GoDuration::from_secs(1);
        }
        nft.masquerade_bit.get_or_insert(14);

        let ct = &mut self.conntrack;
        ct.max_per_core.get_or_insert(32 * 1024);
        ct.min.get_or_insert(128 * 1024);
        ct.tcp_established_timeout.get_or_insert(GoDuration::from_secs(24 * 3600));
        ct.tcp_close_wait_timeout.get_or_insert(GoDuration::from_secs(3600));

        if self.config_sync_period.is_zero() {
            self.config_sync_period = GoDuration::from_secs(15 * 60);
        }
        let cc = &mut self.client_connection;
        if cc.content_type.is_empty() {
            cc.content_type = DEFAULT_CONTENT_TYPE.to_string();
        }
        if cc.qps == 0.0 {
            cc.qps = 5.0;
        }
        if cc.burst == 0 {
            cc.burst = 10;
        }
        if self.logging.format.is_empty() {
            self.logging.format = "text".to_string();
        }
        if self.logging.flush_frequency.is_zero() {
            self.logging.flush_frequency = GoDuration::from_secs(5);
        }
    }

    /// The effective proxy mode (`""` → ebpf); None when `mode` is not one we know (validation reports it).
    pub fn proxy_mode(&self) -> Option<ProxyMode> {
        ProxyMode::from_config_str(&self.mode)
    }

    /// The effective local-traffic detection mode (`""` → ClusterCIDR); None when unknown.
    pub fn local_mode(&self) -> Option<LocalMode> {
        LocalMode::from_config_str(&self.detect_local_mode)
    }

    /// `(syncPeriod, minSyncPeriod, masqueradeAll)` of the section the mode uses: ipvs for ipvs mode (with
    /// `iptables.masqueradeAll`), nftables for nftables mode, iptables otherwise (also for ebpf and "").
    pub fn mode_settings(&self) -> (GoDuration, GoDuration, bool) {
        match self.proxy_mode() {
            Some(ProxyMode::Ipvs) => (self.ipvs.sync_period, self.ipvs.min_sync_period, self.iptables.masquerade_all),
            Some(ProxyMode::Nftables) => {
                (self.nftables.sync_period, self.nftables.min_sync_period, self.nftables.masquerade_all)
            }
            _ => (self.iptables.sync_period, self.iptables.min_sync_period, self.iptables.masquerade_all),
        }
    }

    /// The masquerade mark bit of the mode (ipvs uses the iptables value).
    pub fn masquerade_bit(&self) -> i32 {
        match self.proxy_mode() {
            Some(ProxyMode::Nftables) => self.nftables.masquerade_bit.unwrap_or(14),
            _ => self.iptables.masquerade_bit.unwrap_or(14),
        }
    }

    /// The `clusterCIDR` entries as text (split on `,`; empty means none).
    pub fn cluster_cidr_strings(&self) -> Vec<String> {
        if self.cluster_cidr.is_empty() {
            return Vec::new();
        }
        self.cluster_cidr.split(',').map(str::to_string).collect()
    }

    /// The `clusterCIDR` entries parsed (host bits kept).
    pub fn cluster_cidrs(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.cluster_cidr_strings()
            .into_iter()
            .map(|s| parse_cidr_sloppy(&s).ok_or(ConfigError::InvalidCidr { field: "clusterCIDR", value: s }))
            .collect()
    }

    /// Healthz server address; None when disabled (empty) or not a valid `ip:port`.
    pub fn healthz_socket_addr(&self) -> Option<SocketAddr> {
        parse_bind_address(&self.healthz_bind_address)
    }

    /// Metrics server address; None when disabled (empty) or not a valid `ip:port`.
    pub fn metrics_socket_addr(&self) -> Option<SocketAddr> {
        parse_bind_address(&self.metrics_bind_address)
    }

    /// Effective `nodePortAddresses`: nftables mode with none set means `["primary"]` (upstream's platform
    /// default); otherwise the list as configured (empty = all local IPs).
    pub fn effective_node_port_addresses(&self) -> Vec<String> {
        let list = self.node_port_addresses.clone().unwrap_or_default();
        if list.is_empty() && self.proxy_mode() == Some(ProxyMode::Nftables) {
            return vec![NODE_PORT_ADDRESSES_PRIMARY.to_string()];
        }
        list
    }

    /// The configuration as JSON (v1alpha1 field names).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The body served at `/configz`: `{"kubeproxy.config.k8s.io": <this configuration>}`. (Upstream serves its
    /// internal struct there; we serve the v1alpha1 form, which is the one users know.)
    pub fn configz_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert(GROUP_NAME.to_string(), self.to_json());
        Value::Object(m)
    }

    /// The configuration as YAML in upstream's canonical form (sorted keys, Go durations, `null` for nil lists).
    pub fn to_yaml(&self) -> String {
        let mut v = self.to_json();
        // apiVersion/kind are always written, as upstream's encoder does.
        if let Value::Object(m) = &mut v {
            m.insert("apiVersion".into(), Value::String(API_VERSION.into()));
            m.insert("kind".into(), Value::String(KIND.into()));
        }
        yaml::emit(&v)
    }

    /// Writes [`Self::to_yaml`] to `path` (the `--write-config-to` action).
    pub fn write_yaml_file(&self, path: &Path) -> Result<(), ConfigError> {
        std::fs::write(path, self.to_yaml()).map_err(|source| ConfigError::Write { path: path.to_path_buf(), source })
    }

    /// An instance with every optional part present; its JSON form lists every known field (for strict decoding).
    fn exemplar() -> Self {
        let mut c = Self::defaulted();
        c.feature_gates.insert("X".into(), true);
        c.windows_run_as_service = true;
        c.node_port_addresses = Some(vec![]);
        c.ipvs.exclude_cidrs = Some(vec![]);
        c.logging.vmodule.push(VModuleItem::default());
        c.logging.options.json.split_stream = true;
        c.logging.options.text.split_stream = true;
        c
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------------------------

/// A parsed YAML/JSON document that keeps duplicate keys, so strict decoding can report them.
#[derive(Clone, Debug)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                Ok(Node::UInt(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<Node, Node>()? {
                    entries.push((k.key_string(), v));
                }
                Ok(Node::Map(entries))
            }
        }
        deserializer.deserialize_any(NodeVisitor)
    }
}

impl Node {
    /// Map keys become strings, as in the YAML-to-JSON conversion Kubernetes does.
    fn key_string(&self) -> String {
        match self {
            Node::Null => "null".into(),
            Node::Bool(b) => b.to_string(),
            Node::Int(i) => i.to_string(),
            Node::UInt(u) => u.to_string(),
            Node::Float(f) => f.to_string(),
            Node::Str(s) => s.clone(),
            Node::Seq(_) | Node::Map(_) => format!("{self:?}"),
        }
    }

    /// JSON with the last duplicate winning and `null` members dropped (Go leaves a field untouched on `null`, and
    /// untouched means zero, which is what a missing member gives us).
    fn to_json(&self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::UInt(u) => Value::from(*u),
            Node::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Map(entries) => {
                let mut m = serde_json::Map::new();
                for (k, v) in entries {
                    if matches!(v, Node::Null) {
                        m.remove(k);
                    } else {
                        m.insert(k.clone(), v.to_json());
                    }
                }
                Value::Object(m)
            }
        }
    }
}

/// Collects strict-decoding problems: unknown fields (not in `known`) and duplicate fields, with dotted paths.
fn strict_problems(node: &Node, known: &Value, path: &str, out: &mut Vec<String>) {
    match (node, known) {
        (Node::Map(entries), Value::Object(known_fields)) => {
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in entries {
                let child = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                if !seen.insert(k.as_str()) {
                    out.push(format!("duplicate field {}", go_quote(&child)));
                }
                match known_fields.get(k) {
                    None => out.push(format!("unknown field {}", go_quote(&child))),
                    // Map-typed fields have free-form keys.
                    Some(_) if path.is_empty() && k == "featureGates" => {}
                    Some(kv) => strict_problems(v, kv, &child, out),
                }
            }
        }
        (Node::Seq(items), Value::Array(known_items)) => {
            if let Some(first) = known_items.first() {
                for (i, item) in items.iter().enumerate() {
                    strict_problems(item, first, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Outcome of [`decode_config`]: the defaulted configuration plus the strict-decoding error, if lenient decoding
/// had to be used.
#[derive(Debug)]
pub struct Decoded {
    /// The decoded and defaulted configuration.
    pub config: KubeProxyConfiguration,
    /// `Some(message)` when strict decoding failed and unknown/duplicate fields were ignored.
    pub strict_error: Option<String>,
}

/// Decodes a configuration file's text (YAML or JSON): checks `apiVersion`/`kind`, decodes strictly (unknown or
/// duplicate fields are errors), falls back to lenient decoding when only the strict checks fail (logging
/// `Using lenient decoding as strict decoding failed`), then applies defaulting. `source` names the input in
/// errors.
pub fn decode_config(data: &str, source: &Path) -> Result<Decoded, ConfigError> {
    let fail = |message: String| ConfigError::Decode { path: source.to_path_buf(), message };
    let node: Node = serde_yaml::from_str(data).map_err(|e| fail(e.to_string()))?;
    let json = node.to_json();
    let Value::Object(top) = &json else {
        return Err(fail("the document is not a mapping (expected a KubeProxyConfiguration object)".into()));
    };
    let api_version = top.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = top.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() {
        return Err(fail(format!("Object 'Kind' is missing; expected kind {KIND:?}")));
    }
    if api_version != API_VERSION || kind != KIND {
        return Err(fail(format!(
            "no kind {kind:?} is registered for version {api_version:?}; expected apiVersion {API_VERSION:?} and \
             kind {KIND:?}"
        )));
    }
    let mut config: KubeProxyConfiguration = serde_json::from_value(json.clone()).map_err(|e| fail(e.to_string()))?;

    let mut problems = Vec::new();
    strict_problems(&node, &KubeProxyConfiguration::exemplar().to_json(), "", &mut problems);
    let strict_error = if problems.is_empty() {
        None
    } else {
        let message = format!("strict decoding error: {}", problems.join(", "));
        tracing::warn!(err = %message, file = %source.display(), "Using lenient decoding as strict decoding failed");
        Some(message)
    };
    config.set_defaults();
    Ok(Decoded { config, strict_error })
}

/// Reads and decodes a configuration file (see [`decode_config`]).
pub fn load_config_file(path: &Path) -> Result<Decoded, ConfigError> {
    let data =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    decode_config(&data, path)
}

// ---------------------------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------------------------

/// One validation problem, rendered like apimachinery's `field.Error`: `<path>: <type>: <value>: <detail>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field path, e.g. `KubeProxyConfiguration.KubeProxyIPTablesConfiguration.MasqueradeBit`.
    pub field: String,
    /// Everything after `<path>: `.
    pub body: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body)
    }
}

/// How a bad value is printed (apimachinery prints strings with `%q`, numbers and Stringers plainly).
enum Bad<'a> {
    Str(&'a str),
    Plain(String),
}

fn invalid(field: impl Into<String>, value: Bad<'_>, detail: &str) -> FieldError {
    let value = match value {
        Bad::Str(s) => go_quote(s),
        Bad::Plain(s) => s,
    };
    FieldError { field: field.into(), body: format!("Invalid value: {value}: {detail}") }
}

fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> FieldError {
    let list: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
    FieldError {
        field: field.into(),
        body: format!("Unsupported value: {}: supported values: {}", go_quote(value), list.join(", ")),
    }
}

/// All validation problems of a configuration; displays like apimachinery's aggregate (one error plain, several
/// as `[a, b]`, duplicates dropped).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut seen: Vec<String> = Vec::new();
        for e in &self.0 {
            let s = e.to_string();
            if !seen.contains(&s) {
                seen.push(s);
            }
        }
        if seen.len() == 1 { f.write_str(&seen[0]) } else { write!(f, "[{}]", seen.join(", ")) }
    }
}

const IPVS_SCHEDULERS: &[&str] = &["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh", ""];

fn validate_host_port(input: &str, field: &str, errs: &mut Vec<FieldError>) {
    let Ok((host, port)) = split_host_port(input) else {
        errs.push(invalid(field, Bad::Str(input), "must be IP:port"));
        return;
    };
    if parse_ip_sloppy(&host).is_none() {
        errs.push(invalid(field, Bad::Str(&host), "must be a valid IP"));
    }
    match port.parse::<i64>() {
        Ok(p) if (1..=65535).contains(&p) => {}
        _ => errs.push(invalid(field, Bad::Str(&port), "must be a valid port")),
    }
}

/// upstream `ParsePortRange`: "", `N`, `A-B` or `A+N`, within 0..=65535 and not reversed.
pub fn parse_port_range(value: &str) -> Result<Option<(u16, u16)>, String> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let num = |s: &str| s.parse::<i64>().map_err(|_| format!("unable to parse port range: {value}"));
    let (low, high) = match (v.find('-'), v.find('+')) {
        (None, None) => {
            let p = num(v)?;
            (p, p)
        }
        (Some(i), None) => (num(&v[..i])?, num(&v[i + 1..])?),
        (None, Some(i)) => {
            let low = num(&v[..i])?;
            (low, low + num(&v[i + 1..])?)
        }
        _ => return Err(format!("unable to parse port range: {value}")),
    };
    if low < 0 || high < 0 || low > 65535 || high > 65535 {
        return Err(format!("the port range cannot be greater than 65535: {value}"));
    }
    if high < low {
        return Err(format!("end port cannot be less than start port: {value}"));
    }
    Ok(Some((low as u16, high as u16)))
}

fn push_nonneg_duration(d: GoDuration, field: &str, errs: &mut Vec<FieldError>) {
    if d.as_nanos() < 0 {
        errs.push(invalid(field, Bad::Plain(d.to_string()), "must be greater than or equal to 0"));
    }
}

/// Validates a (defaulted) configuration with upstream's rules, field paths and messages, extended with our
/// `ebpf` mode. All problems are returned together.
pub fn validate(c: &KubeProxyConfiguration) -> Result<(), ValidationErrors> {
    const P: &str = "KubeProxyConfiguration";
    let mut errs = Vec::new();
    let mode = c.proxy_mode();

    if let Some(bit) = c.iptables.masquerade_bit
        && !(0..=31).contains(&bit)
    {
        errs.push(invalid(
            format!("{P}.KubeProxyIPTablesConfiguration.MasqueradeBit"),
            Bad::Plain(bit.to_string()),
            "must be within the range [0, 31]",
        ));
    }
    match mode {
        Some(ProxyMode::Ipvs) => {
            let ipvs = format!("{P}.KubeProxyIPVSConfiguration");
            push_nonneg_duration(c.ipvs.tcp_timeout, &format!("{ipvs}.TCPTimeout"), &mut errs);
            push_nonneg_duration(c.ipvs.tcp_fin_timeout, &format!("{ipvs}.TCPFinTimeout"), &mut errs);
            push_nonneg_duration(c.ipvs.udp_timeout, &format!("{ipvs}.UDPTimeout"), &mut errs);
            for (i, cidr) in c.ipvs.exclude_cidrs.iter().flatten().enumerate() {
                if parse_cidr_sloppy(cidr).is_none() {
                    errs.push(invalid(format!("{ipvs}.ExcludeCidrs[{i}]"), Bad::Str(cidr), "must be a valid CIDR"));
                }
            }
            if !IPVS_SCHEDULERS.contains(&c.ipvs.scheduler.as_str()) {
                // Upstream appends "Scheduler" twice to the path; kept for identical messages.
                errs.push(invalid(
                    format!("{ipvs}.Scheduler.Scheduler"),
                    Bad::Str(&c.ipvs.scheduler),
                    &format!(
                        "must be in [{}], blank means the default algorithm method (currently rr)",
                        IPVS_SCHEDULERS.join(" ")
                    ),
                ));
            }
        }
        Some(ProxyMode::Nftables) => {
            if let Some(bit) = c.nftables.masquerade_bit
                && !(0..=31).contains(&bit)
            {
                errs.push(invalid(
                    format!("{P}.KubeProxyNFTablesConfiguration.MasqueradeBit"),
                    Bad::Plain(bit.to_string()),
                    "must be within the range [0, 31]",
                ));
            }
        }
        _ => {}
    }

    let linux = format!("{P}.KubeProxyLinuxConfiguration");
    let ct_path = format!("{linux}.KubeProxyConntrackConfiguration");
    let ct = &c.conntrack;
    for (value, name) in [(ct.max_per_core, "MaxPerCore"), (ct.min, "Min")] {
        if let Some(v) = value
            && v < 0
        {
            errs.push(invalid(
                format!("{ct_path}.{name}"),
                Bad::Plain(v.to_string()),
                "must be greater than or equal to 0",
            ));
        }
    }
    for (value, name) in [
        (ct.tcp_established_timeout.unwrap_or_default(), "TCPEstablishedTimeout"),
        (ct.tcp_close_wait_timeout.unwrap_or_default(), "TCPCloseWaitTimeout"),
        (ct.udp_timeout, "UDPTimeout"),
        (ct.udp_stream_timeout, "UDPStreamTimeout"),
    ] {
        push_nonneg_duration(value, &format!("{ct_path}.{name}"), &mut errs);
    }
    if let Some(oom) = c.oom_score_adj
        && !(-1000..=1000).contains(&oom)
    {
        errs.push(invalid(
            format!("{linux}.OOMScoreAdj"),
            Bad::Plain(oom.to_string()),
            "must be within the range [-1000, 1000]",
        ));
    }

    if mode.is_none() {
        errs.push(invalid(
            format!("{P}.Mode.ProxyMode"),
            Bad::Str(&c.mode),
            "must be ebpf, iptables, ipvs, nftables or blank (blank means the best-available proxy [currently ebpf])",
        ));
    }

    if c.client_connection.burst < 0 {
        errs.push(invalid(
            format!("{P}.ClientConnection.Burst"),
            Bad::Plain(c.client_connection.burst.to_string()),
            "must be greater than or equal to 0",
        ));
    }

    if c.config_sync_period.as_nanos() <= 0 {
        errs.push(invalid(
            format!("{P}.ConfigSyncPeriod"),
            Bad::Plain(c.config_sync_period.to_string()),
            "must be greater than 0",
        ));
    }
    let (sync, min_sync, _) = c.mode_settings();
    if sync.as_nanos() <= 0 {
        errs.push(invalid(format!("{P}.SyncPeriod"), Bad::Plain(sync.to_string()), "must be greater than 0"));
    }
    push_nonneg_duration(min_sync, &format!("{P}.MinSyncPeriod"), &mut errs);
    if min_sync > sync {
        errs.push(invalid(
            format!("{P}.SyncPeriod"),
            Bad::Plain(min_sync.to_string()),
            &format!("must be greater than or equal to {P}.MinSyncPeriod"),
        ));
    }

    if parse_ip_sloppy(&c.bind_address).is_none() {
        errs.push(invalid(
            format!("{P}.BindAddress"),
            Bad::Str(&c.bind_address),
            "not a valid textual representation of an IP address",
        ));
    }
    if !c.healthz_bind_address.is_empty() {
        validate_host_port(&c.healthz_bind_address, &format!("{P}.HealthzBindAddress"), &mut errs);
    }
    // Upstream checks this one even when empty, contradicting its own "set empty to disable" flag help; we honour
    // the help text.
    if !c.metrics_bind_address.is_empty() {
        validate_host_port(&c.metrics_bind_address, &format!("{P}.MetricsBindAddress"), &mut errs);
    }

    if parse_port_range(&c.port_range).is_err() {
        errs.push(invalid(
            format!("{P}.PortRange"),
            Bad::Str(&c.port_range),
            "must be a valid port range (e.g. 300-2000)",
        ));
    }

    let npa = c.node_port_addresses.as_deref().unwrap_or_default();
    for (i, entry) in npa.iter().enumerate() {
        if entry == NODE_PORT_ADDRESSES_PRIMARY {
            if i != 0 || npa.len() != 1 {
                errs.push(invalid(
                    format!("{P}.NodePortAddresses[{i}]"),
                    Bad::Str(entry),
                    "can't use both 'primary' and CIDRs",
                ));
            }
            break;
        }
        if parse_cidr_sloppy(entry).is_none() {
            errs.push(invalid(format!("{P}.NodePortAddresses[{i}]"), Bad::Str(entry), "must be a valid CIDR"));
        }
    }

    let shm = &c.show_hidden_metrics_for_version;
    let allowed = format!("1.{}", KUBERNETES_MINOR - 1);
    if !shm.is_empty() && *shm != allowed {
        errs.push(invalid(
            format!("{P}.ShowHiddenMetricsForVersion"),
            Bad::Str(shm),
            &format!(
                "--show-hidden-metrics-for-version must be omitted or have the value '{allowed}'. Only the previous \
                 minor version is allowed"
            ),
        ));
    }

    const LOCAL_MODES: &[&str] = &["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix", ""];
    let dl = format!("{P}.DetectLocalConfiguration");
    match c.local_mode() {
        None => errs.push(not_supported(format!("{P}.DetectLocalMode"), &c.detect_local_mode, LOCAL_MODES)),
        Some(LocalMode::BridgeInterface) if c.detect_local.bridge_interface.is_empty() => {
            errs.push(invalid(format!("{dl}.InterfaceName"), Bad::Str(""), "must not be empty"));
        }
        Some(LocalMode::InterfaceNamePrefix) if c.detect_local.interface_name_prefix.is_empty() => {
            errs.push(invalid(format!("{dl}.InterfacePrefix"), Bad::Str(""), "must not be empty"));
        }
        Some(LocalMode::ClusterCidr) => validate_cluster_cidrs(&c.cluster_cidr_strings(), &dl, &mut errs),
        Some(_) => {}
    }

    if c.logging.format != "text" && c.logging.format != "json" {
        errs.push(invalid(format!("{P}.logging.format"), Bad::Str(&c.logging.format), "Unsupported log format"));
    }

    if errs.is_empty() { Ok(()) } else { Err(ValidationErrors(errs)) }
}

fn validate_cluster_cidrs(cidrs: &[String], dl: &str, errs: &mut Vec<FieldError>) {
    if cidrs.is_empty() {
        return;
    }
    let field = format!("{dl}.ClusterCIDRs");
    let pair_msg =
        "must be a either a single CIDR or dual-stack pair of CIDRs (e.g. [10.100.0.0/16, fde4:8dba:82e1::/48]";
    let as_go_slice = || {
        let quoted: Vec<String> = cidrs.iter().map(|s| go_quote(s)).collect();
        format!("[]string{{{}}}", quoted.join(", "))
    };
    if cidrs.len() > 2 {
        errs.push(invalid(field, Bad::Plain(as_go_slice()), pair_msg));
        return;
    }
    let parsed: Vec<Option<IpNet>> = cidrs.iter().map(|s| parse_cidr_sloppy(s)).collect();
    for (i, (s, p)) in cidrs.iter().zip(&parsed).enumerate() {
        if p.is_none() {
            errs.push(invalid(
                format!("{field}[{i}]"),
                Bad::Str(s),
                "must be a valid CIDR block (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)",
            ));
        }
    }
    if let [Some(a), Some(b)] = parsed.as_slice()
        && matches!(a, IpNet::V4(_)) == matches!(b, IpNet::V4(_))
    {
        errs.push(invalid(field, Bad::Plain(as_go_slice()), pair_msg));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// YAML writing
// ---------------------------------------------------------------------------------------------------------------

/// A small YAML emitter producing what Go's `sigs.k8s.io/yaml` (go-yaml v2) writes for a JSON document: sorted keys
/// (serde_json's map is ordered by key bytes), two-space indentation, sequences at the key's indentation, strings
/// that would read back as another type in double quotes, strings YAML cannot write plainly in single quotes.
mod yaml {
    use serde_json::Value;

    /// Emits a JSON document as YAML.
    pub fn emit(v: &Value) -> String {
        let mut out = String::new();
        match v {
            Value::Object(m) if !m.is_empty() => emit_map(&mut out, m, 0),
            other => {
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
        out
    }

    fn emit_map(out: &mut String, m: &serde_json::Map<String, Value>, indent: usize) {
        for (k, v) in m {
            out.push_str(&" ".repeat(indent));
            out.push_str(&string_scalar(k));
            out.push(':');
            emit_value_after_key(out, v, indent);
        }
    }

    fn emit_value_after_key(out: &mut String, v: &Value, indent: usize) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push('\n');
                emit_map(out, m, indent + 2);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                emit_seq(out, a, indent);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }

    fn emit_seq(out: &mut String, items: &[Value], indent: usize) {
        let pad = " ".repeat(indent);
        for item in items {
            match item {
                Value::Object(m) if !m.is_empty() => {
                    // Render the mapping two columns in, then put the dash where its first line's indent starts.
                    let mut inner = String::new();
                    emit_map(&mut inner, m, indent + 2);
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&inner[indent + 2..]);
                }
                Value::Array(a) if !a.is_empty() => {
                    let mut inner = String::new();
                    emit_seq(&mut inner, a, indent + 2);
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&inner[indent + 2..]);
                }
                other => {
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&scalar(other));
                    out.push('\n');
                }
            }
        }
    }

    fn scalar(v: &Value) -> String {
        match v {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => string_scalar(s),
            Value::Array(_) => "[]".into(),
            Value::Object(_) => "{}".into(),
        }
    }

    /// True when a plain scalar with this text would be read as something other than a string (YAML 1.1 rules,
    /// which go-yaml v2 uses).
    fn resolves_to_non_string(s: &str) -> bool {
        const SPECIAL: &[&str] = &[
            "", "~", "null", "Null", "NULL", "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True",
            "TRUE", "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF", ".inf", ".Inf", ".INF", "+.inf",
            "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", ".nan", ".NaN", ".NAN",
        ];
        if SPECIAL.contains(&s) {
            return true;
        }
        let body = s.strip_prefix(['+', '-']).unwrap_or(s);
        let digits_us = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'_');
        // Integers: decimal, 0b, 0x, octal (all with underscores allowed).
        if let Some(h) = body.strip_prefix("0x") {
            return !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit() || b == b'_');
        }
        if let Some(b) = body.strip_prefix("0b") {
            return !b.is_empty() && b.bytes().all(|c| c == b'0' || c == b'1' || c == b'_');
        }
        if digits_us(body) {
            return true;
        }
        // Floats: [digits][.digits][e[+-]digits], at least one digit somewhere before the exponent.
        let (mantissa, exponent) = match body.find(['e', 'E']) {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let mantissa_ok = match mantissa.split_once('.') {
            Some((a, b)) => {
                (a.is_empty() || digits_us(a)) && (b.is_empty() || digits_us(b)) && !(a.is_empty() && b.is_empty())
            }
            None => digits_us(mantissa),
        };
        let exponent_ok = exponent.is_none_or(|e| {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
        });
        if mantissa_ok && exponent_ok && (mantissa.contains('.') || exponent.is_some()) {
            return true;
        }
        // Base-60 numbers such as 1:20 and dates such as 2001-12-14.
        let sexagesimal = body.contains(':')
            && body.split(':').enumerate().all(|(i, part)| {
                if i == 0 {
                    digits_us(part) && part.as_bytes()[0].is_ascii_digit()
                } else {
                    !part.is_empty() && part.len() <= 2 && part.bytes().all(|b| b.is_ascii_digit())
                }
            });
        let date = s.len() >= 8
            && s.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && s.as_bytes()[4] == b'-'
            && s[5..]
                .split(['-', 'T', 't', ' '])
                .take(2)
                .all(|p| !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()));
        sexagesimal || date
    }

    /// True when YAML can write the text as a plain scalar in block context.
    fn plain_allowed(s: &str) -> bool {
        let first = s.chars().next().unwrap_or(' ');
        let second = s.chars().nth(1);
        if "#,[]{}&*!|>'\"%@`".contains(first) {
            return false;
        }
        if matches!(first, '-' | '?' | ':') && second.is_none_or(|c| c == ' ') {
            return false;
        }
        if s.starts_with("---") || s.starts_with("...") {
            return false;
        }
        if s.contains(": ") || s.ends_with(':') || s.contains(" #") || s.starts_with(' ') || s.ends_with(' ') {
            return false;
        }
        s.chars().all(|c| !c.is_control())
    }

    fn string_scalar(s: &str) -> String {
        if s.chars().any(|c| c.is_control()) || resolves_to_non_string(s) {
            return double_quoted(s);
        }
        if plain_allowed(s) {
            return s.to_string();
        }
        format!("'{}'", s.replace('\'', "''"))
    }

    fn double_quoted(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => out.push_str(&format!("\\x{:02X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_parse_table() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("0s", 0),
            ("30s", 30 * NANOS_PER_SECOND),
            ("1m30s", 90 * NANOS_PER_SECOND),
            ("24h0m0s", 24 * 3600 * NANOS_PER_SECOND),
            ("500ms", 500_000_000),
            ("1.5s", 1_500_000_000),
            (".5s", 500_000_000),
            ("1.s", NANOS_PER_SECOND),
            ("-1s", -NANOS_PER_SECOND),
            ("+2h", 7200 * NANOS_PER_SECOND),
            ("10us", 10_000),
            ("10\u{b5}s", 10_000),
            ("10\u{3bc}s", 10_000),
            ("3ns", 3),
            ("2h45m", (2 * 3600 + 45 * 60) * NANOS_PER_SECOND),
            ("9223372036854775807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
        ];
        for (input, want) in cases {
            assert_eq!(GoDuration::parse(input), Ok(GoDuration(*want)), "input {input}");
        }
    }

    #[test]
    fn duration_parse_errors_use_go_wording() {
        let cases: &[(&str, &str)] = &[
            ("", "time: invalid duration \"\""),
            ("abc", "time: invalid duration \"abc\""),
            ("1", "time: missing unit in duration \"1\""),
            ("1x", "time: unknown unit \"x\" in duration \"1x\""),
            (".s", "time: invalid duration \".s\""),
            ("-", "time: invalid duration \"-\""),
            ("9223372036854775808ns", "time: invalid duration \"9223372036854775808ns\""),
            ("3000000h", "time: invalid duration \"3000000h\""),
        ];
        for (input, want) in cases {
            assert_eq!(GoDuration::parse(input).unwrap_err().to_string(), *want, "input {input:?}");
        }
    }

    #[test]
    fn duration_format_table() {
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (1, "1ns"),
            (1_100, "1.1\u{b5}s"),
            (2_200_000, "2.2ms"),
            (500_000_000, "500ms"),
            (1_500_000_000, "1.5s"),
            (30 * NANOS_PER_SECOND, "30s"),
            (90 * NANOS_PER_SECOND, "1m30s"),
            (15 * 60 * NANOS_PER_SECOND, "15m0s"),
            (3600 * NANOS_PER_SECOND, "1h0m0s"),
            (24 * 3600 * NANOS_PER_SECOND, "24h0m0s"),
            (-NANOS_PER_SECOND, "-1s"),
            (i64::MAX, "2562047h47m16.854775807s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
        ];
        for (nanos, want) in cases {
            assert_eq!(GoDuration(*nanos).to_string(), *want);
            // Every printed form parses back to the same value.
            assert_eq!(GoDuration::parse(want), Ok(GoDuration(*nanos)), "round trip {want}");
        }
    }

    #[test]
    fn append_port_and_split() {
        assert_eq!(append_port_if_needed("1.2.3.4", 10256), "1.2.3.4:10256");
        assert_eq!(append_port_if_needed("::1", 10249), "[::1]:10249");
        assert_eq!(append_port_if_needed("1.2.3.4:99", 10256), "1.2.3.4:99");
        assert_eq!(append_port_if_needed("bogus", 1), "bogus");
        assert_eq!(split_host_port("[::]:10256"), Ok(("::".into(), "10256".into())));
        assert!(split_host_port("1.2.3.4").is_err());
        assert!(split_host_port("::1").is_err());
    }

    #[test]
    fn sloppy_ip_accepts_leading_zeros() {
        assert_eq!(parse_ip_sloppy("010.001.0.1"), Some("10.1.0.1".parse().unwrap()));
        assert_eq!(parse_ip_sloppy("1.2.3"), None);
        assert_eq!(parse_ip_sloppy("256.0.0.1"), None);
    }

    #[test]
    fn port_range_parsing() {
        assert_eq!(parse_port_range(""), Ok(None));
        assert_eq!(parse_port_range("300-2000"), Ok(Some((300, 2000))));
        assert_eq!(parse_port_range("300+10"), Ok(Some((300, 310))));
        assert_eq!(parse_port_range("80"), Ok(Some((80, 80))));
        assert!(parse_port_range("2000-300").is_err());
        assert!(parse_port_range("1-70000").is_err());
        assert!(parse_port_range("x").is_err());
    }

    #[test]
    // go-yaml v2 follows YAML 1.1, where `y` and `n` are booleans, so it quotes them even as keys.
    fn yaml_scalar_quoting_matches_go_yaml() {
        let v = serde_json::json!({
            "a": "", "b": "0", "c": "1.36", "d": "true", "e": "0s", "f": "[::]:10256", "g": "0.0.0.0:10256",
            "h": "yes", "i": null, "j": [], "k": {}, "l": ["x", "y"], "m": "it's: odd", "n": 5, "o": 0.5,
        });
        let want = "a: \"\"\nb: \"0\"\nc: \"1.36\"\nd: \"true\"\ne: 0s\nf: '[::]:10256'\ng: 0.0.0.0:10256\nh: \"yes\"\n\
                    i: null\nj: []\nk: {}\nl:\n- x\n- \"y\"\nm: 'it''s: odd'\n\"n\": 5\no: 0.5\n";
        assert_eq!(yaml::emit(&v), want);
    }

    #[test]
    fn qps_keeps_its_short_decimal_form() {
        let mut c = KubeProxyConfiguration::defaulted();
        c.client_connection.qps = 0.1;
        assert_eq!(c.to_json()["clientConnection"]["qps"], serde_json::json!(0.1));
        assert!(c.to_yaml().contains("  qps: 0.1\n"));
    }

    #[test]
    fn quantity_grammar() {
        for ok in ["0", "512", "1Ki", "5Mi", "1.5G", "1e3"] {
            assert!(Quantity::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "abc", "1Q", "1..2"] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
    }
}
