//! Results on disk: `results.json` (the rows), `meta.json`, `results.md` (one table per backend, N across)
//! and PNG plots drawn by gnuplot (`sync.png`, `latency.png`, `update.png`, `throughput.png`, `ratios.png`,
//! `north_south.png`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{METRICS, Meta, Row};

/// Writes `results.json`, `meta.json` and `results.md` into `dir`.
pub fn write_data(dir: &Path, rows: &[Row], meta: &Meta) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(rows)? + "\n")?;
    std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(meta)? + "\n")?;
    std::fs::write(dir.join("results.md"), markdown(rows, meta))?;
    Ok(())
}

/// Reads the `results.json` and `meta.json` of earlier runs and combines them (rows concatenated; a later
/// run's row replaces an earlier one for the same backend, endpoints, N and metric).
pub fn merge(dirs: &[PathBuf]) -> Result<(Vec<Row>, Meta)> {
    let mut rows: Vec<Row> = Vec::new();
    let mut meta = Meta::default();
    for d in dirs {
        let text = std::fs::read_to_string(d.join("results.json")).with_context(|| format!("{}", d.display()))?;
        let add: Vec<Row> = serde_json::from_str(&text).with_context(|| format!("{}/results.json", d.display()))?;
        let text = std::fs::read_to_string(d.join("meta.json")).with_context(|| format!("{}", d.display()))?;
        let m: Meta = serde_json::from_str(&text).with_context(|| format!("{}/meta.json", d.display()))?;
        for r in add {
            rows.retain(|o| {
                (&o.backend, o.endpoints, o.services, &o.metric) != (&r.backend, r.endpoints, r.services, &r.metric)
            });
            rows.push(r);
        }
        for b in m.backends {
            if !meta.backends.contains(&b) {
                meta.backends.push(b);
            }
        }
        meta.skipped.extend(m.skipped);
        let why = |w: &str| format!("{} ({} endpoints)", super::run::strip_ansi(w), m.endpoints);
        meta.failed.extend(m.failed.iter().map(|(b, n, w)| (b.clone(), *n, why(w))));
        meta.scales.extend(m.scales);
        meta.bulk |= m.bulk;
        meta.seconds += m.seconds;
        if meta.machine.is_empty() {
            meta.machine = m.machine;
            meta.endpoints = m.endpoints;
        }
    }
    meta.scales.sort_unstable();
    meta.scales.dedup();
    Ok((rows, meta))
}

/// A number with about three significant digits.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

fn cell(r: &Row) -> String {
    if r.reps > 1 && r.min != r.max {
        format!("{} ({}–{})", fmt_num(r.value), fmt_num(r.min), fmt_num(r.max))
    } else {
        fmt_num(r.value)
    }
}

/// The tables: per backend, one row per metric and one column per N; "median (min–max)".
pub fn markdown(rows: &[Row], meta: &Meta) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Machine: {}.", meta.machine);
    let _ = writeln!(
        s,
        "Run: {}{} repetitions each; {:.0} s wall time.\n",
        if meta.quick { "--quick; " } else { "" },
        rows.iter().filter(|r| r.metric == "full_sync").map(|r| r.reps).max().unwrap_or(0),
        meta.seconds
    );
    for (b, e) in groups(rows) {
        let b = b.as_str();
        let in_group = |r: &&Row| r.backend == b && r.endpoints == e;
        let ns: BTreeSet<usize> = rows.iter().filter(in_group).map(|r| r.services).collect();
        let _ = writeln!(s, "### {b}, {e} endpoint{} per Service\n", if e == 1 { "" } else { "s" });
        let mut head = "| metric | unit |".to_string();
        let mut rule = "|---|---|".to_string();
        for n in &ns {
            let _ = write!(head, " N={n} |");
            rule.push_str("---:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for d in METRICS {
            if !rows.iter().filter(in_group).any(|r| r.metric == d.name) {
                continue;
            }
            let mut line = format!("| `{}` | {} |", d.name, d.unit);
            for n in &ns {
                let v = rows.iter().filter(in_group).find(|r| r.services == *n && r.metric == d.name);
                let _ = write!(line, " {} |", v.map(cell).unwrap_or_else(|| "–".into()));
            }
            let _ = writeln!(s, "{line}");
        }
        s.push('\n');
    }
    if !meta.skipped.is_empty() || !meta.failed.is_empty() {
        let _ = writeln!(s, "Not measured:\n");
        for (b, why) in &meta.skipped {
            let _ = writeln!(s, "- backend `{b}`: {why}");
        }
        for (b, n, why) in &meta.failed {
            let _ = writeln!(s, "- `{b}` N={n}: {}", why.lines().next().unwrap_or(""));
        }
        s.push('\n');
    }
    let _ = writeln!(s, "Metrics:\n");
    for d in METRICS {
        let _ = writeln!(s, "- `{}` ({}): {}", d.name, d.unit, d.what);
    }
    s
}

/// The (backend, endpoints per Service) groups of `rows`, in first-seen order.
pub fn groups(rows: &[Row]) -> Vec<(String, usize)> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for r in rows {
        if !seen.iter().any(|(b, e)| *b == r.backend && *e == r.endpoints) {
            seen.push((r.backend.clone(), r.endpoints));
        }
    }
    seen
}

/// The key ratios, for the end of the run.
pub fn summary(rows: &[Row], meta: &Meta) -> String {
    let mut s = String::from("SUMMARY\n");
    for (b, e) in groups(rows) {
        let get = |n: usize, m: &str| {
            rows.iter().find(|r| r.backend == b && r.endpoints == e && r.services == n && r.metric == m)
        };
        let ns: BTreeSet<usize> =
            rows.iter().filter(|r| r.backend == b && r.endpoints == e).map(|r| r.services).collect();
        for n in ns {
            let f = |m: &str| get(n, m).map(|r| fmt_num(r.value)).unwrap_or_else(|| "–".into());
            let _ = writeln!(
                s,
                "  {b:<9} {e:>2} ep N={n:<6} full sync {} s | update p50 {} ms p99 {} ms | conn ClusterIP/direct p50 x{} \
                 p99 x{} | req/s ratio x{} | bulk ratio x{} | NodePort req/s x{} UDP pkt/s x{} | RSS {} MiB",
                f("full_sync"),
                f("update_p50"),
                f("update_p99"),
                f("conn_ratio_p50"),
                f("conn_ratio_p99"),
                f("rps_ratio"),
                f("bulk_ratio"),
                f("np_rps_ratio"),
                f("np_udp_ratio"),
                f("rss"),
            );
        }
    }
    for (b, why) in &meta.skipped {
        let _ = writeln!(s, "  skipped {b}: {why}");
    }
    for (b, n, why) in &meta.failed {
        let _ = writeln!(s, "  not measured {b} N={n}: {}", why.lines().next().unwrap_or(""));
    }
    s
}

/// Writes the data file of one plot line: (backend, metric) → data file.
fn write_series(dir: &Path, rows: &[Row], (backend, eps): (&str, usize), metric: &str) -> Result<Option<PathBuf>> {
    let mut pts: Vec<&Row> =
        rows.iter().filter(|r| r.backend == backend && r.endpoints == eps && r.metric == metric).collect();
    if pts.is_empty() {
        return Ok(None);
    }
    pts.sort_by_key(|r| r.services);
    let mut text = format!("# {backend} {metric}: N median min max\n");
    for r in pts {
        let _ = writeln!(text, "{} {} {} {}", r.services, r.value, r.min, r.max);
    }
    let path = dir.join(format!("{backend}_{eps}ep_{metric}.dat"));
    std::fs::write(&path, text)?;
    Ok(Some(path))
}

/// One PNG: file name, title, y label, (metric, label) of each line.
type Panel = (&'static str, &'static str, &'static str, &'static [(&'static str, &'static str)]);

/// Draws the PNGs with gnuplot into `dir` (data files in `dir/plot-data/`); returns the PNG paths.
pub fn plots(dir: &Path, rows: &[Row]) -> Result<Vec<PathBuf>> {
    let groups = groups(rows);
    let data = dir.join("plot-data");
    std::fs::create_dir_all(&data)?;
    let panels: [Panel; 6] = [
        (
            "sync.png",
            "Full sync (cold start until the last Service answers)",
            "seconds",
            &[("full_sync", "full sync"), ("proxy_sync", "proxy sync metric")],
        ),
        (
            "latency.png",
            "Connect + request + close, sequential",
            "microseconds",
            &[
                ("conn_clusterip_p50", "ClusterIP p50"),
                ("conn_clusterip_p99", "ClusterIP p99"),
                ("conn_direct_p50", "pod IP p50"),
                ("conn_direct_p99", "pod IP p99"),
            ],
        ),
        (
            "update.png",
            "Endpoint update: API write until a connection reaches it",
            "milliseconds",
            &[("update_p50", "p50"), ("update_p99", "p99")],
        ),
        (
            "throughput.png",
            "Short connections per second (concurrent clients)",
            "requests/s",
            &[("rps_clusterip", "ClusterIP"), ("rps_direct", "pod IP")],
        ),
        (
            "ratios.png",
            "ClusterIP / pod IP (1.0 = no cost)",
            "ratio",
            &[
                ("conn_ratio_p50", "latency p50"),
                ("conn_ratio_p99", "latency p99"),
                ("rps_ratio", "req/s"),
                ("bulk_ratio", "bulk Gbit/s"),
                ("np_rps_ratio", "NodePort req/s"),
                ("np_udp_ratio", "NodePort UDP pkt/s"),
            ],
        ),
        (
            "north_south.png",
            "North-south from outside: NodePort (remote backends, SNAT) vs pod IPs",
            "per second",
            &[
                ("np_rps", "NodePort TCP req/s"),
                ("np_rps_direct", "pod IP TCP req/s"),
                ("np_udp_pps", "NodePort UDP pkt/s"),
                ("np_udp_direct", "pod IP UDP pkt/s"),
            ],
        ),
    ];
    let mut out = Vec::new();
    for (png, title, ylabel, series) in panels {
        let mut plots = Vec::new();
        // One colour per backend, one dash/point type per series.
        for (bi, (b, e)) in groups.iter().enumerate() {
            for (si, (metric, label)) in series.iter().enumerate() {
                if let Some(p) = write_series(&data, rows, (b, *e), metric)? {
                    let p = p.display().to_string().replace('\'', "");
                    let style = format!("lc {} dt {} pt {}", bi + 1, si + 1, si + 5);
                    plots.push(format!("'{p}' using 1:2:3:4 with yerrorlines {style} title '{b} ({e} ep): {label}'"));
                }
            }
        }
        if plots.is_empty() {
            continue;
        }
        let path = dir.join(png);
        let logy = if ylabel == "ratio" { "" } else { "set logscale y\n" };
        let script = format!(
            "set terminal pngcairo size 900,560 font ',10'\nset output '{}'\nset title '{title}'\n\
             set xlabel 'Services (N)'\nset ylabel '{ylabel}'\nset logscale x\n{logy}set grid\n\
             set key outside right top\nset pointsize 0.8\nplot {}\n",
            path.display().to_string().replace('\'', ""),
            plots.join(", \\\n     ")
        );
        let gp = data.join(png.replace(".png", ".gp"));
        std::fs::write(&gp, &script)?;
        gnuplot(&gp)?;
        out.push(path);
    }
    Ok(out)
}

fn gnuplot(script: &Path) -> Result<()> {
    let mut child = Command::new("gnuplot")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running gnuplot (apt-get install gnuplot-nox; hack/setup.sh installs it)")?;
    let status = crate::wait_for(Duration::from_secs(60), || child.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("gnuplot {} timed out", script.display());
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("gnuplot {} failed: {}", script.display(), err.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_one_column_per_n() {
        let row = |n, m: &str, v| Row {
            backend: "ebpf".into(),
            services: n,
            endpoints: 10,
            metric: m.into(),
            value: v,
            unit: "s".into(),
            min: v / 2.0,
            max: v * 2.0,
            reps: 3,
        };
        let rows = vec![row(100, "full_sync", 0.5), row(1000, "full_sync", 1.5)];
        let md = markdown(&rows, &Meta::default());
        assert!(md.contains("### ebpf, 10 endpoints per Service"), "{md}");
        assert!(md.contains("| metric | unit | N=100 | N=1000 |"), "{md}");
        assert!(md.contains("| `full_sync` | s | 0.5000 (0.2500–1.000) | 1.500 (0.7500–3.000) |"), "{md}");
        assert_eq!(fmt_num(12345.6), "12346");
    }
}
