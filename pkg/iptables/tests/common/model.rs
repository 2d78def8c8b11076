//! Builders for model Snapshots used by the rule-generation, parity and netns tests.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use proxier::model::{Endpoint, FamilySnapshot, Protocol, ServicePortInfo, ServicePortName, ServicePortState};
use proxier::selection::{NodeTopology, categorize_endpoints};

pub const NODE: &str = "node1";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A ready, serving endpoint; `local` puts it on this node.
pub fn ep(addr: &str, port: u16, local: bool) -> Endpoint {
    Endpoint { is_local: local, ..Endpoint::new(ip(addr), port) }
}

/// A terminating endpoint that still serves.
pub fn terminating(addr: &str, port: u16, local: bool) -> Endpoint {
    Endpoint { ready: false, terminating: true, ..ep(addr, port, local) }
}

/// A Service port under construction.
#[derive(Clone)]
pub struct Svc {
    pub name: ServicePortName,
    pub info: ServicePortInfo,
    pub endpoints: Vec<Endpoint>,
}

pub fn svc(ns: &str, name: &str, port_name: &str, proto: Protocol, cluster_ip: &str, port: u16) -> Svc {
    Svc {
        name: ServicePortName::new(ns, name, port_name, proto),
        info: ServicePortInfo::new(ip(cluster_ip), port, proto),
        endpoints: vec![],
    }
}

impl Svc {
    pub fn node_port(mut self, p: u16) -> Self {
        self.info.node_port = p;
        self
    }
    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.info.external_ips = ips.iter().map(|s| ip(s)).collect();
        self
    }
    pub fn lb(mut self, vips: &[&str]) -> Self {
        self.info.load_balancer_vips = vips.iter().map(|s| ip(s)).collect();
        self
    }
    pub fn ranges(mut self, r: &[&str]) -> Self {
        self.info.load_balancer_source_ranges = r.iter().map(|s| net(s)).collect();
        self
    }
    pub fn etp_local(mut self, hcnp: u16) -> Self {
        self.info.external_policy_local = true;
        self.info.health_check_node_port = hcnp;
        self
    }
    pub fn itp_local(mut self) -> Self {
        self.info.internal_policy_local = true;
        self
    }
    pub fn affinity(mut self, seconds: u32) -> Self {
        self.info.session_affinity_timeout = Some(seconds);
        self
    }
    pub fn eps(mut self, eps: Vec<Endpoint>) -> Self {
        self.endpoints = eps;
        self
    }

    /// The model state, with endpoints sorted and selected as the tracker would.
    pub fn state(&self) -> ServicePortState {
        let mut eps = self.endpoints.clone();
        eps.sort_by_key(|e| e.addr_string());
        let topo = NodeTopology { node_name: NODE.into(), zone: None, prefer_same_node_hints: true };
        let selected = categorize_endpoints(&eps, &self.info, &topo);
        ServicePortState { info: Arc::new(self.info.clone()), endpoints: Arc::new(eps), selected }
    }
}

pub fn family_snapshot(svcs: &[Svc]) -> FamilySnapshot {
    let mut services = BTreeMap::new();
    for s in svcs {
        services.insert(s.name.clone(), s.state());
    }
    FamilySnapshot { services, health_checks: BTreeMap::new() }
}
