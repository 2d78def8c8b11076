//! The sync runner: nothing before both initial lists, a full first sync, bursts coalesced by
//! `min_sync_period`, periodic syncs, and a full retry after a failure.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::objects::{service, slice};
use proxier::backend::{Backend, BackendError, SyncReport};
use proxier::model::{Changes, IpFamily, Snapshot};
use proxier::runner::{RunnerConfig, SyncObserver, SyncRunner};
use proxier::tracker::{ChangeTracker, NoopObserver};
use serde_json::json;

#[derive(Default)]
struct Log {
    syncs: Vec<(Instant, bool, usize)>,
    fail_next: bool,
}

struct FakeBackend(Arc<Mutex<Log>>);

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn families(&self) -> &[IpFamily] {
        &[IpFamily::V4]
    }
    fn sync(&mut self, _s: &Snapshot, c: &Changes) -> Result<SyncReport, BackendError> {
        let mut log = self.0.lock().unwrap();
        log.syncs.push((Instant::now(), c.full, c.v4.services.len()));
        if std::mem::take(&mut log.fail_next) {
            return Err(BackendError::msg("fake", "injected failure"));
        }
        Ok(SyncReport { full: c.full, ..Default::default() })
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

struct NoopSync;
impl SyncObserver for NoopSync {}

struct Running {
    tracker: Arc<ChangeTracker>,
    log: Arc<Mutex<Log>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(min: Duration, period: Duration) -> Running {
        let tracker = Arc::new(ChangeTracker::new("node-a", true, Arc::new(NoopObserver)));
        let log = Arc::new(Mutex::new(Log::default()));
        let cfg =
            RunnerConfig { min_sync_period: min, sync_period: period, full_sync_period: Duration::from_secs(3600) };
        let runner = SyncRunner::new(tracker.clone(), Box::new(FakeBackend(log.clone())), Arc::new(NoopSync), cfg);
        Running { tracker, log, thread: Some(runner.spawn().unwrap()) }
    }

    fn syncs(&self) -> Vec<(Instant, bool, usize)> {
        self.log.lock().unwrap().syncs.clone()
    }

    fn wait_syncs(&self, n: usize) -> Vec<(Instant, bool, usize)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.syncs();
            if s.len() >= n || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.tracker.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn nothing_is_synced_until_every_list_is_done_and_the_first_sync_is_full() {
    let r = Running::start(Duration::ZERO, Duration::from_secs(30));
    r.tracker.on_service(&service("ns", "a", "198.19.0.1", json!({})));
    r.tracker.services_synced();
    std::thread::sleep(Duration::from_millis(200));
    assert!(r.syncs().is_empty(), "EndpointSlices not listed yet");
    r.tracker.endpoint_slices_synced();
    // A first sync without the Node would program no node addresses (and detach the tc programs a previous
    // run left on the node devices).
    std::thread::sleep(Duration::from_millis(200));
    assert!(r.syncs().is_empty(), "the Node not listed yet");
    r.tracker.node_synced();
    let s = r.wait_syncs(1);
    assert_eq!((s[0].1, s[0].2), (true, 1), "first sync is full and carries the service");
}

#[test]
fn bursts_are_coalesced_by_min_sync_period() {
    let min = Duration::from_millis(300);
    let r = Running::start(min, Duration::from_secs(30));
    r.tracker.services_synced();
    r.tracker.endpoint_slices_synced();
    r.tracker.node_synced();
    r.wait_syncs(1);
    // 20 changes in quick succession: at most one sync per min_sync_period.
    let burst = Instant::now();
    for i in 0..20 {
        r.tracker.on_service(&service("ns", &format!("s{i}"), &format!("198.19.0.{}", i + 1), json!({})));
        r.tracker.on_endpoint_slice(&slice("ns", &format!("s{i}"), &format!("s{i}-1"), &[("198.18.1.1", "node-a")]));
        std::thread::sleep(Duration::from_millis(20));
    }
    let burst = burst.elapsed();
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.syncs().iter().map(|s| s.2).sum::<usize>() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = r.syncs();
    assert_eq!(s.iter().skip(1).map(|x| x.2).sum::<usize>(), 20, "every change synced exactly once: {s:?}");
    // Bounded by the burst's length (a loaded machine stretches it), not by the number of changes.
    let allowed = (burst.as_millis() / min.as_millis()) as usize + 2;
    assert!(s.len() - 1 <= allowed, "20 changes over {burst:?} gave {} syncs (allowed {allowed})", s.len() - 1);
    for w in s.windows(2) {
        assert!(w[1].0 - w[0].0 >= min - Duration::from_millis(5), "syncs closer than min_sync_period");
    }
}

#[test]
fn periodic_sync_and_full_retry_after_failure() {
    let period = Duration::from_millis(400);
    let r = Running::start(Duration::ZERO, period);
    r.tracker.services_synced();
    r.tracker.endpoint_slices_synced();
    r.tracker.node_synced();
    r.wait_syncs(1);
    // With nothing pending, the runner still syncs every sync_period.
    let s = r.wait_syncs(2);
    assert!(s.len() >= 2, "periodic sync");
    assert!(!s[1].1, "periodic syncs are partial between full sync periods");
    assert!(s[1].0 - s[0].0 >= period - Duration::from_millis(20));

    // A failure is retried after sync_period, and the retry is full.
    r.log.lock().unwrap().fail_next = true;
    let n = r.syncs().len();
    r.tracker.on_service(&service("ns", "x", "198.19.0.9", json!({})));
    let s = r.wait_syncs(n + 2);
    let (failed, retry) = (s[n], s[n + 1]);
    assert_eq!(failed.2, 1, "the failed sync carried the change");
    assert!(retry.1, "the retry after a failure is full");
    assert!(retry.0 - failed.0 >= period - Duration::from_millis(20), "retry waits sync_period");
}
