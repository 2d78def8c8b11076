//! "No endpoints → reject" per packet, as upstream's `REJECT` rule: the tc programs answer a new flow to a
//! Service port without any endpoint themselves, so the client fails at once instead of timing out.
//!
//! The reply is built in place from the offending packet and sent back out of the device it came in on
//! (`bpf_redirect` to the same device's egress, Ethernet addresses swapped):
//! - a TCP SYN gets a RST|ACK (seq 0, ack = its seq + its length), which fails `connect()` with
//!   `ECONNREFUSED`; any other TCP segment of a dead service is dropped;
//! - UDP gets an ICMP port unreachable (ICMPv4 3/3, ICMPv6 1/4) from the address the client dialled,
//!   quoting its IP header and the 8-byte UDP header, which fails a connected socket with `ECONNREFUSED`.
//!
//! Headers are written whole from a per-CPU scratch buffer and their checksums computed from scratch
//! (`bpf_csum_diff`); the packet is resized with `bpf_skb_change_tail`. Not answered (dropped instead): GSO
//! aggregates, UDP over IPv4 with IP options (the quote would be of variable length), and anything over
//! the rate limit: a per-CPU token bucket of [`RATE_PER_SEC`] replies a second with bursts of [`BURST`], so
//! a flood (e.g. with spoofed sources) cannot use the node as an amplifier. Upstream's REJECT is limited by
//! the kernel's ICMP rate limits in the same spirit.
//!
//! A reply to a `CHECKSUM_PARTIAL` packet (sent by a local socket over a veth) keeps that state: it goes
//! back over the same virtual link, whose receiver trusts partial checksums, as it would the original.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT},
    cty::c_void,
    helpers::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use ebpf_common::{Addr, PROTO_TCP, dp_counter};

use super::{ETH_HLEN, Pkt, count, ifindex};

/// Replies a second per CPU, TCP resets and ICMP errors together.
pub(super) const RATE_PER_SEC: u64 = 1000;
/// Replies a CPU may send back to back before the rate applies.
pub(super) const BURST: u64 = 50;
const COST_NS: u64 = 1_000_000_000 / RATE_PER_SEC;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IP4_HLEN: usize = 20;
const IP6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// The quoted transport bytes (the UDP header; RFC 792's "64 bits of original data").
const QUOTE_L4: usize = 8;
const TTL: u8 = 64;
/// Largest reply from the network header on: IPv6 + ICMPv6 + quoted IPv6 header + 8 bytes.
const BUF_LEN: usize = IP6_HLEN + ICMP_HLEN + IP6_HLEN + QUOTE_L4;

#[repr(C)]
struct Ip4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct Ip6Hdr {
    vtcfl: u32,
    plen: u16,
    nexthdr: u8,
    hlim: u8,
    saddr: Addr,
    daddr: Addr,
}

#[repr(C)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
    win: u16,
    csum: u16,
    urg: u16,
}

#[repr(C)]
struct IcmpHdr {
    ty: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

/// The rate limiter's state and the reply under construction. Per-CPU map, not stack: this runs as a
/// subprogram of the tc programs, and the verifier bounds the whole call chain's stack to 512 bytes.
#[repr(C)]
struct Scratch {
    /// Token bucket: budget in nanoseconds of [`COST_NS`] each, refilled by elapsed time up to the burst.
    credit_ns: u64,
    last_ns: u64,
    /// Checksum pseudo-header (IPv4: 12 bytes, IPv6: 40).
    ph: [u32; 10],
    /// The reply from the network header on; 4-byte words so every header field is naturally aligned.
    buf: [u32; BUF_LEN / 4],
}

#[map]
static KP_REJECT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Takes one reply's worth of budget, if there is one.
#[inline(always)]
fn allow(s: &mut Scratch, now: u64) -> bool {
    let cap = BURST * COST_NS;
    let elapsed = now.wrapping_sub(s.last_ns);
    // First use (last_ns 0) or a long pause: a full bucket.
    let credit = if elapsed >= cap { cap } else { (s.credit_ns + elapsed).min(cap) };
    s.last_ns = now;
    if credit < COST_NS {
        s.credit_ns = credit;
        return false;
    }
    s.credit_ns = credit - COST_NS;
    true
}

/// One's-complement sum of `len` bytes (a multiple of 4, at most [`BUF_LEN`]) at `p`, added to `seed`.
#[inline(always)]
fn sum(p: *const u32, len: usize, seed: u32) -> u32 {
    (unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, len as u32, seed) }) as u32
}

/// Folds a 32-bit one's-complement sum and complements it: the value to store (as it lies in memory).
#[inline(always)]
fn finish(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Writes the IPv4 or IPv6 header of the reply (frontend → client) at the start of the buffer; returns
/// the L4 offset in the buffer. The IPv4 header checksum is filled in, the pseudo-header is prepared.
#[inline(always)]
fn ip_header(s: &mut Scratch, p: &Pkt, proto: u8, l4_len: usize) -> usize {
    let buf = s.buf.as_mut_ptr();
    if p.v6 {
        let h = unsafe { &mut *(buf as *mut Ip6Hdr) };
        h.vtcfl = 0x6000_0000u32.to_be();
        h.plen = (l4_len as u16).to_be();
        h.nexthdr = proto;
        h.hlim = TTL;
        h.saddr = p.daddr;
        h.daddr = p.saddr;
        s.ph[..4].copy_from_slice(&p.daddr);
        s.ph[4..8].copy_from_slice(&p.saddr);
        s.ph[8] = (l4_len as u32).to_be();
        s.ph[9] = (proto as u32).to_be();
        IP6_HLEN
    } else {
        let h = unsafe { &mut *(buf as *mut Ip4Hdr) };
        h.vihl = 0x45;
        h.tos = 0;
        h.tot_len = ((IP4_HLEN + l4_len) as u16).to_be();
        h.id = 0;
        // Don't fragment, as Linux's own resets and errors.
        h.frag = 0x4000u16.to_be();
        h.ttl = TTL;
        h.proto = proto;
        h.csum = 0;
        h.saddr = p.daddr[3];
        h.daddr = p.saddr[3];
        h.csum = finish(sum(buf, IP4_HLEN, 0));
        s.ph[0] = p.daddr[3];
        s.ph[1] = p.saddr[3];
        s.ph[2] = (((proto as u32) << 16) | l4_len as u32).to_be();
        IP4_HLEN
    }
}

/// Fills the buffer with a RST|ACK answering the SYN; returns the reply's length from the network header.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, s: &mut Scratch, p: &Pkt) -> Option<usize> {
    let seq = u32::from_be(ctx.load::<u32>(p.l4_off + 4).ok()?);
    let doff = ((ctx.load::<u8>(p.l4_off + 12).ok()? >> 4) as u32) * 4;
    // The SYN's length: its payload (TCP Fast Open data), the SYN itself and a FIN if it carries one.
    let l3_len = (p.l4_off - ETH_HLEN) as u32;
    let data = (p.tot_len as u32).checked_sub(l3_len + doff)?;
    let seg_len = data + 1 + (p.tcp_flags & TCP_FIN != 0) as u32;
    let l4 = ip_header(s, p, PROTO_TCP, TCP_HLEN);
    let ph_len = if p.v6 { 40 } else { 12 };
    let t = unsafe { &mut *((s.buf.as_mut_ptr() as *mut u8).add(l4) as *mut TcpHdr) };
    t.sport = p.dport;
    t.dport = p.sport;
    t.seq = 0;
    t.ack = seq.wrapping_add(seg_len).to_be();
    t.doff = ((TCP_HLEN / 4) as u8) << 4;
    t.flags = TCP_RST | TCP_ACK;
    t.win = 0;
    t.csum = 0;
    t.urg = 0;
    let ph = sum(s.ph.as_ptr(), ph_len, 0);
    t.csum = finish(sum(t as *const TcpHdr as *const u32, TCP_HLEN, ph));
    Some(l4 + TCP_HLEN)
}

/// Fills the buffer with an ICMP port unreachable quoting the datagram's IP header and UDP header;
/// returns the reply's length from the network header.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, s: &mut Scratch, p: &Pkt) -> Option<usize> {
    let quote_ip = if p.v6 { IP6_HLEN } else { IP4_HLEN };
    // The quote's IP header must be the fixed one: the buffer holds no more.
    if p.l4_off != ETH_HLEN + quote_ip {
        return None;
    }
    let quote_len = quote_ip + QUOTE_L4;
    let l4_len = ICMP_HLEN + quote_len;
    let l4 = ip_header(s, p, if p.v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }, l4_len);
    let base = s.buf.as_mut_ptr() as *mut u8;
    let quote = unsafe { base.add(l4 + ICMP_HLEN) };
    // Copied before the packet is resized (a short datagram's tail is overwritten by the reply).
    if unsafe {
        bpf_skb_load_bytes(ctx.as_ptr() as *const c_void, ETH_HLEN as u32, quote as *mut c_void, quote_len as u32)
    } != 0
    {
        return None;
    }
    let h = unsafe { &mut *(base.add(l4) as *mut IcmpHdr) };
    // ICMPv4 destination unreachable / port unreachable; ICMPv6 destination unreachable / port unreachable.
    (h.ty, h.code) = if p.v6 { (1, 4) } else { (3, 3) };
    h.csum = 0;
    h.unused = 0;
    // ICMPv6's checksum covers the pseudo-header, ICMPv4's does not.
    let seed = if p.v6 { sum(s.ph.as_ptr(), 40, 0) } else { 0 };
    h.csum = finish(sum(h as *const IcmpHdr as *const u32, l4_len, seed));
    Some(l4 + l4_len)
}

#[inline(always)]
fn reply(ctx: &TcContext, p: &Pkt) -> Option<i32> {
    // A GSO aggregate is many datagrams: never answered with one.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return None;
    }
    if p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return None;
    }
    let s = unsafe { &mut *KP_REJECT_SCRATCH.get_ptr_mut(0)? };
    if !allow(s, unsafe { bpf_ktime_get_ns() }) {
        count(dp_counter::REJECT_RATE_LIMITED);
        return Some(TC_ACT_SHOT as i32);
    }
    let len = if p.proto == PROTO_TCP { tcp_reset(ctx, s, p)? } else { port_unreachable(ctx, s, p)? };
    if len > BUF_LEN {
        return None;
    }
    let macs: [u8; 12] = ctx.load(0).ok()?;
    let skb = ctx.skb.skb;
    if unsafe { bpf_skb_change_tail(skb, (ETH_HLEN + len) as u32, 0) } != 0 {
        return None;
    }
    // RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE skb's sum right for the receiver on the other side.
    let from = s.buf.as_ptr() as *const c_void;
    if unsafe { bpf_skb_store_bytes(skb, ETH_HLEN as u32, from, len as u32, BPF_F_RECOMPUTE_CSUM as u64) } != 0 {
        return None;
    }
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).ok()?;
    count(dp_counter::REJECT_SENT);
    Some(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}

/// Answers a new flow to a Service port without endpoints (see the module documentation); drops what it
/// does not answer. A BPF subprogram of its own, like `icmp::handle`, so its frame never adds to
/// `new_flow`'s.
#[inline(never)]
pub(super) fn send(ctx: &TcContext, p: &Pkt) -> i32 {
    reply(ctx, p).unwrap_or_else(|| {
        count(dp_counter::DROP_NO_ENDPOINT);
        TC_ACT_SHOT as i32
    })
}
