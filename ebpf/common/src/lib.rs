//! Map layouts shared by `ebpf/programs` (kernel side) and `pkg/ebpf` (userspace).
//!
//! This crate is the only definition of every key and value the socket load balancer keeps in BPF maps.
//! Every type is `#[repr(C)]` with explicit `_pad` fields (so no byte of a key is uninitialised, which
//! would make hash lookups miss) and a `const` size assertion. Changing any layout requires bumping
//! [`LAYOUT_VERSION`]: pinned maps are reused by path without checking their shape.
//!
//! Addresses are one 16-byte form for both families (`[u32; 4]` holding the raw network-order bytes, as
//! the kernel's `bpf_sock_addr.user_ip6`); IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`). One
//! map therefore serves both families, and a `connect()` on an IPv6 socket to `::ffff:VIP` finds the
//! IPv4 service without a second lookup.
#![no_std]

/// Version of the map layouts; part of the pin path (`<bpffs_root>/v1/…`).
pub const LAYOUT_VERSION: &str = "v1";

/// Map names as they appear in the object file and under `<bpffs_root>/<LAYOUT_VERSION>/maps/`.
pub mod map_names {
    /// Services: [`super::ServiceKey`] → [`super::ServiceValue`] (master entries and backend slots).
    pub const SERVICES: &str = "KP_SERVICES";
    /// Backends: backend id (`u32`) → [`super::BackendValue`].
    pub const BACKENDS: &str = "KP_BACKENDS";
    /// Reverse NAT by service id: service id (`u32`) → [`super::RevNatValue`] (the service's ClusterIP).
    pub const REV_NAT: &str = "KP_REV_NAT";
    /// Socket reverse NAT (LRU): [`super::SockRevNatKey`] → [`super::SockRevNatValue`].
    pub const SOCK_REV_NAT: &str = "KP_SOCK_REVNAT";
    /// Session affinity (LRU): [`super::AffinityKey`] → [`super::AffinityValue`].
    pub const AFFINITY: &str = "KP_AFFINITY";
    /// Per-CPU counters indexed by service id: [`super::ServiceCounters`].
    pub const COUNTERS: &str = "KP_COUNTERS";
    /// Per-packet conntrack and NAT (LRU): [`super::CtKey`] → [`super::CtValue`]; one forward and one
    /// reply entry per flow.
    pub const CT: &str = "KP_CT";
    /// Node addresses of the devices the tc programs run on: [`super::NodeAddrKey`] → [`super::Addr`]
    /// (the SNAT source for remote backends).
    pub const NODE_ADDRS: &str = "KP_NODE_ADDRS";
    /// `loadBalancerSourceRanges` (LPM trie): [`super::SrcRangeKey`] (behind aya's prefix length) → `u8`.
    pub const SRC_RANGES: &str = "KP_SRC_RANGES";
    /// Per-CPU datapath counters of the tc programs, indexed by `super::dp_counter::*`: `u64`.
    pub const DP_COUNTERS: &str = "KP_DP_COUNTERS";
    /// Session affinity of the tc programs (LRU): [`super::AddrAffinityKey`] → [`super::AffinityValue`]
    /// (per-packet clients are identified by source address, not by network namespace).
    pub const AFFINITY_ADDR: &str = "KP_AFFINITY_ADDR";
    /// Socket-LB scope (array of one): index 0 → [`super::SockLbConfig`].
    pub const SOCK_LB_CONFIG: &str = "KP_SOCK_LB_CFG";
    /// Network namespaces whose sockets bypass socket LB (scope opt-out): netns cookie (`u64`) → `u8`.
    pub const SOCK_LB_SKIP: &str = "KP_SOCK_LB_SKIP";

    /// Every map, in the order userspace pins them.
    pub const ALL: [&str; 13] = [
        SERVICES,
        BACKENDS,
        REV_NAT,
        SOCK_REV_NAT,
        AFFINITY,
        COUNTERS,
        CT,
        NODE_ADDRS,
        SRC_RANGES,
        DP_COUNTERS,
        AFFINITY_ADDR,
        SOCK_LB_CONFIG,
        SOCK_LB_SKIP,
    ];
}

/// Program (function) names in the object file, with the attach hook each implements.
pub mod program_names {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "kp_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "kp_connect6";
    /// `cgroup/sendmsg4`.
    pub const SENDMSG4: &str = "kp_sendmsg4";
    /// `cgroup/sendmsg6`.
    pub const SENDMSG6: &str = "kp_sendmsg6";
    /// `cgroup/recvmsg4`.
    pub const RECVMSG4: &str = "kp_recvmsg4";
    /// `cgroup/recvmsg6`.
    pub const RECVMSG6: &str = "kp_recvmsg6";
    /// `cgroup/getpeername4`.
    pub const GETPEERNAME4: &str = "kp_getpeername4";
    /// `cgroup/getpeername6`.
    pub const GETPEERNAME6: &str = "kp_getpeername6";

    /// Every cgroup `sock_addr` program (the tc programs are listed in [`TC_ALL`]).
    pub const ALL: [&str; 8] = [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, RECVMSG4, RECVMSG6, GETPEERNAME4, GETPEERNAME6];

    /// tc ingress of node devices: NodePort / ExternalIP / LoadBalancer DNAT (+ SNAT), reply un-SNAT.
    pub const TC_INGRESS: &str = "kp_tc_ingress";
    /// tc egress of node devices: reverse translation of replies from local backends.
    pub const TC_EGRESS: &str = "kp_tc_egress";
    /// Every tc program of node devices.
    pub const TC_ALL: [&str; 2] = [TC_INGRESS, TC_EGRESS];
    /// tc ingress of pod-facing devices (socket-LB scope `opt-out` / `host-only`): the node ingress plus
    /// per-packet ClusterIP (and every other frontend) translation for pods that bypass socket LB.
    pub const TC_POD_INGRESS: &str = "kp_tc_pod_ingress";
}

/// Maximum entries of [`map_names::SERVICES`] (frontends × (backends + 1) × scopes): room for 100k Service
/// ports of 10 endpoints with two frontends each. Not preallocated ([`HASH_NO_PREALLOC`]), so memory follows
/// what is programmed, not this bound.
pub const SERVICES_MAX_ENTRIES: u32 = 1 << 22;
/// Maximum entries of [`map_names::BACKENDS`] (one per endpoint per service port); not preallocated.
pub const BACKENDS_MAX_ENTRIES: u32 = 1 << 21;
/// `BPF_F_NO_PREALLOC`: hash map entries are allocated on insert instead of all at map creation.
pub const HASH_NO_PREALLOC: u32 = 1;
/// Maximum entries of [`map_names::REV_NAT`] (not preallocated); also the size of the per-CPU counters array
/// (16 bytes per id per CPU: 4 MiB per CPU), so service ids are `1..MAX_SERVICE_ID` inclusive: room for 100k
/// Service ports of each family.
pub const REV_NAT_MAX_ENTRIES: u32 = 1 << 18;
/// Largest service id userspace allocates (0 is never used: it means "no service").
pub const MAX_SERVICE_ID: u32 = REV_NAT_MAX_ENTRIES - 1;
/// Maximum entries of [`map_names::SOCK_REV_NAT`] (Cilium's default is 256k).
pub const SOCK_REV_NAT_MAX_ENTRIES: u32 = 262144;
/// Maximum entries of [`map_names::AFFINITY`].
pub const AFFINITY_MAX_ENTRIES: u32 = 65536;

/// Maximum entries of [`map_names::AFFINITY_ADDR`].
pub const AFFINITY_ADDR_MAX_ENTRIES: u32 = 65536;
/// Maximum entries of [`map_names::SOCK_LB_SKIP`] (pods per node, with room for stale entries).
pub const SOCK_LB_SKIP_MAX_ENTRIES: u32 = 16384;

/// [`SockLbConfig::scope`]: every socket in the cgroup subtree is translated (no per-packet path for pods).
pub const SOCK_LB_SCOPE_ALL: u32 = 0;
/// [`SockLbConfig::scope`]: sockets of network namespaces in [`map_names::SOCK_LB_SKIP`] are left alone.
pub const SOCK_LB_SCOPE_OPT_OUT: u32 = 1;
/// [`SockLbConfig::scope`]: only sockets of the proxy's own network namespace are translated.
pub const SOCK_LB_SCOPE_HOST_ONLY: u32 = 2;

/// Default maximum entries of [`map_names::CT`]: two entries per flow, so 131072 flows — kube-proxy's
/// minimum `nf_conntrack_max` (32768 per core, at least 131072). Userspace may override it at load time.
pub const CT_MAX_ENTRIES: u32 = 262144;
/// Maximum entries of [`map_names::NODE_ADDRS`] (devices × families).
pub const NODE_ADDRS_MAX_ENTRIES: u32 = 256;
/// Maximum entries of [`map_names::SRC_RANGES`] (Cilium's default is 64k).
pub const SRC_RANGES_MAX_ENTRIES: u32 = 65536;

/// SNAT source ports for remote backends: `SNAT_PORT_MIN..=SNAT_PORT_MAX`. Above the NodePort range
/// (30000–32767) like Cilium's `NODEPORT_PORT_MAX + 1`, but also above Linux's default ephemeral range
/// (`ip_local_port_range` 32768–60999), so a NAT'ed flow never shares a tuple with a local socket's
/// connection to the same backend. Uniqueness is per (node address, backend, protocol). Flows without SNAT
/// whose reply tuple is taken get their client port remapped into the same range (per client address).
pub const SNAT_PORT_MIN: u16 = 61000;
/// See [`SNAT_PORT_MIN`].
pub const SNAT_PORT_MAX: u16 = 65535;
/// Random probes for a free SNAT (or remapped) port before the flow is dropped (and counted).
pub const SNAT_PORT_RETRIES: u32 = 16;

/// Scope of a service entry: the cluster-wide set of backends (also the lookup point of every frontend).
pub const SCOPE_EXT: u8 = 0;
/// Scope of a service entry: the node-local set, used when the master at [`SCOPE_EXT`] has
/// [`SVC_FLAG_LOCAL_SCOPE`].
pub const SCOPE_INT: u8 = 1;

/// Master flag: the frontend's traffic policy is Local, so use the [`SCOPE_INT`] entries.
pub const SVC_FLAG_LOCAL_SCOPE: u8 = 1 << 0;
/// Master flag: `sessionAffinity: ClientIP`; `affinity_timeout` holds the timeout in seconds.
pub const SVC_FLAG_AFFINITY: u8 = 1 << 1;
/// Master flag: the frontend is a ClusterIP.
pub const SVC_FLAG_CLUSTER_IP: u8 = 1 << 2;
/// Master flag: the frontend is a NodePort on a node address.
pub const SVC_FLAG_NODE_PORT: u8 = 1 << 3;
/// Master flag: the frontend is an external IP.
pub const SVC_FLAG_EXTERNAL_IP: u8 = 1 << 4;
/// Master flag: the frontend is a LoadBalancer ingress IP.
pub const SVC_FLAG_LOAD_BALANCER: u8 = 1 << 5;

/// Master flag: `loadBalancerSourceRanges` apply; the client must match a [`map_names::SRC_RANGES`] entry
/// of the service id (only set on LoadBalancer frontends, as upstream).
pub const SVC_FLAG_SOURCE_RANGE: u8 = 1 << 6;

/// Backend flag: the endpoint runs on this node (reached without SNAT from the tc programs).
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IANA protocol number of SCTP.
pub const PROTO_SCTP: u8 = 132;

/// The third 32-bit word of an IPv4-mapped IPv6 address (`0000:ffff`) in network byte order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A 16-byte address in the raw network-order form of `bpf_sock_addr.user_ip6`.
pub type Addr = [u32; 4];

/// The 16-byte form of an IPv4 address given as `bpf_sock_addr.user_ip4` (network order).
#[inline(always)]
pub const fn addr_from_v4(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// The IPv4 address (network order) of an IPv4-mapped 16-byte address, `None` for a real IPv6 address.
#[inline(always)]
pub const fn addr_to_v4(addr: &Addr) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD { Some(addr[3]) } else { None }
}

/// Key of [`map_names::SERVICES`]. Slot 0 is the master entry of a frontend; slots `1..=count` name
/// its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Frontend address (16-byte form).
    pub addr: Addr,
    /// Frontend port, network byte order.
    pub port: u16,
    /// 0 = master entry, `1..=count` = backend slot.
    pub backend_slot: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// [`SCOPE_EXT`] or [`SCOPE_INT`].
    pub scope: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
}

/// Value of [`map_names::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Slot entries: the backend id. Master entries: 0.
    pub backend_id: u32,
    /// Master entries: session-affinity timeout in seconds (with [`SVC_FLAG_AFFINITY`]).
    pub affinity_timeout: u32,
    /// Service id (the reverse-NAT index); the same in the master and every slot.
    pub service_id: u32,
    /// Master entries: number of backends (slots `1..=count`); 0 means "reject: no endpoints".
    pub count: u16,
    /// Master entries: `SVC_FLAG_*` bits.
    pub flags: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
}

/// Value of [`map_names::BACKENDS`] (key: backend id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    /// Backend address (16-byte form).
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// `BACKEND_FLAG_*` bits (e.g. [`BACKEND_FLAG_LOCAL`]).
    pub flags: u8,
    /// The service this backend belongs to: backend ids are per service, so an affinity entry can be
    /// checked against the service it was made for.
    pub service_id: u32,
}

/// Value of [`map_names::REV_NAT`] (key: service id, `u32`): the service's ClusterIP frontend, used to
/// rebuild the service-id allocation after a restart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    /// ClusterIP (16-byte form).
    pub addr: Addr,
    /// Service port, network byte order.
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
}

/// Key of [`map_names::SOCK_REV_NAT`]: one socket talking to one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend address (16-byte form).
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 6],
}

/// Value of [`map_names::SOCK_REV_NAT`]: what the application dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    /// Service address the application used (16-byte form).
    pub addr: Addr,
    /// Service port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// Service id, for diagnostics.
    pub service_id: u32,
}

/// Key of [`map_names::AFFINITY`]: one client (network namespace) and one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// `bpf_get_netns_cookie()` of the client socket: socket LB identifies a pod by its netns.
    pub client_cookie: u64,
    /// Service id.
    pub service_id: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Value of [`map_names::AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` of the last connection that used this entry.
    pub last_used_ns: u64,
    /// Backend id chosen for the client.
    pub backend_id: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Key of [`map_names::AFFINITY_ADDR`]: one client address and one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrAffinityKey {
    /// Client (source) address of the flow's first packet (16-byte form).
    pub client: Addr,
    /// Service id.
    pub service_id: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Value of [`map_names::SOCK_LB_CONFIG`] (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockLbConfig {
    /// `SOCK_LB_SCOPE_*`.
    pub scope: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// Netns cookie of the proxy's (the node's) network namespace (`SO_NETNS_COOKIE`).
    pub host_netns_cookie: u64,
}

/// Value of [`map_names::COUNTERS`] (per-CPU array indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceCounters {
    /// Connections (and unconnected datagrams) translated to a backend.
    pub translated: u64,
    /// Connections and datagrams rejected with `ECONNREFUSED` because the service has no endpoints.
    pub no_endpoints: u64,
}

/// [`CtKey::dir`]: a packet from the client towards the frontend (first seen on tc ingress).
pub const CT_DIR_FWD: u8 = 0;
/// [`CtKey::dir`]: a packet from the backend towards the client (or towards the SNAT address).
pub const CT_DIR_REPLY: u8 = 1;

/// [`CtValue::flags`]: the flow is source-NATed to a node address (forward packets are redirected after
/// a FIB lookup instead of being routed by the stack, which would drop a local source as martian).
pub const CT_F_SNAT: u8 = 1 << 0;
/// [`CtValue::flags`]: a packet hit this entry after it was created (for a reply entry: the backend
/// answered, so a TCP flow is established).
pub const CT_F_SEEN: u8 = 1 << 1;
/// [`CtValue::flags`]: a TCP FIN or RST went through in this direction.
pub const CT_F_CLOSING: u8 = 1 << 2;
/// [`CtValue::flags`]: once closed, the backend keeps no TIME_WAIT for this flow's tuple (the client closed
/// first, or a reset ended it), so its SNAT port may go to a new flow before the GC removes it.
pub const CT_F_REUSABLE: u8 = 1 << 3;

/// Conntrack lifetimes (seconds) applied by the userspace GC, Cilium's defaults.
pub mod ct_lifetime {
    /// Established TCP (the backend answered).
    pub const TCP_ESTABLISHED: u64 = 21600;
    /// TCP before the backend answered (SYN sent).
    pub const TCP_SYN: u64 = 60;
    /// TCP after a FIN or RST in either direction.
    pub const TCP_CLOSING: u64 = 10;
    /// UDP and everything else.
    pub const NON_TCP: u64 = 60;
}

/// Key of [`map_names::CT`]: a packet's 5-tuple as seen on the wire, plus its direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    /// Source address (16-byte form).
    pub saddr: Addr,
    /// Destination address (16-byte form).
    pub daddr: Addr,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// [`CT_DIR_FWD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
}

/// Value of [`map_names::CT`]: what a matching packet is rewritten to.
///
/// The two entries of a flow mirror each other: the partner of an entry is found at
/// `{saddr: nat_daddr, daddr: nat_saddr, sport: nat_dport, dport: nat_sport, dir: !dir}` (see
/// [`CtValue::partner`]), which is how the GC ages a flow as a pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// New source address.
    pub nat_saddr: Addr,
    /// New destination address.
    pub nat_daddr: Addr,
    /// New source port, network byte order.
    pub nat_sport: u16,
    /// New destination port, network byte order.
    pub nat_dport: u16,
    /// Service id the flow was balanced for.
    pub service_id: u32,
    /// Backend id chosen (forward entries; 0 in reply entries).
    pub backend_id: u32,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
    /// `bpf_ktime_get_ns()` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
}

impl CtValue {
    /// The key of the other direction's entry of the same flow.
    #[inline(always)]
    pub const fn partner(&self, key: &CtKey) -> CtKey {
        CtKey {
            saddr: self.nat_daddr,
            daddr: self.nat_saddr,
            sport: self.nat_dport,
            dport: self.nat_sport,
            proto: key.proto,
            dir: key.dir ^ 1,
            _pad: [0; 2],
        }
    }
}

/// Address family tags of [`NodeAddrKey::family`].
pub const FAMILY_V4: u8 = 4;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u8 = 6;

/// Key of [`map_names::NODE_ADDRS`]: a device of this node and a family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeAddrKey {
    /// Interface index (in the proxy's network namespace).
    pub ifindex: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
}

/// Data of a [`map_names::SRC_RANGES`] key (aya's LPM `Key` adds the `u32` prefix length in front). The
/// prefix length always covers all of `service_id` (32 bits) plus the range's bits of `addr`; IPv4 ranges
/// are IPv4-mapped, so a /24 is `32 + 96 + 24`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRangeKey {
    /// Service id, big-endian so the trie compares it byte by byte like the address.
    pub service_id_be: u32,
    /// Source address (16-byte form).
    pub addr: Addr,
}

/// Indices of [`map_names::DP_COUNTERS`].
pub mod dp_counter {
    /// New flows translated (conntrack pairs inserted).
    pub const CT_INSERT: u32 = 0;
    /// Conntrack inserts that failed (the packet was dropped).
    pub const CT_INSERT_FAIL: u32 = 1;
    /// Flows dropped because no SNAT port was free for the (node address, backend) pair.
    pub const SNAT_EXHAUSTED: u32 = 2;
    /// Packets dropped because the frontend had no (local) endpoint.
    pub const DROP_NO_ENDPOINT: u32 = 3;
    /// Packets dropped by `loadBalancerSourceRanges`.
    pub const DROP_SOURCE_RANGE: u32 = 4;
    /// Packets translated by a forward conntrack entry (including a flow's first).
    pub const XLATE_FWD: u32 = 5;
    /// Packets translated by a reply conntrack entry.
    pub const XLATE_REPLY: u32 = 6;
    /// Redirects that failed (no route to the backend or the client); the packet went to the stack.
    pub const FIB_FAIL: u32 = 7;
    /// Forward entries found whose backend is gone (the flow is re-balanced).
    pub const CT_STALE_BACKEND: u32 = 8;
    /// ICMP errors (unreachable, fragmentation needed / packet too big, time exceeded) of translated flows
    /// whose quoted packet was translated back.
    pub const XLATE_ICMP_ERROR: u32 = 9;
    /// New flows to a Service port without any endpoint answered with a TCP reset or an ICMP port
    /// unreachable (upstream's REJECT).
    pub const REJECT_SENT: u32 = 10;
    /// Such flows dropped instead because the per-CPU reply rate limit was reached.
    pub const REJECT_RATE_LIMITED: u32 = 11;
    /// SNAT ports taken over from closed flows (see [`super::CT_F_REUSABLE`]).
    pub const SNAT_PORT_REUSED: u32 = 12;
    /// New flows without SNAT (pods bypassing socket LB, `externalTrafficPolicy: Local`, local backends)
    /// whose reply tuple another flow held (the same client port to the same backend through another
    /// frontend, or a closed flow's lingering entries): the client's source port was remapped to a free
    /// port of the SNAT range, the address kept, as netfilter's NAT does.
    pub const PORT_REMAPPED: u32 = 13;
    /// Such flows dropped because no port was free for the (client address, backend, protocol).
    pub const PORT_REMAP_EXHAUSTED: u32 = 14;
    /// Number of counters.
    pub const COUNT: u32 = 15;
    /// Metric-friendly names, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "ct_insert",
        "ct_insert_fail",
        "snat_port_exhausted",
        "drop_no_endpoint",
        "drop_source_range",
        "xlate_forward",
        "xlate_reply",
        "fib_fail",
        "ct_stale_backend",
        "xlate_icmp_error",
        "reject_sent",
        "reject_rate_limited",
        "snat_port_reused",
        "port_remapped",
        "port_remap_exhausted",
    ];
}

// Layout guards: a size change here must come with a LAYOUT_VERSION bump.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<BackendValue>() == 24);
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 20);
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 32);
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<ServiceCounters>() == 16);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 56);
const _: () = assert!(core::mem::size_of::<NodeAddrKey>() == 8);
const _: () = assert!(core::mem::size_of::<SrcRangeKey>() == 20);
const _: () = assert!(core::mem::size_of::<AddrAffinityKey>() == 24);
const _: () = assert!(core::mem::size_of::<SockLbConfig>() == 16);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type is #[repr(C)], Copy, made only of integers, with all padding explicit, so any
    // bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RevNatValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNatValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeAddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SrcRangeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrAffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockLbConfig {}
}

/// Master flag: the Service port has no endpoint at all (upstream's REJECT). Without it, a frontend without
/// a usable endpoint drops (a Local policy without a local endpoint, as upstream).
pub const SVC_FLAG_NO_ENDPOINTS: u8 = 1 << 7;
