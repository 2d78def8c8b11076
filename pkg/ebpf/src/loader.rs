//! Loading, pinning, attaching and adopting the kernel programs; the `Backend` impl.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use ebpf_common::{LAYOUT_VERSION, map_names, program_names};
use proxier::backend::{Backend, BackendError, SyncReport};
use proxier::model::{Changes, IpFamily, ServicePortName, Snapshot};
use tracing::{info, warn};

use crate::EbpfError;
use crate::ct::{CtMap, CtStats, GcReport, GcThread, monotonic_ns};
use crate::maps::AyaMaps;
use crate::metrics::EbpfCollector;
use crate::names::{NamePublisher, ServiceNameTable};
use crate::pods::{self, PodDevice, PodWatcher};
use crate::socklb::{self, SocketLbScope};
use crate::sys;
use crate::tc::{NodeDevice, TcAttachMode, TcManager};
use crate::writer::{MapWriter, ServiceCounterSample};

/// The kernel object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kube-proxy-sock"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BACKEND_NAME: &str = "ebpf";

/// What to do with programs already attached through pinned links (a restarted proxy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProgramUpdate {
    /// Swap the new programs into the existing links (`BPF_LINK_UPDATE`): atomic, no window.
    #[default]
    Replace,
    /// Leave the running programs in place (e.g. when only the control plane was restarted).
    Keep,
}

/// Options of [`EbpfBackend::new`].
#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// The cgroup v2 directory the socket programs attach to (every process below it is load balanced).
    pub cgroup_root: PathBuf,
    /// The directory on bpffs that holds this proxy's pins; the layout version is appended to it.
    pub bpffs_root: PathBuf,
    /// The families this node programs.
    pub families: Vec<IpFamily>,
    /// What to do with programs of a previous run that are still attached.
    pub program_update: ProgramUpdate,
    /// Attach the north-south tc programs to the node devices (those carrying the snapshot's node
    /// addresses). Default: on.
    pub north_south: bool,
    /// The network namespace whose devices get the tc programs (a `/run/netns/…` or `/proc/…/ns/net`
    /// file); `None`: the namespace of the thread calling [`EbpfBackend::new`].
    pub tc_netns: Option<PathBuf>,
    /// Capacity of the conntrack map (two entries per flow). Only applies when the map is created: a
    /// pinned map is adopted with its size. Default [`ebpf_common::CT_MAX_ENTRIES`].
    pub ct_max_entries: u32,
    /// A fixed conntrack GC interval; `None`: adaptive (see `ct.rs`).
    pub ct_gc_interval: Option<Duration>,
    /// Which sockets the cgroup programs translate; other than `All`, pod-facing devices get the per-packet
    /// path (needs `north_south`). Default `All`.
    pub socket_lb_scope: SocketLbScope,
    /// How the tc programs attach (tcx links or clsact filters). Default `Auto`: the
    /// `KUBE_PROXY_RS_TC_ATTACH` environment variable when set, else tcx where the kernel has it.
    pub tc_attach: TcAttachMode,
}

impl EbpfOptions {
    /// Options with the given paths and families, replacing programs of a previous run.
    pub fn new(cgroup_root: impl Into<PathBuf>, bpffs_root: impl Into<PathBuf>, families: Vec<IpFamily>) -> Self {
        EbpfOptions {
            cgroup_root: cgroup_root.into(),
            bpffs_root: bpffs_root.into(),
            families,
            program_update: ProgramUpdate::Replace,
            north_south: true,
            tc_netns: None,
            ct_max_entries: ebpf_common::CT_MAX_ENTRIES,
            ct_gc_interval: None,
            socket_lb_scope: SocketLbScope::All,
            tc_attach: TcAttachMode::Auto,
        }
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Io { what, source }
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast, reason = "f_type's integer type differs between libc targets")]
    Ok(st.f_type as i64)
}

/// Whether `path` (or, if it does not exist yet, its nearest existing ancestor) is on a bpffs.
pub fn bpffs_mounted(path: &Path) -> bool {
    let mut p = Some(path);
    // Bounded by the path depth.
    while let Some(cur) = p {
        if cur.exists() {
            return statfs_type(cur).map(|t| t == BPF_FS_MAGIC).unwrap_or(false);
        }
        p = cur.parent();
    }
    false
}

/// The mount point of the cgroup v2 filesystem, read from `/proc/self/mountinfo`.
pub fn detect_cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(io_err("reading /proc/self/mountinfo"))?;
    for line in info.lines() {
        // Fields: id parent maj:min root mountpoint options [optional...] - fstype source superopts
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        if post.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = pre.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mp.replace("\\040", " ")));
        }
    }
    Err(EbpfError::NoCgroup2Mount)
}

/// The hook each program attaches to is encoded in its ELF section; this only lists them.
const PROGRAMS: [&str; 8] = program_names::ALL;

/// The eBPF backend: loaded programs, pinned maps and links, and the map writer.
pub struct EbpfBackend {
    opts: EbpfOptions,
    inner: Option<Inner>,
}

struct Inner {
    writer: MapWriter<AyaMaps>,
    // Service id → name, shared with metrics collectors and pinned for kpctl.
    names: NamePublisher,
    // North-south: tc attachment and conntrack GC (None when disabled).
    tc: Option<TcManager>,
    // Pod-facing devices (socket-LB scope other than all).
    pods: Option<PodWatcher>,
    // How the tc programs are attached (resolved; None when north-south is disabled).
    tc_mode: Option<TcAttachMode>,
    ct_stats: Arc<CtStats>,
    // Dropped (stopped and joined) with the backend.
    _gc: Option<GcThread>,
    // Keeps the loaded programs' fds; the links (pinned) hold the programs attached independently.
    _ebpf: Ebpf,
}

impl EbpfBackend {
    /// Loads and attaches the programs, adopting pins of a previous run under `<bpffs_root>/v1/`.
    pub fn new(opts: EbpfOptions) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        if !bpffs_mounted(&opts.bpffs_root) {
            return Err(EbpfError::BpffsNotMounted { path: opts.bpffs_root.clone() });
        }
        if statfs_type(&opts.cgroup_root).ok() != Some(CGROUP2_SUPER_MAGIC) {
            return Err(EbpfError::NotCgroup2 { path: opts.cgroup_root.clone() });
        }
        let scope = opts.socket_lb_scope;
        if scope.per_packet_pods() && !opts.north_south {
            return Err(EbpfError::Options(format!(
                "socket-LB scope {scope} needs the tc programs (north_south): pods reach Services per packet"
            )));
        }
        let base = opts.bpffs_root.join(LAYOUT_VERSION);
        let maps_dir = base.join("maps");
        let links_dir = base.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }

        crate::pins::check_pinned_maps(OBJECT, &maps_dir)?;
        let pin_paths: Vec<(&'static str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, maps_dir.join(n))).collect();
        let adopting = pin_paths.iter().filter(|(_, p)| p.exists()).count();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map_names::CT, opts.ct_max_entries);
        for (name, path) in &pin_paths {
            // Reuses the pinned map when present; its shape was checked above.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf =
            loader.load(OBJECT).map_err(|e| EbpfError::Load { pin_dir: maps_dir.clone(), source: Box::new(e) })?;
        info!(pin_dir = %maps_dir.display(), adopted_maps = adopting, "loaded eBPF object");

        // The proxy's namespace: where devices are resolved and whose sockets are "the host's".
        let ns_path = opts.tc_netns.clone().unwrap_or_else(|| PathBuf::from("/proc/thread-self/ns/net"));
        let netns =
            fs::File::open(&ns_path).map_err(io_err(format!("opening network namespace {}", ns_path.display())))?;
        // The scope goes in before the cgroup programs are (re)attached, so they never run with a stale one.
        let host_cookie = match socklb::netns_cookie_of(&netns, &ns_path) {
            Ok(c) => c,
            Err(e) if scope == SocketLbScope::HostOnly => return Err(e),
            Err(e) => {
                warn!(error = %e, "netns cookie unavailable (only scope host-only needs it)");
                0
            }
        };
        // Borrowed, not taken: the programs still to be loaded refer to the map's fd.
        let cfg_map = ebpf
            .map_mut(map_names::SOCK_LB_CONFIG)
            .ok_or(EbpfError::Missing { kind: "map", name: map_names::SOCK_LB_CONFIG })?;
        socklb::write_config(cfg_map, scope, host_cookie)?;
        info!(scope = %scope, host_netns_cookie = host_cookie, "socket-LB scope");

        let cgroup = fs::File::open(&opts.cgroup_root)
            .map_err(io_err(format!("opening cgroup {}", opts.cgroup_root.display())))?;
        for name in PROGRAMS {
            attach_program(&mut ebpf, name, &cgroup, &links_dir, opts.program_update)?;
        }

        let tc_progs = if opts.north_south { Some(load_tc_programs(&mut ebpf)?) } else { None };
        let tc_mode = match &tc_progs {
            Some((ingress, _)) => {
                let m = opts.tc_attach.resolve(ingress)?;
                info!(mode = %m, requested = %opts.tc_attach, "tc attachment");
                Some(m)
            }
            None => None,
        };
        let pod_prog = if scope.per_packet_pods() {
            Some(load_classifier(&mut ebpf, program_names::TC_POD_INGRESS)?)
        } else {
            pods::remove_all(&links_dir, &netns)?;
            None
        };

        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(EbpfError::Missing { kind: "map", name });
        let maps = AyaMaps::new(
            take(map_names::SERVICES)?,
            take(map_names::BACKENDS)?,
            take(map_names::REV_NAT)?,
            take(map_names::COUNTERS)?,
            Some(take(map_names::SRC_RANGES)?),
        )?;
        let node_addrs = take(map_names::NODE_ADDRS)?;
        let ct_stats = Arc::new(CtStats::default());
        let pods = match pod_prog {
            Some(prog) => {
                let ns = netns.try_clone().map_err(io_err(format!("duplicating the fd of {}", ns_path.display())))?;
                let mode = tc_mode.unwrap_or_default();
                Some(PodWatcher::start(ns, &links_dir, prog, opts.program_update, mode)?)
            }
            None => None,
        };
        let (tc, gc) = match tc_progs {
            Some(progs) => {
                let mode = tc_mode.unwrap_or_default();
                let tc = TcManager::new(netns, &links_dir, progs, opts.program_update, node_addrs, mode)?;
                let gc = GcThread::start(CtMap::open(&opts.bpffs_root)?, ct_stats.clone(), opts.ct_gc_interval);
                (Some(tc), Some(gc))
            }
            None => (None, None),
        };
        let writer = MapWriter::adopt(maps)?;
        let names = NamePublisher::new(&maps_dir);
        info!(
            cgroup = %opts.cgroup_root.display(),
            adopted_services = writer.service_count(),
            "eBPF socket load balancer attached"
        );
        Ok(EbpfBackend {
            opts,
            inner: Some(Inner { writer, names, tc, pods, tc_mode, ct_stats, _gc: gc, _ebpf: ebpf }),
        })
    }

    /// The devices the north-south tc programs are attached to (empty before the first sync with node
    /// addresses, or when disabled).
    pub fn tc_devices(&self) -> Vec<NodeDevice> {
        self.inner.as_ref().and_then(|i| i.tc.as_ref()).map(TcManager::devices).unwrap_or_default()
    }

    /// The pod-facing devices carrying the per-packet program (empty under socket-LB scope `all`, and until
    /// the first sync with node addresses).
    pub fn pod_devices(&self) -> Vec<PodDevice> {
        self.inner.as_ref().and_then(|i| i.pods.as_ref()).map(PodWatcher::devices).unwrap_or_default()
    }

    /// How the tc programs are attached (`Tcx` or `Clsact`, resolved at start-up); `None` without them.
    pub fn tc_attach_mode(&self) -> Option<TcAttachMode> {
        self.inner.as_ref().and_then(|i| i.tc_mode)
    }

    /// The conntrack GC's statistics (shared with [`EbpfBackend::metrics_collector`]).
    pub fn ct_stats(&self) -> Option<Arc<CtStats>> {
        self.inner.as_ref().map(|i| i.ct_stats.clone())
    }

    /// Runs one conntrack GC pass now, as if `ahead` more time had passed (tests age flows this way).
    pub fn run_ct_gc(&self, ahead: Duration) -> Result<GcReport, EbpfError> {
        let mut map = CtMap::open(&self.opts.bpffs_root)?;
        map.gc_pass(monotonic_ns() + ahead.as_nanos() as u64)
    }

    /// The options this backend was created with.
    pub fn options(&self) -> &EbpfOptions {
        &self.opts
    }

    /// Per-service BPF counters (translated connections, no-endpoint rejects), for Prometheus export.
    pub fn service_counters(&self) -> Result<Vec<ServiceCounterSample>, EbpfError> {
        self.inner.as_ref().ok_or(EbpfError::CleanedUp)?.writer.counters()
    }

    /// The service id → service port name table, kept current by every sync.
    pub fn service_names(&self) -> Result<ServiceNameTable, EbpfError> {
        Ok(self.inner.as_ref().ok_or(EbpfError::CleanedUp)?.names.table())
    }

    /// A Prometheus collector reading this backend's BPF counters and map statistics at scrape time.
    ///
    /// It holds its own handles to the pinned maps and shares the name table, so it can be registered
    /// before the backend moves into the sync runner and keeps working while the runner syncs.
    pub fn metrics_collector(&self) -> Result<EbpfCollector, EbpfError> {
        let c = EbpfCollector::from_pins(&self.opts.bpffs_root, self.service_names()?)?;
        Ok(match self.ct_stats() {
            Some(stats) if self.opts.north_south => c.with_conntrack(stats),
            _ => c,
        })
    }

    /// The service id (reverse-NAT index) of a programmed service port.
    pub fn service_id(&self, family: IpFamily, name: &ServicePortName) -> Option<u32> {
        self.inner.as_ref()?.writer.service_id(family, name)
    }

    /// Detaches everything and removes every pin under `bpffs_root` (all layout versions): for `--cleanup`.
    ///
    /// Programs are attached to `cgroup_root` only through bpf_links that are pinned right after
    /// attaching (an unpinned link dies with the process that made it), so removing the link pins
    /// detaches them once no process holds a link open; bpffs releases the link after an RCU grace period,
    /// so the detach becomes visible a moment after this returns.
    pub fn cleanup_all(bpffs_root: &Path, cgroup_root: &Path) -> Result<(), EbpfError> {
        if !bpffs_root.exists() {
            return Ok(());
        }
        let versions = fs::read_dir(bpffs_root).map_err(io_err(format!("listing {}", bpffs_root.display())))?;
        for v in versions {
            let v = v.map_err(io_err(format!("listing {}", bpffs_root.display())))?.path();
            if !v.is_dir() {
                continue;
            }
            // Links first (detach), then maps.
            for sub in ["links", "maps"] {
                let dir = v.join(sub);
                if !dir.exists() {
                    continue;
                }
                for entry in fs::read_dir(&dir).map_err(io_err(format!("listing {}", dir.display())))? {
                    let p = entry.map_err(io_err(format!("listing {}", dir.display())))?.path();
                    fs::remove_file(&p).map_err(io_err(format!("removing pin {}", p.display())))?;
                }
                fs::remove_dir(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
            }
            fs::remove_dir(&v).map_err(io_err(format!("removing {}", v.display())))?;
        }
        // The root may be shared (or be bpffs itself): leaving it behind is harmless.
        if let Err(e) = fs::remove_dir(bpffs_root) {
            warn!(path = %bpffs_root.display(), error = %e, "bpffs root not removed");
        }
        info!(bpffs = %bpffs_root.display(), cgroup = %cgroup_root.display(), "removed eBPF pins");
        Ok(())
    }

    /// Removes our clsact filters (priority [`crate::CLSACT_PRIORITY`], our handles and program names) from
    /// every device of the network namespace `netns` (a `/proc/…/ns/net` or `/run/netns/…` file), and the
    /// clsact qdisc of a device that is left without any filter: for `--cleanup`, next to
    /// [`EbpfBackend::cleanup_all`] (netlink filters have no pin). Returns `device/hook` of each filter
    /// removed. Filters of other tools, and their qdiscs, stay.
    pub fn cleanup_tc_filters(netns: &Path) -> Result<Vec<String>, EbpfError> {
        let ns = fs::File::open(netns).map_err(io_err(format!("opening network namespace {}", netns.display())))?;
        let removed = sys::in_netns(&ns, crate::tc::clsact_remove_all)
            .and_then(|r| r)
            .map_err(io_err(format!("removing our tc filters in {}", netns.display())))?;
        if !removed.is_empty() {
            info!(netns = %netns.display(), filters = ?removed, "removed clsact tc filters");
        }
        Ok(removed)
    }
}

/// Loads one program and makes sure it runs on the cgroup through a pinned link.
fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    links_dir: &Path,
    update: ProgramUpdate,
) -> Result<(), EbpfError> {
    let link_pin = links_dir.join(name);
    let existing = if link_pin.exists() {
        match sys::obj_get(&link_pin) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(pin = %link_pin.display(), error = %e, "unusable link pin; re-attaching");
                fs::remove_file(&link_pin).map_err(io_err(format!("removing {}", link_pin.display())))?;
                None
            }
        }
    } else {
        None
    };
    if existing.is_some() && update == ProgramUpdate::Keep {
        info!(program = name, "keeping the attached program of the previous run");
        return Ok(());
    }

    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(EbpfError::Missing { kind: "program", name })?
        .try_into()
        .map_err(|e| EbpfError::Program { name, action: "load", source: Box::new(e) })?;
    prog.load().map_err(|e| EbpfError::Program { name, action: "load", source: Box::new(e) })?;

    if let Some(link_fd) = existing {
        let prog_fd = prog.fd().map_err(|e| EbpfError::Program { name, action: "load", source: Box::new(e) })?;
        match sys::link_update(link_fd.as_fd(), prog_fd.as_fd()) {
            Ok(()) => {
                info!(program = name, "replaced program in pinned link");
                return Ok(());
            }
            Err(e) => {
                // E.g. ENOLINK: the cgroup the link pointed at is gone. Start over with a fresh link.
                warn!(program = name, error = %e, "pinned link cannot be updated; re-attaching");
                fs::remove_file(&link_pin).map_err(io_err(format!("removing {}", link_pin.display())))?;
            }
        }
    }
    let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(|e| EbpfError::Program {
        name,
        action: "attach",
        source: Box::new(e),
    })?;
    let link = prog.take_link(id).map_err(|e| EbpfError::Program { name, action: "take link", source: Box::new(e) })?;
    let fd_link = FdLink::try_from(link).map_err(|e| EbpfError::Link { name, source: Box::new(e) })?;
    // The pin keeps the program attached after this process exits; dropping our fd does not detach.
    let _pinned =
        fd_link.pin(&link_pin).map_err(|e| EbpfError::Pin { name, path: link_pin.clone(), source: Box::new(e) })?;
    info!(program = name, pin = %link_pin.display(), "attached and pinned");
    Ok(())
}

/// Loads one tc program; returns an owned fd for attaching on any thread.
fn load_classifier(ebpf: &mut Ebpf, name: &'static str) -> Result<std::os::fd::OwnedFd, EbpfError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(EbpfError::Missing { kind: "program", name })?
        .try_into()
        .map_err(|e| EbpfError::Program { name, action: "load", source: Box::new(e) })?;
    prog.load().map_err(|e| EbpfError::Program { name, action: "load", source: Box::new(e) })?;
    let fd = prog.fd().map_err(|e| EbpfError::Program { name, action: "load", source: Box::new(e) })?;
    fd.as_fd().try_clone_to_owned().map_err(io_err(format!("duplicating the fd of program {name}")))
}

/// Loads the two node-device tc programs; returns owned fds of (ingress, egress).
fn load_tc_programs(ebpf: &mut Ebpf) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), EbpfError> {
    Ok((load_classifier(ebpf, program_names::TC_INGRESS)?, load_classifier(ebpf, program_names::TC_EGRESS)?))
}

fn backend_err(e: EbpfError) -> BackendError {
    BackendError::with_source(BACKEND_NAME, e.to_string(), e)
}

impl Backend for EbpfBackend {
    fn name(&self) -> &'static str {
        BACKEND_NAME
    }

    fn families(&self) -> &[IpFamily] {
        &self.opts.families
    }

    fn sync(&mut self, snapshot: &Snapshot, changes: &Changes) -> Result<SyncReport, BackendError> {
        let inner = self.inner.as_mut().ok_or_else(|| backend_err(EbpfError::CleanedUp))?;
        let result = inner.writer.sync(&self.opts.families, snapshot, changes).map_err(backend_err);
        if let Some(tc) = inner.tc.as_mut() {
            match tc.reconcile(&snapshot.node.addresses, changes.full) {
                // The pod watcher attaches to every other device once it knows these.
                Ok(()) => {
                    if let Some(p) = inner.pods.as_ref() {
                        p.set_node_devices(tc.devices().iter().map(|d| d.ifindex));
                    }
                }
                // Services stay programmed for the socket LB; the next sync retries the attachment.
                Err(e) => warn!(error = %e, "attaching the north-south tc programs failed"),
            }
        }
        // Also after a failed sync: the names follow whatever ids the writer holds now.
        inner.names.publish(&inner.writer, changes);
        result
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        let clsact = self.tc_attach_mode() == Some(TcAttachMode::Clsact);
        // Drop our fds first so removing the pins really detaches.
        self.inner = None;
        // Filters have no pin; only a backend that attached some looks for them (the tcx path has none).
        if clsact {
            let ns = self.opts.tc_netns.clone().unwrap_or_else(|| PathBuf::from("/proc/thread-self/ns/net"));
            EbpfBackend::cleanup_tc_filters(&ns).map_err(backend_err)?;
        }
        EbpfBackend::cleanup_all(&self.opts.bpffs_root, &self.opts.cgroup_root).map_err(backend_err)
    }
}
