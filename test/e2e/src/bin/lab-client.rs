//! The lab's prober, run by the lab inside a pod's (or node's) namespace and cgroup so the node's socket load
//! balancer applies to it. Prints JSON lines on stdout.
//!
//! - `tcp TARGET... [--count N]`: per attempt connect, send a line, read the reply line, close;
//!   one line `{ok, reply, errno, stage, error, connect_us, total_us, peer, local, target}` each. Targets
//!   are used round-robin.
//! - `udp TARGET... [--count N]`: unconnected sendto/recvfrom; `peer` is the reply's source address.
//! - `tcp-hold TARGET --duration-ms D [--interval-ms 100]`: one connection, a line every interval; prints
//!   `{"kind":"connected"...}`, a `{"kind":"failure"...}` line when the connection breaks, and a summary.
//! - `churn-client TARGET... --duration-ms D`: sequential short connections for D; prints a summary.
//! - `shared-port tcp|udp TARGET... --source-port P [--rounds N]`: every target from the ONE local port P,
//!   all flows alive at once (UDP: one unconnected socket; TCP: a socket per target, all bound to P with
//!   `SO_REUSEADDR|SO_REUSEPORT`), one request/reply per target per round; a probe line per exchange, `peer`
//!   being where the reply came from (UDP) or the connected address (TCP).
//!
//! Every attempt is bounded by `--timeout-ms`, every loop by a count and `--deadline-ms`/`--duration-ms`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "kube-proxy-rs lab prober")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(ClapArgs, Debug, Clone)]
struct Common {
    /// Per-attempt timeout (connect, and read of the reply).
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// No new attempt starts after this long.
    #[arg(long, default_value_t = 120_000)]
    deadline_ms: u64,
    /// Stop after the first failed attempt (`tcp`/`udp`; for quick "is it programmed yet" polling).
    #[arg(long)]
    stop_on_failure: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Short TCP request/reply exchanges.
    Tcp {
        #[arg(required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Pause between attempts.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Unconnected UDP request/reply exchanges.
    Udp {
        #[arg(required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[command(flatten)]
        common: Common,
    },
    /// One long-lived TCP connection exchanging a line every interval.
    TcpHold {
        target: SocketAddr,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[command(flatten)]
        common: Common,
    },
    /// New TCP connections back to back for a while.
    #[command(alias = "churn")]
    ChurnClient {
        #[arg(required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long)]
        duration_ms: u64,
        #[command(flatten)]
        common: Common,
    },
    /// One local port to several targets at once.
    SharedPort {
        #[arg(value_enum)]
        proto: SharedProto,
        #[arg(required = true)]
        targets: Vec<SocketAddr>,
        /// The local port every flow uses.
        #[arg(long)]
        source_port: u16,
        /// Request/reply rounds over all targets.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum SharedProto {
    Tcp,
    Udp,
}

/// Attempts in one run, whatever the flags say.
const MAX_ATTEMPTS: usize = 1_000_000;

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => libc::ETIMEDOUT,
        std::io::ErrorKind::UnexpectedEof => libc::ECONNRESET,
        _ => -1,
    })
}

fn us(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

fn failure(target: SocketAddr, stage: &str, e: &std::io::Error, start: Instant, connect_us: Option<u64>) -> Value {
    json!({"ok": false, "target": target.to_string(), "stage": stage, "errno": errno(e), "error": e.to_string(),
           "connect_us": connect_us, "total_us": us(start)})
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> Value {
    let start = Instant::now();
    let s = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return failure(target, "connect", &e, start, None),
    };
    let connect_us = us(start);
    let peer = s.peer_addr().map(|a| a.to_string()).ok();
    let local = s.local_addr().map(|a| a.to_string()).ok();
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(timeout));
    if let Err(e) = (&s).write_all(b"hello\n") {
        return failure(target, "write", &e, start, Some(connect_us));
    }
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(0) => {
            let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
            failure(target, "read", &e, start, Some(connect_us))
        }
        Ok(_) => json!({"ok": true, "target": target.to_string(), "reply": line.trim_end(), "connect_us": connect_us,
                        "total_us": us(start), "peer": peer, "local": local}),
        Err(e) => failure(target, "read", &e, start, Some(connect_us)),
    }
}

fn udp_once(target: SocketAddr, timeout: Duration) -> Value {
    let start = Instant::now();
    let bind = match target.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return failure(target, "bind", &e, start, None),
    };
    let _ = s.set_read_timeout(Some(timeout));
    if let Err(e) = s.send_to(b"hello\n", target) {
        return failure(target, "sendto", &e, start, None);
    }
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => {
            let reply = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
            json!({"ok": true, "target": target.to_string(), "reply": reply, "total_us": us(start),
                   "peer": from.to_string(), "local": s.local_addr().map(|a| a.to_string()).ok()})
        }
        Err(e) => failure(target, "recvfrom", &e, start, None),
    }
}

fn emit(out: &mut impl Write, v: &Value) {
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn repeat(targets: &[SocketAddr], count: usize, interval_ms: u64, c: &Common, f: fn(SocketAddr, Duration) -> Value) {
    let mut out = std::io::stdout().lock();
    let deadline = Instant::now() + Duration::from_millis(c.deadline_ms);
    let timeout = Duration::from_millis(c.timeout_ms);
    for i in 0..count.min(MAX_ATTEMPTS) {
        if Instant::now() >= deadline {
            eprintln!("lab-client: deadline reached after {i} of {count} attempts");
            break;
        }
        let v = f(targets[i % targets.len()], timeout);
        emit(&mut out, &v);
        if c.stop_on_failure && v["ok"] != true {
            break;
        }
        if interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
    }
}

fn pod_of(reply: &str) -> String {
    reply.split_whitespace().next().unwrap_or("").to_string()
}

fn tcp_hold(target: SocketAddr, duration: Duration, interval: Duration, c: &Common) {
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    let timeout = Duration::from_millis(c.timeout_ms);
    let (mut sent, mut ok) = (0u64, 0u64);
    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed: Option<Value> = None;
    match TcpStream::connect_timeout(&target, timeout) {
        Err(e) => failed = Some(failure(target, "connect", &e, start, None)),
        Ok(s) => {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(timeout));
            let mut reader = BufReader::new(&s);
            let mut line = String::new();
            let mut first = true;
            while start.elapsed() < duration && sent < MAX_ATTEMPTS as u64 {
                sent += 1;
                let step = Instant::now();
                line.clear();
                let res = (&s).write_all(b"ping\n").map_err(|e| ("write", e)).and_then(|_| {
                    reader.read_line(&mut line).map_err(|e| ("read", e)).and_then(|n| {
                        if n == 0 {
                            Err(("read", std::io::Error::from(std::io::ErrorKind::UnexpectedEof)))
                        } else {
                            Ok(())
                        }
                    })
                });
                match res {
                    Ok(()) => {
                        ok += 1;
                        *pods.entry(pod_of(&line)).or_insert(0) += 1;
                        if first {
                            first = false;
                            emit(
                                &mut out,
                                &json!({"kind": "connected", "peer": s.peer_addr().map(|a| a.to_string()).ok(),
                                                   "reply": line.trim_end(), "t_ms": start.elapsed().as_millis() as u64}),
                            );
                        }
                    }
                    Err((stage, e)) => {
                        let mut f = failure(target, stage, &e, step, None);
                        f["kind"] = json!("failure");
                        f["t_ms"] = json!(start.elapsed().as_millis() as u64);
                        emit(&mut out, &f);
                        failed = Some(f);
                        break;
                    }
                }
                std::thread::sleep(interval);
            }
        }
    }
    emit(
        &mut out,
        &json!({"kind": "summary", "sent": sent, "ok": ok, "failed": failed.is_some(), "failure": failed,
                           "pods": pods, "duration_ms": start.elapsed().as_millis() as u64}),
    );
}

fn churn(targets: &[SocketAddr], duration: Duration, c: &Common) {
    let start = Instant::now();
    let timeout = Duration::from_millis(c.timeout_ms);
    let (mut ok, mut failed, mut slow) = (0u64, 0u64, 0u64);
    let mut errnos: BTreeMap<String, u64> = BTreeMap::new();
    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_failure = Value::Null;
    let mut i = 0usize;
    while start.elapsed() < duration && i < MAX_ATTEMPTS {
        let v = tcp_once(targets[i % targets.len()], timeout);
        i += 1;
        if v["ok"] == true {
            ok += 1;
            // A connect that needed a SYN retransmit (the first RTO is 1 s) succeeded, but late: count it.
            if v["connect_us"].as_u64().unwrap_or(0) >= 900_000 {
                slow += 1;
            }
            *pods.entry(pod_of(v["reply"].as_str().unwrap_or(""))).or_insert(0) += 1;
        } else {
            failed += 1;
            *errnos.entry(format!("{}/{}", v["stage"].as_str().unwrap_or("?"), v["errno"])).or_insert(0) += 1;
            if first_failure.is_null() {
                first_failure = v;
                first_failure["t_ms"] = json!(start.elapsed().as_millis() as u64);
            }
        }
    }
    emit(
        &mut std::io::stdout().lock(),
        &json!({"kind": "summary", "ok": ok, "failed": failed, "slow": slow, "errnos": errnos,
        "pods": pods, "first_failure": first_failure, "duration_ms": start.elapsed().as_millis() as u64}),
    );
}

/// A socket of type `ty` for IPv6 (`v6`) or IPv4 addresses with `SO_REUSEADDR` and `SO_REUSEPORT`, bound to
/// the unspecified address and `port`, with `timeout` on sends (which bounds a blocking `connect()`) and
/// receives.
fn reuse_bound(v6: bool, ty: socket2::Type, port: u16, timeout: Duration) -> std::io::Result<socket2::Socket> {
    let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let s = socket2::Socket::new(if v6 { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 }, ty, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_write_timeout(Some(timeout))?;
    s.set_read_timeout(Some(timeout))?;
    s.bind(&SocketAddr::new(any, port).into())?;
    Ok(s)
}

/// `shared-port`: see the module documentation.
fn shared_port(proto: SharedProto, targets: &[SocketAddr], port: u16, rounds: usize, c: &Common) {
    let mut out = std::io::stdout().lock();
    let timeout = Duration::from_millis(c.timeout_ms);
    let deadline = Instant::now() + Duration::from_millis(c.deadline_ms);
    let v6 = targets[0].is_ipv6();
    let rounds = rounds.min(MAX_ATTEMPTS / targets.len().max(1));
    match proto {
        SharedProto::Udp => {
            let start = Instant::now();
            let s = match reuse_bound(v6, socket2::Type::DGRAM, port, timeout) {
                Ok(fd) => UdpSocket::from(fd),
                Err(e) => return emit(&mut out, &failure(targets[0], "bind", &e, start, None)),
            };
            for _ in 0..rounds {
                for &t in targets {
                    if Instant::now() >= deadline {
                        return;
                    }
                    let start = Instant::now();
                    if let Err(e) = s.send_to(b"hello\n", t) {
                        emit(&mut out, &failure(t, "sendto", &e, start, None));
                        continue;
                    }
                    let mut buf = [0u8; 2048];
                    let v = match s.recv_from(&mut buf) {
                        Ok((n, from)) => json!({"ok": true, "target": t.to_string(),
                            "reply": String::from_utf8_lossy(&buf[..n]).trim_end(), "total_us": us(start),
                            "peer": from.to_string(), "local": s.local_addr().map(|a| a.to_string()).ok()}),
                        Err(e) => failure(t, "recvfrom", &e, start, None),
                    };
                    emit(&mut out, &v);
                }
            }
        }
        SharedProto::Tcp => {
            let mut conns = Vec::new();
            for &t in targets {
                let start = Instant::now();
                let sock = match reuse_bound(v6, socket2::Type::STREAM, port, timeout) {
                    Ok(s) => s,
                    Err(e) => return emit(&mut out, &failure(t, "bind", &e, start, None)),
                };
                if let Err(e) = sock.connect(&t.into()) {
                    emit(&mut out, &failure(t, "connect", &e, start, None));
                    continue;
                }
                let s = TcpStream::from(sock);
                let _ = s.set_nodelay(true);
                conns.push((t, s));
            }
            for _ in 0..rounds {
                for (t, s) in &conns {
                    if Instant::now() >= deadline {
                        return;
                    }
                    let start = Instant::now();
                    if let Err(e) = (&*s).write_all(b"hello\n") {
                        emit(&mut out, &failure(*t, "write", &e, start, None));
                        continue;
                    }
                    // Byte by byte up to the newline: a buffered reader could hold the next round's reply.
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    let res = loop {
                        match (&*s).read(&mut byte) {
                            Ok(0) => break Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                            Ok(_) if byte[0] == b'\n' || line.len() >= 2048 => break Ok(()),
                            Ok(_) => line.push(byte[0]),
                            Err(e) => break Err(e),
                        }
                    };
                    let v = match res {
                        Ok(()) => json!({"ok": true, "target": t.to_string(),
                            "reply": String::from_utf8_lossy(&line), "total_us": us(start),
                            "peer": s.peer_addr().map(|a| a.to_string()).ok(),
                            "local": s.local_addr().map(|a| a.to_string()).ok()}),
                        Err(e) => failure(*t, "read", &e, start, None),
                    };
                    emit(&mut out, &v);
                }
            }
        }
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Tcp { targets, count, interval_ms, common } => repeat(&targets, count, interval_ms, &common, tcp_once),
        Cmd::Udp { targets, count, interval_ms, common } => repeat(&targets, count, interval_ms, &common, udp_once),
        Cmd::TcpHold { target, duration_ms, interval_ms, common } => {
            let duration = Duration::from_millis(duration_ms.min(common.deadline_ms));
            tcp_hold(target, duration, Duration::from_millis(interval_ms), &common)
        }
        Cmd::ChurnClient { targets, duration_ms, common } => {
            churn(&targets, Duration::from_millis(duration_ms.min(common.deadline_ms)), &common)
        }
        Cmd::SharedPort { proto, targets, source_port, rounds, common } => {
            shared_port(proto, &targets, source_port, rounds, &common)
        }
    }
}
