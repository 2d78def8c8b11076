//! Real-kernel tests of the read side: `inspect` (behind `kpctl`) and the Prometheus collector, against
//! services programmed through the `Backend` trait into a test-owned bpffs directory. Privileged: each
//! test prints a SKIP reason and returns when it cannot run. Same lab and safety rules as `datapath.rs`
//! (see `common/mod.rs`).
//!
//! Set `KPCTL=<path to the kpctl binary>` to also check the binary's output against the library's.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;
use proxier::backend::Backend;
use proxier::model::{Changes, Endpoint, IpFamily, Protocol, Snapshot};
use proxy_ebpf::inspect::{self, FrontendInfo};
use proxy_ebpf::{AyaMaps, EbpfBackend, EbpfOptions, read_pinned_names};

/// (frontend, type, flags, backends, service name) of a row, for whole-set comparisons.
type Row = (String, &'static str, String, BTreeSet<String>, Option<String>);

fn row(r: &FrontendInfo) -> Row {
    (
        r.frontend(),
        r.kind.as_str(),
        r.flags(),
        r.backends.iter().map(|b| b.address.to_string()).collect(),
        r.service.clone(),
    )
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn list(lab: &Lab) -> Vec<FrontendInfo> {
    let maps = AyaMaps::from_pins(&lab.bpffs).expect("open pins");
    let names = read_pinned_names(&lab.bpffs).expect("read pinned names");
    inspect::list_services(&maps, &names).expect("list services")
}

/// Runs `$KPCTL args… --bpffs-root <lab>` when KPCTL is set; its stdout.
fn kpctl(lab: &Lab, args: &[&str]) -> Option<String> {
    let bin = std::env::var_os("KPCTL")?;
    let out = Command::new(bin).args(args).arg("--bpffs-root").arg(&lab.bpffs).output().expect("run kpctl");
    assert!(out.status.success(), "kpctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn inspect_lists_exactly_the_programmed_services() {
    let Some(mut lab) = Lab::new("inspect_lists_exactly_the_programmed_services") else { return };
    let mut snap = Snapshot::default();
    snap.node.addresses = vec!["198.18.0.1".parse().unwrap()];
    let web = name("web", Protocol::Tcp);
    let dns6 = name("dns6", Protocol::Udp);
    let web_state = svc(CIP4, 80, Protocol::Tcp, v4_eps(2), |i| {
        i.external_ips = vec!["198.18.9.9".parse().unwrap()];
        i.node_port = 30080;
    });
    let v6_eps: Vec<Endpoint> = POD_V6.iter().map(|a| ep(a, false)).collect();
    let dns_state = svc(CIP6, 53, Protocol::Udp, v6_eps, |i| i.session_affinity_timeout = Some(60));
    apply(&mut lab, &mut snap, web.clone(), Some(web_state));
    apply(&mut lab, &mut snap, dns6.clone(), Some(dns_state));

    let rows = list(&lab);
    let got: BTreeSet<Row> = rows.iter().map(row).collect();
    let web_be = set(&["198.18.0.2:8080", "198.18.0.3:8080"]);
    let dns_be = set(&["[2001:db8::2]:8080", "[2001:db8::3]:8080"]);
    let w = Some("default/web".to_string());
    let d = Some("default/dns6".to_string());
    let expected: BTreeSet<Row> = [
        ("198.19.0.10:80/TCP".to_string(), "ClusterIP", "-".to_string(), web_be.clone(), w.clone()),
        ("198.18.9.9:80/TCP".to_string(), "ExternalIP", "-".to_string(), web_be.clone(), w.clone()),
        ("198.18.0.1:30080/TCP".to_string(), "NodePort", "-".to_string(), web_be, w),
        ("[2001:db8:ffff::10]:53/UDP".to_string(), "ClusterIP", "affinity=60s".to_string(), dns_be, d),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, expected, "{rows:#?}");
    assert!(rows.iter().all(|r| r.problems.is_empty()), "{rows:#?}");
    let web_id = lab.backend().service_id(IpFamily::V4, &web).unwrap();
    assert!(rows.iter().filter(|r| r.service.as_deref() == Some("default/web")).all(|r| r.service_id == web_id));

    let table = inspect::format_services(&rows);
    println!("{table}");
    assert_eq!(table.lines().count(), 1 + 4 + 4, "header, 4 frontends, 4 more backend lines:\n{table}");
    if let Some(out) = kpctl(&lab, &["services"]) {
        assert_eq!(out, table);
        let json: Vec<serde_json::Value> =
            serde_json::from_str(&kpctl(&lab, &["services", "--json"]).unwrap()).unwrap();
        assert_eq!(json.len(), 4);
        let maps = kpctl(&lab, &["maps"]).unwrap();
        println!("{maps}");
        assert!(maps.contains("KP_SERVICES") && maps.contains("KP_SVC_NAMES"), "{maps}");
    }

    // Removing one service (a partial sync of the IPv6 family): exactly the other remains, names included.
    snap.v6.services.remove(&dns6);
    let mut changes = Changes::default();
    changes.v6.services.insert(dns6);
    lab.backend().sync(&snap, &changes).expect("sync");
    let got: BTreeSet<String> = list(&lab).iter().map(|r| format!("{} {:?}", r.frontend(), r.service)).collect();
    assert_eq!(
        got,
        set(&[
            "198.19.0.10:80/TCP Some(\"default/web\")",
            "198.18.9.9:80/TCP Some(\"default/web\")",
            "198.18.0.1:30080/TCP Some(\"default/web\")"
        ])
    );
    assert_eq!(read_pinned_names(&lab.bpffs).unwrap().len(), 1);

    // After a restart the names come from the pin, before any sync.
    drop(lab.backend.take());
    let opts = EbpfOptions::new(&lab.cgroup, &lab.bpffs, vec![IpFamily::V4, IpFamily::V6]);
    lab.backend = Some(EbpfBackend::new(opts).expect("adopt"));
    let names = lab.backend().service_names().unwrap().snapshot();
    assert_eq!(names.get(&web_id).map(|n| n.name.as_str()), Some("default/web"), "{names:?}");
    assert!(list(&lab).iter().all(|r| r.service.as_deref() == Some("default/web")));
}

/// The value of the sample `name{labels}` in a text exposition, when present.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().unwrap())
}

#[test]
fn collector_reports_translated_connections_and_map_memory() {
    let Some(mut lab) = Lab::new("collector_reports_translated_connections_and_map_memory") else { return };
    let mut snap = Snapshot::default();
    let web = name("web", Protocol::Tcp);
    apply(&mut lab, &mut snap, web.clone(), Some(svc(CIP4, 80, Protocol::Tcp, v4_eps(2), |_| {})));
    // Built before the backend "moves into the runner": it owns its own map handles.
    let registry = prometheus::Registry::new();
    lab.backend().metrics_collector().expect("collector").register(&registry).expect("register");

    const N: usize = 6;
    assert_eq!(lab.tcp_backends(CIP4, 80, N).len(), N);
    apply(&mut lab, &mut snap, web.clone(), Some(svc(CIP4, 80, Protocol::Tcp, vec![], |_| {})));
    let out = lab.client(true, &[("tcp", CIP4, 80)]);
    assert!(out[0].contains(ECONNREFUSED), "{out:?}");

    let mut buf = Vec::new();
    use prometheus::Encoder;
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    println!("{text}");
    let svc_labels = r#"ip_family="IPv4",protocol="TCP",service_port_name="default/web""#;
    let translated = sample(&text, "kubeproxy_ebpf_service_connections_translated_total", svc_labels);
    assert!(translated.is_some_and(|v| v >= N as f64), "translated {translated:?}\n{text}");
    let rejects = sample(&text, "kubeproxy_ebpf_service_no_endpoint_rejects_total", svc_labels);
    assert!(rejects.is_some_and(|v| v >= 1.0), "rejects {rejects:?}\n{text}");
    for map in ["KP_SERVICES", "KP_BACKENDS", "KP_REV_NAT", "KP_SOCK_REVNAT", "KP_AFFINITY", "KP_COUNTERS"] {
        let mem = sample(&text, "kubeproxy_ebpf_map_memory_bytes", &format!("map=\"{map}\""));
        assert!(mem.is_some_and(|m| m > 0.0), "{map} memory {mem:?}\n{text}");
    }
    let entries = |map: &str| sample(&text, "kubeproxy_ebpf_map_entries", &format!("map=\"{map}\""));
    // No endpoints now: just the master entry; its backends are gone; one reverse-NAT entry and one name.
    assert_eq!(entries("KP_SERVICES"), Some(1.0), "{text}");
    assert_eq!(entries("KP_BACKENDS"), Some(0.0), "{text}");
    assert_eq!(entries("KP_REV_NAT"), Some(1.0), "{text}");
    assert_eq!(entries("KP_SVC_NAMES"), Some(1.0), "{text}");
    assert_eq!(entries("KP_COUNTERS"), Some(f64::from(ebpf_common::REV_NAT_MAX_ENTRIES)), "{text}");
    // Each TCP connection leaves a socket reverse-NAT entry (LRU, not cleaned on close).
    assert!(entries("KP_SOCK_REVNAT").is_some_and(|n| n >= 1.0), "{text}");

    // A deleted service stops being reported.
    apply(&mut lab, &mut snap, web, None);
    let families = registry.gather();
    let translated = families.iter().find(|f| f.name() == "kubeproxy_ebpf_service_connections_translated_total");
    assert!(translated.is_none_or(|f| f.get_metric().is_empty()), "{translated:?}");
}
