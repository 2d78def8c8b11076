//! The metrics server on `--metrics-bind-address`: `/metrics`, `/healthz` (a plain ping, not the proxier
//! health), `/proxyMode` and `/configz`, as upstream serves them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use proxier::metrics::{CONTENT_TYPE, Metrics};

/// What the metrics server serves besides the metrics themselves.
#[derive(Clone)]
pub struct MetricsServerState {
    /// The registry to encode.
    pub metrics: Arc<Metrics>,
    /// `/proxyMode` body (`ebpf`, `iptables`, ...).
    pub proxy_mode: String,
    /// `/configz` body.
    pub configz: Arc<String>,
}

fn text(body: String, content_type: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

/// The router, separate from binding so tests can serve it on any listener.
pub fn router(state: MetricsServerState) -> Router {
    let m = state.metrics.clone();
    let mode = state.proxy_mode.clone();
    let configz = state.configz.clone();
    Router::new()
        .route("/metrics", any(move || async move { text(m.encode(), CONTENT_TYPE) }))
        .route("/healthz", any(|| async { text("ok".into(), "text/plain; charset=utf-8") }))
        .route("/proxyMode", any(move || async move { text(mode.clone(), "text/plain; charset=utf-8") }))
        .route("/configz", any(move || async move { text(configz.to_string(), "application/json") }))
}

/// Error starting the metrics server with `bindAddressHardFail`.
#[derive(Debug, thiserror::Error)]
#[error("failed to start metrics server on {addr}: {source}")]
pub struct MetricsServerError {
    /// The address that could not be bound.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` and serves forever; a failed bind is retried every 5 s unless `hard_fail`, as upstream does.
pub async fn serve(addr: SocketAddr, state: MetricsServerState, hard_fail: bool) -> Result<(), MetricsServerError> {
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(address = %addr, "Starting metrics server");
                if let Err(e) = axum::serve(listener, router(state.clone())).await {
                    tracing::error!(address = %addr, error = %e, "Metrics server failed");
                }
            }
            Err(source) if hard_fail => return Err(MetricsServerError { addr, source }),
            Err(e) => tracing::error!(address = %addr, error = %e, "Failed to start metrics server; retrying in 5s"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
