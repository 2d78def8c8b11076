//! The lab's pod server: answers every TCP line and every UDP datagram with `<pod-name> <peer-ip>:<peer-port>`
//! so a client sees which pod answered and which client address that pod saw.
//!
//! Usage: `lab-echo --name POD [--tcp 8080,8081] [--udp 8080] [--ready-file PATH] [--lifetime-secs N]`.
//! Listens on `[::]` (dual-stack; IPv4 peers are printed in plain IPv4 form), or `0.0.0.0` when the
//! namespace has no IPv6. Exits after `--lifetime-secs` (default one day) so it can never linger forever.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "kube-proxy-rs lab pod server")]
struct Args {
    /// The pod name put in every reply.
    #[arg(long)]
    name: String,
    /// TCP ports, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8080")]
    tcp: Vec<u16>,
    /// UDP ports, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8080")]
    udp: Vec<u16>,
    /// Created once every socket is bound.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 86_400)]
    lifetime_secs: u64,
}

/// Replies per TCP connection before the server closes it (bounds a connection's thread).
const MAX_LINES_PER_CONN: usize = 10_000_000;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(600);

fn any_addrs(port: u16) -> [SocketAddr; 2] {
    [SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port), SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)]
}

/// `1.2.3.4:5` rather than `[::ffff:1.2.3.4]:5` for IPv4 peers of the dual-stack sockets.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn serve_conn(name: &str, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE));
    let reply = format!("{name} {}\n", canonical(peer));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    for _ in 0..MAX_LINES_PER_CONN {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if writer.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut threads = Vec::new();
    for &port in &args.tcp {
        let l = any_addrs(port)
            .iter()
            .find_map(|a| TcpListener::bind(a).ok())
            .with_context(|| format!("binding TCP port {port}"))?;
        let name = args.name.clone();
        threads.push(std::thread::spawn(move || {
            // Ends with the process (lifetime timer below); accept errors are transient (EMFILE, ECONNABORTED).
            for conn in l.incoming() {
                match conn {
                    Ok(s) => {
                        let Ok(peer) = s.peer_addr() else { continue };
                        let name = name.clone();
                        std::thread::spawn(move || serve_conn(&name, s, peer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }
    for &port in &args.udp {
        let s = any_addrs(port)
            .iter()
            .find_map(|a| UdpSocket::bind(a).ok())
            .with_context(|| format!("binding UDP port {port}"))?;
        let name = args.name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match s.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let _ = s.send_to(format!("{name} {}\n", canonical(peer)).as_bytes(), peer);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"ready\n").with_context(|| format!("writing {}", f.display()))?;
    }
    eprintln!("lab-echo {}: tcp {:?} udp {:?} ready", args.name, args.tcp, args.udp);
    std::thread::sleep(Duration::from_secs(args.lifetime_secs));
    eprintln!("lab-echo {}: lifetime over, exiting", args.name);
    Ok(())
}
