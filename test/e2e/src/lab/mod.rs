//! The lab: network namespaces as a tiny cluster running the real `kube-proxy` binary per node.
//!
//! Layout (all inside namespaces the lab creates; nothing is added to the host's network namespace):
//! - a bridge namespace with bridge `br0` (198.18.0.1/24, 2001:db8::1/64) where the in-repo API server
//!   listens on 198.18.0.1;
//! - per node `i`: a namespace with underlay `eth0` in `br0` (198.18.0.(10+i), 2001:db8::(10+i)), IP
//!   forwarding, pod bridge `cbr0` (198.18.(16+i).0/24, 2001:db8:(16+i)::/64), routes to the other nodes'
//!   pod CIDRs, cgroup `<lab cgroup>/node-i` (the node's `kube-proxy --cgroup-root`) and pin directory
//!   `/sys/fs/bpf/kplab-<tag>/node-i`;
//! - per pod `pod-i-k`: a namespace with `eth0` in the node's `cbr0` (198.18.(16+i).(10+k),
//!   2001:db8:(16+i)::(10+k)), default routes via `cbr0`, cgroup `<node cgroup>/pod-k`, and a `lab-echo`
//!   server in both;
//! - an external client namespace on `br0` (198.18.0.200, 2001:db8::200), in no node's cgroup.
//!
//! No namespace has a route off the machine. Every name carries `kplab-<pid>x<seq>`, so labs of parallel
//! test processes never collide and [`Lab::cleanup_stale`] can remove what a dead process left behind.
//! [`Lab`]'s `Drop` tears everything down, also on failure and panic; children are forked with PDEATHSIG so
//! they die with the lab even when the process is killed.

mod probe;
pub mod scenario;
mod services;
mod sys;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use test_apiserver::ApiServer;

pub use probe::{Probe, answers_by_pod, client_summary, parse_probes, quantile};
pub use services::Ep;
pub use sys::{Enter, StaleReport, cgroup2_mount, skip_reason};

use crate::HttpResponse;

/// The API server's address in the bridge namespace.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The external client's underlay addresses.
pub const EXTERNAL_IP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
/// See [`EXTERNAL_IP4`].
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200);
/// Where ClusterIPs (and the scenarios' ExternalIPs and LoadBalancer IPs) come from; nodes route it to the
/// bridge namespace.
pub const SERVICE_RANGE4: &str = "198.19.0.0/16";
/// See [`SERVICE_RANGE4`].
pub const SERVICE_RANGE6: &str = "2001:db8:19::/64";
/// kube-proxy's health port on each node's underlay address.
pub const HEALTHZ_PORT: u16 = 10256;
/// kube-proxy's metrics port on each node's underlay address.
pub const METRICS_PORT: u16 = 10249;
/// The namespace every lab object lives in.
pub const NAMESPACE: &str = "default";

/// Bound of waiting for a kube-proxy to report healthy.
const PROXY_READY: Duration = Duration::from_secs(60);
/// Bound of a graceful stop before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

/// What to build.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of nodes (1..=64).
    pub nodes: usize,
    /// Pods per node (0..=100).
    pub pods_per_node: usize,
    /// `--proxy-mode` of every node's kube-proxy; the lab assumes nothing else about the backend.
    pub mode: String,
    /// Give nodes, pods and the external client IPv6 addresses too.
    pub ipv6: bool,
    /// TCP ports every pod's `lab-echo` listens on.
    pub tcp_ports: Vec<u16>,
    /// UDP ports every pod's `lab-echo` listens on.
    pub udp_ports: Vec<u16>,
    /// Extra kube-proxy flags (after the lab's own, so they win).
    pub proxy_args: Vec<String>,
    /// Directory holding `kube-proxy`, `lab-echo` and `lab-client`; default: next to the running executable
    /// (or its parent, for test executables in `deps/`).
    pub bin_dir: Option<PathBuf>,
    /// Start every node's kube-proxy (and wait until healthy) during [`Lab::new`].
    pub start_proxies: bool,
    /// Print progress lines on stderr.
    pub verbose: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 2,
            pods_per_node: 2,
            mode: "ebpf".into(),
            ipv6: true,
            tcp_ports: vec![8080, 8081],
            udp_ports: vec![8080, 8053],
            proxy_args: Vec::new(),
            bin_dir: None,
            start_proxies: true,
            verbose: false,
        }
    }
}

/// Where a process runs or a request is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A pod's namespace and cgroup (its traffic is load balanced by its node's proxy).
    Pod(String),
    /// A node's namespace and cgroup (a "host process" of that node).
    Node(usize),
    /// The external client namespace (no cgroup of any node).
    External,
    /// The bridge namespace (the API server's; no cgroup of any node).
    Bridge,
}

impl From<&str> for Place {
    fn from(pod: &str) -> Place {
        Place::Pod(pod.to_string())
    }
}

impl From<&String> for Place {
    fn from(pod: &String) -> Place {
        Place::Pod(pod.clone())
    }
}

impl From<String> for Place {
    fn from(pod: String) -> Place {
        Place::Pod(pod)
    }
}

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// A transport protocol the probes speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP: connect, send a line, read a line.
    Tcp,
    /// UDP: unconnected sendto/recvfrom.
    Udp,
}

impl Proto {
    fn subcommand(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One node of the lab.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// `node-i` (also the Node object's name and `--hostname-override`).
    pub name: String,
    /// The network namespace's name.
    pub netns: String,
    /// Underlay IPv4 address (the Node's InternalIP).
    pub ip4: Ipv4Addr,
    /// Underlay IPv6 address.
    pub ip6: Ipv6Addr,
    /// The `cbr0` addresses (pods' default gateway).
    pub gw4: Ipv4Addr,
    /// See `gw4`.
    pub gw6: Ipv6Addr,
    /// Pod CIDRs.
    pub pod_cidr4: String,
    /// See `pod_cidr4`.
    pub pod_cidr6: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// The node's cgroup (kube-proxy's `--cgroup-root`).
    pub cgroup: PathBuf,
    /// kube-proxy's `--bpffs-root`.
    pub bpffs: PathBuf,
    /// kube-proxy's health server.
    pub healthz: SocketAddr,
    /// kube-proxy's metrics server.
    pub metrics: SocketAddr,
}

/// One pod of the lab.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// `pod-<node>-<k>`.
    pub name: String,
    /// Index of its node.
    pub node: usize,
    /// The network namespace's name.
    pub netns: String,
    /// Pod IPv4 address.
    pub ip4: Ipv4Addr,
    /// Pod IPv6 address (configured only with [`LabConfig::ipv6`]).
    pub ip6: Ipv6Addr,
    /// The pod's cgroup (below its node's).
    pub cgroup: PathBuf,
}

impl PodInfo {
    /// The pod address of `family`.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.ip4),
            Family::V6 => IpAddr::V6(self.ip6),
        }
    }
}

/// The names a lab occupies on the machine, to check that teardown removed them.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// Network namespaces.
    pub netns: Vec<String>,
    /// The lab's cgroup subtree.
    pub cgroup: PathBuf,
    /// The lab's bpffs directory.
    pub bpffs: PathBuf,
}

impl Footprint {
    /// What still exists.
    pub fn leftovers(&self) -> Vec<String> {
        let live = sys::netns_names();
        let mut left: Vec<String> =
            self.netns.iter().filter(|n| live.contains(*n)).map(|n| format!("netns {n}")).collect();
        for p in [&self.cgroup, &self.bpffs] {
            if p.exists() {
                left.push(p.display().to_string());
            }
        }
        left
    }
}

/// A child process of the lab; SIGKILLed when dropped.
#[derive(Debug)]
pub struct LabChild {
    child: Option<Child>,
    what: String,
}

impl LabChild {
    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for it to exit and returns its output (stdout/stderr are piped for clients).
    pub fn finish(mut self, timeout: Duration) -> Result<Output> {
        let child = self.child.take().ok_or_else(|| anyhow!("{}: already finished", self.what))?;
        sys::collect(child, &self.what, timeout)
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns whether it exited on its own within `grace`.
    fn stop(&mut self, grace: Duration) -> bool {
        let Some(c) = self.child.as_mut() else { return true };
        if matches!(c.try_wait(), Ok(Some(_))) {
            return true;
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let graceful = crate::wait_for(grace, || c.try_wait().ok().flatten()).is_some();
        if !graceful {
            let _ = c.kill();
            let _ = c.wait();
        }
        graceful
    }

    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Bins {
    kube_proxy: PathBuf,
    echo: PathBuf,
    client: PathBuf,
}

impl Bins {
    fn find(dir: Option<&Path>) -> Result<Bins> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => {
                let exe = std::env::current_exe().context("current_exe")?;
                let here = exe.parent().ok_or_else(|| anyhow!("executable without a directory"))?.to_path_buf();
                // Test executables live in target/<profile>/deps/, binaries one level up.
                if here.join("kube-proxy").exists() || here.parent().is_none() {
                    here
                } else {
                    here.parent().map(Path::to_path_buf).unwrap_or(here)
                }
            }
        };
        let bins =
            Bins { kube_proxy: dir.join("kube-proxy"), echo: dir.join("lab-echo"), client: dir.join("lab-client") };
        for b in [&bins.kube_proxy, &bins.echo, &bins.client] {
            if !b.exists() {
                bail!("{} missing: run `cargo build --bins -p kube-proxy -p e2e` first", b.display());
            }
        }
        Ok(bins)
    }
}

/// A running lab. See the module documentation.
pub struct Lab {
    cfg: LabConfig,
    tag: String,
    bins: Bins,
    dir: Option<tempfile::TempDir>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    bridge_ns: String,
    external_ns: String,
    nodes: Vec<NodeInfo>,
    pods: Vec<PodInfo>,
    created_ns: Vec<String>,
    cgroup_created: bool,
    bpffs_created: bool,
    api: Option<ApiServer>,
    proxies: Vec<Option<LabChild>>,
    echoes: Vec<Option<LabChild>>,
    services: services::Registry,
    started: Instant,
    torn_down: bool,
    // Last: children die (PDEATHSIG) once its thread ends, which must be after teardown.
    spawner: sys::Spawner,
}

impl Lab {
    /// Builds the lab (and, with [`LabConfig::start_proxies`], waits until every kube-proxy is healthy).
    /// Whatever was created is torn down again when this fails.
    pub fn new(cfg: LabConfig) -> Result<Lab> {
        if cfg.nodes == 0 || cfg.nodes > 64 {
            bail!("LabConfig.nodes must be 1..=64, got {}", cfg.nodes);
        }
        if cfg.pods_per_node > 100 {
            bail!("LabConfig.pods_per_node must be at most 100, got {}", cfg.pods_per_node);
        }
        if let Some(reason) = skip_reason() {
            bail!("cannot build a lab here: {reason}");
        }
        let bins = Bins::find(cfg.bin_dir.as_deref())?;
        let tag = format!("{}{}x{}", sys::PREFIX, std::process::id(), NEXT_LAB.fetch_add(1, Ordering::SeqCst));
        let dir =
            tempfile::Builder::new().prefix(&format!("{tag}-")).tempdir().context("creating the lab's temp dir")?;
        let cgroup = cgroup2_mount()?.join(&tag);
        let bpffs = Path::new(sys::BPFFS).join(&tag);
        let nodes = (0..cfg.nodes).map(|i| node_info(&tag, &cgroup, &bpffs, i)).collect::<Vec<_>>();
        let pods = (0..cfg.nodes)
            .flat_map(|i| (0..cfg.pods_per_node).map(move |k| (i, k)))
            .map(|(i, k)| pod_info(&tag, &nodes[i], i, k))
            .collect::<Vec<_>>();
        let mut lab = Lab {
            proxies: (0..cfg.nodes).map(|_| None).collect(),
            echoes: (0..pods.len()).map(|_| None).collect(),
            cfg,
            bridge_ns: format!("{tag}-br"),
            external_ns: format!("{tag}-ext"),
            tag,
            bins,
            dir: Some(dir),
            cgroup,
            bpffs,
            nodes,
            pods,
            created_ns: Vec::new(),
            cgroup_created: false,
            bpffs_created: false,
            api: None,
            services: services::Registry::default(),
            started: Instant::now(),
            torn_down: false,
            spawner: sys::Spawner::new()?,
        };
        lab.build()?;
        Ok(lab)
    }

    /// Removes namespaces, cgroups and pins of labs whose owner process is dead.
    pub fn cleanup_stale() -> Result<StaleReport> {
        sys::cleanup_stale()
    }

    fn note(&self, msg: impl AsRef<str>) {
        if self.cfg.verbose {
            eprintln!("[{:>6.2}s] lab: {}", self.started.elapsed().as_secs_f64(), msg.as_ref());
        }
    }

    fn build(&mut self) -> Result<()> {
        self.note(format!(
            "building {} ({} nodes x {} pods, mode {})",
            self.tag, self.cfg.nodes, self.cfg.pods_per_node, self.cfg.mode
        ));
        std::fs::create_dir(&self.cgroup).with_context(|| format!("mkdir {}", self.cgroup.display()))?;
        self.cgroup_created = true;
        std::fs::create_dir(&self.bpffs).with_context(|| format!("mkdir {}", self.bpffs.display()))?;
        self.bpffs_created = true;

        let br = self.bridge_ns.clone();
        self.add_netns(&br)?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        self.addrs(&br, "br0", IpAddr::V4(API_IP), 24, "2001:db8::1".parse()?, 64)?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        let api =
            sys::in_netns(&netns_path(&br), move || ApiServer::start_background(SocketAddr::new(API_IP.into(), 0)))?
                .with_context(|| format!("starting the API server in netns {br}"))?;
        self.note(format!("API server on http://{} in netns {br}", api.addr()));
        api.write_kubeconfig(self.kubeconfig())?;
        self.api = Some(api);

        let ext = self.external_ns.clone();
        self.add_netns(&ext)?;
        self.underlay(&ext, "vext", IpAddr::V4(EXTERNAL_IP4), IpAddr::V6(EXTERNAL_IP6))?;

        for i in 0..self.nodes.len() {
            self.build_node(i)?;
        }
        // Routes need every node's underlay address.
        for i in 0..self.nodes.len() {
            let ns = self.nodes[i].netns.clone();
            for j in (0..self.nodes.len()).filter(|j| *j != i) {
                let other = self.nodes[j].clone();
                ip(&["-n", &ns, "route", "add", &other.pod_cidr4, "via", &other.ip4.to_string()])?;
                if self.cfg.ipv6 {
                    ip(&["-n", &ns, "-6", "route", "add", &other.pod_cidr6, "via", &other.ip6.to_string()])?;
                }
            }
        }
        for k in 0..self.pods.len() {
            self.build_pod(k)?;
        }
        self.note(format!("network up: {} namespaces", self.created_ns.len()));
        for n in &self.nodes {
            let mut addresses = vec![json!({"type": "InternalIP", "address": n.ip4.to_string()})];
            if self.cfg.ipv6 {
                addresses.push(json!({"type": "InternalIP", "address": n.ip6.to_string()}));
            }
            let mut cidrs = vec![n.pod_cidr4.clone()];
            if self.cfg.ipv6 {
                cidrs.push(n.pod_cidr6.clone());
            }
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name, "labels": {"topology.kubernetes.io/zone": n.zone, "kubernetes.io/hostname": n.name}},
                "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
                "status": {"addresses": addresses}
            });
            self.api().apply_json(vec![node]).with_context(|| format!("creating Node {}", n.name))?;
        }
        for k in 0..self.pods.len() {
            self.start_echo(k)?;
        }
        self.wait_echoes()?;
        self.note("echo servers ready");
        if self.cfg.start_proxies {
            for i in 0..self.nodes.len() {
                self.start_proxy(i)?;
            }
            for i in 0..self.nodes.len() {
                self.wait_proxy_healthy(i, PROXY_READY)?;
            }
            self.note("every kube-proxy is healthy");
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.created_ns.push(name.to_string());
        if self.cfg.ipv6 {
            // Without DAD, link-local addresses are usable at once; with it, the first IPv6 exchanges
            // across nodes stall for a second or two while neighbour discovery waits on tentative addresses.
            self.sysctl(name, &["net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"])?;
        }
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn addrs(&self, ns: &str, dev: &str, v4: IpAddr, len4: u8, v6: IpAddr, len6: u8) -> Result<()> {
        ip(&["-n", ns, "addr", "add", &format!("{v4}/{len4}"), "dev", dev])?;
        if self.cfg.ipv6 {
            // nodad: the address is usable at once; nothing else on the lab's links can hold it.
            ip(&["-n", ns, "addr", "add", &format!("{v6}/{len6}"), "dev", dev, "nodad"])?;
        }
        Ok(())
    }

    /// A veth from the bridge namespace's `br0` to `eth0` of `ns` with the given underlay addresses. The pair
    /// is created inside the bridge namespace and one end moved straight into `ns`: nothing touches the host.
    fn underlay(&self, ns: &str, port: &str, v4: IpAddr, v6: IpAddr) -> Result<()> {
        let br = &self.bridge_ns;
        ip(&["-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip(&["-n", br, "link", "set", port, "master", "br0", "up"])?;
        self.addrs(ns, "eth0", v4, 24, v6, 64)?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])
    }

    fn build_node(&mut self, i: usize) -> Result<()> {
        let n = self.nodes[i].clone();
        self.add_netns(&n.netns)?;
        self.underlay(&n.netns, &format!("vn{i}"), IpAddr::V4(n.ip4), IpAddr::V6(n.ip6))?;
        ip(&["-n", &n.netns, "link", "add", "cbr0", "type", "bridge", "mcast_snooping", "0"])?;
        self.addrs(&n.netns, "cbr0", IpAddr::V4(n.gw4), 24, IpAddr::V6(n.gw6), 64)?;
        ip(&["-n", &n.netns, "link", "set", "cbr0", "up"])?;
        self.sysctl(&n.netns, &["net.ipv4.ip_forward=1"])?;
        // A real node routes Service addresses somewhere (its default route): netfilter backends translate
        // a node process's packet only after the route lookup in connect() succeeded. The lab's stand-in is
        // the bridge namespace, which forwards nothing, so an untranslated packet still dies inside the lab.
        ip(&["-n", &n.netns, "route", "add", SERVICE_RANGE4, "via", &API_IP.to_string()])?;
        if self.cfg.ipv6 {
            ip(&["-n", &n.netns, "-6", "route", "add", SERVICE_RANGE6, "via", "2001:db8::1"])?;
        }
        if self.cfg.ipv6 {
            self.sysctl(&n.netns, &["net.ipv6.conf.all.forwarding=1"])?;
        }
        if self.netfilter_datapath() {
            // Like a real node (kubeadm's preflight requires it): bridged pod-to-pod packets pass through
            // iptables, so a reply from a same-node backend is un-DNATed by conntrack instead of reaching the
            // client with the backend's address. Per network namespace, so only this node's is touched.
            self.sysctl(&n.netns, &["net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1"])?;
        }
        std::fs::create_dir(&n.cgroup).with_context(|| format!("mkdir {}", n.cgroup.display()))?;
        Ok(())
    }

    /// Whether the backend translates packets in netfilter (iptables, ipvs, nftables) rather than sockets.
    fn netfilter_datapath(&self) -> bool {
        self.cfg.mode != "ebpf"
    }

    fn build_pod(&mut self, k: usize) -> Result<()> {
        let p = self.pods[k].clone();
        let node = self.nodes[p.node].clone();
        self.add_netns(&p.netns)?;
        let port = format!("vp{k}");
        ip(&["-n", &node.netns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &p.netns])?;
        ip(&["-n", &node.netns, "link", "set", &port, "master", "cbr0", "up"])?;
        if self.netfilter_datapath() {
            // What the CNI bridge plugin's hairpinMode (kubelet's hairpin-veth) does: with br_netfilter, a pod
            // reaching itself through a Service is DNATed while bridged and must leave by the port it came in.
            ip(&["-n", &node.netns, "link", "set", &port, "type", "bridge_slave", "hairpin", "on"])?;
        }
        self.addrs(&p.netns, "eth0", IpAddr::V4(p.ip4), 24, IpAddr::V6(p.ip6), 64)?;
        ip(&["-n", &p.netns, "link", "set", "eth0", "up"])?;
        // The default route leads to the node, which has no route off the machine.
        ip(&["-n", &p.netns, "route", "add", "default", "via", &node.gw4.to_string()])?;
        if self.cfg.ipv6 {
            ip(&["-n", &p.netns, "-6", "route", "add", "default", "via", &node.gw6.to_string()])?;
        }
        std::fs::create_dir(&p.cgroup).with_context(|| format!("mkdir {}", p.cgroup.display()))?;
        Ok(())
    }

    fn sysctl(&self, ns: &str, settings: &[&str]) -> Result<()> {
        let enter = Enter { netns: Some(netns_path(ns)), cgroup: None };
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        sys::run_checked(Some(&self.spawner), &enter, "sysctl", &args)
            .with_context(|| format!("sysctl {settings:?} in netns {ns}"))
            .map(|_| ())
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new("/tmp"))
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir().join("kubeconfig")
    }

    fn log_file(&self, name: &str) -> Result<(File, PathBuf)> {
        let path = self.dir().join(format!("{name}.log"));
        let f = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok((f, path))
    }

    fn spawn(&self, mut cmd: Command, enter: &Enter) -> Result<LabChild> {
        sys::prepare(&mut cmd, enter)?;
        let what = sys::describe(&cmd);
        let child = self.spawner.spawn(cmd)?;
        Ok(LabChild { child: Some(child), what })
    }

    fn ready_file(&self, pod: &str) -> PathBuf {
        self.dir().join(format!("{pod}.ready"))
    }

    fn start_echo(&mut self, k: usize) -> Result<()> {
        let p = self.pods[k].clone();
        let (log, _) = self.log_file(&p.name)?;
        let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(&self.bins.echo);
        cmd.args(["--name", &p.name, "--tcp", &join(&self.cfg.tcp_ports), "--udp", &join(&self.cfg.udp_ports)])
            .arg("--ready-file")
            .arg(self.ready_file(&p.name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let enter = Enter { netns: Some(netns_path(&p.netns)), cgroup: Some(p.cgroup.clone()) };
        self.echoes[k] = Some(self.spawn(cmd, &enter).with_context(|| format!("starting lab-echo in {}", p.name))?);
        Ok(())
    }

    fn wait_echoes(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for k in 0..self.pods.len() {
            let name = self.pods[k].name.clone();
            let ready = self.ready_file(&name);
            loop {
                if ready.exists() {
                    break;
                }
                let alive = self.echoes[k].as_mut().is_some_and(LabChild::running);
                if !alive || Instant::now() >= deadline {
                    let log = std::fs::read_to_string(self.dir().join(format!("{name}.log"))).unwrap_or_default();
                    bail!("lab-echo in pod {name} did not get ready (running: {alive}): {log}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    // ---- accessors ----

    /// The unique tag (`kplab-<pid>x<seq>`) every name of this lab starts with.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &LabConfig {
        &self.cfg
    }

    /// The API server (in the bridge namespace); use it for objects the helpers do not cover.
    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("API server runs until teardown")
    }

    /// Routes `prefix` (an ExternalIP / LoadBalancer range) from the external client's namespace via node
    /// `i`'s underlay address, as the router in front of a cluster would. Replaces an earlier route.
    pub fn route_external_via(&self, prefix: &str, i: usize) -> Result<()> {
        let n = self.node(i)?;
        let via = if prefix.contains(':') { n.ip6.to_string() } else { n.ip4.to_string() };
        ip(&["-n", &self.external_ns, "route", "replace", prefix, "via", &via])
    }

    /// The nodes.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The pods, node by node.
    pub fn pods(&self) -> &[PodInfo] {
        &self.pods
    }

    /// Pod names.
    pub fn pod_names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Result<&PodInfo> {
        self.pods.iter().find(|p| p.name == name).ok_or_else(|| anyhow!("no pod {name} in lab {}", self.tag))
    }

    /// The node with index `i`.
    pub fn node(&self, i: usize) -> Result<&NodeInfo> {
        self.nodes.get(i).ok_or_else(|| anyhow!("no node {i} in lab {}", self.tag))
    }

    /// The names this lab occupies (for asserting they are gone after teardown).
    pub fn footprint(&self) -> Footprint {
        let mut netns = vec![self.bridge_ns.clone(), self.external_ns.clone()];
        netns.extend(self.nodes.iter().map(|n| n.netns.clone()));
        netns.extend(self.pods.iter().map(|p| p.netns.clone()));
        Footprint { netns, cgroup: self.cgroup.clone(), bpffs: self.bpffs.clone() }
    }

    /// The namespace (and cgroup) a process at `place` gets.
    pub fn enter(&self, place: &Place) -> Result<Enter> {
        Ok(match place {
            Place::Pod(name) => {
                let p = self.pod(name)?;
                Enter { netns: Some(netns_path(&p.netns)), cgroup: Some(p.cgroup.clone()) }
            }
            Place::Node(i) => {
                let n = self.node(*i)?;
                Enter { netns: Some(netns_path(&n.netns)), cgroup: Some(n.cgroup.clone()) }
            }
            Place::External => Enter { netns: Some(netns_path(&self.external_ns)), cgroup: None },
            Place::Bridge => Enter { netns: Some(netns_path(&self.bridge_ns)), cgroup: None },
        })
    }

    // ---- running things ----

    /// Runs `program args` at `place` (its namespace and cgroup), killed after `timeout`; stdout and stderr
    /// are captured. Does not check the exit status.
    pub fn exec_in(&self, place: impl Into<Place>, program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        let place = place.into();
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = self.spawn(cmd, &self.enter(&place)?).with_context(|| format!("at {place:?}"))?;
        let what = format!("{} at {place:?}", child.what);
        let mut child = child;
        sys::collect(child.child.take().expect("fresh child"), &what, timeout)
    }

    /// [`Lab::exec_in`] a pod with a 30 s bound; `args[0]` is the program.
    pub fn exec_in_pod(&self, pod: &str, args: &[&str]) -> Result<Output> {
        let (program, rest) = args.split_first().ok_or_else(|| anyhow!("exec_in_pod {pod}: empty command"))?;
        self.exec_in(pod, program, rest, Duration::from_secs(30))
    }

    /// Starts `lab-client args` at `place` in the background (stdout/stderr piped; collect with
    /// [`LabChild::finish`]). For `tcp-hold` and `churn-client` during restarts.
    pub fn spawn_client(&self, place: impl Into<Place>, args: &[String]) -> Result<LabChild> {
        let place = place.into();
        let mut cmd = Command::new(&self.bins.client);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.spawn(cmd, &self.enter(&place)?).with_context(|| format!("lab-client at {place:?}"))
    }

    /// Starts `program args` at `place` in the background (stdout/stderr piped; collect with
    /// [`LabChild::finish`], SIGKILLed when dropped). For servers such as `iperf3 -s`, and for probes that
    /// must already run when an API write happens.
    pub fn spawn_in(&self, place: impl Into<Place>, program: &Path, args: &[String]) -> Result<LabChild> {
        let place = place.into();
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.spawn(cmd, &self.enter(&place)?).with_context(|| format!("{} at {place:?}", program.display()))
    }

    /// Runs `lab-client args` at `place`, bounded by `timeout`; fails when it exits non-zero.
    pub fn client(&self, place: impl Into<Place>, args: &[String], timeout: Duration) -> Result<String> {
        let place = place.into();
        let out = self.spawn_client(place.clone(), args)?.finish(timeout)?;
        if !out.status.success() {
            bail!(
                "lab-client {args:?} at {place:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `count` requests from `place`, round-robin over `targets`, one [`Probe`] each (1 s per attempt).
    pub fn probe(
        &self,
        place: impl Into<Place>,
        proto: Proto,
        targets: &[SocketAddr],
        count: usize,
    ) -> Result<Vec<Probe>> {
        self.probe_with(place.into(), proto, targets, count, 1000, false)
    }

    fn probe_with(
        &self,
        place: Place,
        proto: Proto,
        targets: &[SocketAddr],
        count: usize,
        timeout_ms: u64,
        stop_on_failure: bool,
    ) -> Result<Vec<Probe>> {
        if targets.is_empty() {
            bail!("probe without targets");
        }
        let mut args = vec![proto.subcommand().to_string()];
        args.extend(targets.iter().map(SocketAddr::to_string));
        // lab-client stops issuing attempts at the deadline; the hard timeout is a little later.
        let deadline_ms = (5_000 + count as u64 * timeout_ms).min(120_000);
        args.extend(["--count".into(), count.to_string(), "--timeout-ms".into(), timeout_ms.to_string()]);
        args.extend(["--deadline-ms".into(), deadline_ms.to_string()]);
        if stop_on_failure {
            args.push("--stop-on-failure".into());
        }
        let out = self.client(place, &args, Duration::from_millis(deadline_ms + 10_000))?;
        Ok(parse_probes(&out))
    }

    /// [`Lab::probe`] with TCP and one target.
    pub fn probe_tcp(&self, place: impl Into<Place>, addr: SocketAddr, count: usize) -> Result<Vec<Probe>> {
        self.probe(place, Proto::Tcp, &[addr], count)
    }

    /// [`Lab::probe`] with UDP and one target.
    pub fn probe_udp(&self, place: impl Into<Place>, addr: SocketAddr, count: usize) -> Result<Vec<Probe>> {
        self.probe(place, Proto::Udp, &[addr], count)
    }

    /// `GET path` from inside `place`'s network namespace (never from the host's): a thread joins the
    /// namespace first. The request does not go through any cgroup program (the test process is in none).
    pub fn http_get_in(&self, place: impl Into<Place>, addr: SocketAddr, path: &str) -> Result<Option<HttpResponse>> {
        let enter = self.enter(&place.into())?;
        let ns = enter.netns.ok_or_else(|| anyhow!("place without a namespace"))?;
        let path = path.to_string();
        sys::in_netns(&ns, move || crate::http_get(addr, &path))
    }

    // ---- kube-proxy control ----

    fn proxy_args(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let mut args = vec![
            format!("--kubeconfig={}", self.kubeconfig().display()),
            format!("--hostname-override={}", n.name),
            format!("--proxy-mode={}", self.cfg.mode),
            format!("--cgroup-root={}", n.cgroup.display()),
            format!("--bpffs-root={}", n.bpffs.display()),
            format!("--healthz-bind-address={}", n.healthz),
            format!("--metrics-bind-address={}", n.metrics),
            "--iptables-min-sync-period=0".into(),
            "--v=2".into(),
        ];
        args.extend(self.cfg.proxy_args.iter().cloned());
        args
    }

    /// Starts node `i`'s kube-proxy (in the node's namespace, outside its cgroup) without waiting.
    pub fn start_proxy(&mut self, i: usize) -> Result<()> {
        let name = self.node(i)?.name.clone();
        if self.proxies[i].as_mut().is_some_and(LabChild::running) {
            bail!("kube-proxy of {name} already runs");
        }
        let (log, path) = self.log_file(&format!("{name}.kube-proxy"))?;
        let mut cmd = Command::new(&self.bins.kube_proxy);
        cmd.args(self.proxy_args(i)).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let enter = Enter { netns: Some(netns_path(&self.nodes[i].netns)), cgroup: None };
        let child = self.spawn(cmd, &enter).with_context(|| format!("starting kube-proxy of {name}"))?;
        self.note(format!("kube-proxy of {name} started (pid {:?}, log {})", child.pid(), path.display()));
        self.proxies[i] = Some(child);
        Ok(())
    }

    /// Stops node `i`'s kube-proxy with SIGTERM (SIGKILL after 10 s); returns whether it exited gracefully.
    pub fn stop_proxy(&mut self, i: usize) -> Result<bool> {
        self.node(i)?;
        Ok(self.proxies[i].take().map(|mut c| c.stop(STOP_GRACE)).unwrap_or(true))
    }

    /// SIGKILLs node `i`'s kube-proxy (pins stay: programs stay attached).
    pub fn kill_proxy(&mut self, i: usize) -> Result<()> {
        self.node(i)?;
        if let Some(mut c) = self.proxies[i].take() {
            c.kill();
        }
        Ok(())
    }

    /// Stops (SIGTERM) and starts node `i`'s kube-proxy, then waits until it is healthy.
    pub fn restart_proxy(&mut self, i: usize) -> Result<()> {
        self.stop_proxy(i)?;
        self.start_proxy(i)?;
        self.wait_proxy_healthy(i, PROXY_READY)
    }

    /// Runs node `i`'s `kube-proxy --cleanup` in the node's namespace (the same command teardown runs):
    /// removes what its backend programmed (programs, pins, rules), so the next start is a cold one. Stop the
    /// proxy first.
    pub fn cleanup_proxy(&self, i: usize) -> Result<()> {
        let n = self.node(i)?;
        let mut args = self.proxy_args(i);
        args.retain(|a| !a.starts_with("--kubeconfig") && !a.starts_with("--healthz") && !a.starts_with("--metrics"));
        args.push("--cleanup".into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let enter = Enter { netns: Some(netns_path(&n.netns)), cgroup: None };
        let bin = self.bins.kube_proxy.to_string_lossy().into_owned();
        sys::run_checked(Some(&self.spawner), &enter, &bin, &refs)
            .with_context(|| format!("kube-proxy --cleanup in netns {}", n.netns))?;
        Ok(())
    }

    /// Whether node `i`'s kube-proxy runs.
    pub fn proxy_running(&mut self, i: usize) -> bool {
        self.proxies.get_mut(i).and_then(Option::as_mut).is_some_and(LabChild::running)
    }

    /// Node `i`'s kube-proxy pid.
    pub fn proxy_pid(&self, i: usize) -> Option<u32> {
        self.proxies.get(i)?.as_ref()?.pid()
    }

    /// Node `i`'s kube-proxy log (all runs).
    pub fn proxy_log(&self, i: usize) -> String {
        let Some(n) = self.nodes.get(i) else { return String::new() };
        std::fs::read_to_string(self.dir().join(format!("{}.kube-proxy.log", n.name))).unwrap_or_default()
    }

    /// Waits until node `i`'s `/healthz` answers 200 (fails early when the process exits).
    pub fn wait_proxy_healthy(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let addr = self.node(i)?.healthz;
        let deadline = Instant::now() + timeout;
        loop {
            if self.http_get_in(Place::Bridge, addr, "/healthz")?.is_some_and(|r| r.status == 200) {
                return Ok(());
            }
            if !self.proxy_running(i) {
                bail!("kube-proxy of node-{i} is not running; log:\n{}", tail(&self.proxy_log(i), 40));
            }
            if Instant::now() >= deadline {
                bail!("kube-proxy of node-{i} not healthy after {timeout:?}; log:\n{}", tail(&self.proxy_log(i), 40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `i`'s `/metrics` text (fetched from the bridge namespace).
    pub fn metrics(&self, i: usize) -> Result<String> {
        let addr = self.node(i)?.metrics;
        let r = self.http_get_in(Place::Bridge, addr, "/metrics")?.ok_or_else(|| anyhow!("no answer from {addr}"))?;
        if r.status != 200 {
            bail!("GET http://{addr}/metrics: status {}", r.status);
        }
        Ok(r.body)
    }

    // ---- teardown ----

    /// Netfilter modes: prints each node's conntrack table (bounded) to stderr, to explain a failed probe
    /// (the proxy logs are printed by the teardown of a failed test).
    pub fn dump_conntrack(&self) {
        if !matches!(self.cfg.mode.as_str(), "iptables" | "ipvs") {
            return;
        }
        for i in 0..self.nodes.len() {
            match self.exec_in(Place::Node(i), "conntrack", &["-L"], Duration::from_secs(10)) {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    let rows: Vec<&str> = text.lines().take(200).collect();
                    eprintln!("--- conntrack of node-{i} ({} rows shown) ---\n{}", rows.len(), rows.join("\n"));
                }
                Err(e) => eprintln!("--- conntrack of node-{i}: {e:#}"),
            }
        }
    }

    /// Tears the lab down now and reports what could not be removed.
    pub fn shutdown(mut self) -> Result<()> {
        let errors = self.teardown();
        if errors.is_empty() { Ok(()) } else { bail!("lab teardown: {}", errors.join("; ")) }
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        self.note("tearing down");
        for e in self.echoes.iter_mut().flatten() {
            e.kill();
        }
        for p in self.proxies.iter_mut().flatten() {
            p.stop(Duration::from_secs(5));
        }
        // Each node's own cleanup (programs, pins; iptables leftovers of its namespace only: it runs there).
        for (i, n) in self.nodes.iter().enumerate() {
            if !self.created_ns.contains(&n.netns) || !self.bpffs_created {
                continue;
            }
            let mut args = self.proxy_args(i);
            args.retain(|a| {
                !a.starts_with("--kubeconfig") && !a.starts_with("--healthz") && !a.starts_with("--metrics")
            });
            args.push("--cleanup".into());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let enter = Enter { netns: Some(netns_path(&n.netns)), cgroup: None };
            let bin = self.bins.kube_proxy.to_string_lossy().into_owned();
            if let Err(e) = sys::run_checked(Some(&self.spawner), &enter, &bin, &refs) {
                errors.push(format!("kube-proxy --cleanup in netns {}: {e:#}", n.netns));
            }
        }
        if self.bpffs_created
            && let Err(e) = std::fs::remove_dir_all(&self.bpffs)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("rm -r {}: {e}", self.bpffs.display()));
        }
        if self.cgroup_created
            && let Err(e) = sys::remove_cgroup_tree(&self.cgroup)
        {
            errors.push(format!("{e:#}"));
        }
        if let Some(api) = self.api.take() {
            api.shutdown();
        }
        for ns in self.created_ns.iter().rev() {
            sys::kill_netns_pids(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                errors.push(format!("{e:#}"));
            }
        }
        if std::thread::panicking() || !errors.is_empty() {
            // Keep the logs for the post-mortem.
            if let Some(d) = self.dir.take() {
                let path = d.keep();
                eprintln!("lab {}: logs kept in {}", self.tag, path.display());
                for (i, n) in self.nodes.iter().enumerate() {
                    eprintln!(
                        "--- kube-proxy of {} (last lines) ---\n{}",
                        n.name,
                        tail(&self.proxy_log_at(&path, i), 30)
                    );
                }
            }
        }
        for e in &errors {
            eprintln!("lab {} teardown: {e}", self.tag);
        }
        self.note("torn down");
        errors
    }

    fn proxy_log_at(&self, dir: &Path, i: usize) -> String {
        std::fs::read_to_string(dir.join(format!("{}.kube-proxy.log", self.nodes[i].name))).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("tag", &self.tag)
            .field("nodes", &self.nodes.len())
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(sys::NETNS_DIR).join(name)
}

fn ip(args: &[&str]) -> Result<()> {
    sys::ip(args)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn node_info(tag: &str, cgroup: &Path, bpffs: &Path, i: usize) -> NodeInfo {
    let (a, o) = (10 + i as u8, 16 + i as u8);
    let ip4 = Ipv4Addr::new(198, 18, 0, a);
    // Written in decimal digits to mirror the IPv4 plan (2001:db8::10 for node 0).
    let ip6: Ipv6Addr = format!("2001:db8::{a}").parse().expect("node IPv6");
    let name = format!("node-{i}");
    NodeInfo {
        netns: format!("{tag}-n{i}"),
        ip4,
        ip6,
        gw4: Ipv4Addr::new(198, 18, o, 1),
        gw6: format!("2001:db8:{o}::1").parse().expect("gateway IPv6"),
        pod_cidr4: format!("198.18.{o}.0/24"),
        pod_cidr6: format!("2001:db8:{o}::/64"),
        zone: format!("zone-{}", (b'a' + (i % 2) as u8) as char),
        cgroup: cgroup.join(&name),
        bpffs: bpffs.join(&name),
        healthz: SocketAddr::new(IpAddr::V4(ip4), HEALTHZ_PORT),
        metrics: SocketAddr::new(IpAddr::V4(ip4), METRICS_PORT),
        name,
    }
}

fn pod_info(tag: &str, node: &NodeInfo, i: usize, k: usize) -> PodInfo {
    let (o, h) = (16 + i as u8, 10 + k as u8);
    PodInfo {
        name: format!("pod-{i}-{k}"),
        node: i,
        netns: format!("{tag}-n{i}p{k}"),
        ip4: Ipv4Addr::new(198, 18, o, h),
        ip6: format!("2001:db8:{o}::{h}").parse().expect("pod IPv6"),
        cgroup: node.cgroup.join(format!("pod-{k}")),
    }
}

/// The distinct pods among successful probes.
pub fn pods_answered(probes: &[Probe]) -> BTreeSet<String> {
    probes.iter().filter(|p| p.ok).filter_map(|p| p.pod().map(str::to_string)).collect()
}

/// Set by SIGINT/SIGTERM/SIGHUP once [`install_interrupt_handlers`] ran: the lab drivers poll it between steps
/// so Ctrl-C unwinds to the lab's teardown instead of killing the process mid-way.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Routes SIGINT, SIGTERM and SIGHUP to [`INTERRUPTED`].
pub fn install_interrupt_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}
