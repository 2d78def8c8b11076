//! Local-traffic detection (upstream `proxyutil.LocalTrafficDetector`, reference §6.5) and `nodePortAddresses`
//! (upstream `proxyutil.NodePortAddresses`, reference §6.7), in the forms the iptables rules need.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use proxier::model::{IpFamily, NodeInfo};

/// How a packet is recognised as coming from a pod on this node or cluster, for one IP family.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalDetector {
    /// No detection (upstream "not implemented"): no off-cluster masquerade rule, no pod short-circuit.
    #[default]
    None,
    /// Source address inside a CIDR (`ClusterCIDR` and `NodeCIDR` modes).
    Cidr(IpNet),
    /// Arrived on this bridge (`BridgeInterface` mode).
    BridgeInterface(String),
    /// Arrived on an interface whose name starts with this prefix (`InterfaceNamePrefix` mode).
    InterfaceNamePrefix(String),
}

impl LocalDetector {
    /// Whether a detector is configured (upstream `IsImplemented`).
    pub fn is_implemented(&self) -> bool {
        !matches!(self, LocalDetector::None)
    }

    /// iptables arguments matching local traffic (upstream `IfLocal`), e.g. `-s 10.0.0.0/8`; empty when none.
    pub fn if_local(&self) -> String {
        match self {
            LocalDetector::None => String::new(),
            LocalDetector::Cidr(net) => format!("-s {}", net.trunc()),
            LocalDetector::BridgeInterface(br) => format!("-i {br}"),
            LocalDetector::InterfaceNamePrefix(p) => format!("-i {p}+"),
        }
    }

    /// iptables arguments matching non-local traffic (upstream `IfNotLocal`), e.g. `! -s 10.0.0.0/8`.
    pub fn if_not_local(&self) -> String {
        match self {
            LocalDetector::None => String::new(),
            _ => format!("! {}", self.if_local()),
        }
    }
}

/// `detectLocalMode` with its parameters, for both families; resolved per family (and, for `NodeCidr`, from the
/// Node's `spec.podCIDRs`) at each sync.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalDetectorConfig {
    /// No detection.
    #[default]
    None,
    /// `ClusterCIDR`: the `clusterCIDR` list; the first CIDR of each family is used (as upstream).
    ClusterCidr(Vec<IpNet>),
    /// `NodeCIDR`: the Node's `spec.podCIDRs`.
    NodeCidr,
    /// `BridgeInterface` with `detectLocal.bridgeInterface`.
    BridgeInterface(String),
    /// `InterfaceNamePrefix` with `detectLocal.interfaceNamePrefix`.
    InterfaceNamePrefix(String),
}

impl LocalDetectorConfig {
    /// The detector for `family`; CIDR modes without a CIDR of that family yield [`LocalDetector::None`].
    pub fn resolve(&self, family: IpFamily, node: &NodeInfo) -> LocalDetector {
        let first_of = |nets: &[IpNet]| {
            nets.iter().find(|n| IpFamily::of(&n.addr()) == family).map(|n| LocalDetector::Cidr(n.trunc()))
        };
        match self {
            LocalDetectorConfig::None => LocalDetector::None,
            LocalDetectorConfig::ClusterCidr(nets) => first_of(nets).unwrap_or_default(),
            LocalDetectorConfig::NodeCidr => first_of(&node.pod_cidrs).unwrap_or_default(),
            LocalDetectorConfig::BridgeInterface(b) => LocalDetector::BridgeInterface(b.clone()),
            LocalDetectorConfig::InterfaceNamePrefix(p) => LocalDetector::InterfaceNamePrefix(p.clone()),
        }
    }
}

/// `nodePortAddresses`: which local addresses accept NodePort traffic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodePortAddresses {
    /// CIDRs (both families mixed); the ones of a family that has none mean "all addresses".
    pub cidrs: Vec<IpNet>,
    /// The `primary` keyword: the Node's primary address of each family.
    pub primary: bool,
}

impl NodePortAddresses {
    /// Parses the configured strings (CIDRs or `primary`); names the bad entry on failure.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut out = NodePortAddresses::default();
        for e in entries {
            let e = e.as_ref().trim();
            if e == "primary" {
                out.primary = true;
            } else {
                out.cidrs.push(e.parse::<IpNet>().map_err(|err| format!("nodePortAddresses entry {e:?}: {err}"))?);
            }
        }
        Ok(out)
    }

    /// The family's CIDRs; empty means "match all".
    fn family_cidrs(&self, family: IpFamily) -> Vec<IpNet> {
        self.cidrs.iter().filter(|c| IpFamily::of(&c.addr()) == family).map(IpNet::trunc).collect()
    }

    /// Upstream `MatchAll()` for `family`: no CIDR of the family (and no `primary`), or a zero CIDR.
    pub fn match_all(&self, family: IpFamily) -> bool {
        let cidrs = self.family_cidrs(family);
        (cidrs.is_empty() && !self.primary) || cidrs.iter().any(|c| c.prefix_len() == 0)
    }

    /// Upstream `ContainsIPv4Loopback()`: whether IPv4 NodePorts may be served on 127.0.0.0/8.
    pub fn contains_ipv4_loopback(&self) -> bool {
        if self.match_all(IpFamily::V4) {
            return true;
        }
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        self.family_cidrs(IpFamily::V4).iter().any(|c| c.contains(&lo) || c.addr().is_loopback())
    }

    /// The node addresses of `family` that accept NodePorts (when not [`Self::match_all`]): the local addresses
    /// inside the family's CIDRs, plus the Node's primary address with `primary`.
    pub fn node_ips(&self, family: IpFamily, local_addrs: &[IpAddr], node: &NodeInfo) -> Vec<IpAddr> {
        let cidrs = self.family_cidrs(family);
        let mut out: Vec<IpAddr> = local_addrs
            .iter()
            .filter(|ip| IpFamily::of(ip) == family && cidrs.iter().any(|c| c.contains(*ip)))
            .copied()
            .collect();
        if self.primary
            && let Some(ip) = node.addresses.iter().find(|ip| IpFamily::of(ip) == family)
            && !out.contains(ip)
        {
            out.push(*ip);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn detector_args() {
        let d = LocalDetector::Cidr(net("10.0.0.1/8"));
        assert_eq!((d.if_local(), d.if_not_local()), ("-s 10.0.0.0/8".into(), "! -s 10.0.0.0/8".into()));
        let d = LocalDetector::BridgeInterface("cbr0".into());
        assert_eq!((d.if_local(), d.if_not_local()), ("-i cbr0".into(), "! -i cbr0".into()));
        let d = LocalDetector::InterfaceNamePrefix("veth".into());
        assert_eq!((d.if_local(), d.if_not_local()), ("-i veth+".into(), "! -i veth+".into()));
        assert!(!LocalDetector::None.is_implemented());
    }

    #[test]
    fn detector_resolution_per_family() {
        let cfg = LocalDetectorConfig::ClusterCidr(vec![net("10.0.0.0/8"), net("fd00::/48")]);
        let node = NodeInfo::default();
        assert_eq!(cfg.resolve(IpFamily::V6, &node), LocalDetector::Cidr(net("fd00::/48")));
        let v4only = LocalDetectorConfig::ClusterCidr(vec![net("10.0.0.0/8")]);
        assert_eq!(v4only.resolve(IpFamily::V6, &node), LocalDetector::None);
        let node = NodeInfo { pod_cidrs: vec![net("10.0.1.0/24")], ..NodeInfo::default() };
        assert_eq!(LocalDetectorConfig::NodeCidr.resolve(IpFamily::V4, &node), LocalDetector::Cidr(net("10.0.1.0/24")));
    }

    #[test]
    fn node_port_addresses() {
        let all = NodePortAddresses::default();
        assert!(all.match_all(IpFamily::V4) && all.match_all(IpFamily::V6) && all.contains_ipv4_loopback());
        let some = NodePortAddresses::parse(&["192.168.0.0/16", "127.0.0.1/32"]).unwrap();
        assert!(!some.match_all(IpFamily::V4));
        assert!(some.match_all(IpFamily::V6), "no IPv6 CIDR means all IPv6 addresses");
        assert!(some.contains_ipv4_loopback());
        let locals: Vec<IpAddr> = ["192.168.1.5", "10.1.1.1", "127.0.0.1"].iter().map(|s| s.parse().unwrap()).collect();
        let ips = some.node_ips(IpFamily::V4, &locals, &NodeInfo::default());
        assert_eq!(ips, vec![locals[0], locals[2]]);
        assert!(!NodePortAddresses::parse(&["192.168.0.0/16"]).unwrap().contains_ipv4_loopback());
        assert!(NodePortAddresses::parse(&["0.0.0.0/0", "10.0.0.0/8"]).unwrap().match_all(IpFamily::V4));
        assert!(NodePortAddresses::parse(&["bogus"]).unwrap_err().contains("bogus"));
    }
}
