//! ICMP errors of translated north-south flows: the lab's external client (`Place::External`) reaches a
//! NodePort whose only backend is `pod-1-0` on node 1, through node 0 (remote backend: DNAT + SNAT to node
//! 0's address) and through node 1 (local backend: DNAT only). The errors the backend side sends are about
//! the translated packet; the client only acts on them if the datapath translated them back (tc programs in
//! ebpf mode, netfilter's conntrack in iptables mode).
//!
//! - port unreachable: a connected UDP socket to a NodePort whose target port is closed gets
//!   `ECONNREFUSED` (an untranslated error names `pod:port`, which matches no socket of the client);
//! - fragmentation needed / packet too big: node 1's pod bridge gets a 1280-byte MTU (inside node 1's
//!   namespace), so node 1 answers the client's full-size segments with an error addressed to node 0 (the
//!   SNAT address); a 400 KB upload only completes when the client learns the smaller path MTU from it.
//!
//! One `#[test]` per mode and family (`ebpf_*`, `iptables_*`); without root, cgroup2 or bpffs each prints
//! `SKIP <test>: <reason>` and returns.
//!
//! Also here, as it needs the same north-south flows: the eBPF conntrack GC runs early when the map fills up
//! (`ebpf_conntrack_gc_runs_early_under_map_pressure`).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::lab::{Ep, Family, Lab, LabConfig, Place, Proto, scenario::Scenario};
use serde_json::json;

/// Bound of waiting for a change to show in the datapath.
const T: Duration = Duration::from_secs(30);
const NP_TCP: u16 = 30190;
const NP_UDP_OPEN: u16 = 30191;
const NP_UDP_CLOSED: u16 = 30192;
/// Nothing listens there in the lab's pods.
const CLOSED_PORT: u16 = 9;
/// The MTU of node 1's pod bridge in the path-MTU tests (IPv6's minimum).
const SMALL_MTU: &str = "1280";
/// Upload of the path-MTU tests: lines of `LINE` bytes, each answered with one line by `lab-echo`.
const LINES: usize = 400;
const LINE: usize = 1000;
/// Bound of the upload (it stalls for good without path-MTU discovery).
const UPLOAD_DEADLINE: Duration = Duration::from_secs(20);

macro_rules! per_mode_and_family {
    ($($scenario:ident => $ebpf4:ident, $ebpf6:ident, $ipt4:ident, $ipt6:ident;)*) => {$(
        #[test]
        fn $ebpf4() {
            $scenario("ebpf", Family::V4)
        }
        #[test]
        fn $ebpf6() {
            $scenario("ebpf", Family::V6)
        }
        #[test]
        fn $ipt4() {
            $scenario("iptables", Family::V4)
        }
        #[test]
        fn $ipt6() {
            $scenario("iptables", Family::V6)
        }
    )*};
}

per_mode_and_family! {
    udp_port_unreachable_reaches_external_client => ebpf_udp_port_unreachable_reaches_external_client,
        ebpf_udp_port_unreachable_reaches_external_client_ipv6,
        iptables_udp_port_unreachable_reaches_external_client,
        iptables_udp_port_unreachable_reaches_external_client_ipv6;
    tcp_upload_learns_path_mtu_through_node_port => ebpf_tcp_upload_learns_path_mtu_through_node_port,
        ebpf_tcp_upload_learns_path_mtu_through_node_port_ipv6,
        iptables_tcp_upload_learns_path_mtu_through_node_port,
        iptables_tcp_upload_learns_path_mtu_through_node_port_ipv6;
}

fn config(mode: &str) -> LabConfig {
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_lab-echo")).parent().map(PathBuf::from);
    LabConfig { mode: mode.to_string(), bin_dir, verbose: true, ..LabConfig::default() }
}

fn scenario_name(name: &str, family: Family) -> String {
    match family {
        Family::V4 => name.to_string(),
        Family::V6 => format!("{name}_ipv6"),
    }
}

fn node_ip(lab: &Lab, i: usize, family: Family) -> IpAddr {
    let n = lab.node(i).unwrap();
    match family {
        Family::V4 => n.ip4.into(),
        Family::V6 => n.ip6.into(),
    }
}

/// A NodePort Service of one family, backed by `pod-1-0` only: TCP 8080, UDP 8053 (open) and UDP 9 (closed).
fn apply_backend_service(lab: &mut Lab, family: Family) {
    let spec = json!({"spec": {"type": "NodePort", "ports": [
        {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": NP_TCP},
        {"name": "open", "port": 53, "protocol": "UDP", "targetPort": 8053, "nodePort": NP_UDP_OPEN},
        {"name": "closed", "port": 54, "protocol": "UDP", "targetPort": CLOSED_PORT, "nodePort": NP_UDP_CLOSED}]}});
    lab.apply_service("icmp", family, spec).unwrap();
    lab.set_endpoints("icmp", &[Ep::ready("pod-1-0")]).unwrap();
    for node in [0, 1] {
        for (proto, port) in [(Proto::Tcp, NP_TCP), (Proto::Udp, NP_UDP_OPEN)] {
            let addr = SocketAddr::new(node_ip(lab, node, family), port);
            lab.wait_programmed(Place::External, proto, addr, &["pod-1-0"], T)
                .unwrap_or_else(|e| panic!("{proto:?} {addr} from outside: {e:#}"));
        }
    }
}

/// Runs `f` on a thread inside the external client's network namespace (never the host's).
fn in_external<T: Send + 'static>(lab: &Lab, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = lab.enter(&Place::External).unwrap().netns.expect("the external place has a namespace");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        // SAFETY: valid namespace fd; setns(CLONE_NEWNET) only changes this short-lived thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("client thread panicked")
}

/// What a connected UDP socket to `target` saw: `Ok(())` on `ECONNREFUSED`, else what happened instead.
/// Up to 5 datagrams, 1 s each (the backend's ICMP errors are rate limited).
fn udp_refused(target: SocketAddr) -> Result<(), String> {
    let local: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let sock = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    sock.connect(target).map_err(|e| format!("connect {target}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
    let mut last = String::from("no attempt");
    for attempt in 1..=5 {
        if let Err(e) = sock.send(b"ping\n") {
            if e.kind() == ErrorKind::ConnectionRefused {
                return Ok(());
            }
            last = format!("send #{attempt}: {e}");
            continue;
        }
        let mut buf = [0u8; 512];
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) => last = format!("recv #{attempt}: {e}"),
            Ok(n) => return Err(format!("an answer from a closed port: {:?}", String::from_utf8_lossy(&buf[..n]))),
        }
    }
    Err(last)
}

/// The node's `kubeproxy_ebpf_datapath_events_total{event="xlate_icmp_error"}` (0 when absent).
fn icmp_translations(lab: &Lab, node: usize) -> u64 {
    let text = lab.metrics(node).unwrap();
    text.lines()
        .find(|l| l.starts_with("kubeproxy_ebpf_datapath_events_total{event=\"xlate_icmp_error\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Port unreachable from the backend, through node 0 (SNATed flow: the error is addressed to node 0 and
/// translated on its ingress) and through node 1 (DNAT-only flow: translated on node 1's egress).
fn udp_port_unreachable_reaches_external_client(mode: &str, family: Family) {
    let name = scenario_name("udp_port_unreachable_reaches_external_client", family);
    let Some(mut s) = Scenario::up(&name, config(mode)) else { return };
    let lab = s.lab();
    apply_backend_service(lab, family);
    for (node, path) in [(0, "remote backend, SNAT"), (1, "local backend, DNAT only")] {
        let before = icmp_translations(lab, node);
        let target = SocketAddr::new(node_ip(lab, node, family), NP_UDP_CLOSED);
        let got = in_external(lab, move || udp_refused(target));
        println!("[{mode}] connected UDP to {target} ({path}): {got:?}");
        assert_eq!(got, Ok(()), "{target} ({path}): ECONNREFUSED expected from the translated port unreachable");
        if mode == "ebpf" {
            let after = icmp_translations(lab, node);
            assert!(after > before, "node-{node}: xlate_icmp_error counter {before} → {after}");
        }
    }
    // The open port still answers: the errors above came from the closed one, not from a broken path.
    let open = SocketAddr::new(node_ip(lab, 0, family), NP_UDP_OPEN);
    let probes = lab.probe(Place::External, Proto::Udp, &[open], 3).unwrap();
    assert!(probes.iter().all(|p| p.ok), "open UDP port via node 0: {probes:#?}");
}

/// `LINES` lines of `LINE` bytes to `target` in one write, then every answer line; bounded by
/// [`UPLOAD_DEADLINE`]. Returns the answers read.
fn upload(target: SocketAddr) -> Result<usize, String> {
    let deadline = Instant::now() + UPLOAD_DEADLINE;
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
    let mut line = vec![b'x'; LINE];
    line[LINE - 1] = b'\n';
    let data: Vec<u8> = line.iter().copied().cycle().take(LINE * LINES).collect();
    // Not write_all: its timeout restarts with every partial write, so a trickle would never end.
    let mut sent = 0;
    while sent < data.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{sent} of {} bytes written before the deadline", data.len()));
        }
        s.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.write(&data[sent..]) {
            Ok(0) => return Err(format!("closed after {sent} bytes written")),
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write after {sent} bytes: {e}")),
        }
    }
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut answers = 0;
    let mut buf = String::new();
    while answers < LINES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{answers} of {LINES} answers before the deadline"));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        buf.clear();
        match reader.read_line(&mut buf) {
            Ok(0) => return Err(format!("closed after {answers} answers")),
            Ok(_) => answers += 1,
            Err(e) => return Err(format!("read after {answers} answers: {e}")),
        }
    }
    Ok(answers)
}

/// A TCP upload from outside through node 0's NodePort to `pod-1-0` on node 1, whose pod bridge has a
/// smaller MTU: node 1 sends fragmentation needed (IPv6: packet too big) to node 0, the SNAT address.
fn tcp_upload_learns_path_mtu_through_node_port(mode: &str, family: Family) {
    let name = scenario_name("tcp_upload_learns_path_mtu_through_node_port", family);
    let Some(mut s) = Scenario::up(&name, config(mode)) else { return };
    let lab = s.lab();
    apply_backend_service(lab, family);
    // Only node 1's own bridge, in its namespace: the pod keeps MTU 1500 (so its SYN-ACK still offers a
    // 1500-byte MSS) and node 1 becomes the hop that cannot forward full-size segments.
    let out = lab.exec_in(Place::Node(1), "ip", &["link", "set", "cbr0", "mtu", SMALL_MTU], T).unwrap();
    assert!(out.status.success(), "ip link set cbr0 mtu {SMALL_MTU}: {}", String::from_utf8_lossy(&out.stderr));
    let before = if mode == "ebpf" { icmp_translations(lab, 0) } else { 0 };
    let target = SocketAddr::new(node_ip(lab, 0, family), NP_TCP);
    let start = Instant::now();
    let got = in_external(lab, move || upload(target));
    println!(
        "[{mode}] {} KB upload to {target} over a {SMALL_MTU}-byte hop: {got:?} in {:?}",
        LINE * LINES / 1000,
        start.elapsed()
    );
    assert_eq!(got, Ok(LINES), "upload through {target} with node 1's pod bridge at MTU {SMALL_MTU}");
    if mode == "ebpf" {
        let after = icmp_translations(lab, 0);
        assert!(after > before, "node-0: xlate_icmp_error counter {before} → {after}");
    }
    // The client learnt the path MTU towards the NodePort (a route exception on its side).
    let ext = lab.exec_in(Place::External, "ip", &["route", "get", &node_ip(lab, 0, family).to_string()], T).unwrap();
    let route = String::from_utf8_lossy(&ext.stdout);
    assert!(route.contains(&format!("mtu {SMALL_MTU}")), "client's route to the NodePort: {route}");
}

/// A 256-entry conntrack map (`--conntrack-min=128` flows, one per core otherwise): 150 new UDP flows from
/// outside fill it past 90% long before the first scheduled GC pass (60 s after start), so the GC thread's
/// pressure check must start a pass early, counted in `kubeproxy_ebpf_conntrack_gc_pressure_runs_total`.
#[test]
fn ebpf_conntrack_gc_runs_early_under_map_pressure() {
    let mut cfg = config("ebpf");
    cfg.proxy_args = vec!["--conntrack-max-per-core=1".into(), "--conntrack-min=128".into()];
    let Some(mut s) = Scenario::up("conntrack_gc_runs_early_under_map_pressure", cfg) else { return };
    let lab = s.lab();
    apply_backend_service(lab, Family::V4);
    let metric = |lab: &Lab, name: &str| -> Option<u64> {
        let text = lab.metrics(0).ok()?;
        let line = text.lines().find(|l| l.split(' ').next() == Some(name))?;
        line.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v as u64)
    };
    const PRESSURE_RUNS: &str = "kubeproxy_ebpf_conntrack_gc_pressure_runs_total";
    const RUNS: &str = "kubeproxy_ebpf_conntrack_gc_runs_total";
    assert_eq!(metric(lab, PRESSURE_RUNS), Some(0), "no pressure before the burst");
    assert_eq!(metric(lab, RUNS), Some(0), "no pass before the burst (the first is due 60 s after start)");
    // Every probe is a new socket, so a new flow (two entries).
    let target = SocketAddr::new(node_ip(lab, 0, Family::V4), NP_UDP_OPEN);
    let probes = lab.probe(Place::External, Proto::Udp, &[target], 150).unwrap();
    let answered = probes.iter().filter(|p| p.ok).count();
    assert!(answered >= 140, "{answered} of 150 UDP flows answered");
    let deadline = Instant::now() + Duration::from_secs(15);
    let runs = loop {
        let runs = metric(lab, PRESSURE_RUNS).unwrap_or(0);
        if runs > 0 || Instant::now() >= deadline {
            break runs;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("[ebpf] 150 flows into a 256-entry conntrack map: {runs} early GC pass(es)");
    assert!(runs >= 1, "no early GC pass under pressure; metrics:\n{}", lab.metrics(0).unwrap_or_default());
    assert!(metric(lab, RUNS).unwrap_or(0) >= 1, "the early pass is a GC pass");
}
