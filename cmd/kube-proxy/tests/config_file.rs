//! The configuration file: decoding, defaulting, validation, precedence and canonical writing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube_proxy::config::{
    ConfigError, GoDuration, KubeProxyConfiguration, ProxyMode, VModuleItem, decode_config, load_config_file, validate,
};
use kube_proxy::options::{ProxyRunConfig, parse_command_line, resolve_with_hostname};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/testdata").join(name)
}

fn run(list: &[&str]) -> Result<ProxyRunConfig, ConfigError> {
    let argv = std::iter::once("kube-proxy").chain(list.iter().copied()).map(OsString::from);
    let cmd = parse_command_line(argv).expect("parses");
    resolve_with_hostname(cmd, || Ok("os-host".into()))
}

fn decode(text: &str) -> KubeProxyConfiguration {
    decode_config(text, Path::new("inline.yaml")).expect("decodes").config
}

/// Reads one field of a configuration as text.
type Getter = fn(&KubeProxyConfiguration) -> String;
/// Changes a configuration in place.
type Mutation = Box<dyn FnOnce(&mut KubeProxyConfiguration)>;

const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

#[test]
fn write_config_for_defaults_is_the_canonical_yaml() {
    let canonical = std::fs::read_to_string(testdata("canonical-defaults.yaml")).unwrap();
    let ours = KubeProxyConfiguration::defaulted().to_yaml();
    assert_eq!(ours, canonical);
    // And through the command line, written to a file.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("written.yaml");
    let r = run(&["--write-config-to", out.to_str().unwrap()]).unwrap();
    r.config.write_yaml_file(r.write_config_to.as_deref().unwrap()).unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), canonical);
}

#[test]
fn canonical_yaml_loads_back_to_defaults() {
    let d = load_config_file(&testdata("canonical-defaults.yaml")).unwrap();
    assert!(d.strict_error.is_none(), "{:?}", d.strict_error);
    assert_eq!(d.config, KubeProxyConfiguration::defaulted());
}

#[test]
fn kubeadm_config_conf_loads_to_defaults() {
    let d = load_config_file(&testdata("kubeadm-config.conf")).unwrap();
    assert!(d.strict_error.is_none(), "kubeadm's file must decode strictly: {:?}", d.strict_error);
    let mut want = KubeProxyConfiguration::defaulted();
    want.client_connection.kubeconfig = "/var/lib/kube-proxy/kubeconfig.conf".into();
    want.cluster_cidr = "10.244.0.0/16".into();
    assert_eq!(d.config, want);
    validate(&d.config).unwrap();

    // As kubeadm runs it: --config plus --hostname-override.
    let r = run(&[
        "--config=".to_string() + testdata("kubeadm-config.conf").to_str().unwrap(),
        "--hostname-override=Node-3".into(),
    ]
    .iter()
    .map(String::as_str)
    .collect::<Vec<_>>())
    .unwrap();
    assert_eq!(r.hostname, "node-3");
    assert_eq!(r.config.hostname_override, "node-3");
    assert_eq!(r.mode, ProxyMode::Ebpf);
    assert_eq!(r.cluster_cidrs().unwrap(), vec!["10.244.0.0/16".parse().unwrap()]);
    assert_eq!(r.sync_period(), Duration::from_secs(30));
    assert_eq!(r.min_sync_period(), Duration::from_secs(1));
    assert_eq!(r.healthz_bind_address(), Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(r.metrics_bind_address(), Some("127.0.0.1:10249".parse().unwrap()));
    assert_eq!(r.config.client_connection.kubeconfig, "/var/lib/kube-proxy/kubeconfig.conf");
}

#[test]
fn unknown_fields_fall_back_to_lenient_decoding() {
    let d = load_config_file(&testdata("unknown-field.yaml")).unwrap();
    assert_eq!(
        d.strict_error.as_deref(),
        Some("strict decoding error: unknown field \"bogusTopLevel\", unknown field \"iptables.notAField\"")
    );
    assert_eq!(d.config.mode, "iptables");
    assert_eq!(d.config.iptables.masquerade_bit, Some(12));
    let r = run(&["--config", testdata("unknown-field.yaml").to_str().unwrap()]).unwrap();
    assert!(r.lenient_decoding_error.is_some());
    assert_eq!(r.mode, ProxyMode::Iptables);
}

#[test]
fn duplicate_fields_fall_back_to_lenient_decoding_last_wins() {
    let d = load_config_file(&testdata("duplicate-field.yaml")).unwrap();
    assert_eq!(d.strict_error.as_deref(), Some("strict decoding error: duplicate field \"mode\""));
    assert_eq!(d.config.mode, "iptables");
    assert_eq!(d.config.cluster_cidr, "10.0.0.0/8");
}

#[test]
fn nested_unknown_in_list_items_and_maps() {
    let d = decode_config(
        &format!("{HEADER}featureGates:\n  AnyName: true\nlogging:\n  vmodule:\n  - filePattern: a\n    verbosity: 2\n    x: 1\n"),
        Path::new("f"),
    )
    .unwrap();
    assert_eq!(d.strict_error.as_deref(), Some("strict decoding error: unknown field \"logging.vmodule[0].x\""));
    assert_eq!(d.config.logging.vmodule, vec![VModuleItem { file_pattern: "a".into(), verbosity: 2 }]);
}

#[test]
fn wrong_type_or_version_is_a_clear_error() {
    let e = load_config_file(&testdata("wrong-kind.yaml")).unwrap_err().to_string();
    assert!(e.contains("no kind \"KubeletConfiguration\" is registered"), "{e}");
    assert!(e.contains("wrong-kind.yaml"), "{e}");
    let e = load_config_file(&testdata("wrong-version.yaml")).unwrap_err().to_string();
    assert!(e.contains("\"kubeproxy.config.k8s.io/v1beta1\""), "{e}");
    assert!(e.contains("expected apiVersion \"kubeproxy.config.k8s.io/v1alpha1\""), "{e}");
    let e = decode_config("mode: iptables\n", Path::new("nokind.yaml")).unwrap_err().to_string();
    assert!(e.contains("Object 'Kind' is missing"), "{e}");
    // A type error is fatal even for the lenient decoder.
    let e = decode_config(&format!("{HEADER}iptables:\n  syncPeriod: soon\n"), Path::new("t.yaml")).unwrap_err();
    assert!(e.to_string().contains("time: invalid duration \"soon\""), "{e}");
    let e = load_config_file(Path::new("/nonexistent/kube-proxy.yaml")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/kube-proxy.yaml"), "{e}");
}

#[test]
fn defaulting_table() {
    // Each zero value is replaced by its default.
    let cases: &[(&str, Getter, &str)] = &[
        ("clientConnection:\n  qps: 0\n", |c| c.client_connection.qps.to_string(), "5"),
        ("clientConnection:\n  burst: 0\n", |c| c.client_connection.burst.to_string(), "10"),
        (
            "clientConnection:\n  contentType: \"\"\n",
            |c| c.client_connection.content_type.clone(),
            "application/vnd.kubernetes.protobuf",
        ),
        ("iptables:\n  syncPeriod: 0s\n", |c| c.iptables.sync_period.to_string(), "30s"),
        ("iptables:\n  minSyncPeriod: 0s\n", |c| c.iptables.min_sync_period.to_string(), "1s"),
        ("nftables:\n  minSyncPeriod: 0s\n", |c| c.nftables.min_sync_period.to_string(), "1s"),
        ("nftables:\n  syncPeriod: 0s\n", |c| c.nftables.sync_period.to_string(), "30s"),
        ("ipvs:\n  syncPeriod: 0s\n", |c| c.ipvs.sync_period.to_string(), "30s"),
        ("ipvs:\n  minSyncPeriod: 0s\n", |c| c.ipvs.min_sync_period.to_string(), "0s"),
        ("configSyncPeriod: 0s\n", |c| c.config_sync_period.to_string(), "15m0s"),
        ("healthzBindAddress: \"\"\n", |c| c.healthz_bind_address.clone(), "0.0.0.0:10256"),
        ("metricsBindAddress: \"\"\n", |c| c.metrics_bind_address.clone(), "127.0.0.1:10249"),
        ("healthzBindAddress: 10.1.2.3\n", |c| c.healthz_bind_address.clone(), "10.1.2.3:10256"),
        ("metricsBindAddress: 0.0.0.0\n", |c| c.metrics_bind_address.clone(), "0.0.0.0:10249"),
        ("metricsBindAddress: \"::\"\n", |c| c.metrics_bind_address.clone(), "[::]:10249"),
        ("bindAddress: \"::\"\n", |c| c.healthz_bind_address.clone(), "[::]:10256"),
        ("bindAddress: \"::\"\n", |c| c.metrics_bind_address.clone(), "[::1]:10249"),
        ("bindAddress: \"\"\n", |c| c.bind_address.clone(), "0.0.0.0"),
        ("iptables:\n  masqueradeBit: null\n", |c| format!("{:?}", c.iptables.masquerade_bit), "Some(14)"),
        ("nftables:\n  masqueradeBit: null\n", |c| format!("{:?}", c.nftables.masquerade_bit), "Some(14)"),
        ("iptables:\n  localhostNodePorts: null\n", |c| format!("{:?}", c.iptables.localhost_node_ports), "Some(true)"),
        ("oomScoreAdj: null\n", |c| format!("{:?}", c.oom_score_adj), "Some(-999)"),
        ("conntrack:\n  maxPerCore: null\n", |c| format!("{:?}", c.conntrack.max_per_core), "Some(32768)"),
        ("conntrack:\n  min: null\n", |c| format!("{:?}", c.conntrack.min), "Some(131072)"),
        (
            "conntrack:\n  tcpEstablishedTimeout: null\n",
            |c| c.conntrack.tcp_established_timeout.unwrap().to_string(),
            "24h0m0s",
        ),
        (
            "conntrack:\n  tcpCloseWaitTimeout: null\n",
            |c| c.conntrack.tcp_close_wait_timeout.unwrap().to_string(),
            "1h0m0s",
        ),
        ("logging:\n  flushFrequency: 0\n", |c| c.logging.flush_frequency.to_string(), "5s"),
        ("logging:\n  format: \"\"\n", |c| c.logging.format.clone(), "text"),
        // Explicit non-zero values survive, including a zero pointer value.
        ("oomScoreAdj: 0\n", |c| format!("{:?}", c.oom_score_adj), "Some(0)"),
        ("conntrack:\n  maxPerCore: 0\n", |c| format!("{:?}", c.conntrack.max_per_core), "Some(0)"),
        (
            "iptables:\n  localhostNodePorts: false\n",
            |c| format!("{:?}", c.iptables.localhost_node_ports),
            "Some(false)",
        ),
        ("iptables:\n  syncPeriod: 1m\n", |c| c.iptables.sync_period.to_string(), "1m0s"),
        ("healthzBindAddress: 1.2.3.4:99\n", |c| c.healthz_bind_address.clone(), "1.2.3.4:99"),
        ("nodePortAddresses: []\n", |c| format!("{:?}", c.node_port_addresses), "Some([])"),
        ("nodePortAddresses: null\n", |c| format!("{:?}", c.node_port_addresses), "None"),
    ];
    for (body, get, want) in cases {
        let c = decode(&format!("{HEADER}{body}"));
        assert_eq!(get(&c), *want, "for {body:?}");
    }
}

#[test]
fn ipv6_file_and_mode_ebpf() {
    let d = load_config_file(&testdata("minimal-ipv6.yaml")).unwrap();
    assert_eq!(d.config.healthz_bind_address, "[fd00::1]:10256");
    assert_eq!(d.config.metrics_bind_address, "[::1]:10249");
    assert_eq!(d.config.proxy_mode(), Some(ProxyMode::Ebpf));
    validate(&d.config).unwrap();
    assert_eq!(d.config.healthz_socket_addr(), Some("[fd00::1]:10256".parse().unwrap()));
}

fn validation_error(mutate: impl FnOnce(&mut KubeProxyConfiguration)) -> String {
    let mut c = KubeProxyConfiguration::defaulted();
    mutate(&mut c);
    validate(&c).expect_err("must be invalid").to_string()
}

#[test]
fn validation_table_with_upstream_messages() {
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|c| c.iptables.masquerade_bit = Some(32)),
            "KubeProxyConfiguration.KubeProxyIPTablesConfiguration.MasqueradeBit: Invalid value: 32: must be within \
             the range [0, 31]",
        ),
        (
            Box::new(|c| {
                c.mode = "nftables".into();
                c.nftables.masquerade_bit = Some(-1);
            }),
            "KubeProxyConfiguration.KubeProxyNFTablesConfiguration.MasqueradeBit: Invalid value: -1: must be within \
             the range [0, 31]",
        ),
        (
            Box::new(|c| c.mode = "bogus".into()),
            "KubeProxyConfiguration.Mode.ProxyMode: Invalid value: \"bogus\": must be ebpf, iptables, ipvs, nftables \
             or blank (blank means the best-available proxy [currently ebpf])",
        ),
        (
            Box::new(|c| {
                c.iptables.sync_period = GoDuration::from_secs(1);
                c.iptables.min_sync_period = GoDuration::from_secs(5);
            }),
            "KubeProxyConfiguration.SyncPeriod: Invalid value: 5s: must be greater than or equal to \
             KubeProxyConfiguration.MinSyncPeriod",
        ),
        (
            Box::new(|c| c.metrics_bind_address = "127.0.0.1".into()),
            "KubeProxyConfiguration.MetricsBindAddress: Invalid value: \"127.0.0.1\": must be IP:port",
        ),
        (
            Box::new(|c| c.metrics_bind_address = "localhost:10249".into()),
            "KubeProxyConfiguration.MetricsBindAddress: Invalid value: \"localhost\": must be a valid IP",
        ),
        (
            Box::new(|c| c.healthz_bind_address = "0.0.0.0:70000".into()),
            "KubeProxyConfiguration.HealthzBindAddress: Invalid value: \"70000\": must be a valid port",
        ),
        (
            Box::new(|c| c.healthz_bind_address = "0.0.0.0:0".into()),
            "KubeProxyConfiguration.HealthzBindAddress: Invalid value: \"0\": must be a valid port",
        ),
        (
            Box::new(|c| c.node_port_addresses = Some(vec!["10.0.0.0/8".into(), "bogus".into()])),
            "KubeProxyConfiguration.NodePortAddresses[1]: Invalid value: \"bogus\": must be a valid CIDR",
        ),
        (
            Box::new(|c| c.node_port_addresses = Some(vec!["10.0.0.0/8".into(), "primary".into()])),
            "KubeProxyConfiguration.NodePortAddresses[1]: Invalid value: \"primary\": can't use both 'primary' and \
             CIDRs",
        ),
        (
            Box::new(|c| c.detect_local_mode = "BridgeInterface".into()),
            "KubeProxyConfiguration.DetectLocalConfiguration.InterfaceName: Invalid value: \"\": must not be empty",
        ),
        (
            Box::new(|c| c.detect_local_mode = "InterfaceNamePrefix".into()),
            "KubeProxyConfiguration.DetectLocalConfiguration.InterfacePrefix: Invalid value: \"\": must not be empty",
        ),
        (
            Box::new(|c| c.detect_local_mode = "Guess".into()),
            "KubeProxyConfiguration.DetectLocalMode: Unsupported value: \"Guess\": supported values: \
             \"ClusterCIDR\", \"NodeCIDR\", \"BridgeInterface\", \"InterfaceNamePrefix\", \"\"",
        ),
        (
            Box::new(|c| c.conntrack.max_per_core = Some(-1)),
            "KubeProxyConfiguration.KubeProxyLinuxConfiguration.KubeProxyConntrackConfiguration.MaxPerCore: Invalid \
             value: -1: must be greater than or equal to 0",
        ),
        (
            Box::new(|c| c.conntrack.udp_timeout = GoDuration::from_secs(-5)),
            "KubeProxyConfiguration.KubeProxyLinuxConfiguration.KubeProxyConntrackConfiguration.UDPTimeout: Invalid \
             value: -5s: must be greater than or equal to 0",
        ),
        (
            Box::new(|c| c.oom_score_adj = Some(1001)),
            "KubeProxyConfiguration.KubeProxyLinuxConfiguration.OOMScoreAdj: Invalid value: 1001: must be within the \
             range [-1000, 1000]",
        ),
        (
            Box::new(|c| {
                c.mode = "ipvs".into();
                c.ipvs.scheduler = "fastest".into();
            }),
            "KubeProxyConfiguration.KubeProxyIPVSConfiguration.Scheduler.Scheduler: Invalid value: \"fastest\": must \
             be in [rr wrr lc wlc lblc lblcr sh dh sed nq mh ], blank means the default algorithm method (currently \
             rr)",
        ),
        (
            Box::new(|c| {
                c.mode = "ipvs".into();
                c.ipvs.exclude_cidrs = Some(vec!["10.0.0.1".into()]);
            }),
            "KubeProxyConfiguration.KubeProxyIPVSConfiguration.ExcludeCidrs[0]: Invalid value: \"10.0.0.1\": must be \
             a valid CIDR",
        ),
        (
            Box::new(|c| c.cluster_cidr = "10.0.0.0/33".into()),
            "KubeProxyConfiguration.DetectLocalConfiguration.ClusterCIDRs[0]: Invalid value: \"10.0.0.0/33\": must \
             be a valid CIDR block (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)",
        ),
        (
            Box::new(|c| c.cluster_cidr = "10.0.0.0/8,10.1.0.0/16".into()),
            "KubeProxyConfiguration.DetectLocalConfiguration.ClusterCIDRs: Invalid value: []string{\"10.0.0.0/8\", \
             \"10.1.0.0/16\"}: must be a either a single CIDR or dual-stack pair of CIDRs (e.g. [10.100.0.0/16, \
             fde4:8dba:82e1::/48]",
        ),
        (
            Box::new(|c| c.client_connection.burst = -1),
            "KubeProxyConfiguration.ClientConnection.Burst: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            Box::new(|c| c.config_sync_period = GoDuration::from_secs(-1)),
            "KubeProxyConfiguration.ConfigSyncPeriod: Invalid value: -1s: must be greater than 0",
        ),
        (
            Box::new(|c| c.bind_address = "nowhere".into()),
            "KubeProxyConfiguration.BindAddress: Invalid value: \"nowhere\": not a valid textual representation of \
             an IP address",
        ),
        (
            Box::new(|c| c.port_range = "5-1".into()),
            "KubeProxyConfiguration.PortRange: Invalid value: \"5-1\": must be a valid port range (e.g. 300-2000)",
        ),
        (
            Box::new(|c| c.show_hidden_metrics_for_version = "1.30".into()),
            "KubeProxyConfiguration.ShowHiddenMetricsForVersion: Invalid value: \"1.30\": \
             --show-hidden-metrics-for-version must be omitted or have the value '1.36'. Only the previous minor \
             version is allowed",
        ),
        (
            Box::new(|c| c.logging.format = "xml".into()),
            "KubeProxyConfiguration.logging.format: Invalid value: \"xml\": Unsupported log format",
        ),
    ];
    for (mutate, want) in cases {
        assert_eq!(validation_error(mutate), want);
    }
}

#[test]
fn validation_accepts_what_it_should() {
    let ok: Vec<Mutation> = vec![
        Box::new(|_| {}),
        Box::new(|c| c.mode = "ebpf".into()),
        Box::new(|c| c.mode = "nftables".into()),
        Box::new(|c| c.healthz_bind_address = String::new()),
        Box::new(|c| c.metrics_bind_address = String::new()),
        Box::new(|c| c.cluster_cidr = "10.0.0.0/8,fd00::/48".into()),
        Box::new(|c| c.node_port_addresses = Some(vec!["primary".into()])),
        Box::new(|c| {
            c.detect_local_mode = "BridgeInterface".into();
            c.detect_local.bridge_interface = "cbr0".into();
        }),
        // Non-ClusterCIDR modes do not look at clusterCIDR, like upstream.
        Box::new(|c| {
            c.detect_local_mode = "NodeCIDR".into();
            c.cluster_cidr = "junk".into();
        }),
        // ipvs-only checks are skipped in other modes.
        Box::new(|c| c.ipvs.scheduler = "fastest".into()),
        Box::new(|c| {
            c.mode = "ipvs".into();
            c.ipvs.scheduler = "mh".into();
        }),
        Box::new(|c| c.show_hidden_metrics_for_version = "1.36".into()),
        Box::new(|c| c.logging.format = "json".into()),
    ];
    for (i, mutate) in ok.into_iter().enumerate() {
        let mut c = KubeProxyConfiguration::defaulted();
        mutate(&mut c);
        assert_eq!(validate(&c), Ok(()), "case {i}");
    }
}

#[test]
fn validation_aggregates_all_errors() {
    let msg = validation_error(|c| {
        c.iptables.masquerade_bit = Some(40);
        c.mode = "bogus".into();
        c.oom_score_adj = Some(-2000);
    });
    assert!(msg.starts_with('[') && msg.ends_with(']'), "{msg}");
    assert!(msg.contains("MasqueradeBit: Invalid value: 40"));
    assert!(msg.contains("Mode.ProxyMode: Invalid value: \"bogus\""));
    assert!(msg.contains("OOMScoreAdj: Invalid value: -2000"));
    assert_eq!(msg.matches(", KubeProxyConfiguration.").count(), 2);
}

#[test]
fn validation_runs_on_the_resolved_config() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, format!("{HEADER}iptables:\n  masqueradeBit: 32\n")).unwrap();
    let err = run(&["--config", f.to_str().unwrap()]).unwrap_err();
    assert!(matches!(err, ConfigError::Validation(_)));
    assert!(err.to_string().starts_with("KubeProxyConfiguration.KubeProxyIPTablesConfiguration.MasqueradeBit"));
    let err = run(&["--iptables-masquerade-bit=32"]).unwrap_err();
    assert!(err.to_string().contains("Invalid value: 32: must be within the range [0, 31]"));
}

#[test]
fn config_file_replaces_flags_but_command_line_only_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(
        &f,
        format!(
            "{HEADER}mode: iptables\nhostnameOverride: From-File\nclientConnection:\n  kubeconfig: /file/kubeconfig\n\
             logging:\n  verbosity: 2\n  vmodule:\n  - filePattern: file\n    verbosity: 3\n\
             iptables:\n  syncPeriod: 45s\nfeatureGates:\n  FromFile: true\n"
        ),
    )
    .unwrap();
    let file = f.to_str().unwrap();

    // Non-logging flags are overwritten by the file, whatever their position.
    let r = run(&[
        "--proxy-mode=ipvs",
        "--kubeconfig=/flag/kubeconfig",
        "--config",
        file,
        "--iptables-sync-period=5s",
        "--feature-gates=FromFlag=true",
        "--metrics-bind-address=0.0.0.0:1",
    ])
    .unwrap();
    assert_eq!(r.mode, ProxyMode::Iptables);
    assert_eq!(r.config.client_connection.kubeconfig, "/file/kubeconfig");
    assert_eq!(r.sync_period(), Duration::from_secs(45));
    assert_eq!(r.feature_gates.keys().collect::<Vec<_>>(), vec!["FromFile"]);
    assert_eq!(r.metrics_bind_address(), Some("127.0.0.1:10249".parse().unwrap()));
    assert_eq!(r.hostname, "from-file");
    assert_eq!(r.verbosity, 2);

    // Command-line-only flags and explicitly given logging flags still win.
    let r = run(&[
        "--config",
        file,
        "--hostname-override=Flag-Host",
        "--master=https://api:6443",
        "--cleanup",
        "--init-only",
        "--cgroup-root=/sys/fs/cgroup/x",
        "--bpffs-root=/sys/fs/bpf/y",
        "-v=5",
        "--vmodule=flag=1",
        "--logging-format=json",
    ])
    .unwrap();
    assert_eq!(r.hostname, "flag-host");
    assert_eq!(r.config.hostname_override, "flag-host");
    assert_eq!(r.master.as_deref(), Some("https://api:6443"));
    assert!(r.cleanup && r.init_only);
    assert_eq!(r.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup/x")));
    assert_eq!(r.bpffs_root, PathBuf::from("/sys/fs/bpf/y"));
    assert_eq!(r.verbosity, 5);
    assert_eq!(r.logging_format, "json");
    let patterns: Vec<&str> = r.vmodule.iter().map(|v| v.file_pattern.as_str()).collect();
    assert_eq!(patterns, vec!["flag", "file"], "flag vmodule entries come first, the file's are kept");
    assert_eq!(r.config_file, Some(f.clone()));
}

#[test]
fn mode_settings_follow_the_mode_in_files() {
    let c = decode(&format!(
        "{HEADER}mode: ipvs\nipvs:\n  syncPeriod: 20s\n  minSyncPeriod: 0s\niptables:\n  masqueradeAll: true\n"
    ));
    assert_eq!(c.mode_settings(), (GoDuration::from_secs(20), GoDuration::ZERO, true));
    let c = decode(&format!("{HEADER}mode: nftables\nnftables:\n  masqueradeAll: true\n  masqueradeBit: 3\n"));
    assert_eq!(c.mode_settings(), (GoDuration::from_secs(30), GoDuration::from_secs(1), true));
    assert_eq!(c.masquerade_bit(), 3);
    assert_eq!(c.effective_node_port_addresses(), vec!["primary".to_string()]);
}

#[test]
fn configz_json_shape() {
    let c = KubeProxyConfiguration::defaulted();
    let v = c.configz_json();
    let inner = &v["kubeproxy.config.k8s.io"];
    assert_eq!(inner["iptables"]["syncPeriod"], "30s");
    assert_eq!(inner["conntrack"]["tcpEstablishedTimeout"], "24h0m0s");
    assert_eq!(inner["nodePortAddresses"], serde_json::Value::Null);
    assert_eq!(inner["clientConnection"]["qps"], 5);
    assert!(inner.get("featureGates").is_none());
}
