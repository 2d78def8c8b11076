//! Turns Kubernetes Services and EndpointSlices into the model, rejecting malformed objects whole.
//!
//! A Service or EndpointSlice that cannot be parsed completely is an error naming the object and the field;
//! the caller logs it once, counts it and leaves it out, so nothing is half-programmed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Endpoint, IpFamily, NamespacedName, Protocol, ServicePortInfo, ServicePortName};

/// Label EndpointSlices carry to name their Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Annotation with the time the change that produced an EndpointSlice was triggered.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// Largest allowed affinity timeout (1 day), as the API validates.
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// Why an object was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct ParseError {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// `namespace/name` of the object.
    pub object: String,
    /// The offending field path.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A Service's ports for each family; empty when the Service is not proxied (headless, ExternalName).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedService {
    /// IPv4 ports.
    pub v4: BTreeMap<ServicePortName, Arc<ServicePortInfo>>,
    /// IPv6 ports.
    pub v6: BTreeMap<ServicePortName, Arc<ServicePortInfo>>,
}

impl ParsedService {
    /// The ports of one family.
    pub fn family(&self, family: IpFamily) -> &BTreeMap<ServicePortName, Arc<ServicePortInfo>> {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }
}

/// One port an EndpointSlice declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Port name (`""` when unnamed), matching the Service port's name.
    pub name: String,
    /// Target port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// An EndpointSlice reduced to what the proxy uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSlice {
    /// The Service it belongs to (`kubernetes.io/service-name` label).
    pub service: NamespacedName,
    /// Its address family.
    pub family: IpFamily,
    /// Its ports.
    pub ports: Vec<SlicePort>,
    /// Its endpoints; `port` is 0 here and filled in per slice port.
    pub endpoints: Vec<Endpoint>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, if present and valid.
    pub trigger_time: Option<SystemTime>,
}

struct Ctx<'a> {
    kind: &'static str,
    object: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ParseError {
        ParseError { kind: self.kind, object: self.object.to_string(), field: field.into(), reason: reason.into() }
    }

    fn ip(&self, field: String, s: &str) -> Result<IpAddr, ParseError> {
        IpAddr::from_str(s.trim()).map_err(|_| self.err(field, format!("invalid IP address {s:?}")))
    }

    fn port(&self, field: String, p: i32) -> Result<u16, ParseError> {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.err(field, format!("port {p} out of range 1-65535")))
    }

    fn protocol(&self, field: String, p: Option<&str>) -> Result<Protocol, ParseError> {
        let p = p.unwrap_or("TCP");
        Protocol::parse(p).ok_or_else(|| self.err(field, format!("unknown protocol {p:?}")))
    }
}

fn object_name(ns: Option<&String>, name: Option<&String>) -> String {
    format!("{}/{}", ns.map(String::as_str).unwrap_or(""), name.map(String::as_str).unwrap_or(""))
}

/// Parses a Service into its per-family ports, or says why it cannot be used.
pub fn parse_service(svc: &Service) -> Result<ParsedService, ParseError> {
    parse_service_named(svc, None)
}

/// [`parse_service`] whose port names share `service` (the caller's key for this Service) when given.
pub(crate) fn parse_service_named(
    svc: &Service,
    service: Option<&NamespacedName>,
) -> Result<ParsedService, ParseError> {
    let object = object_name(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref());
    let cx = Ctx { kind: "Service", object: &object };
    let (Some(ns), Some(name)) = (svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref()) else {
        return Err(cx.err("metadata", "missing namespace or name"));
    };
    let service = match service {
        Some(nn) if nn.namespace() == ns && nn.name() == name => nn.clone(),
        _ => NamespacedName::new(ns, name),
    };
    let Some(spec) = svc.spec.as_ref() else {
        return Err(cx.err("spec", "missing"));
    };
    let mut out = ParsedService::default();
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    // Not proxied: headless, not yet allocated, or DNS-only.
    if cluster_ip == "None" || cluster_ip.is_empty() || svc_type == "ExternalName" {
        return Ok(out);
    }
    if !matches!(svc_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(cx.err("spec.type", format!("unknown Service type {svc_type:?}")));
    }

    let mut cluster_ips: Vec<IpAddr> = vec![cx.ip("spec.clusterIP".into(), cluster_ip)?];
    for (i, s) in spec.cluster_ips.iter().flatten().enumerate() {
        let ip = cx.ip(format!("spec.clusterIPs[{i}]"), s)?;
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    let ips = |field: &str, list: &[String]| -> Result<Vec<IpAddr>, ParseError> {
        list.iter().enumerate().map(|(i, s)| cx.ip(format!("{field}[{i}]"), s)).collect()
    };
    let external_ips = ips("spec.externalIPs", spec.external_ips.as_deref().unwrap_or_default())?;
    let mut lb_vips = Vec::new();
    for (i, ing) in
        svc.status.iter().filter_map(|s| s.load_balancer.as_ref()).flat_map(|l| l.ingress.iter().flatten()).enumerate()
    {
        let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else { continue };
        let ip = cx.ip(format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
        // ipMode Proxy: the load balancer delivers to the node itself, so the VIP is not ours to serve.
        if matches!(ing.ip_mode.as_deref(), None | Some("VIP")) {
            lb_vips.push(ip);
        }
    }
    let mut source_ranges = Vec::new();
    for (i, s) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        let net = IpNet::from_str(s.trim())
            .map_err(|_| cx.err(format!("spec.loadBalancerSourceRanges[{i}]"), format!("invalid CIDR {s:?}")))?;
        source_ranges.push(net.trunc());
    }

    let affinity = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            if t <= 0 || t as u32 > MAX_AFFINITY_TIMEOUT {
                return Err(cx.err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} out of range 1-{MAX_AFFINITY_TIMEOUT}"),
                ));
            }
            Some(t as u32)
        }
        other => return Err(cx.err("spec.sessionAffinity", format!("unknown value {other:?}"))),
    };
    let externally_exposed = matches!(svc_type, "NodePort" | "LoadBalancer");
    let etp_local = externally_exposed && spec.external_traffic_policy.as_deref() == Some("Local");
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let hc_port = if svc_type == "LoadBalancer" && etp_local {
        let p = spec.health_check_node_port.unwrap_or(0);
        if p == 0 { 0 } else { cx.port("spec.healthCheckNodePort".into(), p)? }
    } else {
        0
    };

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(cx.err("spec.ports", "a proxied Service needs at least one port"));
    }
    let mut seen_names = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    let mut parsed_ports = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = cx.port(format!("{field}.port"), p.port)?;
        let protocol = cx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?;
        let name = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            return Err(cx.err(format!("{field}.name"), "ports of a multi-port Service must be named"));
        }
        if !seen_names.insert(name.clone()) {
            return Err(cx.err(format!("{field}.name"), format!("duplicate port name {name:?}")));
        }
        if !seen_ports.insert((port, protocol)) {
            return Err(cx.err(format!("{field}.port"), format!("duplicate port {port}/{protocol}")));
        }
        let node_port = match p.node_port {
            None | Some(0) => 0,
            Some(np) => cx.port(format!("{field}.nodePort"), np)?,
        };
        // One name per port, shared by both families.
        parsed_ports.push((ServicePortName::of_service(service.clone(), &name, protocol), port, protocol, node_port));
    }

    for family in IpFamily::ALL {
        let Some(cip) = cluster_ips.iter().find(|ip| IpFamily::of(ip) == family) else { continue };
        let of_family = |v: &[IpAddr]| v.iter().copied().filter(|ip| IpFamily::of(ip) == family).collect::<Vec<_>>();
        let ranges: Vec<IpNet> = source_ranges
            .iter()
            .copied()
            .filter(|n| matches!((n, family), (IpNet::V4(_), IpFamily::V4) | (IpNet::V6(_), IpFamily::V6)))
            .collect();
        let map = match family {
            IpFamily::V4 => &mut out.v4,
            IpFamily::V6 => &mut out.v6,
        };
        for (spn, port, protocol, node_port) in &parsed_ports {
            let info = ServicePortInfo {
                cluster_ip: *cip,
                port: *port,
                protocol: *protocol,
                node_port: *node_port,
                session_affinity_timeout: affinity,
                external_ips: of_family(&external_ips),
                load_balancer_vips: of_family(&lb_vips),
                load_balancer_source_ranges: ranges.clone(),
                external_policy_local: etp_local,
                internal_policy_local: itp_local,
                health_check_node_port: hc_port,
            };
            map.insert(spn.clone(), Arc::new(info));
        }
    }
    Ok(out)
}

/// Parses an EndpointSlice; `node_name` decides which endpoints are local.
pub fn parse_endpoint_slice(slice: &EndpointSlice, node_name: &str) -> Result<ParsedSlice, ParseError> {
    let object = object_name(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
    let cx = Ctx { kind: "EndpointSlice", object: &object };
    let Some(ns) = slice.metadata.namespace.as_deref() else {
        return Err(cx.err("metadata.namespace", "missing"));
    };
    let svc_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| cx.err(format!("metadata.labels[{LABEL_SERVICE_NAME}]"), "missing"))?;
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        other => return Err(cx.err("addressType", format!("{other:?} is not proxied (only IPv4 and IPv6)"))),
    };

    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let Some(port) = p.port else {
            return Err(cx.err(format!("{field}.port"), "missing"));
        };
        let port = cx.port(format!("{field}.port"), port)?;
        let protocol = cx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?;
        let name = p.name.clone().unwrap_or_default();
        if !seen.insert((name.clone(), protocol)) {
            return Err(cx.err(format!("{field}.name"), format!("duplicate port {name:?}/{protocol}")));
        }
        ports.push(SlicePort { name, port, protocol });
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{i}].addresses[0]");
        let Some(addr) = ep.addresses.first() else {
            return Err(cx.err(field, "missing"));
        };
        let ip = cx.ip(field.clone(), addr)?;
        if IpFamily::of(&ip) != family {
            return Err(cx.err(field, format!("{addr} is not an {family} address")));
        }
        let cond = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        endpoints.push(Endpoint {
            ip,
            port: 0,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            is_local: ep.node_name.as_deref() == Some(node_name),
            zone_hints: hints.iter().flat_map(|h| h.for_zones.iter().flatten()).map(|z| z.name.clone()).collect(),
            node_hints: hints.iter().flat_map(|h| h.for_nodes.iter().flatten()).map(|n| n.name.clone()).collect(),
        });
    }

    let trigger_time =
        slice.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_TRIGGER_TIME)).and_then(|s| parse_rfc3339(s));
    Ok(ParsedSlice { service: NamespacedName::new(ns, svc_name), family, ports, endpoints, trigger_time })
}

/// Parses an RFC 3339 timestamp (`2026-01-02T03:04:05Z`, optional fraction and offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t: k8s_openapi::jiff::Timestamp = s.parse().ok()?;
    Some(SystemTime::from(t))
}
