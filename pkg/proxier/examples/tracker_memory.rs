//! Memory and time of the control plane at scale, for before/after comparisons (not a test: it asserts nothing).
//!
//! Feeds N Services × 10 endpoints (one EndpointSlice each, the objects the e2e `control_plane` 10k test uses)
//! through the change tracker as the watchers do, runs one full sync (checkout and endpoint selection into the
//! runner's snapshot), then keeps every name in two `(family, name) → id` maps as the eBPF backend does (the
//! writer's ids and the published names). Prints each phase's time and the process's RSS (VmRSS) and peak
//! RSS (VmHWM); run it under `heaptrack` for the peak heap and the allocation sites:
//!
//! ```sh
//! cargo build --release -p proxier --example tracker_memory
//! heaptrack target/release/examples/tracker_memory 10000
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use e2e::objects::{node, service, slice};
use proxier::model::{IpFamily, ServicePortName, Snapshot};
use proxier::tracker::{ChangeTracker, NoopObserver, apply_checkout};
use serde_json::json;

const ENDPOINTS: u32 = 10;

/// The `n`-th address of 198.18.0.0/15 (wrapping), skipping `.0`.
fn addr(n: u32) -> String {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + n % 131_070).to_string()
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn report(phase: &str, start: Instant) {
    let (rss, hwm) = rss_mib();
    println!("{phase:<14} {:>8.3} s   RSS {rss:>8.1} MiB   peak RSS {hwm:>8.1} MiB", start.elapsed().as_secs_f64());
}

fn main() {
    let n: u32 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 10_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("usage: tracker_memory [SERVICES]: {e}");
            std::process::exit(2);
        }
    };
    println!("{n} Services x {ENDPOINTS} endpoints; size_of::<ServicePortName>() = {}", size_of::<ServicePortName>());
    report("start", Instant::now());

    let tracker = ChangeTracker::new("node-a", false, Arc::new(NoopObserver));
    tracker.on_node(&node("node-a", "198.18.0.1"));
    tracker.node_synced();
    let start = Instant::now();
    for i in 0..n {
        let name = format!("s{i}");
        tracker.on_service(&service("bench", &name, &addr(65_536 + i), json!({})));
        let ips: Vec<String> = (0..ENDPOINTS).map(|j| addr(i * ENDPOINTS + j)).collect();
        let eps: Vec<(&str, &str)> = ips.iter().map(|ip| (ip.as_str(), "node-b")).collect();
        tracker.on_endpoint_slice(&slice("bench", &name, &format!("{name}-1"), &eps));
    }
    tracker.services_synced();
    tracker.endpoint_slices_synced();
    report("watch events", start);

    let start = Instant::now();
    let mut snapshot = Snapshot::default();
    let checkout = tracker.checkout(true);
    let topology = tracker.topology(&checkout.node);
    let changes = apply_checkout(&mut snapshot, checkout, &topology, true);
    report("full sync", start);
    assert_eq!(snapshot.v4.services.len(), n as usize, "every Service port reached the snapshot");

    let start = Instant::now();
    let mut ids: BTreeMap<(IpFamily, ServicePortName), u32> = BTreeMap::new();
    for (id, name) in changes.v4.services.iter().enumerate() {
        ids.insert((IpFamily::V4, name.clone()), id as u32 + 1);
    }
    let published: BTreeMap<(IpFamily, ServicePortName), u32> = ids.clone();
    drop(changes);
    report("backend names", start);
    println!("held: {} snapshot ports, {} + {} backend names", snapshot.v4.services.len(), ids.len(), published.len());
}
