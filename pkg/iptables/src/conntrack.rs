//! Stale UDP conntrack cleanup (upstream `pkg/proxy/conntrack/cleanup.go`, reference §6.6).
//!
//! After a successful sync that changed a UDP Service's endpoints or addresses, every UDP flow whose original
//! destination is a Service IP:port (ClusterIP, LB VIP, ExternalIP) or a UDP NodePort, and whose reply source is
//! not one of that Service's serving endpoints, is deleted: it would otherwise keep sending datagrams to a removed
//! endpoint, or keep black-holing them if it was created while the Service had no endpoint. TCP flows are never
//! touched. The table is read and changed over ctnetlink (`NETLINK_NETFILTER`), optionally inside another network
//! namespace (tests).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proxier::metrics::Metrics;
use proxier::model::{IpFamily, Protocol, ServicePortName, ServicePortState};
use tracing::{debug, info};

const IPPROTO_UDP: u8 = 17;

/// One conntrack flow, as far as cleanup cares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flow {
    /// IANA protocol number.
    pub protocol: u8,
    /// Original direction source address.
    pub orig_src: IpAddr,
    /// Original direction destination address (the Service IP or node address).
    pub orig_dst: IpAddr,
    /// Original direction source port.
    pub orig_src_port: u16,
    /// Original direction destination port (the Service port or NodePort).
    pub orig_dst_port: u16,
    /// Reply direction source address (the endpoint after DNAT).
    pub reply_src: IpAddr,
    /// Conntrack zone (0 by default).
    pub zone: u16,
}

/// A conntrack error, naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// A socket operation failed.
    #[error("conntrack netlink {op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel answered something we could not parse.
    #[error("conntrack netlink {op}: malformed reply: {reason}")]
    Malformed {
        /// What was being done.
        op: String,
        /// What was wrong.
        reason: String,
    },
}

/// The conntrack table of one network namespace.
pub trait ConntrackTable: Send + std::fmt::Debug {
    /// Every flow of `family`.
    fn list(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError>;
    /// Deletes `flows`; returns how many were deleted (flows already gone do not count and are not errors).
    fn delete(&mut self, family: IpFamily, flows: &[Flow]) -> Result<usize, ConntrackError>;
}

/// The UDP flows to delete given the Services of one family (pure; upstream `CleanStaleEntries`).
pub fn stale_udp_flows(services: &BTreeMap<ServicePortName, ServicePortState>, flows: &[Flow]) -> Vec<Flow> {
    // Service IP:port and NodePort → serving endpoint IPs. Traffic policy, topology and terminating state are
    // ignored on purpose: a changed policy must not break flows that still reach a serving endpoint.
    let mut by_addr: HashMap<(IpAddr, u16), HashSet<IpAddr>> = HashMap::new();
    let mut by_node_port: HashMap<u16, HashSet<IpAddr>> = HashMap::new();
    for svc in services.values() {
        let info = &*svc.info;
        if info.protocol != Protocol::Udp {
            continue;
        }
        let serving: HashSet<IpAddr> = svc.endpoints.iter().filter(|e| e.serving).map(|e| e.ip).collect();
        // Without endpoints there is nothing better to send the flows to.
        if serving.is_empty() {
            continue;
        }
        by_addr.insert((info.cluster_ip, info.port), serving.clone());
        for ip in info.load_balancer_vips.iter().chain(&info.external_ips) {
            by_addr.insert((*ip, info.port), serving.clone());
        }
        if info.node_port != 0 {
            by_node_port.insert(info.node_port, serving);
        }
    }
    let mut out = Vec::new();
    for f in flows.iter().filter(|f| f.protocol == IPPROTO_UDP) {
        let stale_vip = by_addr.get(&(f.orig_dst, f.orig_dst_port)).is_some_and(|eps| !eps.contains(&f.reply_src));
        let stale_np = by_node_port.get(&f.orig_dst_port).is_some_and(|eps| !eps.contains(&f.reply_src));
        if stale_vip || stale_np {
            out.push(f.clone());
        }
    }
    out
}

/// Lists, filters and deletes stale UDP flows of `family`; records the reconciler metrics. Returns the number of
/// flows deleted.
pub fn reconcile(
    table: &mut dyn ConntrackTable,
    family: IpFamily,
    services: &BTreeMap<ServicePortName, ServicePortState>,
    metrics: Option<&Metrics>,
) -> Result<usize, ConntrackError> {
    let start = Instant::now();
    debug!(ip_family = %family, "Started to reconcile conntrack entries");
    let flows = table.list(family)?;
    let stale = stale_udp_flows(services, &flows);
    for f in &stale {
        debug!(orig_dst = %f.orig_dst, orig_port_dst = f.orig_dst_port, reply_src = %f.reply_src, "Deleting stale conntrack entry");
    }
    let deleted = if stale.is_empty() { 0 } else { table.delete(family, &stale)? };
    let took = start.elapsed();
    if let Some(m) = metrics {
        m.observe_conntrack_reconcile(family, took);
        m.add_conntrack_deleted_entries(family, deleted as u64);
    }
    info!(ip_family = %family, entries_deleted = deleted, ?took, "Finished reconciling conntrack entries");
    Ok(deleted)
}

// ---- ctnetlink ----

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// Bounds every receive, so a kernel that never finishes a dump cannot hang a sync.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// The conntrack table over ctnetlink, in this process's network namespace or in the one at `netns` (a path such
/// as `/run/netns/NAME`, entered by a short-lived thread that only opens the socket).
#[derive(Debug, Clone, Default)]
pub struct NetlinkConntrack {
    netns: Option<PathBuf>,
}

impl NetlinkConntrack {
    /// The table of this process's network namespace.
    pub fn new() -> Self {
        NetlinkConntrack::default()
    }

    /// The table of the network namespace at `path`.
    pub fn in_netns(path: impl Into<PathBuf>) -> Self {
        NetlinkConntrack { netns: Some(path.into()) }
    }

    fn open(&self) -> Result<Socket, ConntrackError> {
        match &self.netns {
            None => Socket::open(),
            Some(path) => {
                let path = path.clone();
                std::thread::spawn(move || {
                    enter_netns(&path)?;
                    Socket::open()
                })
                .join()
                .map_err(|_| ConntrackError::Malformed { op: "open".into(), reason: "netns thread panicked".into() })?
            }
        }
    }
}

fn io_err(op: &str) -> impl FnOnce(io::Error) -> ConntrackError + '_ {
    move |source| ConntrackError::Io { op: op.to_string(), source }
}

fn enter_netns(path: &Path) -> Result<(), ConntrackError> {
    let op = format!("entering netns {}", path.display());
    let file = std::fs::File::open(path).map_err(io_err(&op))?;
    // SAFETY: setns on a valid fd only changes this (short-lived) thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io_err(&op)(io::Error::last_os_error()));
    }
    Ok(())
}

struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    fn open() -> Result<Socket, ConntrackError> {
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(io_err("socket")(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval { tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
        // SAFETY: setsockopt with a correctly sized timeval.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io_err("setsockopt SO_RCVTIMEO")(io::Error::last_os_error()));
        }
        // A big receive buffer keeps large dumps from overflowing.
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with a correctly sized int; failure is harmless.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Ok(Socket { fd, seq: 1 })
    }

    fn send(&mut self, msg_type: u16, flags: u16, family: IpFamily, attrs: &[u8]) -> Result<u32, ConntrackError> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg_type).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&self.seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.push(af(family));
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(attrs);
        // SAFETY: sending an initialised buffer of the stated length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr() as *const libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io_err("send")(io::Error::last_os_error()));
        }
        Ok(self.seq)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, ConntrackError> {
        // SAFETY: receiving into a buffer we own, bounded by its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io_err("recv")(io::Error::last_os_error()));
        }
        Ok(n as usize)
    }

    /// Reads messages for `seq` until DONE (dump) or the ACK/error (request); calls `on_msg` with each payload.
    fn read_until_done(&self, seq: u32, op: &str, mut on_msg: impl FnMut(&[u8])) -> Result<(), ConntrackError> {
        let mut buf = vec![0u8; 1 << 17];
        let deadline = Instant::now() + RECV_TIMEOUT * 6;
        loop {
            if Instant::now() > deadline {
                return Err(ConntrackError::Malformed { op: op.into(), reason: "no end of reply in time".into() });
            }
            let n = self.recv(&mut buf)?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
                let mseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
                if len < 16 || off + len > n {
                    return Err(ConntrackError::Malformed { op: op.into(), reason: format!("message length {len}") });
                }
                let payload = &buf[off + 16..off + len];
                off += (len + 3) & !3;
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = payload.get(..4).map(|b| i32::from_ne_bytes(b.try_into().unwrap())).unwrap_or(0);
                        if errno == 0 {
                            return Ok(()); // ACK
                        }
                        return Err(io_err(op)(io::Error::from_raw_os_error(-errno)));
                    }
                    _ => on_msg(payload),
                }
            }
        }
    }
}

fn af(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => libc::AF_INET as u8,
        IpFamily::V6 => libc::AF_INET6 as u8,
    }
}

/// Iterates netlink attributes: (type without flags, payload).
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[((len + 3) & !3).min(data.len())..];
        Some((ty, payload))
    })
}

#[derive(Default)]
struct Tuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: u8,
    sport: u16,
    dport: u16,
}

fn parse_tuple(data: &[u8]) -> Tuple {
    let mut t = Tuple::default();
    for (ty, p) in attrs(data) {
        match ty {
            CTA_TUPLE_IP => {
                for (ity, ip) in attrs(p) {
                    let addr = match (ity, ip.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => {
                            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(ip).unwrap()))
                        }
                        _ => continue,
                    };
                    if ity == CTA_IP_V4_SRC || ity == CTA_IP_V6_SRC {
                        t.src = Some(addr);
                    } else {
                        t.dst = Some(addr);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (pty, v) in attrs(p) {
                    match (pty, v.len()) {
                        (CTA_PROTO_NUM, 1) => t.proto = v[0],
                        (CTA_PROTO_SRC_PORT, 2) => t.sport = u16::from_be_bytes([v[0], v[1]]),
                        (CTA_PROTO_DST_PORT, 2) => t.dport = u16::from_be_bytes([v[0], v[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

/// Parses one ctnetlink message payload (after the netlink header) into a flow.
fn parse_flow(payload: &[u8]) -> Option<Flow> {
    let (mut orig, mut reply, mut zone) = (None, None, 0u16);
    for (ty, p) in attrs(payload.get(4..)?) {
        match ty {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(p)),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(p)),
            CTA_ZONE if p.len() >= 2 => zone = u16::from_be_bytes([p[0], p[1]]),
            _ => {}
        }
    }
    let (o, r) = (orig?, reply?);
    Some(Flow {
        protocol: o.proto,
        orig_src: o.src?,
        orig_dst: o.dst?,
        orig_src_port: o.sport,
        orig_dst_port: o.dport,
        reply_src: r.src?,
        zone,
    })
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + ((4 - len % 4) % 4), 0);
}

/// The attributes naming `flow` by its original tuple (what `IPCTNL_MSG_CT_DELETE` needs).
fn delete_attrs(flow: &Flow) -> Vec<u8> {
    let mut ip = Vec::new();
    match (flow.orig_src, flow.orig_dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put_attr(&mut ip, CTA_IP_V4_SRC, &s.octets());
            put_attr(&mut ip, CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            put_attr(&mut ip, CTA_IP_V6_SRC, &v6(s));
            put_attr(&mut ip, CTA_IP_V6_DST, &v6(d));
        }
    }
    let mut proto = Vec::new();
    put_attr(&mut proto, CTA_PROTO_NUM, &[flow.protocol]);
    put_attr(&mut proto, CTA_PROTO_SRC_PORT, &flow.orig_src_port.to_be_bytes());
    put_attr(&mut proto, CTA_PROTO_DST_PORT, &flow.orig_dst_port.to_be_bytes());
    let mut tuple = Vec::new();
    put_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    put_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    let mut out = Vec::new();
    put_attr(&mut out, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
    if flow.zone != 0 {
        put_attr(&mut out, CTA_ZONE, &flow.zone.to_be_bytes());
    }
    out
}

impl ConntrackTable for NetlinkConntrack {
    fn list(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
        let mut sock = self.open()?;
        let seq = sock.send(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, &[])?;
        let mut flows = Vec::new();
        sock.read_until_done(seq, "dump", |payload| {
            if let Some(f) = parse_flow(payload) {
                flows.push(f);
            }
        })?;
        Ok(flows)
    }

    fn delete(&mut self, family: IpFamily, flows: &[Flow]) -> Result<usize, ConntrackError> {
        let mut sock = self.open()?;
        let mut deleted = 0;
        for flow in flows {
            let seq = sock.send(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, family, &delete_attrs(flow))?;
            match sock.read_until_done(seq, "delete", |_| {}) {
                Ok(()) => deleted += 1,
                // Expired or deleted by someone else meanwhile.
                Err(ConntrackError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }
}

/// An in-memory table, for tests of the backend without a kernel.
#[derive(Debug, Clone, Default)]
pub struct FakeConntrack {
    /// The flows per family.
    pub flows: BTreeMap<IpFamily, Vec<Flow>>,
}

impl ConntrackTable for FakeConntrack {
    fn list(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
        Ok(self.flows.get(&family).cloned().unwrap_or_default())
    }

    fn delete(&mut self, family: IpFamily, flows: &[Flow]) -> Result<usize, ConntrackError> {
        let list = self.flows.entry(family).or_default();
        let before = list.len();
        list.retain(|f| !flows.contains(f));
        Ok(before - list.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxier::model::{Endpoint, SelectedEndpoints, ServicePortInfo};
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(addr: &str, serving: bool) -> Endpoint {
        Endpoint {
            ip: ip(addr),
            port: 53,
            ready: serving,
            serving,
            terminating: false,
            is_local: false,
            zone_hints: Default::default(),
            node_hints: Default::default(),
        }
    }

    fn svc(proto: Protocol, cluster_ip: &str, node_port: u16, eps: Vec<Endpoint>) -> ServicePortState {
        ServicePortState {
            info: Arc::new(ServicePortInfo {
                cluster_ip: ip(cluster_ip),
                port: 53,
                protocol: proto,
                node_port,
                session_affinity_timeout: None,
                external_ips: vec![ip("192.0.2.10")],
                load_balancer_vips: vec![],
                load_balancer_source_ranges: vec![],
                external_policy_local: false,
                internal_policy_local: false,
                health_check_node_port: 0,
            }),
            endpoints: Arc::new(eps),
            selected: SelectedEndpoints::default(),
        }
    }

    fn flow(proto: u8, dst: &str, dport: u16, reply_src: &str) -> Flow {
        Flow {
            protocol: proto,
            orig_src: ip("10.0.0.99"),
            orig_dst: ip(dst),
            orig_src_port: 40000,
            orig_dst_port: dport,
            reply_src: ip(reply_src),
            zone: 0,
        }
    }

    #[test]
    fn stale_flows_are_udp_to_service_addresses_not_from_serving_endpoints() {
        let mut services = BTreeMap::new();
        services.insert(
            ServicePortName::new("ns", "dns", "dns", Protocol::Udp),
            svc(Protocol::Udp, "172.30.0.10", 30053, vec![ep("10.1.0.1", true), ep("10.1.0.2", false)]),
        );
        services.insert(
            ServicePortName::new("ns", "tcp", "", Protocol::Tcp),
            svc(Protocol::Tcp, "172.30.0.11", 0, vec![ep("10.1.0.3", true)]),
        );
        services.insert(
            ServicePortName::new("ns", "empty", "", Protocol::Udp),
            svc(Protocol::Udp, "172.30.0.12", 0, vec![]),
        );
        let flows = vec![
            flow(17, "172.30.0.10", 53, "10.1.0.1"),    // keep: serving endpoint
            flow(17, "172.30.0.10", 53, "10.1.0.2"),    // stale: endpoint not serving
            flow(17, "172.30.0.10", 53, "172.30.0.10"), // stale: black hole from before endpoints existed
            flow(17, "192.0.2.10", 53, "10.1.0.9"),     // stale: external IP, gone endpoint
            flow(17, "198.18.0.1", 30053, "10.1.0.9"),  // stale: NodePort
            flow(17, "198.18.0.1", 30053, "10.1.0.1"),  // keep
            flow(6, "172.30.0.11", 53, "10.1.0.9"),     // keep: TCP
            flow(17, "172.30.0.12", 53, "172.30.0.12"), // keep: Service without endpoints
            flow(17, "172.30.0.10", 54, "10.1.0.9"),    // keep: other port
        ];
        let stale = stale_udp_flows(&services, &flows);
        assert_eq!(stale, vec![flows[1].clone(), flows[2].clone(), flows[3].clone(), flows[4].clone()]);

        let mut table = FakeConntrack::default();
        table.flows.insert(IpFamily::V4, flows.clone());
        let metrics = Metrics::new("iptables");
        assert_eq!(reconcile(&mut table, IpFamily::V4, &services, Some(&metrics)).unwrap(), 4);
        assert_eq!(table.flows[&IpFamily::V4].len(), 5);
        assert!(
            metrics.encode().contains("kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 4")
        );
    }

    #[test]
    fn netlink_encoding_round_trips() {
        let f = Flow { zone: 7, ..flow(17, "172.30.0.10", 53, "10.1.0.1") };
        let attrs_bytes = delete_attrs(&f);
        // Build a fake dump message: nfgenmsg + orig tuple + a reply tuple + zone.
        let mut reply_ip = Vec::new();
        put_attr(&mut reply_ip, CTA_IP_V4_SRC, &[10, 1, 0, 1]);
        put_attr(&mut reply_ip, CTA_IP_V4_DST, &[10, 0, 0, 99]);
        let mut reply = Vec::new();
        put_attr(&mut reply, CTA_TUPLE_IP | NLA_F_NESTED, &reply_ip);
        let mut msg = vec![2, 0, 0, 0];
        msg.extend_from_slice(&attrs_bytes);
        put_attr(&mut msg, CTA_TUPLE_REPLY | NLA_F_NESTED, &reply);
        let parsed = parse_flow(&msg).unwrap();
        assert_eq!(parsed, f);
    }
}
