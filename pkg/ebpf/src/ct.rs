//! Conntrack garbage collection for the north-south datapath (`KP_CT`), in userspace like Cilium's.
//!
//! Each flow has two entries (forward and reply) that point at each other ([`CtValue::partner`]). A pass
//! walks the map, ages each flow as a pair — its last packet in either direction against a lifetime chosen
//! by protocol and state (Cilium's: TCP established 6 h, TCP before the reply and non-TCP 60 s, TCP after
//! FIN/RST 10 s) — and deletes both entries of expired flows. An entry is re-read right before deletion
//! and kept if the datapath touched it meanwhile, so a flow with traffic inside its lifetime is never
//! removed. Orphans (partner evicted by the LRU) age alone. A flow whose client port the datapath remapped
//! (a reply tuple clash without SNAT) pairs the same way: its forward entry's new source port is the
//! remapped one, which is where its reply entry lives.
//!
//! The interval adapts like Cilium's: ×0.5 when a pass deleted more than 25% of the entries (down to
//! [`GC_MIN_INTERVAL`]), ×1.5 when under 5% (up to [`GC_MAX_INTERVAL`]). Results are published in
//! [`CtStats`] for the metrics collector (entries, map pressure, deletions).
//!
//! Map pressure: once the map is full the LRU evicts live flows, so waiting for the next pass is not an
//! option. Every [`PRESSURE_CHECK_EVERY`] the thread reads the datapath's conntrack insert counter (one
//! per-CPU array lookup, no walk) and estimates the fill as the last pass's entries plus two per flow
//! inserted since; at [`PRESSURE_FILL`] of the capacity it runs a pass at once (at most one per
//! [`PRESSURE_MIN_GAP`]) and at least halves the interval, as it does when a pass itself ends above that fill.
//! Early passes are counted in [`CtStats::pressure_runs`]. A fixed interval (`EbpfOptions::ct_gc_interval`,
//! which tests use to run passes themselves) is kept as is.

use std::collections::HashMap as StdHashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use ebpf_common::{
    CT_DIR_REPLY, CT_F_CLOSING, CT_F_SEEN, CtKey, CtValue, PROTO_TCP, ct_lifetime, dp_counter, map_names,
};
use tracing::{debug, warn};

use crate::EbpfError;
use crate::inspect::maps_dir;

/// First GC interval after start.
pub const GC_START_INTERVAL: Duration = Duration::from_secs(60);
/// Shortest adaptive interval.
pub const GC_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Longest adaptive interval (Cilium allows 12 h for LRU maps; we keep the metrics fresher).
pub const GC_MAX_INTERVAL: Duration = Duration::from_secs(600);
/// Estimated fill (entries / capacity) at which the map is under pressure.
pub const PRESSURE_FILL: f64 = 0.9;
/// How often the insert counter is read between passes.
pub const PRESSURE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Least time between the end of a pass and an early one (a map full of live flows must not be walked
/// back to back).
pub const PRESSURE_MIN_GAP: Duration = Duration::from_secs(2);

const NSEC_PER_SEC: u64 = 1_000_000_000;

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NSEC_PER_SEC + ts.tv_nsec as u64
}

/// Lifetime in seconds of a flow, from its protocol and the flags of its two entries.
pub fn lifetime_s(key: &CtKey, value: &CtValue, partner: Option<&CtValue>) -> u64 {
    if key.proto != PROTO_TCP {
        return ct_lifetime::NON_TCP;
    }
    let flags = value.flags | partner.map_or(0, |p| p.flags);
    if flags & CT_F_CLOSING != 0 {
        return ct_lifetime::TCP_CLOSING;
    }
    // Established once the backend answered: the reply entry has been hit.
    let reply = if key.dir == CT_DIR_REPLY { Some(value) } else { partner };
    if reply.is_some_and(|r| r.flags & CT_F_SEEN != 0) { ct_lifetime::TCP_ESTABLISHED } else { ct_lifetime::TCP_SYN }
}

/// Whether the datapath touched any entry of an expired flow since the walk saw it; `current` re-reads an
/// entry (`None`: gone, which is no touch).
pub fn touched_since(flow: &[(CtKey, CtValue)], mut current: impl FnMut(&CtKey) -> Option<CtValue>) -> bool {
    flow.iter()
        .any(|(k, seen)| current(k).is_some_and(|cur| cur.last_seen_ns != seen.last_seen_ns || cur.flags != seen.flags))
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries walked.
    pub scanned: u64,
    /// Entries deleted.
    pub deleted: u64,
    /// Entries left (scanned − deleted).
    pub remaining: u64,
    /// Entries kept because the datapath touched them between the walk and the delete.
    pub raced: u64,
}

/// Counters of the GC thread, shared with the metrics collector.
#[derive(Debug, Default)]
pub struct CtStats {
    /// Completed passes.
    pub runs: AtomicU64,
    /// Entries deleted by all passes.
    pub deleted: AtomicU64,
    /// Entries after the last pass.
    pub entries: AtomicU64,
    /// The map's capacity.
    pub max_entries: AtomicU64,
    /// Passes that failed.
    pub errors: AtomicU64,
    /// Current interval in seconds.
    pub interval_s: AtomicU64,
    /// Passes started before their interval ended because the map was filling up.
    pub pressure_runs: AtomicU64,
}

/// The conntrack map, opened from its pin.
pub struct CtMap {
    map: HashMap<MapData, CtKey, CtValue>,
    max_entries: u32,
    /// The datapath counters (for the insert counter); `None` when the pin is missing.
    dp_counters: Option<PerCpuArray<MapData, u64>>,
}

impl CtMap {
    /// Opens `<bpffs_root>/v1/maps/KP_CT`.
    pub fn open(bpffs_root: &Path) -> Result<Self, EbpfError> {
        let path = maps_dir(bpffs_root).join(map_names::CT);
        let err = |op: &'static str| {
            let key = path.display().to_string();
            move |source| EbpfError::MapOp { map: map_names::CT, op, key, source: Box::new(source) }
        };
        let data = MapData::from_pin(&path).map_err(err("open pin"))?;
        let max_entries = data.info().map_err(err("info"))?.max_entries();
        let map = Map::from_map_data(data).and_then(HashMap::try_from).map_err(err("open pin"))?;
        let dp_path = maps_dir(bpffs_root).join(map_names::DP_COUNTERS);
        let dp_counters = match MapData::from_pin(&dp_path).map(Map::from_map_data) {
            Ok(Ok(m)) => PerCpuArray::try_from(m).ok(),
            _ => None,
        };
        if dp_counters.is_none() {
            warn!(pin = %dp_path.display(), "datapath counters unavailable: conntrack GC without pressure checks");
        }
        Ok(CtMap { map, max_entries, dp_counters })
    }

    /// Flows the datapath inserted so far (the `ct_insert` counter summed over CPUs), if readable.
    pub fn ct_inserts(&self) -> Option<u64> {
        let values = self.dp_counters.as_ref()?.get(&dp_counter::CT_INSERT, 0).ok()?;
        Some(values.iter().sum())
    }

    /// The map's capacity.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Every entry (a snapshot; the datapath keeps changing the map).
    pub fn dump(&self) -> Result<Vec<(CtKey, CtValue)>, EbpfError> {
        // Entries evicted during the walk end it early on some kernels; what was read is still valid.
        let mut out = Vec::new();
        for r in self.map.iter() {
            match r {
                Ok(kv) => out.push(kv),
                Err(e) => {
                    debug!(error = %e, "conntrack walk ended early");
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One GC pass at time `now_ns` (`CLOCK_MONOTONIC`; tests pass a time in the future to age flows).
    pub fn gc_pass(&mut self, now_ns: u64) -> Result<GcReport, EbpfError> {
        let snapshot: StdHashMap<CtKey, CtValue> = self.dump()?.into_iter().collect();
        let mut report = GcReport { scanned: snapshot.len() as u64, ..Default::default() };
        // Expired flows: one or both entries (an orphan has no partner).
        let mut doomed: Vec<Vec<(CtKey, CtValue)>> = Vec::new();
        let mut decided: std::collections::HashSet<CtKey> = std::collections::HashSet::new();
        for (k, v) in &snapshot {
            if decided.contains(k) {
                continue;
            }
            let pk = v.partner(k);
            // A partner must point back; otherwise the slot was reused and this entry is an orphan.
            let partner = snapshot.get(&pk).filter(|p| p.partner(&pk) == *k);
            decided.insert(*k);
            if partner.is_some() {
                decided.insert(pk);
            }
            let last = partner.map_or(v.last_seen_ns, |p| p.last_seen_ns.max(v.last_seen_ns));
            let life = lifetime_s(k, v, partner) * NSEC_PER_SEC;
            if now_ns.saturating_sub(last) > life {
                let mut flow = vec![(*k, *v)];
                if let Some(p) = partner {
                    flow.push((pk, *p));
                }
                doomed.push(flow);
            }
        }
        for flow in doomed {
            // Re-read: the datapath may have refreshed the flow after the walk (a client reusing its port
            // touches the forward entry first). Then both entries stay: deleting the untouched one would leave
            // the other without its partner, and its SNAT port free for a second flow.
            if touched_since(&flow, |k| self.map.get(k, 0).ok()) {
                report.raced += flow.len() as u64;
                continue;
            }
            for (k, _) in flow {
                if self.map.remove(&k).is_ok() {
                    report.deleted += 1;
                }
            }
        }
        report.remaining = report.scanned - report.deleted.min(report.scanned);
        Ok(report)
    }
}

/// Cilium's adaptive interval.
pub fn next_interval(cur: Duration, report: &GcReport) -> Duration {
    if report.scanned == 0 {
        return (cur.mul_f64(1.5)).min(GC_MAX_INTERVAL);
    }
    let ratio = report.deleted as f64 / report.scanned as f64;
    if ratio > 0.25 {
        (cur / 2).max(GC_MIN_INTERVAL)
    } else if ratio < 0.05 {
        cur.mul_f64(1.5).min(GC_MAX_INTERVAL)
    } else {
        cur
    }
}

/// Whether the map is under pressure: the estimated fill — `entries` after the last pass plus two entries
/// (forward and reply) per flow inserted since — reaches [`PRESSURE_FILL`] of `max_entries`.
pub fn under_pressure(entries: u64, inserted_flows: u64, max_entries: u64) -> bool {
    if max_entries == 0 {
        return false;
    }
    let estimate = entries.saturating_add(inserted_flows.saturating_mul(2));
    estimate as f64 >= PRESSURE_FILL * max_entries as f64
}

/// Whether to start a pass before the interval ends: the map is under pressure, flows were inserted since
/// the last pass (otherwise that pass's verdict still stands) and the last pass ended at least
/// [`PRESSURE_MIN_GAP`] ago.
pub fn early_pass_due(entries: u64, inserted_flows: u64, max_entries: u64, since_last_pass: Duration) -> bool {
    inserted_flows > 0 && since_last_pass >= PRESSURE_MIN_GAP && under_pressure(entries, inserted_flows, max_entries)
}

/// The interval after a pass: [`next_interval`], then at most half the current one (not below
/// [`GC_MIN_INTERVAL`]) when the pass was an early one or ended with the map under pressure.
pub fn next_interval_after(cur: Duration, report: &GcReport, early: bool, max_entries: u64) -> Duration {
    let next = next_interval(cur, report);
    if early || under_pressure(report.remaining, 0, max_entries) {
        next.min(cur / 2).max(GC_MIN_INTERVAL)
    } else {
        next
    }
}

/// The background GC thread; stopped and joined on drop.
pub(crate) struct GcThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl GcThread {
    /// Starts collecting `map` every `fixed` interval, or adaptively from [`GC_START_INTERVAL`] with early
    /// passes under map pressure.
    pub(crate) fn start(mut map: CtMap, stats: Arc<CtStats>, fixed: Option<Duration>) -> GcThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let max = u64::from(map.max_entries());
        stats.max_entries.store(max, Ordering::Relaxed);
        let handle = std::thread::Builder::new()
            .name("kp-ct-gc".into())
            .spawn(move || {
                let mut interval = fixed.unwrap_or(GC_START_INTERVAL);
                let mut last_pass = Instant::now();
                let mut next = last_pass + interval;
                let mut last_check = last_pass;
                // Entries after the last pass (none before the first: the estimate then counts inserts only,
                // from the counter's value at start-up).
                let mut entries = 0u64;
                let mut inserts_base = map.ct_inserts();
                while !flag.load(Ordering::Relaxed) {
                    stats.interval_s.store(interval.as_secs(), Ordering::Relaxed);
                    let now = Instant::now();
                    let mut early = false;
                    if now < next {
                        if fixed.is_none() && now.duration_since(last_check) >= PRESSURE_CHECK_EVERY {
                            last_check = now;
                            if let (Some(base), Some(cur)) = (inserts_base, map.ct_inserts()) {
                                let flows = cur.saturating_sub(base);
                                early = early_pass_due(entries, flows, max, now.duration_since(last_pass));
                                if early {
                                    debug!(entries, inserted_flows = flows, max, "conntrack map under pressure");
                                }
                            }
                        }
                        if !early {
                            // Short sleeps so drop (stop) never waits long.
                            std::thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                    }
                    // Read before the walk: flows inserted during it count towards the next estimate.
                    inserts_base = map.ct_inserts();
                    if early {
                        stats.pressure_runs.fetch_add(1, Ordering::Relaxed);
                    }
                    match map.gc_pass(monotonic_ns()) {
                        Ok(r) => {
                            stats.runs.fetch_add(1, Ordering::Relaxed);
                            stats.deleted.fetch_add(r.deleted, Ordering::Relaxed);
                            stats.entries.store(r.remaining, Ordering::Relaxed);
                            entries = r.remaining;
                            debug!(
                                scanned = r.scanned,
                                deleted = r.deleted,
                                raced = r.raced,
                                early,
                                "conntrack GC pass"
                            );
                            if fixed.is_none() {
                                interval = next_interval_after(interval, &r, early, max);
                            }
                        }
                        Err(e) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, "conntrack GC pass failed");
                        }
                    }
                    last_pass = Instant::now();
                    next = last_pass + interval;
                }
            })
            .expect("spawning the conntrack GC thread");
        GcThread { stop, handle: Some(handle) }
    }
}

impl Drop for GcThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebpf_common::{CT_DIR_FWD, PROTO_UDP};

    fn pair(proto: u8, fwd_flags: u8, rep_flags: u8) -> (CtKey, CtValue, CtKey, CtValue) {
        let k = CtKey { saddr: [1; 4], daddr: [2; 4], sport: 1, dport: 2, proto, dir: CT_DIR_FWD, _pad: [0; 2] };
        let v = CtValue {
            nat_saddr: [3; 4],
            nat_daddr: [4; 4],
            nat_sport: 3,
            nat_dport: 4,
            flags: fwd_flags,
            ..Default::default()
        };
        let pk = v.partner(&k);
        let pv = CtValue {
            nat_saddr: [2; 4],
            nat_daddr: [1; 4],
            nat_sport: 2,
            nat_dport: 1,
            flags: rep_flags,
            ..Default::default()
        };
        (k, v, pk, pv)
    }

    #[test]
    fn partners_point_at_each_other() {
        let (k, v, pk, pv) = pair(PROTO_TCP, 0, 0);
        assert_eq!(pk.dir, CT_DIR_REPLY);
        assert_eq!(pv.partner(&pk), k);
        assert_eq!(v.partner(&k), pk);
    }

    #[test]
    fn a_remapped_flow_pairs_with_its_own_reply_entry() {
        // Client C:1000 reaches backend B:8080 through two frontends; the second flow got port 61234 as
        // `new_flow` builds it. Each entry's partner is its own flow's, never the other flow's.
        let (c, b) = ([0, 0, 0, 1], [0, 0, 0, 2]);
        let flow = |fe: u32, sport: u16| {
            let k = CtKey {
                saddr: c,
                daddr: [0, 0, 0, fe],
                sport: 1000,
                dport: 80,
                proto: PROTO_UDP,
                dir: CT_DIR_FWD,
                _pad: [0; 2],
            };
            let v = CtValue { nat_saddr: c, nat_daddr: b, nat_sport: sport, nat_dport: 8080, ..Default::default() };
            let rk = CtKey {
                saddr: b,
                daddr: c,
                sport: 8080,
                dport: sport,
                proto: PROTO_UDP,
                dir: CT_DIR_REPLY,
                _pad: [0; 2],
            };
            let rv = CtValue {
                nat_saddr: [0, 0, 0, fe],
                nat_daddr: c,
                nat_sport: 80,
                nat_dport: 1000,
                ..Default::default()
            };
            (k, v, rk, rv)
        };
        let (k1, v1, rk1, rv1) = flow(10, 1000);
        let (k2, v2, rk2, rv2) = flow(11, 61234);
        assert_ne!(rk1, rk2);
        for (k, v, rk, rv) in [(k1, v1, rk1, rv1), (k2, v2, rk2, rv2)] {
            assert_eq!(v.partner(&k), rk);
            assert_eq!(rv.partner(&rk), k);
        }
    }

    #[test]
    fn lifetimes_follow_protocol_and_state() {
        let (k, v, pk, pv) = pair(PROTO_TCP, CT_F_SEEN, 0);
        assert_eq!(lifetime_s(&k, &v, Some(&pv)), ct_lifetime::TCP_SYN);
        let (k, v, _, pv) = pair(PROTO_TCP, CT_F_SEEN, CT_F_SEEN);
        assert_eq!(lifetime_s(&k, &v, Some(&pv)), ct_lifetime::TCP_ESTABLISHED);
        assert_eq!(lifetime_s(&pk, &pv, Some(&v)), ct_lifetime::TCP_ESTABLISHED);
        let (k, v, _, pv) = pair(PROTO_TCP, CT_F_SEEN | CT_F_CLOSING, CT_F_SEEN);
        assert_eq!(lifetime_s(&k, &v, Some(&pv)), ct_lifetime::TCP_CLOSING);
        let (k, v, _, pv) = pair(PROTO_UDP, CT_F_SEEN, CT_F_SEEN);
        assert_eq!(lifetime_s(&k, &v, Some(&pv)), ct_lifetime::NON_TCP);
    }

    #[test]
    fn a_flow_touched_in_one_direction_is_kept_whole() {
        let (k, v, pk, pv) = pair(PROTO_TCP, CT_F_SEEN | CT_F_CLOSING, CT_F_SEEN | CT_F_CLOSING);
        let flow = [(k, v), (pk, pv)];
        // Untouched, or one entry already gone: delete.
        assert!(!touched_since(&flow, |key| Some(if *key == k { v } else { pv })));
        assert!(!touched_since(&flow, |key| (*key == k).then_some(v)));
        // The client reused its port: a SYN refreshed the forward entry only; the reply entry must stay too.
        let reopened = CtValue { flags: CT_F_SEEN, last_seen_ns: v.last_seen_ns + 1, ..v };
        assert!(touched_since(&flow, |key| Some(if *key == k { reopened } else { pv })));
        let refreshed = CtValue { last_seen_ns: pv.last_seen_ns + 1, ..pv };
        assert!(touched_since(&flow, |key| Some(if *key == k { v } else { refreshed })));
    }

    #[test]
    fn interval_adapts_within_bounds() {
        let r = |scanned, deleted| GcReport { scanned, deleted, ..Default::default() };
        assert_eq!(next_interval(Duration::from_secs(60), &r(100, 50)), Duration::from_secs(30));
        assert_eq!(next_interval(Duration::from_secs(12), &r(100, 50)), GC_MIN_INTERVAL);
        assert_eq!(next_interval(Duration::from_secs(60), &r(100, 1)), Duration::from_secs(90));
        assert_eq!(next_interval(GC_MAX_INTERVAL, &r(100, 1)), GC_MAX_INTERVAL);
        assert_eq!(next_interval(Duration::from_secs(60), &r(100, 10)), Duration::from_secs(60));
    }

    #[test]
    fn pressure_is_the_estimated_fill() {
        // 1000 entries: pressure from 900 on, counting two entries per inserted flow.
        assert!(!under_pressure(0, 0, 1000));
        assert!(!under_pressure(899, 0, 1000));
        assert!(under_pressure(900, 0, 1000));
        assert!(!under_pressure(800, 49, 1000));
        assert!(under_pressure(800, 50, 1000));
        assert!(under_pressure(0, 450, 1000));
        // No capacity known: never.
        assert!(!under_pressure(u64::MAX, u64::MAX, 0));
        // Saturating, not wrapping.
        assert!(under_pressure(u64::MAX, u64::MAX, 1000));
    }

    #[test]
    fn early_pass_needs_pressure_new_flows_and_a_gap() {
        let gap = PRESSURE_MIN_GAP;
        assert!(early_pass_due(800, 50, 1000, gap));
        // Not under pressure.
        assert!(!early_pass_due(800, 49, 1000, gap));
        // Full of live flows but nothing new since the last pass: its verdict stands.
        assert!(!early_pass_due(1000, 0, 1000, gap));
        // Too soon after the last pass.
        assert!(!early_pass_due(800, 50, 1000, gap - Duration::from_millis(1)));
    }

    #[test]
    fn pressure_shortens_the_interval() {
        let r = |scanned, deleted| GcReport { scanned, deleted, remaining: scanned - deleted, raced: 0 };
        let max = 1000;
        // An early pass that freed little would otherwise grow the interval (×1.5): it halves instead.
        assert_eq!(next_interval_after(Duration::from_secs(60), &r(950, 10), true, max), Duration::from_secs(30));
        // A scheduled pass that ends above the pressure fill halves too.
        assert_eq!(next_interval_after(Duration::from_secs(60), &r(980, 20), false, max), Duration::from_secs(30));
        // Never below the minimum.
        assert_eq!(next_interval_after(Duration::from_secs(12), &r(950, 10), true, max), GC_MIN_INTERVAL);
        // Below the pressure fill, Cilium's adaptation alone.
        assert_eq!(next_interval_after(Duration::from_secs(60), &r(100, 1), false, max), Duration::from_secs(90));
        assert_eq!(next_interval_after(Duration::from_secs(60), &r(100, 50), false, max), Duration::from_secs(30));
    }
}
