//! Health-check node ports for `type: LoadBalancer` + `externalTrafficPolicy: Local` Services (upstream
//! `pkg/proxy/healthcheck/service_health.go`).
//!
//! Cloud load balancers probe `<node>:<healthCheckNodePort>` and send traffic only to nodes answering 200,
//! i.e. nodes with at least one local ready endpoint while the proxy itself is healthy. The server is driven
//! from the (synchronous) sync runner: listeners are bound synchronously, so failures are reported by the
//! call that caused them, and served by tasks spawned on a tokio runtime [`Handle`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::proxy_health::ProxyHealth;
use super::{Body, Handler, bind_std, response, serve_listener};
use crate::model::{HealthCheckService, NamespacedName, Snapshot};

/// Header telling load balancers how many local endpoints this node has.
const ENDPOINT_WEIGHT_HEADER: &str = "x-load-balancing-endpoint-weight";

/// How long closing a listener waits for its task to let go of the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the service health server asks of the proxy health (upstream's `proxierHealthChecker`).
pub trait ProxierHealthChecker: Send + Sync {
    /// The proxy is healthy, ignoring Node eligibility.
    fn is_healthy(&self) -> bool;
}

impl ProxierHealthChecker for ProxyHealth {
    fn is_healthy(&self) -> bool {
        ProxyHealth::is_healthy(self)
    }
}

/// A health-check port that could not be opened; the caller should emit a Warning event on the Service
/// with [`ListenFailure::REASON`], [`ListenFailure::ACTION`] and [`ListenFailure::message`]. The service is
/// retried on the next [`ServiceHealthServer::sync_services`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenFailure {
    /// The Service.
    pub service: NamespacedName,
    /// Its `healthCheckNodePort`.
    pub port: u16,
    /// The listen error.
    pub error: String,
    /// Upstream's event message: `node <node> failed to start healthcheck "<ns>/<name>" on port <port>: <err>`.
    pub message: String,
}

impl ListenFailure {
    /// The event reason.
    pub const REASON: &'static str = "FailedToStartServiceHealthcheck";
    /// The event action.
    pub const ACTION: &'static str = "Listen";
}

/// One open listener: its task stops when `shutdown` is dropped and reports on `done` once the socket is closed.
struct Listener {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    done: mpsc::Receiver<()>,
}

impl Listener {
    fn close(mut self) {
        drop(self.shutdown.take());
        // Wait until the port is free so it can be reused in the same sync, unless we are on a runtime
        // thread, where blocking could starve the very task we wait for.
        if Handle::try_current().is_err() && self.done.recv_timeout(CLOSE_TIMEOUT).is_err() {
            tracing::warn!(address = %self.addr, "Healthcheck listener did not close in time");
        }
    }
}

struct Instance {
    port: u16,
    endpoints: usize,
    listeners: Vec<Listener>,
}

type Services = Arc<Mutex<BTreeMap<NamespacedName, Instance>>>;

/// Upstream's `ServiceHealthServer`: one HTTP listener per Service and node address.
pub struct ServiceHealthServer {
    node_name: String,
    node_ips: Vec<IpAddr>,
    health: Arc<dyn ProxierHealthChecker>,
    handle: Handle,
    services: Services,
}

fn lock(services: &Services) -> MutexGuard<'_, BTreeMap<NamespacedName, Instance>> {
    // Every update is a plain assignment, so a panicked holder cannot leave the map inconsistent.
    services.lock().unwrap_or_else(|e| e.into_inner())
}

impl ServiceHealthServer {
    /// A server for node `node_name` listening on `node_ips` (the addresses `nodePortAddresses` selects).
    /// An empty list, or one containing an unspecified address, means all addresses of both families: a
    /// single dual-stack listener per Service, as upstream does when `nodePortAddresses` matches all.
    pub fn new(
        node_name: impl Into<String>,
        node_ips: Vec<IpAddr>,
        health: Arc<dyn ProxierHealthChecker>,
        handle: Handle,
    ) -> Self {
        let node_ips = if node_ips.is_empty() || node_ips.iter().any(IpAddr::is_unspecified) {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            let mut ips = node_ips;
            ips.sort();
            ips.dedup();
            ips
        };
        ServiceHealthServer {
            node_name: node_name.into(),
            node_ips,
            health,
            handle,
            services: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// The addresses listeners are opened on.
    pub fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    /// The Services with open listeners, with their ports.
    pub fn services(&self) -> BTreeMap<NamespacedName, u16> {
        lock(&self.services).iter().map(|(n, i)| (n.clone(), i.port)).collect()
    }

    /// Makes `new` the set of served Services: closes listeners of Services that are gone or changed port,
    /// opens listeners for new ones and leaves the rest alone. Returns the Services whose listeners could not
    /// be opened (the others are unaffected).
    ///
    /// Call it from a thread outside the runtime (the sync runner's): closing then waits until each removed
    /// listener has released its port. On a runtime thread closing is asynchronous, so a port handed from one
    /// Service to another in the same call may fail to bind once (and is retried on the next call).
    pub fn sync_services(&self, new: &BTreeMap<NamespacedName, u16>) -> Vec<ListenFailure> {
        let mut closing = Vec::new();
        lock(&self.services).retain(|nsn, inst| {
            let keep = new.get(nsn) == Some(&inst.port);
            if !keep {
                tracing::info!(service = %nsn, port = inst.port, "Closing healthcheck");
                closing.append(&mut inst.listeners);
            }
            keep
        });
        // Close outside the lock (handlers take it) and before opening, so a port that moved from one
        // Service to another can be bound again in this same sync.
        for l in closing {
            l.close();
        }

        let mut failures = Vec::new();
        let mut services = lock(&self.services);
        for (nsn, &port) in new {
            if services.contains_key(nsn) {
                tracing::debug!(service = %nsn, port, "Existing healthcheck");
                continue;
            }
            tracing::info!(service = %nsn, port, "Opening healthcheck");
            // Held lock: a request on the new listener waits until the instance is in the map.
            match self.listen_all(nsn, port) {
                Ok(listeners) => {
                    services.insert(nsn.clone(), Instance { port, endpoints: 0, listeners });
                }
                Err(error) => {
                    tracing::error!(node = %self.node_name, service = %nsn, port, %error, "Failed to start healthcheck");
                    let message = format!(
                        "node {} failed to start healthcheck \"{}\" on port {}: {}",
                        self.node_name, nsn, port, error
                    );
                    failures.push(ListenFailure { service: nsn.clone(), port, error, message });
                }
            }
        }
        failures
    }

    /// Sets the number of local ready endpoints per Service; Services missing from `new` get 0 and entries
    /// for Services without a listener are ignored (call [`sync_services`](Self::sync_services) first).
    pub fn sync_endpoints(&self, new: &BTreeMap<NamespacedName, usize>) {
        for (nsn, inst) in lock(&self.services).iter_mut() {
            let count = new.get(nsn).copied().unwrap_or(0);
            if inst.endpoints != count {
                tracing::debug!(service = %nsn, endpoint_count = count, "Reporting endpoints for healthcheck");
            }
            inst.endpoints = count;
        }
    }

    /// [`sync_services`](Self::sync_services) then [`sync_endpoints`](Self::sync_endpoints) from one family's
    /// `health_checks`.
    pub fn sync(&self, checks: &BTreeMap<NamespacedName, HealthCheckService>) -> Vec<ListenFailure> {
        let ports = checks.iter().map(|(n, c)| (n.clone(), c.port)).collect();
        let failures = self.sync_services(&ports);
        self.sync_endpoints(&checks.iter().map(|(n, c)| (n.clone(), c.local_endpoints)).collect());
        failures
    }

    /// [`sync`](Self::sync) from both families of a snapshot. One listener serves both families, so a
    /// dual-stack Service reports the larger of its two local endpoint counts (a dual-stack pod has one
    /// address of each family and must not count twice).
    pub fn sync_snapshot(&self, snapshot: &Snapshot) -> Vec<ListenFailure> {
        let mut merged: BTreeMap<NamespacedName, HealthCheckService> = snapshot.v4.health_checks.clone();
        for (nsn, check) in &snapshot.v6.health_checks {
            merged
                .entry(nsn.clone())
                .and_modify(|m| m.local_endpoints = m.local_endpoints.max(check.local_endpoints))
                .or_insert_with(|| check.clone());
        }
        self.sync(&merged)
    }

    /// Opens `port` on every node address; on any failure closes what was opened and returns the error.
    fn listen_all(&self, nsn: &NamespacedName, port: u16) -> Result<Vec<Listener>, String> {
        let mut listeners = Vec::with_capacity(self.node_ips.len());
        for &ip in &self.node_ips {
            let addr = SocketAddr::new(ip, port);
            let bound = {
                // Converting to a tokio listener needs the runtime's reactor.
                let _guard = self.handle.enter();
                bind_std(addr).and_then(tokio::net::TcpListener::from_std)
            };
            let listener = match bound {
                Ok(l) => l,
                Err(e) => {
                    // Free the other addresses so a retry (or another owner of the port) can have them.
                    for l in listeners {
                        Listener::close(l);
                    }
                    return Err(format!("listen tcp {addr}: {e}"));
                }
            };
            let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
            let (done_tx, done_rx) = mpsc::sync_channel(1);
            let handler = self.handler(nsn.clone());
            let service = nsn.clone();
            self.handle.spawn(async move {
                tracing::debug!(%service, address = %addr, "Starting healthcheck listener");
                serve_listener(listener, handler, async {
                    let _ = shutdown_rx.await;
                })
                .await;
                tracing::debug!(%service, address = %addr, "Healthcheck closed");
                let _ = done_tx.send(());
            });
            listeners.push(Listener { addr, shutdown: Some(shutdown_tx), done: done_rx });
        }
        Ok(listeners)
    }

    fn handler(&self, nsn: NamespacedName) -> Handler {
        // Weak: the map owns the listeners' shutdown handles, so a strong reference from their tasks back to
        // the map would keep both alive forever.
        let services: Weak<Mutex<_>> = Arc::downgrade(&self.services);
        let health = self.health.clone();
        Arc::new(move |_req| {
            let count = services.upgrade().and_then(|s| lock(&s).get(&nsn).map(|i| i.endpoints));
            let Some(count) = count else {
                // A request that raced with closing: upstream writes nothing, i.e. an empty 200.
                tracing::error!(service = %nsn, "Received request for closed healthcheck");
                return Response::new(Full::new(Bytes::new()));
            };
            service_response(&nsn, count, health.is_healthy())
        })
    }
}

impl Drop for ServiceHealthServer {
    /// Closes every listener.
    fn drop(&mut self) {
        let instances = std::mem::take(&mut *lock(&self.services));
        for l in instances.into_values().flat_map(|i| i.listeners) {
            l.close();
        }
    }
}

/// The response for a Service with `count` local endpoints: 200 iff there are some and the proxy is healthy.
fn service_response(nsn: &NamespacedName, count: usize, proxy_healthy: bool) -> Response<Body> {
    let status = if count != 0 && proxy_healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        crate::gofmt::go_quote(nsn.namespace()),
        crate::gofmt::go_quote(nsn.name()),
        count,
        proxy_healthy
    );
    let mut resp = response(status, "application/json", body);
    resp.headers_mut().insert(ENDPOINT_WEIGHT_HEADER, HeaderValue::from(count));
    resp
}
