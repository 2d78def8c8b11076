//! kube-proxy's health endpoints (upstream `pkg/proxy/healthcheck`).
//!
//! * [`proxy_health`]: the proxier health state machine and the `/healthz` + `/livez` server
//!   (`--healthz-bind-address`, default `0.0.0.0:10256`).
//! * [`service_health`]: one HTTP listener per `externalTrafficPolicy: Local` LoadBalancer Service on its
//!   `healthCheckNodePort`, answering with the number of local ready endpoints.
//!
//! Both speak plain HTTP/1.1 through hyper, with Go's `net/http` behaviour where clients can see it.

pub mod proxy_health;
pub mod service_health;

pub use proxy_health::{
    Clock, FakeClock, HealthServerError, HealthStatus, NodeState, ProxierHealth, ProxyHealth, SystemClock,
    TO_BE_DELETED_TAINT, go_rfc3339_nano, serve_proxy_health, serve_proxy_health_on,
};
pub use service_health::{ListenFailure, ProxierHealthChecker, ServiceHealthServer};

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A response body: always small and fully built before sending.
pub(crate) type Body = Full<Bytes>;

/// Builds a response from the request head; every handler here is synchronous.
pub(crate) type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Body> + Send + Sync>;

/// `X-Content-Type-Options`, set on every response as upstream does.
pub(crate) const X_CONTENT_TYPE_OPTIONS: &str = "x-content-type-options";

/// A response with `status`, `content_type`, `X-Content-Type-Options: nosniff` and `body`.
pub(crate) fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// Go's `http.NotFound`: what a `ServeMux` answers for an unregistered path.
pub(crate) fn not_found() -> Response<Body> {
    response(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n")
}

/// Binds like Go's `net.Listen("tcp", addr)`: a wildcard address (`0.0.0.0` or `::`) becomes one dual-stack
/// socket on `[::]`, falling back to `0.0.0.0` when the host has no IPv6.
pub(crate) fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = if addr.ip().is_unspecified() {
        match std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port()))) {
            Ok(l) => l,
            // EAFNOSUPPORT / EADDRNOTAVAIL: IPv6 is disabled; anything else (EADDRINUSE) is the real answer.
            Err(e) if matches!(e.raw_os_error(), Some(97) | Some(99)) => {
                std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))?
            }
            Err(e) => return Err(e),
        }
    } else {
        std::net::TcpListener::bind(addr)?
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves HTTP/1.1 on `listener` with `handler` until `shutdown` completes; then the listener and every open
/// connection are closed at once (Go's `http.Server.Close`, not a graceful drain).
pub(crate) async fn serve_listener(listener: TcpListener, handler: Handler, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let handler = handler.clone();
                    conns.spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let resp = handler(&req);
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .serve_connection(TokioIo::new(stream), svc);
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Like Go's Serve on a temporary error (e.g. EMFILE): back off briefly and keep serving.
                    tracing::warn!(error = %e, "Failed to accept connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}
