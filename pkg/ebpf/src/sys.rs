//! System calls aya 0.14 does not expose the way we need them: opening a pinned object as a raw fd,
//! `BPF_LINK_UPDATE` (atomic program replacement inside an existing link), tcx links from raw fds, and a
//! minimal rtnetlink client for the clsact path (qdisc, create-or-replace of cls_bpf filters, dumps): aya's
//! netlink attach only creates (`NLM_F_EXCL`) and needs its own program object on the calling thread.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` prefix large enough for both commands; the kernel accepts a shorter attr.
#[repr(C, align(8))]
#[derive(Default)]
struct Attr([u32; 8]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised buffer of the size we pass; the kernel only reads it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::default();
    let ptr = c.as_ptr() as u64;
    attr.0[0] = ptr as u32;
    attr.0[1] = (ptr >> 32) as u32;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of a bpf_link in place (`BPF_LINK_UPDATE`): no window without a program.
pub(crate) fn link_update(link: impl AsFd, new_prog: impl AsFd) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.0[0] = link.as_fd().as_raw_fd() as u32;
    attr.0[1] = new_prog.as_fd().as_raw_fd() as u32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The key after `key` in a map (`BPF_MAP_GET_NEXT_KEY`); `key = None` asks for the first one. `Ok(false)`
/// means there is no next key (`ENOENT`).
///
/// # Safety
///
/// `next` (and `key`, when given) must be at least the map's key size as the kernel reports it for this
/// very fd: the kernel writes that many bytes into `next`.
pub(crate) unsafe fn map_get_next_key(map: impl AsFd, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let mut attr = Attr::default();
    attr.0[0] = map.as_fd().as_raw_fd() as u32;
    // A NULL key pointer makes the kernel return the first key.
    let kptr = key.map_or(0u64, |k| k.as_ptr() as u64);
    let nptr = next.as_mut_ptr() as u64;
    attr.0[2] = kptr as u32;
    attr.0[3] = (kptr >> 32) as u32;
    attr.0[4] = nptr as u32;
    attr.0[5] = (nptr >> 32) as u32;
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: tcx ingress (kernel ≥ 6.6).
pub(crate) const BPF_TCX_INGRESS: u32 = 46;
/// `enum bpf_attach_type`: tcx egress (kernel ≥ 6.6).
pub(crate) const BPF_TCX_EGRESS: u32 = 47;

/// Attaches a program to a device with a tcx bpf_link (`BPF_LINK_CREATE`), appended after existing tcx
/// programs. The ifindex is resolved in the calling thread's network namespace.
pub(crate) fn tcx_link_create(prog: impl AsFd, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.0[0] = prog.as_fd().as_raw_fd() as u32;
    attr.0[1] = ifindex;
    attr.0[2] = attach_type;
    // flags, relative_fd and expected_revision stay 0: append, no ordering constraint.
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a BPF object (`BPF_OBJ_PIN`) at `path` on bpffs.
pub(crate) fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::default();
    let ptr = c.as_ptr() as u64;
    attr.0[0] = ptr as u32;
    attr.0[1] = (ptr >> 32) as u32;
    attr.0[2] = fd.as_fd().as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Runs `f` on a short-lived thread that first enters the network namespace `netns` (setns only affects
/// that thread), so interface names and indices resolve there and never in the caller's namespace.
pub(crate) fn in_netns<T: Send>(netns: &std::fs::File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid namespace fd; only this thread changes namespace and it exits right after.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("network-namespace worker thread panicked"))?
    })
}

/// One address of an interface, from `getifaddrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfAddr {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// The address.
    pub ip: std::net::IpAddr,
}

/// Every IPv4/IPv6 address of every interface in the calling thread's network namespace.
pub(crate) fn interface_addrs() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    // Bounded by the kernel's list, which is finite and ends with NULL.
    while !cur.is_null() {
        // SAFETY: `cur` is an element of the list getifaddrs returned and has not been freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family tells its real type.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    std::net::IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    std::net::IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: as above.
        let ifindex = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        if ifindex != 0 {
            out.push(IfAddr { name, ifindex, ip });
        }
    }
    // SAFETY: frees the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Every device of the calling thread's network namespace as (ifindex, name).
pub(crate) fn list_links() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: returns a list we free below, or NULL with errno set.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    // Bounded: the list ends with a zero entry.
    loop {
        // SAFETY: `cur` points into the array if_nameindex returned, which ends with a zeroed entry.
        let e = unsafe { &*cur };
        if e.if_index == 0 || e.if_name.is_null() {
            break;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(e.if_name) }.to_string_lossy().into_owned();
        out.push((e.if_index, name));
        // SAFETY: still inside the array (the terminator was not reached).
        cur = unsafe { cur.add(1) };
    }
    // SAFETY: frees the list if_nameindex allocated, once.
    unsafe { libc::if_freenameindex(head) };
    Ok(out)
}

/// Whether the kernel has tcx (`BPF_LINK_CREATE` with `BPF_TCX_INGRESS`, kernel ≥ 6.6), probed without
/// attaching anything: a link request for ifindex 0 fails with `ENODEV` where tcx exists (the device lookup
/// comes after the attach-type checks) and with `EINVAL` (or `EOPNOTSUPP`) where the attach type is unknown.
/// `prog` must be a loaded `sched_cls` program.
pub(crate) fn tcx_supported(prog: impl AsFd) -> io::Result<bool> {
    match tcx_link_create(prog, 0, BPF_TCX_INGRESS) {
        // Never expected (no device 0); the link dies with the fd.
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(true),
        // 524: the kernel-internal ENOTSUPP.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | 524)) => Ok(false),
        Err(e) => Err(e),
    }
}

// ---- rtnetlink for the legacy tc path (clsact qdisc + cls_bpf filters) of kernels without tcx ----

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// In an error message: the original request was not echoed back (ext-ack TLVs follow the header).
const NLM_F_CAPPED: u16 = 0x100;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_EXT_ACK: libc::c_int = 11;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// `TC_H_CLSACT`: parent of the clsact qdisc; its handle is `ffff:`.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the clsact ingress hook.
pub(crate) const TC_PARENT_INGRESS: u32 = 0xFFFF_FFF2;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`: the clsact egress hook.
pub(crate) const TC_PARENT_EGRESS: u32 = 0xFFFF_FFF3;
/// `htons(ETH_P_ALL)` in the low half of `tcm_info`: the filter sees every protocol.
const PROTO_ALL: u32 = (libc::ETH_P_ALL as u16).to_be() as u32;
const NLMSG_HDR: usize = 16;
const TCMSG_LEN: usize = 20;
/// Upper bound of datagrams read for one request (a dump of one hook is a handful).
const MAX_READS: usize = 4096;

static NL_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// One tc filter of a clsact hook, as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcFilter {
    /// Priority (`pref` in `tc filter show`).
    pub prio: u16,
    /// Filter handle; 0 for the per-priority chain head the kernel reports too.
    pub handle: u32,
    /// Classifier kind (`bpf`, `u32`, `flower`, …).
    pub kind: String,
    /// `TCA_BPF_NAME` of a bpf filter.
    pub name: Option<String>,
    /// Id of the attached program, for a bpf filter.
    pub prog_id: Option<u32>,
}

/// A request: nlmsghdr + tcmsg, then attributes.
struct TcRequest(Vec<u8>);

impl TcRequest {
    fn new(ty: u16, flags: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> TcRequest {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        b.extend_from_slice(&NL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        b.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        b.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        b.extend_from_slice(&handle.to_ne_bytes());
        b.extend_from_slice(&parent.to_ne_bytes());
        b.extend_from_slice(&info.to_ne_bytes());
        TcRequest(b)
    }

    fn seq(&self) -> u32 {
        u32::from_ne_bytes(self.0[8..12].try_into().expect("4 bytes"))
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    /// A nested attribute holding what `f` adds.
    fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        f(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn finish(&mut self) -> &[u8] {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        &self.0
    }
}

/// A NETLINK_ROUTE socket of the calling thread's network namespace.
struct Rtnl(OwnedFd);

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let sock = Rtnl(unsafe { OwnedFd::from_raw_fd(fd) });
        let one: libc::c_int = 1;
        // Best effort: extended acks carry the kernel's reason text ("Filter kind … does not match …").
        // SAFETY: `one` is a c_int of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_NETLINK,
                NETLINK_EXT_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // Bounds every receive: the kernel answers at once, so this only fires on a kernel bug.
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: `tv` is a timeval of the size passed.
        if unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl is valid; pid 0 is the kernel.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `sa` are valid for the sizes passed.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Sends `req` and reads answers for its sequence number, handing each non-error message (type and
    /// payload) to `each`, until the ack (or, for dumps, `NLMSG_DONE`).
    fn exchange(&self, req: &mut TcRequest, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let seq = req.seq();
        self.send(req.finish())?;
        let mut buf = vec![0u8; 65536];
        for _ in 0..MAX_READS {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                if len < NLMSG_HDR || len > rest.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let ty = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
                let flags = u16::from_ne_bytes(rest[6..8].try_into().expect("2 bytes"));
                let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                let payload = &rest[NLMSG_HDR..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if msg_seq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return nl_error(payload, flags),
                    _ => each(ty, payload),
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no netlink acknowledgement"))
    }
}

/// The result an `NLMSG_ERROR` payload carries (0 is the ack), with the ext-ack text when present.
fn nl_error(payload: &[u8], flags: u16) -> io::Result<()> {
    let Some(code) = payload.get(0..4).map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes"))) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink error message"));
    };
    if code == 0 {
        return Ok(());
    }
    let err = io::Error::from_raw_os_error(-code);
    // TLVs follow the echoed request header (and, unless capped, the whole request).
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDR
    } else {
        payload.get(4..8).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize).unwrap_or(NLMSG_HDR)
    };
    let tlvs = payload.get(4 + echoed.next_multiple_of(4)..).unwrap_or_default();
    match attrs(tlvs).find(|(t, _)| *t == NLMSGERR_ATTR_MSG) {
        Some((_, text)) => Err(io::Error::new(err.kind(), NlError { errno: -code, text: c_str(text) })),
        None => Err(err),
    }
}

/// A netlink error with the kernel's extended-ack text.
#[derive(Debug)]
struct NlError {
    errno: i32,
    text: String,
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", io::Error::from_raw_os_error(self.errno), self.text)
    }
}

impl std::error::Error for NlError {}

/// The errno of `e`, also when it carries an extended-ack text.
fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| e.get_ref().and_then(|i| i.downcast_ref::<NlError>()).map(|n| n.errno))
}

/// Netlink attributes (type without flag bits, payload) of `b`; stops at the first malformed one.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3FFF;
        if len < 4 || len > b.len() {
            return None;
        }
        let data = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((ty, data))
    })
}

fn c_str(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
}

/// Adds the clsact qdisc to a device of the calling thread's namespace; an existing one is kept.
pub(crate) fn clsact_add(ifindex: u32) -> io::Result<()> {
    let mut req =
        TcRequest::new(RTM_NEWQDISC, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0);
    req.attr(TCA_KIND, b"clsact\0");
    match Rtnl::open()?.exchange(&mut req, |_, _| {}) {
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// Removes the clsact qdisc of a device (with every filter still on it); a missing one is not an error.
pub(crate) fn clsact_del(ifindex: u32) -> io::Result<()> {
    let mut req = TcRequest::new(RTM_DELQDISC, NLM_F_ACK, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0);
    req.attr(TCA_KIND, b"clsact\0");
    match Rtnl::open()?.exchange(&mut req, |_, _| {}) {
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        r => r,
    }
}

/// Attaches `prog` as the direct-action bpf filter `prio`/`handle` of a clsact hook (`parent`), or swaps
/// the program of that filter in place when it exists (`NLM_F_CREATE` without `NLM_F_EXCL`: cls_bpf
/// replaces the program atomically, so the hook never runs without one).
pub(crate) fn tc_filter_replace(
    ifindex: u32,
    parent: u32,
    prio: u16,
    handle: u32,
    prog: impl AsFd,
    name: &str,
) -> io::Result<()> {
    let info = (u32::from(prio) << 16) | PROTO_ALL;
    let mut req = TcRequest::new(RTM_NEWTFILTER, NLM_F_ACK | NLM_F_CREATE, ifindex, handle, parent, info);
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    let fd = prog.as_fd().as_raw_fd() as u32;
    req.attr(TCA_KIND, b"bpf\0").nested(TCA_OPTIONS, |r| {
        r.attr(TCA_BPF_FD, &fd.to_ne_bytes())
            .attr(TCA_BPF_NAME, &cname)
            .attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes());
    });
    Rtnl::open()?.exchange(&mut req, |_, _| {})
}

/// Deletes the bpf filter `prio`/`handle` of a clsact hook; `Ok(false)` when there was none.
pub(crate) fn tc_filter_del(ifindex: u32, parent: u32, prio: u16, handle: u32) -> io::Result<bool> {
    let info = (u32::from(prio) << 16) | PROTO_ALL;
    let mut req = TcRequest::new(RTM_DELTFILTER, NLM_F_ACK, ifindex, handle, parent, info);
    req.attr(TCA_KIND, b"bpf\0");
    match Rtnl::open()?.exchange(&mut req, |_, _| {}) {
        Ok(()) => Ok(true),
        // ENOENT: no such filter or priority; EINVAL: no clsact qdisc (device without one).
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The filters of a clsact hook (`parent`) of a device; empty when the device has no clsact qdisc.
pub(crate) fn tc_filters(ifindex: u32, parent: u32) -> io::Result<Vec<TcFilter>> {
    let mut req = TcRequest::new(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, 0);
    let mut out = Vec::new();
    Rtnl::open()?.exchange(&mut req, |ty, payload| {
        if ty != RTM_NEWTFILTER || payload.len() < TCMSG_LEN {
            return;
        }
        let word = |i: usize| u32::from_ne_bytes(payload[i..i + 4].try_into().expect("4 bytes"));
        let (handle, info) = (word(8), word(16));
        let mut f = TcFilter { prio: (info >> 16) as u16, handle, kind: String::new(), name: None, prog_id: None };
        for (t, data) in attrs(&payload[TCMSG_LEN..]) {
            match t {
                TCA_KIND => f.kind = c_str(data),
                TCA_OPTIONS => {
                    for (t, data) in attrs(data) {
                        match t {
                            TCA_BPF_NAME => f.name = Some(c_str(data)),
                            TCA_BPF_ID if data.len() >= 4 => {
                                f.prog_id = Some(u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(f);
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_request_encodes_nested_bpf_options() {
        let mut req = TcRequest::new(RTM_NEWTFILTER, NLM_F_ACK | NLM_F_CREATE, 7, 0x4b01, TC_PARENT_INGRESS, 1);
        req.attr(TCA_KIND, b"bpf\0").nested(TCA_OPTIONS, |r| {
            r.attr(TCA_BPF_NAME, b"kp_tc_ingress\0").attr(TCA_BPF_FLAGS, &1u32.to_ne_bytes());
        });
        let b = req.finish().to_vec();
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(u32::from_ne_bytes(b[24..28].try_into().unwrap()), 0x4b01);
        let top: Vec<(u16, Vec<u8>)> = attrs(&b[NLMSG_HDR + TCMSG_LEN..]).map(|(t, d)| (t, d.to_vec())).collect();
        assert_eq!(top.len(), 2, "{top:?}");
        assert_eq!(c_str(&top[0].1), "bpf");
        let inner: Vec<(u16, String)> = attrs(&top[1].1).map(|(t, d)| (t, c_str(d))).collect();
        assert_eq!(inner[0], (TCA_BPF_NAME, "kp_tc_ingress".to_string()));
        assert_eq!(inner[1].0, TCA_BPF_FLAGS);
    }

    #[test]
    fn netlink_error_keeps_errno_and_ext_ack_text() {
        // error -17, the echoed header only (capped), then NLMSGERR_ATTR_MSG.
        let mut p = (-17i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&(NLMSG_HDR as u32).to_ne_bytes());
        p.extend_from_slice(&[0; NLMSG_HDR - 4]);
        let text = b"Exclusivity flag on\0";
        p.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        let e = nl_error(&p, NLM_F_CAPPED).unwrap_err();
        assert_eq!(errno(&e), Some(libc::EEXIST));
        assert!(e.to_string().contains("Exclusivity flag on"), "{e}");
        assert!(nl_error(&0i32.to_ne_bytes(), 0).is_ok());
    }
}
