//! Privileged tests of the clsact attachment (the tc path of kernels without tcx), forced with
//! `TcAttachMode::Clsact` on this kernel: NodePort traffic through netlink filters, restarts and mode
//! switches that keep a connection alive, stale-filter removal and `cleanup_tc_filters`; and, with tcx links
//! too, that packets our programs leave untouched go on to a later tc user's filters (`TC_ACT_UNSPEC`).
//!
//! Topology (every namespace created here, removed on drop, also on panic):
//! - `ext`: bridge `br0` 198.18.0.200/24 (the external client);
//! - `node`: `eth0` in `br0` 198.18.0.10/24 (node address, gets the node programs), forwarding on, `vpod`
//!   198.18.16.1/24 to the pod, `vpod2` 198.18.17.1/24 to the client pod;
//! - `pod`: `eth0` 198.18.16.10/24 (a local endpoint); `pod2`: `eth0` 198.18.17.10/24 (a client pod);
//! - `remote`: `eth0` in `br0` 198.18.0.11/24 (a remote endpoint), route to 198.18.16.0/20 via the node.
//!
//! Only 198.18.0.0/15 addresses; no namespace has a route off the machine; programs attach only to devices
//! of the node namespace; `tc` runs only with `-n <test namespace>`; nothing is dialled from the host
//! namespace (clients run on threads that entered `ext` or `pod2`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{SERVER_LIFETIME, ep, in_ns, name, netns, run, skip_reason, svc};
use proxier::backend::Backend;
use proxier::model::{Changes, Endpoint, IpFamily, Protocol, ServicePortInfo, ServicePortName, Snapshot};
use proxy_ebpf::{CLSACT_PRIORITY, EbpfBackend, EbpfOptions, SocketLbScope, TcAttachMode, detect_cgroup2_mount};

const NODE_IP: &str = "198.18.0.10";
const CLIENT_IP: &str = "198.18.0.200";
const POD_IP: &str = "198.18.16.10";
const REMOTE_IP: &str = "198.18.0.11";
const NODE_PORT: u16 = 30080;
const CIP: &str = "198.19.1.1";
const IO_TIMEOUT: Duration = Duration::from_millis(1500);

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct ClsLab {
    ext: String,
    node: String,
    pod2: String,
    scope: SocketLbScope,
    mode: TcAttachMode,
    created: Vec<String>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    backend: Option<EbpfBackend>,
    snap: Snapshot,
}

impl ClsLab {
    fn new(test: &str, scope: SocketLbScope) -> Option<ClsLab> {
        Self::with_mode(test, scope, TcAttachMode::Clsact)
    }

    fn with_mode(test: &str, scope: SocketLbScope, mode: TcAttachMode) -> Option<ClsLab> {
        if let Some(reason) = skip_reason() {
            println!("SKIP {test}: {reason}");
            return None;
        }
        if Command::new("tc").arg("-V").output().map(|o| !o.status.success()).unwrap_or(true) {
            println!("SKIP {test}: iproute2 `tc` not found");
            return None;
        }
        let tag = format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let mut lab = ClsLab {
            ext: format!("kpcl-e-{tag}"),
            node: format!("kpcl-n-{tag}"),
            pod2: format!("kpcl-q-{tag}"),
            scope,
            mode,
            created: Vec::new(),
            cgroup: detect_cgroup2_mount().unwrap().join(format!("kp-cls-test-{tag}")),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/kp-cls-test-{tag}")),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            backend: None,
            snap: Snapshot::default(),
        };
        let (ext, node, pod2) = (lab.ext.clone(), lab.node.clone(), lab.pod2.clone());
        let (pod, remote) = (format!("kpcl-p-{tag}"), format!("kpcl-r-{tag}"));
        for ns in [&ext, &node, &pod, &pod2, &remote] {
            run("ip", &["netns", "add", ns]);
            lab.created.push(ns.clone());
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        run("ip", &["-n", &ext, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &ext, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "br0"]);
        run("ip", &["-n", &ext, "link", "set", "br0", "up"]);
        for (port, ns, ip) in [("vn", &node, NODE_IP), ("vr", &remote, REMOTE_IP)] {
            run("ip", &["-n", &ext, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            run("ip", &["-n", &ext, "link", "set", port, "master", "br0", "up"]);
            run("ip", &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
        }
        run("ip", &["-n", &ext, "route", "add", "198.19.0.0/16", "via", NODE_IP]);
        run("ip", &["netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (dev, ns, gw, ip) in
            [("vpod", &pod, "198.18.16.1", POD_IP), ("vpod2", &pod2, "198.18.17.1", "198.18.17.10")]
        {
            run("ip", &["-n", &node, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            run("ip", &["-n", &node, "addr", "add", &format!("{gw}/24"), "dev", dev]);
            run("ip", &["-n", &node, "link", "set", dev, "up"]);
            run("ip", &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", ns, "route", "add", "default", "via", gw]);
        }
        run("ip", &["-n", &remote, "route", "add", "198.18.16.0/20", "via", NODE_IP]);
        lab.serve(&pod, POD_IP);
        lab.serve(&remote, REMOTE_IP);
        std::fs::create_dir(&lab.cgroup).unwrap();
        lab.snap.node.addresses = vec![NODE_IP.parse().unwrap()];
        lab.start_backend();
        Some(lab)
    }

    fn start_backend(&mut self) {
        let mut o = EbpfOptions::new(&self.cgroup, &self.bpffs, vec![IpFamily::V4, IpFamily::V6]);
        o.tc_netns = Some(netns(&self.node));
        o.ct_gc_interval = Some(Duration::from_secs(3600));
        o.socket_lb_scope = self.scope;
        o.tc_attach = self.mode;
        let mut b = EbpfBackend::new(o).expect("load and attach");
        if self.mode != TcAttachMode::Auto {
            assert_eq!(b.tc_attach_mode(), Some(self.mode));
        }
        b.sync(&self.snap, &Changes { full: true, ..Default::default() }).expect("full sync");
        self.backend = Some(b);
    }

    fn backend(&mut self) -> &mut EbpfBackend {
        self.backend.as_mut().unwrap()
    }

    /// TCP server on port 8080 of `ip` in `ns`: greets with `backend=<ip> peer=<addr>`, then echoes lines.
    fn serve(&mut self, ns: &str, ip: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        let tcp = in_ns(ns, move || std::net::TcpListener::bind((ip, 8080)).unwrap());
        let stop = self.stop.clone();
        tcp.set_nonblocking(true).unwrap();
        self.servers.push(std::thread::spawn(move || {
            let end = Instant::now() + SERVER_LIFETIME;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match tcp.accept() {
                    Ok((s, peer)) => {
                        let stop = stop.clone();
                        std::thread::spawn(move || echo_conn(s, ip, peer, stop, end));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    fn apply(&mut self, n: &ServicePortName, eps: Vec<Endpoint>, tweak: impl FnOnce(&mut ServicePortInfo)) {
        self.snap.v4.services.insert(n.clone(), svc(CIP, 80, n.protocol, eps, tweak));
        let mut changes = Changes::default();
        changes.v4.services.insert(n.clone());
        let snap = self.snap.clone();
        self.backend().sync(&snap, &changes).expect("sync");
    }

    /// A full sync with the node addresses `addrs` (device discovery runs again).
    fn set_node_addresses(&mut self, addrs: &[&str]) {
        self.snap.node.addresses = addrs.iter().map(|a| a.parse().unwrap()).collect();
        let snap = self.snap.clone();
        self.backend().sync(&snap, &Changes { full: true, ..Default::default() }).expect("full sync");
    }

    /// One TCP connect from `from` (the external client or the client pod): the greeting line.
    fn tcp_from(&self, from: &str, addr: &str, port: u16) -> Option<String> {
        let sa = SocketAddr::new(addr.parse().unwrap(), port);
        in_ns(from, move || {
            let s = TcpStream::connect_timeout(&sa, IO_TIMEOUT).ok()?;
            s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).ok()?;
            Some(line.trim().to_string())
        })
    }

    /// `tc filter show dev <dev> <hook>` in the node namespace.
    fn filters(&self, dev: &str, hook: &str) -> String {
        tc(&["-n", &self.node, "filter", "show", "dev", dev, hook])
    }

    /// Our filters (by priority) on a hook of a device of the node namespace, one line each.
    fn our_filters(&self, dev: &str, hook: &str) -> Vec<String> {
        let pref = format!("pref {CLSACT_PRIORITY} ");
        self.filters(dev, hook)
            .lines()
            .filter(|l| l.contains(&pref) && l.contains("handle"))
            .map(String::from)
            .collect()
    }

    fn link_pins(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.bpffs.join("v1/links"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("tc-") || n.starts_with("pod-"))
            .collect();
        v.sort();
        v
    }

    /// Waits (bounded) until `cond` holds for the node namespace's filters.
    fn wait_for(&self, what: &str, cond: impl Fn(&ClsLab) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ClsLab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.backend.take());
        if let Err(e) = EbpfBackend::cleanup_all(&self.bpffs, &self.cgroup) {
            eprintln!("cleanup {}: {e}", self.bpffs.display());
        }
        if self.cgroup.exists() {
            let _ = std::fs::remove_dir(&self.cgroup);
        }
        // Deleting the namespaces removes their devices, qdiscs and filters.
        for ns in &self.created {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
    }
}

fn tc(args: &[&str]) -> String {
    let out = Command::new("tc").args(args).output().unwrap_or_else(|e| panic!("tc {args:?}: {e}"));
    assert!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn echo_conn(s: TcpStream, ip: IpAddr, peer: SocketAddr, stop: Arc<AtomicBool>, end: Instant) {
    let Ok(mut w) = s.try_clone() else { return };
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    if writeln!(w, "backend={ip} peer={peer}").is_err() {
        return;
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(_) => continue,
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

fn peer_ip(line: &str) -> String {
    field(line, "peer=").and_then(|p| p.parse::<SocketAddr>().ok()).map(|p| p.ip().to_string()).unwrap_or_default()
}

fn node_port(info: &mut ServicePortInfo) {
    info.node_port = NODE_PORT;
}

/// The program id of our filter line (`… id 123 tag …`).
fn prog_id(line: &str) -> u32 {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "id" {
            return it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    0
}

/// A connection through the NodePort to the remote endpoint (SNAT path): reader, writer.
fn connect(lab: &ClsLab) -> (BufReader<TcpStream>, TcpStream) {
    let sa = SocketAddr::new(NODE_IP.parse().unwrap(), NODE_PORT);
    let conn = in_ns(&lab.ext, move || TcpStream::connect_timeout(&sa, IO_TIMEOUT).expect("connect"));
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(field(&line, "backend="), Some(REMOTE_IP), "{line}");
    (r, conn)
}

fn roundtrip(r: &mut BufReader<TcpStream>, w: &mut TcpStream, msg: &str) {
    writeln!(w, "{msg}").unwrap();
    let mut l = String::new();
    r.read_line(&mut l).unwrap_or_else(|e| panic!("{msg}: {e}"));
    assert_eq!(l.trim(), msg);
}

#[test]
fn clsact_node_port_local_and_remote_with_visible_filters() {
    let Some(mut lab) = ClsLab::new("clsact_node_port_local_and_remote", SocketLbScope::All) else { return };
    let devs = lab.backend().tc_devices();
    assert_eq!(devs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["eth0"], "{devs:?}");

    // Our filters, with our priority and program names, on both hooks of the node device only; no tcx link.
    let ing = lab.our_filters("eth0", "ingress");
    assert_eq!(ing.len(), 1, "{}", lab.filters("eth0", "ingress"));
    assert!(ing[0].contains("kp_tc_ingress") && ing[0].contains("direct-action"), "{ing:?}");
    assert!(ing[0].contains(&format!("handle {:#x}", proxy_ebpf::NODE_FILTER_HANDLE)), "{ing:?}");
    let eg = lab.our_filters("eth0", "egress");
    assert_eq!(eg.len(), 1, "{}", lab.filters("eth0", "egress"));
    assert!(eg[0].contains("kp_tc_egress"), "{eg:?}");
    assert!(lab.our_filters("vpod", "ingress").is_empty(), "scope all: no pod program");
    assert!(lab.link_pins().is_empty(), "{:?}", lab.link_pins());

    // Local endpoint: DNAT only, the pod sees the client.
    let tcp = name("np", Protocol::Tcp);
    lab.apply(&tcp, vec![ep(POD_IP, true)], node_port);
    for _ in 0..3 {
        let l = lab.tcp_from(&lab.ext, NODE_IP, NODE_PORT).expect("NodePort answers (local endpoint)");
        assert_eq!(field(&l, "backend="), Some(POD_IP), "{l}");
        assert_eq!(peer_ip(&l), CLIENT_IP, "{l}");
    }
    // Remote endpoint: SNAT to the node address, replies translated back by the egress/ingress filters.
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], node_port);
    for _ in 0..3 {
        let l = lab.tcp_from(&lab.ext, NODE_IP, NODE_PORT).expect("NodePort answers (remote endpoint)");
        assert_eq!(field(&l, "backend="), Some(REMOTE_IP), "{l}");
        assert_eq!(peer_ip(&l), NODE_IP, "{l}");
    }
    // Without the filters nothing answers on the NodePort: the answers above came through them.
    let node = lab.node.clone();
    drop(lab.backend.take());
    let removed = EbpfBackend::cleanup_tc_filters(&netns(&node)).unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert_eq!(lab.tcp_from(&lab.ext, NODE_IP, NODE_PORT), None, "no filter, no NodePort");
    assert!(!tc(&["-n", &node, "qdisc", "show", "dev", "eth0"]).contains("clsact"), "our qdisc removed");
}

#[test]
fn auto_mode_probes_tcx_without_attaching_anywhere_else() {
    if std::env::var_os(proxy_ebpf::TC_ATTACH_ENV).is_some() {
        println!("SKIP auto_mode_probes_tcx: {} is set", proxy_ebpf::TC_ATTACH_ENV);
        return;
    }
    let Some(mut lab) = ClsLab::new("auto_mode_probes_tcx", SocketLbScope::All) else { return };
    drop(lab.backend.take());
    lab.mode = TcAttachMode::Auto;
    lab.start_backend();
    // This kernel (>= 6.6) has tcx: the probe (a link request for ifindex 0) must say so.
    assert_eq!(lab.backend().tc_attach_mode(), Some(TcAttachMode::Tcx));
    assert_eq!(lab.link_pins().len(), 2, "{:?}", lab.link_pins());
    assert!(lab.our_filters("eth0", "ingress").is_empty(), "clsact filters of the first run removed");
    let tcp = name("np", Protocol::Tcp);
    lab.apply(&tcp, vec![ep(POD_IP, true)], node_port);
    assert!(lab.tcp_from(&lab.ext, NODE_IP, NODE_PORT).is_some(), "NodePort through tcx");
}

#[test]
fn clsact_restart_and_mode_switches_keep_a_connection() {
    let Some(mut lab) = ClsLab::new("clsact_restart_and_mode_switches", SocketLbScope::All) else { return };
    let tcp = name("ll", Protocol::Tcp);
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], node_port);
    let (mut r, mut w) = connect(&lab);
    roundtrip(&mut r, &mut w, "before");
    let id0 = prog_id(&lab.our_filters("eth0", "ingress")[0]);

    // Like kill -9: filters stay attached without a process; the new one replaces the program in place.
    drop(lab.backend.take());
    roundtrip(&mut r, &mut w, "while down");
    lab.start_backend();
    roundtrip(&mut r, &mut w, "after restart");
    let ing = lab.our_filters("eth0", "ingress");
    assert_eq!(ing.len(), 1, "replaced, not added: {ing:?}");
    assert_ne!(prog_id(&ing[0]), id0, "the new process' program runs: {ing:?}");
    assert_eq!(lab.our_filters("eth0", "egress").len(), 1);

    // clsact → tcx: links attached, then our filters removed.
    drop(lab.backend.take());
    lab.mode = TcAttachMode::Tcx;
    lab.start_backend();
    roundtrip(&mut r, &mut w, "after switching to tcx");
    assert_eq!(lab.link_pins().len(), 2, "{:?}", lab.link_pins());
    assert!(lab.our_filters("eth0", "ingress").is_empty(), "{}", lab.filters("eth0", "ingress"));
    assert!(lab.our_filters("eth0", "egress").is_empty(), "{}", lab.filters("eth0", "egress"));

    // tcx → clsact: filters attached, then the tcx links' pins removed.
    drop(lab.backend.take());
    lab.mode = TcAttachMode::Clsact;
    lab.start_backend();
    roundtrip(&mut r, &mut w, "after switching back to clsact");
    assert!(lab.link_pins().is_empty(), "{:?}", lab.link_pins());
    assert_eq!(lab.our_filters("eth0", "ingress").len(), 1);
    // The connection also survives the tcx links going away (their release is asynchronous).
    std::thread::sleep(Duration::from_millis(200));
    roundtrip(&mut r, &mut w, "after the tcx links are gone");
    drop(w);
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
}

#[test]
fn clsact_pod_devices_stale_filters_and_cleanup() {
    let Some(mut lab) = ClsLab::new("clsact_pod_devices_stale_filters_and_cleanup", SocketLbScope::HostOnly) else {
        return;
    };
    lab.wait_for("pod filters on vpod and vpod2", |l| {
        l.our_filters("vpod", "ingress").len() == 1 && l.our_filters("vpod2", "ingress").len() == 1
    });
    let f = lab.our_filters("vpod2", "ingress");
    assert!(f[0].contains("kp_tc_pod_ingress"), "{f:?}");
    assert!(f[0].contains(&format!("handle {:#x}", proxy_ebpf::POD_FILTER_HANDLE)), "{f:?}");
    assert!(lab.our_filters("vpod2", "egress").is_empty(), "pod program on ingress only");
    assert_eq!(lab.our_filters("eth0", "ingress").len(), 1, "node device: the node program only");

    // A client pod reaches a ClusterIP per packet (host-only scope: no socket LB for pods).
    let tcp = name("cip", Protocol::Tcp);
    lab.apply(&tcp, vec![ep(POD_IP, true), ep(REMOTE_IP, false)], |_| {});
    let pod2 = lab.pod2.clone();
    for _ in 0..4 {
        let l = lab.tcp_from(&pod2, CIP, 80).expect("ClusterIP answers per packet");
        assert!(field(&l, "peer=").is_some_and(|p| p.starts_with("198.18.17.10:")), "backend sees the pod: {l}");
    }

    // The node address moves to a new device `nd0`: it gets the node programs (and loses the pod program
    // it got as a new non-node device); eth0 loses the node programs and becomes pod-facing.
    let node = lab.node.clone();
    run("ip", &["-n", &node, "link", "add", "nd0", "type", "veth", "peer", "name", "nd0p"]);
    run("ip", &["-n", &node, "addr", "add", "198.18.5.10/24", "dev", "nd0"]);
    run("ip", &["-n", &node, "link", "set", "nd0", "up"]);
    lab.wait_for("pod filter on the new device", |l| l.our_filters("nd0", "ingress").len() == 1);
    lab.set_node_addresses(&["198.18.5.10"]);
    let devs = lab.backend().tc_devices();
    assert_eq!(devs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["nd0"], "{devs:?}");
    assert!(lab.our_filters("eth0", "egress").is_empty(), "{}", lab.filters("eth0", "egress"));
    lab.wait_for("node filters on nd0 only, pod filter on eth0", |l| {
        let (nd, eth) = (l.our_filters("nd0", "ingress"), l.our_filters("eth0", "ingress"));
        nd.len() == 1 && nd[0].contains("kp_tc_ingress") && eth.len() == 1 && eth[0].contains("kp_tc_pod_ingress")
    });
    assert_eq!(lab.our_filters("nd0", "egress").len(), 1);

    // Cleanup removes only ours: a foreign filter (classic BPF, pref 9) and its qdisc stay on vpod.
    tc(&[
        "-n",
        &node,
        "filter",
        "add",
        "dev",
        "vpod",
        "egress",
        "pref",
        "9",
        "protocol",
        "all",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
    drop(lab.backend.take());
    let removed = EbpfBackend::cleanup_tc_filters(&netns(&node)).unwrap();
    assert!(removed.len() >= 5, "{removed:?}");
    for dev in ["eth0", "vpod", "vpod2", "nd0", "nd0p"] {
        for hook in ["ingress", "egress"] {
            assert!(lab.our_filters(dev, hook).is_empty(), "{dev} {hook}: {}", lab.filters(dev, hook));
        }
    }
    assert!(lab.filters("vpod", "egress").contains("pref 9 "), "foreign filter kept");
    assert!(tc(&["-n", &node, "qdisc", "show", "dev", "vpod"]).contains("clsact"), "qdisc in use kept");
    assert!(!tc(&["-n", &node, "qdisc", "show", "dev", "vpod2"]).contains("clsact"), "our qdisc removed");
    assert!(EbpfBackend::cleanup_tc_filters(&netns(&node)).unwrap().is_empty(), "nothing left of ours");
}

/// The node device's later tc user: u32 filters behind ours (pref above [`CLSACT_PRIORITY`]; under tcx the
/// clsact chain runs after the links), each counting what it matches with a `mirred` mirror to the spare
/// veth `obs0` (whose peer drops the copies). This kernel has neither matchall nor gact: u32 + mirred it has.
struct Observer {
    ns: String,
}

/// Ingress observers: (pref, u32 selector). Offsets assume 20-byte IPv4 headers (the lab sends no options).
const OBS_INGRESS: [(u16, &str); 5] = [
    (49000, "match ip protocol 6 0xff match u16 9 0xffff at 22"),
    (49001, "match ip protocol 17 0xff match u16 9 0xffff at 22"),
    (49002, "match ip protocol 1 0xff"),
    // Translated packets as they leave our program: a forward after DNAT, a reply after un-SNAT.
    (49003, "match ip protocol 6 0xff match u16 8080 0xffff at 22"),
    (49004, "match ip protocol 6 0xff match u16 30080 0xffff at 20"),
];
/// Egress observers, as [`OBS_INGRESS`]; 49103 is a local backend's reply after its source rewrite. Their
/// own prefs: u32 keeps one set of hash tables per qdisc, and a dump of either hook shows both hooks' filters.
const OBS_EGRESS: [(u16, &str); 4] = [
    (49100, "match ip protocol 6 0xff match u16 9 0xffff at 20"),
    (49101, "match ip protocol 17 0xff match u16 9 0xffff at 22"),
    (49102, "match ip protocol 1 0xff"),
    (49103, "match ip protocol 6 0xff match u16 30080 0xffff at 20"),
];

impl Observer {
    /// Adds the observers to `eth0` of `ns` (and the clsact qdisc, when tcx left it absent). They go with
    /// the namespace, which the lab's `Drop` deletes.
    fn add(ns: &str) -> Observer {
        run("ip", &["-n", ns, "link", "add", "obs0", "type", "veth", "peer", "name", "obs1"]);
        run("ip", &["-n", ns, "link", "set", "obs0", "up"]);
        run("ip", &["-n", ns, "link", "set", "obs1", "up"]);
        if !tc(&["-n", ns, "qdisc", "show", "dev", "eth0"]).contains("clsact") {
            tc(&["-n", ns, "qdisc", "add", "dev", "eth0", "clsact"]);
        }
        for (hook, list) in [("ingress", &OBS_INGRESS[..]), ("egress", &OBS_EGRESS[..])] {
            for (pref, sel) in list {
                let pref = pref.to_string();
                let mut args = vec!["-n", ns, "filter", "add", "dev", "eth0", hook, "pref", &pref, "protocol", "ip"];
                args.push("u32");
                args.extend(sel.split_whitespace());
                args.extend(["action", "mirred", "egress", "mirror", "dev", "obs0"]);
                tc(&args);
            }
        }
        Observer { ns: ns.to_string() }
    }

    /// Packets the observer at `pref` on `hook` counted (its mirred action's statistics).
    fn count(&self, hook: &str, pref: u16) -> u64 {
        let out = tc(&["-n", &self.ns, "-s", "-j", "filter", "show", "dev", "eth0", hook]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("tc json {e}: {out}"));
        let mut found = None;
        for f in v.as_array().into_iter().flatten().filter(|f| f["pref"] == pref) {
            for a in f["options"]["actions"].as_array().into_iter().flatten() {
                *found.get_or_insert(0) += a["stats"]["packets"].as_u64().unwrap_or(0);
            }
        }
        found.unwrap_or_else(|| panic!("no observer {hook} pref {pref}: {out}"))
    }

    /// Every observer's count, `hook/pref=n`, for failure messages.
    fn all(&self) -> String {
        let ing = OBS_INGRESS.iter().map(|(p, _)| format!("ingress/{p}={}", self.count("ingress", *p)));
        let eg = OBS_EGRESS.iter().map(|(p, _)| format!("egress/{p}={}", self.count("egress", *p)));
        ing.chain(eg).collect::<Vec<_>>().join(" ")
    }

    /// Translated packets end at our programs: none of the observers `(hook, pref)` may have counted any.
    fn assert_nothing_passed_on(&self, observers: &[(&str, u16)]) {
        for &(hook, pref) in observers {
            assert_eq!(self.count(hook, pref), 0, "translated packets passed on ({hook}/{pref}): {}", self.all());
        }
    }
}

/// `n` TCP connects from `from` to a port nothing listens on: each must be refused (by the peer's stack).
fn tcp_refused(from: &str, addr: &str, port: u16, n: usize) {
    let sa = SocketAddr::new(addr.parse().unwrap(), port);
    for i in 0..n {
        let r = in_ns(from, move || TcpStream::connect_timeout(&sa, IO_TIMEOUT).map(|_| ()));
        let e = r.expect_err("nothing listens there");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "connect {i} to {sa}: {e}");
    }
}

/// `n` datagrams from `from` to `addr:port` (a closed port: the peer's stack answers port unreachable).
fn udp_to_closed(from: &str, addr: &str, port: u16, n: usize) {
    let sa = SocketAddr::new(addr.parse().unwrap(), port);
    in_ns(from, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..n {
            // Unconnected: a queued port unreachable never fails the next send.
            s.send_to(b"x", sa).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

/// Waits (bounded) until the observer at `hook`/`pref` counted at least `min` packets.
fn wait_count(obs: &Observer, hook: &str, pref: u16, min: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while obs.count(hook, pref) < min {
        assert!(Instant::now() < deadline, "{what}: {hook}/{pref} below {min}; counts: {}", obs.all());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Packets our programs leave untouched reach a later tc user on the node device; packets they translate
/// or redirect do not (their verdict is final), and Service traffic keeps working with the observer there.
fn untouched_packets_reach_later_filters(test: &str, mode: TcAttachMode) {
    let Some(mut lab) = ClsLab::with_mode(test, SocketLbScope::All, mode) else { return };
    match mode {
        TcAttachMode::Tcx => assert_eq!(lab.link_pins().len(), 2, "{:?}", lab.link_pins()),
        _ => assert_eq!(lab.our_filters("eth0", "ingress").len(), 1, "{}", lab.filters("eth0", "ingress")),
    }
    let obs = Observer::add(&lab.node);
    let (ext, node) = (lab.ext.clone(), lab.node.clone());
    let n = 3;

    // Not a Service: TCP and UDP to port 9 of the node (ingress parse → no frontend; egress: the node's
    // resets and port unreachables, no conntrack entry / not of a translated flow).
    tcp_refused(&ext, NODE_IP, 9, n);
    wait_count(&obs, "ingress", 49000, n as u64, "SYNs to a non-Service port");
    wait_count(&obs, "egress", 49100, n as u64, "the node's resets");
    udp_to_closed(&ext, NODE_IP, 9, n);
    wait_count(&obs, "ingress", 49001, n as u64, "datagrams to a non-Service port");
    // The kernel rate-limits its ICMP errors: at least one.
    wait_count(&obs, "egress", 49102, 1, "the node's port unreachables");
    // From the node: its datagrams leave untouched, the client's port unreachable comes in untouched.
    udp_to_closed(&node, CLIENT_IP, 9, n);
    wait_count(&obs, "egress", 49101, n as u64, "the node's datagrams");
    wait_count(&obs, "ingress", 49002, 1, "the client's port unreachables");

    // NodePort with a local endpoint: the DNATed forwards and source-rewritten replies end at our programs.
    let tcp = name("np", Protocol::Tcp);
    lab.apply(&tcp, vec![ep(POD_IP, true)], node_port);
    for _ in 0..n {
        let l = lab.tcp_from(&lab.ext, NODE_IP, NODE_PORT).expect("NodePort answers (local endpoint)");
        assert_eq!(field(&l, "backend="), Some(POD_IP), "{l}");
        assert_eq!(peer_ip(&l), CLIENT_IP, "{l}");
    }
    obs.assert_nothing_passed_on(&[("ingress", 49003), ("egress", 49103)]);
    // NodePort with a remote endpoint: SNATed forwards and un-SNATed replies are redirected. (The redirected
    // replies then leave through eth0's egress, which has nothing to do for them: not checked there.)
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], node_port);
    for _ in 0..n {
        let l = lab.tcp_from(&lab.ext, NODE_IP, NODE_PORT).expect("NodePort answers (remote endpoint)");
        assert_eq!(field(&l, "backend="), Some(REMOTE_IP), "{l}");
        assert_eq!(peer_ip(&l), NODE_IP, "{l}");
    }
    obs.assert_nothing_passed_on(&[("ingress", 49003), ("ingress", 49004)]);
}

#[test]
fn tcx_untouched_packets_reach_later_tc_filters() {
    untouched_packets_reach_later_filters("tcx_untouched_packets_reach_later_tc_filters", TcAttachMode::Tcx);
}

#[test]
fn clsact_untouched_packets_reach_later_tc_filters() {
    untouched_packets_reach_later_filters("clsact_untouched_packets_reach_later_tc_filters", TcAttachMode::Clsact);
}
