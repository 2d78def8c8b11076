//! The IPVS generic netlink family (`IPVS`, kernel uapi `include/uapi/linux/ip_vs.h`): message and attribute
//! encoding and decoding, family resolution and a blocking client.
//!
//! Layouts follow what the kernel parses and what Go's `moby/ipvs` (vendored by upstream kube-proxy) sends:
//! addresses are raw bytes (4 for IPv4, 16 for IPv6; dumps always carry 16), ports are big-endian, every other
//! integer is host order, nested attributes carry no `NLA_F_NESTED` flag (the kernel accepts both).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload, Nla, NlaBuffer, NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

/// `IPVS_GENL_NAME`.
pub const IPVS_GENL_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
pub const IPVS_GENL_VERSION: u8 = 1;

/// `IPVS_CMD_*` (ip_vs.h).
pub mod cmd {
    /// `IPVS_CMD_NEW_SERVICE`.
    pub const NEW_SERVICE: u8 = 1;
    /// `IPVS_CMD_SET_SERVICE`.
    pub const SET_SERVICE: u8 = 2;
    /// `IPVS_CMD_DEL_SERVICE`.
    pub const DEL_SERVICE: u8 = 3;
    /// `IPVS_CMD_GET_SERVICE`.
    pub const GET_SERVICE: u8 = 4;
    /// `IPVS_CMD_NEW_DEST`.
    pub const NEW_DEST: u8 = 5;
    /// `IPVS_CMD_SET_DEST`.
    pub const SET_DEST: u8 = 6;
    /// `IPVS_CMD_DEL_DEST`.
    pub const DEL_DEST: u8 = 7;
    /// `IPVS_CMD_GET_DEST`.
    pub const GET_DEST: u8 = 8;
    /// `IPVS_CMD_SET_CONFIG` (global timeouts).
    pub const SET_CONFIG: u8 = 12;
    /// `IPVS_CMD_GET_CONFIG`.
    pub const GET_CONFIG: u8 = 13;
    /// `IPVS_CMD_FLUSH`.
    pub const FLUSH: u8 = 17;
}

/// `IPVS_CMD_ATTR_*`.
pub mod cmd_attr {
    /// `IPVS_CMD_ATTR_SERVICE` (nested `IPVS_SVC_ATTR_*`).
    pub const SERVICE: u16 = 1;
    /// `IPVS_CMD_ATTR_DEST` (nested `IPVS_DEST_ATTR_*`).
    pub const DEST: u16 = 2;
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP` (u32 seconds).
    pub const TIMEOUT_TCP: u16 = 4;
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP_FIN`.
    pub const TIMEOUT_TCP_FIN: u16 = 5;
    /// `IPVS_CMD_ATTR_TIMEOUT_UDP`.
    pub const TIMEOUT_UDP: u16 = 6;
}

/// `IPVS_SVC_ATTR_*`.
pub mod svc_attr {
    /// `IPVS_SVC_ATTR_AF` (u16).
    pub const AF: u16 = 1;
    /// `IPVS_SVC_ATTR_PROTOCOL` (u16).
    pub const PROTOCOL: u16 = 2;
    /// `IPVS_SVC_ATTR_ADDR` (`union nf_inet_addr`).
    pub const ADDR: u16 = 3;
    /// `IPVS_SVC_ATTR_PORT` (be16).
    pub const PORT: u16 = 4;
    /// `IPVS_SVC_ATTR_FWMARK` (u32).
    pub const FWMARK: u16 = 5;
    /// `IPVS_SVC_ATTR_SCHED_NAME` (NUL-terminated string).
    pub const SCHED_NAME: u16 = 6;
    /// `IPVS_SVC_ATTR_FLAGS` (`struct ip_vs_flags { u32 flags; u32 mask; }`).
    pub const FLAGS: u16 = 7;
    /// `IPVS_SVC_ATTR_TIMEOUT` (u32, persistence seconds).
    pub const TIMEOUT: u16 = 8;
    /// `IPVS_SVC_ATTR_NETMASK` (u32).
    pub const NETMASK: u16 = 9;
    /// `IPVS_SVC_ATTR_STATS` (nested).
    pub const STATS: u16 = 10;
    /// `IPVS_SVC_ATTR_PE_NAME`.
    pub const PE_NAME: u16 = 11;
}

/// `IPVS_DEST_ATTR_*`.
pub mod dest_attr {
    /// `IPVS_DEST_ATTR_ADDR`.
    pub const ADDR: u16 = 1;
    /// `IPVS_DEST_ATTR_PORT` (be16).
    pub const PORT: u16 = 2;
    /// `IPVS_DEST_ATTR_FWD_METHOD` (u32, `IP_VS_CONN_F_FWD_MASK` bits).
    pub const FWD_METHOD: u16 = 3;
    /// `IPVS_DEST_ATTR_WEIGHT` (u32).
    pub const WEIGHT: u16 = 4;
    /// `IPVS_DEST_ATTR_U_THRESH` (u32).
    pub const U_THRESH: u16 = 5;
    /// `IPVS_DEST_ATTR_L_THRESH` (u32).
    pub const L_THRESH: u16 = 6;
    /// `IPVS_DEST_ATTR_ACTIVE_CONNS` (u32, dumps only).
    pub const ACTIVE_CONNS: u16 = 7;
    /// `IPVS_DEST_ATTR_INACT_CONNS` (u32, dumps only).
    pub const INACT_CONNS: u16 = 8;
    /// `IPVS_DEST_ATTR_PERSIST_CONNS` (u32, dumps only).
    pub const PERSIST_CONNS: u16 = 9;
    /// `IPVS_DEST_ATTR_ADDR_FAMILY` (u16).
    pub const ADDR_FAMILY: u16 = 11;
}

/// `IP_VS_SVC_F_PERSISTENT`: ClientIP session affinity.
pub const SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every listed service; never part of the desired state.
pub const SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`.
pub const SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1` (`sh`/`mh` fallback).
pub const SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2` (`sh`/`mh` port).
pub const SVC_F_SCHED2: u32 = 0x0010;
/// `IP_VS_CONN_F_FWD_MASK`.
pub const CONN_F_FWD_MASK: u32 = 0x0007;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding, the only method kube-proxy uses.
pub const CONN_F_MASQ: u32 = 0x0000;

/// Errors of the IPVS netlink client, naming the request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The generic netlink family `IPVS` is not registered: the `ip_vs` kernel module is not loaded or built.
    #[error("generic netlink family \"IPVS\" not present (kernel module ip_vs not loaded)")]
    FamilyNotFound,
    /// A socket operation failed.
    #[error("netlink socket {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel rejected a request.
    #[error("IPVS {request}: {source}")]
    Kernel {
        /// The request, e.g. `NEW_SERVICE 10.0.0.1:80/TCP`.
        request: String,
        /// The errno the kernel returned.
        #[source]
        source: std::io::Error,
    },
    /// A reply could not be decoded.
    #[error("decoding the IPVS reply to {request}: {message}")]
    Decode {
        /// The request.
        request: String,
        /// What was malformed.
        message: String,
    },
}

/// A virtual server as the netlink layer sees it (fields named after `IPVS_SVC_ATTR_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `AF_INET` or `AF_INET6`.
    pub af: u16,
    /// IP protocol number (6, 17, 132).
    pub protocol: u16,
    /// Virtual address.
    pub addr: IpAddr,
    /// Virtual port (host order here; big-endian on the wire).
    pub port: u16,
    /// Firewall mark (0: address/protocol/port service).
    pub fwmark: u32,
    /// Scheduler name (`rr`, `wrr`, ...).
    pub sched_name: String,
    /// `IP_VS_SVC_F_*` flags.
    pub flags: u32,
    /// Persistence timeout in seconds.
    pub timeout: u32,
    /// Netmask: `0xffffffff` for IPv4, `128` for IPv6 (what upstream sends).
    pub netmask: u32,
}

impl Service {
    /// A service for `addr:port/protocol` with upstream's netmask and no flags.
    pub fn new(addr: IpAddr, protocol: u16, port: u16, sched_name: &str) -> Self {
        let (af, netmask) = match addr {
            IpAddr::V4(_) => (libc::AF_INET as u16, 0xffff_ffff),
            IpAddr::V6(_) => (libc::AF_INET6 as u16, 128),
        };
        Service { af, protocol, addr, port, fwmark: 0, sched_name: sched_name.into(), flags: 0, timeout: 0, netmask }
    }

    /// `addr:port/proto`, for messages.
    pub fn describe(&self) -> String {
        format!("{}/{}", std::net::SocketAddr::new(self.addr, self.port), proto_name(self.protocol))
    }
}

/// A real server (destination) as the netlink layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Real server address.
    pub addr: IpAddr,
    /// Real server port.
    pub port: u16,
    /// Forwarding method (`IP_VS_CONN_F_MASQ`).
    pub fwd_method: u32,
    /// Weight; 0 stops new connections (graceful termination).
    pub weight: u32,
    /// Upper connection threshold (0: none).
    pub u_thresh: u32,
    /// Lower connection threshold.
    pub l_thresh: u32,
    /// Address family; `None` is not sent (upstream leaves it to the service's family).
    pub af: Option<u16>,
    /// Active connections (dumps only).
    pub active_conns: u32,
    /// Inactive connections (dumps only).
    pub inact_conns: u32,
    /// Persistent connection templates (dumps only).
    pub persist_conns: u32,
}

impl Destination {
    /// A masquerading destination with `weight`.
    pub fn new(addr: IpAddr, port: u16, weight: u32) -> Self {
        Destination {
            addr,
            port,
            fwd_method: CONN_F_MASQ,
            weight,
            u_thresh: 0,
            l_thresh: 0,
            af: None,
            active_conns: 0,
            inact_conns: 0,
            persist_conns: 0,
        }
    }
}

fn proto_name(p: u16) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Decodes `union nf_inet_addr` for `af` (dumps carry 16 bytes; requests may carry 4).
fn parse_addr(af: u16, v: &[u8]) -> Result<IpAddr, String> {
    if af == libc::AF_INET6 as u16 {
        let b: [u8; 16] = v.get(..16).and_then(|s| s.try_into().ok()).ok_or("short IPv6 address")?;
        Ok(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        let b: [u8; 4] = v.get(..4).and_then(|s| s.try_into().ok()).ok_or("short IPv4 address")?;
        Ok(IpAddr::V4(Ipv4Addr::from(b)))
    }
}

/// One attribute as bytes: encoding goes through this so the kinds and values are spelled once.
#[derive(Debug, Clone)]
struct Attr {
    kind: u16,
    value: Vec<u8>,
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        self.value.len()
    }
    fn kind(&self) -> u16 {
        self.kind
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer[..self.value.len()].copy_from_slice(&self.value);
    }
}

fn a(kind: u16, value: impl Into<Vec<u8>>) -> Attr {
    Attr { kind, value: value.into() }
}

fn nest(kind: u16, children: &[Attr]) -> Attr {
    let mut value = vec![0u8; children.buffer_len()];
    children.emit(&mut value);
    Attr { kind, value }
}

fn service_attrs(s: &Service) -> Vec<Attr> {
    let mut v = vec![a(svc_attr::AF, s.af.to_ne_bytes())];
    if s.fwmark != 0 {
        v.push(a(svc_attr::FWMARK, s.fwmark.to_ne_bytes()));
    } else {
        v.push(a(svc_attr::PROTOCOL, s.protocol.to_ne_bytes()));
        v.push(a(svc_attr::ADDR, ip_bytes(&s.addr)));
        v.push(a(svc_attr::PORT, s.port.to_be_bytes()));
    }
    let mut name = s.sched_name.as_bytes().to_vec();
    name.push(0);
    v.push(a(svc_attr::SCHED_NAME, name));
    // The mask says which flag bits the request sets; upstream sets them all.
    let mut flags = s.flags.to_ne_bytes().to_vec();
    flags.extend_from_slice(&u32::MAX.to_ne_bytes());
    v.push(a(svc_attr::FLAGS, flags));
    v.push(a(svc_attr::TIMEOUT, s.timeout.to_ne_bytes()));
    v.push(a(svc_attr::NETMASK, s.netmask.to_ne_bytes()));
    v
}

fn dest_attrs(d: &Destination) -> Vec<Attr> {
    let mut v = vec![
        a(dest_attr::ADDR, ip_bytes(&d.addr)),
        a(dest_attr::PORT, d.port.to_be_bytes()),
        a(dest_attr::FWD_METHOD, (d.fwd_method & CONN_F_FWD_MASK).to_ne_bytes()),
        a(dest_attr::WEIGHT, d.weight.to_ne_bytes()),
    ];
    if let Some(af) = d.af {
        v.push(a(dest_attr::ADDR_FAMILY, af.to_ne_bytes()));
    }
    v.push(a(dest_attr::U_THRESH, d.u_thresh.to_ne_bytes()));
    v.push(a(dest_attr::L_THRESH, d.l_thresh.to_ne_bytes()));
    v
}

/// The payload of one IPVS generic netlink message: a command and its top-level attributes.
#[derive(Debug, Clone, Default)]
pub struct IpvsMessage {
    /// `IPVS_CMD_*`.
    pub cmd: u8,
    /// The service (`IPVS_CMD_ATTR_SERVICE`), if any.
    pub service: Option<Service>,
    /// The destination (`IPVS_CMD_ATTR_DEST`), if any.
    pub dest: Option<Destination>,
    /// Global timeouts (tcp, tcpfin, udp) for `SET_CONFIG`; zero entries are not sent.
    pub timeouts: Option<(u32, u32, u32)>,
    /// Attributes this client does not model, kept from replies.
    pub other: Vec<DefaultNla>,
}

impl IpvsMessage {
    /// A message for `cmd` with a service and optionally a destination.
    pub fn new(cmd: u8, service: Option<Service>, dest: Option<Destination>) -> Self {
        IpvsMessage { cmd, service, dest, ..Default::default() }
    }

    fn attrs(&self) -> Vec<Attr> {
        let mut v = Vec::new();
        if let Some(s) = &self.service {
            v.push(nest(cmd_attr::SERVICE, &service_attrs(s)));
        }
        if let Some(d) = &self.dest {
            v.push(nest(cmd_attr::DEST, &dest_attrs(d)));
        }
        if let Some((tcp, fin, udp)) = self.timeouts {
            for (k, t) in [(cmd_attr::TIMEOUT_TCP, tcp), (cmd_attr::TIMEOUT_TCP_FIN, fin), (cmd_attr::TIMEOUT_UDP, udp)]
            {
                if t > 0 {
                    v.push(a(k, t.to_ne_bytes()));
                }
            }
        }
        v
    }
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs().as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs().as_slice().emit(buffer)
    }
}

fn nlas(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), DecodeError>> {
    NlasIterator::new(buf).map(|r| {
        r.map(|b: NlaBuffer<&[u8]>| {
            // Masks NLA_F_NESTED / NLA_F_NET_BYTEORDER: the kernel may set them on replies.
            let kind = b.kind() & !(NLA_F_NESTED | netlink_packet_core::NLA_F_NET_BYTEORDER);
            (kind, b.into_inner_value())
        })
    })
}

trait IntoInnerValue<'a> {
    fn into_inner_value(self) -> &'a [u8];
}

impl<'a> IntoInnerValue<'a> for NlaBuffer<&'a [u8]> {
    fn into_inner_value(self) -> &'a [u8] {
        let len = self.value_length();
        let inner = self.into_inner();
        &inner[4..4 + len]
    }
}

fn u16_ne(v: &[u8]) -> Result<u16, String> {
    v.get(..2).and_then(|b| b.try_into().ok()).map(u16::from_ne_bytes).ok_or_else(|| "short u16".into())
}
fn u16_be(v: &[u8]) -> Result<u16, String> {
    v.get(..2).and_then(|b| b.try_into().ok()).map(u16::from_be_bytes).ok_or_else(|| "short be16".into())
}
fn u32_ne(v: &[u8]) -> Result<u32, String> {
    v.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes).ok_or_else(|| "short u32".into())
}

/// Decodes the nested `IPVS_SVC_ATTR_*` of a service.
pub fn parse_service(buf: &[u8]) -> Result<Service, String> {
    let mut s = Service::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, 0, "");
    let mut raw_addr = None;
    for r in nlas(buf) {
        let (k, v) = r.map_err(|e| e.to_string())?;
        match k {
            svc_attr::AF => s.af = u16_ne(v)?,
            svc_attr::PROTOCOL => s.protocol = u16_ne(v)?,
            svc_attr::ADDR => raw_addr = Some(v.to_vec()),
            svc_attr::PORT => s.port = u16_be(v)?,
            svc_attr::FWMARK => s.fwmark = u32_ne(v)?,
            svc_attr::SCHED_NAME => {
                s.sched_name = String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
            }
            svc_attr::FLAGS => s.flags = u32_ne(v)?,
            svc_attr::TIMEOUT => s.timeout = u32_ne(v)?,
            svc_attr::NETMASK => s.netmask = u32_ne(v)?,
            _ => {}
        }
    }
    if let Some(v) = raw_addr {
        s.addr = parse_addr(s.af, &v)?;
    }
    Ok(s)
}

/// Decodes the nested `IPVS_DEST_ATTR_*` of a destination; `svc_af` is used when the reply has no address family.
pub fn parse_dest(buf: &[u8], svc_af: u16) -> Result<Destination, String> {
    let mut d = Destination::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, 0);
    let mut raw_addr = None;
    for r in nlas(buf) {
        let (k, v) = r.map_err(|e| e.to_string())?;
        match k {
            dest_attr::ADDR => raw_addr = Some(v.to_vec()),
            dest_attr::PORT => d.port = u16_be(v)?,
            dest_attr::FWD_METHOD => d.fwd_method = u32_ne(v)?,
            dest_attr::WEIGHT => d.weight = u32_ne(v)?,
            dest_attr::U_THRESH => d.u_thresh = u32_ne(v)?,
            dest_attr::L_THRESH => d.l_thresh = u32_ne(v)?,
            dest_attr::ACTIVE_CONNS => d.active_conns = u32_ne(v)?,
            dest_attr::INACT_CONNS => d.inact_conns = u32_ne(v)?,
            dest_attr::PERSIST_CONNS => d.persist_conns = u32_ne(v)?,
            dest_attr::ADDR_FAMILY => d.af = Some(u16_ne(v)?),
            _ => {}
        }
    }
    if let Some(v) = raw_addr {
        d.addr = parse_addr(d.af.unwrap_or(svc_af), &v)?;
    }
    Ok(d)
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut m = IpvsMessage { cmd: header.cmd, ..Default::default() };
        let mut dest_raw = None;
        for r in nlas(buf) {
            let (k, v) = r?;
            match k {
                cmd_attr::SERVICE => m.service = Some(parse_service(v).map_err(DecodeError::from)?),
                cmd_attr::DEST => dest_raw = Some(v),
                _ => m.other.push(DefaultNla::new(k, v.to_vec())),
            }
        }
        if let Some(v) = dest_raw {
            let af = m.service.as_ref().map_or(libc::AF_INET as u16, |s| s.af);
            m.dest = Some(parse_dest(v, af).map_err(DecodeError::from)?);
        }
        Ok(m)
    }
}

/// The complete request bytes (`nlmsghdr` + `genlmsghdr` + attributes) for `msg` to family `family_id`.
pub fn encode_request(family_id: u16, seq: u32, flags: u16, msg: IpvsMessage) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(msg);
    genl.set_resolved_family_id(family_id);
    let mut nl = NetlinkMessage::from(genl);
    nl.header.flags = flags;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// A blocking IPVS client on its own generic netlink socket (in the caller's network namespace).
pub struct IpvsClient {
    socket: Socket,
    family_id: u16,
    seq: u32,
}

impl std::fmt::Debug for IpvsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsClient").field("family_id", &self.family_id).finish()
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}

fn open_socket() -> Result<Socket, Error> {
    let mut socket = Socket::new(NETLINK_GENERIC).map_err(io("open"))?;
    socket.bind_auto().map_err(io("bind"))?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io("connect"))?;
    Ok(socket)
}

/// Sends `bytes` and collects every reply message up to the ACK or `NLMSG_DONE`.
fn transact<I>(socket: &Socket, bytes: &[u8], request: &str) -> Result<Vec<I>, Error>
where
    I: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug,
{
    socket.send(bytes, 0).map_err(io("send"))?;
    let mut out = Vec::new();
    loop {
        let (buf, _) = socket.recv_from_full().map_err(io("recv"))?;
        let mut off = 0;
        while off < buf.len() {
            let msg = NetlinkMessage::<I>::deserialize(&buf[off..])
                .map_err(|e| Error::Decode { request: request.into(), message: e.to_string() })?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(Error::Decode { request: request.into(), message: "zero-length message".into() });
            }
            off += (len + 3) & !3;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(out),
                        Some(code) => Err(Error::Kernel {
                            request: request.into(),
                            source: std::io::Error::from_raw_os_error(-code.get()),
                        }),
                    };
                }
                NetlinkPayload::InnerMessage(m) => out.push(m),
                _ => {}
            }
        }
    }
}

/// The id of generic netlink family `name`, from a dump of all families (a dump never asks the kernel to load a
/// module, unlike a `CTRL_CMD_GETFAMILY` by name); `None` when it is not registered.
pub fn resolve_family(name: &str) -> Result<Option<u16>, Error> {
    let socket = open_socket()?;
    let mut genl = GenlMessage::from_payload(GenlCtrl { cmd: GenlCtrlCmd::GetFamily, nlas: vec![] });
    genl.finalize();
    let mut nl = NetlinkMessage::from(genl);
    nl.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    nl.header.sequence_number = 1;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    let replies: Vec<GenlMessage<GenlCtrl>> = transact(&socket, &buf, "CTRL_CMD_GETFAMILY dump")?;
    for r in replies {
        let (mut id, mut fam) = (None, None);
        for nla in &r.payload.nlas {
            match nla {
                GenlCtrlAttrs::FamilyId(i) => id = Some(*i),
                GenlCtrlAttrs::FamilyName(n) => fam = Some(n.as_str()),
                _ => {}
            }
        }
        if fam == Some(name) {
            return Ok(id);
        }
    }
    Ok(None)
}

impl IpvsClient {
    /// Opens a socket and resolves the `IPVS` family; [`Error::FamilyNotFound`] when the kernel has no IPVS.
    pub fn new() -> Result<Self, Error> {
        let family_id = resolve_family(IPVS_GENL_NAME)?.ok_or(Error::FamilyNotFound)?;
        Ok(IpvsClient { socket: open_socket()?, family_id, seq: 0 })
    }

    /// The resolved family id.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    fn request(&mut self, flags: u16, msg: IpvsMessage, what: &str) -> Result<Vec<IpvsMessage>, Error> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = encode_request(self.family_id, self.seq, NLM_F_REQUEST | flags, msg);
        let replies: Vec<GenlMessage<IpvsMessage>> = transact(&self.socket, &bytes, what)?;
        Ok(replies.into_iter().map(|m| m.payload).collect())
    }

    fn svc_cmd(&mut self, cmd: u8, name: &str, svc: &Service, dest: Option<&Destination>) -> Result<(), Error> {
        let what = match dest {
            Some(d) => format!("{name} {} -> {}", svc.describe(), std::net::SocketAddr::new(d.addr, d.port)),
            None => format!("{name} {}", svc.describe()),
        };
        self.request(NLM_F_ACK, IpvsMessage::new(cmd, Some(svc.clone()), dest.cloned()), &what).map(|_| ())
    }

    /// `IPVS_CMD_NEW_SERVICE`.
    pub fn new_service(&mut self, svc: &Service) -> Result<(), Error> {
        self.svc_cmd(cmd::NEW_SERVICE, "NEW_SERVICE", svc, None)
    }
    /// `IPVS_CMD_SET_SERVICE`.
    pub fn set_service(&mut self, svc: &Service) -> Result<(), Error> {
        self.svc_cmd(cmd::SET_SERVICE, "SET_SERVICE", svc, None)
    }
    /// `IPVS_CMD_DEL_SERVICE`.
    pub fn del_service(&mut self, svc: &Service) -> Result<(), Error> {
        self.svc_cmd(cmd::DEL_SERVICE, "DEL_SERVICE", svc, None)
    }
    /// `IPVS_CMD_NEW_DEST`.
    pub fn new_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), Error> {
        self.svc_cmd(cmd::NEW_DEST, "NEW_DEST", svc, Some(d))
    }
    /// `IPVS_CMD_SET_DEST`.
    pub fn set_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), Error> {
        self.svc_cmd(cmd::SET_DEST, "SET_DEST", svc, Some(d))
    }
    /// `IPVS_CMD_DEL_DEST`.
    pub fn del_dest(&mut self, svc: &Service, d: &Destination) -> Result<(), Error> {
        self.svc_cmd(cmd::DEL_DEST, "DEL_DEST", svc, Some(d))
    }

    /// Every virtual server (`IPVS_CMD_GET_SERVICE` dump).
    pub fn services(&mut self) -> Result<Vec<Service>, Error> {
        let r = self.request(NLM_F_DUMP, IpvsMessage::new(cmd::GET_SERVICE, None, None), "GET_SERVICE dump")?;
        Ok(r.into_iter().filter_map(|m| m.service).collect())
    }

    /// The destinations of `svc` (`IPVS_CMD_GET_DEST` dump), with their connection counts.
    pub fn destinations(&mut self, svc: &Service) -> Result<Vec<Destination>, Error> {
        let what = format!("GET_DEST dump {}", svc.describe());
        let r = self.request(NLM_F_DUMP, IpvsMessage::new(cmd::GET_DEST, Some(svc.clone()), None), &what)?;
        Ok(r.into_iter().filter_map(|m| m.dest).collect())
    }

    /// `IPVS_CMD_SET_CONFIG` with the global timeouts (seconds; zero leaves one unchanged).
    pub fn set_timeouts(&mut self, tcp: u32, tcp_fin: u32, udp: u32) -> Result<(), Error> {
        let msg = IpvsMessage { cmd: cmd::SET_CONFIG, timeouts: Some((tcp, tcp_fin, udp)), ..Default::default() };
        self.request(NLM_F_ACK, msg, "SET_CONFIG timeouts").map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected bytes are written by hand from ip_vs.h and the netlink wire format (x86-64 little endian):
    // nlattr = { u16 len (incl. 4-byte header, excl. padding), u16 type }, values padded to 4 bytes.

    fn v4_service() -> Service {
        let mut s = Service::new("10.96.0.10".parse().unwrap(), 6, 80, "rr");
        s.flags = SVC_F_PERSISTENT;
        s.timeout = 10800;
        s
    }

    #[rustfmt::skip]
    const V4_SERVICE_ATTRS: &[u8] = &[
        // IPVS_CMD_ATTR_SERVICE, len 4 + 68 = 72
        72, 0, 1, 0,
        6, 0, 1, 0, 2, 0, 0, 0,               // AF = AF_INET (2), u16 + 2 pad
        6, 0, 2, 0, 6, 0, 0, 0,               // PROTOCOL = 6
        8, 0, 3, 0, 10, 96, 0, 10,            // ADDR = 10.96.0.10 (4 bytes)
        6, 0, 4, 0, 0, 80, 0, 0,              // PORT = 80 big-endian
        7, 0, 6, 0, b'r', b'r', 0, 0,         // SCHED_NAME "rr\0" + 1 pad
        12, 0, 7, 0, 1, 0, 0, 0, 255, 255, 255, 255, // FLAGS {flags=PERSISTENT, mask=~0}
        8, 0, 8, 0, 0x30, 0x2a, 0, 0,         // TIMEOUT = 10800
        8, 0, 9, 0, 255, 255, 255, 255,       // NETMASK = 0xffffffff
    ];

    #[test]
    fn new_service_request_bytes() {
        let bytes = encode_request(
            0x1c,
            7,
            NLM_F_REQUEST | NLM_F_ACK,
            IpvsMessage::new(cmd::NEW_SERVICE, Some(v4_service()), None),
        );
        let total = 16 + 4 + V4_SERVICE_ATTRS.len();
        let mut want = vec![total as u8, 0, 0, 0, 0x1c, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&[cmd::NEW_SERVICE, 1, 0, 0]); // genlmsghdr: cmd, version 1, reserved
        want.extend_from_slice(V4_SERVICE_ATTRS);
        assert_eq!(bytes, want);
    }

    #[test]
    fn new_dest_request_bytes_v6() {
        let svc = Service::new("fd00::a".parse().unwrap(), 17, 53, "wrr");
        let d = Destination::new("fd00::1:2".parse().unwrap(), 5353, 1);
        let bytes =
            encode_request(30, 1, NLM_F_REQUEST | NLM_F_ACK, IpvsMessage::new(cmd::NEW_DEST, Some(svc), Some(d)));
        #[rustfmt::skip]
        let svc_attrs: Vec<u8> = [
            &[84u8, 0, 1, 0][..],
            &[6, 0, 1, 0, 10, 0, 0, 0],       // AF_INET6 = 10
            &[6, 0, 2, 0, 17, 0, 0, 0],
            &[20, 0, 3, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a],
            &[6, 0, 4, 0, 0, 53, 0, 0],
            &[8, 0, 6, 0, b'w', b'r', b'r', 0],
            &[12, 0, 7, 0, 0, 0, 0, 0, 255, 255, 255, 255],
            &[8, 0, 8, 0, 0, 0, 0, 0],
            &[8, 0, 9, 0, 128, 0, 0, 0],      // NETMASK = 128 for IPv6
        ].concat();
        #[rustfmt::skip]
        let dest_attrs: Vec<u8> = [
            &[64u8, 0, 2, 0][..],
            &[20, 0, 1, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2],
            &[6, 0, 2, 0, 0x14, 0xe9, 0, 0],  // 5353 = 0x14e9 big-endian
            &[8, 0, 3, 0, 0, 0, 0, 0],        // FWD_METHOD = MASQ
            &[8, 0, 4, 0, 1, 0, 0, 0],        // WEIGHT = 1
            &[8, 0, 5, 0, 0, 0, 0, 0],        // U_THRESH
            &[8, 0, 6, 0, 0, 0, 0, 0],        // L_THRESH
        ].concat();
        assert_eq!(svc_attrs.len(), 84);
        assert_eq!(dest_attrs.len(), 64);
        assert_eq!(&bytes[16..20], &[cmd::NEW_DEST, 1, 0, 0]);
        assert_eq!(&bytes[4..6], &[30, 0]);
        assert_eq!(bytes[20..].to_vec(), [svc_attrs, dest_attrs].concat());
        assert_eq!(bytes[0] as usize, bytes.len());
    }

    #[test]
    fn dump_request_has_no_attributes_and_dump_flags() {
        let bytes = encode_request(30, 2, NLM_F_REQUEST | NLM_F_DUMP, IpvsMessage::new(cmd::GET_SERVICE, None, None));
        assert_eq!(bytes, vec![20, 0, 0, 0, 30, 0, 0x01, 0x03, 2, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0]);
    }

    #[test]
    fn decodes_a_dumped_service_with_16_byte_address_and_hashed_flag() {
        #[rustfmt::skip]
        let svc: Vec<u8> = [
            &[6u8, 0, 1, 0, 2, 0, 0, 0][..],
            &[6, 0, 2, 0, 17, 0, 0, 0],
            &[20, 0, 3, 0, 192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[6, 0, 4, 0, 0x1f, 0x90, 0, 0],
            &[7, 0, 6, 0, b's', b'h', 0, 0],
            &[12, 0, 7, 0, 3, 0, 0, 0, 255, 255, 255, 255],
            &[8, 0, 8, 0, 60, 0, 0, 0],
            &[8, 0, 9, 0, 255, 255, 255, 255],
            &[8, 0, 10, 0x80, 1, 2, 3, 4], // STATS, NLA_F_NESTED set: ignored
        ].concat();
        let s = parse_service(&svc).unwrap();
        assert_eq!(s.addr, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!((s.af, s.protocol, s.port, s.flags, s.timeout), (2, 17, 8080, 3, 60));
        assert_eq!(s.sched_name, "sh");
    }

    #[test]
    fn decodes_a_dumped_destination_with_connection_counts() {
        #[rustfmt::skip]
        let d: Vec<u8> = [
            &[20u8, 0, 1, 0, 10, 244, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
            &[6, 0, 2, 0, 0x23, 0x82, 0, 0],  // 9090
            &[8, 0, 3, 0, 0, 0, 0, 0],
            &[8, 0, 4, 0, 0, 0, 0, 0],        // weight 0: draining
            &[8, 0, 5, 0, 0, 0, 0, 0],
            &[8, 0, 6, 0, 0, 0, 0, 0],
            &[8, 0, 7, 0, 3, 0, 0, 0],        // ACTIVE_CONNS 3
            &[8, 0, 8, 0, 4, 1, 0, 0],        // INACT_CONNS 260
            &[8, 0, 9, 0, 0, 0, 0, 0],
            &[6, 0, 11, 0, 2, 0, 0, 0],       // ADDR_FAMILY AF_INET
        ].concat();
        let d = parse_dest(&d, 10).unwrap();
        assert_eq!(d.addr, "10.244.1.5".parse::<IpAddr>().unwrap());
        assert_eq!((d.port, d.weight, d.active_conns, d.inact_conns, d.af), (9090, 0, 3, 260, Some(2)));
    }

    #[test]
    fn reply_message_round_trips_through_genl_parsing() {
        let bytes = encode_request(30, 1, 0, IpvsMessage::new(cmd::NEW_SERVICE, Some(v4_service()), None));
        let msg = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(m) = msg.payload else { panic!("not an inner message") };
        assert_eq!(m.payload.cmd, cmd::NEW_SERVICE);
        assert_eq!(m.payload.service, Some(v4_service()));
    }

    #[test]
    fn set_config_sends_only_nonzero_timeouts() {
        let msg = IpvsMessage { cmd: cmd::SET_CONFIG, timeouts: Some((900, 0, 300)), ..Default::default() };
        let bytes = encode_request(30, 1, NLM_F_REQUEST | NLM_F_ACK, msg);
        assert_eq!(&bytes[20..], &[8, 0, 4, 0, 0x84, 3, 0, 0, 8, 0, 6, 0, 0x2c, 1, 0, 0]);
    }
}
