//! The two `bpf(2)` commands aya 0.14 does not expose publicly for cgroup links: opening a pinned
//! object as a raw fd and `BPF_LINK_UPDATE` (atomic program replacement inside an existing link).

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
