//! The sync runner: upstream's bounded-frequency runner around a [`Backend`].
//!
//! It runs on its own thread, waits until Services and EndpointSlices are both listed, then syncs at most
//! once per `min_sync_period` when changes are pending, at least once per `sync_period`, with a full sync
//! first, every `full_sync_period`, and after any failure (retried after `sync_period`, as upstream does).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError, SyncReport};
use crate::model::{Changes, IpFamily, Snapshot};
use crate::tracker::{ChangeTracker, apply_checkout};

/// Upstream's `FullSyncPeriod`: a full rewrite at least this often.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Receives the runner's events (metrics, health, health-check node ports); no-op defaults.
pub trait SyncObserver: Send + Sync {
    /// The runner is about to wait for the first sync (upstream's `SyncLoop` start).
    fn sync_loop_started(&self, _families: &[IpFamily]) {}
    /// A sync succeeded.
    fn synced(
        &self,
        _families: &[IpFamily],
        _elapsed: Duration,
        _report: &SyncReport,
        _snapshot: &Snapshot,
        _changes: &Changes,
    ) {
    }
    /// A sync failed; the next one is full.
    fn sync_failed(&self, _families: &[IpFamily], _elapsed: Duration, _error: &BackendError) {}
}

/// Timing of the runner.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Minimum time between syncs (`minSyncPeriod`); 0 syncs on every change.
    pub min_sync_period: Duration,
    /// Maximum time between syncs (`syncPeriod`), also the retry delay after a failure.
    pub sync_period: Duration,
    /// Maximum time between full syncs.
    pub full_sync_period: Duration,
}

/// Runs a backend against the tracker's changes; see the module docs.
pub struct SyncRunner {
    tracker: Arc<ChangeTracker>,
    backend: Box<dyn Backend>,
    observer: Arc<dyn SyncObserver>,
    config: RunnerConfig,
    snapshot: Snapshot,
}

impl SyncRunner {
    /// A runner for `backend`.
    pub fn new(
        tracker: Arc<ChangeTracker>,
        backend: Box<dyn Backend>,
        observer: Arc<dyn SyncObserver>,
        config: RunnerConfig,
    ) -> Self {
        SyncRunner { tracker, backend, observer, config, snapshot: Snapshot::default() }
    }

    /// Starts the runner on its own thread; it stops when the tracker is shut down.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name("sync-runner".into()).spawn(move || self.run())
    }

    /// The runner loop; returns when the tracker is shut down.
    pub fn run(mut self) {
        let families = self.backend.families().to_vec();
        self.observer.sync_loop_started(&families);
        tracing::info!(backend = self.backend.name(), "Waiting for Services, EndpointSlices and the Node to be listed");
        while !self.tracker.wait_for_sync(Duration::from_secs(1)) {
            if self.tracker.is_shutdown() {
                return;
            }
        }
        tracing::info!("Services, EndpointSlices and the Node listed; starting to sync");

        let mut need_full = true;
        let mut last_full = Instant::now();
        let mut last_attempt: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        loop {
            if self.tracker.is_shutdown() {
                return;
            }
            let now = Instant::now();
            let due = match (last_attempt, retry_at) {
                (None, _) => true,
                (_, Some(r)) => now >= r,
                (Some(last), None) => {
                    let periodic = now >= last + self.config.sync_period;
                    let pending = self.tracker.has_pending() && now >= last + self.config.min_sync_period;
                    periodic || pending
                }
            };
            if !due {
                let next = match (last_attempt, retry_at) {
                    (_, Some(r)) => r,
                    (Some(last), None) => {
                        if self.tracker.has_pending() {
                            last + self.config.min_sync_period
                        } else {
                            last + self.config.sync_period
                        }
                    }
                    (None, None) => now,
                };
                let wait = next.saturating_duration_since(now).min(Duration::from_secs(1));
                if !self.tracker.has_pending() {
                    self.tracker.wait_for_changes(wait);
                } else {
                    std::thread::sleep(wait.max(Duration::from_millis(1)));
                }
                continue;
            }
            if now >= last_full + self.config.full_sync_period {
                need_full = true;
            }
            last_attempt = Some(now);
            let full = need_full;
            match self.sync_once(full, &families) {
                Ok(()) => {
                    retry_at = None;
                    if full {
                        need_full = false;
                        last_full = now;
                    }
                }
                Err(()) => {
                    need_full = true;
                    retry_at = Some(now + self.config.sync_period);
                }
            }
        }
    }

    fn sync_once(&mut self, full: bool, families: &[IpFamily]) -> Result<(), ()> {
        let start = Instant::now();
        let checkout = self.tracker.checkout(full);
        let topology = self.tracker.topology(&checkout.node);
        let changes = apply_checkout(&mut self.snapshot, checkout, &topology, full);
        match self.backend.sync(&self.snapshot, &changes) {
            Ok(report) => {
                let elapsed = start.elapsed();
                tracing::debug!(
                    backend = self.backend.name(),
                    full = changes.full,
                    changed_v4 = changes.v4.services.len(),
                    changed_v6 = changes.v6.services.len(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "Synced proxy rules"
                );
                self.observer.synced(families, elapsed, &report, &self.snapshot, &changes);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "Failed to sync proxy rules; retrying with a full sync");
                self.observer.sync_failed(families, start.elapsed(), &e);
                Err(())
            }
        }
    }
}
