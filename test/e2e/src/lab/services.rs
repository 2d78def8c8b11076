//! Services and their EndpointSlices in the lab's API server, and waiting until a node's proxy programs them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::{Family, Lab, NAMESPACE, Place, Proto, pods_answered};
use crate::objects::merge;

/// First IPv4 ClusterIP handed out (198.19.0.0/16).
const VIP4_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// First IPv6 ClusterIP handed out (2001:db8:19::/112).
const VIP6_BASE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0x10);

/// One endpoint of [`Lab::set_endpoints`]: a pod and its conditions.
#[derive(Debug, Clone)]
pub struct Ep {
    /// Pod name.
    pub pod: String,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// Merged into the endpoint's JSON (e.g. `{"hints": {...}}`); `Value::Null` for none.
    pub patch: Value,
}

impl Ep {
    /// A ready, serving endpoint.
    pub fn ready(pod: &str) -> Ep {
        Ep { pod: pod.to_string(), ready: true, serving: true, terminating: false, patch: Value::Null }
    }

    /// A terminating endpoint (never ready), serving or not.
    pub fn terminating(pod: &str, serving: bool) -> Ep {
        Ep { pod: pod.to_string(), ready: false, serving, terminating: true, patch: Value::Null }
    }

    /// A not-ready, not-serving, not-terminating endpoint.
    pub fn not_ready(pod: &str) -> Ep {
        Ep { pod: pod.to_string(), ready: false, serving: false, terminating: false, patch: Value::Null }
    }
}

/// The Services the lab created: name → the applied JSON.
#[derive(Debug, Default)]
pub(super) struct Registry {
    services: BTreeMap<String, Value>,
    next4: u32,
    next6: u128,
}

impl Lab {
    /// Creates or replaces Service `name` (namespace `default`): ClusterIP, one TCP port `tcp` 80 → 8080,
    /// then `patch` merged in (RFC 7386; arrays such as `spec.ports` are replaced whole). The ClusterIP is
    /// allocated from 198.19.0.0/16 or 2001:db8:19::/112 (kept across re-applies) unless the patch sets one.
    /// Returns the ClusterIP.
    pub fn apply_service(&mut self, name: &str, family: Family, patch: Value) -> Result<IpAddr> {
        let ip = match self.services.services.get(name).and_then(cluster_ip) {
            Some(ip) if family_of(ip) == family => ip,
            _ => self.next_vip(family),
        };
        let fam = match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        let mut v = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": NAMESPACE, "name": name},
            "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                     "ipFamilies": [fam], "ipFamilyPolicy": "SingleStack",
                     "ports": [{"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        });
        merge(&mut v, patch);
        let ip = cluster_ip(&v).ok_or_else(|| anyhow!("Service {name}: patch left no valid spec.clusterIP"))?;
        self.api().apply_json(vec![v.clone()]).with_context(|| format!("applying Service {name}"))?;
        self.services.services.insert(name.to_string(), v);
        Ok(ip)
    }

    fn next_vip(&mut self, family: Family) -> IpAddr {
        match family {
            Family::V4 => {
                let n = self.services.next4;
                self.services.next4 += 1;
                IpAddr::V4(Ipv4Addr::from(u32::from(VIP4_BASE) + n))
            }
            Family::V6 => {
                let n = self.services.next6;
                self.services.next6 += 1;
                IpAddr::V6(Ipv6Addr::from(u128::from(VIP6_BASE) + n))
            }
        }
    }

    /// Replaces the endpoints of Service `name` with `eps` (one EndpointSlice `<name>-lab` of the Service's
    /// family; its ports are the Service's target ports). An empty list leaves an empty slice.
    pub fn set_endpoints(&self, name: &str, eps: &[Ep]) -> Result<()> {
        let svc = self.services.services.get(name).ok_or_else(|| anyhow!("set_endpoints: no lab Service {name}"))?;
        let family = cluster_ip(svc).map(family_of).ok_or_else(|| anyhow!("Service {name} without a ClusterIP"))?;
        self.set_endpoints_family(name, family, eps)
    }

    /// [`Lab::set_endpoints`] for one family of a dual-stack Service: the slice of the primary (ClusterIP)
    /// family is `<name>-lab`, the other one `<name>-lab-v4` or `<name>-lab-v6`.
    pub fn set_endpoints_family(&self, name: &str, family: Family, eps: &[Ep]) -> Result<()> {
        let svc = self.services.services.get(name).ok_or_else(|| anyhow!("set_endpoints: no lab Service {name}"))?;
        let primary = cluster_ip(svc).map(family_of).ok_or_else(|| anyhow!("Service {name} without a ClusterIP"))?;
        if family == Family::V6 && !self.cfg.ipv6 {
            bail!("Service {name} is IPv6 but the lab was built without IPv6");
        }
        let mut ports = Vec::new();
        for p in svc["spec"]["ports"].as_array().into_iter().flatten() {
            let target = match &p["targetPort"] {
                Value::Null => p["port"].clone(),
                Value::Number(n) => Value::Number(n.clone()),
                other => bail!("Service {name}: named targetPort {other} is not supported by the lab"),
            };
            ports.push(json!({"name": p["name"], "port": target, "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP"))}));
        }
        let mut endpoints = Vec::new();
        for ep in eps {
            let pod = self.pod(&ep.pod)?;
            let node = &self.nodes[pod.node];
            let mut e = json!({
                "addresses": [pod.ip(family).to_string()],
                "nodeName": node.name, "zone": node.zone,
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod.name},
                "conditions": {"ready": ep.ready, "serving": ep.serving, "terminating": ep.terminating}
            });
            // merge() with a non-object patch replaces the target: Null means "no patch" here.
            if !ep.patch.is_null() {
                merge(&mut e, ep.patch.clone());
            }
            endpoints.push(e);
        }
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": NAMESPACE, "name": slice_name_of(name, family, primary),
                         "labels": {"kubernetes.io/service-name": name,
                                    "endpointslice.kubernetes.io/managed-by": "kp-lab"}},
            "addressType": match family { Family::V4 => "IPv4", Family::V6 => "IPv6" },
            "ports": ports,
            "endpoints": endpoints
        });
        self.api().apply_json(vec![slice]).with_context(|| format!("applying EndpointSlice of Service {name}"))?;
        Ok(())
    }

    /// Deletes Service `name` and its lab EndpointSlice.
    pub fn delete_service(&mut self, name: &str) -> Result<()> {
        self.services.services.remove(name);
        // The slice may not exist (no set_endpoints yet): a failure there is not an error.
        let _ = self.api().delete::<EndpointSlice>(NAMESPACE, &slice_name(name));
        for (f, p) in [(Family::V4, Family::V6), (Family::V6, Family::V4)] {
            let _ = self.api().delete::<EndpointSlice>(NAMESPACE, &slice_name_of(name, f, p));
        }
        self.api().delete::<Service>(NAMESPACE, name).with_context(|| format!("deleting Service {name}"))?;
        Ok(())
    }

    /// The ClusterIP of lab Service `name`.
    pub fn cluster_ip(&self, name: &str) -> Result<IpAddr> {
        self.services.services.get(name).and_then(cluster_ip).ok_or_else(|| anyhow!("no lab Service {name}"))
    }

    /// `ClusterIP:port` of the port named `port_name` of Service `name`.
    pub fn service_addr(&self, name: &str, port_name: &str) -> Result<SocketAddr> {
        let svc = self.services.services.get(name).ok_or_else(|| anyhow!("no lab Service {name}"))?;
        let port = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == port_name)
            .and_then(|p| p["port"].as_u64())
            .ok_or_else(|| anyhow!("Service {name} has no port named {port_name}"))?;
        Ok(SocketAddr::new(self.cluster_ip(name)?, port as u16))
    }

    /// Polls (bounded by `timeout`) until probes from `from` to `addr` are answered by exactly the pods in
    /// `expected` (every probe answered), or, for an empty `expected`, until every probe fails.
    pub fn wait_programmed(
        &self,
        from: impl Into<Place>,
        proto: Proto,
        addr: SocketAddr,
        expected: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let from = from.into();
        let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        // Enough attempts that a uniform pick misses a backend with negligible probability (~n·(1-1/n)^k).
        let count = (8 * want.len()).max(6);
        let deadline = Instant::now() + timeout;
        let mut rounds = 0;
        loop {
            rounds += 1;
            // Stop a round at its first failure (a UDP timeout costs the whole per-attempt timeout), but
            // when waiting for "no backends" every attempt must fail anyway.
            let probes = self.probe_with(from.clone(), proto, &[addr], count, 500, !want.is_empty())?;
            let got = pods_answered(&probes);
            let all_ok = probes.iter().all(|p| p.ok);
            let none_ok = probes.iter().all(|p| !p.ok);
            if (want.is_empty() && none_ok) || (!want.is_empty() && all_ok && got == want) {
                if rounds > 1 {
                    self.forget_untranslated_flows(proto, addr);
                }
                return Ok(());
            }
            if rounds == 1 || rounds % 10 == 0 {
                let first_bad = probes.iter().find(|p| !p.ok);
                self.note(format!(
                    "{addr} from {from:?} not as wanted yet (round {rounds}): answered {got:?}, failure {:?}",
                    first_bad.map(|p| (&p.stage, p.errno, p.target.as_deref()))
                ));
            }
            if Instant::now() >= deadline || rounds > 10_000 {
                let errs: BTreeSet<String> =
                    probes.iter().filter(|p| !p.ok).map(|p| format!("{:?}/{:?}", p.stage, p.errno)).collect();
                bail!(
                    "{addr} ({proto:?}) from {from:?}: wanted pods {want:?}, got {got:?} (failures {errs:?}) \
                     after {timeout:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Lab {
    /// Moves `place`'s ephemeral port range to a window of 8192 ports disjoint from the current one, so new
    /// probes never reuse a source port of earlier flows. Both netfilter and our conntrack keep a UDP flow
    /// translated as it was created when a Service's policy changes (as upstream: only endpoint removal
    /// clears UDP flows), and a probe that happened to reuse an earlier probe's port would follow it.
    pub fn fresh_source_ports(&self, place: impl Into<Place>) -> Result<()> {
        const WINDOW: u32 = 8192;
        const LOW: u32 = 10_000;
        const SLOTS: u32 = 6; // 10000 … 59151
        let place = place.into();
        let out =
            self.exec_in(place.clone(), "sysctl", &["-n", "net.ipv4.ip_local_port_range"], Duration::from_secs(10))?;
        let current: u32 =
            String::from_utf8_lossy(&out.stdout).split_whitespace().next().and_then(|s| s.parse().ok()).ok_or_else(
                || anyhow!("reading the port range at {place:?}: {:?}", String::from_utf8_lossy(&out.stdout)),
            )?;
        let slot =
            if current >= LOW && (current - LOW).is_multiple_of(WINDOW) { (current - LOW) / WINDOW + 1 } else { 0 };
        let lo = LOW + (slot % SLOTS) * WINDOW;
        let range = format!("net.ipv4.ip_local_port_range={lo} {}", lo + WINDOW - 1);
        let out = self.exec_in(place.clone(), "sysctl", &["-qw", &range], Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("setting {range} at {place:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Netfilter modes: deletes the nodes' conntrack entries for `addr` that were never translated.
    ///
    /// A probe sent before the rules existed leaves an entry without DNAT (TCP `SYN_SENT` for 120 s, UDP
    /// for 30 s); a later connection that happens to reuse its source port follows that entry and is
    /// blackholed. Upstream has the same behaviour (kubernetes/kubernetes#48719: clients retry on a new
    /// port); it is an artefact of polling a service before it exists, so the lab clears what its own
    /// early probes left instead of letting it fail an unrelated assertion minutes later.
    fn forget_untranslated_flows(&self, proto: Proto, addr: SocketAddr) {
        if !matches!(self.config().mode.as_str(), "iptables" | "ipvs") {
            return;
        }
        let ip = addr.ip().to_string();
        let port = addr.port().to_string();
        let family = if addr.is_ipv6() { "ipv6" } else { "ipv4" };
        let proto = match proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let args = ["-D", "-f", family, "-p", proto, "--orig-dst", &ip, "--dport", &port, "--reply-src", &ip];
        for i in 0..self.nodes().len() {
            if let Err(e) = self.exec_in(Place::Node(i), "conntrack", &args, Duration::from_secs(10)) {
                self.note(format!("clearing untranslated conntrack entries of {addr} on node {i}: {e:#}"));
            }
        }
    }
}

fn slice_name(svc: &str) -> String {
    format!("{svc}-lab")
}

/// The slice of `family` for a Service whose ClusterIP family is `primary`.
fn slice_name_of(svc: &str, family: Family, primary: Family) -> String {
    match (family == primary, family) {
        (true, _) => slice_name(svc),
        (false, Family::V4) => format!("{svc}-lab-v4"),
        (false, Family::V6) => format!("{svc}-lab-v6"),
    }
}

fn cluster_ip(v: &Value) -> Option<IpAddr> {
    v["spec"]["clusterIP"].as_str()?.parse().ok()
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}
