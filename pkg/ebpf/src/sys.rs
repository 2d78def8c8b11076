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
