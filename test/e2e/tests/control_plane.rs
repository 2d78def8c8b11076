//! The real `kube-proxy` binary against the in-repo API server, with the recording backend standing in for
//! the datapath: start-up gating, exactly-the-changed ports reaching `Backend::sync`, health and metrics,
//! malformed objects, watch recovery, config files.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::objects::{node, service, slice};
use e2e::{ProxyProcess, free_port, http_get, metric_value, read_syncs, wait_for};
use serde_json::{Value, json};
use test_apiserver::ApiServer;

const NODE: &str = "node-a";
const T: Duration = Duration::from_secs(30);

struct Setup {
    dir: tempfile::TempDir,
    healthz: SocketAddr,
    metrics: SocketAddr,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("tempdir"),
            healthz: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
        }
    }

    fn record(&self) -> std::path::PathBuf {
        self.dir.path().join("syncs.jsonl")
    }

    fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn flags(&self) -> Vec<String> {
        vec![
            format!("--kubeconfig={}", self.kubeconfig().display()),
            format!("--hostname-override={NODE}"),
            format!("--healthz-bind-address={}", self.healthz),
            format!("--metrics-bind-address={}", self.metrics),
            "--iptables-min-sync-period=0".into(),
            "--v=4".into(),
        ]
    }

    fn start(&self, args: Vec<String>) -> ProxyProcess {
        let env = vec![("KUBE_PROXY_RS_TEST_BACKEND", format!("record:{}", self.record().display()))];
        ProxyProcess::start(&args, &env, &self.dir.path().join("kube-proxy.log"))
    }

    fn syncs(&self) -> Vec<Value> {
        read_syncs(&self.record())
    }

    /// Waits until a sync beyond the first `seen` satisfies `pred`, and returns it.
    fn wait_sync(&self, seen: usize, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(T, || self.syncs().into_iter().skip(seen).find(|s| pred(s)))
            .unwrap_or_else(|| panic!("no matching sync after #{seen}; syncs: {:#?}", self.syncs()))
    }

    fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics").map(|r| r.body).unwrap_or_default()
    }
}

fn changed(sync: &Value) -> Vec<String> {
    let mut v: Vec<String> = ["v4", "v6"]
        .iter()
        .flat_map(|f| sync[f]["changed"].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_str().map(String::from))
        .collect();
    v.sort();
    v
}

fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).map(|r| r.status)
}

#[test]
fn healthy_only_after_initial_sync_then_exact_changes_reach_the_backend() {
    let s = Setup::new();
    // The API server is not up yet: the proxy must wait, unhealthy, retrying.
    let api_port = free_port();
    let api_addr = SocketAddr::from(([127, 0, 0, 1], api_port));
    std::fs::write(
        s.kubeconfig(),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: http://{api_addr}\n  name: test\ncontexts:\n- context:\n    cluster: test\n    user: test\n  name: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let mut proxy = s.start(s.flags());
    wait_for(T, || status(s.healthz, "/livez")).expect("health server up");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status(s.healthz, "/healthz"), Some(503), "no sync yet: /healthz must be 503");
    assert_eq!(status(s.healthz, "/livez"), Some(503), "no sync yet: /livez must be 503");
    assert!(s.syncs().is_empty(), "nothing may be programmed before the initial lists");
    assert_eq!(http_get(s.metrics, "/proxyMode").map(|r| r.body).as_deref(), Some("ebpf"));

    let api = ApiServer::start_background(api_addr).expect("api server");
    api.apply(&node(NODE, "198.18.0.1")).unwrap();
    api.apply(&service("default", "a", "198.19.0.1", json!({}))).unwrap();
    api.apply(&service("default", "b", "198.19.0.2", json!({}))).unwrap();
    api.apply(&slice("default", "a", "a-1", &[("198.18.1.1", NODE)])).unwrap();
    api.apply(&slice("default", "b", "b-1", &[("198.18.1.2", "node-b")])).unwrap();

    let first = s.wait_sync(0, |_| true);
    assert_eq!(first["full"], true, "the first sync is full");
    let ok = wait_for(T, || (status(s.healthz, "/healthz") == Some(200)).then_some(()));
    assert!(ok.is_some(), "healthz must turn 200 after the first sync and the Node");
    assert_eq!(status(s.healthz, "/livez"), Some(200));
    let all = s.wait_sync(0, |x| x["v4"]["services"] == 2);
    assert_eq!(all["v4"]["endpoints"]["default/a:http/TCP"], json!(["198.18.1.1:8080"]), "{all}");

    // One endpoint change of one Service: exactly that port reaches Backend::sync.
    let seen = s.syncs().len();
    let metrics_before = s.metrics_text();
    let ep_changes_before = metric_value(&metrics_before, "kubeproxy_sync_proxy_rules_endpoint_changes_total", &[]);
    api.apply(&slice("default", "a", "a-1", &[("198.18.1.1", NODE), ("198.18.1.3", "node-b")])).unwrap();
    let sync = s.wait_sync(seen, |x| !changed(x).is_empty());
    assert_eq!(changed(&sync), ["default/a:http/TCP"]);
    assert_eq!(sync["full"], false);
    assert_eq!(sync["v4"]["endpoints"]["default/a:http/TCP"], json!(["198.18.1.1:8080", "198.18.1.3:8080"]));

    // A Service change likewise; a deleted Service is reported and gone.
    let seen = s.syncs().len();
    api.apply(&service("default", "b", "198.19.0.2", json!({"spec": {"sessionAffinity": "ClientIP"}}))).unwrap();
    assert_eq!(changed(&s.wait_sync(seen, |x| !changed(x).is_empty())), ["default/b:http/TCP"]);
    let seen = s.syncs().len();
    api.delete::<k8s_openapi::api::core::v1::Service>("default", "b").unwrap();
    let sync = s.wait_sync(seen, |x| !changed(x).is_empty());
    assert_eq!(changed(&sync), ["default/b:http/TCP"]);
    assert_eq!(sync["v4"]["services"], 1);

    // Metrics moved as upstream's do.
    let m = wait_for(T, || {
        let m = s.metrics_text();
        let after = metric_value(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total", &[])?;
        (after > ep_changes_before.unwrap_or(0.0)).then_some(m)
    })
    .expect("endpoint change counter moved");
    assert!(
        metric_value(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[("ip_family", "IPv4")]).unwrap() > 1e9
    );
    assert!(metric_value(&m, "kubeproxy_sync_proxy_rules_service_changes_total", &[]).unwrap() >= 3.0);
    assert!(
        metric_value(&m, "kubeproxy_sync_proxy_rules_duration_seconds_count", &[("ip_family", "IPv4")]).unwrap() >= 3.0
    );
    assert!(metric_value(&m, "kubeproxy_proxy_healthz_total", &[("code", "503")]).unwrap() >= 1.0);
    assert!(metric_value(&m, "kubeproxy_proxy_healthz_total", &[("code", "200")]).unwrap() >= 1.0);
    assert_eq!(http_get(s.metrics, "/healthz").map(|r| r.body).as_deref(), Some("ok"));
    assert!(proxy.try_exit().is_none(), "proxy exited: {}", proxy.log_text());
}

#[test]
fn malformed_objects_are_logged_counted_and_skipped() {
    let s = Setup::new();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(s.kubeconfig()).unwrap();
    api.apply(&node(NODE, "198.18.0.1")).unwrap();
    api.apply(&service("default", "good", "198.19.0.1", json!({}))).unwrap();
    api.apply(&slice("default", "good", "good-1", &[("198.18.1.1", NODE)])).unwrap();
    // Bad objects the API server would normally reject; the proxy must survive them.
    let bad_service: Value = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": "bad"},
        "spec": {"clusterIP": "198.19.0.999", "ports": [{"name": "x", "port": 70000, "protocol": "TCPX"}]}
    });
    let fqdn_slice: Value = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "good-fqdn", "labels": {"kubernetes.io/service-name": "good"}},
        "addressType": "FQDN", "endpoints": [{"addresses": ["pod.example.invalid"]}], "ports": [{"port": 80}]
    });
    api.apply_json(vec![bad_service, fqdn_slice]).unwrap();
    let mut proxy = s.start(s.flags());

    let sync = s.wait_sync(0, |x| x["v4"]["services"] == 1);
    assert_eq!(sync["v4"]["endpoints"]["default/good:http/TCP"], json!(["198.18.1.1:8080"]));
    let m = wait_for(T, || {
        let m = s.metrics_text();
        (metric_value(&m, "kubeproxy_invalid_objects_total", &[("kind", "EndpointSlice")])? >= 1.0).then_some(m)
    })
    .expect("invalid object metric");
    assert_eq!(metric_value(&m, "kubeproxy_invalid_objects_total", &[("kind", "Service")]), Some(1.0));
    let log = proxy.log_text();
    assert!(log.contains("default/bad") && log.contains("Skipping invalid object"), "log: {log}");

    // Other services keep working after the bad ones: a new good Service is programmed.
    let seen = s.syncs().len();
    api.apply(&service("default", "later", "198.19.0.3", json!({}))).unwrap();
    assert_eq!(changed(&s.wait_sync(seen, |x| !changed(x).is_empty())), ["default/later:http/TCP"]);
    assert!(proxy.try_exit().is_none(), "proxy must not exit on bad input");
}

#[test]
fn watches_recover_from_410_gone_and_server_side_closes() {
    let s = Setup::new();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(s.kubeconfig()).unwrap();
    api.apply(&node(NODE, "198.18.0.1")).unwrap();
    api.apply(&service("default", "a", "198.19.0.1", json!({}))).unwrap();
    let mut proxy = s.start(s.flags());
    s.wait_sync(0, |x| x["v4"]["services"] == 1);

    // Close every watch and forget history: the proxy must relist and converge, missing nothing.
    api.close_watches();
    api.compact();
    api.apply(&service("default", "b", "198.19.0.2", json!({}))).unwrap();
    api.delete::<k8s_openapi::api::core::v1::Service>("default", "a").unwrap();
    api.apply(&slice("default", "b", "b-1", &[("198.18.1.9", NODE)])).unwrap();
    let sync = s.wait_sync(0, |x| {
        x["v4"]["services"] == 1 && x["v4"]["endpoints"]["default/b:http/TCP"] == json!(["198.18.1.9:8080"])
    });
    assert!(sync["v4"]["services"] == 1);
    assert!(proxy.try_exit().is_none());
}

#[test]
fn config_file_is_loaded_and_its_change_stops_the_proxy() {
    let s = Setup::new();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(s.kubeconfig()).unwrap();
    api.apply(&node(NODE, "198.18.0.1")).unwrap();
    let cfg = s.dir.path().join("config.conf");
    let text = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclientConnection:\n  kubeconfig: {}\nhealthzBindAddress: {}\nmetricsBindAddress: {}\nclusterCIDR: 198.18.128.0/17\n",
        s.kubeconfig().display(),
        s.healthz,
        s.metrics
    );
    std::fs::write(&cfg, &text).unwrap();
    // --healthz-bind-address on the command line is ignored when --config is given (the file wins).
    let mut proxy = s.start(vec![
        format!("--config={}", cfg.display()),
        format!("--hostname-override={NODE}"),
        "--healthz-bind-address=127.0.0.1:1".into(),
    ]);
    s.wait_sync(0, |_| true);
    let configz = wait_for(T, || http_get(s.metrics, "/configz")).expect("configz");
    assert!(configz.body.contains("198.18.128.0/17"), "configz: {}", configz.body);
    assert_eq!(wait_for(T, || (status(s.healthz, "/healthz") == Some(200)).then_some(200)), Some(200));

    std::fs::write(&cfg, format!("{text}# edited\n")).unwrap();
    let exit = proxy.wait_exit(T).expect("proxy exits when its config file changes");
    assert!(!exit.success());
    assert!(proxy.log_text().contains("content of the proxy server's configuration file was updated"));
}

#[test]
fn kubeadm_config_map_loads_unchanged() {
    // kubeadm's config.conf as the ConfigMap carries it: zero values and nulls for defaulting to fill in.
    let s = Setup::new();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(s.kubeconfig()).unwrap();
    let cfg = s.dir.path().join("config.conf");
    let kubeadm = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cmd/kube-proxy/tests/testdata/kubeadm-config.conf"),
    )
    .unwrap()
    .replace("/var/lib/kube-proxy/kubeconfig.conf", &s.kubeconfig().display().to_string());
    std::fs::write(&cfg, kubeadm).unwrap();
    let out = std::process::Command::new(e2e::kube_proxy_bin())
        .args([
            format!("--config={}", cfg.display()),
            format!("--write-config-to={}", s.dir.path().join("out.yaml").display()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(s.dir.path().join("out.yaml")).unwrap();
    for line in [
        "healthzBindAddress: 0.0.0.0:10256",
        "metricsBindAddress: 127.0.0.1:10249",
        "  masqueradeBit: 14",
        "  syncPeriod: 30s",
        "  minSyncPeriod: 1s",
        "configSyncPeriod: 15m0s",
        "clusterCIDR: 10.244.0.0/16",
        "  maxPerCore: 32768",
    ] {
        assert!(written.lines().any(|l| l == line), "missing {line:?} in:\n{written}");
    }
}

#[test]
fn full_sync_of_ten_thousand_services_is_reported_with_rss() {
    // Not a timing assertion: prints the numbers the control-plane note quotes.
    const N: usize = 10_000;
    let s = Setup::new();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(s.kubeconfig()).unwrap();
    api.apply(&node(NODE, "198.18.0.1")).unwrap();
    let mut objs = Vec::with_capacity(2 * N);
    for i in 0..N {
        let ip = format!("198.19.{}.{}", i / 250, i % 250 + 1);
        let svc = serde_json::to_value(service("bench", &format!("s{i}"), &ip, json!({}))).unwrap();
        objs.push(svc);
        let eps: Vec<(String, &str)> =
            (0..10).map(|j| (format!("198.18.{}.{}", 100 + j, i % 250 + 1), "node-b")).collect();
        let eps: Vec<(&str, &str)> = eps.iter().map(|(a, n)| (a.as_str(), *n)).collect();
        objs.push(serde_json::to_value(slice("bench", &format!("s{i}"), &format!("s{i}-1"), &eps)).unwrap());
    }
    api.apply_json(objs).unwrap();
    let start = Instant::now();
    let proxy = s.start(s.flags());
    let sync = wait_for(Duration::from_secs(180), || s.syncs().into_iter().find(|x| x["v4"]["services"] == N))
        .expect("full sync of 10k services");
    let elapsed = start.elapsed();
    let rss = e2e::rss_kib(proxy.pid()).unwrap_or(0);
    assert_eq!(sync["v4"]["services"], N);
    println!(
        "full sync of {N} services x 10 endpoints: {:.2}s from process start to Backend::sync; RSS {} MiB",
        elapsed.as_secs_f64(),
        rss / 1024
    );
}

fn run_bin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(e2e::kube_proxy_bin()).args(args).output().expect("run kube-proxy")
}

#[test]
fn command_line_errors_and_info_match_upstream() {
    let out = run_bin(&["--bogus-flag"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Error: unknown flag: --bogus-flag"));

    let out = run_bin(&["positional"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(r#"does not take any arguments, got ["positional"]"#));

    let out = run_bin(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Kubernetes v1."));

    let out = run_bin(&["-h"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in
        ["--config", "--proxy-mode", "--cgroup-root", "--bpffs-root", "--iptables-sync-period", "--ipvs-scheduler"]
    {
        assert!(help.contains(flag), "{flag} missing from --help");
    }

    // Underscores normalise to dashes, as pflag does; an invalid value then fails validation with upstream's text.
    let out = run_bin(&["--iptables_masquerade_bit=32", "--write-config-to=/dev/null"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be within the range [0, 31]"));

    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(dir.path().join("kc")).unwrap();
    let kc = format!("--kubeconfig={}", dir.path().join("kc").display());
    let out = run_bin(&["--proxy-mode=nftables", &kc, "--healthz-bind-address=", "--metrics-bind-address="]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace for one test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kp-e2e-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    fn exec(&self, program: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ip netns exec");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn cleanup_removes_upstream_rules_in_its_namespace_and_exits_zero() {
    if !e2e::is_root() || std::process::Command::new("iptables-restore").arg("--version").output().is_err() {
        e2e::skip!("cleanup_removes_upstream_rules_in_its_namespace_and_exits_zero: needs root and iptables");
        return;
    }
    let ns = Netns::new("cleanup");
    let rules = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n";
    let out = ns.exec("iptables-restore", &["--noflush"], Some(rules));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pins = tempfile::tempdir().unwrap();
    let cg = tempfile::tempdir().unwrap();
    let bin = e2e::kube_proxy_bin();
    let out = ns.exec(
        bin.to_str().unwrap(),
        &[
            "--cleanup",
            &format!("--bpffs-root={}", pins.path().display()),
            &format!("--cgroup-root={}", cg.path().display()),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let saved = String::from_utf8_lossy(&ns.exec("iptables-save", &["-t", "nat"], None).stdout).into_owned();
    assert!(!saved.contains("KUBE-"), "leftovers after --cleanup:\n{saved}");
}

#[test]
fn health_check_node_port_follows_local_ready_endpoints() {
    let s = Setup::new();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(s.kubeconfig()).unwrap();
    api.apply(&node(NODE, "198.18.0.1")).unwrap();
    let hc_port = free_port();
    let lb = |port: u16| {
        service(
            "default",
            "lb",
            "198.19.0.7",
            json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": port,
                            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}),
        )
    };
    api.apply(&lb(hc_port)).unwrap();
    api.apply(&slice("default", "lb", "lb-1", &[("198.18.1.1", NODE), ("198.18.1.2", "node-b")])).unwrap();
    // Listen on loopback only: nodePortAddresses selects the node addresses health-check ports bind to.
    let mut flags = s.flags();
    flags.push("--nodeport-addresses=127.0.0.0/8".into());
    let _proxy = s.start(flags);
    let hc = SocketAddr::from(([127, 0, 0, 1], hc_port));

    let r = wait_for(T, || http_get(hc, "/").filter(|r| r.status == 200)).expect("health check port answers 200");
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );

    // The local endpoint goes away: 503 with zero local endpoints, so load balancers steer away.
    api.apply(&slice("default", "lb", "lb-1", &[("198.18.1.2", "node-b")])).unwrap();
    let r = wait_for(T, || http_get(hc, "/").filter(|r| r.status == 503)).expect("503 without local endpoints");
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("0"));

    // Switching the Service to Cluster policy closes the listener.
    api.apply(&service(
        "default",
        "lb",
        "198.19.0.7",
        json!({"spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}),
    ))
    .unwrap();
    assert!(wait_for(T, || http_get(hc, "/").is_none().then_some(())).is_some(), "listener closed");
}

#[test]
fn ipvs_mode_without_the_kernel_module_exits_naming_it() {
    if !e2e::is_root() {
        e2e::skip!("ipvs_mode_without_the_kernel_module_exits_naming_it: needs root for a network namespace");
        return;
    }
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        e2e::skip!("ipvs_mode_without_the_kernel_module_exits_naming_it: this kernel has IPVS");
        return;
    }
    // In a namespace of its own: whatever start-up touches stays there.
    let ns = Netns::new("ipvs");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kc"), "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: http://127.0.0.1:1\n  name: c\ncontexts:\n- context:\n    cluster: c\n    user: u\n  name: c\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n").unwrap();
    let bin = e2e::kube_proxy_bin();
    let kc = format!("--kubeconfig={}", dir.path().join("kc").display());
    let out = ns.exec(
        bin.to_str().unwrap(),
        &["--proxy-mode=ipvs", &kc, "--hostname-override=node-a", "--healthz-bind-address=", "--metrics-bind-address="],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ip_vs"), "the error must name the missing module: {stderr}");
}

/// Events as upstream records them (events.k8s.io/v1, reporting controller `kube-proxy`): `Starting` on the
/// Node; a Warning on the Service whose health-check node port cannot listen; under `--bind-address-hard-fail`
/// a Warning on the Node for a metrics address that cannot be bound, posted before the process exits 1.
#[test]
fn events_are_recorded_like_upstream() {
    use k8s_openapi::api::events::v1::Event;
    let find = |api: &ApiServer, reason: &str| {
        api.list::<Event>().unwrap().into_iter().find(|e| e.reason.as_deref() == Some(reason))
    };
    let s = Setup::new();
    let api = ApiServer::start_background("127.0.0.1:0".parse().unwrap()).unwrap();
    api.write_kubeconfig(s.kubeconfig()).unwrap();
    api.apply(&node(NODE, "198.18.0.1")).unwrap();
    // A health-check node port someone else holds (on loopback, which the proxy is told to use).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hc_port = taken.local_addr().unwrap().port();
    api.apply(&service(
        "default",
        "lb",
        "198.19.0.7",
        json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": hc_port,
                        "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}),
    ))
    .unwrap();
    api.apply(&slice("default", "lb", "lb-1", &[("198.18.1.1", NODE)])).unwrap();
    let mut flags = s.flags();
    flags.push("--nodeport-addresses=127.0.0.0/8".into());
    let mut proxy = s.start(flags);

    let start =
        wait_for(T, || find(&api, "Starting")).unwrap_or_else(|| panic!("no Starting event: {}", proxy.log_text()));
    assert_eq!(start.type_.as_deref(), Some("Normal"));
    assert_eq!(start.action.as_deref(), Some("StartKubeProxy"));
    assert_eq!(start.reporting_controller.as_deref(), Some("kube-proxy"));
    assert!(start.reporting_instance.as_deref().is_some_and(|i| i.starts_with("kube-proxy-")), "{start:?}");
    let r = start.regarding.clone().unwrap();
    assert_eq!((r.kind.as_deref(), r.name.as_deref(), r.uid.as_deref()), (Some("Node"), Some(NODE), Some(NODE)));
    assert_eq!(start.metadata.namespace.as_deref(), Some("default"));

    let hc = wait_for(T, || find(&api, "FailedToStartServiceHealthcheck"))
        .unwrap_or_else(|| panic!("no health-check event: {}", proxy.log_text()));
    assert_eq!(hc.type_.as_deref(), Some("Warning"));
    assert_eq!(hc.action.as_deref(), Some("Listen"));
    let r = hc.regarding.clone().unwrap();
    assert_eq!(
        (r.kind.as_deref(), r.namespace.as_deref(), r.name.as_deref()),
        (Some("Service"), Some("default"), Some("lb"))
    );
    let note = hc.note.clone().unwrap_or_default();
    assert!(
        note.starts_with(&format!("node {NODE} failed to start healthcheck \"default/lb\" on port {hc_port}")),
        "{note}"
    );
    // Retried on later syncs, but posted once.
    std::thread::sleep(Duration::from_millis(1500));
    let n = api
        .list::<Event>()
        .unwrap()
        .iter()
        .filter(|e| e.reason.as_deref() == Some("FailedToStartServiceHealthcheck"))
        .count();
    assert_eq!(n, 1, "a repeated failure is not posted again");
    assert!(proxy.try_exit().is_none(), "proxy exited: {}", proxy.log_text());
    drop(proxy);

    // --bind-address-hard-fail with the metrics address taken: Warning on the Node, then exit 1.
    let s2 = Setup::new();
    api.write_kubeconfig(s2.kubeconfig()).unwrap();
    let held = std::net::TcpListener::bind(s2.metrics).unwrap();
    let mut flags = s2.flags();
    flags.push("--bind-address-hard-fail".into());
    let mut proxy = s2.start(flags);
    let status = proxy.wait_exit(T).unwrap_or_else(|| panic!("did not exit: {}", proxy.log_text()));
    assert_eq!(status.code(), Some(1), "{}", proxy.log_text());
    let ev = find(&api, "FailedToStartMetricServer").unwrap_or_else(|| panic!("no event: {}", proxy.log_text()));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.regarding.and_then(|r| r.name).as_deref(), Some(NODE));
    drop(held);
    drop(taken);
}
