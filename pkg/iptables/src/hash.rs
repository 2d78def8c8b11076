//! Upstream's chain names: `KUBE-SVC-`/`KUBE-SVL-`/`KUBE-EXT-`/`KUBE-FW-` + a 16-character hash of the service port
//! name and protocol, `KUBE-SEP-` + a hash that also covers the endpoint (reference §3.4).
//!
//! The hash is the first 16 characters of the standard (upper-case, `A-Z2-7`) base32 encoding of the SHA-256 of the
//! plain concatenation `servicePortName + protocol [+ "ip:port"]`. The names must match upstream exactly so that a
//! node switching from upstream kube-proxy to ours (or back) reuses, rather than duplicates, the chains.

use ring::digest::{SHA256, digest};

/// Prefix of the chain holding the endpoints for `Cluster` traffic policy.
pub const SVC_PREFIX: &str = "KUBE-SVC-";
/// Prefix of the chain holding the endpoints for `Local` traffic policy.
pub const SVL_PREFIX: &str = "KUBE-SVL-";
/// Prefix of the chain external destinations (NodePort, ExternalIP, LB IP) jump to.
pub const EXT_PREFIX: &str = "KUBE-EXT-";
/// Prefix of the `loadBalancerSourceRanges` firewall chain.
pub const FW_PREFIX: &str = "KUBE-FW-";
/// Prefix of a per-endpoint DNAT chain.
pub const SEP_PREFIX: &str = "KUBE-SEP-";

/// Whether `chain` is one of the per-service nat chains a sync owns and may delete (upstream `isServiceChainName`).
pub fn is_service_chain_name(chain: &str) -> bool {
    [SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX].iter().any(|p| chain.starts_with(p))
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The first 16 base32 characters of SHA-256(`input`). 16 characters are 80 bits: exactly the first 10 bytes.
fn hash16(input: &str) -> String {
    let d = digest(&SHA256, input.as_bytes());
    let bytes = &d.as_ref()[..10];
    let mut out = String::with_capacity(16);
    // Two 5-byte groups, each 40 bits = 8 characters.
    for group in bytes.chunks(5) {
        let mut v: u64 = 0;
        for b in group {
            v = (v << 8) | u64::from(*b);
        }
        for i in (0..8).rev() {
            out.push(BASE32[((v >> (i * 5)) & 0x1f) as usize] as char);
        }
    }
    out
}

/// Upstream's `portProtoHash(servicePortName, protocol)`; `protocol` is lower case (`tcp`, `udp`, `sctp`).
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    hash16(&format!("{service_port_name}{protocol}"))
}

/// The four per-service-port chain names, which share one hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChains {
    /// `KUBE-SVC-…` (Cluster policy endpoints).
    pub cluster: String,
    /// `KUBE-SVL-…` (Local policy endpoints).
    pub local: String,
    /// `KUBE-EXT-…` (external destinations).
    pub external: String,
    /// `KUBE-FW-…` (load balancer source ranges).
    pub firewall: String,
}

impl ServiceChains {
    /// The chains of `service_port_name` (upstream `ServicePortName.String()`) with lower-case `protocol`.
    pub fn new(service_port_name: &str, protocol: &str) -> Self {
        let h = port_proto_hash(service_port_name, protocol);
        ServiceChains {
            cluster: format!("{SVC_PREFIX}{h}"),
            local: format!("{SVL_PREFIX}{h}"),
            external: format!("{EXT_PREFIX}{h}"),
            firewall: format!("{FW_PREFIX}{h}"),
        }
    }
}

/// Upstream's `servicePortEndpointChainName`: `endpoint` is `ip:port` (`[ip6]:port`).
pub fn endpoint_chain_name(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!("{SEP_PREFIX}{}", hash16(&format!("{service_port_name}{protocol}{endpoint}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed independently with
    // python3 -c 'import hashlib,base64; print(base64.b32encode(hashlib.sha256(S.encode()).digest())[:16])'.
    #[test]
    fn names_match_independently_computed_hashes() {
        let c = ServiceChains::new("ns1/svc1:p80", "tcp");
        assert_eq!(c.cluster, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(c.local, "KUBE-SVL-XPGD46QRK7WJZT7O");
        assert_eq!(c.external, "KUBE-EXT-XPGD46QRK7WJZT7O");
        assert_eq!(c.firewall, "KUBE-FW-XPGD46QRK7WJZT7O");
        assert_eq!(endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.0.1:80"), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        assert_eq!(port_proto_hash("ns2/svc2:p80", "tcp"), "GNZBNJ2PO5MGZ6GT");
        assert_eq!(port_proto_hash("ns1/svc1:p80", "udp"), "OJWW7NSBVZTDHXNW");
        assert_eq!(port_proto_hash("ns4/svc4", "tcp"), "3XH3VQKYCR6ZY7EU");
        assert_eq!(port_proto_hash("kube-system/kube-dns:dns", "udp"), "TCOU7JCQXEZGVUNU");
        assert_eq!(endpoint_chain_name("ns4/svc4", "tcp", "[fd00:10:180::2]:80"), "KUBE-SEP-HQZERLX4N74YZQ2J");
    }

    #[test]
    fn service_chain_prefixes() {
        for n in ["KUBE-SVC-X", "KUBE-SVL-X", "KUBE-EXT-X", "KUBE-FW-X", "KUBE-SEP-X"] {
            assert!(is_service_chain_name(n), "{n}");
        }
        for n in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-XLB-X", "FOO"] {
            assert!(!is_service_chain_name(n), "{n}");
        }
    }
}
