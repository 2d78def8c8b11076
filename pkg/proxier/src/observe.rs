//! The bookkeeping around tracking and syncing that every backend shares: upstream's metrics, the proxier
//! health state and the health-check node port servers, driven by the tracker's and runner's events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{BackendError, SyncReport};
use crate::healthcheck::{ProxyHealth, ServiceHealthServer};
use crate::metrics::{Metrics, ObjectKind, TrafficPolicy};
use crate::model::{Changes, IpFamily, Snapshot};
use crate::runner::SyncObserver;
use crate::tracker::TrackerObserver;

/// Feeds metrics and health from tracker and runner events.
pub struct ProxyObserver {
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    service_health: Option<ServiceHealthServer>,
    families: Vec<IpFamily>,
    // Upstream counts a change pending for the families the proxier runs; remember what we announced.
    last_pending: Mutex<(usize, usize)>,
}

impl ProxyObserver {
    /// An observer for a proxy serving `families`; `service_health` is None when no health-check node port
    /// servers should run.
    pub fn new(
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
        service_health: Option<ServiceHealthServer>,
        families: Vec<IpFamily>,
    ) -> Self {
        ProxyObserver { metrics, health, service_health, families, last_pending: Mutex::new((0, 0)) }
    }
}

impl TrackerObserver for ProxyObserver {
    fn service_change(&self, pending: usize) {
        self.metrics.inc_service_changes();
        self.metrics.set_service_changes_pending(pending);
        self.last_pending.lock().unwrap_or_else(|p| p.into_inner()).0 = pending;
    }

    fn endpoint_change(&self, pending: usize) {
        self.metrics.inc_endpoint_changes();
        self.metrics.set_endpoint_changes_pending(pending);
        self.last_pending.lock().unwrap_or_else(|p| p.into_inner()).1 = pending;
    }

    fn queued(&self, families: &[IpFamily]) {
        for f in families.iter().filter(|f| self.families.contains(f)) {
            self.health.queued_update(*f);
            self.metrics.set_last_queued_timestamp(*f);
        }
    }

    fn invalid_object(&self, kind: &'static str) {
        let kind = if kind == "Service" { ObjectKind::Service } else { ObjectKind::EndpointSlice };
        self.metrics.inc_invalid_object(kind);
    }

    fn node_eligible(&self, eligible: bool) {
        self.health.set_node_eligible(eligible);
    }
}

impl SyncObserver for ProxyObserver {
    fn sync_loop_started(&self, families: &[IpFamily]) {
        // Unhealthy until Services and EndpointSlices are listed and the first sync has programmed them.
        self.health.require_initial_sync();
        for f in families {
            self.metrics.set_last_queued_timestamp(*f);
        }
    }

    fn synced(
        &self,
        families: &[IpFamily],
        elapsed: Duration,
        report: &SyncReport,
        snapshot: &Snapshot,
        changes: &Changes,
    ) {
        self.metrics.set_service_changes_pending(0);
        self.metrics.set_endpoint_changes_pending(0);
        *self.last_pending.lock().unwrap_or_else(|p| p.into_inner()) = (0, 0);
        for f in families {
            self.metrics.observe_sync(*f, elapsed, Some(report.full));
            for t in &changes.family(*f).trigger_times {
                self.metrics.observe_network_programming_since(*f, *t);
            }
            let (internal, external) = no_local_endpoints(snapshot, *f);
            self.metrics.set_no_local_endpoints(TrafficPolicy::Internal, *f, internal);
            self.metrics.set_no_local_endpoints(TrafficPolicy::External, *f, external);
            self.health.updated(*f);
            self.metrics.set_last_sync_timestamp(*f);
        }
        if let Some(server) = &self.service_health {
            for failure in server.sync_snapshot(snapshot) {
                tracing::warn!(service = %failure.service, port = failure.port, "{}", failure.message);
            }
        }
    }

    fn sync_failed(&self, families: &[IpFamily], elapsed: Duration, error: &BackendError) {
        for f in families {
            self.metrics.observe_sync(*f, elapsed, None);
        }
        tracing::debug!(error = %error, "sync failure recorded");
    }
}

/// Service ports with a Local policy and no local endpoint, for internal and external traffic (upstream's
/// `sync_proxy_rules_no_local_endpoints_total`).
fn no_local_endpoints(snapshot: &Snapshot, f: IpFamily) -> (usize, usize) {
    let mut internal = 0;
    let mut external = 0;
    for state in snapshot.family(f).services.values() {
        // Dropped (not rejected) traffic: endpoints exist, just none on this node.
        if !state.selected.local.is_empty() || !state.selected.has_any {
            continue;
        }
        if state.info.internal_policy_local {
            internal += 1;
        }
        if state.info.external_policy_local && state.info.externally_accessible() {
            external += 1;
        }
    }
    (internal, external)
}
