//! Shared lab for the privileged tests (`datapath.rs`, `inspect.rs`): namespaces, a test cgroup, a
//! test-owned bpffs directory, echo servers and a loaded backend, all torn down by `Lab::drop`.
//!
//! Safety rules: only 198.18.0.0/15 and 2001:db8::/32 addresses, namespaces without any route off the
//! machine, programs attached only to a cgroup the test creates, pins only under a test-owned bpffs
//! directory, nothing dialled from the host namespace; everything is removed by `Lab::drop`, also on panic.
// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proxier::backend::Backend;
use proxier::model::{
    Changes, Endpoint, IpFamily, Protocol, SelectedEndpoints, ServicePortInfo, ServicePortName, ServicePortState,
    Snapshot,
};
use proxy_ebpf::{EbpfBackend, EbpfOptions, bpffs_mounted, detect_cgroup2_mount};

pub const CLIENT: &str = env!("CARGO_BIN_EXE_kp-ebpf-testclient");
pub const POD_V4: [&str; 3] = ["198.18.0.2", "198.18.0.3", "198.18.0.4"];
pub const POD_V6: [&str; 2] = ["2001:db8::2", "2001:db8::3"];
pub const CIP4: &str = "198.19.0.10";
pub const CIP6: &str = "2001:db8:ffff::10";
pub const ECONNREFUSED: &str = "err=111";
pub const ENETUNREACH: &str = "err=101";
/// Upper bound of every server loop.
pub const SERVER_LIFETIME: Duration = Duration::from_secs(300);

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Why this machine cannot run the tests, if it cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (needs CAP_BPF, CAP_NET_ADMIN and cgroup writes)".into());
    }
    if let Err(e) = detect_cgroup2_mount() {
        return Some(format!("no cgroup2 mount: {e}"));
    }
    if !bpffs_mounted(Path::new("/sys/fs/bpf")) {
        return Some("/sys/fs/bpf is not a mounted bpffs".into());
    }
    if Command::new("ip").arg("-V").stdout(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
        return Some("iproute2 `ip` not found".into());
    }
    None
}

/// One test's namespaces, cgroup, bpffs directory, echo servers and backend; torn down on drop.
pub struct Lab {
    pub client_ns: String,
    pub pod_ns: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub stop: Arc<AtomicBool>,
    pub servers: Vec<JoinHandle<()>>,
    pub backend: Option<EbpfBackend>,
    pub created_ns: Vec<String>,
}

impl Lab {
    pub fn new(test: &str) -> Option<Lab> {
        if let Some(reason) = skip_reason() {
            println!("SKIP {test}: {reason}");
            return None;
        }
        let tag = format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let cg_root = detect_cgroup2_mount().unwrap();
        let mut lab = Lab {
            client_ns: format!("kpc-{tag}"),
            pod_ns: format!("kpp-{tag}"),
            cgroup: cg_root.join(format!("kp-test-{tag}")),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/kp-test-{tag}")),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            backend: None,
            created_ns: Vec::new(),
        };
        let (c, p) = (lab.client_ns.clone(), lab.pod_ns.clone());
        for ns in [&c, &p] {
            run("ip", &["netns", "add", ns]);
            lab.created_ns.push(ns.clone());
        }
        // The veth pair is created directly inside the namespaces: nothing appears on the host.
        let (vc, vp) = (format!("vc{tag}"), format!("vp{tag}"));
        run("ip", &["-n", &c, "link", "add", &vc, "type", "veth", "peer", "name", &vp, "netns", &p]);
        run("ip", &["-n", &c, "addr", "add", "198.18.0.1/24", "dev", &vc]);
        run("ip", &["-n", &c, "addr", "add", "2001:db8::1/64", "dev", &vc, "nodad"]);
        for a in POD_V4 {
            run("ip", &["-n", &p, "addr", "add", &format!("{a}/24"), "dev", &vp]);
        }
        for a in POD_V6 {
            run("ip", &["-n", &p, "addr", "add", &format!("{a}/64"), "dev", &vp, "nodad"]);
        }
        for (ns, dev) in [(&c, &vc), (&p, &vp)] {
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        std::fs::create_dir(&lab.cgroup).unwrap();
        lab.start_servers();
        let opts = EbpfOptions::new(&lab.cgroup, &lab.bpffs, vec![IpFamily::V4, IpFamily::V6]);
        lab.backend = Some(EbpfBackend::new(opts).expect("load and attach"));
        Some(lab)
    }

    pub fn backend(&mut self) -> &mut EbpfBackend {
        self.backend.as_mut().expect("backend")
    }

    pub fn netns_path(&self, ns: &str) -> String {
        format!("/run/netns/{ns}")
    }

    /// TCP and UDP echo servers on port 8080 of every pod address, answering `backend=<ip> peer=<addr>`.
    pub fn start_servers(&mut self) {
        let path = self.netns_path(&self.pod_ns);
        let (tx, rx) = std::sync::mpsc::channel();
        // setns affects only the calling thread; sockets keep the namespace they were created in.
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: valid fd; only this short-lived thread changes namespace.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
            let mut socks = Vec::new();
            for a in POD_V4.iter().chain(POD_V6.iter()) {
                let ip: IpAddr = a.parse().unwrap();
                let tcp = std::net::TcpListener::bind((ip, 8080)).unwrap();
                let udp = std::net::UdpSocket::bind((ip, 8080)).unwrap();
                socks.push((ip, tcp, udp));
            }
            tx.send(socks).unwrap();
        })
        .join()
        .unwrap();
        for (ip, tcp, udp) in rx.recv().unwrap() {
            let stop = self.stop.clone();
            tcp.set_nonblocking(true).unwrap();
            self.servers.push(std::thread::spawn(move || {
                let end = Instant::now() + SERVER_LIFETIME;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match tcp.accept() {
                        Ok((mut s, peer)) => {
                            use std::io::Write;
                            let _ = writeln!(s, "backend={ip} peer={peer}");
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
    }

    /// Runs the client in the client namespace (and in the test cgroup when `in_cgroup`); one line per op.
    pub fn client(&self, in_cgroup: bool, ops: &[(&str, &str, u16)]) -> Vec<String> {
        let mut cmd = Command::new(CLIENT);
        if in_cgroup {
            cmd.arg("--cgroup").arg(&self.cgroup);
        }
        cmd.arg("--netns").arg(self.netns_path(&self.client_ns));
        for (op, addr, port) in ops {
            cmd.args([*op, *addr, &port.to_string()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn client");
        // Every op has a 2 s timeout; bound the whole run anyway.
        let deadline = Instant::now() + Duration::from_secs(5 + 3 * ops.len() as u64);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
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

    /// `n` TCP connects; the backend address each one reached.
    pub fn tcp_backends(&self, vip: &str, port: u16, n: usize) -> Vec<String> {
        let ops: Vec<(&str, &str, u16)> = (0..n).map(|_| ("tcp", vip, port)).collect();
        self.client(true, &ops).iter().map(|l| backend_of(l).unwrap_or_else(|| panic!("no backend in {l:?}"))).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Our fds first, then the pins (which detaches), then the cgroup and the namespaces.
        drop(self.backend.take());
        if let Err(e) = EbpfBackend::cleanup_all(&self.bpffs, &self.cgroup) {
            eprintln!("cleanup {}: {e}", self.bpffs.display());
        }
        if self.cgroup.exists()
            && let Err(e) = std::fs::remove_dir(&self.cgroup)
        {
            eprintln!("rmdir {}: {e}", self.cgroup.display());
        }
        for ns in &self.created_ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn backend_of(line: &str) -> Option<String> {
    line.split_whitespace().find_map(|w| w.strip_prefix("reply=backend=")).map(str::to_string)
}

pub fn peer_of(line: &str) -> Option<&str> {
    line.split_whitespace().find_map(|w| w.strip_prefix("peer="))
}

pub fn ep(addr: &str, local: bool) -> Endpoint {
    Endpoint { is_local: local, ..Endpoint::new(addr.parse().unwrap(), 8080) }
}

pub fn svc(
    cluster_ip: &str,
    port: u16,
    protocol: Protocol,
    eps: Vec<Endpoint>,
    tweak: impl FnOnce(&mut ServicePortInfo),
) -> ServicePortState {
    let mut info = ServicePortInfo::new(cluster_ip.parse().unwrap(), port, protocol);
    tweak(&mut info);
    let local: Vec<Endpoint> = eps.iter().filter(|e| e.is_local).cloned().collect();
    let cluster = if info.internal_policy_local && info.node_port == 0 { vec![] } else { eps.clone() };
    ServicePortState {
        info: Arc::new(info),
        endpoints: Arc::new(eps.clone()),
        selected: SelectedEndpoints {
            has_any: !eps.is_empty(),
            cluster: cluster.into(),
            local: local.into(),
            all_reachable: eps.into(),
        },
    }
}

pub fn name(n: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName::new("default", n, "", protocol)
}

/// Puts `state` into the snapshot and syncs just that service port (a partial sync).
pub fn apply(lab: &mut Lab, snap: &mut Snapshot, n: ServicePortName, state: Option<ServicePortState>) {
    let family = state.as_ref().map(|s| s.info.family()).unwrap_or(IpFamily::V4);
    match state {
        Some(s) => {
            snap.family_mut(family).services.insert(n.clone(), s);
        }
        None => {
            snap.family_mut(family).services.remove(&n);
        }
    }
    let mut changes = Changes::default();
    changes.family_mut(family).services.insert(n);
    lab.backend().sync(snap, &changes).expect("sync");
}

pub fn v4_eps(n: usize) -> Vec<Endpoint> {
    POD_V4[..n].iter().map(|a| ep(a, false)).collect()
}

/// `/run/netns/<ns>`.
pub fn netns(ns: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{ns}"))
}

/// Runs `f` on a thread inside namespace `ns`; sockets made there stay in it.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
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
