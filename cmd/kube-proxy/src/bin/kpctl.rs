//! `kpctl`: read-only inspection of kube-proxy-rs's eBPF datapath.
//!
//! It opens the maps kube-proxy pinned under `--bpffs-root` and prints them; it never writes a map, loads
//! a program or touches a link. Reading pinned maps needs the same privileges as bpftool (root or
//! CAP_BPF). The logic lives in `proxy_ebpf::inspect`; this binary only parses flags and prints.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxy_ebpf::inspect::{self, DEFAULT_BPFFS_ROOT};
use proxy_ebpf::{AyaMaps, read_pinned_names};

/// Inspect the eBPF socket load balancer of kube-proxy-rs (read-only).
///
/// kpctl opens the maps kube-proxy pinned under --bpffs-root and prints them. It never writes a map,
/// loads a program or touches a link. Reading pinned maps needs root (or CAP_BPF).
#[derive(Debug, Parser)]
#[command(
    name = "kpctl",
    version,
    after_help = "Examples:\n  kpctl services\n  kpctl services --json\n  kpctl maps --bpffs-root /sys/fs/bpf/kube-proxy-rs"
)]
struct Cli {
    /// The directory kube-proxy pins its maps under (kube-proxy's --bpffs-root); maps are read from
    /// <DIR>/v1/maps/.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS_ROOT, global = true)]
    bpffs_root: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List programmed frontends with their type, flags, backends and counters.
    ///
    /// One row per frontend (ClusterIP, ExternalIP, LoadBalancer, NodePort), like `cilium service list`.
    /// FLAGS shows `local` (traffic policy Local: only node-local backends are listed, as the datapath
    /// selects) and `affinity=<n>s` (sessionAffinity ClientIP). Counters are per service port, so all
    /// frontends of one service show the same values. Service names come from the pinned KP_SVC_NAMES
    /// map; without it (a proxy predating it) SERVICE shows `-`.
    Services {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List every pinned map with its type, entry count, capacity and kernel memory.
    ///
    /// ENTRIES of a hash map is counted by walking its keys; arrays always report their capacity.
    /// MEMORY is the kernel's `memlock` accounting of the map (from /proc/self/fdinfo).
    Maps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn run(cli: Cli) -> Result<String, Box<dyn std::error::Error>> {
    let maps_dir = inspect::maps_dir(&cli.bpffs_root);
    if !maps_dir.is_dir() {
        // The common case (wrong root, proxy not running in ebpf mode) deserves a plain message.
        return Err(format!(
            "no maps pinned under {} (is kube-proxy running with --proxy-mode=ebpf and this --bpffs-root?)",
            maps_dir.display()
        )
        .into());
    }
    match cli.command {
        Command::Services { json } => {
            let maps = AyaMaps::from_pins(&cli.bpffs_root)?;
            let names = read_pinned_names(&cli.bpffs_root)?;
            let rows = inspect::list_services(&maps, &names)?;
            Ok(if json { serde_json::to_string_pretty(&rows)? + "\n" } else { inspect::format_services(&rows) })
        }
        Command::Maps { json } => {
            let stats = inspect::PinnedMaps::open(&cli.bpffs_root)?.stats()?;
            Ok(if json { serde_json::to_string_pretty(&stats)? + "\n" } else { inspect::format_maps(&stats) })
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Print the whole cause chain: the map error alone rarely says why (ENOENT, EPERM, …).
            let mut msg = format!("kpctl: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
