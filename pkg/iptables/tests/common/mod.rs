//! Test helpers: a throw-away network namespace per test so no command ever touches the host's rules or links.

#![allow(dead_code)]

pub mod model;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use proxier::model::IpFamily;
use proxy_iptables::{Exec, Iptables, RestoreFlags};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace `kp-ipt-<pid>-<n>`, deleted on drop (also when the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace, or returns None after printing why the test is skipped.
    pub fn create(tools: &[&str]) -> Option<Netns> {
        if !is_root() {
            eprintln!("SKIP: not root; the netns tests need CAP_NET_ADMIN");
            return None;
        }
        let exec = Exec::new();
        for tool in ["ip"].iter().chain(tools) {
            if !exec.has_tool(tool) {
                eprintln!("SKIP: {tool} is not installed");
                return None;
            }
        }
        let name = format!("kp-ipt-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let status = Command::new("ip").args(["netns", "add", &name]).status().ok()?;
        if !status.success() {
            eprintln!("SKIP: cannot create network namespace {name}");
            return None;
        }
        Some(Netns { name })
    }

    /// The command prefix that runs inside the namespace.
    pub fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name].iter().map(|s| s.to_string()).collect()
    }

    /// An iptables handle for `family` inside the namespace.
    pub fn iptables(&self, family: IpFamily) -> Iptables {
        Iptables::new(family).with_prefix(self.prefix())
    }

    /// Runs a command inside the namespace; returns (success, stdout, stderr).
    pub fn sh(&self, program: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("run command in netns");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Loads `input` with `--noflush` in the namespace, panicking with the error on failure.
    pub fn load(&self, family: IpFamily, input: &str) {
        self.iptables(family)
            .restore(input, RestoreFlags { noflush: true, counters: false })
            .unwrap_or_else(|e| panic!("loading fixture failed: {e}"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Addresses for the fixture per family.
struct Addrs {
    cluster1: &'static str,
    cluster2: &'static str,
    ep1: &'static str,
    ep2: &'static str,
    lb: &'static str,
    src_range: &'static str,
    pod_cidr: &'static str,
    host: &'static str,
}

fn addrs(family: IpFamily) -> Addrs {
    match family {
        IpFamily::V4 => Addrs {
            cluster1: "172.30.0.41/32",
            cluster2: "172.30.0.42/32",
            ep1: "10.180.0.1/32",
            ep2: "10.180.0.2/32",
            lb: "1.2.3.4/32",
            src_range: "203.0.113.0/25",
            pod_cidr: "10.0.0.0/8",
            host: "10.180.0.2:80",
        },
        IpFamily::V6 => Addrs {
            cluster1: "fd00:30::41/128",
            cluster2: "fd00:30::42/128",
            ep1: "fd00:180::1/128",
            ep2: "fd00:180::2/128",
            lb: "2001:db8::1234/128",
            src_range: "2001:db8:1::/64",
            pod_cidr: "fd00::/16",
            host: "[fd00:180::2]:80",
        },
    }
}

/// An upstream-shaped iptables-mode ruleset (reference §3): jump rules in the built-in chains, two services
/// (ns1/svc1 ClusterIP; ns2/svc2 LoadBalancer with externalTrafficPolicy Local and source ranges), plus kubelet's
/// KUBE-FIREWALL / KUBE-KUBELET-CANARY (and nat KUBE-MARK-DROP) and an unrelated user chain jumped to from INPUT.
pub fn upstream_iptables_ruleset(family: IpFamily) -> String {
    let a = addrs(family);
    let ep1 = a.ep1.split('/').next().unwrap();
    let ep1_dnat = match family {
        IpFamily::V4 => format!("{ep1}:80"),
        IpFamily::V6 => format!("[{ep1}]:80"),
    };
    let kubelet_rule = match family {
        // Kubelet's anti-martian rule is IPv4 only.
        IpFamily::V4 => {
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"
        }
        IpFamily::V6 => "",
    };
    format!(
        r#"*mangle
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:USER-INPUT - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A INPUT -j USER-INPUT
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A USER-INPUT -p tcp -m tcp --dport 22 -m comment --comment "admin ssh" -j ACCEPT
{kubelet_rule}-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns2/svc2:p80 traffic not accepted by KUBE-FW-GNZBNJ2PO5MGZ6GT" -m tcp -p tcp -d {lb} --dport 80 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-FW-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVL-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-DROP -j MARK --or-mark 0x8000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d {cluster1} --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d {cluster2} --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d {lb} --dport 80 -j KUBE-FW-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d {cluster1} --dport 80 ! -s {pod_cidr} -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> {ep1_dnat}" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s {ep1} -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination {ep1_dnat}
-A KUBE-FW-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 loadbalancer IP" -s {src_range} -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-FW-GNZBNJ2PO5MGZ6GT -m comment --comment "other traffic to ns2/svc2:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s {pod_cidr} -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -j KUBE-SVL-GNZBNJ2PO5MGZ6GT
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d {cluster2} --dport 80 ! -s {pod_cidr} -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> {host}" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> {host}" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVL-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 has no local endpoints" -j KUBE-MARK-DROP
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s {ep2} -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination {host}
COMMIT
"#,
        lb = a.lb,
        cluster1 = a.cluster1,
        cluster2 = a.cluster2,
        pod_cidr = a.pod_cidr,
        src_range = a.src_range,
        ep1 = a.ep1,
        ep2 = a.ep2,
        host = a.host,
        ep1_dnat = ep1_dnat,
    )
}
