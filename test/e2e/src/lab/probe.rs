//! What `lab-client` prints, parsed: one [`Probe`] per attempt, and small statistics over them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One `lab-client tcp`/`udp` attempt (one JSON line).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// The request got a reply.
    pub ok: bool,
    /// The reply line: `<pod-name> <client-ip>:<client-port>` from `lab-echo`.
    #[serde(default)]
    pub reply: Option<String>,
    /// errno of the failing call.
    #[serde(default)]
    pub errno: Option<i32>,
    /// Which step failed: `connect`, `write`, `read`, `bind`, ...
    #[serde(default)]
    pub stage: Option<String>,
    /// Error text.
    #[serde(default)]
    pub error: Option<String>,
    /// Time to connect (TCP).
    #[serde(default)]
    pub connect_us: Option<u64>,
    /// Time from socket creation to the reply.
    #[serde(default)]
    pub total_us: u64,
    /// getpeername (TCP) or the reply's source address (UDP recvfrom).
    #[serde(default)]
    pub peer: Option<String>,
    /// getsockname.
    #[serde(default)]
    pub local: Option<String>,
    /// The address dialled.
    #[serde(default)]
    pub target: Option<String>,
}

impl Probe {
    /// The pod that answered.
    pub fn pod(&self) -> Option<&str> {
        self.reply.as_deref()?.split_whitespace().next()
    }

    /// The client address the answering pod saw (`ip:port`).
    pub fn seen_client(&self) -> Option<&str> {
        self.reply.as_deref()?.split_whitespace().nth(1)
    }

    /// The IP part of [`Probe::seen_client`].
    pub fn seen_client_ip(&self) -> Option<String> {
        let s = self.seen_client()?;
        s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip().to_string())
    }
}

/// Parses `lab-client` output: JSON lines that are not probes (summaries) are skipped.
pub fn parse_probes(stdout: &str) -> Vec<Probe> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("kind").is_none())
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect()
}

/// The `{"kind":"summary",...}` line of `lab-client tcp-hold`/`churn-client` output.
pub fn client_summary(stdout: &str) -> Option<serde_json::Value> {
    stdout.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| v["kind"] == "summary")
}

/// How many successful probes each pod answered.
pub fn answers_by_pod(probes: &[Probe]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in probes.iter().filter(|p| p.ok) {
        if let Some(pod) = p.pod() {
            *m.entry(pod.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// The `q` quantile (0..=1, nearest rank) of `values`; `None` when empty.
pub fn quantile(values: &[u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_counts() {
        let out = "{\"ok\":true,\"reply\":\"pod-0-1 198.18.16.10:4000\",\"total_us\":5}\n\
                   {\"ok\":false,\"errno\":111,\"stage\":\"connect\",\"total_us\":1}\n\
                   {\"kind\":\"summary\",\"ok\":1}\n";
        let p = parse_probes(out);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].pod(), Some("pod-0-1"));
        assert_eq!(p[0].seen_client_ip().as_deref(), Some("198.18.16.10"));
        assert_eq!(answers_by_pod(&p).get("pod-0-1"), Some(&1));
        assert_eq!(quantile(&[5, 1, 3, 2, 4], 0.5), Some(3));
        assert_eq!(quantile(&[5, 1, 3, 2, 4], 0.99), Some(5));
    }
}
