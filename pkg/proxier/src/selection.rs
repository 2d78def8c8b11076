//! Endpoint selection: which endpoints of a Service port this node may use, per traffic policy.
//!
//! This reproduces upstream's `CategorizeEndpoints` exactly and is the only place the rules live.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{Endpoint, EndpointList, SelectedEndpoints, ServicePortInfo};

/// The facts about this node that selection depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeTopology {
    /// This node's name, compared with endpoints' node hints.
    pub node_name: String,
    /// This node's `topology.kubernetes.io/zone` label, compared with zone hints.
    pub zone: Option<String>,
    /// Feature gate `PreferSameTrafficDistribution` (node hints honoured).
    pub prefer_same_node_hints: bool,
}

/// The topology rule chosen from the endpoints' hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// No topology restriction.
    Any,
    /// Only endpoints hinted for this node.
    SameNode,
    /// Only endpoints hinted for this node's zone.
    SameZone,
}

/// Picks the topology rule: hints count only when every ready endpoint carries one and at least one
/// of them names us; node hints (when the gate is on) win over zone hints.
fn topology_from_hints(endpoints: &[Endpoint], node: &NodeTopology) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::Any;
    }
    if node.prefer_same_node_hints
        && ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(&node.node_name))
    {
        return Topology::SameNode;
    }
    let zone = node.zone.as_deref().unwrap_or("");
    if ready.iter().all(|e| !e.zone_hints.is_empty()) && ready.iter().any(|e| e.zone_hints.contains(zone)) {
        return Topology::SameZone;
    }
    Topology::Any
}

fn fits_topology(ep: &Endpoint, topology: Topology, node: &NodeTopology) -> bool {
    match topology {
        Topology::Any => true,
        Topology::SameNode => ep.node_hints.contains(&node.node_name),
        Topology::SameZone => ep.zone_hints.contains(node.zone.as_deref().unwrap_or("")),
    }
}

fn serving_terminating(ep: &Endpoint) -> bool {
    ep.serving && ep.terminating
}

/// The endpoints of `all` that pass `keep`: `all` itself (shared) when every one does.
fn filtered(all: &Arc<Vec<Endpoint>>, keep: impl Fn(&Endpoint) -> bool) -> EndpointList {
    if all.iter().all(&keep) { EndpointList::shared(all) } else { all.iter().filter(|e| keep(e)).cloned().collect() }
}

/// Splits `endpoints` (sorted by address) into the cluster-policy and local-policy sets for `info` on
/// this node, with upstream's fallback to serving-and-terminating endpoints when no ready one is usable.
pub fn categorize_endpoints(endpoints: &[Endpoint], info: &ServicePortInfo, node: &NodeTopology) -> SelectedEndpoints {
    categorize_shared(&Arc::new(endpoints.to_vec()), info, node)
}

/// [`categorize_endpoints`] on a shared list: results equal to the list (or to each other) share it.
pub fn categorize_shared(
    endpoints: &Arc<Vec<Endpoint>>,
    info: &ServicePortInfo,
    node: &NodeTopology,
) -> SelectedEndpoints {
    let mut out = SelectedEndpoints::default();
    if endpoints.is_empty() {
        return out;
    }

    let mut topology = Topology::Any;
    if info.uses_cluster_endpoints() {
        topology = topology_from_hints(endpoints, node);
        out.cluster = filtered(endpoints, |e| e.ready && fits_topology(e, topology, node));
        // No ready endpoint anywhere: keep serving through terminating ones, ignoring topology.
        if out.cluster.is_empty() {
            out.cluster = filtered(endpoints, serving_terminating);
        }
        out.has_any = !out.cluster.is_empty();
    }

    if !info.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }

    let mut local_ready = false;
    let mut local_terminating = false;
    for ep in endpoints.iter() {
        if ep.ready {
            out.has_any = true;
            local_ready |= ep.is_local;
        } else if serving_terminating(ep) {
            out.has_any = true;
            local_terminating |= ep.is_local;
        }
    }
    let used_terminating = !local_ready && local_terminating;
    if local_ready {
        out.local = filtered(endpoints, |e| e.is_local && e.ready);
    } else if local_terminating {
        out.local = filtered(endpoints, |e| e.is_local && serving_terminating(e));
    }

    if !info.uses_cluster_endpoints() {
        out.all_reachable = out.local.clone();
        return out;
    }
    if topology == Topology::Any && !used_terminating {
        // Every ready endpoint is already in the cluster set, so it contains the local set.
        out.all_reachable = out.cluster.clone();
        return out;
    }
    let mut union: BTreeMap<String, Endpoint> = BTreeMap::new();
    for ep in out.cluster.iter().chain(out.local.iter()) {
        union.insert(ep.addr_string(), ep.clone());
    }
    out.all_reachable = union.into_values().collect();
    out
}
