//! The lab demo (`hack/lab.sh`): 2 nodes x 2 pods running the real kube-proxy, three Services, traffic from
//! a pod and a node process, a table of who answered, ClusterIP vs pod-IP latency, and a clean teardown
//! (also on Ctrl-C or failure). `lab-driver cleanup --all-stale` removes leftovers of crashed runs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use e2e::lab::{Ep, Family, Lab, LabConfig, Place, Probe, Proto, answers_by_pod, quantile};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "kube-proxy-rs lab: namespaces as a tiny cluster running the real kube-proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Requests per row of the traffic table.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Sequential requests per latency run.
    #[arg(long, default_value_t = 2000)]
    latency_requests: usize,
    /// `--proxy-mode` of the nodes.
    #[arg(long, default_value = "ebpf")]
    mode: String,
    /// Directory with kube-proxy, lab-echo and lab-client (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bring the lab up, run the demo, tear down (the default).
    Demo,
    /// Remove namespaces, cgroups and pins of labs whose process is gone.
    Cleanup {
        /// Required, to make the intent explicit.
        #[arg(long)]
        all_stale: bool,
    },
}

/// Fails once Ctrl-C (or SIGTERM) arrived, so `?` unwinds to the lab's teardown.
fn check_interrupt() -> Result<()> {
    if e2e::lab::INTERRUPTED.load(Ordering::SeqCst) { bail!("interrupted") } else { Ok(()) }
}

struct Progress(Instant);

impl Progress {
    fn step(&self, msg: impl AsRef<str>) {
        eprintln!("[{:>6.2}s] {}", self.0.elapsed().as_secs_f64(), msg.as_ref());
    }
}

/// One row of the traffic table.
struct Row {
    service: String,
    target: SocketAddr,
    proto: Proto,
    from: String,
    probes: Vec<Probe>,
    expected: BTreeSet<String>,
}

impl Row {
    fn failures(&self) -> usize {
        self.probes.iter().filter(|p| !p.ok).count()
    }

    fn answered(&self) -> BTreeSet<String> {
        answers_by_pod(&self.probes).into_keys().collect()
    }

    fn ok(&self) -> bool {
        self.failures() == 0 && self.answered() == self.expected
    }
}

fn distinct(values: impl Iterator<Item = Option<String>>) -> String {
    let set: BTreeSet<String> = values.map(|v| v.unwrap_or_else(|| "?".into())).collect();
    set.into_iter().collect::<Vec<_>>().join(",")
}

/// One table line; the widths fit 4 pods in the answers column.
fn table_line(c: [&str; 8]) -> String {
    format!("{:<8} {:<24} {:<5} {:<16} {:<52} {:<6} {:<28} {}", c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7])
}

fn print_table(rows: &[Row], n: usize) {
    println!();
    let answered = format!("ANSWERED BY (of {n})");
    println!(
        "{}",
        table_line(["SERVICE", "ADDRESS", "PROTO", "FROM", &answered, "FAILED", "POD SAW CLIENT", "REPLY FROM"])
    );
    for r in rows {
        let answers = answers_by_pod(&r.probes).iter().map(|(p, c)| format!("{p} {c}")).collect::<Vec<_>>().join(" | ");
        let seen = distinct(r.probes.iter().filter(|p| p.ok).map(Probe::seen_client_ip));
        let reply_from = distinct(r.probes.iter().filter(|p| p.ok).map(|p| p.peer.clone()));
        let proto = match r.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let (target, failed) = (r.target.to_string(), r.failures().to_string());
        println!("{}", table_line([&r.service, &target, proto, &r.from, &answers, &failed, &seen, &reply_from]));
    }
    println!();
}

struct Latency {
    total: Vec<u64>,
    connect: Vec<u64>,
    failures: usize,
}

fn latency(lab: &Lab, from: &str, targets: &[SocketAddr], n: usize) -> Result<Latency> {
    // A short warm-up so neither run pays for first-touch costs (ARP/ND, page faults).
    lab.probe(from, Proto::Tcp, targets, 50)?;
    let probes = lab.probe(from, Proto::Tcp, targets, n)?;
    let ok: Vec<&Probe> = probes.iter().filter(|p| p.ok).collect();
    Ok(Latency {
        total: ok.iter().map(|p| p.total_us).collect(),
        connect: ok.iter().filter_map(|p| p.connect_us).collect(),
        failures: probes.len() - ok.len(),
    })
}

fn demo(cli: &Cli) -> Result<()> {
    let progress = Progress(Instant::now());
    let stale = Lab::cleanup_stale().context("removing leftovers of earlier labs")?;
    if !stale.is_empty() {
        progress.step(format!("removed leftovers of dead labs: {stale:?}"));
    }
    progress.step(format!("bringing up 2 nodes x 2 pods, kube-proxy --proxy-mode={}", cli.mode));
    let cfg = LabConfig { mode: cli.mode.clone(), bin_dir: cli.bin_dir.clone(), verbose: true, ..LabConfig::default() };
    let mut lab = Lab::new(cfg)?;
    let footprint = lab.footprint();
    let result = run_demo(cli, &mut lab, &progress);
    progress.step("tearing down");
    let teardown = lab.shutdown();
    let left = footprint.leftovers();
    match (&teardown, left.is_empty()) {
        (Ok(()), true) => progress.step("teardown clean: no namespace, cgroup or pin left"),
        _ => progress.step(format!("teardown problems: {teardown:?}; left: {left:?}")),
    }
    result.and(teardown)
}

fn run_demo(cli: &Cli, lab: &mut Lab, progress: &Progress) -> Result<()> {
    check_interrupt()?;
    for n in lab.nodes() {
        progress.step(format!(
            "{}: underlay {} / {}, pods {} + {}, kube-proxy healthz http://{}",
            n.name, n.ip4, n.ip6, n.pod_cidr4, n.pod_cidr6, n.healthz
        ));
    }
    let all: Vec<String> = lab.pod_names();
    let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let pair = ["pod-0-1", "pod-1-0"];

    progress.step("creating Services: web (TCP, 4 pods), multi (tcp+alt+dns/UDP, 2 pods), web6 (IPv6, 4 pods)");
    lab.apply_service("web", Family::V4, json!({}))?;
    lab.set_endpoints("web", &all_refs.iter().map(|p| Ep::ready(p)).collect::<Vec<_>>())?;
    lab.apply_service(
        "multi",
        Family::V4,
        json!({"spec": {"ports": [
            {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "alt", "port": 81, "protocol": "TCP", "targetPort": 8081},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8053}]}}),
    )?;
    lab.set_endpoints("multi", &pair.map(Ep::ready))?;
    lab.apply_service("web6", Family::V6, json!({}))?;
    lab.set_endpoints("web6", &all_refs.iter().map(|p| Ep::ready(p)).collect::<Vec<_>>())?;

    let client = "pod-0-0";
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
    let plan: Vec<(&str, &str, Proto, Place, BTreeSet<String>)> = vec![
        ("web", "tcp", Proto::Tcp, Place::from(client), set(&all_refs)),
        ("multi", "tcp", Proto::Tcp, Place::from(client), set(&pair)),
        ("multi", "alt", Proto::Tcp, Place::from(client), set(&pair)),
        ("multi", "dns", Proto::Udp, Place::from(client), set(&pair)),
        ("web6", "tcp", Proto::Tcp, Place::from(client), set(&all_refs)),
        ("web", "tcp", Proto::Tcp, Place::Node(1), set(&all_refs)),
    ];
    let t = Instant::now();
    let mut waited = Vec::new();
    for (svc, port, proto, _, expected) in &plan {
        check_interrupt()?;
        let addr = lab.service_addr(svc, port)?;
        let want: Vec<&str> = expected.iter().map(String::as_str).collect();
        lab.wait_programmed(client, *proto, addr, &want, Duration::from_secs(30))?;
        waited.push(format!("{svc}/{port} {} ms", t.elapsed().as_millis()));
    }
    progress.step(format!("Services programmed on node-0 (reached from {client}: {})", waited.join(", ")));

    let mut rows = Vec::new();
    for (svc, port, proto, from, expected) in plan {
        check_interrupt()?;
        let target = lab.service_addr(svc, port)?;
        let probes = lab.probe(from.clone(), proto, &[target], cli.requests)?;
        let from = match from {
            Place::Pod(p) => p,
            Place::Node(i) => format!("node-{i} process"),
            other => format!("{other:?}"),
        };
        rows.push(Row { service: svc.to_string(), target, proto, from, probes, expected });
    }
    progress.step(format!("sent {} requests per row", cli.requests));
    print_table(&rows, cli.requests);

    check_interrupt()?;
    progress.step(format!(
        "latency: {} sequential connect+request+reply each, ClusterIP vs the same pods by IP",
        cli.latency_requests
    ));
    let vip = [lab.service_addr("web", "tcp")?];
    let direct: Vec<SocketAddr> = lab.pods().iter().map(|p| SocketAddr::new(p.ip4.into(), 8080)).collect();
    let via_pods = latency(lab, client, &direct, cli.latency_requests)?;
    check_interrupt()?;
    let via_vip = latency(lab, client, &vip, cli.latency_requests)?;
    let q = |v: &[u64], x: f64| quantile(v, x).unwrap_or(0);
    println!("{:<28} {:>9} {:>9} {:>9} {:>12} {:>7}", "LATENCY (us)", "p50", "p90", "p99", "connect p50", "failed");
    for (name, l) in [("pod IPs directly", &via_pods), ("ClusterIP (socket LB)", &via_vip)] {
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>12} {:>7}",
            name,
            q(&l.total, 0.5),
            q(&l.total, 0.9),
            q(&l.total, 0.99),
            q(&l.connect, 0.5),
            l.failures
        );
    }
    let ratio = |x: f64| q(&via_vip.total, x) as f64 / q(&via_pods.total, x).max(1) as f64;
    println!("{:<28} {:>9.2} {:>9.2} {:>9.2}", "ratio ClusterIP / direct", ratio(0.5), ratio(0.9), ratio(0.99));
    println!();

    let metrics = lab.metrics(0)?;
    let syncs =
        e2e::metric_value(&metrics, "kubeproxy_sync_proxy_rules_duration_seconds_count", &[("ip_family", "IPv4")])
            .unwrap_or(0.0);
    let bad: Vec<&Row> = rows.iter().filter(|r| !r.ok()).collect();
    println!("SUMMARY");
    println!(
        "  {} of {} rows answered by exactly the expected pods with no failures",
        rows.len() - bad.len(),
        rows.len()
    );
    println!("  pods saw the client's own address (no SNAT); replies came from the ClusterIP (reverse translation)");
    println!(
        "  ClusterIP p50 {} us vs pod IP p50 {} us (x{:.2}); node-0 kube-proxy synced IPv4 {} times",
        q(&via_vip.total, 0.5),
        q(&via_pods.total, 0.5),
        ratio(0.5),
        syncs
    );
    for r in &bad {
        println!(
            "  PROBLEM: {} {} from {}: answered by {:?}, expected {:?}, {} failed",
            r.service,
            r.target,
            r.from,
            r.answered(),
            r.expected,
            r.failures()
        );
    }
    if !bad.is_empty() || via_vip.failures + via_pods.failures > 0 {
        bail!("the demo saw problems (see SUMMARY)");
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    e2e::lab::install_interrupt_handlers();
    let result = match &cli.cmd {
        None | Some(Cmd::Demo) => demo(&cli),
        Some(Cmd::Cleanup { all_stale }) => {
            if *all_stale {
                Lab::cleanup_stale().map(|r| {
                    eprintln!(
                        "removed {} namespaces, {} cgroups, {} pin directories of dead labs",
                        r.netns.len(),
                        r.cgroups.len(),
                        r.pins.len()
                    );
                })
            } else {
                Err(anyhow::anyhow!("cleanup needs --all-stale"))
            }
        }
    };
    if let Err(e) = result {
        eprintln!("lab-driver: {e:#}");
        std::process::exit(1);
    }
}
