//! The proxy model: what every node must program, independent of Kubernetes types and of backends.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;

/// An IP family, spelled as Kubernetes spells it (`IPv4`, `IPv6`), which is also the `ip_family` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// Both families, IPv4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// Kubernetes' spelling: `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// The family of an address; an IPv4-mapped IPv6 address counts as IPv6, as in Kubernetes.
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transport protocol a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Kubernetes' spelling: `TCP`, `UDP`, `SCTP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Lower-case form used by iptables and ipset (`tcp`, `udp`, `sctp`).
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// IANA protocol number (6, 17, 132).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Parses Kubernetes' spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespace and name, shared: a clone is a reference-count bump, and the Service's ports, slices and
/// every map keyed by it share one allocation. Ordered and hashed by (namespace, name).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName(Arc<NameParts>);

// Field order is the sort order: namespace, then name.
#[derive(PartialEq, Eq, PartialOrd, Ord, Hash)]
struct NameParts {
    namespace: Box<str>,
    name: Box<str>,
}

impl NamespacedName {
    /// Builds a name from its parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        NamespacedName(Arc::new(NameParts { namespace: namespace.into(), name: name.into() }))
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

impl fmt::Debug for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamespacedName").field("namespace", &self.namespace()).field("name", &self.name()).finish()
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())
    }
}

/// Upstream's `ServicePortName`: one port of one Service, the unit every backend programs.
///
/// The names are shared like [`NamespacedName`]'s (a clone is a reference-count bump, a map key 16 bytes);
/// ordered and hashed by (namespace, name, port, protocol). `Display` is upstream's `String()`: `ns/name`
/// plus `:port` when the port has a name; the protocol is not part of the string (iptables' chain-name
/// hashes append it themselves).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    // Field order is the sort order: (namespace, name, port), then protocol.
    names: Arc<PortNameParts>,
    /// The port's protocol.
    pub protocol: Protocol,
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PortNameParts {
    service: NamespacedName,
    port: Box<str>,
}

impl ServicePortName {
    /// Builds a name from its parts.
    pub fn new(namespace: &str, name: &str, port: &str, protocol: Protocol) -> Self {
        Self::of_service(NamespacedName::new(namespace, name), port, protocol)
    }

    /// A port of `service`, sharing its storage.
    pub fn of_service(service: NamespacedName, port: &str, protocol: Protocol) -> Self {
        ServicePortName { names: Arc::new(PortNameParts { service, port: port.into() }), protocol }
    }

    /// The Service.
    pub fn service(&self) -> &NamespacedName {
        &self.names.service
    }

    /// The Service's namespace.
    pub fn namespace(&self) -> &str {
        self.names.service.namespace()
    }

    /// The Service's name.
    pub fn name(&self) -> &str {
        self.names.service.name()
    }

    /// The port's name (`""` when unnamed).
    pub fn port(&self) -> &str {
        &self.names.port
    }
}

impl fmt::Debug for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServicePortName")
            .field("service", self.service())
            .field("port", &self.port())
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port().is_empty() {
            write!(f, "{}", self.service())
        } else {
            write!(f, "{}:{}", self.service(), self.port())
        }
    }
}

/// Upstream's `BaseServicePortInfo`: everything about one Service port for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// The ClusterIP of this family.
    pub cluster_ip: IpAddr,
    /// The Service port.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
    /// The NodePort, 0 when none.
    pub node_port: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds, `None` without affinity.
    pub session_affinity_timeout: Option<u32>,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs of this family (only `ipMode` unset or `VIP`).
    pub load_balancer_vips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` of this family.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// NodePort/LoadBalancer with `externalTrafficPolicy: Local`.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    /// `spec.healthCheckNodePort` when the Service needs one (LoadBalancer + ETP Local), else 0.
    pub health_check_node_port: u16,
}

impl ServicePortInfo {
    /// A plain ClusterIP port: no NodePort, affinity, external addresses, source ranges or Local policies.
    pub fn new(cluster_ip: IpAddr, port: u16, protocol: Protocol) -> Self {
        ServicePortInfo {
            cluster_ip,
            port,
            protocol,
            node_port: 0,
            session_affinity_timeout: None,
            external_ips: vec![],
            load_balancer_vips: vec![],
            load_balancer_source_ranges: vec![],
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: 0,
        }
    }

    /// Reachable from outside the cluster: NodePort, LoadBalancer IPs or ExternalIPs.
    pub fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.load_balancer_vips.is_empty() || !self.external_ips.is_empty()
    }

    /// Some traffic to this port uses cluster-wide endpoints.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Some traffic to this port uses only node-local endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }

    /// The family of the ClusterIP.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.cluster_ip)
    }
}

/// Upstream's `BaseEndpointInfo`: one endpoint address and port of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Endpoint IP (`addresses[0]` of the slice endpoint).
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// `conditions.ready`, nil counting as true.
    pub ready: bool,
    /// `conditions.serving`, nil counting as true.
    pub serving: bool,
    /// `conditions.terminating`, nil counting as false.
    pub terminating: bool,
    /// The endpoint's `nodeName` is this node.
    pub is_local: bool,
    /// `hints.forZones[].name`.
    pub zone_hints: BTreeSet<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: BTreeSet<String>,
}

impl Endpoint {
    /// A ready, serving, non-terminating endpoint on another node, without hints.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Endpoint {
            ip,
            port,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            zone_hints: BTreeSet::new(),
            node_hints: BTreeSet::new(),
        }
    }

    /// `ip:port`, with brackets for IPv6: the sort key and identity upstream uses.
    pub fn addr_string(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }
}

/// An immutable, shared list of endpoints: selection results usually equal the port's whole list or each
/// other, and sharing them keeps one copy per port instead of three (a million endpoints at 100k services).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointList(Arc<Vec<Endpoint>>);

impl EndpointList {
    /// Shares `list`.
    pub fn shared(list: &Arc<Vec<Endpoint>>) -> Self {
        EndpointList(list.clone())
    }
}

impl std::ops::Deref for EndpointList {
    type Target = [Endpoint];
    fn deref(&self) -> &[Endpoint] {
        &self.0
    }
}

impl From<Vec<Endpoint>> for EndpointList {
    fn from(v: Vec<Endpoint>) -> Self {
        EndpointList(Arc::new(v))
    }
}

impl FromIterator<Endpoint> for EndpointList {
    fn from_iter<I: IntoIterator<Item = Endpoint>>(iter: I) -> Self {
        EndpointList(Arc::new(iter.into_iter().collect()))
    }
}

impl<'a> IntoIterator for &'a EndpointList {
    type Item = &'a Endpoint;
    type IntoIter = std::slice::Iter<'a, Endpoint>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The result of endpoint selection for one Service port (upstream's `CategorizeEndpoints`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectedEndpoints {
    /// Endpoints for traffic with the Cluster policy.
    pub cluster: EndpointList,
    /// Endpoints for traffic with the Local policy.
    pub local: EndpointList,
    /// Union of the two, sorted by address.
    pub all_reachable: EndpointList,
    /// Some usable endpoint exists anywhere; false means traffic is rejected.
    pub has_any: bool,
}

/// Everything a backend needs about one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortState {
    /// The Service port.
    pub info: Arc<ServicePortInfo>,
    /// Every known endpoint of this port, sorted by `ip:port`.
    pub endpoints: Arc<Vec<Endpoint>>,
    /// Endpoint selection for this node.
    pub selected: SelectedEndpoints,
}

/// A Service that needs a health-check node port on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckService {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Distinct local ready endpoint IPs.
    pub local_endpoints: usize,
}

/// The full desired state for one IP family.
#[derive(Debug, Clone, Default)]
pub struct FamilySnapshot {
    /// Every Service port of this family, keyed by name.
    pub services: BTreeMap<ServicePortName, ServicePortState>,
    /// Services with a health-check node port, with their local ready endpoint counts.
    pub health_checks: BTreeMap<NamespacedName, HealthCheckService>,
}

/// What this proxy knows about its own Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name (hostname-override or hostname).
    pub name: String,
    /// `topology.kubernetes.io/zone`, if labelled.
    pub zone: Option<String>,
    /// The Node object's addresses (InternalIP first, then ExternalIP).
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNet>,
    /// The Node object exists, is not being deleted and not tainted `ToBeDeletedByClusterAutoscaler`.
    pub eligible: bool,
}

/// The desired state handed to a backend: both families and the node.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// IPv4 Service ports.
    pub v4: FamilySnapshot,
    /// IPv6 Service ports.
    pub v6: FamilySnapshot,
    /// This node.
    pub node: NodeInfo,
}

impl Snapshot {
    /// The snapshot of one family.
    pub fn family(&self, family: IpFamily) -> &FamilySnapshot {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    /// Mutable access to one family.
    pub fn family_mut(&mut self, family: IpFamily) -> &mut FamilySnapshot {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

/// What changed in one family since the previous sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyChanges {
    /// Service ports added, changed or removed (removed ones are absent from the snapshot).
    pub services: BTreeSet<ServicePortName>,
    /// A UDP Service port's endpoints or addresses changed: stale conntrack entries must go.
    pub conntrack_cleanup_required: bool,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of changed EndpointSlices.
    pub trigger_times: Vec<SystemTime>,
}

/// The changes a sync must apply, per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Rewrite everything (first sync, periodic full sync, topology change, after a failure).
    pub full: bool,
    /// IPv4 changes.
    pub v4: FamilyChanges,
    /// IPv6 changes.
    pub v6: FamilyChanges,
}

impl Changes {
    /// The changes of one family.
    pub fn family(&self, family: IpFamily) -> &FamilyChanges {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    /// Mutable access to one family's changes.
    pub fn family_mut(&mut self, family: IpFamily) -> &mut FamilyChanges {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        !self.full && self.v4.services.is_empty() && self.v6.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    // Names whose string order differs from their tuple order ("a-b" < "a/" but "a" < "a-b").
    const PARTS: [(&str, &str, &str, Protocol); 8] = [
        ("a-b", "x", "", Protocol::Tcp),
        ("a", "x", "http", Protocol::Udp),
        ("a", "x", "http", Protocol::Tcp),
        ("a", "x", "", Protocol::Sctp),
        ("a", "x-y", "", Protocol::Tcp),
        ("a", "x", "dns", Protocol::Udp),
        ("", "x", "", Protocol::Tcp),
        ("b", "", "z", Protocol::Tcp),
    ];

    #[test]
    fn names_order_and_hash_by_namespace_name_port_protocol() {
        let mut by_tuple = PARTS.to_vec();
        by_tuple.sort();
        let mut names: Vec<ServicePortName> =
            PARTS.iter().map(|(ns, n, p, proto)| ServicePortName::new(ns, n, p, *proto)).collect();
        names.sort();
        let sorted: Vec<_> = names.iter().map(|s| (s.namespace(), s.name(), s.port(), s.protocol)).collect();
        assert_eq!(sorted, by_tuple);

        // Separately built equal names are equal and hash alike; a different protocol is a different name.
        let set: HashSet<ServicePortName> = names.iter().cloned().collect();
        for (ns, n, p, proto) in PARTS {
            assert!(set.contains(&ServicePortName::new(ns, n, p, proto)), "{ns}/{n}:{p}/{proto}");
        }
        assert!(!set.contains(&ServicePortName::new("a", "x", "dns", Protocol::Tcp)));
        let nns: HashSet<NamespacedName> = PARTS.iter().map(|(ns, n, _, _)| NamespacedName::new(ns, n)).collect();
        assert!(nns.contains(&NamespacedName::new("a", "x-y")));
        assert!(NamespacedName::new("a", "x-y") < NamespacedName::new("a-b", "x"));
    }

    #[test]
    fn names_display_like_upstream_and_share_storage() {
        let spn = ServicePortName::new("ns", "web", "http", Protocol::Tcp);
        assert_eq!(spn.to_string(), "ns/web:http");
        assert_eq!(ServicePortName::new("ns", "web", "", Protocol::Udp).to_string(), "ns/web");
        assert_eq!(spn.service().to_string(), "ns/web");
        assert_eq!(
            format!("{spn:?}"),
            r#"ServicePortName { service: NamespacedName { namespace: "ns", name: "web" }, port: "http", protocol: Tcp }"#
        );

        let copy = spn.clone();
        assert!(std::ptr::eq(copy.port(), spn.port()));
        let other_port = ServicePortName::of_service(spn.service().clone(), "https", Protocol::Tcp);
        assert!(std::ptr::eq(other_port.namespace(), spn.namespace()));
        assert!(std::ptr::eq(other_port.name(), spn.name()));
    }
}
