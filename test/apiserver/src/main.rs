//! `test-apiserver`: the in-process test API server as a standalone process for the lab.
//!
//! Prints its URL on stdout once it listens, optionally writes a kubeconfig, and serves until SIGINT/SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use test_apiserver::{ApiServer, Config};

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "test-apiserver", about = "In-process Kubernetes API server for tests, the lab and benchmarks")]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Watch events kept per resource; watches from older revisions get 410 Gone.
    #[arg(long, default_value_t = Config::default().history_limit)]
    history_limit: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config {
        history_limit: args.history_limit,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_secs),
        ..Config::default()
    };
    let server = ApiServer::start_with(args.listen, config).await.context("starting the server")?;
    if let Some(path) = &args.kubeconfig_out {
        server.write_kubeconfig(path).with_context(|| format!("writing {}", path.display()))?;
    }
    // The URL on stdout is the startup handshake for scripts; flush so they see it immediately.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", server.url())?;
    stdout.flush()?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    server.shutdown();
    Ok(())
}
