//! Command-line behaviour of `kube-proxy`, through the library API.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use kube_proxy::config::{GoDuration, ProxyMode};
use kube_proxy::options::{
    CliExit, CommandLine, FLAGS, ProxyRunConfig, help_text, parse_command_line, resolve_with_hostname, version_string,
};

fn args(list: &[&str]) -> Vec<OsString> {
    std::iter::once("kube-proxy").chain(list.iter().copied()).map(OsString::from).collect()
}

fn parse(list: &[&str]) -> CommandLine {
    match parse_command_line(args(list)) {
        Ok(c) => c,
        Err(e) => panic!("{list:?} did not parse: {e:?}"),
    }
}

fn exit(list: &[&str]) -> CliExit {
    match parse_command_line(args(list)) {
        Ok(_) => panic!("{list:?} parsed but should not have"),
        Err(e) => e,
    }
}

fn run(list: &[&str]) -> ProxyRunConfig {
    resolve_with_hostname(parse(list), || Ok("Test-Host".into())).expect("resolves")
}

fn testdata(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/testdata").join(name).display().to_string()
}

#[test]
fn help_lists_every_flag_and_exits_zero() {
    for form in [&["--help"][..], &["-h"][..], &["--config=x", "-h"][..]] {
        let e = exit(form);
        assert_eq!(e.code, 0);
        assert!(e.stderr.is_empty());
        assert_eq!(e.stdout, help_text());
    }
    let help = help_text();
    assert!(help.contains("Usage:\n  kube-proxy [flags]\n\nFlags:\n"));
    for f in FLAGS {
        let needle = format!("--{} ", f.name);
        if f.deprecated.is_some() {
            // pflag hides deprecated flags from the usage.
            assert!(!help.contains(&needle), "deprecated --{} must be hidden", f.name);
        } else {
            assert!(help.contains(&needle) || help.contains(&format!("--{}\n", f.name)), "--{} missing", f.name);
        }
    }
    // Ours are documented too, with their defaults and types rendered pflag-style.
    assert!(help.contains("--bpffs-root string"));
    assert!(help.contains("(default \"/sys/fs/bpf/kube-proxy-rs\")"));
    assert!(help.contains("--cgroup-root string"));
    assert!(help.contains("  -v, --v Level"));
    assert!(help.contains("--version version[=true]"));
    assert!(help.contains("--iptables-sync-period duration"));
    assert!(help.contains("(default 30s)"));
    assert!(help.contains("--kube-api-qps float32"));
    assert!(help.contains("--healthz-bind-address ipport"));
    assert!(help.contains("(default 0.0.0.0:10256)"));
    assert!(help.contains("--iptables-localhost-nodeports "));
    assert!(help.contains("(default true)"));
    assert!(help.contains("'ebpf'"));
}

#[test]
fn help_columns_are_aligned() {
    let help = help_text();
    let usages: Vec<&str> = help.lines().skip_while(|l| *l != "Flags:").skip(1).collect();
    let flag_lines: Vec<&&str> = usages.iter().filter(|l| l.trim_start().starts_with('-')).collect();
    assert!(flag_lines.len() > 50);
    // The description starts after the first run of two or more spaces that follows the flag name.
    let column = |l: &str| {
        let lead = l.len() - l.trim_start().len();
        let gap = l[lead..].find("  ")? + lead;
        Some(gap + l[gap..].find(|c: char| c != ' ')?)
    };
    let first = column(flag_lines[0]).unwrap();
    for l in &flag_lines {
        assert_eq!(column(l), Some(first), "misaligned: {l}");
    }
}

#[test]
fn underscores_in_flag_names_are_dashes() {
    let c = parse(&["--hostname_override=Node-1", "--iptables_sync_period", "10s", "--bind_address_hard_fail"]);
    assert!(c.is_set("hostname-override"));
    let r = resolve_with_hostname(c, || Ok("x".into())).unwrap();
    assert_eq!(r.hostname, "node-1");
    assert_eq!(r.sync_period(), Duration::from_secs(10));
    assert!(r.config.bind_address_hard_fail);
}

#[test]
fn unknown_flag_prints_usage_then_error() {
    let e = exit(&["--foo"]);
    assert_eq!(e.code, 1);
    assert!(e.stdout.is_empty());
    assert!(e.stderr.starts_with("Usage:\n  kube-proxy [flags]\n"), "{}", e.stderr);
    assert!(e.stderr.ends_with("\nError: unknown flag: --foo\n"), "{}", e.stderr);
    // The name is reported as typed.
    assert!(exit(&["--foo_bar=1"]).stderr.ends_with("Error: unknown flag: --foo_bar\n"));
    assert!(exit(&["-x"]).stderr.ends_with("Error: unknown shorthand flag: 'x' in -x\n"));
}

#[test]
fn positional_arguments_are_rejected() {
    let e = exit(&["x"]);
    assert_eq!(e.code, 1);
    assert_eq!(e.stderr, "Error: \"kube-proxy\" does not take any arguments, got [\"x\"]\n");
    let e = exit(&["--cleanup", "a", "--", "--b"]);
    assert_eq!(e.stderr, "Error: \"kube-proxy\" does not take any arguments, got [\"a\" \"--b\"]\n");
    // Empty arguments (unset shell variables) are tolerated, as upstream does.
    parse(&["", "--cleanup"]);
}

#[test]
fn flag_value_errors_use_pflag_wording() {
    let e = exit(&["--kube-api-burst=abc"]);
    assert!(
        e.stderr.ends_with(
            "Error: invalid argument \"abc\" for \"--kube-api-burst\" flag: strconv.ParseInt: parsing \"abc\": \
             invalid syntax\n"
        ),
        "{}",
        e.stderr
    );
    let e = exit(&["--iptables-sync-period=5"]);
    assert!(e.stderr.contains("time: missing unit in duration \"5\""), "{}", e.stderr);
    let e = exit(&["-v", "x"]);
    assert!(e.stderr.contains("invalid argument \"x\" for \"-v, --v\" flag"), "{}", e.stderr);
    let e = exit(&["--bind-address=1.2.3"]);
    assert!(e.stderr.contains("\"1.2.3\" is not a valid IP address"), "{}", e.stderr);
    let e = exit(&["--config"]);
    assert!(e.stderr.ends_with("Error: flag needs an argument: --config\n"), "{}", e.stderr);
    let e = exit(&["--cleanup=maybe"]);
    assert!(e.stderr.contains("strconv.ParseBool: parsing \"maybe\": invalid syntax"), "{}", e.stderr);
    let e = exit(&["--feature-gates=Foo"]);
    assert!(e.stderr.contains("missing bool value for Foo"), "{}", e.stderr);
}

#[test]
fn bool_and_value_forms() {
    assert!(run(&["--cleanup"]).cleanup);
    assert!(run(&["--cleanup=true"]).cleanup);
    assert!(!run(&["--cleanup=false"]).cleanup);
    assert!(run(&["--init-only=1"]).init_only);
    // A bool flag never takes the next argument, so it becomes a positional one.
    assert_eq!(exit(&["--cleanup", "false"]).code, 1);
    assert_eq!(run(&["--master", "https://1.2.3.4:6443"]).master.as_deref(), Some("https://1.2.3.4:6443"));
    assert_eq!(run(&["--master=https://x"]).master.as_deref(), Some("https://x"));
    assert_eq!(run(&[]).master, None);
    // A value may start with a dash when given separately.
    assert_eq!(run(&["--oom-score-adj", "-500"]).config.oom_score_adj, Some(-500));
}

#[test]
fn verbosity_forms() {
    assert_eq!(run(&["-v", "3"]).verbosity, 3);
    assert_eq!(run(&["-v=4"]).verbosity, 4);
    assert_eq!(run(&["-v5"]).verbosity, 5);
    assert_eq!(run(&["--v=6"]).verbosity, 6);
    assert_eq!(run(&["--v", "7"]).verbosity, 7);
    assert_eq!(run(&[]).verbosity, 0);
    let r = run(&["--vmodule=proxier=4,watch=2", "--vmodule", "sync=1", "--logging-format=json"]);
    let v: Vec<(String, u32)> = r.vmodule.iter().map(|i| (i.file_pattern.clone(), i.verbosity)).collect();
    assert_eq!(v, vec![("proxier".into(), 4), ("watch".into(), 2), ("sync".into(), 1)]);
    assert_eq!(r.logging_format, "json");
}

#[test]
fn version_prints_and_exits_zero() {
    let e = exit(&["--version"]);
    assert_eq!(e.code, 0);
    assert_eq!(e.stdout, "Kubernetes v1.37.0-kube-proxy-rs.0.1.0\n");
    assert_eq!(e.stdout, format!("Kubernetes {}\n", version_string()));
    let raw = exit(&["--version=raw"]);
    assert_eq!(raw.code, 0);
    assert!(raw.stdout.starts_with("version.Info{Major:\"1\", Minor:\"37\""));
    // --version=false is "not requested"; --version=vX.Y.Z only overrides the reported version.
    assert!(run(&["--version=false"]).version_override.is_none());
    assert_eq!(run(&["--version=v1.36.2"]).version_override.as_deref(), Some("v1.36.2"));
    assert_eq!(exit(&["--version=banana"]).code, 1);
}

#[test]
fn deprecated_flags_warn_and_fold_into_bind_addresses() {
    let c = parse(&["--healthz-port=0", "--metrics-port", "0", "--proxy-port-range=30000-31000"]);
    assert_eq!(
        c.warnings,
        vec![
            "Flag --healthz-port has been deprecated, This flag is deprecated and will be removed in a future \
             release. Please use --healthz-bind-address instead."
                .to_string(),
            "Flag --metrics-port has been deprecated, This flag is deprecated and will be removed in a future \
             release. Please use --metrics-bind-address instead."
                .to_string(),
            "Flag --proxy-port-range has been deprecated, This flag has no effect and will be removed in a future \
             release."
                .to_string(),
        ]
    );
    let r = resolve_with_hostname(c, || Ok("h".into())).unwrap();
    assert_eq!(r.healthz_bind_address(), None, "port 0 disables healthz");
    assert_eq!(r.metrics_bind_address(), None, "port 0 disables metrics");
    assert_eq!(r.config.port_range, "30000-31000");

    let r = run(&["--healthz-bind-address=1.2.3.4", "--healthz-port=1234", "--metrics-bind-address=::1"]);
    assert_eq!(r.healthz_bind_address(), Some("1.2.3.4:1234".parse().unwrap()));
    assert_eq!(r.config.metrics_bind_address, "[::1]:10249");
    // An address with a port keeps it: the deprecated port only fills in a bare IP.
    let r = run(&["--healthz-port=1234"]);
    assert_eq!(r.config.healthz_bind_address, "0.0.0.0:10256");
    assert!(run(&[]).warnings_free());
}

trait WarningsFree {
    fn warnings_free(&self) -> bool;
}

impl WarningsFree for ProxyRunConfig {
    fn warnings_free(&self) -> bool {
        self.lenient_decoding_error.is_none()
    }
}

#[test]
fn defaults_without_flags() {
    let r = run(&[]);
    assert_eq!(r.mode, ProxyMode::Ebpf);
    assert_eq!(r.config.mode, "");
    assert_eq!(r.hostname, "test-host");
    assert_eq!(r.sync_period(), Duration::from_secs(30));
    assert_eq!(r.min_sync_period(), Duration::from_secs(1));
    assert!(!r.masquerade_all());
    assert_eq!(r.masquerade_bit(), 14);
    assert_eq!(r.healthz_bind_address(), Some("0.0.0.0:10256".parse().unwrap()));
    assert_eq!(r.metrics_bind_address(), Some("127.0.0.1:10249".parse().unwrap()));
    assert_eq!(r.config_sync_period(), Duration::from_secs(900));
    assert_eq!(r.bpffs_root, PathBuf::from("/sys/fs/bpf/kube-proxy-rs"));
    assert_eq!(r.cgroup_root, None);
    assert!(r.cluster_cidrs().unwrap().is_empty());
    assert!(r.node_port_addresses().is_empty());
    assert_eq!(r.logging_format, "text");
    assert!(r.feature_gates.is_empty());
    assert!(r.config_file.is_none() && r.write_config_to.is_none());
    // Without flags the configuration equals the defaulted file.
    assert_eq!(r.config, kube_proxy::config::KubeProxyConfiguration::defaulted());
}

#[test]
fn ours_flags() {
    let r = run(&["--cgroup-root=/sys/fs/cgroup/kubepods", "--bpffs-root", "/sys/fs/bpf/x", "--proxy-mode=ebpf"]);
    assert_eq!(r.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup/kubepods")));
    assert_eq!(r.bpffs_root, PathBuf::from("/sys/fs/bpf/x"));
    assert_eq!(r.mode, ProxyMode::Ebpf);
    for (flag, mode) in
        [("iptables", ProxyMode::Iptables), ("ipvs", ProxyMode::Ipvs), ("nftables", ProxyMode::Nftables)]
    {
        assert_eq!(run(&["--proxy-mode", flag]).mode, mode);
    }
    let err = resolve_with_hostname(parse(&["--proxy-mode=kernelspace"]), || Ok("h".into())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "KubeProxyConfiguration.Mode.ProxyMode: Invalid value: \"kernelspace\": must be ebpf, iptables, ipvs, \
         nftables or blank (blank means the best-available proxy [currently ebpf])"
    );
}

#[test]
fn mode_specific_sync_flags() {
    // ipvs flags only count in ipvs mode ...
    let r = run(&["--proxy-mode=ipvs", "--iptables-sync-period=10s", "--ipvs-sync-period=20s"]);
    assert_eq!(r.sync_period(), Duration::from_secs(20));
    assert_eq!(r.config.ipvs.sync_period, GoDuration::from_secs(20));
    // ... where the minimum stays upstream's internal default (1s) unless its ipvs flag is given.
    assert_eq!(r.min_sync_period(), Duration::from_secs(1));
    assert_eq!(run(&["--proxy-mode=ipvs", "--ipvs-min-sync-period=0s"]).min_sync_period(), Duration::ZERO);
    // ... and iptables flags count in every other mode, nftables included.
    let r = run(&["--proxy-mode=iptables", "--ipvs-sync-period=20s", "--iptables-sync-period=1m30s"]);
    assert_eq!(r.sync_period(), Duration::from_secs(90));
    let r = run(&["--proxy-mode=nftables", "--iptables-min-sync-period=0", "--iptables-sync-period=45s"]);
    assert_eq!((r.sync_period(), r.min_sync_period()), (Duration::from_secs(45), Duration::ZERO));
    assert_eq!(r.config.nftables.sync_period, GoDuration::from_secs(45));
    assert_eq!(r.node_port_addresses(), vec!["primary".to_string()], "nftables defaults to primary");
    assert_eq!(run(&["--iptables-min-sync-period=0s"]).min_sync_period(), Duration::ZERO);
    // masquerade-all applies to the active mode.
    assert!(run(&["--proxy-mode=ipvs", "--masquerade-all"]).masquerade_all());
    assert!(run(&["--proxy-mode=nftables", "--masquerade-all"]).masquerade_all());
}

#[test]
fn list_flags() {
    let r = run(&[
        "--cluster-cidr=10.0.0.0/8,fd00::/48",
        "--nodeport-addresses=10.0.0.0/8",
        "--nodeport-addresses",
        "::1/128",
    ]);
    let cidrs: Vec<String> = r.cluster_cidrs().unwrap().iter().map(|c| c.to_string()).collect();
    assert_eq!(cidrs, vec!["10.0.0.0/8", "fd00::/48"]);
    assert_eq!(r.node_port_addresses(), vec!["10.0.0.0/8".to_string(), "::1/128".to_string()]);
    let r = run(&["--feature-gates=A=true,B=false", "--feature-gates", "C=1"]);
    assert_eq!(
        r.feature_gates.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(),
        vec![("A", true), ("B", false), ("C", true)]
    );
    assert_eq!(r.unknown_feature_gates(), vec!["A", "B", "C"]);
    let r = run(&["--feature-gates=LoggingAlphaOptions=true"]);
    assert!(r.unknown_feature_gates().is_empty());
    let r = run(&["--proxy-mode=ipvs", "--ipvs-exclude-cidrs=10.1.0.0/16,10.2.0.0/16", "--ipvs-scheduler=wrr"]);
    assert_eq!(r.config.ipvs.exclude_cidrs.as_deref().unwrap().len(), 2);
}

#[test]
fn hostname_override_validation() {
    let err = resolve_with_hostname(parse(&["--hostname-override=   "]), || Ok("h".into())).unwrap_err();
    assert_eq!(err.to_string(), "empty hostname-override is invalid");
    assert_eq!(run(&["--hostname-override", " Worker-7 "]).hostname, "worker-7");
}

#[test]
fn flags_build_a_valid_write_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.yaml");
    let r = run(&["--write-config-to", out.to_str().unwrap(), "--iptables-sync-period=1m30s", "--kube-api-qps=2.5"]);
    assert_eq!(r.write_config_to.as_deref(), Some(out.as_path()));
    r.config.write_yaml_file(&out).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("  syncPeriod: 1m30s\n"), "{text}");
    assert!(text.contains("  qps: 2.5\n"), "{text}");
    // What we write loads back to the same configuration.
    let again = run(&["--config", out.to_str().unwrap()]);
    assert_eq!(again.config, r.config);
    assert!(again.lenient_decoding_error.is_none());
}

#[test]
fn config_file_from_testdata_via_flag() {
    let r = run(&["--config", &testdata("config.json")]);
    assert_eq!(r.mode, ProxyMode::Nftables);
    assert_eq!(r.feature_gates.get("KubeProxyNFTablesLocalhostNodePorts"), Some(&true));
    assert_eq!(r.config.logging.flush_frequency, GoDuration::from_secs(2));
    assert_eq!(r.config_file, Some(PathBuf::from(testdata("config.json"))));
}
