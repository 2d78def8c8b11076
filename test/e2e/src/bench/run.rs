//! The matrix: for each backend one lab (2 nodes; only node-0 runs kube-proxy, the client is pod-0-0), and
//! for each N (ascending) the bulk Services are topped up to N, then one cell of measurements runs.
//!
//! Bulk Service `bench-<i>` has `endpoints` endpoints on the lab's real pods (all Services share them), so
//! any of them can be probed. Two extra Services serve single measurements: `bench-upd` (one endpoint,
//! flipped between pod-1-0 and pod-1-1 for update latency) and `bench-iperf` (pod-1-0:5201, iperf3).
//!
//! North-south: `bench-np` (NodePort, TCP, `externalTrafficPolicy: Cluster`) has node-1's pods as endpoints
//! and is dialled at node-0's NodePort from the lab's external client, so node-0 translates (DNAT + SNAT)
//! every flow; `bench-np-udp` (UDP) has the one endpoint pod-1-0, so the few long UDP flows land on the same
//! pod in both series instead of on a random spread. The baseline is the same client reaching those pods' IPs over the same hops:
//! the external client routes node-1's pod CIDR via node-0 and node-1 routes the client via node-0, so both
//! series cross node-0 and node-1 in both directions and differ only by the Service translation.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::agent::{LatResult, RpsResult, UdpResult, WaitResult};
use super::{BulkEndpoint, MAX_BULK_SERVICES, Meta, Row, bulk_objects, bulk_vip, cpu_seconds, metric_def, mono_ns};
use crate::lab::{EXTERNAL_IP4, Ep, Family, Lab, LabConfig, Place};

/// The client pod (on node-0, whose kube-proxy is the one measured).
const CLIENT: &str = "pod-0-0";
/// The update-latency Service flips its single endpoint between these (node-1, so the path crosses nodes).
const UPD_PODS: [&str; 2] = ["pod-1-0", "pod-1-1"];
/// iperf3 server pod and port.
const IPERF_POD: &str = "pod-1-0";
const IPERF_PORT: u16 = 5201;
/// `bench-np`'s node port (TCP) and `bench-np-udp`'s (UDP).
const NP_PORT: u16 = 30080;
const NP_UDP_PORT: u16 = 30081;
/// `bench-np-udp`'s only endpoint.
const NP_UDP_POD: &str = "pod-1-0";
/// One slice of the interleaved north-south series.
const NS_SLICE: Duration = Duration::from_millis(500);
/// Objects per `apply_json` call when loading bulk Services.
const LOAD_CHUNK: usize = 2_500;
/// Bound of a proxy getting healthy after a cold start.
const HEALTHY: Duration = Duration::from_secs(300);
/// Bound of a single update becoming visible.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Backends (`--proxy-mode` values), in order.
    pub backends: Vec<String>,
    /// Numbers of bulk Services, ascending.
    pub scales: Vec<usize>,
    /// Endpoints per bulk Service (1..=200).
    pub endpoints: usize,
    /// Repetitions of full sync, latency, throughput and bulk runs.
    pub reps: usize,
    /// Endpoint updates per cell.
    pub updates: usize,
    /// Time budget of the updates of one cell (stops early, keeping what it has).
    pub update_budget: Duration,
    /// Sequential connections per latency run (per series).
    pub conn_count: usize,
    /// Concurrent clients of the throughput runs.
    pub rps_clients: usize,
    /// Duration of one throughput run.
    pub rps_duration: Duration,
    /// Duration of one iperf3 run.
    pub bulk_duration: Duration,
    /// Bound of one full sync.
    pub full_sync_timeout: Duration,
    /// Directory with kube-proxy, kpctl, lab-echo, lab-client (default: next to the bench binary).
    pub bin_dir: Option<PathBuf>,
    /// The bench binary itself (re-executed in pods as the agent).
    pub self_exe: PathBuf,
    /// Extra kube-proxy flags.
    pub proxy_args: Vec<String>,
    /// Lab progress lines too.
    pub verbose: bool,
    /// Let the client pod reuse TIME_WAIT ports (`tcp_tw_reuse=1`) and widen its port range.
    pub tw_reuse: bool,
    /// Set by Ctrl-C: stop at the next check.
    pub interrupted: &'static AtomicBool,
}

/// Progress lines on stderr with the elapsed time.
pub struct Progress(Instant);

impl Progress {
    /// Starts the clock.
    pub fn new() -> Progress {
        Progress(Instant::now())
    }

    /// Prints one line.
    pub fn step(&self, msg: impl AsRef<str>) {
        eprintln!("[{:>7.1}s] {}", self.0.elapsed().as_secs_f64(), msg.as_ref());
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// Runs the matrix. `save` is called after every cell with everything so far (so an interrupted or failed
/// run still leaves its results).
pub fn run(opts: &Options, progress: &Progress, meta: &mut Meta, save: &mut dyn FnMut(&[Row], &Meta)) -> Vec<Row> {
    let mut rows = Vec::new();
    for backend in &opts.backends {
        if opts.interrupted.load(Ordering::SeqCst) {
            break;
        }
        match run_backend(opts, progress, backend, &mut rows, meta, save) {
            Ok(None) => meta.backends.push(backend.clone()),
            Ok(Some(reason)) => {
                progress.step(format!("SKIP backend {backend}: {reason}"));
                meta.skipped.push((backend.clone(), reason));
            }
            Err(e) => {
                progress.step(format!("backend {backend} failed: {e:#}"));
                meta.skipped.push((backend.clone(), format!("failed: {e:#}")));
            }
        }
        save(&rows, meta);
    }
    rows
}

fn check(opts: &Options) -> Result<()> {
    if opts.interrupted.load(Ordering::SeqCst) { bail!("interrupted") } else { Ok(()) }
}

/// One backend's lab and cells; `Ok(Some(reason))` when the backend is not available.
fn run_backend(
    opts: &Options,
    progress: &Progress,
    backend: &str,
    rows: &mut Vec<Row>,
    meta: &mut Meta,
    save: &mut dyn FnMut(&[Row], &Meta),
) -> Result<Option<String>> {
    check(opts)?;
    let endpoints = opts.endpoints.clamp(1, 200);
    progress.step(format!("{backend}: building the lab (2 nodes x {} pods)", endpoints.div_ceil(2).max(2)));
    let cfg = LabConfig {
        nodes: 2,
        pods_per_node: endpoints.div_ceil(2).max(2),
        mode: backend.to_string(),
        ipv6: false,
        tcp_ports: vec![8080],
        udp_ports: vec![8080],
        proxy_args: opts.proxy_args.clone(),
        bin_dir: opts.bin_dir.clone(),
        start_proxies: false,
        verbose: opts.verbose,
    };
    let mut lab = Lab::new(cfg)?;
    // Tens of thousands of short connections per cell to one ClusterIP (iptables: the client only ever
    // sees VIP:80) would exhaust the ephemeral ports held in TIME_WAIT; widen the range and let connect()
    // reuse TIME_WAIT ports, in the client pod's namespace only.
    let reuse = if opts.tw_reuse { "net.ipv4.tcp_tw_reuse=1" } else { "net.ipv4.tcp_tw_reuse=0" };
    let out = lab.exec_in(
        CLIENT,
        "sysctl",
        &["-qw", reuse, "net.ipv4.ip_local_port_range=10000 65000"],
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!("sysctl in {CLIENT}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // Detect the backend: a mode that is not built fails at start with "not built yet".
    lab.start_proxy(0)?;
    if let Err(e) = lab.wait_proxy_healthy(0, Duration::from_secs(60)) {
        let text = format!("{e:#}");
        if text.contains("not built yet") {
            let line = text.lines().find(|l| l.contains("not built yet")).unwrap_or("not built yet").trim();
            return Ok(Some(format!("kube-proxy --proxy-mode={backend} fails at start: {line}")));
        }
        return Err(e);
    }
    let bulk_eps: Vec<BulkEndpoint> =
        lab.pods().iter().take(endpoints).map(|p| (p.ip4, lab.nodes()[p.node].name.clone(), p.name.clone())).collect();
    lab.apply_service("bench-upd", Family::V4, json!({}))?;
    lab.set_endpoints("bench-upd", &[Ep::ready(UPD_PODS[0])])?;
    let mut upd_pod = 0usize;
    let iperf = which("iperf3");
    let _iperf_server = match &iperf {
        Some(bin) => {
            lab.apply_service(
                "bench-iperf",
                Family::V4,
                json!({"spec": {"ports": [{"name": "iperf", "port": IPERF_PORT, "protocol": "TCP", "targetPort": IPERF_PORT}]}}),
            )?;
            lab.set_endpoints("bench-iperf", &[Ep::ready(IPERF_POD)])?;
            Some(lab.spawn_in(IPERF_POD, bin, &["-s".into(), "-p".into(), IPERF_PORT.to_string()])?)
        }
        None => {
            progress.step("iperf3 not installed (hack/setup.sh installs it): no bulk throughput");
            None
        }
    };
    meta.bulk = iperf.is_some();
    let ns = north_south_setup(&mut lab, opts)?;
    let mut loaded = 0usize;
    let mut cell_rows = Vec::new();
    for &n in &opts.scales {
        check(opts)?;
        let mut c = Cell { opts, progress, backend, n, endpoints, bulk_eps: &bulk_eps, ns: &ns, rows: &mut cell_rows };
        let t = Instant::now();
        match c.run(&mut lab, &mut loaded, &mut upd_pod, iperf.as_deref()) {
            Ok(()) => {
                progress.step(format!("{backend} N={n}: cell done in {:.0} s", t.elapsed().as_secs_f64()));
                rows.append(&mut cell_rows);
                save(rows, meta);
            }
            Err(e) => {
                // Keep what the cell measured; larger N would only fail the same way, slower.
                rows.append(&mut cell_rows);
                let msg = format!("{e:#}");
                progress.step(format!("{backend} N={n}: FAILED: {msg}"));
                meta.failed.push((backend.to_string(), n, msg));
                for &m in opts.scales.iter().filter(|&&m| m > n) {
                    meta.failed.push((backend.to_string(), m, format!("skipped after N={n} failed")));
                }
                save(rows, meta);
                if opts.interrupted.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                break;
            }
        }
    }
    progress.step(format!("{backend}: tearing the lab down"));
    lab.shutdown()?;
    Ok(None)
}

/// One (backend, N) cell.
struct Cell<'a> {
    opts: &'a Options,
    progress: &'a Progress,
    backend: &'a str,
    n: usize,
    endpoints: usize,
    bulk_eps: &'a [BulkEndpoint],
    ns: &'a NorthSouth,
    rows: &'a mut Vec<Row>,
}

/// The north-south targets: node-0's NodePorts and the endpoints' pod IPs (all on node-1).
struct NorthSouth {
    /// `bench-np` (TCP).
    node_port: SocketAddr,
    /// Its endpoints.
    direct: Vec<SocketAddr>,
    /// `bench-np-udp` (UDP).
    udp_node_port: SocketAddr,
    /// Its endpoint.
    udp_direct: SocketAddr,
}

/// Creates `bench-np` and the routes and sysctls of the north-south measurements (lab namespaces only).
fn north_south_setup(lab: &mut Lab, opts: &Options) -> Result<NorthSouth> {
    let (n0, n1) = (lab.node(0)?.clone(), lab.node(1)?.clone());
    let pods: Vec<(String, SocketAddr)> = lab
        .pods()
        .iter()
        .filter(|p| p.node == 1)
        .map(|p| (p.name.clone(), SocketAddr::new(IpAddr::V4(p.ip4), 8080)))
        .collect();
    lab.apply_service(
        "bench-np",
        Family::V4,
        json!({"spec": {"type": "NodePort", "ports": [
            {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": NP_PORT}]}}),
    )?;
    lab.set_endpoints("bench-np", &pods.iter().map(|(p, _)| Ep::ready(p)).collect::<Vec<_>>())?;
    lab.apply_service(
        "bench-np-udp",
        Family::V4,
        json!({"spec": {"type": "NodePort", "ports": [
            {"name": "udp", "port": 80, "protocol": "UDP", "targetPort": 8080, "nodePort": NP_UDP_PORT}]}}),
    )?;
    lab.set_endpoints("bench-np-udp", &[Ep::ready(NP_UDP_POD)])?;
    // The direct series' route, symmetric through node-0 like the NodePort's (whose replies return to node-0's
    // SNAT address): client → node-0 → node-1 → pod and back the same way.
    lab.route_external_via(&n1.pod_cidr4, 0)?;
    let client = format!("{EXTERNAL_IP4}/32");
    run_ok(lab, Place::Node(1), "ip", &["route", "replace", &client, "via", &n0.ip4.to_string()])?;
    // node-0 forwards out of the device it received on: without this it would send ICMP redirects and the
    // endpoints would learn the one-hop path, so the two series would no longer share a route.
    run_ok(
        lab,
        Place::Node(0),
        "sysctl",
        &["-qw", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.eth0.send_redirects=0"],
    )?;
    // As for the client pod: many short connections to one NodePort.
    let reuse = if opts.tw_reuse { "net.ipv4.tcp_tw_reuse=1" } else { "net.ipv4.tcp_tw_reuse=0" };
    run_ok(lab, Place::External, "sysctl", &["-qw", reuse, "net.ipv4.ip_local_port_range=10000 65000"])?;
    Ok(NorthSouth {
        node_port: SocketAddr::new(IpAddr::V4(n0.ip4), NP_PORT),
        direct: pods.into_iter().map(|(_, a)| a).collect(),
        udp_node_port: SocketAddr::new(IpAddr::V4(n0.ip4), NP_UDP_PORT),
        udp_direct: SocketAddr::new(IpAddr::V4(lab.pod(NP_UDP_POD)?.ip4), 8080),
    })
}

/// Runs `program args` at `place` (30 s bound) and fails with its stderr when it exits non-zero.
fn run_ok(lab: &Lab, place: Place, program: &str, args: &[&str]) -> Result<()> {
    let out = lab.exec_in(place.clone(), program, args, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!("{program} {args:?} at {place:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Cell<'_> {
    fn push(&mut self, metric: &str, values: &[f64]) {
        self.push_stat(metric, values, super::stats(values));
    }

    fn push_stat(&mut self, metric: &str, values: &[f64], stat: Option<(f64, f64, f64)>) {
        let Some((value, min, max)) = stat else { return };
        let unit = metric_def(metric).map_or("", |d| d.unit).to_string();
        self.rows.push(Row {
            backend: self.backend.to_string(),
            services: self.n,
            endpoints: self.endpoints,
            metric: metric.to_string(),
            value,
            unit,
            min,
            max,
            reps: values.len(),
        });
    }

    fn step(&self, msg: impl AsRef<str>) {
        self.progress.step(format!("{} N={}: {}", self.backend, self.n, msg.as_ref()));
    }

    fn run(&mut self, lab: &mut Lab, loaded: &mut usize, upd_pod: &mut usize, iperf: Option<&Path>) -> Result<()> {
        let n = self.n;
        if n == 0 || n > MAX_BULK_SERVICES {
            bail!("N must be 1..={MAX_BULK_SERVICES}");
        }
        lab.stop_proxy(0)?;
        if n > *loaded {
            let t = Instant::now();
            load(lab, *loaded, n, self.bulk_eps, self.opts)?;
            self.step(format!(
                "loaded Services {}..{} ({} endpoints each) into the API server in {:.1} s",
                *loaded,
                n,
                self.endpoints,
                t.elapsed().as_secs_f64()
            ));
            *loaded = n;
        }
        let pid = self.full_sync(lab)?;
        self.updates(lab, pid, upd_pod)?;
        self.settle(pid)?;
        self.latency(lab)?;
        self.throughput(lab)?;
        self.north_south(lab)?;
        if let Some(bin) = iperf {
            self.bulk(lab, bin)?;
        }
        self.cost(lab, pid)
    }

    /// Cold starts: stop, `--cleanup`, start, then poll the last Service until it answers.
    fn full_sync(&mut self, lab: &mut Lab) -> Result<u32> {
        let last = SocketAddr::new(IpAddr::V4(bulk_vip(self.n - 1).expect("checked")), 80);
        let (mut full, mut sync, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        let mut pid = 0;
        for rep in 0..self.opts.reps {
            check(self.opts)?;
            lab.stop_proxy(0)?;
            lab.cleanup_proxy(0)?;
            let log_start = strip_ansi(&lab.proxy_log(0)).len();
            let t0 = mono_ns();
            lab.start_proxy(0)?;
            pid = lab.proxy_pid(0).ok_or_else(|| anyhow!("kube-proxy of node-0 has no pid"))?;
            let w = wait_served(lab, self.opts, last, log_start, self.opts.full_sync_timeout)?;
            let secs = w.t_ok_ns.saturating_sub(t0) as f64 / 1e9;
            full.push(secs);
            if let Some(c) = cpu_seconds(pid) {
                cpu.push(c);
            }
            lab.wait_proxy_healthy(0, HEALTHY)?;
            let metrics = lab.metrics(0)?;
            let sum: f64 = ["IPv4", "IPv6"]
                .iter()
                .filter_map(|f| {
                    crate::metric_value(
                        &metrics,
                        "kubeproxy_sync_proxy_rules_duration_seconds_sum",
                        &[("ip_family", f)],
                    )
                })
                .sum();
            sync.push(sum);
            self.step(format!(
                "full sync {}/{}: last Service answered {secs:.3} s after start (proxy sync metric {sum:.3} s, \
                 {} attempts)",
                rep + 1,
                self.opts.reps,
                w.attempts
            ));
        }
        self.push("full_sync", &full);
        self.push("proxy_sync", &sync);
        self.push("cpu_full_sync", &cpu);
        Ok(pid)
    }

    /// Flips `bench-upd`'s endpoint; each time an agent already dialling in the client pod reports the first
    /// connection answered by the new pod.
    fn updates(&mut self, lab: &mut Lab, pid: u32, upd_pod: &mut usize) -> Result<()> {
        let target = lab.service_addr("bench-upd", "tcp")?;
        // The endpoint may have changed during a previous cell: make sure the current one answers first.
        let cur = UPD_PODS[*upd_pod];
        let w = agent::<WaitResult>(lab, self.opts, &wait_args(target, Some(cur), UPDATE_TIMEOUT), UPDATE_TIMEOUT)?;
        if !w.ok {
            bail!("bench-upd {target} not answered by {cur}: {:?}", w.error);
        }
        let cpu0 = cpu_seconds(pid);
        let start = Instant::now();
        let (mut lat_ms, mut late) = (Vec::new(), 0usize);
        for _ in 0..self.opts.updates {
            check(self.opts)?;
            if start.elapsed() > self.opts.update_budget {
                self.step(format!("update budget spent after {} updates", lat_ms.len() + late));
                break;
            }
            let next = 1 - *upd_pod;
            let args = wait_args(target, Some(UPD_PODS[next]), UPDATE_TIMEOUT);
            let child = lab.spawn_in(CLIENT, &self.opts.self_exe, &args)?;
            // The agent must be dialling before the write; samples where it was not are discarded below.
            std::thread::sleep(Duration::from_millis(25));
            let t_write = mono_ns();
            lab.set_endpoints("bench-upd", &[Ep::ready(UPD_PODS[next])])?;
            *upd_pod = next;
            let w: WaitResult = parse(&child.finish(UPDATE_TIMEOUT + Duration::from_secs(10))?, "agent wait")?;
            if !w.ok {
                bail!("update to {} not visible within {UPDATE_TIMEOUT:?}: {:?}", UPD_PODS[next], w.error);
            }
            if w.t_first_ns >= t_write {
                late += 1;
                continue;
            }
            lat_ms.push(w.t_ok_ns.saturating_sub(t_write) as f64 / 1e6);
        }
        let done = lat_ms.len() + late;
        if let (Some(c0), Some(c1)) = (cpu0, cpu_seconds(pid))
            && done > 0
        {
            let per = (c1 - c0) * 1e3 / done as f64;
            self.push("cpu_per_update", &[per]);
        }
        let q = |x| super::quantile_f(&lat_ms, x);
        let (min, max) = super::stats(&lat_ms).map(|(_, a, b)| (a, b)).unwrap_or_default();
        self.push_stat("update_p50", &lat_ms, q(0.5).map(|v| (v, min, max)));
        self.push_stat("update_p99", &lat_ms, q(0.99).map(|v| (v, min, max)));
        self.step(format!(
            "{} updates: p50 {:.2} ms, p99 {:.2} ms{}",
            lat_ms.len(),
            q(0.5).unwrap_or(f64::NAN),
            q(0.99).unwrap_or(f64::NAN),
            if late > 0 { format!(" ({late} discarded: agent not dialling before the write)") } else { String::new() }
        ));
        Ok(())
    }

    /// Waits (bounded) until the proxy is idle — under 5 % of a core over 500 ms — so the datapath
    /// measurements that follow do not compete with syncs still queued by the updates.
    fn settle(&self, pid: u32) -> Result<()> {
        const WINDOW: Duration = Duration::from_millis(500);
        const BOUND: Duration = Duration::from_secs(300);
        let start = Instant::now();
        let mut last = cpu_seconds(pid);
        while start.elapsed() < BOUND {
            check(self.opts)?;
            std::thread::sleep(WINDOW);
            let now = cpu_seconds(pid);
            if let (Some(a), Some(b)) = (last, now)
                && b - a < 0.05 * WINDOW.as_secs_f64()
            {
                if start.elapsed() > 2 * WINDOW {
                    self.step(format!(
                        "proxy idle after {:.1} s (syncs queued by the updates)",
                        start.elapsed().as_secs_f64()
                    ));
                }
                return Ok(());
            }
            last = now;
        }
        self.step(format!("proxy still busy after {BOUND:?}; measuring anyway"));
        Ok(())
    }

    fn direct_targets(&self) -> Vec<SocketAddr> {
        self.bulk_eps.iter().map(|(ip, _, _)| SocketAddr::new(IpAddr::V4(*ip), 8080)).collect()
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(bulk_vip(self.n - 1).expect("checked")), 80)
    }

    /// Sequential connect + request + close, ClusterIP and pod IPs interleaved in one agent run.
    fn latency(&mut self, lab: &mut Lab) -> Result<()> {
        let (vip, direct) = (self.vip(), self.direct_targets());
        let join = |v: &[SocketAddr]| v.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
        let args = |count: usize| -> Vec<String> {
            ["agent", "lat", "--a", &vip.to_string(), "--b", &join(&direct), "--count", &count.to_string()]
                .map(String::from)
                .to_vec()
        };
        // Warm-up: neither series pays first-touch costs (neighbour entries, page faults, thread stacks).
        let _: LatResult = agent(lab, self.opts, &args(200), Duration::from_secs(60))?;
        // p50/p99 of ClusterIP, p50/p99 direct, ratio p50/p99: one value per repetition each.
        let mut v: [Vec<f64>; 6] = Default::default();
        let (mut failed, mut attempts) = ([0usize; 2], 0usize);
        for rep in 0..self.opts.reps {
            check(self.opts)?;
            let timeout = Duration::from_secs(60) + Duration::from_millis(self.opts.conn_count as u64 * 10);
            let r: LatResult = agent(lab, self.opts, &args(self.opts.conn_count), timeout)?;
            let total = self.opts.conn_count.max(1) as f64;
            // A few failures are a result (reported as `conn_*_failed`); most failing means the setup is broken.
            if (r.failed_a + r.failed_b) as f64 > 0.2 * total {
                bail!("latency run: {} + {} of {total} exchanges failed: {:?}", r.failed_a, r.failed_b, r.error);
            }
            failed[0] += r.failed_a;
            failed[1] += r.failed_b;
            attempts += self.opts.conn_count;
            let qa = |q| super::quantile_f(&r.a.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), q);
            let qb = |q| super::quantile_f(&r.b.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), q);
            let (Some(pa50), Some(pa99), Some(pb50), Some(pb99)) = (qa(0.5), qa(0.99), qb(0.5), qb(0.99)) else {
                bail!("latency run without samples: {:?}", r.error);
            };
            for (series, x) in v.iter_mut().zip([pa50, pa99, pb50, pb99, pa50 / pb50.max(1.0), pa99 / pb99.max(1.0)]) {
                series.push(x);
            }
            self.step(format!(
                "latency {}/{}: ClusterIP p50 {pa50:.0} us p99 {pa99:.0} us | direct p50 {pb50:.0} us p99 {pb99:.0} us \
                 | ratio p50 {:.2}{}",
                rep + 1,
                self.opts.reps,
                pa50 / pb50.max(1.0),
                if r.failed_a + r.failed_b > 0 {
                    format!(" | failed {} + {} ({:?})", r.failed_a, r.failed_b, r.error)
                } else {
                    String::new()
                }
            ));
        }
        let names = [
            "conn_clusterip_p50",
            "conn_clusterip_p99",
            "conn_direct_p50",
            "conn_direct_p99",
            "conn_ratio_p50",
            "conn_ratio_p99",
        ];
        for (name, series) in names.iter().zip(&v) {
            self.push(name, series);
        }
        // Only when something failed: the rows are "how much", never a zero.
        for (name, n) in ["conn_clusterip_failed", "conn_direct_failed"].iter().zip(failed) {
            if n > 0 {
                self.push(name, &[100.0 * n as f64 / attempts.max(1) as f64]);
            }
        }
        Ok(())
    }

    /// Short connections from several concurrent clients, ClusterIP and pod IPs back to back per repetition.
    fn throughput(&mut self, lab: &mut Lab) -> Result<()> {
        let (vip, direct) = (vec![self.vip()], self.direct_targets());
        let (mut a, mut b, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        // (failed, attempted) via the ClusterIP over all repetitions.
        let failed = std::cell::Cell::new((0u64, 0u64));
        let ms = self.opts.rps_duration.as_millis().to_string();
        let clients = self.opts.rps_clients.to_string();
        for rep in 0..self.opts.reps {
            check(self.opts)?;
            let one = |targets: &[SocketAddr]| -> Result<f64> {
                let t = targets.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
                let args =
                    ["agent", "rps", "--targets", &t, "--clients", &clients, "--duration-ms", &ms].map(String::from);
                let r: RpsResult = agent(lab, self.opts, &args, self.opts.rps_duration + Duration::from_secs(30))?;
                // Failed exchanges (1 s connect bound) are not fatal: their cost is in the rate, which counts
                // answered requests only.
                if r.failed > 0 {
                    self.step(format!("throughput to {t}: {} of {} exchanges failed", r.failed, r.ok + r.failed));
                }
                if targets == vip.as_slice() {
                    let (f, n) = failed.get();
                    failed.set((f + r.failed, n + r.ok + r.failed));
                }
                if r.ok == 0 {
                    bail!("throughput run to {t}: nothing answered ({} failed)", r.failed);
                }
                Ok(r.ok as f64 / r.seconds.max(1e-3))
            };
            // Alternate the order so a drift within the repetition does not favour one side.
            let (x, y) = if rep % 2 == 0 {
                let x = one(&vip)?;
                (x, one(&direct)?)
            } else {
                let y = one(&direct)?;
                (one(&vip)?, y)
            };
            a.push(x);
            b.push(y);
            ratio.push(x / y.max(1e-9));
            self.step(format!(
                "throughput {}/{}: ClusterIP {x:.0} req/s | direct {y:.0} req/s | ratio {:.2}",
                rep + 1,
                self.opts.reps,
                x / y.max(1e-9)
            ));
        }
        self.push("rps_clusterip", &a);
        self.push("rps_direct", &b);
        self.push("rps_ratio", &ratio);
        if let (f, n) = failed.get()
            && f > 0
        {
            self.push("rps_clusterip_failed", &[100.0 * f as f64 / n.max(1) as f64]);
        }
        Ok(())
    }

    /// From the external client: short TCP connections and UDP request/replies through node-0's NodePort
    /// against the same clients to the pod IPs. Each repetition interleaves the two series in slices of
    /// [`NS_SLICE`] (order alternating), so load that drifts over seconds (2 cores, the proxy, other work on
    /// the machine) falls on both alike.
    fn north_south(&mut self, lab: &mut Lab) -> Result<()> {
        let targets = [
            [vec![self.ns.node_port], self.ns.direct.clone()],
            [vec![self.ns.udp_node_port], vec![self.ns.udp_direct]],
        ];
        let np = &targets[0][0];
        let w: WaitResult =
            agent_at(lab, Place::External, self.opts, &wait_args(np[0], None, UPDATE_TIMEOUT), UPDATE_TIMEOUT)?;
        if !w.ok {
            bail!("NodePort {} not answered from outside: {:?}", np[0], w.error);
        }
        let slices = (self.opts.rps_duration.as_millis() / NS_SLICE.as_millis()).max(1) as usize;
        let ms = NS_SLICE.as_millis().to_string();
        let clients = self.opts.rps_clients.to_string();
        let join = |v: &[SocketAddr]| v.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
        let bound = NS_SLICE + Duration::from_secs(30);
        // One slice: (answered, failed, seconds).
        let run = |kind: &str, t: &[SocketAddr]| -> Result<(u64, u64, f64)> {
            let args =
                ["agent", kind, "--targets", &join(t), "--clients", &clients, "--duration-ms", &ms].map(String::from);
            if kind == "udp" {
                let r: UdpResult = agent_at(lab, Place::External, self.opts, &args, bound)?;
                if let Some(e) = r.error {
                    bail!("north-south UDP to {}: {e}", join(t));
                }
                Ok((r.ok, r.lost, r.seconds))
            } else {
                let r: RpsResult = agent_at(lab, Place::External, self.opts, &args, bound)?;
                Ok((r.ok, r.failed, r.seconds))
            }
        };
        // [NodePort req/s, direct req/s, ratio, NodePort pkt/s, direct pkt/s, ratio]
        let mut v: [Vec<f64>; 6] = Default::default();
        // (failed, attempted) through the NodePort: TCP, UDP.
        let mut failed = [(0u64, 0u64); 2];
        for rep in 0..self.opts.reps {
            check(self.opts)?;
            // [kind][series]: (answered, failed, seconds) summed over the slices.
            let mut sum = [[(0u64, 0u64, 0f64); 2]; 2];
            for (k, kind) in ["rps", "udp"].iter().enumerate() {
                for slice in 0..slices {
                    let order = if (rep + slice) % 2 == 0 { [0, 1] } else { [1, 0] };
                    for series in order {
                        let (ok, bad, secs) = run(kind, &targets[k][series])?;
                        let acc = &mut sum[k][series];
                        *acc = (acc.0 + ok, acc.1 + bad, acc.2 + secs);
                    }
                }
                for (series, (ok, bad, _)) in sum[k].iter().enumerate() {
                    if *ok == 0 {
                        let to = if series == 0 { "the NodePort" } else { "the pod IPs" };
                        bail!("north-south {kind} to {to}: nothing answered ({bad} failed)");
                    }
                }
                failed[k] = (failed[k].0 + sum[k][0].1, failed[k].1 + sum[k][0].0 + sum[k][0].1);
            }
            let rate = |(ok, _, secs): (u64, u64, f64)| ok as f64 / secs.max(1e-3);
            let (x, y) = (rate(sum[0][0]), rate(sum[0][1]));
            // Two packets through node-0 per UDP exchange: the request and the reply.
            let (p, q) = (2.0 * rate(sum[1][0]), 2.0 * rate(sum[1][1]));
            for (series, val) in v.iter_mut().zip([x, y, x / y.max(1e-9), p, q, p / q.max(1e-9)]) {
                series.push(val);
            }
            let (f, lost) = (sum[0][0].1, sum[1][0].1);
            self.step(format!(
                "north-south {}/{}: NodePort {x:.0} req/s | direct {y:.0} req/s | ratio {:.2} || UDP NodePort {p:.0} \
                 pkt/s | direct {q:.0} pkt/s | ratio {:.2}{}",
                rep + 1,
                self.opts.reps,
                x / y.max(1e-9),
                p / q.max(1e-9),
                if f + lost > 0 { format!(" | NodePort failed: {f} TCP, {lost} UDP") } else { String::new() }
            ));
        }
        let names = ["np_rps", "np_rps_direct", "np_rps_ratio", "np_udp_pps", "np_udp_direct", "np_udp_ratio"];
        for (name, series) in names.iter().zip(&v) {
            self.push(name, series);
        }
        for (name, (f, n)) in ["np_rps_failed", "np_udp_failed"].into_iter().zip(failed) {
            if f > 0 {
                self.push(name, &[100.0 * f as f64 / n.max(1) as f64]);
            }
        }
        Ok(())
    }

    /// One iperf3 stream from the client pod to pod-1-0, via `bench-iperf`'s ClusterIP and directly.
    fn bulk(&mut self, lab: &mut Lab, bin: &Path) -> Result<()> {
        let vip = lab.service_addr("bench-iperf", "iperf")?;
        let direct = SocketAddr::new(IpAddr::V4(lab.pod(IPERF_POD)?.ip4), IPERF_PORT);
        let secs = self.opts.bulk_duration.as_secs().max(1);
        let (mut a, mut b, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..self.opts.reps {
            check(self.opts)?;
            let one = |t: SocketAddr| iperf(lab, bin, t, secs);
            let (x, y) = if rep % 2 == 0 {
                let x = one(vip)?;
                (x, one(direct)?)
            } else {
                let y = one(direct)?;
                (one(vip)?, y)
            };
            a.push(x);
            b.push(y);
            ratio.push(x / y.max(1e-9));
            self.step(format!(
                "bulk {}/{}: ClusterIP {x:.2} Gbit/s | direct {y:.2} Gbit/s | ratio {:.2}",
                rep + 1,
                self.opts.reps,
                x / y.max(1e-9)
            ));
        }
        self.push("bulk_clusterip", &a);
        self.push("bulk_direct", &b);
        self.push("bulk_ratio", &ratio);
        Ok(())
    }

    /// RSS now, BPF map memory (ebpf) or the iptables rule count (iptables).
    fn cost(&mut self, lab: &mut Lab, pid: u32) -> Result<()> {
        if let Some(kib) = crate::rss_kib(pid) {
            self.push("rss", &[kib as f64 / 1024.0]);
        }
        match self.backend {
            "ebpf" => {
                let kpctl = lab_bin_dir(self.opts)?.join("kpctl");
                let bpffs = lab.node(0)?.bpffs.display().to_string();
                let out = lab.exec_in(
                    Place::Node(0),
                    &kpctl.to_string_lossy(),
                    &["maps", "--json", "--bpffs-root", &bpffs],
                    Duration::from_secs(60),
                )?;
                if !out.status.success() {
                    bail!("kpctl maps: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                let maps: Vec<Value> = serde_json::from_slice(&out.stdout).context("kpctl maps --json output")?;
                let bytes: u64 = maps.iter().filter_map(|m| m["memory_bytes"].as_u64()).sum();
                self.push("bpf_map_memory", &[bytes as f64 / 1024.0 / 1024.0]);
                self.step(format!("cost: {} maps, {:.1} MiB of map memory", maps.len(), bytes as f64 / 1048576.0));
            }
            "iptables" => {
                let out = lab.exec_in(Place::Node(0), "iptables-save", &[], Duration::from_secs(120))?;
                if !out.status.success() {
                    bail!("iptables-save: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                let rules = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).count();
                self.push("iptables_rules", &[rules as f64]);
                self.step(format!("cost: {rules} iptables rules"));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Applies bulk Services `from..to` (and their slices) in chunks.
fn load(lab: &Lab, from: usize, to: usize, eps: &[BulkEndpoint], opts: &Options) -> Result<()> {
    let mut i = from;
    while i < to {
        check(opts)?;
        let end = (i + LOAD_CHUNK).min(to);
        let objs: Vec<Value> =
            (i..end).filter_map(|k| bulk_objects(k, eps)).flat_map(|pair| pair.into_iter()).collect();
        lab.api().apply_json(objs).with_context(|| format!("applying bulk Services {i}..{end}"))?;
        i = end;
    }
    Ok(())
}

fn wait_args(target: SocketAddr, want: Option<&str>, timeout: Duration) -> Vec<String> {
    let mut v = vec!["agent".into(), "wait".into(), "--target".into(), target.to_string()];
    if let Some(p) = want {
        v.extend(["--want-pod".into(), p.to_string()]);
    }
    v.extend(["--timeout-ms".into(), timeout.as_millis().to_string()]);
    v
}

/// Polls `target` from the client pod in rounds until it answers; between rounds, fails early when the proxy
/// exited or keeps logging failed syncs (e.g. a full BPF map), instead of waiting out the whole timeout.
fn wait_served(
    lab: &mut Lab,
    opts: &Options,
    target: SocketAddr,
    log_start: usize,
    timeout: Duration,
) -> Result<WaitResult> {
    const ROUND: Duration = Duration::from_secs(5);
    let deadline = Instant::now() + timeout;
    loop {
        check(opts)?;
        let left = deadline.saturating_duration_since(Instant::now()).min(ROUND).max(Duration::from_millis(100));
        let w: WaitResult = agent(lab, opts, &wait_args(target, None, left), left + Duration::from_secs(10))?;
        if w.ok {
            return Ok(w);
        }
        let log = strip_ansi(&lab.proxy_log(0));
        let new = log.get(log_start.min(log.len())..).unwrap_or("");
        let failures: Vec<&str> = new.lines().filter(|l| l.contains("Failed to sync proxy rules")).collect();
        if !lab.proxy_running(0) {
            bail!("kube-proxy exited before {target} answered; log:\n{}", tail(new, 20));
        }
        if failures.len() >= 3 {
            bail!(
                "{target} never answered: kube-proxy failed {} syncs; last: {}",
                failures.len(),
                failures.last().map(|l| l.trim()).unwrap_or("")
            );
        }
        if Instant::now() >= deadline {
            bail!("{target} did not answer within {timeout:?} of the start (last error {:?})", w.error);
        }
    }
}

/// The text without ANSI colour sequences (`ESC [ ... letter`), as kube-proxy colours its log.
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the final letter of the sequence.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `bench agent ...` in the client pod and parses its JSON line.
fn agent<T: DeserializeOwned>(lab: &Lab, opts: &Options, args: &[String], timeout: Duration) -> Result<T> {
    agent_at(lab, Place::Pod(CLIENT.into()), opts, args, timeout)
}

/// [`agent`] at `place`.
fn agent_at<T: DeserializeOwned>(
    lab: &Lab,
    place: Place,
    opts: &Options,
    args: &[String],
    timeout: Duration,
) -> Result<T> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let what = format!("agent {} at {place:?}", args.get(1).map(String::as_str).unwrap_or("?"));
    let out = lab.exec_in(place, &opts.self_exe.to_string_lossy(), &refs, timeout)?;
    parse(&out, &what)
}

fn parse<T: DeserializeOwned>(out: &std::process::Output, what: &str) -> Result<T> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match line {
        Some(l) if out.status.success() => serde_json::from_str(l).with_context(|| format!("{what} output: {l}")),
        _ => bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
    }
}

/// One iperf3 client run in the client pod; Gbit/s received.
fn iperf(lab: &Lab, bin: &Path, target: SocketAddr, secs: u64) -> Result<f64> {
    let (ip, port, t) = (target.ip().to_string(), target.port().to_string(), secs.to_string());
    let mut last = String::new();
    // The server takes one test at a time and needs a moment between tests; retry a few times.
    for _ in 0..5 {
        let out = lab.exec_in(
            CLIENT,
            &bin.to_string_lossy(),
            &["-c", &ip, "-p", &port, "-t", &t, "-J"],
            Duration::from_secs(secs + 30),
        )?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64()
            && bps > 0.0
        {
            return Ok(bps / 1e9);
        }
        last = v["error"].as_str().map(str::to_string).unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into());
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(anyhow!("iperf3 to {target}: {last}"))
}

/// `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn lab_bin_dir(opts: &Options) -> Result<PathBuf> {
    match &opts.bin_dir {
        Some(d) => Ok(d.clone()),
        None => {
            opts.self_exe.parent().map(Path::to_path_buf).ok_or_else(|| anyhow!("bench binary without a directory"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[31mERROR\u{1b}[0m Failed"), "ERROR Failed");
        let args = wait_args("198.19.1.0:80".parse().unwrap(), Some("pod-1-0"), Duration::from_secs(2));
        assert_eq!(args.join(" "), "agent wait --target 198.19.1.0:80 --want-pod pod-1-0 --timeout-ms 2000");
    }
}
