//! The proxier health state machine and its `/healthz` + `/livez` HTTP server (upstream
//! `pkg/proxy/healthcheck/proxy_health.go`).
//!
//! Per IP family the proxy records when rules were last synced (`updated`) and the oldest change still
//! waiting for a sync (`queued_update`). A family is unhealthy once such a change has waited at least the
//! health timeout (2 × `syncPeriod`). `/healthz` additionally requires the Node to be eligible (known, not
//! being deleted, not tainted `ToBeDeletedByClusterAutoscaler`); `/livez` does not.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use hyper::StatusCode;
use thiserror::Error;
use tokio::net::TcpListener;

use super::{Body, Handler, bind_std, not_found, response, serve_listener};
use crate::metrics::Metrics;
use crate::model::IpFamily;

/// The taint the Cluster Autoscaler puts on a Node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// How long to wait before binding the health server again after a failure (upstream's `wait.Until` period).
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// A source of the current time, injectable so tests can move time.
pub trait Clock: Send + Sync {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<SystemTime>,
}

impl FakeClock {
    /// A clock stopped at `now`.
    pub fn new(now: SystemTime) -> Self {
        FakeClock { now: Mutex::new(now) }
    }

    /// Sets the time.
    pub fn set(&self, now: SystemTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += d;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the health server needs to know about this proxy's Node object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeState {
    /// `metadata.deletionTimestamp` is set.
    pub deletion_timestamp: bool,
    /// `spec.taints` contains [`TO_BE_DELETED_TAINT`].
    pub to_be_deleted_taint: bool,
}

/// The health of one family's proxier (upstream's `ProxierHealth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxierHealth {
    /// When this family's rules were last synced.
    pub last_updated: SystemTime,
    /// No change has been waiting for the health timeout or longer.
    pub healthy: bool,
}

/// The health of the whole proxy (upstream's `ProxyHealth`), serialized as the `/healthz` and `/livez` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthStatus {
    /// The most recent update of any family; `None` (Go's zero time) before the first one.
    pub last_updated: Option<SystemTime>,
    /// When this status was computed.
    pub current_time: SystemTime,
    /// Node eligibility; only `/healthz` fills it in.
    pub node_eligible: Option<bool>,
    /// Every family is healthy.
    pub healthy: bool,
    /// Per-family health, for families that have been updated at least once.
    pub status: BTreeMap<IpFamily, ProxierHealth>,
}

impl HealthStatus {
    /// The body upstream sends: Go's `json.Marshal` of its struct (compact, fixed field order, RFC 3339
    /// times with trimmed nanoseconds, `nodeEligible` and an empty `status` omitted).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(256);
        let last = self.last_updated.map(go_rfc3339_nano).unwrap_or_else(|| GO_ZERO_TIME.to_string());
        let _ = write!(out, r#"{{"lastUpdated":"{last}","currentTime":"{}""#, go_rfc3339_nano(self.current_time));
        if let Some(eligible) = self.node_eligible {
            let _ = write!(out, r#","nodeEligible":{eligible}"#);
        }
        let _ = write!(out, r#","healthy":{}"#, self.healthy);
        if !self.status.is_empty() {
            out.push_str(r#","status":{"#);
            for (i, (family, h)) in self.status.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(
                    out,
                    r#""{}":{{"lastUpdated":"{}","healthy":{}}}"#,
                    family.as_str(),
                    go_rfc3339_nano(h.last_updated),
                    h.healthy
                );
            }
            out.push('}');
        }
        out.push('}');
        out
    }
}

/// How Go's JSON encoding prints the zero `time.Time`.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Formats `t` in UTC like Go's `time.RFC3339Nano`: the fraction has up to nine digits with trailing zeros
/// removed, and no dot at all when it is zero (`2026-07-21T09:59:58.1Z`, `2026-07-21T10:00:00Z`).
pub fn go_rfc3339_nano(t: SystemTime) -> String {
    // jiff prints the shortest exact fraction, which is what Go's RFC3339Nano layout does. Built from Unix
    // seconds and nanoseconds: jiff's SystemTime conversion needs a feature k8s-openapi may not enable.
    let (secs, nanos) = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => (-(e.duration().as_secs() as i64), -(e.duration().subsec_nanos() as i32)),
    };
    k8s_openapi::jiff::Timestamp::new(secs, nanos).map(|ts| ts.to_string()).unwrap_or_else(|_| GO_ZERO_TIME.to_string())
}

#[derive(Debug, Default)]
struct State {
    last_updated: BTreeMap<IpFamily, SystemTime>,
    oldest_pending_queued: BTreeMap<IpFamily, SystemTime>,
    node_eligible: bool,
    initial_sync_required: bool,
}

/// The proxier health state (upstream's `ProxyHealthServer` minus the HTTP part; see [`serve_proxy_health`]).
pub struct ProxyHealth {
    clock: Arc<dyn Clock>,
    health_timeout: Duration,
    families: Vec<IpFamily>,
    state: RwLock<State>,
}

impl ProxyHealth {
    /// Health for a proxy running `families`, with health timeout 2 × `sync_period`, on the real clock.
    pub fn new(families: &[IpFamily], sync_period: Duration) -> Self {
        Self::with_clock(families, sync_period, Arc::new(SystemClock))
    }

    /// Like [`ProxyHealth::new`] with an injected clock.
    pub fn with_clock(families: &[IpFamily], sync_period: Duration, clock: Arc<dyn Clock>) -> Self {
        ProxyHealth {
            clock,
            health_timeout: sync_period.saturating_mul(2),
            families: families.to_vec(),
            // Not eligible until the Node has been seen.
            state: RwLock::new(State::default()),
        }
    }

    /// How long a queued change may wait before the proxy is unhealthy.
    pub fn health_timeout(&self) -> Duration {
        self.health_timeout
    }

    /// The families this proxy runs.
    pub fn families(&self) -> &[IpFamily] {
        &self.families
    }

    /// The current time on this health's clock.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // The state stays consistent even if a writer panicked: every write is a single assignment.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `family`'s rules were synced successfully: clears its pending change and records the time.
    pub fn updated(&self, family: IpFamily) {
        let now = self.clock.now();
        let mut st = self.write();
        st.oldest_pending_queued.remove(&family);
        st.last_updated.insert(family, now);
    }

    /// A change that needs a sync of `family` arrived; only the oldest pending one counts.
    pub fn queued_update(&self, family: IpFamily) {
        let now = self.clock.now();
        self.write().oldest_pending_queued.entry(family).or_insert(now);
    }

    /// The sync loop started: [`updated`](Self::updated) for every family, so a proxy whose first sync never
    /// succeeds still turns unhealthy once changes wait too long.
    pub fn sync_loop_started(&self) {
        for &family in &self.families {
            self.updated(family);
        }
    }

    /// Ours, not upstream's: report unhealthy until the first successful sync, so a load balancer never
    /// sends traffic to a node whose datapath is not programmed yet. Replaces [`sync_loop_started`](Self::sync_loop_started).
    pub fn require_initial_sync(&self) {
        self.write().initial_sync_required = true;
    }

    /// Records the Node object: `None` when it is not known (not yet seen, or deleted).
    pub fn set_node(&self, node: Option<NodeState>) {
        let eligible = node.is_some_and(|n| !n.deletion_timestamp && !n.to_be_deleted_taint);
        self.set_node_eligible(eligible);
    }

    /// Records node eligibility directly (e.g. from [`crate::model::NodeInfo::eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.write().node_eligible = eligible;
    }

    /// The Node is known, not being deleted and not tainted [`TO_BE_DELETED_TAINT`].
    pub fn node_eligible(&self) -> bool {
        self.read().node_eligible
    }

    /// The proxy's health, ignoring the Node (upstream's `Health()`).
    pub fn health(&self) -> HealthStatus {
        let st = self.read();
        let current_time = self.clock.now();
        let mut status = BTreeMap::new();
        let mut healthy = !(st.initial_sync_required && st.last_updated.is_empty());
        for (&family, &last) in &st.last_updated {
            // A family without a pending change is starting up or fully synced.
            // A clock that went backwards makes the wait negative, which is never late.
            let late = st.oldest_pending_queued.get(&family).is_some_and(|&queued| {
                current_time.duration_since(queued).is_ok_and(|waited| waited >= self.health_timeout)
            });
            healthy &= !late;
            status.insert(family, ProxierHealth { last_updated: last, healthy: !late });
        }
        HealthStatus {
            last_updated: st.last_updated.values().max().copied(),
            current_time,
            node_eligible: None,
            healthy,
            status,
        }
    }

    /// The proxy is healthy, ignoring the Node (what service health checks use).
    pub fn is_healthy(&self) -> bool {
        self.health().healthy
    }

    /// The `/healthz` response: 200 iff healthy and the Node is eligible.
    fn healthz(&self, metrics: &Metrics) -> hyper::Response<Body> {
        let mut h = self.health();
        let eligible = self.node_eligible();
        h.node_eligible = Some(eligible);
        let ok = h.healthy && eligible;
        let status = self.finish(&mut h, ok);
        metrics.inc_proxy_healthz(status.as_u16());
        response(status, "application/json", h.to_json())
    }

    /// The `/livez` response: 200 iff healthy, whatever the Node.
    fn livez(&self, metrics: &Metrics) -> hyper::Response<Body> {
        let mut h = self.health();
        let ok = h.healthy;
        let status = self.finish(&mut h, ok);
        metrics.inc_proxy_livez(status.as_u16());
        response(status, "application/json", h.to_json())
    }

    fn finish(&self, h: &mut HealthStatus, ok: bool) -> StatusCode {
        if ok {
            // Old releases reported the last sync-loop run, which was always recent while healthy; keep
            // that meaning for clients that still look at it.
            h.last_updated = Some(self.clock.now());
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// Why the proxier health server stopped.
#[derive(Debug, Error)]
pub enum HealthServerError {
    /// The address could not be bound (only returned in hard-fail mode).
    #[error("failed to start proxy healthz on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
}

fn handler(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |req| {
        // Go's ServeMux matches these paths exactly, for any method.
        match req.uri().path() {
            "/healthz" => health.healthz(&metrics),
            "/livez" => health.livez(&metrics),
            _ => not_found(),
        }
    })
}

/// Serves `/healthz` and `/livez` on an already bound listener, forever.
pub async fn serve_proxy_health_on(listener: TcpListener, health: Arc<ProxyHealth>, metrics: Arc<Metrics>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "Starting healthz HTTP server");
    }
    serve_listener(listener, handler(health, metrics), std::future::pending()).await;
}

/// Binds `addr` and serves `/healthz` and `/livez` forever. A failed bind is retried every 5 s, unless
/// `hard_fail` (`bindAddressHardFail`), in which case the error is returned so the caller can emit the
/// `FailedToStartProxierHealthcheck` Node event and exit.
///
/// # Errors
///
/// [`HealthServerError::Listen`] when binding fails and `hard_fail` is set; otherwise it never returns.
pub async fn serve_proxy_health(
    addr: SocketAddr,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    hard_fail: bool,
) -> Result<Infallible, HealthServerError> {
    loop {
        match bind_std(addr).and_then(TcpListener::from_std) {
            Ok(listener) => {
                serve_proxy_health_on(listener, health.clone(), metrics.clone()).await;
            }
            Err(source) => {
                let err = HealthServerError::Listen { addr, source };
                tracing::error!(error = %err, "Healthz server failed");
                if hard_fail {
                    return Err(err);
                }
            }
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}
