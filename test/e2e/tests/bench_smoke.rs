//! The benchmark runs and writes well-formed output: `bench --quick` (with reduced counts) into a temp dir,
//! then every expected (backend, N, metric) row is in `results.json` with a finite positive value. Timings are
//! never asserted. Privileged: prints a SKIP reason and returns when it cannot run.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::bench::{Meta, Row, expected_metrics};
use e2e::lab::skip_reason;

/// The bench's own bound plus slack; `--quick` with these counts takes well under a minute per backend.
const BOUND: Duration = Duration::from_secs(600);

#[test]
fn quick_bench_writes_every_expected_row() {
    if let Some(reason) = skip_reason() {
        e2e::skip!("quick_bench_writes_every_expected_row: {reason}");
        return;
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let bin_dir = bench.parent().expect("bin dir").to_path_buf();
    if !bin_dir.join("kube-proxy").exists() || !bin_dir.join("kpctl").exists() {
        println!(
            "SKIP quick_bench_writes_every_expected_row: kube-proxy/kpctl not built (cargo build --workspace --bins)"
        );
        return;
    }
    let out = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(&bench)
        .args(["--quick", "--reps", "1", "--updates", "5", "--conn-count", "200", "--no-plots", "--out"])
        .arg(out.path())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn bench");
    let status = e2e::wait_for(BOUND, || child.try_wait().ok().flatten());
    let Some(status) = status else {
        // SIGTERM: the bench tears its lab down on the way out.
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = e2e::wait_for(Duration::from_secs(60), || child.try_wait().ok().flatten());
        let _ = child.kill();
        panic!("bench --quick did not finish within {BOUND:?}");
    };
    assert!(status.success(), "bench --quick failed: {status}");

    let rows: Vec<Row> =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).expect("results.json"))
            .expect("results.json is a list of rows");
    let meta: Meta = serde_json::from_str(&std::fs::read_to_string(out.path().join("meta.json")).expect("meta.json"))
        .expect("meta.json");
    assert!(meta.backends.iter().any(|b| b == "ebpf"), "the ebpf backend must run: {meta:?}");
    assert!(meta.failed.is_empty(), "cells failed: {:?}", meta.failed);
    for (backend, why) in &meta.skipped {
        println!("note: backend {backend} skipped: {why}");
    }
    assert_eq!(meta.scales, vec![100, 1000]);
    let present: BTreeSet<(&str, usize, &str)> =
        rows.iter().map(|r| (r.backend.as_str(), r.services, r.metric.as_str())).collect();
    for backend in &meta.backends {
        for &n in &meta.scales {
            for metric in expected_metrics(backend, meta.bulk) {
                assert!(present.contains(&(backend.as_str(), n, metric)), "missing row {backend} N={n} {metric}");
            }
        }
    }
    for r in &rows {
        for v in [r.value, r.min, r.max] {
            assert!(v.is_finite() && v > 0.0, "row without a finite positive value: {r:?}");
        }
        assert!(r.min <= r.value && r.value <= r.max, "{r:?}");
        assert!(!r.unit.is_empty() && r.reps >= 1 && r.endpoints == 10, "{r:?}");
    }
    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    assert!(md.contains("| metric | unit | N=100 | N=1000 |"), "{md}");
}
