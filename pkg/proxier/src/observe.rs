//! The bookkeeping around tracking and syncing that every backend shares: upstream's metrics, the proxier
//! health state and the health-check node port servers, driven by the tracker's and runner's events.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{BackendError, SyncReport};
use crate::events::{EventRecorder, EventType};
use crate::healthcheck::{ListenFailure, ProxyHealth, ServiceHealthServer};
use crate::metrics::{Metrics, ObjectKind, TrafficPolicy};
use crate::model::{Changes, IpFamily, ServicePortName, ServicePortState, Snapshot};
use crate::runner::SyncObserver;
use crate::tracker::TrackerObserver;

/// Feeds metrics and health from tracker and runner events.
pub struct ProxyObserver {
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    service_health: Option<ServiceHealthServer>,
    events: Option<EventRecorder>,
    families: Vec<IpFamily>,
    // Upstream counts a change pending for the families the proxier runs; remember what we announced.
    last_pending: Mutex<(usize, usize)>,
    // Service ports dropping internal / external traffic for want of a local endpoint, per family, kept up to
    // date from each sync's changes so the gauges cost nothing proportional to all services.
    no_local: Mutex<[NoLocal; 2]>,
}

#[derive(Default)]
struct NoLocal {
    internal: BTreeSet<ServicePortName>,
    external: BTreeSet<ServicePortName>,
}

impl NoLocal {
    /// Re-evaluates one port: `state` is None when it is gone.
    fn update(&mut self, name: &ServicePortName, state: Option<&ServicePortState>) {
        self.internal.remove(name);
        self.external.remove(name);
        // Dropped (not rejected) traffic: endpoints exist, just none on this node.
        let Some(st) = state.filter(|st| st.selected.local.is_empty() && st.selected.has_any) else { return };
        if st.info.internal_policy_local {
            self.internal.insert(name.clone());
        }
        if st.info.external_policy_local && st.info.externally_accessible() {
            self.external.insert(name.clone());
        }
    }
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
        ProxyObserver {
            metrics,
            health,
            service_health,
            events: None,
            families,
            last_pending: Mutex::new((0, 0)),
            no_local: Mutex::new(Default::default()),
        }
    }
}

impl ProxyObserver {
    /// Records health-check listen failures as Warning events on their Service, as upstream does.
    pub fn with_events(mut self, events: EventRecorder) -> Self {
        self.events = Some(events);
        self
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
            let (internal, external) = self.update_no_local(snapshot, changes, *f);
            self.metrics.set_no_local_endpoints(TrafficPolicy::Internal, *f, internal);
            self.metrics.set_no_local_endpoints(TrafficPolicy::External, *f, external);
            self.health.updated(*f);
            self.metrics.set_last_sync_timestamp(*f);
        }
        if let Some(server) = &self.service_health {
            for failure in server.sync_snapshot(snapshot) {
                tracing::warn!(service = %failure.service, port = failure.port, "{}", failure.message);
                if let Some(ev) = &self.events {
                    let svc = &failure.service;
                    ev.service_event(
                        svc.namespace(),
                        svc.name(),
                        EventType::Warning,
                        ListenFailure::REASON,
                        ListenFailure::ACTION,
                        failure.message,
                    );
                }
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

impl ProxyObserver {
    /// Service ports with a Local policy and no local endpoint, for internal and external traffic (upstream's
    /// `sync_proxy_rules_no_local_endpoints_total`): everything on a full sync, only the changed ports otherwise.
    fn update_no_local(&self, snapshot: &Snapshot, changes: &Changes, f: IpFamily) -> (usize, usize) {
        let mut all = self.no_local.lock().unwrap_or_else(|p| p.into_inner());
        let set = &mut all[usize::from(f == IpFamily::V6)];
        let services = &snapshot.family(f).services;
        if changes.full {
            *set = NoLocal::default();
            for (name, st) in services {
                set.update(name, Some(st));
            }
        } else {
            for name in &changes.family(f).services {
                set.update(name, services.get(name));
            }
        }
        (set.internal.len(), set.external.len())
    }
}
