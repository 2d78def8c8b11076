//! Test helper for `pkg/ebpf/tests`: a socket client that first joins a cgroup and a network namespace,
//! then runs socket operations and prints one result line per operation.
//!
//! Usage: `kp-ebpf-testclient [--cgroup DIR] [--netns FILE] OP ADDR PORT [OP ADDR PORT ...]`, where OP is
//! `tcp` (connect, getpeername, read one line), `udp` (unconnected sendto/recvfrom) or `udpc` (connected
//! UDP). Output: `OP ok peer=<addr> reply=<line>` or `OP err=<errno>`. Every operation times out after 2 s.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn fail(msg: &str) -> ! {
    eprintln!("kp-ebpf-testclient: {msg}");
    std::process::exit(2)
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn tcp(addr: SocketAddr) -> String {
    let stream = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return format!("tcp err={}", errno(&e)),
    };
    let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_else(|e| format!("?{e}"));
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let mut line = String::new();
    if let Err(e) = BufReader::new(&stream).read_line(&mut line) {
        return format!("tcp err={}", errno(&e));
    }
    format!("tcp ok peer={peer} reply={}", line.trim())
}

fn udp_socket(addr: &SocketAddr) -> std::io::Result<UdpSocket> {
    let s = match addr.ip() {
        IpAddr::V4(_) => UdpSocket::bind("0.0.0.0:0")?,
        IpAddr::V6(_) => UdpSocket::bind("[::]:0")?,
    };
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn udp(addr: SocketAddr, connected: bool) -> String {
    let op = if connected { "udpc" } else { "udp" };
    let run = || -> std::io::Result<String> {
        let s = udp_socket(&addr)?;
        let mut buf = [0u8; 512];
        if connected {
            s.connect(addr)?;
            s.send(b"ping")?;
            let n = s.recv(&mut buf)?;
            let peer = s.peer_addr()?;
            Ok(format!("{op} ok peer={peer} reply={}", String::from_utf8_lossy(&buf[..n]).trim()))
        } else {
            s.send_to(b"ping", addr)?;
            let (n, from) = s.recv_from(&mut buf)?;
            Ok(format!("{op} ok peer={from} reply={}", String::from_utf8_lossy(&buf[..n]).trim()))
        }
    };
    run().unwrap_or_else(|e| format!("{op} err={}", errno(&e)))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let mut ops = Vec::new();
    while i < args.len() {
        match args[i].as_str() {
            "--cgroup" => {
                let dir = args.get(i + 1).unwrap_or_else(|| fail("--cgroup needs a value"));
                // Join before any socket exists: cgroup programs see sockets created by members.
                std::fs::write(format!("{dir}/cgroup.procs"), std::process::id().to_string())
                    .unwrap_or_else(|e| fail(&format!("joining cgroup {dir}: {e}")));
                i += 2;
            }
            "--netns" => {
                let path = args.get(i + 1).unwrap_or_else(|| fail("--netns needs a value"));
                let f = std::fs::File::open(path).unwrap_or_else(|e| fail(&format!("opening {path}: {e}")));
                // SAFETY: plain syscall on a valid fd; the process is still single-threaded.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    fail(&format!("setns {path}: {}", std::io::Error::last_os_error()));
                }
                i += 2;
            }
            op => {
                let ip: IpAddr = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or_else(|| fail("bad address"));
                let port: u16 = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or_else(|| fail("bad port"));
                ops.push((op.to_string(), SocketAddr::new(ip, port)));
                i += 3;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    for (op, addr) in ops {
        let line = match op.as_str() {
            "tcp" => tcp(addr),
            "udp" => udp(addr, false),
            "udpc" => udp(addr, true),
            other => fail(&format!("unknown op {other}")),
        };
        let _ = writeln!(out, "{line}");
    }
}
