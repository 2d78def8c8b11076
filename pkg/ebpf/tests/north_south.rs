//! Privileged tests of the north-south tc datapath: real packets from an "external" namespace to a node
//! namespace whose underlay device runs the tc programs, with a local pod and a remote endpoint.
//!
//! Topology (every namespace created here, removed on drop, also on panic):
//! - `ext`: bridge `br0` 198.18.0.200/24 (the external client), route 198.19.0.0/16 via the node;
//! - `node`: `eth0` in `br0` 198.18.0.10/24 (node address, gets the tc programs), forwarding on, `vpod`
//!   198.18.16.1/24 to the pod;
//! - `pod`: `eth0` 198.18.16.10/24, default via 198.18.16.1 (a local endpoint);
//! - `remote`: `eth0` in `br0` 198.18.0.11/24 (a remote endpoint; its replies come back through `br0`), route
//!   to the pods' 198.18.16.0/20 via the node;
//! - `pod2`: `eth0` 198.18.17.10/24 behind the node's `vpod2` 198.18.17.1/24, default via the node (a client
//!   pod for the per-packet ClusterIP path of `--socket-lb-scope`).
//!
//! Only 198.18.0.0/15 addresses; no namespace has a route off the machine; programs attach only to devices
//! of the node namespace (the backend resolves devices there, never in the test's own namespace); nothing is
//! dialled from the host namespace (clients run on threads that entered `ext`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{CLIENT, SERVER_LIFETIME, ep, in_ns, name, netns, run, skip_reason, svc};
use ebpf_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use proxier::backend::Backend;
use proxier::model::{Changes, Endpoint, IpFamily, Protocol, ServicePortInfo, ServicePortName, Snapshot};
use proxy_ebpf::{EbpfBackend, EbpfOptions, SocketLbScope, detect_cgroup2_mount};

const NODE_IP: &str = "198.18.0.10";
const CLIENT_IP: &str = "198.18.0.200";
const POD_IP: &str = "198.18.16.10";
const REMOTE_IP: &str = "198.18.0.11";
const POD2_IP: &str = "198.18.17.10";
const NODE_PORT: u16 = 30080;
const IO_TIMEOUT: Duration = Duration::from_millis(1500);

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct NsLab {
    ext: String,
    node: String,
    pod: String,
    pod2: String,
    scope: SocketLbScope,
    created: Vec<String>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    backend: Option<EbpfBackend>,
    snap: Snapshot,
}

impl NsLab {
    fn new(test: &str) -> Option<NsLab> {
        Self::with_scope(test, SocketLbScope::All)
    }

    fn with_scope(test: &str, scope: SocketLbScope) -> Option<NsLab> {
        if let Some(reason) = skip_reason() {
            println!("SKIP {test}: {reason}");
            return None;
        }
        let tag = format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let mut lab = NsLab {
            ext: format!("kpns-e-{tag}"),
            node: format!("kpns-n-{tag}"),
            pod: format!("kpns-p-{tag}"),
            pod2: format!("kpns-q-{tag}"),
            scope,
            created: Vec::new(),
            cgroup: detect_cgroup2_mount().unwrap().join(format!("kp-ns-test-{tag}")),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/kp-ns-test-{tag}")),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            backend: None,
            snap: Snapshot::default(),
        };
        let (ext, node, pod, pod2, remote) =
            (lab.ext.clone(), lab.node.clone(), lab.pod.clone(), lab.pod2.clone(), format!("kpns-r-{tag}"));
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
        run("ip", &["-n", &node, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod]);
        run("ip", &["-n", &node, "addr", "add", "198.18.16.1/24", "dev", "vpod"]);
        run("ip", &["-n", &node, "link", "set", "vpod", "up"]);
        run("ip", &["netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        run("ip", &["-n", &pod, "addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
        run("ip", &["-n", &pod, "link", "set", "eth0", "up"]);
        run("ip", &["-n", &pod, "route", "add", "default", "via", "198.18.16.1"]);
        run("ip", &["-n", &node, "link", "add", "vpod2", "type", "veth", "peer", "name", "eth0", "netns", &pod2]);
        run("ip", &["-n", &node, "addr", "add", "198.18.17.1/24", "dev", "vpod2"]);
        run("ip", &["-n", &node, "link", "set", "vpod2", "up"]);
        run("ip", &["-n", &pod2, "addr", "add", &format!("{POD2_IP}/24"), "dev", "eth0"]);
        run("ip", &["-n", &pod2, "link", "set", "eth0", "up"]);
        run("ip", &["-n", &pod2, "route", "add", "default", "via", "198.18.17.1"]);
        run("ip", &["-n", &remote, "route", "add", "198.18.16.0/20", "via", NODE_IP]);
        lab.serve(&pod, POD_IP);
        lab.serve(&remote, REMOTE_IP);
        std::fs::create_dir(&lab.cgroup).unwrap();
        lab.snap.node.addresses = vec![NODE_IP.parse().unwrap()];
        lab.start_backend();
        Some(lab)
    }

    fn opts(&self) -> EbpfOptions {
        let mut o = EbpfOptions::new(&self.cgroup, &self.bpffs, vec![IpFamily::V4, IpFamily::V6]);
        o.tc_netns = Some(netns(&self.node));
        // The tests run passes themselves.
        o.ct_gc_interval = Some(Duration::from_secs(3600));
        o.socket_lb_scope = self.scope;
        o
    }

    fn start_backend(&mut self) {
        let mut b = EbpfBackend::new(self.opts()).expect("load and attach");
        b.sync(&self.snap, &Changes { full: true, ..Default::default() }).expect("full sync");
        self.backend = Some(b);
    }

    fn backend(&mut self) -> &mut EbpfBackend {
        self.backend.as_mut().unwrap()
    }

    /// TCP (greeting, then line echo) and UDP servers on port 8080 of `ip` in `ns`, answering
    /// `backend=<ip> peer=<addr>`.
    fn serve(&mut self, ns: &str, ip: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        let (tcp, udp) =
            in_ns(ns, move || (std::net::TcpListener::bind((ip, 8080)).unwrap(), UdpSocket::bind((ip, 8080)).unwrap()));
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
        let stop = self.stop.clone();
        udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        self.servers.push(std::thread::spawn(move || {
            let end = Instant::now() + SERVER_LIFETIME;
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("backend={ip} peer={peer}").as_bytes(), peer);
                }
            }
        }));
    }

    fn apply(&mut self, n: &ServicePortName, eps: Vec<Endpoint>, tweak: impl FnOnce(&mut ServicePortInfo)) {
        self.apply_at("198.19.1.1", n, eps, tweak);
    }

    fn apply_at(
        &mut self,
        cip: &str,
        n: &ServicePortName,
        eps: Vec<Endpoint>,
        tweak: impl FnOnce(&mut ServicePortInfo),
    ) {
        let state = svc(cip, 80, n.protocol, eps, tweak);
        self.snap.v4.services.insert(n.clone(), state);
        let mut changes = Changes::default();
        changes.v4.services.insert(n.clone());
        let snap = self.snap.clone();
        self.backend().sync(&snap, &changes).expect("sync");
    }

    /// Runs the test client in namespace `ns` (and in the test cgroup, so socket LB applies unless the
    /// scope excludes it); one output line per op.
    fn client(&self, ns: &str, ops: &[(&str, &str, u16)]) -> Vec<String> {
        let mut cmd = std::process::Command::new(CLIENT);
        cmd.arg("--cgroup").arg(&self.cgroup).arg("--netns").arg(netns(ns));
        for (op, addr, port) in ops {
            cmd.args([*op, *addr, &port.to_string()]);
        }
        let mut child =
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("client");
        // Every op has a 2 s timeout; bound the whole run anyway.
        let deadline = Instant::now() + Duration::from_secs(5 + 3 * ops.len() as u64);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("client timed out: {ops:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
    }

    /// Forward conntrack entries from `client` to `vip`: each is a flow translated per packet, i.e. a
    /// packet that left the client's namespace addressed to the ClusterIP.
    fn ct_flows(&self, client: &str, vip: &str) -> usize {
        let (c, v) = (proxy_ebpf::addr16(client.parse().unwrap()), proxy_ebpf::addr16(vip.parse().unwrap()));
        proxy_ebpf::ct::CtMap::open(&self.bpffs)
            .unwrap()
            .dump()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.dir == ebpf_common::CT_DIR_FWD && k.saddr == c && k.daddr == v)
            .count()
    }

    /// Waits (bounded) until the pod program is attached to every device in `names`.
    fn wait_pod_devices(&mut self, names: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let devs = self.backend().pod_devices();
            if names.iter().all(|n| devs.iter().any(|d| d.name == *n)) {
                return;
            }
            assert!(Instant::now() < deadline, "pod program not on {names:?}: {devs:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn tcp(&self, addr: &str, port: u16) -> Option<String> {
        let sa = SocketAddr::new(addr.parse().unwrap(), port);
        in_ns(&self.ext, move || {
            let s = TcpStream::connect_timeout(&sa, IO_TIMEOUT).ok()?;
            s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).ok()?;
            Some(line.trim().to_string())
        })
    }

    fn udp(&self, addr: &str, port: u16) -> Option<String> {
        let sa = SocketAddr::new(addr.parse().unwrap(), port);
        in_ns(&self.ext, move || {
            let s = UdpSocket::bind("0.0.0.0:0").ok()?;
            s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
            s.send_to(b"ping", sa).ok()?;
            let mut buf = [0u8; 128];
            let (n, _) = s.recv_from(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).to_string())
        })
    }
}

fn echo_conn(s: TcpStream, ip: IpAddr, peer: SocketAddr, stop: Arc<AtomicBool>, end: Instant) {
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
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

impl Drop for NsLab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.backend.take());
        if let Err(e) = EbpfBackend::cleanup_all(&self.bpffs, &self.cgroup) {
            eprintln!("cleanup {}: {e}", self.bpffs.display());
        }
        if self.cgroup.exists() {
            let _ = std::fs::remove_dir(&self.cgroup);
        }
        for ns in &self.created {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

fn peer_ip(line: &str) -> String {
    field(line, "peer=").and_then(|p| p.parse::<SocketAddr>().ok()).map(|p| p.ip().to_string()).unwrap_or_default()
}

fn peer_port(line: &str) -> u16 {
    field(line, "peer=").and_then(|p| p.parse::<SocketAddr>().ok()).map(|p| p.port()).unwrap_or_default()
}

fn node_port(info: &mut ServicePortInfo) {
    info.node_port = NODE_PORT;
}

#[test]
fn node_port_local_and_remote_backends_with_conntrack_gc() {
    let Some(mut lab) = NsLab::new("node_port_local_and_remote_backends_with_conntrack_gc") else { return };
    let devs = lab.backend().tc_devices();
    assert_eq!(devs.len(), 1, "{devs:?}");
    assert_eq!(devs[0].name, "eth0");
    let tcp = name("np", Protocol::Tcp);
    let udp = name("np", Protocol::Udp);

    // Local endpoint: DNAT only, the pod sees the client.
    lab.apply(&tcp, vec![ep(POD_IP, true)], node_port);
    lab.apply(&udp, vec![ep(POD_IP, true)], node_port);
    for _ in 0..3 {
        let l = lab.tcp(NODE_IP, NODE_PORT).expect("tcp answer from the local pod");
        assert_eq!(field(&l, "backend="), Some(POD_IP), "{l}");
        assert_eq!(peer_ip(&l), CLIENT_IP, "{l}");
        let l = lab.udp(NODE_IP, NODE_PORT).expect("udp answer from the local pod");
        assert_eq!(field(&l, "backend="), Some(POD_IP), "{l}");
        assert_eq!(peer_ip(&l), CLIENT_IP, "{l}");
    }

    // Remote endpoint under Cluster: SNAT to the node address with a port from the SNAT range.
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], node_port);
    lab.apply(&udp, vec![ep(REMOTE_IP, false)], node_port);
    for _ in 0..3 {
        for l in
            [lab.tcp(NODE_IP, NODE_PORT).expect("tcp via SNAT"), lab.udp(NODE_IP, NODE_PORT).expect("udp via SNAT")]
        {
            assert_eq!(field(&l, "backend="), Some(REMOTE_IP), "{l}");
            assert_eq!(peer_ip(&l), NODE_IP, "{l}");
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&peer_port(&l)), "{l}");
        }
    }

    // Both: 300 connections spread over the two within ±20% of uniform.
    lab.apply(&tcp, vec![ep(POD_IP, true), ep(REMOTE_IP, false)], node_port);
    let mut pod = 0usize;
    let n = 300;
    for _ in 0..n {
        let l = lab.tcp(NODE_IP, NODE_PORT).expect("answer");
        if field(&l, "backend=") == Some(POD_IP) {
            pod += 1;
        }
    }
    let expected = n / 2;
    assert!(pod.abs_diff(expected) * 5 <= expected, "{pod} of {n} to the local pod");

    // Conntrack: entries exist; a pass now keeps them (alive), a pass 7 h ahead removes them all.
    let keep = lab.backend().run_ct_gc(Duration::ZERO).unwrap();
    assert!(keep.scanned >= 2 * 300, "{keep:?}");
    assert_eq!(keep.deleted, 0, "{keep:?}");
    let gone = lab.backend().run_ct_gc(Duration::from_secs(7 * 3600)).unwrap();
    assert_eq!(gone.deleted, gone.scanned, "{gone:?}");

    // The datapath counters reach the metrics collector.
    let registry = prometheus::Registry::new();
    lab.backend().metrics_collector().unwrap().register(&registry).unwrap();
    let mut buf = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    let inserts: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kubeproxy_ebpf_datapath_events_total{event=\"ct_insert\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(inserts >= 312, "{text}");
    assert!(text.contains("kubeproxy_ebpf_conntrack_map_pressure"), "{text}");
    let ct_mem = text
        .lines()
        .find(|l| l.starts_with("kubeproxy_ebpf_map_memory_bytes{map=\"KP_CT\"}"))
        .unwrap_or("KP_CT memory not reported");
    println!("conntrack map at default size: {ct_mem}");
}

#[test]
fn external_traffic_policy_local_keeps_client_and_drops_without_local_endpoint() {
    let Some(mut lab) = NsLab::new("external_traffic_policy_local") else { return };
    let tcp = name("etp", Protocol::Tcp);
    let local = |i: &mut ServicePortInfo| {
        i.node_port = NODE_PORT;
        i.external_policy_local = true;
    };
    lab.apply(&tcp, vec![ep(POD_IP, true), ep(REMOTE_IP, false)], local);
    for _ in 0..20 {
        let l = lab.tcp(NODE_IP, NODE_PORT).expect("answer from the local endpoint");
        assert_eq!(field(&l, "backend="), Some(POD_IP), "{l}");
        assert_eq!(peer_ip(&l), CLIENT_IP, "{l}");
    }
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], local);
    assert_eq!(lab.tcp(NODE_IP, NODE_PORT), None, "no local endpoint: dropped");
}

#[test]
fn external_ip_and_load_balancer_source_ranges() {
    let Some(mut lab) = NsLab::new("external_ip_and_load_balancer_source_ranges") else { return };
    let ext = name("extip", Protocol::Tcp);
    lab.apply(&ext, vec![ep(REMOTE_IP, false)], |i| i.external_ips = vec!["198.19.0.20".parse().unwrap()]);
    let l = lab.tcp("198.19.0.20", 80).expect("external IP answers");
    assert_eq!(field(&l, "backend="), Some(REMOTE_IP), "{l}");
    assert_eq!(peer_ip(&l), NODE_IP, "{l}");
    let l = lab.udp("198.19.0.20", 80);
    assert_eq!(l, None, "no UDP port on the service");

    let lb = name("lb", Protocol::Tcp);
    let ranges = |r: &'static str| {
        move |i: &mut ServicePortInfo| {
            i.load_balancer_vips = vec!["198.19.0.30".parse().unwrap()];
            i.load_balancer_source_ranges = vec![r.parse().unwrap()];
        }
    };
    lab.apply(&lb, vec![ep(POD_IP, true)], ranges("198.18.0.200/32"));
    let l = lab.tcp("198.19.0.30", 80).expect("allowed source answers");
    assert_eq!(field(&l, "backend="), Some(POD_IP), "{l}");
    lab.apply(&lb, vec![ep(POD_IP, true)], ranges("198.18.1.0/24"));
    assert_eq!(lab.tcp("198.19.0.30", 80), None, "source outside the ranges: dropped");
    lab.apply(&lb, vec![ep(POD_IP, true)], |i| i.load_balancer_vips = vec!["198.19.0.30".parse().unwrap()]);
    assert!(lab.tcp("198.19.0.30", 80).is_some(), "no ranges: open again");
}

#[test]
fn long_lived_tcp_connection_survives_restart() {
    let Some(mut lab) = NsLab::new("long_lived_tcp_connection_survives_restart") else { return };
    let tcp = name("ll", Protocol::Tcp);
    // A remote endpoint: the SNAT path depends on every map surviving.
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], node_port);
    let sa = SocketAddr::new(NODE_IP.parse().unwrap(), NODE_PORT);
    let conn = in_ns(&lab.ext, move || TcpStream::connect_timeout(&sa, IO_TIMEOUT).expect("connect"));
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(field(&line, "backend="), Some(REMOTE_IP), "{line}");
    let roundtrip = |r: &mut BufReader<TcpStream>, w: &mut TcpStream, msg: &str| {
        writeln!(w, "{msg}").unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), msg);
    };
    roundtrip(&mut r, &mut w, "before");

    // Like kill -9: the process' handles go away, pins stay; a new backend adopts them.
    drop(lab.backend.take());
    roundtrip(&mut r, &mut w, "while down");
    lab.start_backend();
    roundtrip(&mut r, &mut w, "after restart");
    let pins: Vec<String> = std::fs::read_dir(lab.bpffs.join("v1/links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tc-"))
        .collect();
    assert_eq!(pins.len(), 2, "{pins:?}");
    drop(w);
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
}

#[test]
fn node_port_session_affinity_sticks_per_client_address() {
    let Some(mut lab) = NsLab::new("node_port_session_affinity_sticks_per_client_address") else { return };
    let tcp = name("sticky", Protocol::Tcp);
    let udp = name("sticky", Protocol::Udp);
    let sticky = |i: &mut ServicePortInfo| {
        i.node_port = NODE_PORT;
        i.session_affinity_timeout = Some(60);
    };
    let eps = vec![ep(POD_IP, true), ep(REMOTE_IP, false)];
    lab.apply(&tcp, eps.clone(), sticky);
    lab.apply(&udp, eps.clone(), sticky);
    let seen: Vec<String> = (0..20)
        .map(|_| lab.tcp(NODE_IP, NODE_PORT).expect("tcp answer"))
        .map(|l| field(&l, "backend=").unwrap_or_default().to_string())
        .collect();
    assert!(seen.iter().all(|b| b == &seen[0]) && !seen[0].is_empty(), "affinity must pin one backend: {seen:?}");
    let udp_seen: Vec<String> = (0..10)
        .map(|_| lab.udp(NODE_IP, NODE_PORT).expect("udp answer"))
        .map(|l| field(&l, "backend=").unwrap_or_default().to_string())
        .collect();
    assert!(udp_seen.iter().all(|b| b == &udp_seen[0]), "{udp_seen:?}");

    // Without affinity the same 2 backends are both used (20 picks miss one with probability 2^-19).
    lab.apply(&tcp, eps, node_port);
    let spread: std::collections::BTreeSet<String> = (0..20)
        .map(|_| lab.tcp(NODE_IP, NODE_PORT).expect("tcp answer"))
        .map(|l| field(&l, "backend=").unwrap_or_default().to_string())
        .collect();
    assert_eq!(spread.len(), 2, "{spread:?}");
}

fn backend_ip(line: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix("reply=backend=")).unwrap_or_default().to_string()
}

#[test]
fn host_only_pods_reach_cluster_ip_per_packet() {
    let Some(mut lab) = NsLab::with_scope("host_only_pods_reach_cluster_ip_per_packet", SocketLbScope::HostOnly) else {
        return;
    };
    lab.wait_pod_devices(&["vpod", "vpod2"]);
    let devs = lab.backend().pod_devices();
    assert!(devs.iter().all(|d| d.name != "eth0" && d.name != "lo"), "{devs:?}");
    let (tcp, udp) = (name("cip", Protocol::Tcp), name("cip", Protocol::Udp));
    let eps = vec![ep(POD_IP, true), ep(REMOTE_IP, false)];
    lab.apply(&tcp, eps.clone(), |_| {});
    lab.apply(&udp, eps.clone(), |_| {});

    // A pod (in the cgroup, but not the proxy's namespace): per packet, to the local and the remote backend;
    // the backend sees the pod's own address, the pod sees the ClusterIP.
    let ops: Vec<(&str, &str, u16)> = (0..20).map(|_| ("tcp", "198.19.1.1", 80)).collect();
    let out = lab.client(&lab.pod2.clone(), &ops);
    let mut seen = std::collections::BTreeSet::new();
    for l in &out {
        assert!(l.starts_with("tcp ok peer=198.19.1.1:80 "), "{out:?}");
        assert!(l.contains(&format!("peer={POD2_IP}:")), "backend must see the pod: {l}");
        seen.insert(backend_ip(l));
    }
    assert_eq!(seen, [POD_IP.to_string(), REMOTE_IP.to_string()].into(), "{out:?}");
    assert!(lab.ct_flows(POD2_IP, "198.19.1.1") >= 20, "no per-packet flows recorded");
    let out = lab.client(&lab.pod2.clone(), &[("udp", "198.19.1.1", 80), ("udpc", "198.19.1.1", 80)]);
    assert!(out.iter().all(|l| l.contains("ok peer=198.19.1.1:80 ")), "{out:?}");

    // A node process still gets socket LB: no per-packet flow (the node has no route to the ClusterIP at all).
    let before = lab.ct_flows(NODE_IP, "198.19.1.1");
    let node = lab.node.clone();
    let out = lab.client(&node, &[("tcp", "198.19.1.1", 80)]);
    assert!(out[0].starts_with("tcp ok peer=198.19.1.1:80 "), "{out:?}");
    assert_eq!(lab.ct_flows(NODE_IP, "198.19.1.1"), before);

    // internalTrafficPolicy Local: only the local endpoint.
    lab.apply(&tcp, eps.clone(), |i| i.internal_policy_local = true);
    let ops: Vec<(&str, &str, u16)> = (0..8).map(|_| ("tcp", "198.19.1.1", 80)).collect();
    let out = lab.client(&lab.pod2.clone(), &ops);
    assert!(out.iter().all(|l| backend_ip(l) == POD_IP), "{out:?}");

    // sessionAffinity ClientIP on the per-packet path.
    lab.apply(&tcp, eps.clone(), |i| i.session_affinity_timeout = Some(60));
    let ops: Vec<(&str, &str, u16)> = (0..12).map(|_| ("tcp", "198.19.1.1", 80)).collect();
    let out = lab.client(&lab.pod2.clone(), &ops);
    let first = backend_ip(&out[0]);
    assert!(!first.is_empty() && out.iter().all(|l| backend_ip(l) == first), "{out:?}");

    // Hairpin: a pod reaching its own endpoint through a ClusterIP; it sees the ClusterIP as the source.
    let own = name("own", Protocol::Tcp);
    lab.apply_at("198.19.1.2", &own, vec![ep(POD_IP, true)], |_| {});
    let out = lab.client(&lab.pod.clone(), &[("tcp", "198.19.1.2", 80)]);
    assert!(out[0].starts_with("tcp ok peer=198.19.1.2:80 "), "{out:?}");
    assert_eq!(backend_ip(&out[0]), POD_IP, "{out:?}");
    assert!(out[0].contains(" peer=198.19.1.2:"), "hairpin source-NATed to the ClusterIP: {out:?}");

    // No endpoints: refused per packet, as socket LB refuses the connect().
    lab.apply(&tcp, vec![], |_| {});
    let out = lab.client(&lab.pod2.clone(), &[("tcp", "198.19.1.1", 80)]);
    assert_eq!(out[0], "tcp err=111", "{out:?}");
}

#[test]
fn host_only_new_pod_device_and_restart_keep_per_packet_flows() {
    let Some(mut lab) = NsLab::with_scope("host_only_new_pod_device_and_restart", SocketLbScope::HostOnly) else {
        return;
    };
    lab.wait_pod_devices(&["vpod", "vpod2"]);
    let tcp = name("cip", Protocol::Tcp);
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], |_| {});

    // A pod device created after the proxy started is picked up from the link event.
    let pod3 = lab.pod2.replace("kpns-q-", "kpns-s-");
    run("ip", &["netns", "add", &pod3]);
    lab.created.push(pod3.clone());
    run("ip", &["-n", &lab.node, "link", "add", "vpod3", "type", "veth", "peer", "name", "eth0", "netns", &pod3]);
    run("ip", &["-n", &lab.node, "addr", "add", "198.18.18.1/24", "dev", "vpod3"]);
    run("ip", &["-n", &lab.node, "link", "set", "vpod3", "up"]);
    run("ip", &["-n", &pod3, "addr", "add", "198.18.18.10/24", "dev", "eth0"]);
    run("ip", &["-n", &pod3, "link", "set", "lo", "up"]);
    run("ip", &["-n", &pod3, "link", "set", "eth0", "up"]);
    run("ip", &["-n", &pod3, "route", "add", "default", "via", "198.18.18.1"]);
    lab.wait_pod_devices(&["vpod3"]);
    let out = lab.client(&pod3, &[("tcp", "198.19.1.1", 80)]);
    assert!(out[0].starts_with("tcp ok peer=198.19.1.1:80 ") && backend_ip(&out[0]) == REMOTE_IP, "{out:?}");

    // An established per-packet connection survives a restart (programs swapped in the pinned links).
    let sa = SocketAddr::new("198.19.1.1".parse().unwrap(), 80);
    let conn = in_ns(&lab.pod2, move || TcpStream::connect_timeout(&sa, IO_TIMEOUT).expect("connect"));
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(field(&line, "backend="), Some(REMOTE_IP), "{line}");
    let roundtrip = |r: &mut BufReader<TcpStream>, w: &mut TcpStream, msg: &str| {
        writeln!(w, "{msg}").unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), msg);
    };
    roundtrip(&mut r, &mut w, "before");
    drop(lab.backend.take());
    roundtrip(&mut r, &mut w, "while down");
    lab.start_backend();
    roundtrip(&mut r, &mut w, "after restart");
    lab.wait_pod_devices(&["vpod", "vpod2", "vpod3"]);
    roundtrip(&mut r, &mut w, "after adoption");

    // A vanished device's pin is removed.
    run("ip", &["-n", &lab.node, "link", "del", "vpod3"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let pod_pins = |lab: &NsLab| -> Vec<String> {
        std::fs::read_dir(lab.bpffs.join("v1/links"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pod-"))
            .collect()
    };
    while pod_pins(&lab).iter().any(|n| n.contains("vpod3")) {
        assert!(Instant::now() < deadline, "stale pin kept: {:?}", pod_pins(&lab));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pod_pins(&lab).len(), 2, "{:?}", pod_pins(&lab));
    drop(w);
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);

    // Back to scope all: the pod programs are detached and their pins removed.
    drop(lab.backend.take());
    lab.scope = SocketLbScope::All;
    lab.start_backend();
    assert!(pod_pins(&lab).is_empty(), "{:?}", pod_pins(&lab));
}

#[test]
fn opt_out_skip_and_unskip_one_pod() {
    let Some(mut lab) = NsLab::with_scope("opt_out_skip_and_unskip_one_pod", SocketLbScope::OptOut) else {
        return;
    };
    lab.wait_pod_devices(&["vpod", "vpod2"]);
    let tcp = name("cip", Protocol::Tcp);
    lab.apply(&tcp, vec![ep(POD_IP, true), ep(REMOTE_IP, false)], |_| {});
    let pod2 = lab.pod2.clone();
    let ops: Vec<(&str, &str, u16)> = (0..4).map(|_| ("tcp", "198.19.1.1", 80)).collect();

    // Not listed: socket LB (no packet to the ClusterIP ever leaves the pod).
    let out = lab.client(&pod2, &ops);
    assert!(out.iter().all(|l| l.starts_with("tcp ok peer=198.19.1.1:80 ")), "{out:?}");
    assert_eq!(lab.ct_flows(POD2_IP, "198.19.1.1"), 0);

    let cookie = proxy_ebpf::socklb::netns_cookie(&netns(&pod2)).unwrap();
    let mut skip = proxy_ebpf::SkipMap::open(&lab.bpffs).unwrap();
    assert_eq!(skip.scope().map(|s| s.0), Some(SocketLbScope::OptOut));
    skip.skip(cookie).unwrap();
    assert_eq!(skip.list().unwrap(), vec![cookie]);
    let out = lab.client(&pod2, &ops);
    assert!(out.iter().all(|l| l.starts_with("tcp ok peer=198.19.1.1:80 ")), "{out:?}");
    assert_eq!(lab.ct_flows(POD2_IP, "198.19.1.1"), 4, "skipped: every connection per packet");
    // Another pod is not affected.
    let pod = lab.pod.clone();
    let out = lab.client(&pod, &[("tcp", "198.19.1.1", 80)]);
    assert!(out[0].starts_with("tcp ok"), "{out:?}");
    assert_eq!(lab.ct_flows(POD_IP, "198.19.1.1"), 0);

    assert!(skip.unskip(cookie).unwrap());
    assert!(!skip.unskip(cookie).unwrap());
    let out = lab.client(&pod2, &ops);
    assert!(out.iter().all(|l| l.starts_with("tcp ok peer=198.19.1.1:80 ")), "{out:?}");
    assert_eq!(lab.ct_flows(POD2_IP, "198.19.1.1"), 4, "unskipped: socket LB again");
}

// ---------------------------------------------------------------------------------------------------------
// No endpoints → reject (upstream's REJECT), per packet: TCP reset / ICMP port unreachable from tc.
// ---------------------------------------------------------------------------------------------------------

/// What a dial from `ext` ended with: `ok`, `err=<errno>` or `timeout`.
fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => "timeout".into(),
        Err(e) => format!("err={}", e.raw_os_error().unwrap_or(-1)),
    }
}

const REFUSED: &str = "err=111";

impl NsLab {
    /// A TCP connect from `ext`.
    fn tcp_dial(&self, addr: &str, port: u16) -> String {
        let sa = SocketAddr::new(addr.parse().unwrap(), port);
        in_ns(&self.ext, move || outcome(TcpStream::connect_timeout(&sa, IO_TIMEOUT).map(drop)))
    }

    /// A connected UDP socket from `ext`: send one datagram, wait for an answer.
    fn udp_dial(&self, addr: &str, port: u16) -> String {
        let sa = SocketAddr::new(addr.parse().unwrap(), port);
        in_ns(&self.ext, move || {
            let run = || -> std::io::Result<()> {
                let s = UdpSocket::bind(if sa.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.connect(sa)?;
                s.send(b"ping")?;
                s.recv(&mut [0u8; 128]).map(drop)
            };
            outcome(run())
        })
    }

    /// Syncs an IPv6 Service port (ClusterIP `cip`).
    fn apply_v6(
        &mut self,
        cip: &str,
        n: &ServicePortName,
        eps: Vec<Endpoint>,
        tweak: impl FnOnce(&mut ServicePortInfo),
    ) {
        let state = svc(cip, 80, n.protocol, eps, tweak);
        self.snap.v6.services.insert(n.clone(), state);
        let mut changes = Changes::default();
        changes.v6.services.insert(n.clone());
        let snap = self.snap.clone();
        self.backend().sync(&snap, &changes).expect("sync v6");
    }

    /// The datapath counters as the metrics endpoint shows them (`kubeproxy_ebpf_datapath_events_total`).
    fn dp_events(&mut self) -> std::collections::BTreeMap<String, u64> {
        let registry = prometheus::Registry::new();
        self.backend().metrics_collector().unwrap().register(&registry).unwrap();
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut buf).unwrap();
        String::from_utf8(buf)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("kubeproxy_ebpf_datapath_events_total{event=\""))
            .filter_map(|l| l.split_once("\"} "))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect()
    }
}

/// An AF_PACKET socket on device `dev` of namespace `ns`: every frame the device sends or receives.
fn capture(ns: &str, dev: &'static str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    in_ns(ns, move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscalls on a socket this closure owns; the structs are fully initialised.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let name = std::ffi::CString::new(dev).unwrap();
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert_ne!(ifindex, 0, "no device {dev}");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            assert_eq!(libc::bind(fd.as_raw_fd(), &sll as *const _ as *const libc::sockaddr, len), 0);
            let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
            let tvlen = std::mem::size_of::<libc::timeval>() as u32;
            assert_eq!(
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const _,
                    tvlen
                ),
                0
            );
            fd
        }
    })
}

/// The frames queued on a [`capture`] socket (until none comes for 200 ms; at most 1024).
fn frames(fd: &std::os::fd::OwnedFd) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while out.len() < 1024 {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        if n <= 0 {
            break;
        }
        out.push(buf[..n as usize].to_vec());
    }
    out
}

/// The Internet checksum of `data` after `init` (a running 32-bit sum); 0 over a checksummed message
/// means it is valid.
fn inet_sum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An IP packet seen on the wire, with its checksums checked.
#[derive(Debug)]
struct Wire {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// The IPv4 header checksum (always true for IPv6) and the L4 checksum (pseudo-header included
    /// for TCP and ICMPv6) are valid.
    csum_ok: bool,
    l4: Vec<u8>,
}

fn wire(frame: &[u8]) -> Option<Wire> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, proto, l4, ip_ok, pseudo) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let tot = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let l4 = ip.get(ihl..tot)?;
            let mut pseudo = Vec::from(&ip[12..20]);
            pseudo.extend_from_slice(&[0, ip[9]]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            (IpAddr::from(src), IpAddr::from(dst), ip[9], l4, inet_sum(&ip[..ihl], 0) == 0, pseudo)
        }
        0x86dd => {
            let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let l4 = ip.get(40..40 + plen)?;
            let mut pseudo = Vec::from(&ip[8..40]);
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
            (IpAddr::from(src), IpAddr::from(dst), ip[6], l4, true, pseudo)
        }
        _ => return None,
    };
    let mut msg = if proto == 1 { Vec::new() } else { pseudo };
    msg.extend_from_slice(l4);
    let l4_ok = inet_sum(&msg, 0) == 0;
    Some(Wire { src, dst, proto, csum_ok: ip_ok && l4_ok, l4: l4.to_vec() })
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Checks the rejects seen on the wire towards `client`: for each `(frontend, port)` a RST|ACK answering
/// the client's SYN (seq 0, ack = ISN + 1) and an ICMP port unreachable quoting the datagram, both from
/// the frontend, with valid checksums.
fn assert_rejects_on_wire(frames: &[Vec<u8>], client: IpAddr, frontends: &[(IpAddr, u16)]) {
    let pkts: Vec<Wire> = frames.iter().filter_map(|f| wire(f)).collect();
    for &(fe, port) in frontends {
        let syn = pkts
            .iter()
            .find(|w| w.proto == 6 && w.src == client && w.dst == fe && be16(&w.l4, 2) == port && w.l4[13] == 0x02)
            .unwrap_or_else(|| panic!("no SYN to {fe}:{port} captured: {pkts:#?}"));
        let rst = pkts
            .iter()
            .find(|w| w.proto == 6 && w.src == fe && w.dst == client && be16(&w.l4, 0) == port)
            .unwrap_or_else(|| panic!("no reset from {fe}:{port}: {pkts:#?}"));
        assert!(rst.csum_ok, "reset checksums: {rst:?}");
        assert_eq!(rst.l4[13], 0x14, "RST|ACK: {rst:?}");
        assert_eq!(be16(&rst.l4, 2), be16(&syn.l4, 0), "to the SYN's port: {rst:?}");
        assert_eq!(be32(&rst.l4, 4), 0, "seq 0: {rst:?}");
        assert_eq!(be32(&rst.l4, 8), be32(&syn.l4, 4).wrapping_add(1), "ack = ISN + 1: {rst:?} {syn:?}");
        assert_eq!(rst.l4.len(), 20, "no options, no payload: {rst:?}");

        let icmp_proto = if fe.is_ipv4() { 1 } else { 58 };
        let icmp = pkts
            .iter()
            .find(|w| w.proto == icmp_proto && w.src == fe && w.dst == client)
            .unwrap_or_else(|| panic!("no ICMP error from {fe}: {pkts:#?}"));
        assert!(icmp.csum_ok, "ICMP checksums: {icmp:?}");
        let (ty, code, ip_len) = if fe.is_ipv4() { (3, 3, 20) } else { (1, 4, 40) };
        assert_eq!((icmp.l4[0], icmp.l4[1]), (ty, code), "port unreachable: {icmp:?}");
        assert_eq!(icmp.l4.len(), 8 + ip_len + 8, "IP header + 8 bytes quoted: {icmp:?}");
        let quoted = &icmp.l4[8..];
        let (qdst, qproto) = if fe.is_ipv4() {
            (IpAddr::from(<[u8; 4]>::try_from(&quoted[16..20]).unwrap()), quoted[9])
        } else {
            (IpAddr::from(<[u8; 16]>::try_from(&quoted[24..40]).unwrap()), quoted[6])
        };
        assert_eq!((qdst, qproto, be16(quoted, ip_len + 2)), (fe, 17, port), "the datagram quoted: {icmp:?}");
    }
}

#[test]
fn no_endpoints_rejected_from_outside() {
    let Some(mut lab) = NsLab::new("no_endpoints_rejected_from_outside") else { return };
    let (tcp, udp) = (name("dead", Protocol::Tcp), name("dead", Protocol::Udp));
    let dead = |i: &mut ServicePortInfo| {
        i.node_port = NODE_PORT;
        i.external_ips = vec!["198.19.0.40".parse().unwrap()];
    };
    lab.apply(&tcp, vec![], dead);
    lab.apply(&udp, vec![], dead);
    let cap = capture(&lab.ext, "vn");
    for (addr, port) in [(NODE_IP, NODE_PORT), ("198.19.0.40", 80)] {
        assert_eq!(lab.tcp_dial(addr, port), REFUSED, "TCP {addr}:{port}");
        assert_eq!(lab.udp_dial(addr, port), REFUSED, "UDP {addr}:{port}");
    }
    let frontends = [(NODE_IP.parse().unwrap(), NODE_PORT), ("198.19.0.40".parse().unwrap(), 80)];
    assert_rejects_on_wire(&frames(&cap), CLIENT_IP.parse().unwrap(), &frontends);
    let ev = lab.dp_events();
    assert_eq!(ev.get("reject_sent"), Some(&4), "{ev:?}");
    assert_eq!(ev.get("reject_rate_limited"), Some(&0), "{ev:?}");

    // An endpoint appears: served again; it goes away: refused again.
    lab.apply(&tcp, vec![ep(POD_IP, true)], dead);
    assert_eq!(lab.tcp_dial(NODE_IP, NODE_PORT), "ok");
    lab.apply(&tcp, vec![], dead);
    assert_eq!(lab.tcp_dial(NODE_IP, NODE_PORT), REFUSED);

    // A frontend with endpoints is untouched by any of this.
    let live = name("live", Protocol::Tcp);
    lab.apply_at("198.19.1.5", &live, vec![ep(POD_IP, true)], |i| i.node_port = NODE_PORT + 1);
    let l = lab.tcp(NODE_IP, NODE_PORT + 1).expect("a live NodePort answers");
    assert_eq!(field(&l, "backend="), Some(POD_IP), "{l}");
}

#[test]
fn external_traffic_policy_local_drops_only_without_local_endpoint() {
    let Some(mut lab) = NsLab::new("external_traffic_policy_local_drops_only_without_local_endpoint") else {
        return;
    };
    let (tcp, udp) = (name("etpl", Protocol::Tcp), name("etpl", Protocol::Udp));
    let local = |i: &mut ServicePortInfo| {
        i.node_port = NODE_PORT;
        i.external_policy_local = true;
    };
    // Endpoints elsewhere, none here: dropped (the health-check node port steers load balancers away).
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], local);
    lab.apply(&udp, vec![ep(REMOTE_IP, false)], local);
    assert_eq!(lab.tcp_dial(NODE_IP, NODE_PORT), "timeout");
    assert_eq!(lab.udp_dial(NODE_IP, NODE_PORT), "timeout");
    let ev = lab.dp_events();
    assert_eq!(ev.get("reject_sent"), Some(&0), "{ev:?}");
    assert!(ev.get("drop_no_endpoint").is_some_and(|n| *n >= 2), "{ev:?}");

    // No endpoint anywhere: rejected like under Cluster (upstream's REJECT comes before the policy).
    lab.apply(&tcp, vec![], local);
    lab.apply(&udp, vec![], local);
    assert_eq!(lab.tcp_dial(NODE_IP, NODE_PORT), REFUSED);
    assert_eq!(lab.udp_dial(NODE_IP, NODE_PORT), REFUSED);
}

#[test]
fn no_endpoints_rejected_over_ipv6() {
    let Some(mut lab) = NsLab::new("no_endpoints_rejected_over_ipv6") else { return };
    let (ext, node) = (lab.ext.clone(), lab.node.clone());
    run("ip", &["-n", &ext, "addr", "add", "2001:db8:1::200/64", "dev", "br0", "nodad"]);
    run("ip", &["-n", &node, "addr", "add", "2001:db8:1::10/64", "dev", "eth0", "nodad"]);
    run("ip", &["-n", &ext, "route", "add", "2001:db8:ff::/64", "via", "2001:db8:1::10"]);
    let (tcp, udp) = (name("dead6", Protocol::Tcp), name("dead6", Protocol::Udp));
    let dead = |i: &mut ServicePortInfo| i.external_ips = vec!["2001:db8:ff::40".parse().unwrap()];
    lab.apply_v6("2001:db8:fe::1", &tcp, vec![], dead);
    lab.apply_v6("2001:db8:fe::1", &udp, vec![], dead);
    let cap = capture(&ext, "vn");
    assert_eq!(lab.tcp_dial("2001:db8:ff::40", 80), REFUSED);
    assert_eq!(lab.udp_dial("2001:db8:ff::40", 80), REFUSED);
    let fe = ("2001:db8:ff::40".parse().unwrap(), 80);
    assert_rejects_on_wire(&frames(&cap), "2001:db8:1::200".parse().unwrap(), &[fe]);
}

#[test]
fn reject_replies_are_rate_limited() {
    let Some(mut lab) = NsLab::new("reject_replies_are_rate_limited") else { return };
    let udp = name("flood", Protocol::Udp);
    lab.apply(&udp, vec![], node_port);
    // Far more datagrams than the burst, as fast as one socket sends them (the rate refills one reply per
    // millisecond per CPU).
    let n = 3000;
    let sa = SocketAddr::new(NODE_IP.parse().unwrap(), NODE_PORT);
    in_ns(&lab.ext, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..n {
            let _ = s.send_to(b"x", sa);
        }
    });
    let ev = lab.dp_events();
    let (sent, limited) = (ev["reject_sent"], ev["reject_rate_limited"]);
    assert!(sent >= 1 && limited >= 1, "{ev:?}");
    assert!(sent + limited <= n, "{ev:?}");
    println!("{n} datagrams to a dead port: {sent} port unreachables sent, {limited} rate-limited");
}

#[test]
fn host_only_pods_refused_without_endpoints_per_packet() {
    let Some(mut lab) =
        NsLab::with_scope("host_only_pods_refused_without_endpoints_per_packet", SocketLbScope::HostOnly)
    else {
        return;
    };
    lab.wait_pod_devices(&["vpod", "vpod2"]);
    let (tcp, udp) = (name("cip0", Protocol::Tcp), name("cip0", Protocol::Udp));
    lab.apply(&tcp, vec![], |_| {});
    lab.apply(&udp, vec![], |_| {});
    let pod2 = lab.pod2.clone();
    let out = lab.client(&pod2, &[("tcp", "198.19.1.1", 80), ("udpc", "198.19.1.1", 80)]);
    assert_eq!(out, vec![format!("tcp {REFUSED}"), format!("udpc {REFUSED}")]);
    // Refused per packet by the pod device's program (the pod's sockets bypass socket LB).
    let ev = lab.dp_events();
    assert_eq!(ev.get("reject_sent"), Some(&2), "{ev:?}");

    // internalTrafficPolicy Local with endpoints elsewhere only: dropped, as upstream.
    lab.apply(&tcp, vec![ep(REMOTE_IP, false)], |i| i.internal_policy_local = true);
    let out = lab.client(&pod2, &[("tcp", "198.19.1.1", 80)]);
    assert!(out[0].starts_with("tcp err=") && !out[0].ends_with(REFUSED), "{out:?}");
    assert_eq!(lab.dp_events().get("reject_sent"), Some(&2));
}

// ---------------------------------------------------------------------------------------------------------
// One client port, two frontends of one backend: reply-tuple clashes are resolved by remapping the client's
// source port (as netfilter's nf_nat does), so both flows live at once.
// ---------------------------------------------------------------------------------------------------------

/// A socket of type `ty` with `SO_REUSEADDR` and `SO_REUSEPORT`, bound to `local` in the calling thread's
/// namespace, with [`IO_TIMEOUT`] on sends (which bounds a blocking `connect()` too) and receives.
fn reuse_bound(ty: socket2::Type, local: SocketAddrV4) -> Result<socket2::Socket, String> {
    let err = |what: &str, e: std::io::Error| format!("{what} {local}: {e}");
    let s = socket2::Socket::new(socket2::Domain::IPV4, ty, None).map_err(|e| err("socket", e))?;
    s.set_reuse_address(true)
        .and_then(|()| s.set_reuse_port(true))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| s.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| err("setsockopt", e))?;
    s.bind(&SocketAddr::V4(local).into()).map_err(|e| err("bind", e))?;
    Ok(s)
}

/// Connects a [`reuse_bound`] TCP socket to `to` (bounded by its send timeout).
fn tcp_connect_bound(local: SocketAddrV4, to: SocketAddrV4) -> Result<TcpStream, String> {
    let s = reuse_bound(socket2::Type::STREAM, local)?;
    s.connect(&SocketAddr::V4(to).into()).map_err(|e| format!("connect {local} → {to}: {e}"))?;
    Ok(TcpStream::from(s))
}

/// The `peer=` of an echo server's answer: the client address and port the backend saw.
fn answer_peer(line: &str) -> Result<SocketAddrV4, String> {
    field(line, "peer=").and_then(|p| p.parse().ok()).ok_or_else(|| format!("no peer in answer {line:?}"))
}

/// What the backend saw as the peer of each flow of [`one_port_two_frontends`].
#[derive(Debug)]
struct SharedPortPeers {
    udp: [SocketAddrV4; 2],
    tcp: [SocketAddrV4; 2],
}

/// In namespace `ns`, ONE source port `client` talks to two frontends `fe` of Services sharing one backend
/// (the echo servers), both flows alive at once:
/// - UDP: one unconnected socket `sendto`s each frontend in turn, twice; every answer must come from the
///   frontend it was sent to (`recvfrom`) and each flow must keep the port the backend saw first;
/// - TCP: two sockets bound to the same port (`SO_REUSEADDR|SO_REUSEPORT`; the 4-tuples differ) connect to
///   the two frontends and exchange lines alternately.
fn one_port_two_frontends(ns: &str, client: SocketAddrV4, fe: [SocketAddrV4; 2]) -> Result<SharedPortPeers, String> {
    in_ns(ns, move || {
        let udp = UdpSocket::from(reuse_bound(socket2::Type::DGRAM, client)?);
        let mut udp_peers: [Option<SocketAddrV4>; 2] = [None; 2];
        for round in 0..2 {
            for (i, to) in fe.iter().enumerate() {
                udp.send_to(b"ping", to).map_err(|e| format!("UDP send {client} → {to}: {e}"))?;
                let mut buf = [0u8; 128];
                let (n, from) = udp
                    .recv_from(&mut buf)
                    .map_err(|e| format!("UDP {client} → {to} (round {round}): no answer: {e}"))?;
                let line = String::from_utf8_lossy(&buf[..n]).to_string();
                if from != SocketAddr::V4(*to) {
                    return Err(format!("UDP {client} → {to} (round {round}): answered from {from}: {line}"));
                }
                let peer = answer_peer(&line)?;
                if udp_peers[i].is_some_and(|p| p != peer) {
                    return Err(format!("UDP flow to {to} changed its port: {udp_peers:?} then {peer}"));
                }
                udp_peers[i] = Some(peer);
            }
        }
        let mut conns = Vec::new();
        let mut tcp_peers = Vec::new();
        for to in fe {
            let s = tcp_connect_bound(client, to)?;
            let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| format!("TCP {client} → {to}: no greeting: {e}"))?;
            tcp_peers.push(answer_peer(&line)?);
            conns.push((to, s, r));
        }
        for round in 0..2 {
            for (to, w, r) in conns.iter_mut() {
                let msg = format!("round {round} to {to}");
                writeln!(w, "{msg}").map_err(|e| format!("TCP write to {to}: {e}"))?;
                let mut line = String::new();
                r.read_line(&mut line).map_err(|e| format!("TCP {client} → {to} ({msg}): {e}"))?;
                if line.trim() != msg {
                    return Err(format!("TCP {client} → {to}: sent {msg:?}, got {line:?}"));
                }
            }
        }
        Ok(SharedPortPeers { udp: [udp_peers[0].unwrap(), udp_peers[1].unwrap()], tcp: [tcp_peers[0], tcp_peers[1]] })
    })
}

/// In namespace `ns`, two connected UDP sockets bound to the same port `client` send to frontends `fe`
/// whose shared backend port has no listener, in the order 0, 1, 0. Each must read `ECONNREFUSED`: the
/// kernel hands the backend's port unreachable to a connected socket only when the error's quote names that
/// socket's own frontend and port, i.e. when the tc program translated the error of that very flow.
fn one_port_two_refusals(ns: &str, client: SocketAddrV4, fe: [SocketAddrV4; 2]) -> Result<(), String> {
    in_ns(ns, move || {
        let mut socks = Vec::new();
        for to in fe {
            let s = UdpSocket::from(reuse_bound(socket2::Type::DGRAM, client)?);
            s.connect(to).map_err(|e| format!("UDP connect {client} → {to}: {e}"))?;
            socks.push(s);
        }
        for i in [0, 1, 0] {
            let to = fe[i];
            socks[i].send(b"ping").map_err(|e| format!("UDP send {client} → {to}: {e}"))?;
            match socks[i].recv(&mut [0u8; 64]) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                other => return Err(format!("UDP {client} → {to}: wanted ECONNREFUSED, got {other:?}")),
            }
        }
        Ok(())
    })
}

/// Asserts the frontend-side peers of [`one_port_two_frontends`]: the first flow keeps the client's own
/// tuple, the second is remapped to another source port of the SNAT range; the address stays the client's.
fn assert_first_kept_second_remapped(peers: &[SocketAddrV4; 2], client: SocketAddrV4, what: &str) {
    assert_eq!(peers[0], client, "{what}: the first flow keeps the client's tuple: {peers:?}");
    assert_eq!(peers[1].ip(), client.ip(), "{what}: the backend must see the client's address: {peers:?}");
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&peers[1].port()), "{what}: remapped port: {peers:?}");
}

impl NsLab {
    /// Every conntrack entry has its partner and the partner points back: a remapped flow is still one pair
    /// for the GC (which then keeps live flows and ages both entries together).
    fn assert_ct_paired(&mut self) {
        let entries: std::collections::HashMap<_, _> =
            proxy_ebpf::ct::CtMap::open(&self.bpffs).unwrap().dump().unwrap().into_iter().collect();
        assert!(!entries.is_empty());
        for (k, v) in &entries {
            let pk = v.partner(k);
            let p = entries.get(&pk).unwrap_or_else(|| panic!("no partner of {k:?} → {v:?}: {entries:#?}"));
            assert_eq!(p.partner(&pk), *k, "partner of {k:?} points elsewhere");
        }
        let keep = self.backend().run_ct_gc(Duration::ZERO).unwrap();
        assert_eq!((keep.scanned, keep.deleted), (entries.len() as u64, 0), "{keep:?}");
    }

    /// Two Services (ClusterIPs `cips`, TCP and UDP port 80) sharing the one endpoint `backend`, plus two UDP
    /// Services (ClusterIPs `icmp_cips`) sharing `backend`'s port 8181, where nothing listens; `tweak` applies
    /// to the four Services in that order.
    fn shared_backend_services(
        &mut self,
        tag: &str,
        cips: [&str; 2],
        icmp_cips: [&str; 2],
        backend: Endpoint,
        tweak: [Tweak; 4],
    ) {
        for (i, (cip, icmp_cip)) in cips.iter().zip(icmp_cips).enumerate() {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                self.apply_at(cip, &name(&format!("{tag}{i}"), proto), vec![backend.clone()], tweak[i]);
            }
            let dead = Endpoint { port: 8181, ..backend.clone() };
            self.apply_at(icmp_cip, &name(&format!("{tag}icmp{i}"), Protocol::Udp), vec![dead], tweak[2 + i]);
        }
    }
}

type Tweak = fn(&mut ServicePortInfo);

fn v4(addr: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr.parse().unwrap(), port)
}

#[test]
fn host_only_pod_one_port_to_two_cluster_ips_of_one_backend() {
    let Some(mut lab) = NsLab::with_scope("host_only_pod_one_port_to_two_cluster_ips", SocketLbScope::HostOnly) else {
        return;
    };
    lab.wait_pod_devices(&["vpod", "vpod2"]);
    let pod2 = lab.pod2.clone();
    let none: Tweak = |_| {};
    // A local backend (replies translated on its pod device) and a remote one (on the node device).
    for (tag, backend, cips, icmp, port) in [
        ("loc", ep(POD_IP, true), ["198.19.1.21", "198.19.1.22"], ["198.19.1.23", "198.19.1.24"], 23001),
        ("rem", ep(REMOTE_IP, false), ["198.19.1.31", "198.19.1.32"], ["198.19.1.33", "198.19.1.34"], 23002),
    ] {
        lab.shared_backend_services(tag, cips, icmp, backend, [none; 4]);
        let client = v4(POD2_IP, port);
        let peers = one_port_two_frontends(&pod2, client, [v4(cips[0], 80), v4(cips[1], 80)])
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_first_kept_second_remapped(&peers.udp, client, &format!("{tag} UDP"));
        assert_first_kept_second_remapped(&peers.tcp, client, &format!("{tag} TCP"));
        one_port_two_refusals(&pod2, v4(POD2_IP, port + 100), [v4(icmp[0], 80), v4(icmp[1], 80)])
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
    }
    let ev = lab.dp_events();
    // UDP, TCP and the refused UDP flow, for each backend.
    assert_eq!(ev.get("port_remapped"), Some(&6), "{ev:?}");
    assert_eq!(ev.get("port_remap_exhausted"), Some(&0), "{ev:?}");
    assert!(ev.get("xlate_icmp_error").is_some_and(|n| *n >= 6), "{ev:?}");
    lab.assert_ct_paired();
}

#[test]
fn node_port_one_client_port_to_two_node_ports_of_one_local_backend() {
    let Some(mut lab) = NsLab::new("node_port_one_client_port_to_two_node_ports") else { return };
    // One Service with externalTrafficPolicy Local, one under Cluster whose only endpoint is local: neither
    // is source-NATed, so the pod sees the client and both flows want the same reply tuple.
    let tweaks: [Tweak; 4] = [
        |i| {
            i.node_port = NODE_PORT;
            i.external_policy_local = true;
        },
        |i| i.node_port = NODE_PORT + 1,
        |i| {
            i.node_port = NODE_PORT + 2;
            i.external_policy_local = true;
        },
        |i| i.node_port = NODE_PORT + 3,
    ];
    let (cips, icmp) = (["198.19.1.41", "198.19.1.42"], ["198.19.1.43", "198.19.1.44"]);
    lab.shared_backend_services("np", cips, icmp, ep(POD_IP, true), tweaks);
    let ext = lab.ext.clone();
    let client = v4(CLIENT_IP, 23003);
    let fe = [v4(NODE_IP, NODE_PORT), v4(NODE_IP, NODE_PORT + 1)];
    let peers = one_port_two_frontends(&ext, client, fe).unwrap_or_else(|e| panic!("{e}"));
    assert_first_kept_second_remapped(&peers.udp, client, "UDP");
    assert_first_kept_second_remapped(&peers.tcp, client, "TCP");
    one_port_two_refusals(&ext, v4(CLIENT_IP, 23004), [v4(NODE_IP, NODE_PORT + 2), v4(NODE_IP, NODE_PORT + 3)])
        .unwrap_or_else(|e| panic!("{e}"));
    let ev = lab.dp_events();
    assert_eq!(ev.get("port_remapped"), Some(&3), "{ev:?}");
    assert_eq!(ev.get("port_remap_exhausted"), Some(&0), "{ev:?}");
    lab.assert_ct_paired();
}
