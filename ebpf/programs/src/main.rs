//! Socket-level load balancing for kube-proxy-rs: cgroup `sock_addr` programs.
//!
//! `connect4/6` and `sendmsg4/6` look a destination up in `KP_SERVICES`, pick a backend and rewrite the
//! destination before the kernel routes anything, recording the translation in `KP_SOCK_REVNAT` keyed by
//! socket cookie. `recvmsg4/6` and `getpeername4/6` undo it so the application sees the address it
//! dialled. Layouts live in `ebpf-common`; userspace (`pkg/ebpf`) writes the service maps.
//!
//! The tc programs of node devices (NodePort / ExternalIP / LoadBalancer from outside the node, with BPF
//! conntrack and SNAT) live in [`tc`] and share this object's service maps.
#![no_std]
#![no_main]

mod tc;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use ebpf_common::{
    AFFINITY_MAX_ENTRIES, Addr, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, BackendValue, HASH_NO_PREALLOC,
    REV_NAT_MAX_ENTRIES, RevNatValue, SCOPE_EXT, SCOPE_INT, SERVICES_MAX_ENTRIES, SOCK_LB_SCOPE_ALL,
    SOCK_LB_SCOPE_HOST_ONLY, SOCK_LB_SKIP_MAX_ENTRIES, SOCK_REV_NAT_MAX_ENTRIES, SVC_FLAG_AFFINITY,
    SVC_FLAG_LOCAL_SCOPE, ServiceCounters, ServiceKey, ServiceValue, SockLbConfig, SockRevNatKey, SockRevNatValue,
    addr_from_v4, addr_to_v4,
};

#[map]
static KP_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(SERVICES_MAX_ENTRIES, HASH_NO_PREALLOC);

#[map]
static KP_BACKENDS: HashMap<u32, BackendValue> = HashMap::with_max_entries(BACKENDS_MAX_ENTRIES, HASH_NO_PREALLOC);

// Not read by the socket programs; declared here so the object owns its definition (userspace rebuilds the
// service-id allocation from it, and the future tc programs will use it).
#[map]
static KP_REV_NAT: HashMap<u32, RevNatValue> = HashMap::with_max_entries(REV_NAT_MAX_ENTRIES, HASH_NO_PREALLOC);

#[map]
static KP_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(SOCK_REV_NAT_MAX_ENTRIES, 0);

#[map]
static KP_AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(AFFINITY_MAX_ENTRIES, 0);

#[map]
static KP_COUNTERS: PerCpuArray<ServiceCounters> = PerCpuArray::with_max_entries(REV_NAT_MAX_ENTRIES, 0);

#[map]
static KP_SOCK_LB_CFG: Array<SockLbConfig> = Array::with_max_entries(1, 0);

#[map]
static KP_SOCK_LB_SKIP: HashMap<u64, u8> = HashMap::with_max_entries(SOCK_LB_SKIP_MAX_ENTRIES, 0);

/// `connect`/`sendmsg`: let the syscall proceed.
const ALLOW: i32 = 1;
/// `connect`/`sendmsg`: fail the syscall (with the errno set by `bpf_set_retval`, else EPERM).
const REJECT: i32 = 0;
/// Kernel errno for "connection refused"; what kube-proxy's REJECT rule gives a client of a service
/// without endpoints.
const ECONNREFUSED: i32 = 111;
const NSEC_PER_SEC: u64 = 1_000_000_000;

/// Outcome of a service lookup.
enum Xlate {
    /// Not a service (or not one we can translate): leave the destination alone.
    Pass,
    /// A service without usable endpoints: fail with ECONNREFUSED.
    Refuse,
    /// Rewrite the destination to this backend.
    To { addr: Addr, port: u16, service_id: u32 },
}

#[inline(always)]
pub(crate) fn bump(service_id: u32, refused: bool) {
    if let Some(c) = KP_COUNTERS.get_ptr_mut(service_id) {
        // Per-CPU slot: no other writer, a plain add is enough.
        unsafe {
            if refused {
                (*c).no_endpoints += 1;
            } else {
                (*c).translated += 1;
            }
        }
    }
}

/// Whether this socket bypasses socket LB (`--socket-lb-scope`): its network namespace is not the proxy's
/// (host-only) or is listed in `KP_SOCK_LB_SKIP` (opt-out). One array lookup under the default scope.
#[inline(always)]
fn bypass(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = KP_SOCK_LB_CFG.get(0) else {
        return false;
    };
    let scope = cfg.scope;
    if scope == SOCK_LB_SCOPE_ALL {
        return false;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if scope == SOCK_LB_SCOPE_HOST_ONLY {
        return cookie != cfg.host_netns_cookie;
    }
    unsafe { KP_SOCK_LB_SKIP.get(&cookie) }.is_some()
}

/// Looks the backend of an affinity entry up, if the entry is fresh and the backend still belongs to the
/// service.
#[inline(always)]
pub(crate) fn affinity_backend_at(
    entry: Option<&AffinityValue>,
    service_id: u32,
    timeout_s: u32,
    now: u64,
) -> Option<(u32, BackendValue)> {
    let entry = entry?;
    if now.wrapping_sub(entry.last_used_ns) > (timeout_s as u64) * NSEC_PER_SEC {
        return None;
    }
    let id = entry.backend_id;
    let backend = unsafe { KP_BACKENDS.get(id) }?;
    // Backend ids are per service; a reused id of another service must not be followed.
    if backend.service_id != service_id {
        return None;
    }
    Some((id, *backend))
}

#[inline(always)]
fn affinity_backend(akey: &AffinityKey, timeout_s: u32, now: u64) -> Option<(u32, BackendValue)> {
    affinity_backend_at(unsafe { KP_AFFINITY.get(akey) }, akey.service_id, timeout_s, now)
}

/// The service lookup and backend selection shared by connect and sendmsg of both families.
#[inline(always)]
fn lb_select(ctx: &SockAddrContext, addr: Addr, port: u16, proto: u8) -> Xlate {
    let mut key = ServiceKey { addr, port, backend_slot: 0, proto, scope: SCOPE_EXT, _pad: [0; 2] };
    let Some(master) = (unsafe { KP_SERVICES.get(key) }) else {
        return Xlate::Pass;
    };
    let mut master = *master;
    if master.flags & SVC_FLAG_LOCAL_SCOPE != 0 {
        key.scope = SCOPE_INT;
        master = match unsafe { KP_SERVICES.get(key) } {
            Some(m) => *m,
            // The writer adds the local set before flagging the master; a missing one means no endpoints.
            None => ServiceValue { count: 0, ..master },
        };
    }
    let service_id = master.service_id;
    if master.count == 0 {
        bump(service_id, true);
        return Xlate::Refuse;
    }

    let affinity = master.flags & SVC_FLAG_AFFINITY != 0;
    let now = if affinity { unsafe { bpf_ktime_get_ns() } } else { 0 };
    let akey = AffinityKey {
        client_cookie: if affinity { unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } } else { 0 },
        service_id,
        _pad: 0,
    };
    let mut chosen = if affinity { affinity_backend(&akey, master.affinity_timeout, now) } else { None };
    if chosen.is_none() {
        let slot = (unsafe { bpf_get_prandom_u32() } % (master.count as u32)) as u16 + 1;
        key.backend_slot = slot;
        let Some(slot_val) = (unsafe { KP_SERVICES.get(key) }) else {
            // The writer never lets count exceed the written slots; treat a miss like no endpoints.
            return Xlate::Refuse;
        };
        let id = slot_val.backend_id;
        let Some(backend) = (unsafe { KP_BACKENDS.get(id) }) else {
            return Xlate::Refuse;
        };
        chosen = Some((id, *backend));
    }
    let Some((backend_id, backend)) = chosen else {
        return Xlate::Refuse;
    };
    if affinity {
        let value = AffinityValue { last_used_ns: now, backend_id, _pad: 0 };
        // Best effort: an LRU insert can only fail on memory pressure, and then we just lose stickiness.
        let _ = KP_AFFINITY.insert(akey, value, 0);
    }
    bump(service_id, false);
    Xlate::To { addr: backend.addr, port: backend.port, service_id }
}

/// Records what the socket dialled so recvmsg/getpeername can restore it.
#[inline(always)]
fn record_rev_nat(ctx: &SockAddrContext, backend: Addr, backend_port: u16, vip: Addr, vip_port: u16, service_id: u32) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey { cookie, addr: backend, port: backend_port, _pad: [0; 6] };
    let value = SockRevNatValue { addr: vip, port: vip_port, _pad: 0, service_id };
    // Best effort: without the entry the application sees the backend address, which still works.
    let _ = KP_SOCK_REVNAT.insert(key, value, 0);
}

// The context is a kernel-verified pointer; every field is accessed with a single 4-byte volatile load or
// store because the verifier only accepts those exact ctx accesses (no merged 8-byte access).
#[inline(always)]
fn rd(p: *const u32) -> u32 {
    unsafe { core::ptr::read_volatile(p) }
}
#[inline(always)]
fn wr(p: *mut u32, v: u32) {
    unsafe { core::ptr::write_volatile(p, v) }
}

#[inline(always)]
fn read_ip6(ctx: &SockAddrContext) -> Addr {
    let sa = ctx.sock_addr;
    unsafe {
        [
            rd(&raw const (*sa).user_ip6[0]),
            rd(&raw const (*sa).user_ip6[1]),
            rd(&raw const (*sa).user_ip6[2]),
            rd(&raw const (*sa).user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(ctx: &SockAddrContext, a: &Addr) {
    let sa = ctx.sock_addr;
    unsafe {
        wr(&raw mut (*sa).user_ip6[0], a[0]);
        wr(&raw mut (*sa).user_ip6[1], a[1]);
        wr(&raw mut (*sa).user_ip6[2], a[2]);
        wr(&raw mut (*sa).user_ip6[3], a[3]);
    }
}

/// `user_port` is a u32 field whose low 16 bits hold the port in network order.
#[inline(always)]
fn read_port(ctx: &SockAddrContext) -> u16 {
    unsafe { rd(&raw const (*ctx.sock_addr).user_port) as u16 }
}

#[inline(always)]
fn write_port(ctx: &SockAddrContext, port: u16) {
    unsafe { wr(&raw mut (*ctx.sock_addr).user_port, port as u32) }
}

#[inline(always)]
fn read_proto(ctx: &SockAddrContext) -> u8 {
    unsafe { rd(&raw const (*ctx.sock_addr).protocol) as u8 }
}

#[inline(always)]
fn read_ip4(ctx: &SockAddrContext) -> u32 {
    unsafe { rd(&raw const (*ctx.sock_addr).user_ip4) }
}

#[inline(always)]
fn write_ip4(ctx: &SockAddrContext, ip: u32) {
    unsafe { wr(&raw mut (*ctx.sock_addr).user_ip4, ip) }
}

#[inline(always)]
fn refuse() -> i32 {
    // Makes connect()/sendmsg() fail with ECONNREFUSED instead of the default EPERM.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// connect4 and sendmsg4.
#[inline(always)]
fn xlate4(ctx: &SockAddrContext) -> i32 {
    if bypass(ctx) {
        return ALLOW;
    }
    let vip = addr_from_v4(read_ip4(ctx));
    let vport = read_port(ctx);
    match lb_select(ctx, vip, vport, read_proto(ctx)) {
        Xlate::Pass => ALLOW,
        Xlate::Refuse => refuse(),
        Xlate::To { addr, port, service_id } => {
            // An IPv4 frontend only ever has IPv4 backends; anything else is left untranslated.
            let Some(ip4) = addr_to_v4(&addr) else {
                return ALLOW;
            };
            write_ip4(ctx, ip4);
            write_port(ctx, port);
            record_rev_nat(ctx, addr, port, vip, vport, service_id);
            ALLOW
        }
    }
}

/// connect6 and sendmsg6 (including `::ffff:a.b.c.d`, which finds the IPv4 service by construction).
#[inline(always)]
fn xlate6(ctx: &SockAddrContext) -> i32 {
    if bypass(ctx) {
        return ALLOW;
    }
    let vip = read_ip6(ctx);
    let vport = read_port(ctx);
    match lb_select(ctx, vip, vport, read_proto(ctx)) {
        Xlate::Pass => ALLOW,
        Xlate::Refuse => refuse(),
        Xlate::To { addr, port, service_id } => {
            write_ip6(ctx, &addr);
            write_port(ctx, port);
            record_rev_nat(ctx, addr, port, vip, vport, service_id);
            ALLOW
        }
    }
}

#[inline(always)]
fn rev_lookup(ctx: &SockAddrContext, addr: Addr, port: u16) -> Option<SockRevNatValue> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey { cookie, addr, port, _pad: [0; 6] };
    unsafe { KP_SOCK_REVNAT.get(key) }.copied()
}

/// recvmsg4 and getpeername4: these hooks must always return 1.
#[inline(always)]
fn rev4(ctx: &SockAddrContext) -> i32 {
    if bypass(ctx) {
        return 1;
    }
    if let Some(v) = rev_lookup(ctx, addr_from_v4(read_ip4(ctx)), read_port(ctx))
        && let Some(ip4) = addr_to_v4(&v.addr)
    {
        write_ip4(ctx, ip4);
        write_port(ctx, v.port);
    }
    1
}

/// recvmsg6 and getpeername6: these hooks must always return 1.
#[inline(always)]
fn rev6(ctx: &SockAddrContext) -> i32 {
    if bypass(ctx) {
        return 1;
    }
    if let Some(v) = rev_lookup(ctx, read_ip6(ctx), read_port(ctx)) {
        write_ip6(ctx, &v.addr);
        write_port(ctx, v.port);
    }
    1
}

/// `cgroup/connect4`.
#[cgroup_sock_addr(connect4)]
pub fn kp_connect4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx)
}

/// `cgroup/connect6`.
#[cgroup_sock_addr(connect6)]
pub fn kp_connect6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx)
}

/// `cgroup/sendmsg4`: unconnected UDP, per datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn kp_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx)
}

/// `cgroup/sendmsg6`: unconnected UDP, per datagram.
#[cgroup_sock_addr(sendmsg6)]
pub fn kp_sendmsg6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx)
}

/// `cgroup/recvmsg4`.
#[cgroup_sock_addr(recvmsg4)]
pub fn kp_recvmsg4(ctx: SockAddrContext) -> i32 {
    rev4(&ctx)
}

/// `cgroup/recvmsg6`.
#[cgroup_sock_addr(recvmsg6)]
pub fn kp_recvmsg6(ctx: SockAddrContext) -> i32 {
    rev6(&ctx)
}

/// `cgroup/getpeername4`.
#[cgroup_sock_addr(getpeername4)]
pub fn kp_getpeername4(ctx: SockAddrContext) -> i32 {
    rev4(&ctx)
}

/// `cgroup/getpeername6`.
#[cgroup_sock_addr(getpeername6)]
pub fn kp_getpeername6(ctx: SockAddrContext) -> i32 {
    rev6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic can be reached (no indexing by runtime values); BPF has no unwinding anyway.
    loop {}
}

/// Kernel license string; a GPL-compatible one keeps every helper available.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
