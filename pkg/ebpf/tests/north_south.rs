//! Privileged tests of the north-south tc datapath: real packets from an "external" namespace to a node
//! namespace whose underlay device runs the tc programs, with a local pod and a remote endpoint.
//!
//! Topology (every namespace created here, removed on drop, also on panic):
//! - `ext`: bridge `br0` 198.18.0.200/24 (the external client), route 198.19.0.0/16 via the node;
//! - `node`: `eth0` in `br0` 198.18.0.10/24 (node address, gets the tc programs), forwarding on, `vpod`
//!   198.18.16.1/24 to the pod;
//! - `pod`: `eth0` 198.18.16.10/24, default via 198.18.16.1 (a local endpoint);
//! - `remote`: `eth0` in `br0` 198.18.0.11/24 (a remote endpoint; its replies come back through `br0`).
//!
//! Only 198.18.0.0/15 addresses; no namespace has a route off the machine; programs attach only to devices
//! of the node namespace (the backend resolves devices there, never in the test's own namespace); nothing is
//! dialled from the host namespace (clients run on threads that entered `ext`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{SERVER_LIFETIME, ep, name, run, skip_reason, svc};
use ebpf_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use proxier::backend::Backend;
use proxier::model::{Changes, Endpoint, IpFamily, Protocol, ServicePortInfo, ServicePortName, Snapshot};
use proxy_ebpf::{EbpfBackend, EbpfOptions, detect_cgroup2_mount};

const NODE_IP: &str = "198.18.0.10";
const CLIENT_IP: &str = "198.18.0.200";
const POD_IP: &str = "198.18.16.10";
const REMOTE_IP: &str = "198.18.0.11";
const NODE_PORT: u16 = 30080;
const IO_TIMEOUT: Duration = Duration::from_millis(1500);

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct NsLab {
    ext: String,
    node: String,
    created: Vec<String>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    backend: Option<EbpfBackend>,
    snap: Snapshot,
}

fn netns(ns: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{ns}"))
}

/// Runs `f` on a thread inside namespace `ns`; sockets made there stay in it.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns(ns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: valid namespace fd; only this short-lived thread changes namespace.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {}", path.display());
        f()
    })
    .join()
    .unwrap()
}

impl NsLab {
    fn new(test: &str) -> Option<NsLab> {
        if let Some(reason) = skip_reason() {
            println!("SKIP {test}: {reason}");
            return None;
        }
        let tag = format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let mut lab = NsLab {
            ext: format!("kpns-e-{tag}"),
            node: format!("kpns-n-{tag}"),
            created: Vec::new(),
            cgroup: detect_cgroup2_mount().unwrap().join(format!("kp-ns-test-{tag}")),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/kp-ns-test-{tag}")),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            backend: None,
            snap: Snapshot::default(),
        };
        let (ext, node, pod, remote) =
            (lab.ext.clone(), lab.node.clone(), format!("kpns-p-{tag}"), format!("kpns-r-{tag}"));
        for ns in [&ext, &node, &pod, &remote] {
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
        let state = svc("198.19.1.1", 80, n.protocol, eps, tweak);
        self.snap.v4.services.insert(n.clone(), state);
        let mut changes = Changes::default();
        changes.v4.services.insert(n.clone());
        let snap = self.snap.clone();
        self.backend().sync(&snap, &changes).expect("sync");
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
