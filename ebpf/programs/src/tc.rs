//! North-south load balancing: tc programs on the node devices (those carrying node addresses).
//!
//! Ingress, per packet to this node's device:
//! 1. a forward conntrack entry (`KP_CT`, client → frontend) → rewrite as recorded;
//! 2. else a reply entry (backend → SNAT address:port) → un-SNAT back to frontend → client;
//! 3. else a NodePort / ExternalIP / LoadBalancer frontend in `KP_SERVICES` → source-range check, backend
//!    pick, conntrack pair insert, DNAT (+ SNAT to the device's node address for a remote backend under
//!    `externalTrafficPolicy: Cluster`); a Service port without any endpoint is answered with a TCP reset or an
//!    ICMP port unreachable (`reject.rs`), as upstream's REJECT.
//!
//! Packets whose source ends up being a node address (SNATed forwards, un-SNATed replies from a NodePort
//! frontend) would be dropped as martians by the stack's input route check, so they are redirected after a
//! FIB lookup (`bpf_redirect_neigh`). DNAT-only forwards go to the stack, which routes them to the pod.
//!
//! Egress: replies of local backends (no SNAT) leave through the node device; a reply entry rewrites their
//! source back to the frontend.
//!
//! Reply tuples are unique, as in netfilter's NAT: a flow without SNAT keeps the client's address and port
//! unless another flow already holds its reply tuple (backend → client:port), e.g. one client port to one
//! backend through two frontends (two Services sharing it, a ClusterIP and a NodePort of one Service, a UDP
//! socket `sendto`ing several VIPs), or a closed flow whose tuple the backend may still hold in TIME_WAIT.
//! Then the client's source port is remapped to a free port of the SNAT range (`PORT_REMAPPED`); the
//! backend sees the client's address with that port, and both flows live side by side.
//!
//! Both families share the code: addresses are in the 16-byte map form; IPv4 only touches the last word.
//! ICMP errors quoting a translated flow are translated too (`icmp.rs`), so path-MTU discovery works.
//! Not handled (yet): IP options beyond skipping them, IPv6 extension headers, non-first fragments (passed
//! untouched), TTL decrement on redirect.
//!
//! Verdicts: a packet left untouched gets [`PASS_ON`] (`TC_ACT_UNSPEC`): under tcx that is `TCX_NEXT` (the
//! next tcx program, then the clsact filters, then the stack), under clsact the next filter runs. Another tc
//! user on the device (a CNI, an operator's filter, a monitor) thus sees everything we do not handle. A
//! packet we translated, redirected, answered or dropped gets a final verdict (`TC_ACT_OK`, the redirect
//! helpers' `TC_ACT_REDIRECT`, `TC_ACT_SHOT`): it must not be rewritten or dropped again behind us.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use ebpf_common::{
    AFFINITY_ADDR_MAX_ENTRIES, Addr, AddrAffinityKey, AffinityValue, BACKEND_FLAG_LOCAL, BackendValue, CT_DIR_FWD,
    CT_DIR_REPLY, CT_F_CLOSING, CT_F_REUSABLE, CT_F_SEEN, CT_F_SNAT, CT_MAX_ENTRIES, CtKey, CtValue, FAMILY_V4,
    FAMILY_V6, NODE_ADDRS_MAX_ENTRIES, NodeAddrKey, PROTO_TCP, PROTO_UDP, SCOPE_EXT, SCOPE_INT, SNAT_PORT_MAX,
    SNAT_PORT_MIN, SNAT_PORT_RETRIES, SRC_RANGES_MAX_ENTRIES, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_LOCAL_SCOPE, SVC_FLAG_NO_ENDPOINTS, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGE,
    ServiceKey, ServiceValue, SrcRangeKey, addr_from_v4, dp_counter,
};

use crate::{KP_BACKENDS, KP_SERVICES, affinity_backend_at, bump};

// ICMP errors of translated flows; a child module so it shares this one's maps and helpers.
#[path = "icmp.rs"]
mod icmp;

// Replies to new flows of Service ports without endpoints (upstream's REJECT).
#[path = "reject.rs"]
mod reject;

#[map]
static KP_AFFINITY_ADDR: LruHashMap<AddrAffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(AFFINITY_ADDR_MAX_ENTRIES, 0);

#[map]
static KP_CT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(CT_MAX_ENTRIES, 0);

#[map]
static KP_NODE_ADDRS: HashMap<NodeAddrKey, Addr> = HashMap::with_max_entries(NODE_ADDRS_MAX_ENTRIES, 0);

#[map]
static KP_SRC_RANGES: LpmTrie<SrcRangeKey, u8> = LpmTrie::with_max_entries(SRC_RANGES_MAX_ENTRIES, 0);

#[map]
static KP_DP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(dp_counter::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const NSEC_PER_SEC: u64 = 1_000_000_000;
/// The GC needs `last_seen_ns` only to the second; refreshing it more often just dirties cache lines.
const REFRESH_NS: u64 = NSEC_PER_SEC;
/// A closed flow's SNAT port goes to a new flow only after this long without packets: the client's last ACK
/// (or the backend's retransmitted FIN, if it was lost) has passed by then.
const REUSE_AFTER_NS: u64 = NSEC_PER_SEC;
/// IPv4 header checksum offset.
const IP4_CSUM_OFF: usize = ETH_HLEN + 10;
/// Verdict for packets we leave untouched: run the next tc program / filter (see the module documentation).
const PASS_ON: i32 = TC_ACT_UNSPEC;
/// `bpf_map_update_elem`'s error for `BPF_NOEXIST` on an existing key.
const EEXIST: i32 = 17;

/// A parsed TCP/UDP packet.
struct Pkt {
    v6: bool,
    l4_off: usize,
    proto: u8,
    saddr: Addr,
    daddr: Addr,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    /// Length from the network header on (for the FIB lookup's MTU check).
    tot_len: u16,
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(c) = KP_DP_COUNTERS.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Pkt> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (v6, proto, l4_off, saddr, daddr, tot_len) = if eth_proto == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        // Offset or more-fragments: only a first fragment carries the ports; pass the rest untouched.
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
        if frag & 0x1fff != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        let s: u32 = ctx.load(ETH_HLEN + 12).ok()?;
        let d: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        let tot = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?);
        (false, proto, ETH_HLEN + ihl, addr_from_v4(s), addr_from_v4(d), tot)
    } else if eth_proto == ETH_P_IPV6 {
        // Extension headers are not walked: only TCP/UDP right after the fixed header.
        let proto: u8 = ctx.load(ETH_HLEN + 6).ok()?;
        let s: Addr = ctx.load(ETH_HLEN + 8).ok()?;
        let d: Addr = ctx.load(ETH_HLEN + 24).ok()?;
        let plen = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?);
        (true, proto, ETH_HLEN + 40, s, d, plen.wrapping_add(40))
    } else {
        return None;
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let sport: u16 = ctx.load(l4_off).ok()?;
    let dport: u16 = ctx.load(l4_off + 2).ok()?;
    let tcp_flags: u8 = if proto == PROTO_TCP { ctx.load(l4_off + 13).ok()? } else { 0 };
    Some(Pkt { v6, l4_off, proto, saddr, daddr, sport, dport, tcp_flags, tot_len })
}

/// Rewrites one address (source when `dst` is false) with checksum fixes.
#[inline(always)]
fn rewrite_addr(ctx: &TcContext, p: &Pkt, csum_off: usize, l4_flags: u64, old: &Addr, new: &Addr, dst: bool) -> bool {
    if p.v6 {
        let off = ETH_HLEN + if dst { 24 } else { 8 };
        for i in 0..4 {
            if old[i] != new[i]
                && ctx
                    .l4_csum_replace(csum_off, old[i] as u64, new[i] as u64, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)
                    .is_err()
            {
                return false;
            }
        }
        ctx.store(off, new, 0).is_ok()
    } else {
        let off = ETH_HLEN + if dst { 16 } else { 12 };
        if old[3] == new[3] {
            return true;
        }
        ctx.l4_csum_replace(csum_off, old[3] as u64, new[3] as u64, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4).is_ok()
            && ctx.l3_csum_replace(IP4_CSUM_OFF, old[3] as u64, new[3] as u64, 4).is_ok()
            && ctx.store(off, &new[3], 0).is_ok()
    }
}

/// Rewrites the packet's addresses and ports to `v`'s, fixing L3 and L4 checksums.
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Pkt, v: &CtValue) -> bool {
    let csum_off = p.l4_off + if p.proto == PROTO_TCP { 16 } else { 6 };
    // A UDP checksum of 0 means "none" (IPv4): keep it 0, and never produce 0 from a real one.
    let l4_flags: u64 = if p.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    if !rewrite_addr(ctx, p, csum_off, l4_flags, &p.saddr, &v.nat_saddr, false)
        || !rewrite_addr(ctx, p, csum_off, l4_flags, &p.daddr, &v.nat_daddr, true)
    {
        return false;
    }
    if p.sport != v.nat_sport
        && (ctx.l4_csum_replace(csum_off, p.sport as u64, v.nat_sport as u64, l4_flags | 2).is_err()
            || ctx.store(p.l4_off, &v.nat_sport, 0).is_err())
    {
        return false;
    }
    if p.dport != v.nat_dport
        && (ctx.l4_csum_replace(csum_off, p.dport as u64, v.nat_dport as u64, l4_flags | 2).is_err()
            || ctx.store(p.l4_off + 2, &v.nat_dport, 0).is_err())
    {
        return false;
    }
    true
}

/// Sends the (already rewritten) packet out of the device the FIB picks, resolving the next hop's MAC.
#[inline(always)]
fn fib_redirect(ctx: &TcContext, p: &Pkt, v: &CtValue, ifindex: u32) -> i32 {
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = if p.v6 { AF_INET6 } else { AF_INET };
    params.l4_protocol = p.proto;
    params.sport = v.nat_sport;
    params.dport = v.nat_dport;
    // A GSO/GRO aggregate's IP length is the whole aggregate, which always "exceeds" the MTU: leave the check
    // to the kernel (tot_len 0 → is_skb_forwardable, which validates GSO segments) for aggregates.
    params.__bindgen_anon_1.tot_len = if unsafe { (*ctx.skb.skb).gso_size } != 0 { 0 } else { p.tot_len };
    params.ifindex = ifindex;
    if p.v6 {
        params.__bindgen_anon_3.ipv6_src = v.nat_saddr;
        params.__bindgen_anon_4.ipv6_dst = v.nat_daddr;
    } else {
        params.__bindgen_anon_3.ipv4_src = v.nat_saddr[3];
        params.__bindgen_anon_4.ipv4_dst = v.nat_daddr[3];
    }
    let ret = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut params, core::mem::size_of::<FibParams>() as i32, 0) } as u32;
    if ret == BPF_FIB_LKUP_RET_SUCCESS || ret == BPF_FIB_LKUP_RET_NO_NEIGH {
        // NULL params: the helper takes the next hop from its own route lookup of the packet's destination.
        return unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count(dp_counter::FIB_FAIL);
    // Already rewritten: the stack takes it as it is (final, like any translated packet).
    TC_ACT_OK as i32
}

/// Marks an entry as used: `SEEN`, `CLOSING` on FIN/RST (`REUSABLE` too on RST: a reset leaves no
/// TIME_WAIT), `last_seen_ns` at most once a second, and on every SYN/FIN/RST (the start of
/// [`REUSE_AFTER_NS`]). A SYN on a closed flow's entry (the client reusing its port) opens it again.
#[inline(always)]
fn touch(v: *mut CtValue, p: &Pkt, now: u64) {
    let closing = if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 { CT_F_CLOSING } else { 0 };
    let reset = if p.tcp_flags & TCP_RST != 0 { CT_F_REUSABLE } else { 0 };
    let reopen = if p.tcp_flags & TCP_SYN != 0 { CT_F_CLOSING | CT_F_REUSABLE } else { 0 };
    unsafe {
        let want = ((*v).flags & !reopen) | CT_F_SEEN | closing | reset;
        if want != (*v).flags {
            (*v).flags = want;
        }
        if p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || now.wrapping_sub((*v).last_seen_ns) > REFRESH_NS {
            (*v).last_seen_ns = now;
        }
    }
}

/// The backend's first FIN of a SNATed flow: when the client's FIN came first, the client holds the
/// TIME_WAIT and the backend none, so the SNAT port can be reused soon after the close ([`try_reuse`]).
/// (A simultaneous close is taken for a client-first one; the backend then rejects a reusing SYN only if
/// its timestamps are older, and the client retries.)
#[inline(always)]
fn backend_fin(v: *mut CtValue, rkey: &CtKey, val: &CtValue) {
    let fk = val.partner(rkey);
    if let Some(f) = unsafe { KP_CT.get(&fk) }
        && f.flags & CT_F_CLOSING != 0
    {
        unsafe { (*v).flags |= CT_F_REUSABLE };
    }
}

/// Frees SNAT reply key `rkey` held by a closed flow that left no TIME_WAIT at the backend
/// ([`CT_F_REUSABLE`]) and has been quiet for [`REUSE_AFTER_NS`]: removes both of its entries, so the
/// caller's `BPF_NOEXIST` insert can take the port. The GC would free it only after the closing lifetime
/// (10 s) and its interval, which at a few thousand new flows per second exhausts the SNAT range.
#[inline(always)]
fn try_reuse(rkey: &CtKey, now: u64) -> bool {
    let Some(old) = (unsafe { KP_CT.get(rkey) }) else {
        return true;
    };
    let (seen, nat_dport) = (old.last_seen_ns, old.nat_dport);
    let mut flags = old.flags;
    let mut last = seen;
    let fk = old.partner(rkey);
    let mut partner = false;
    if let Some(f) = unsafe { KP_CT.get(&fk) }
        && f.partner(&fk) == *rkey
    {
        partner = true;
        flags |= f.flags;
        if f.last_seen_ns > last {
            last = f.last_seen_ns;
        }
    }
    let closed = CT_F_SNAT | CT_F_CLOSING | CT_F_REUSABLE;
    if flags & closed != closed || now.wrapping_sub(last) < REUSE_AFTER_NS || last > now {
        return false;
    }
    if partner {
        let _ = KP_CT.remove(&fk);
    }
    // Another CPU may have reused the port since the read above: leave its new entry alone.
    match unsafe { KP_CT.get(rkey) } {
        Some(cur) if cur.last_seen_ns != seen || cur.nat_dport != nat_dport => false,
        _ => {
            let _ = KP_CT.remove(rkey);
            true
        }
    }
}

/// A random port of `SNAT_PORT_MIN..=SNAT_PORT_MAX` (network byte order is applied by the caller).
#[inline(always)]
fn random_port() -> u16 {
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    (SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % span) as u16
}

/// Inserts reply entry `rev` at `rkey` with a free destination port, i.e. the flow's new source port towards
/// the backend: `first`, then random ports of the SNAT range, [`SNAT_PORT_RETRIES`] tries in all, each a
/// `BPF_NOEXIST` insert. With `reuse` (SNAT only), a port held by a closed flow that left no TIME_WAIT at the
/// backend is taken over ([`try_reuse`]). On success `rkey.dport` holds the port.
#[inline(always)]
fn alloc_port(rkey: &mut CtKey, rev: &CtValue, first: u16, now: u64, reuse: bool) -> bool {
    let mut port = first;
    for _ in 0..SNAT_PORT_RETRIES {
        rkey.dport = port.to_be();
        if KP_CT.insert(&*rkey, rev, BPF_NOEXIST as u64).is_ok() {
            return true;
        }
        if reuse && try_reuse(rkey, now) && KP_CT.insert(&*rkey, rev, BPF_NOEXIST as u64).is_ok() {
            count(dp_counter::SNAT_PORT_REUSED);
            return true;
        }
        port = random_port();
    }
    false
}

/// Whether reply entry `v` is the one the flow of first packet `p` makes: it translates back to `p`'s
/// frontend and client.
#[inline(always)]
fn is_reply_of(v: &CtValue, p: &Pkt) -> bool {
    // Word by word: a whole-array comparison may become a `bcmp` call, which BPF has no lowering for.
    let mut same = v.nat_sport == p.dport && v.nat_dport == p.sport;
    for i in 0..4 {
        same &= v.nat_saddr[i] == p.daddr[i] && v.nat_daddr[i] == p.saddr[i];
    }
    same
}

#[inline(always)]
fn ct_key(p: &Pkt, dir: u8) -> CtKey {
    CtKey { saddr: p.saddr, daddr: p.daddr, sport: p.sport, dport: p.dport, proto: p.proto, dir, _pad: [0; 2] }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Applies an existing entry: rewrite, then redirect when the new source is (or may be) a node address.
#[inline(always)]
fn apply(ctx: &TcContext, p: &Pkt, v: &CtValue, redirect: bool) -> i32 {
    if !rewrite(ctx, p, v) {
        return TC_ACT_SHOT as i32;
    }
    // Translated: final, so nothing behind us sees (or rewrites) the packet again.
    if redirect { fib_redirect(ctx, p, v, ifindex(ctx)) } else { TC_ACT_OK as i32 }
}

/// [`new_flow`]'s verdict for "conntrack pair inserted": not a `TC_ACT_*` value.
const FLOW_CREATED: i32 = -100;
/// [`new_flow`]'s verdict for "the Service port has no endpoint at all": answer with [`reject::send`].
const FLOW_REJECT: i32 = -101;

/// Picks a backend among the master's slots, honouring `sessionAffinity: ClientIP` keyed by the client's
/// address (the socket LB keys by network namespace; a packet only has its source address).
#[inline(always)]
fn pick_backend(key: &mut ServiceKey, master: &ServiceValue, client: &Addr, now: u64) -> Option<(u32, BackendValue)> {
    let affinity = master.flags & SVC_FLAG_AFFINITY != 0;
    let akey = AddrAffinityKey { client: *client, service_id: master.service_id, _pad: 0 };
    if affinity {
        let entry = unsafe { KP_AFFINITY_ADDR.get(&akey) };
        if let Some(found) = affinity_backend_at(entry, master.service_id, master.affinity_timeout, now) {
            let _ =
                KP_AFFINITY_ADDR.insert(&akey, &AffinityValue { last_used_ns: now, backend_id: found.0, _pad: 0 }, 0);
            return Some(found);
        }
    }
    key.backend_slot = (unsafe { bpf_get_prandom_u32() } % (master.count as u32)) as u16 + 1;
    let backend_id = unsafe { KP_SERVICES.get(*key) }?.backend_id;
    let backend = *unsafe { KP_BACKENDS.get(backend_id) }?;
    if affinity {
        // Best effort, as in the socket LB: a failed LRU insert only loses stickiness.
        let _ = KP_AFFINITY_ADDR.insert(&akey, &AffinityValue { last_used_ns: now, backend_id, _pad: 0 }, 0);
    }
    Some((backend_id, backend))
}

/// New flow to a frontend: returns `None` when the packet is not for a frontend this program serves.
///
/// Node devices (`pod == false`) serve NodePort / ExternalIP / LoadBalancer frontends; ClusterIPs stay with
/// the socket LB. Pod-facing devices (`pod == true`) serve every frontend with the socket LB's scope and
/// policy (`lb_select` in main.rs), for pods whose sockets bypass socket LB: DNAT only (pod IPs are
/// routable), except a hairpin (a pod reaching itself), which is also source-NATed to the frontend.
///
/// Without SNAT the reply entry takes the client's own tuple if it is free or already this flow's, else
/// the client's port is remapped (module documentation); SNAT and remapping share [`alloc_port`].
///
/// Returns [`FLOW_CREATED`] once the conntrack pair is in; the caller then applies the forward entry. Not
/// inlined: its frame and `icmp::handle`'s are never live together, so the call chain stays within the
/// verifier's 512-byte stack limit.
#[inline(never)]
fn new_flow(ctx: &TcContext, p: &Pkt, now: u64, pod: bool) -> Option<i32> {
    let mut key =
        ServiceKey { addr: p.daddr, port: p.dport, backend_slot: 0, proto: p.proto, scope: SCOPE_EXT, _pad: [0; 2] };
    let ext = *unsafe { KP_SERVICES.get(key) }?;
    if !pod && ext.flags & (SVC_FLAG_NODE_PORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOAD_BALANCER) == 0 {
        return None;
    }
    let service_id = ext.service_id;
    if !pod && ext.flags & SVC_FLAG_SOURCE_RANGE != 0 {
        let rk = Key::new(32 + 128, SrcRangeKey { service_id_be: service_id.to_be(), addr: p.saddr });
        if KP_SRC_RANGES.get(rk).is_none() {
            count(dp_counter::DROP_SOURCE_RANGE);
            return Some(TC_ACT_SHOT as i32);
        }
    }
    let local_scope = ext.flags & SVC_FLAG_LOCAL_SCOPE != 0;
    let mut master = ext;
    if local_scope {
        key.scope = SCOPE_INT;
        master = match unsafe { KP_SERVICES.get(key) } {
            Some(m) => *m,
            None => ServiceValue { count: 0, ..ext },
        };
    }
    if master.count == 0 {
        if pod {
            bump(service_id, true);
        }
        // As upstream: no endpoint at all → REJECT; endpoints elsewhere but none here for a Local policy →
        // DROP (for external traffic, the health-check node port steers load balancers away).
        if ext.flags & SVC_FLAG_NO_ENDPOINTS != 0 {
            return Some(FLOW_REJECT);
        }
        count(dp_counter::DROP_NO_ENDPOINT);
        return Some(TC_ACT_SHOT as i32);
    }
    // Only while the writer shrinks a backend set (count read before, slot deleted after): drop, the client
    // retransmits into the new state.
    let Some((backend_id, backend)) = pick_backend(&mut key, &master, &p.saddr, now) else {
        count(dp_counter::DROP_NO_ENDPOINT);
        return Some(TC_ACT_SHOT as i32);
    };
    // Node side: Local policy keeps the client address; a local backend is reached without SNAT either way
    // (its replies leave through this device's egress). Only a remote backend under Cluster needs SNAT.
    // Pod side: only a hairpin needs SNAT (a pod drops a packet whose source is its own address).
    let hairpin = pod && backend.addr == p.saddr;
    let snat = if pod { hairpin } else { !local_scope && backend.flags & BACKEND_FLAG_LOCAL == 0 };

    let mut fwd = CtValue {
        nat_saddr: p.saddr,
        nat_daddr: backend.addr,
        nat_sport: p.sport,
        nat_dport: backend.port,
        service_id,
        backend_id,
        flags: 0,
        _pad: [0; 3],
        last_seen_ns: now,
    };
    let rev = CtValue {
        nat_saddr: p.daddr,
        nat_daddr: p.saddr,
        nat_sport: p.dport,
        nat_dport: p.sport,
        service_id,
        backend_id: 0,
        flags: if snat { CT_F_SNAT } else { 0 },
        _pad: [0; 3],
        last_seen_ns: now,
    };
    // The reply entry goes in first: a reply can never find the forward entry without its partner.
    let mut rkey = CtKey {
        saddr: backend.addr,
        daddr: p.saddr,
        sport: backend.port,
        dport: p.sport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // `Some(first port to try)` when the reply entry needs a port allocated: SNAT, or a clash without SNAT.
    let mut alloc: Option<u16> = None;
    if hairpin {
        // Source-NAT to the frontend address with the client's port: unique per (pod, port), no allocation.
        rkey.daddr = p.daddr;
        if KP_CT.insert(&rkey, &rev, 0).is_err() {
            count(dp_counter::CT_INSERT_FAIL);
            return Some(TC_ACT_SHOT as i32);
        }
        fwd.nat_saddr = p.daddr;
        fwd.flags = CT_F_SNAT;
    } else if snat {
        let nk = NodeAddrKey { ifindex: ifindex(ctx), family: if p.v6 { FAMILY_V6 } else { FAMILY_V4 }, _pad: [0; 3] };
        let Some(node) = (unsafe { KP_NODE_ADDRS.get(nk) }) else {
            count(dp_counter::SNAT_EXHAUSTED);
            return Some(TC_ACT_SHOT as i32);
        };
        rkey.daddr = *node;
        // Deterministic first (as Cilium): the client's own port when it lies in the range, so one client's
        // flows map 1:1; then random ports. A port held by a closed flow is reused (`try_reuse`).
        let own = u16::from_be(p.sport);
        alloc = Some(if (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&own) { own } else { random_port() });
    } else if let Err(e) = KP_CT.insert(&rkey, &rev, BPF_NOEXIST as u64) {
        if e != -EEXIST {
            count(dp_counter::CT_INSERT_FAIL);
            return Some(TC_ACT_SHOT as i32);
        }
        // The client's own reply tuple is taken. By this very flow (its first packet racing on another CPU,
        // or its forward entry re-created): keep it. By another flow — the same client port to the same
        // backend through another frontend, or a closed flow whose tuple the backend may still hold in
        // TIME_WAIT — remap the source port (the address stays), as nf_nat does; never take over a closed
        // flow's port here. Gone in between: the client's port again.
        match unsafe { KP_CT.get(&rkey) } {
            Some(cur) if is_reply_of(cur, p) => {}
            Some(_) => alloc = Some(random_port()),
            None => alloc = Some(u16::from_be(p.sport)),
        }
    }
    if let Some(first) = alloc {
        if !alloc_port(&mut rkey, &rev, first, now, snat) {
            count(if snat { dp_counter::SNAT_EXHAUSTED } else { dp_counter::PORT_REMAP_EXHAUSTED });
            return Some(TC_ACT_SHOT as i32);
        }
        // The rewrites carry any port change: `rewrite` compares each port with the entry's.
        fwd.nat_sport = rkey.dport;
        if snat {
            fwd.nat_saddr = rkey.daddr;
            fwd.flags = CT_F_SNAT;
        } else if rkey.dport != p.sport {
            count(dp_counter::PORT_REMAPPED);
        }
    }
    if KP_CT.insert(&ct_key(p, CT_DIR_FWD), &fwd, 0).is_err() {
        let _ = KP_CT.remove(&rkey);
        count(dp_counter::CT_INSERT_FAIL);
        return Some(TC_ACT_SHOT as i32);
    }
    if pod {
        bump(service_id, false);
    }
    count(dp_counter::CT_INSERT);
    // The caller applies the new forward entry like any existing one: keeping the rewrite out of this frame
    // keeps the call chain within the stack limit.
    Some(FLOW_CREATED)
}

/// Applies the packet's existing conntrack entry, if it has one. Not inlined, like [`new_flow`], to keep
/// the frames on any call chain within the verifier's stack limit.
#[inline(never)]
fn existing_flow(ctx: &TcContext, p: &Pkt, now: u64) -> Option<i32> {
    if let Some(v) = KP_CT.get_ptr_mut(&ct_key(p, CT_DIR_FWD)) {
        let val = unsafe { *v };
        // Backend ids are per service: a missing or reused id means the backend went away; re-balance.
        let alive = match unsafe { KP_BACKENDS.get(val.backend_id) } {
            Some(b) => b.service_id == val.service_id,
            None => false,
        };
        if alive {
            touch(v, p, now);
            count(dp_counter::XLATE_FWD);
            return Some(apply(ctx, p, &val, val.flags & CT_F_SNAT != 0));
        }
        count(dp_counter::CT_STALE_BACKEND);
    } else if let Some(v) = KP_CT.get_ptr_mut(&ct_key(p, CT_DIR_REPLY)) {
        // A reply to a SNATed flow (addressed to the node), or (pod side) a local backend's reply to a pod's
        // per-packet flow: back to frontend → client.
        let val = unsafe { *v };
        if p.tcp_flags & TCP_FIN != 0 && val.flags & (CT_F_SNAT | CT_F_CLOSING) == CT_F_SNAT {
            backend_fin(v, &ct_key(p, CT_DIR_REPLY), &val);
        }
        touch(v, p, now);
        count(dp_counter::XLATE_REPLY);
        return Some(apply(ctx, p, &val, true));
    }
    None
}

/// Ingress of node devices (`pod == false`) and of pod-facing devices (`pod == true`, which also serves
/// ClusterIPs in [`new_flow`]); existing entries are applied the same way on both.
#[inline(always)]
fn ingress(ctx: &TcContext, pod: bool) -> i32 {
    let Some(p) = parse(ctx) else {
        return icmp::handle(ctx, true);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(verdict) = existing_flow(ctx, &p, now) {
        return verdict;
    }
    match new_flow(ctx, &p, now, pod) {
        // Found right away unless evicted in between; then the packet goes on untranslated.
        Some(FLOW_CREATED) => existing_flow(ctx, &p, now).unwrap_or(PASS_ON),
        Some(FLOW_REJECT) => reject::send(ctx, &p),
        Some(verdict) => verdict,
        None => PASS_ON,
    }
}

#[inline(always)]
fn egress(ctx: &TcContext) -> i32 {
    let Some(p) = parse(ctx) else {
        return icmp::handle(ctx, false);
    };
    if let Some(v) = KP_CT.get_ptr_mut(&ct_key(&p, CT_DIR_REPLY)) {
        let val = unsafe { *v };
        touch(v, &p, unsafe { bpf_ktime_get_ns() });
        count(dp_counter::XLATE_REPLY);
        // Already routed out of this device: only the source (and the port) change.
        return apply(ctx, &p, &val, false);
    }
    PASS_ON
}

/// tc ingress of node devices.
#[classifier]
pub fn kp_tc_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx, false)
}

/// tc ingress of pod-facing devices (socket-LB scope `opt-out` / `host-only`).
#[classifier]
pub fn kp_tc_pod_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx, true)
}

/// tc egress of node devices.
#[classifier]
pub fn kp_tc_egress(ctx: TcContext) -> i32 {
    egress(&ctx)
}
