//! Runs the proxy: API client, servers, tracker, backend, runner and watchers, until a watch ends, the config
//! file changes or a signal arrives.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use proxier::events::{EventRecorder, EventType};
use proxier::healthcheck::{ProxyHealth, ServiceHealthServer};
use proxier::metrics::Metrics;
use proxier::observe::ProxyObserver;
use proxier::runner::{FULL_SYNC_PERIOD, RunnerConfig, SyncRunner};
use proxier::tracker::ChangeTracker;
use tokio::sync::mpsc;

use crate::backends;
use crate::metrics_server::{self, MetricsServerState};
use crate::options::ProxyRunConfig;

/// Builds the API client from `--kubeconfig`/`clientConnection.kubeconfig` and `--master`, or the in-cluster
/// service account when neither is given, as upstream does.
pub async fn kube_client(run: &ProxyRunConfig) -> anyhow::Result<kube::Client> {
    let kubeconfig = run.config.client_connection.kubeconfig.trim();
    let master = run.master.as_deref().filter(|m| !m.is_empty());
    let mut config = if !kubeconfig.is_empty() {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading kubeconfig {kubeconfig}"))?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {kubeconfig}"))?
    } else if let Some(m) = master {
        kube::Config::new(m.parse().with_context(|| format!("parsing --master {m:?}"))?)
    } else {
        tracing::warn!("Neither --kubeconfig nor --master was specified. Using the inClusterConfig.");
        kube::Config::incluster().context("building in-cluster config")?
    };
    if let (Some(m), false) = (master, kubeconfig.is_empty()) {
        config.cluster_url = m.parse().with_context(|| format!("parsing --master {m:?}"))?;
    }
    kube::Client::try_from(config).context("building the API client")
}

/// The node addresses health-check node ports listen on: all addresses when `nodePortAddresses` is unset or
/// matches everything, else the local interface addresses inside the given CIDRs.
fn health_check_addresses(run: &ProxyRunConfig) -> Vec<IpAddr> {
    let cidrs: Vec<ipnet::IpNet> = run.node_port_addresses().iter().filter_map(|s| s.parse().ok()).collect();
    if cidrs.is_empty() || cidrs.iter().any(|c| c.prefix_len() == 0) {
        return vec![];
    }
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let ip = a.address.as_ref().and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            if let Some(ip) = ip.filter(|ip| cidrs.iter().any(|c| c.contains(ip))) {
                out.push(ip);
            }
        }
    }
    out
}

/// Writes `-999`-style OOM score adjustment for this process (best effort, as upstream).
fn set_oom_score_adj(value: Option<i32>) {
    if let Some(v) = value
        && let Err(e) = std::fs::write("/proc/self/oom_score_adj", v.to_string())
    {
        tracing::warn!(value = v, error = %e, "Failed to set oom_score_adj");
    }
}

/// Exits the process (through `tx`) when the config file is written or replaced, like upstream: the
/// DaemonSet restarts us with the new content.
fn watch_config_file(
    path: &Path,
    tx: mpsc::UnboundedSender<anyhow::Error>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let shown = path.display().to_string();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(ev) if matches!(ev.kind, EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Create(_)) => {
            let _ = tx.send(anyhow::anyhow!("content of the proxy server's configuration file was updated"));
        }
        Ok(_) => {}
        Err(e) => {
            let _ = tx.send(anyhow::anyhow!("watching config file {shown}: {e}"));
        }
    })
    .context("creating the config file watcher")?;
    watcher
        .watch(path, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching config file {}", path.display()))?;
    Ok(watcher)
}

/// Runs the proxy until something ends it; an `Err` means exit 1.
pub async fn run(run: ProxyRunConfig) -> anyhow::Result<()> {
    let mode = backends::mode_name(run.mode);
    if run.mode == crate::config::ProxyMode::Nftables {
        bail!("proxy mode \"nftables\" is not built yet in kube-proxy-rs; use --proxy-mode=ebpf or iptables");
    }
    tracing::info!(mode, node = %run.hostname, version = %crate::options::version_string(), "Starting kube-proxy");
    set_oom_score_adj(run.config.oom_score_adj);

    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<anyhow::Error>();
    let _config_watch = match &run.config_file {
        Some(p) => Some(watch_config_file(p, fatal_tx.clone())?),
        None => None,
    };

    let client = kube_client(&run).await?;
    let events = EventRecorder::start(client.clone(), &run.hostname, &tokio::runtime::Handle::current());
    let result = run_with(run, mode, client, &events, fatal_tx, &mut fatal_rx).await;
    // The event explaining an exit (a server that cannot bind) gets a moment to reach the API server.
    events.flush(std::time::Duration::from_secs(2)).await;
    result
}

async fn run_with(
    run: ProxyRunConfig,
    mode: &'static str,
    client: kube::Client,
    events: &EventRecorder,
    fatal_tx: mpsc::UnboundedSender<anyhow::Error>,
    fatal_rx: &mut mpsc::UnboundedReceiver<anyhow::Error>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new(mode);
    let backends::BuiltBackend { backend, ebpf_metrics } = backends::build(&run, &metrics)?;
    let families = backend.families().to_vec();
    if let Some(c) = ebpf_metrics
        && let Err(e) = c.register(metrics.registry())
    {
        tracing::warn!(error = %e, "Registering eBPF metrics failed");
    }
    let health = Arc::new(ProxyHealth::new(&families, run.sync_period()));

    if let Some(addr) = run.metrics_bind_address() {
        let state = MetricsServerState {
            metrics: metrics.clone(),
            proxy_mode: mode.to_string(),
            configz: Arc::new(run.configz_json().to_string()),
        };
        let (tx, ev) = (fatal_tx.clone(), events.clone());
        let hard_fail = run.config.bind_address_hard_fail;
        tokio::spawn(async move {
            if let Err(e) = metrics_server::serve(addr, state, hard_fail).await {
                ev.node_event(EventType::Warning, "FailedToStartMetricServer", "StartKubeProxy", e.to_string());
                let _ = tx.send(e.into());
            }
        });
    }
    if let Some(addr) = run.healthz_bind_address() {
        let (h, m, tx, ev) = (health.clone(), metrics.clone(), fatal_tx.clone(), events.clone());
        let hard_fail = run.config.bind_address_hard_fail;
        tokio::spawn(async move {
            let Err(e) = proxier::healthcheck::serve_proxy_health(addr, h, m, hard_fail).await;
            ev.node_event(EventType::Warning, "FailedToStartProxierHealthcheck", "StartKubeProxy", e.to_string());
            let _ = tx.send(e.into());
        });
    }

    let service_health = ServiceHealthServer::new(
        run.hostname.clone(),
        health_check_addresses(&run),
        health.clone(),
        tokio::runtime::Handle::current(),
    );
    let observer = Arc::new(
        ProxyObserver::new(metrics.clone(), health.clone(), Some(service_health), families).with_events(events.clone()),
    );
    let gate = run.feature_gates.get("PreferSameTrafficDistribution").copied().unwrap_or(true);
    let tracker = Arc::new(ChangeTracker::new(&run.hostname, gate, observer.clone()));
    let runner_cfg = RunnerConfig {
        min_sync_period: run.min_sync_period(),
        sync_period: run.sync_period(),
        full_sync_period: FULL_SYNC_PERIOD,
    };
    let runner =
        SyncRunner::new(tracker.clone(), backend, observer, runner_cfg).spawn().context("starting sync runner")?;

    let node = run.hostname.clone();
    let watch_tracker = tracker.clone();
    let watchers = tokio::spawn(async move { proxier::watch::run_watchers(client, watch_tracker, &node).await });
    // Upstream's "birth cry", once the watches run.
    events.node_event(EventType::Normal, "Starting", "StartKubeProxy", "");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let result = tokio::select! {
        e = fatal_rx.recv() => Err(e.unwrap_or_else(|| anyhow::anyhow!("internal channel closed"))),
        w = watchers => match w {
            Ok(ended) => Err(ended.into()),
            Err(e) => Err(anyhow::anyhow!("watchers task failed: {e}")),
        },
        _ = sigterm.recv() => { tracing::info!("SIGTERM received; exiting"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { tracing::info!("Interrupted; exiting"); Ok(()) }
    };
    tracker.shutdown();
    let _ = tokio::task::spawn_blocking(move || runner.join()).await;
    result
}

/// Resolves `--cgroup-root`: the given path, or the cgroup2 mount point.
pub fn cgroup_root(configured: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match configured {
        Some(p) => Ok(p.clone()),
        None => proxy_ebpf::detect_cgroup2_mount().context("no --cgroup-root given"),
    }
}
