//! eBPF backend: socket-level load balancing with cgroup `sock_addr` programs (aya).
//!
//! - [`EbpfBackend::new`] loads the kernel programs built from `ebpf/programs`, pins their maps under
//!   `<bpffs_root>/v1/maps/` (adopting maps already pinned there), attaches the programs to the cgroup
//!   root with bpf_links and pins the links under `<bpffs_root>/v1/links/`. On a restart the pinned links
//!   are kept attached and their programs are swapped in place with `BPF_LINK_UPDATE`, so there is no
//!   window without translation; service and backend ids are rebuilt from the map contents.
//! - The [`proxier::backend::Backend`] impl hands syncs to [`MapWriter`], which writes per-entry updates
//!   in the commit-safe order described in `writer.rs`.
//! - [`EbpfBackend::metrics_collector`] gives a Prometheus collector reading counters and map statistics at
//!   scrape time; [`inspect`] holds the read-only listing behind `kpctl`. Service names are kept in a
//!   pinned userspace-only map ([`NAMES_MAP`]) so both work across restarts.
//! - North-south (NodePort / ExternalIP / LoadBalancer from outside the node): tc programs on the node
//!   devices with BPF conntrack and SNAT; `tc.rs` attaches them to the devices carrying the node's
//!   addresses (tcx links, pinned and adopted like the cgroup links; clsact filters on kernels without tcx,
//!   see [`TcAttachMode`]), [`ct`] collects expired flows.
//! - Socket-LB scope ([`socklb`], `--socket-lb-scope`): sockets of pods may bypass socket LB (host-only, or
//!   per pod with `kpctl socket-lb skip`); such pods reach Services per packet through `kp_tc_pod_ingress`
//!   on the pod-facing devices, which `pods.rs` attaches as they appear.
//! - [`EbpfBackend::cleanup_all`] removes every pin (which detaches the programs) for `--cleanup`.

pub mod ct;
pub mod inspect;
mod loader;
mod maps;
mod metrics;
mod names;
mod pins;
mod pods;
pub mod socklb;
mod sys;
mod tc;
mod writer;

use std::path::PathBuf;

pub use loader::{EbpfBackend, EbpfOptions, ProgramUpdate, bpffs_mounted, detect_cgroup2_mount};
pub use maps::{AyaMaps, FakeMaps, LbMaps, MapOp};
pub use metrics::{BpfStatsSource, EbpfCollector, PinnedStats};
pub use names::{NAMES_MAP, ServiceName, ServiceNameTable, read_pinned_names};
pub use pods::PodDevice;
pub use socklb::{SkipMap, SocketLbScope};
pub use tc::{CLSACT_PRIORITY, NODE_FILTER_HANDLE, NodeDevice, POD_FILTER_HANDLE, TC_ATTACH_ENV, TcAttachMode};
pub use writer::{MapWriter, ServiceCounterSample, SrcRange, addr16, ip_from_addr16};

/// Errors of the eBPF backend; each names the input (path, map, key, service) that caused it.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The bpffs root is not on a mounted BPF filesystem.
    #[error("{path} is not on a mounted bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    BpffsNotMounted {
        /// The configured bpffs root.
        path: PathBuf,
    },
    /// The cgroup root is not a cgroup v2 directory.
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 {
        /// The configured cgroup root.
        path: PathBuf,
    },
    /// No cgroup2 mount in /proc/self/mountinfo.
    #[error("no cgroup2 filesystem is mounted (searched /proc/self/mountinfo)")]
    NoCgroup2Mount,
    /// A filesystem or system call failed.
    #[error("{what}")]
    Io {
        /// What was being done, with the path involved.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// This build has no kernel object (built with `AYA_BUILD_SKIP=1`).
    #[error("proxy-ebpf was built with AYA_BUILD_SKIP=1: the kernel programs are not embedded")]
    NotBuilt,
    /// Loading the object or creating/adopting its pinned maps failed.
    #[error("loading the eBPF object with maps pinned under {pin_dir} failed")]
    Load {
        /// The map pin directory.
        pin_dir: PathBuf,
        /// The cause.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program or map is missing from the embedded object.
    #[error("the embedded eBPF object has no {kind} named {name}")]
    Missing {
        /// `program` or `map`.
        kind: &'static str,
        /// The name looked up.
        name: &'static str,
    },
    /// A pinned map of an earlier build has another shape than this build's, and holds state that live
    /// flows depend on, so it is neither adopted nor replaced silently.
    #[error(
        "pinned map {path} has {found} but this build expects {expected}: run `kube-proxy --cleanup` \
         (drops translated flows) or remove the pin"
    )]
    PinnedMapShape {
        /// The pin.
        path: PathBuf,
        /// Shape of the pinned map.
        found: String,
        /// Shape in the embedded object.
        expected: String,
    },
    /// Loading (verifying) or attaching a program failed.
    #[error("program {name}: {action} failed")]
    Program {
        /// Program name.
        name: &'static str,
        /// `load`, `attach` or `take link`.
        action: &'static str,
        /// The cause (the verifier log is part of it for `load`).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// The attachment is not a bpf_link (kernel too old for cgroup links), so it cannot be pinned.
    #[error("program {name}: the cgroup attachment is not a bpf_link")]
    Link {
        /// Program name.
        name: &'static str,
        /// The cause.
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    /// Pinning a link failed.
    #[error("pinning the link of program {name} at {path} failed")]
    Pin {
        /// Program name.
        name: &'static str,
        /// Pin path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<aya::pin::PinError>,
    },
    /// A map operation failed.
    #[error("{op} on map {map} (key {key}) failed")]
    MapOp {
        /// Map name.
        map: &'static str,
        /// `update`, `delete`, `dump`, ….
        op: &'static str,
        /// The key, formatted.
        key: String,
        /// The cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// No free id left.
    #[error("no free {what} left while programming {input}")]
    IdsExhausted {
        /// `service ids` or `backend ids`.
        what: &'static str,
        /// The service port being programmed.
        input: String,
    },
    /// More backends than a master entry can count.
    #[error("service {service} has {count} backends; at most 65535 are supported")]
    TooManyBackends {
        /// The service port.
        service: String,
        /// Its backend count.
        count: usize,
    },
    /// The options contradict each other.
    #[error("invalid eBPF backend options: {0}")]
    Options(String),
    /// The backend was cleaned up and can no longer sync.
    #[error("the eBPF backend was cleaned up")]
    CleanedUp,
}
