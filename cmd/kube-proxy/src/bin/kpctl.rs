//! `kpctl`: inspection of kube-proxy-rs's eBPF datapath, and the per-pod socket-LB opt-out.
//!
//! It opens the maps kube-proxy pinned under `--bpffs-root` and prints them; the only map it writes is the
//! opt-out list (`kpctl socket-lb skip|unskip`); it never loads a program or touches a link. Reading pinned maps needs the same privileges as bpftool (root or
//! CAP_BPF). The logic lives in `proxy_ebpf::inspect`; this binary only parses flags and prints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxy_ebpf::inspect::{self, DEFAULT_BPFFS_ROOT};
use proxy_ebpf::{AyaMaps, SkipMap, SocketLbScope, read_pinned_names, socklb};

/// Inspect the eBPF socket load balancer of kube-proxy-rs; exclude pods from socket LB.
///
/// kpctl opens the maps kube-proxy pinned under --bpffs-root and prints them. Only `socket-lb skip` and
/// `socket-lb unskip` write (the opt-out list); kpctl never loads a program or touches a link. Pinned
/// maps need root (or CAP_BPF).
#[derive(Debug, Parser)]
#[command(
    name = "kpctl",
    version,
    after_help = "Examples:\n  kpctl services\n  kpctl services --json\n  kpctl maps --bpffs-root /sys/fs/bpf/kube-proxy-rs\n  kpctl socket-lb skip --netns /run/netns/cni-1234"
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
    /// Exclude a pod's network namespace from socket load balancing (kube-proxy --socket-lb-scope=opt-out).
    ///
    /// An excluded pod's connect() keeps the ClusterIP (what sidecar meshes such as Istio need); its packets
    /// are translated per packet on the node instead. Meant for a chained CNI plugin (ADD: skip, DEL: unskip)
    /// or an admission hook.
    #[command(name = "socket-lb", subcommand)]
    SocketLb(SocketLbCommand),
}

#[derive(Debug, Subcommand)]
enum SocketLbCommand {
    /// Stop translating the sockets of a network namespace at connect()/sendmsg().
    Skip {
        /// The pod's network namespace: /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long, value_name = "PATH")]
        netns: PathBuf,
    },
    /// Translate the sockets of a network namespace again.
    Unskip {
        /// The pod's network namespace: /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long, value_name = "PATH")]
        netns: PathBuf,
    },
    /// Print the scope kube-proxy runs with and the excluded namespaces' cookies.
    List,
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
        Command::SocketLb(cmd) => socket_lb(&cli.bpffs_root, cmd),
    }
}

fn socket_lb(bpffs_root: &Path, cmd: SocketLbCommand) -> Result<String, Box<dyn std::error::Error>> {
    let mut map = SkipMap::open(bpffs_root)?;
    let scope_note = |map: &SkipMap| match map.scope() {
        Some((SocketLbScope::OptOut, _)) => String::new(),
        Some((scope, _)) => format!(" (kube-proxy runs with --socket-lb-scope={scope}: the list has no effect)"),
        None => String::new(),
    };
    match cmd {
        SocketLbCommand::Skip { netns } => {
            let cookie = socklb::netns_cookie(&netns)?;
            map.skip(cookie)?;
            Ok(format!("skipped {} (netns cookie {cookie}){}\n", netns.display(), scope_note(&map)))
        }
        SocketLbCommand::Unskip { netns } => {
            let cookie = socklb::netns_cookie(&netns)?;
            let was = map.unskip(cookie)?;
            let what = if was { "unskipped" } else { "was not skipped:" };
            Ok(format!("{what} {} (netns cookie {cookie})\n", netns.display()))
        }
        SocketLbCommand::List => {
            let mut out = match map.scope() {
                Some((scope, host)) => format!("scope: {scope}\nhost netns cookie: {host}\n"),
                None => "scope: unknown (no KP_SOCK_LB_CFG pinned)\n".to_string(),
            };
            out.push_str("skipped netns cookies:\n");
            for c in map.list()? {
                out.push_str(&format!("{c}\n"));
            }
            Ok(out)
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
