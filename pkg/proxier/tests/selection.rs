//! Endpoint selection, one case per rule of upstream's categorisation (reference §6.4), in our own words.

use std::collections::BTreeSet;
use std::net::IpAddr;

use proxier::model::{Endpoint, Protocol, ServicePortInfo};
use proxier::selection::{NodeTopology, categorize_endpoints};

const NODE: &str = "node-a";

#[derive(Clone, Copy)]
enum State {
    Ready,
    /// Ready=false, serving=false, terminating=false: a pod that is starting or failing its probe.
    NotReady,
    /// Terminating but still passing readiness (serving=true, ready=false).
    ServingTerminating,
    /// Terminating and no longer serving.
    Terminating,
}

fn ep(last: u8, state: State, local: bool, zones: &[&str], nodes: &[&str]) -> Endpoint {
    let (ready, serving, terminating) = match state {
        State::Ready => (true, true, false),
        State::NotReady => (false, false, false),
        State::ServingTerminating => (false, true, true),
        State::Terminating => (false, false, true),
    };
    Endpoint {
        ip: IpAddr::from([198, 18, 1, last]),
        port: 8080,
        ready,
        serving,
        terminating,
        is_local: local,
        zone_hints: zones.iter().map(|s| s.to_string()).collect(),
        node_hints: nodes.iter().map(|s| s.to_string()).collect(),
    }
}

#[derive(Clone, Copy)]
enum Svc {
    ClusterIp,
    /// ClusterIP service with internalTrafficPolicy: Local.
    InternalLocal,
    /// NodePort service with externalTrafficPolicy: Local.
    ExternalLocal,
    /// NodePort service with both policies Local.
    BothLocal,
    /// NodePort service with the default policies.
    NodePort,
}

fn info(kind: Svc) -> ServicePortInfo {
    let (np, etp, itp) = match kind {
        Svc::ClusterIp => (0, false, false),
        Svc::InternalLocal => (0, false, true),
        Svc::ExternalLocal => (30080, true, false),
        Svc::BothLocal => (30080, true, true),
        Svc::NodePort => (30080, false, false),
    };
    ServicePortInfo {
        cluster_ip: IpAddr::from([198, 19, 0, 10]),
        port: 80,
        protocol: Protocol::Tcp,
        node_port: np,
        session_affinity_timeout: None,
        external_ips: vec![],
        load_balancer_vips: vec![],
        load_balancer_source_ranges: vec![],
        external_policy_local: etp,
        internal_policy_local: itp,
        health_check_node_port: 0,
    }
}

fn topo(zone: Option<&str>, node_hints_gate: bool) -> NodeTopology {
    NodeTopology { node_name: NODE.into(), zone: zone.map(String::from), prefer_same_node_hints: node_hints_gate }
}

fn ids(eps: &[Endpoint]) -> BTreeSet<u8> {
    eps.iter()
        .map(|e| match e.ip {
            IpAddr::V4(v) => v.octets()[3],
            IpAddr::V6(_) => unreachable!(),
        })
        .collect()
}

struct Case {
    name: &'static str,
    svc: Svc,
    topo: NodeTopology,
    endpoints: Vec<Endpoint>,
    cluster: &'static [u8],
    local: &'static [u8],
    reachable: &'static [u8],
    has_any: bool,
}

#[test]
fn categorisation_rules() {
    let zone_a = Some("zone-a");
    let cases = vec![
        Case {
            name: "no endpoints at all: nothing usable, traffic is rejected",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![],
            cluster: &[],
            local: &[],
            reachable: &[],
            has_any: false,
        },
        Case {
            name: "cluster policy uses every ready endpoint, local or not",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, true, &[], &[]), ep(2, State::Ready, false, &[], &[])],
            cluster: &[1, 2],
            local: &[],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "not-ready endpoints are never used while ready ones exist",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, false, &[], &[]), ep(2, State::NotReady, false, &[], &[])],
            cluster: &[1],
            local: &[],
            reachable: &[1],
            has_any: true,
        },
        Case {
            name: "serving-terminating endpoints are skipped while a ready one exists",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, false, &[], &[]), ep(2, State::ServingTerminating, false, &[], &[])],
            cluster: &[1],
            local: &[],
            reachable: &[1],
            has_any: true,
        },
        Case {
            name: "no ready endpoint: cluster policy falls back to serving-terminating ones",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![
                ep(1, State::ServingTerminating, false, &[], &[]),
                ep(2, State::Terminating, false, &[], &[]),
                ep(3, State::NotReady, false, &[], &[]),
            ],
            cluster: &[1],
            local: &[],
            reachable: &[1],
            has_any: true,
        },
        Case {
            name: "terminating endpoints that stopped serving are never used: reject",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Terminating, false, &[], &[]), ep(2, State::NotReady, false, &[], &[])],
            cluster: &[],
            local: &[],
            reachable: &[],
            has_any: false,
        },
        Case {
            name: "internal Local: only local ready endpoints; remote ones keep has_any true (drop, not reject)",
            svc: Svc::InternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, true, &[], &[]), ep(2, State::Ready, false, &[], &[])],
            cluster: &[],
            local: &[1],
            reachable: &[1],
            has_any: true,
        },
        Case {
            name: "internal Local with no local endpoint: nothing reachable here, but endpoints exist elsewhere",
            svc: Svc::InternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(2, State::Ready, false, &[], &[])],
            cluster: &[],
            local: &[],
            reachable: &[],
            has_any: true,
        },
        Case {
            name: "internal Local falls back to local serving-terminating endpoints",
            svc: Svc::InternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::ServingTerminating, true, &[], &[]), ep(2, State::Ready, false, &[], &[])],
            cluster: &[],
            local: &[1],
            reachable: &[1],
            has_any: true,
        },
        Case {
            name: "internal Local: local ready endpoints win over local serving-terminating ones",
            svc: Svc::InternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::ServingTerminating, true, &[], &[]), ep(3, State::Ready, true, &[], &[])],
            cluster: &[],
            local: &[3],
            reachable: &[3],
            has_any: true,
        },
        Case {
            name: "internal Local, only serving-terminating endpoints remote: has_any without a local one",
            svc: Svc::InternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(2, State::ServingTerminating, false, &[], &[])],
            cluster: &[],
            local: &[],
            reachable: &[],
            has_any: true,
        },
        Case {
            name: "external Local NodePort: cluster set for in-cluster traffic, local set for external traffic",
            svc: Svc::ExternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, true, &[], &[]), ep(2, State::Ready, false, &[], &[])],
            cluster: &[1, 2],
            local: &[1],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "external Local with only a terminating local endpoint: union keeps it reachable",
            svc: Svc::ExternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::ServingTerminating, true, &[], &[]), ep(2, State::Ready, false, &[], &[])],
            cluster: &[2],
            local: &[1],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "both policies Local on a NodePort still use cluster endpoints (externally accessible)",
            svc: Svc::BothLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, true, &[], &[]), ep(2, State::Ready, false, &[], &[])],
            cluster: &[1, 2],
            local: &[1],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "zone hints: every ready endpoint hinted and one for our zone restricts to our zone",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![
                ep(1, State::Ready, false, &["zone-a"], &[]),
                ep(2, State::Ready, false, &["zone-b"], &[]),
                ep(3, State::NotReady, false, &[], &[]),
            ],
            cluster: &[1],
            local: &[],
            reachable: &[1],
            has_any: true,
        },
        Case {
            name: "zone hints are ignored when one ready endpoint has none",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, false, &["zone-a"], &[]), ep(2, State::Ready, false, &[], &[])],
            cluster: &[1, 2],
            local: &[],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "zone hints are ignored when none names our zone",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, false, &["zone-b"], &[]), ep(2, State::Ready, false, &["zone-c"], &[])],
            cluster: &[1, 2],
            local: &[],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "zone hints are ignored when the node has no zone label",
            svc: Svc::ClusterIp,
            topo: topo(None, true),
            endpoints: vec![ep(1, State::Ready, false, &["zone-a"], &[]), ep(2, State::Ready, false, &["zone-b"], &[])],
            cluster: &[1, 2],
            local: &[],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "node hints (PreferSameTrafficDistribution on) restrict to endpoints hinted for this node",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![
                ep(1, State::Ready, true, &["zone-a"], &[NODE]),
                ep(2, State::Ready, false, &["zone-a"], &["node-b"]),
                ep(3, State::Ready, false, &["zone-b"], &["node-c"]),
            ],
            cluster: &[1],
            local: &[],
            reachable: &[1],
            has_any: true,
        },
        Case {
            name: "node hints with the gate off: zone hints apply instead",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, false),
            endpoints: vec![
                ep(1, State::Ready, true, &["zone-a"], &[NODE]),
                ep(2, State::Ready, false, &["zone-a"], &["node-b"]),
                ep(3, State::Ready, false, &["zone-b"], &["node-c"]),
            ],
            cluster: &[1, 2],
            local: &[],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "node hints that never name this node fall back to zone hints",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![
                ep(2, State::Ready, false, &["zone-a"], &["node-b"]),
                ep(3, State::Ready, false, &["zone-b"], &["node-c"]),
            ],
            cluster: &[2],
            local: &[],
            reachable: &[2],
            has_any: true,
        },
        Case {
            name: "terminating fallback ignores topology hints",
            svc: Svc::ClusterIp,
            topo: topo(zone_a, true),
            endpoints: vec![
                ep(1, State::ServingTerminating, false, &["zone-b"], &[]),
                ep(2, State::ServingTerminating, false, &["zone-c"], &[]),
            ],
            cluster: &[1, 2],
            local: &[],
            reachable: &[1, 2],
            has_any: true,
        },
        Case {
            name: "topology never applies to the Local policy; the union adds local endpoints of other zones",
            svc: Svc::ExternalLocal,
            topo: topo(zone_a, true),
            endpoints: vec![ep(1, State::Ready, true, &["zone-b"], &[]), ep(2, State::Ready, false, &["zone-a"], &[])],
            cluster: &[2],
            local: &[1],
            reachable: &[1, 2],
            has_any: true,
        },
    ];
    let mut failures = Vec::new();
    for c in cases {
        let got = categorize_endpoints(&c.endpoints, &info(c.svc), &c.topo);
        let want = (ids_of(c.cluster), ids_of(c.local), ids_of(c.reachable), c.has_any);
        let have = (ids(&got.cluster), ids(&got.local), ids(&got.all_reachable), got.has_any);
        if want != have {
            failures.push(format!("{}: want {:?}, got {:?}", c.name, want, have));
        }
    }
    assert!(failures.is_empty(), "selection mismatches:\n{}", failures.join("\n"));
}

fn ids_of(v: &[u8]) -> BTreeSet<u8> {
    v.iter().copied().collect()
}

#[test]
fn derived_policy_flags_follow_upstream() {
    // ExternallyAccessible / UsesClusterEndpoints / UsesLocalEndpoints.
    let cluster = info(Svc::ClusterIp);
    assert!(!cluster.externally_accessible() && cluster.uses_cluster_endpoints() && !cluster.uses_local_endpoints());
    let itp = info(Svc::InternalLocal);
    assert!(!itp.uses_cluster_endpoints() && itp.uses_local_endpoints());
    let etp = info(Svc::ExternalLocal);
    assert!(etp.externally_accessible() && etp.uses_cluster_endpoints() && etp.uses_local_endpoints());
    let np = info(Svc::NodePort);
    assert!(np.uses_cluster_endpoints() && !np.uses_local_endpoints());
    // An ExternalIP alone makes a service externally accessible.
    let mut ext = info(Svc::InternalLocal);
    ext.external_ips.push(IpAddr::from([198, 18, 200, 1]));
    assert!(ext.externally_accessible() && ext.uses_cluster_endpoints());
}

#[test]
fn reachable_set_is_sorted_by_address() {
    let eps = vec![ep(30, State::ServingTerminating, true, &[], &[]), ep(4, State::Ready, false, &[], &[])];
    let got = categorize_endpoints(&eps, &info(Svc::ExternalLocal), &topo(None, true));
    let addrs: Vec<String> = got.all_reachable.iter().map(|e| e.addr_string()).collect();
    let mut sorted = addrs.clone();
    sorted.sort();
    assert_eq!(addrs, sorted);
    assert_eq!(addrs.len(), 2);
}
