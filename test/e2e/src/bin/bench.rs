//! The benchmark (`hack/bench.sh`): for each backend and each number of Services, the real kube-proxy in the
//! lab — full-sync time, endpoint-update latency, per-connection latency and short-connection throughput via
//! the ClusterIP against the pod IPs, one bulk TCP stream, and the proxy's cost. Writes `results.json`,
//! `meta.json`, `results.md` and PNG plots into `--out`; see BENCHMARKS.md.
//!
//! `--quick` is the reduced matrix for CI (N ≤ 1k, fewer repetitions, under 3 minutes). `bench agent ...` is
//! the probe the bench runs inside pods (not for direct use).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use e2e::bench::agent::{self, AgentCmd};
use e2e::bench::run::{Options, Progress, run};
use e2e::bench::{Meta, Row, machine_description, report};
use e2e::lab::{Lab, skip_reason};

#[derive(Parser, Debug)]
#[command(about = "kube-proxy-rs benchmark: every backend at growing Service counts, in the lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Reduced matrix for CI smoke runs: N in {100, 1000}, 2 repetitions, short runs (under 3 minutes).
    #[arg(long)]
    quick: bool,
    /// Results directory (results/ is git-ignored).
    #[arg(long, default_value = "results/bench")]
    out: PathBuf,
    /// Backends (`--proxy-mode` values); one that is not built yet is skipped with a note.
    #[arg(long, value_delimiter = ',', default_value = "ebpf,iptables")]
    backends: Vec<String>,
    /// Numbers of Services [default: 100,1000,10000,30000,100000; --quick: 100,1000].
    #[arg(long, value_delimiter = ',')]
    scales: Option<Vec<usize>>,
    /// Endpoints per Service (on the lab's real pods, shared by all Services).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Repetitions of each measurement [default: 3; --quick: 2].
    #[arg(long)]
    reps: Option<usize>,
    /// Endpoint updates per cell [default: 200; --quick: 30].
    #[arg(long)]
    updates: Option<usize>,
    /// Sequential connections per latency run and series [default: 10000; --quick: 1000].
    #[arg(long)]
    conn_count: Option<usize>,
    /// Concurrent clients of the throughput runs.
    #[arg(long, default_value_t = 4)]
    rps_clients: usize,
    /// Seconds per throughput run [default: 3; --quick: 1].
    #[arg(long)]
    rps_secs: Option<u64>,
    /// Seconds per iperf3 run [default: 5; --quick: 1].
    #[arg(long)]
    bulk_secs: Option<u64>,
    /// Bound of one full sync in seconds [default: 600; --quick: 60].
    #[arg(long)]
    full_sync_timeout: Option<u64>,
    /// Skip the PNG plots.
    #[arg(long)]
    no_plots: bool,
    /// Directory with kube-proxy, kpctl, lab-echo and lab-client (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Extra kube-proxy flag (repeatable).
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// Print the lab's own progress lines too.
    #[arg(long)]
    verbose: bool,
    /// Do not let the client pod reuse TIME_WAIT ports (net.ipv4.tcp_tw_reuse=0 in its namespace).
    #[arg(long)]
    no_tw_reuse: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The in-pod probe (run by the bench itself).
    #[command(subcommand, hide = true)]
    Agent(AgentCmd),
    /// Combine the results of earlier runs (`--out` of each) into one set: results.json, results.md, plots.
    Merge {
        /// Where the combined results go.
        #[arg(long)]
        out: PathBuf,
        /// Result directories, earlier first (a later row replaces an earlier one for the same cell).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Remove namespaces, cgroups and pins of labs whose process is gone.
    Cleanup {
        /// Required, to make the intent explicit.
        #[arg(long)]
        all_stale: bool,
    },
}

fn options(cli: &Cli) -> Result<Options> {
    let q = cli.quick;
    let pick = |v: Option<u64>, full: u64, quick: u64| v.unwrap_or(if q { quick } else { full });
    let mut scales = cli
        .scales
        .clone()
        .unwrap_or_else(|| if q { vec![100, 1000] } else { vec![100, 1000, 10_000, 30_000, 100_000] });
    scales.sort_unstable();
    scales.dedup();
    if scales.is_empty() || scales[0] == 0 {
        bail!("--scales needs positive numbers");
    }
    Ok(Options {
        backends: cli.backends.clone(),
        scales,
        endpoints: cli.endpoints,
        reps: pick(cli.reps.map(|r| r as u64), 3, 2).max(1) as usize,
        updates: pick(cli.updates.map(|r| r as u64), 200, 30) as usize,
        update_budget: Duration::from_secs(if q { 20 } else { 180 }),
        conn_count: pick(cli.conn_count.map(|r| r as u64), 10_000, 1_000).max(10) as usize,
        rps_clients: cli.rps_clients.clamp(1, 64),
        rps_duration: Duration::from_secs(pick(cli.rps_secs, 3, 1).max(1)),
        bulk_duration: Duration::from_secs(pick(cli.bulk_secs, 5, 1).max(1)),
        full_sync_timeout: Duration::from_secs(pick(cli.full_sync_timeout, 600, 60).max(5)),
        bin_dir: cli.bin_dir.clone(),
        self_exe: std::env::current_exe().context("current_exe")?,
        proxy_args: cli.proxy_args.clone(),
        verbose: cli.verbose,
        tw_reuse: !cli.no_tw_reuse,
        interrupted: &e2e::lab::INTERRUPTED,
    })
}

fn bench(cli: &Cli) -> Result<()> {
    if let Some(reason) = skip_reason() {
        bail!("cannot run the bench here: {reason}");
    }
    let opts = options(cli)?;
    let progress = Progress::new();
    let stale = Lab::cleanup_stale().context("removing leftovers of earlier labs")?;
    if !stale.is_empty() {
        progress.step(format!("removed leftovers of dead labs: {stale:?}"));
    }
    let mut meta = Meta {
        scales: opts.scales.clone(),
        endpoints: opts.endpoints,
        quick: cli.quick,
        machine: machine_description(),
        ..Meta::default()
    };
    progress.step(format!(
        "bench: backends {:?}, N {:?}, {} endpoints each, {} reps, {} updates, {} connections per latency run; \
         results in {}",
        opts.backends,
        opts.scales,
        opts.endpoints,
        opts.reps,
        opts.updates,
        opts.conn_count,
        cli.out.display()
    ));
    progress.step(format!("machine: {}", meta.machine));
    let out = cli.out.clone();
    let mut save = |rows: &[Row], meta: &Meta| {
        let mut m = meta.clone();
        m.seconds = progress.elapsed();
        if let Err(e) = report::write_data(&out, rows, &m) {
            eprintln!("bench: writing results: {e:#}");
        }
    };
    let rows = run(&opts, &progress, &mut meta, &mut save);
    meta.seconds = progress.elapsed();
    report::write_data(&cli.out, &rows, &meta)?;
    if !cli.no_plots && !rows.is_empty() {
        match report::plots(&cli.out, &rows) {
            Ok(pngs) => progress.step(format!(
                "plots: {}",
                pngs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )),
            Err(e) => progress.step(format!("no plots: {e:#}")),
        }
    }
    println!("\n{}", report::markdown(&rows, &meta));
    println!("{}", report::summary(&rows, &meta));
    progress.step(format!("results: {}/results.json, results.md, meta.json", cli.out.display()));
    if e2e::lab::INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (partial results written)");
    }
    if meta.backends.is_empty() {
        bail!("no backend ran");
    }
    Ok(())
}

fn merge(out: &std::path::Path, dirs: &[PathBuf]) -> Result<()> {
    let (rows, meta) = report::merge(dirs)?;
    report::write_data(out, &rows, &meta)?;
    let pngs = report::plots(out, &rows)?;
    println!("{}", report::markdown(&rows, &meta));
    println!("{}", report::summary(&rows, &meta));
    eprintln!("merged {} rows into {} ({} plots)", rows.len(), out.display(), pngs.len());
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Some(Cmd::Agent(cmd)) => {
            agent::main(cmd.clone());
            return;
        }
        Some(Cmd::Merge { out, dirs }) => merge(out, dirs),
        Some(Cmd::Cleanup { all_stale: true }) => Lab::cleanup_stale().map(|r| {
            eprintln!(
                "removed {} namespaces, {} cgroups, {} pin directories of dead labs",
                r.netns.len(),
                r.cgroups.len(),
                r.pins.len()
            );
        }),
        Some(Cmd::Cleanup { all_stale: false }) => Err(anyhow::anyhow!("cleanup needs --all-stale")),
        None => {
            e2e::lab::install_interrupt_handlers();
            bench(&cli)
        }
    };
    if let Err(e) = result {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}
