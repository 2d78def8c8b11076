//! The bench's probes, run inside a pod (its namespace and cgroup, so the node's load balancer applies) by
//! re-executing the bench binary as `bench agent <cmd>`. Each prints one JSON line on stdout. The timed part
//! of every attempt is only connect + write + read + close; recording a sample is a push into a `Vec`.
//!
//! Every loop is bounded by a count and a deadline.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::mono_ns;

/// Attempts of one agent run, whatever the flags say.
const MAX_ATTEMPTS: usize = 2_000_000;

/// `bench agent` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum AgentCmd {
    /// Poll `target` with new connections until one is answered (by `--want-pod`, if given).
    Wait {
        /// Address to dial.
        #[arg(long)]
        target: SocketAddr,
        /// Only a reply from this pod counts.
        #[arg(long)]
        want_pod: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        /// Pause between attempts (leaves the CPU to the proxy being measured).
        #[arg(long, default_value_t = 200)]
        interval_us: u64,
    },
    /// Sequential connect + one request + close, alternating between the `a` and `b` targets so both see the
    /// same conditions.
    Lat {
        /// Targets of series `a` (round-robin).
        #[arg(long, value_delimiter = ',', required = true)]
        a: Vec<SocketAddr>,
        /// Targets of series `b` (round-robin).
        #[arg(long, value_delimiter = ',', required = true)]
        b: Vec<SocketAddr>,
        /// Exchanges per series.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Give up after this long.
        #[arg(long, default_value_t = 120_000)]
        deadline_ms: u64,
    },
    /// Concurrent clients, a new connection per request, for a while.
    Rps {
        /// Targets (round-robin per client).
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<SocketAddr>,
        /// Concurrent clients (threads).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// How long.
        #[arg(long, default_value_t = 2_000)]
        duration_ms: u64,
    },
    /// Concurrent clients, each one connected UDP socket (one flow) sending a small request and waiting for
    /// the reply before the next, for a while.
    Udp {
        /// Targets (client `c` uses target `c mod len`).
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<SocketAddr>,
        /// Concurrent clients (threads).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// How long.
        #[arg(long, default_value_t = 2_000)]
        duration_ms: u64,
        /// Wait for one reply before counting the request lost.
        #[arg(long, default_value_t = 200)]
        timeout_ms: u64,
    },
}

/// Output of `agent wait`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitResult {
    /// A wanted reply arrived.
    pub ok: bool,
    /// CLOCK_MONOTONIC when the first attempt started.
    pub t_first_ns: u64,
    /// CLOCK_MONOTONIC when the successful attempt started (its connect is where the datapath decided).
    pub t_ok_ns: u64,
    /// Attempts made.
    pub attempts: usize,
    /// The pod of the last reply.
    pub pod: Option<String>,
    /// The last error.
    pub error: Option<String>,
}

/// Output of `agent lat`: per-exchange times in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatResult {
    /// Series `a`.
    pub a: Vec<u32>,
    /// Series `b`.
    pub b: Vec<u32>,
    /// Failed exchanges of `a`.
    pub failed_a: usize,
    /// Failed exchanges of `b`.
    pub failed_b: usize,
    /// The first error seen.
    pub error: Option<String>,
}

/// Output of `agent rps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpsResult {
    /// Exchanges answered.
    pub ok: u64,
    /// Exchanges failed.
    pub failed: u64,
    /// Measured wall time.
    pub seconds: f64,
}

/// Output of `agent udp`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UdpResult {
    /// Requests answered (each is one request and one reply packet).
    pub ok: u64,
    /// Requests without a reply within the timeout.
    pub lost: u64,
    /// Measured wall time.
    pub seconds: f64,
    /// The first socket error (setup or send), if any.
    pub error: Option<String>,
}

/// connect, write a line, read the reply line, close. Returns the pod that answered.
fn exchange(target: SocketAddr, connect_timeout: Option<Duration>) -> std::io::Result<String> {
    let mut s = match connect_timeout {
        Some(t) => TcpStream::connect_timeout(&target, t)?,
        None => TcpStream::connect(target)?,
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"hello\n")?;
    // lab-echo replies with one short line (`<pod> <ip:port>\n`); read until the newline.
    let mut buf = [0u8; 256];
    let mut n = 0;
    while n < buf.len() {
        let k = s.read(&mut buf[n..])?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n += k;
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    let line = String::from_utf8_lossy(&buf[..n]);
    Ok(line.split_whitespace().next().unwrap_or("").to_string())
}

fn wait(target: SocketAddr, want: Option<&str>, timeout: Duration, interval: Duration) -> WaitResult {
    let deadline = Instant::now() + timeout;
    let t_first_ns = mono_ns();
    let mut r = WaitResult { ok: false, t_first_ns, t_ok_ns: 0, attempts: 0, pod: None, error: None };
    while r.attempts < MAX_ATTEMPTS && Instant::now() < deadline {
        r.attempts += 1;
        let t = mono_ns();
        match exchange(target, Some(Duration::from_millis(200))) {
            Ok(pod) => {
                let hit = want.is_none_or(|w| w == pod);
                r.pod = Some(pod);
                if hit {
                    r.ok = true;
                    r.t_ok_ns = t;
                    return r;
                }
            }
            Err(e) => r.error = Some(e.to_string()),
        }
        std::thread::sleep(interval);
    }
    r
}

fn lat(a: &[SocketAddr], b: &[SocketAddr], count: usize, deadline: Duration) -> LatResult {
    let end = Instant::now() + deadline;
    let mut r = LatResult { a: Vec::with_capacity(count), b: Vec::with_capacity(count), ..LatResult::default() };
    for i in 0..count.min(MAX_ATTEMPTS) {
        if Instant::now() >= end {
            break;
        }
        // Alternate which series goes first, so neither always follows the other.
        let order = if i % 2 == 0 { [true, false] } else { [false, true] };
        for is_a in order {
            let target = if is_a { a[i % a.len()] } else { b[i % b.len()] };
            let t = Instant::now();
            // Bounded connect (both series alike): a lost SYN is a failure, not a 127 s retransmission wait.
            let res = exchange(target, Some(Duration::from_secs(1)));
            let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            match (res, is_a) {
                (Ok(_), true) => r.a.push(us),
                (Ok(_), false) => r.b.push(us),
                (Err(e), side) => {
                    if side {
                        r.failed_a += 1;
                    } else {
                        r.failed_b += 1;
                    }
                    r.error.get_or_insert_with(|| format!("{target}: {e}"));
                }
            }
        }
    }
    r
}

fn rps(targets: &[SocketAddr], clients: usize, duration: Duration) -> RpsResult {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients.clamp(1, 64))
        .map(|c| {
            let (stop, ok, failed, targets) = (stop.clone(), ok.clone(), failed.clone(), targets.to_vec());
            std::thread::spawn(move || {
                for i in (c..).take(MAX_ATTEMPTS) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Bounded connect: one lost SYN must not hold a client past the window.
                    match exchange(targets[i % targets.len()], Some(Duration::from_secs(1))) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    // Count only what finished inside the window.
    let (ok_n, failed_n, seconds) =
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
    for t in threads {
        let _ = t.join();
    }
    RpsResult { ok: ok_n, failed: failed_n, seconds }
}

/// One client of [`udp`]: request, wait for the reply (or the timeout), repeat until `stop`; counts into
/// `ok` and `lost`.
fn udp_client(
    target: SocketAddr,
    timeout: Duration,
    stop: &AtomicBool,
    ok: &AtomicU64,
    lost: &AtomicU64,
) -> std::io::Result<()> {
    let bind: SocketAddr = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal");
    let s = UdpSocket::bind(bind)?;
    // Connected: only the frontend's replies are received, and the flow is one 5-tuple throughout.
    s.connect(target)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 256];
    for _ in 0..MAX_ATTEMPTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // A timeout, or an ICMP error surfacing on the connected socket: a lost exchange either way.
        if s.send(b"hello\n").is_err() {
            lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match s.recv(&mut buf) {
            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => lost.fetch_add(1, Ordering::Relaxed),
        };
    }
    Ok(())
}

fn udp(targets: &[SocketAddr], clients: usize, duration: Duration, timeout: Duration) -> UdpResult {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients.clamp(1, 64))
        .map(|c| {
            let (stop, ok, lost, target) = (stop.clone(), ok.clone(), lost.clone(), targets[c % targets.len()]);
            std::thread::spawn(move || udp_client(target, timeout, &stop, &ok, &lost))
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    // Count only what finished inside the window.
    let mut r = UdpResult {
        ok: ok.load(Ordering::Relaxed),
        lost: lost.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        error: None,
    };
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                r.error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                r.error.get_or_insert_with(|| "client thread panicked".into());
            }
        }
    }
    r
}

/// Runs an agent command and prints its JSON line.
pub fn main(cmd: AgentCmd) {
    let out = match cmd {
        AgentCmd::Wait { target, want_pod, timeout_ms, interval_us } => json!(wait(
            target,
            want_pod.as_deref(),
            Duration::from_millis(timeout_ms),
            Duration::from_micros(interval_us)
        )),
        AgentCmd::Lat { a, b, count, deadline_ms } => json!(lat(&a, &b, count, Duration::from_millis(deadline_ms))),
        AgentCmd::Rps { targets, clients, duration_ms } => {
            json!(rps(&targets, clients, Duration::from_millis(duration_ms.min(600_000))))
        }
        AgentCmd::Udp { targets, clients, duration_ms, timeout_ms } => json!(udp(
            &targets,
            clients,
            Duration::from_millis(duration_ms.min(600_000)),
            Duration::from_millis(timeout_ms.clamp(1, 10_000))
        )),
    };
    println!("{out}");
}
