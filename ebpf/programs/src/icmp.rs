//! ICMP errors of translated north-south flows: ICMPv4 destination unreachable (incl. fragmentation needed)
//! and time exceeded (RFC 792), ICMPv6 destination unreachable, packet too big and time exceeded (RFC 4443).
//!
//! An error quotes the packet that caused it. For a translated flow that quote is the packet as the far side
//! saw it, so the quote reversed is a packet of the opposite direction and finds the flow's conntrack entry.
//! The entry's values are what the error's receiver knows: outer source → the entry's new source, outer
//! destination → its new destination, quoted source → its new destination (address and port), quoted
//! destination → its new source. E.g. a port unreachable from a SNATed backend about `node:snat → backend`
//! becomes `frontend → client` about `client → frontend`. A flow whose client port was remapped (no SNAT,
//! reply tuple clash) is no different: the backend quotes `client:remapped → backend`, which finds the reply
//! entry at the remapped port, and the quote becomes `client:port → frontend` again.
//!
//! Checksums are updated incrementally (RFC 1624), never recomputed: the quoted IPv4 header's, the quoted
//! TCP/UDP checksum when it is quoted (RFC 792 guarantees only 8 bytes), the ICMP checksum (ICMPv6: with the
//! outer addresses of its pseudo-header) and the outer IPv4 header's. All of them are in the packet, so the
//! packet's one's-complement sum is unchanged and a `CHECKSUM_COMPLETE` skb stays valid.
//!
//! Ingress: a reply entry (an error from the backend side about a forward packet) is redirected to the
//! client like un-SNATed replies; a forward entry (an error from the client side about a reply) is handled
//! like forward packets (redirected only when SNATed). Egress: reply entries only (a local backend's error
//! about a DNAT-only flow: only the outer source and the quoted destination change).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
    },
    cty::c_void,
    helpers::{bpf_fib_lookup, bpf_redirect_neigh, bpf_skb_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use ebpf_common::{
    Addr, CT_DIR_FWD, CT_DIR_REPLY, CT_F_SNAT, CtKey, CtValue, PROTO_TCP, PROTO_UDP, V4_MAPPED_WORD, dp_counter,
};

use super::{KP_CT, PASS_ON, count, ifindex};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
/// ICMP header: type, code, checksum, 4 bytes of type-specific data (unused / next-hop MTU).
const ICMP_HLEN: usize = 8;
const IP6_HLEN: usize = 40;

/// The parsed error, the conntrack key and the FIB parameters. They live in a per-CPU map, not on the stack:
/// this runs as a subprogram of the tc programs, and the verifier bounds caller + callee stack to 512 bytes.
#[repr(C)]
struct Scratch {
    outer_s: Addr,
    outer_d: Addr,
    inner_s: Addr,
    inner_d: Addr,
    key: CtKey,
    fib: FibParams,
    e: IcmpErr,
}

#[map]
static KP_ICMP_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Offsets and scalars of an ICMP error quoting a TCP/UDP packet (addresses are in [`Scratch`]).
#[repr(C)]
struct IcmpErr {
    v6: bool,
    icmp_off: usize,
    /// The quoted IP header.
    inner_off: usize,
    /// The quoted TCP/UDP header.
    inner_l4: usize,
    /// End of the IP packet (the quote may be shorter than the L4 header).
    end: usize,
    /// Quoted protocol.
    proto: u8,
    sport: u16,
    dport: u16,
    /// Outer length from the network header on (for the FIB lookup's MTU check).
    tot_len: u16,
}

/// Loads the address at `off` into `dst` in the 16-byte form (IPv4: 4 bytes, IPv4-mapped).
#[inline(always)]
fn load_addr(ctx: &TcContext, v6: bool, off: usize, dst: &mut Addr) -> bool {
    let skb = ctx.as_ptr() as *const c_void;
    if v6 {
        return unsafe { bpf_skb_load_bytes(skb, off as u32, dst.as_mut_ptr() as *mut c_void, 16) } == 0;
    }
    dst[0] = 0;
    dst[1] = 0;
    dst[2] = V4_MAPPED_WORD;
    unsafe { bpf_skb_load_bytes(skb, off as u32, (&mut dst[3]) as *mut u32 as *mut c_void, 4) == 0 }
}

#[inline(always)]
fn parse(ctx: &TcContext, s: &mut Scratch) -> Option<()> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (v6, icmp_off, tot_len) = if eth_proto == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        // A fragmented error is left to the stack (errors are at most 576 bytes: never in practice).
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
        if ihl < 20 || frag & 0x3fff != 0 || ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_ICMP {
            return None;
        }
        let ty: u8 = ctx.load(ETH_HLEN + ihl).ok()?;
        if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
            return None;
        }
        (false, ETH_HLEN + ihl, u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?))
    } else if eth_proto == ETH_P_IPV6 {
        // Extension headers are not walked (as for TCP/UDP): only ICMPv6 right after the fixed header.
        if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_ICMPV6 {
            return None;
        }
        let ty: u8 = ctx.load(ETH_HLEN + IP6_HLEN).ok()?;
        if ty != ICMPV6_DEST_UNREACH && ty != ICMPV6_PKT_TOOBIG && ty != ICMPV6_TIME_EXCEED {
            return None;
        }
        let plen = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?);
        (true, ETH_HLEN + IP6_HLEN, plen.wrapping_add(IP6_HLEN as u16))
    } else {
        return None;
    };
    let inner_off = icmp_off + ICMP_HLEN;
    let (proto, inner_l4, addrs) = if v6 {
        (ctx.load::<u8>(inner_off + 6).ok()?, inner_off + IP6_HLEN, inner_off + 8)
    } else {
        let vihl: u8 = ctx.load(inner_off).ok()?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        // A quoted non-first fragment carries no ports.
        let frag = u16::from_be(ctx.load::<u16>(inner_off + 6).ok()?);
        if vihl >> 4 != 4 || ihl < 20 || frag & 0x1fff != 0 {
            return None;
        }
        (ctx.load::<u8>(inner_off + 9).ok()?, inner_off + ihl, inner_off + 12)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let (outer, alen) = if v6 { (ETH_HLEN + 8, 16) } else { (ETH_HLEN + 12, 4) };
    if !load_addr(ctx, v6, outer, &mut s.outer_s)
        || !load_addr(ctx, v6, outer + alen, &mut s.outer_d)
        || !load_addr(ctx, v6, addrs, &mut s.inner_s)
        || !load_addr(ctx, v6, addrs + alen, &mut s.inner_d)
    {
        return None;
    }
    let sport: u16 = ctx.load(inner_l4).ok()?;
    let dport: u16 = ctx.load(inner_l4 + 2).ok()?;
    let end = ETH_HLEN + tot_len as usize;
    s.e = IcmpErr { v6, icmp_off, inner_off, inner_l4, end, proto, sport, dport, tot_len };
    Some(())
}

/// Folds a one's-complement sum to 16 bits (twice: the first fold can carry once more).
#[inline(always)]
fn fold(s: u32) -> u32 {
    let s = (s & 0xffff) + (s >> 16);
    (s & 0xffff) + (s >> 16)
}

/// Adds the change of one 16-bit word (`~m + m'`, RFC 1624) to a running delta. Words are taken as stored
/// (network order read natively): the one's-complement sum does not depend on byte order.
#[inline(always)]
fn add16(d: u32, old: u16, new: u16) -> u32 {
    if old == new { d } else { fold(d + (!old) as u32 + new as u32) }
}

#[inline(always)]
fn add32(d: u32, old: u32, new: u32) -> u32 {
    add16(add16(d, old as u16, new as u16), (old >> 16) as u16, (new >> 16) as u16)
}

/// IPv4 addresses only differ in their last word (the rest is the IPv4-mapped prefix): the same code serves
/// both families.
#[inline(always)]
fn add_addr(d: u32, old: &Addr, new: &Addr) -> u32 {
    add32(add32(add32(add32(d, old[0], new[0]), old[1], new[1]), old[2], new[2]), old[3], new[3])
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + Σ(~m + m'))`.
#[inline(always)]
fn apply(hc: u16, d: u32) -> u16 {
    !(fold((!hc) as u32 + d) as u16)
}

/// Stores an address at `off` (4 bytes for IPv4, 16 for IPv6).
#[inline(always)]
fn store_addr(ctx: &TcContext, v6: bool, off: usize, a: &Addr) -> bool {
    if v6 { ctx.store(off, a, 0).is_ok() } else { ctx.store(off, &a[3], 0).is_ok() }
}

/// Rewrites the error as described in the module documentation.
#[inline(always)]
fn rewrite(ctx: &TcContext, s: &Scratch, v: &CtValue) -> bool {
    let e = &s.e;
    let (os, od) = (&v.nat_saddr, &v.nat_daddr);
    let (is, isp, id, idp) = (&v.nat_daddr, v.nat_dport, &v.nat_saddr, v.nat_sport);
    let d_outer = add_addr(add_addr(0, &s.outer_s, os), &s.outer_d, od);
    let d_addrs = add_addr(add_addr(0, &s.inner_s, is), &s.inner_d, id);
    let d_ports = add16(add16(0, e.sport, isp), e.dport, idp);
    // Everything changed inside the ICMP message; ICMPv6 also covers the outer addresses (pseudo-header).
    let mut d_icmp = fold(d_addrs + d_ports);
    if e.v6 {
        d_icmp = fold(d_icmp + d_outer);
    } else {
        let off = e.inner_off + 10;
        let Ok(old) = ctx.load::<u16>(off) else { return false };
        let new = apply(old, d_addrs);
        d_icmp = add16(d_icmp, old, new);
        if ctx.store(off, &new, 0).is_err() {
            return false;
        }
    }
    // The quoted L4 checksum covers the quoted addresses (pseudo-header) and ports. UDP's is always quoted;
    // TCP's only when more than 8 bytes are (Linux quotes up to 576 bytes in all).
    let l4_csum = e.inner_l4 + if e.proto == PROTO_TCP { 16 } else { 6 };
    if l4_csum + 2 <= e.end
        && let Ok(old) = ctx.load::<u16>(l4_csum)
        && !(e.proto == PROTO_UDP && old == 0)
    {
        let mut new = apply(old, fold(d_addrs + d_ports));
        if e.proto == PROTO_UDP && new == 0 {
            // 0 means "no checksum" for UDP.
            new = 0xffff;
        }
        d_icmp = add16(d_icmp, old, new);
        if ctx.store(l4_csum, &new, 0).is_err() {
            return false;
        }
    }
    let (in_s, in_d) = if e.v6 { (e.inner_off + 8, e.inner_off + 24) } else { (e.inner_off + 12, e.inner_off + 16) };
    let Ok(icmp_csum) = ctx.load::<u16>(e.icmp_off + 2) else { return false };
    if ctx.store(e.inner_l4, &isp, 0).is_err()
        || ctx.store(e.inner_l4 + 2, &idp, 0).is_err()
        || !store_addr(ctx, e.v6, in_s, is)
        || !store_addr(ctx, e.v6, in_d, id)
        || ctx.store(e.icmp_off + 2, &apply(icmp_csum, d_icmp), 0).is_err()
    {
        return false;
    }
    let (out_s, out_d) = if e.v6 { (ETH_HLEN + 8, ETH_HLEN + 24) } else { (ETH_HLEN + 12, ETH_HLEN + 16) };
    if !store_addr(ctx, e.v6, out_s, os) || !store_addr(ctx, e.v6, out_d, od) {
        return false;
    }
    if !e.v6 {
        let off = ETH_HLEN + 10;
        let Ok(old) = ctx.load::<u16>(off) else { return false };
        if ctx.store(off, &apply(old, d_outer), 0).is_err() {
            return false;
        }
    }
    true
}

/// Sends the rewritten error out of the device the FIB picks for its new destination.
#[inline(always)]
fn redirect(ctx: &TcContext, s: &mut Scratch, v: &CtValue) -> i32 {
    let v6 = s.e.v6;
    let tot_len = s.e.tot_len;
    let params = &mut s.fib;
    // SAFETY: plain integers; all-zero is the documented "no input" value of every field.
    unsafe { core::ptr::write_bytes(params as *mut FibParams, 0, 1) };
    params.family = if v6 { AF_INET6 } else { AF_INET };
    params.l4_protocol = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex(ctx);
    if v6 {
        params.__bindgen_anon_3.ipv6_src = v.nat_saddr;
        params.__bindgen_anon_4.ipv6_dst = v.nat_daddr;
    } else {
        params.__bindgen_anon_3.ipv4_src = v.nat_saddr[3];
        params.__bindgen_anon_4.ipv4_dst = v.nat_daddr[3];
    }
    let ret = unsafe { bpf_fib_lookup(ctx.as_ptr(), params, core::mem::size_of::<FibParams>() as i32, 0) } as u32;
    if ret == BPF_FIB_LKUP_RET_SUCCESS || ret == BPF_FIB_LKUP_RET_NO_NEIGH {
        return unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count(dp_counter::FIB_FAIL);
    // Already rewritten: the stack takes it as it is (final, like any translated packet).
    TC_ACT_OK as i32
}

/// Translates an ICMP error of a translated flow; `None` when the packet is anything else (pass it).
#[inline(always)]
fn translate(ctx: &TcContext, ingress: bool) -> Option<i32> {
    let s = unsafe { &mut *KP_ICMP_SCRATCH.get_ptr_mut(0)? };
    parse(ctx, s)?;
    // An error goes to the sender of the packet it quotes.
    if s.outer_d != s.inner_s {
        return None;
    }
    // Field by field: a whole-struct assignment would build the key on the stack first.
    s.key.saddr = s.inner_d;
    s.key.daddr = s.inner_s;
    s.key.sport = s.e.dport;
    s.key.dport = s.e.sport;
    s.key.proto = s.e.proto;
    s.key.dir = CT_DIR_REPLY;
    s.key._pad = [0; 2];
    let (v, redirect_it) = match unsafe { KP_CT.get(&s.key) } {
        Some(v) => (v, ingress),
        None if ingress => {
            s.key.dir = CT_DIR_FWD;
            let v = unsafe { KP_CT.get(&s.key) }?;
            (v, v.flags & CT_F_SNAT != 0)
        }
        None => return None,
    };
    if !rewrite(ctx, s, v) {
        return Some(TC_ACT_SHOT as i32);
    }
    count(dp_counter::XLATE_ICMP_ERROR);
    // Translated: final, like the TCP/UDP packets of the flow.
    Some(if redirect_it { redirect(ctx, s, v) } else { TC_ACT_OK as i32 })
}

/// The tc programs' hook for packets that are not TCP/UDP: translates ICMP errors of translated flows and
/// passes everything else on to the next tc program ([`PASS_ON`]). A BPF subprogram of its own: inlined,
/// its stack would add to the TCP/UDP path's.
#[inline(never)]
pub(super) fn handle(ctx: &TcContext, ingress: bool) -> i32 {
    translate(ctx, ingress).unwrap_or(PASS_ON)
}
