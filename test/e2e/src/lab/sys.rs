//! Low-level pieces of the lab: running commands with a hard timeout, entering a network namespace and a
//! cgroup in a child before `exec`, a spawner thread that owns every long-lived child, cgroup2/bpffs
//! detection, and removal of what crashed runs left behind.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Every lab object (netns, cgroup, bpffs directory) is named `kplab-<pid>x<seq>...`, so leftovers of a
/// dead process can be recognised and removed.
pub const PREFIX: &str = "kplab-";

/// Where `ip netns add` puts its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// The bpffs mount the lab puts its pin directories under.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Default bound of one `ip`/`sysctl` invocation.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a child process should live: a network namespace file and/or a cgroup2 directory.
#[derive(Debug, Clone, Default)]
pub struct Enter {
    /// `/run/netns/<name>`.
    pub netns: Option<PathBuf>,
    /// A cgroup2 directory the child joins before `exec` (so every socket it makes is load balanced).
    pub cgroup: Option<PathBuf>,
}

/// Makes `cmd`'s child join `enter`'s namespace and cgroup, start its own process group (a Ctrl-C at the
/// terminal reaches only the driver, which then tears down in order) and die with the thread that forks it.
pub fn prepare(cmd: &mut Command, enter: &Enter) -> Result<()> {
    // Opened here, not in the child: between fork and exec only async-signal-safe calls are allowed.
    let ns = match &enter.netns {
        Some(p) => Some(File::open(p).with_context(|| format!("opening netns {}", p.display()))?),
        None => None,
    };
    let cg = match &enter.cgroup {
        Some(dir) => {
            let procs = dir.join("cgroup.procs");
            Some(OpenOptions::new().write(true).open(&procs).with_context(|| format!("opening {}", procs.display()))?)
        }
        None => None,
    };
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let hook = move || -> std::io::Result<()> {
        // SAFETY: only raw syscalls on fds this closure owns; no allocation, no locks.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The forking thread may already be gone; then PDEATHSIG never fires, so do not start at all.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(f) = &ns
                && libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            if let Some(f) = &cg
                && libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe syscalls (see above).
    unsafe { cmd.pre_exec(hook) };
    Ok(())
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// A thread that forks every lab child. Children die (PDEATHSIG) when the forking *thread* ends, so the
/// forks happen on one thread that lives exactly as long as the lab, whatever thread the caller uses.
pub struct Spawner {
    tx: Mutex<Option<mpsc::Sender<SpawnJob>>>,
    thread: Option<JoinHandle<()>>,
}

impl Spawner {
    /// Starts the spawner thread.
    pub fn new() -> Result<Spawner> {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let thread = std::thread::Builder::new()
            .name("lab-spawner".into())
            .spawn(move || {
                // Ends when the Spawner drops its sender.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .context("spawning the lab spawner thread")?;
        Ok(Spawner { tx: Mutex::new(Some(tx)), thread: Some(thread) })
    }

    /// Spawns `cmd` from the spawner thread.
    pub fn spawn(&self, cmd: Command) -> Result<Child> {
        let what = describe(&cmd);
        let (reply_tx, reply_rx) = mpsc::channel();
        {
            let guard = self.tx.lock().map_err(|_| anyhow!("spawner lock poisoned"))?;
            let tx = guard.as_ref().ok_or_else(|| anyhow!("spawner stopped"))?;
            tx.send((cmd, reply_tx)).map_err(|_| anyhow!("spawner thread gone"))?;
        }
        let child = reply_rx.recv_timeout(CMD_TIMEOUT).map_err(|_| anyhow!("spawner did not answer for {what}"))?;
        child.with_context(|| format!("spawning {what}"))
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `program arg arg ...` for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Waits for `child` up to `timeout`, collecting its output; kills it (SIGKILL) when time runs out.
pub fn collect(mut child: Child, what: &str, timeout: Duration) -> Result<Output> {
    // Readers on their own threads so a chatty child never blocks on a full pipe while we poll.
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().with_context(|| format!("waiting for {what}"))? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!("{what}: timed out after {timeout:?}; stderr: {}", String::from_utf8_lossy(&stderr).trim());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    Ok(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// Runs `program args` (in `enter`, bounded by `timeout`) and fails unless it exits 0.
pub fn run_checked(spawner: Option<&Spawner>, enter: &Enter, program: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = describe(&cmd);
    if enter.netns.is_some() || enter.cgroup.is_some() {
        prepare(&mut cmd, enter)?;
    }
    let child = match spawner {
        Some(s) => s.spawn(cmd)?,
        None => cmd.spawn().with_context(|| format!("spawning {what}"))?,
    };
    let out = collect(child, &what, CMD_TIMEOUT)?;
    if !out.status.success() {
        bail!("`{what}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// `ip ARGS` in the host's mount namespace; every lab `ip` command names its namespace with `-n`.
pub fn ip(args: &[&str]) -> Result<()> {
    run_checked(None, &Enter::default(), "ip", args).map(|_| ())
}

/// Runs `f` on a fresh thread that first joins network namespace `netns` (a file); sockets made there keep
/// that namespace, and so do threads that `f` starts.
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let shown = netns.display().to_string();
    std::thread::Builder::new()
        .name("lab-netns".into())
        .spawn(move || {
            // SAFETY: valid fd; setns(CLONE_NEWNET) only affects this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow!("setns {shown}: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .context("spawning a netns thread")?
        .join()
        .map_err(|_| anyhow!("thread in netns {} panicked", netns.display()))?
}

/// The first cgroup2 mount point in /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    mount_of_type("cgroup2")?.ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mountinfo"))
}

/// Whether /sys/fs/bpf is a mounted bpffs.
pub fn bpffs_mounted() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    mounts(&info).any(|(point, fstype)| fstype == "bpf" && point == Path::new(BPFFS))
}

fn mount_of_type(ty: &str) -> Result<Option<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mounts(&info).find(|(_, fstype)| fstype == ty).map(|(p, _)| p))
}

/// `(mount point, fs type)` of each mountinfo line.
fn mounts(info: &str) -> impl Iterator<Item = (PathBuf, String)> + '_ {
    info.lines().filter_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let point = pre.split(' ').nth(4)?;
        let fstype = post.split(' ').next()?;
        Some((PathBuf::from(unescape_mount(point)), fstype.to_string()))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why this machine cannot run a lab, if it cannot.
pub fn skip_reason() -> Option<String> {
    if !crate::is_root() {
        return Some("not root (needs CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN and cgroup writes)".into());
    }
    if let Err(e) = cgroup2_mount() {
        return Some(format!("no cgroup2 mount: {e}"));
    }
    if !bpffs_mounted() {
        return Some(format!("{BPFFS} is not a mounted bpffs"));
    }
    if Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().map_or(true, |s| !s.success())
    {
        return Some("iproute2 `ip` not found".into());
    }
    None
}

/// The owner pid encoded in a lab object name (`kplab-<pid>x...`).
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

/// Whether a process with this pid exists and is not a zombie (a killed lab owner whose parent does not
/// reap it stays a zombie, yet its lab is abandoned).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may itself contain ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Names of existing network namespaces (from /run/netns).
pub fn netns_names() -> BTreeSet<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Lab-prefixed entries of `dir`.
pub fn lab_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in network namespace `name` (`ip netns pids`).
pub fn kill_netns_pids(name: &str) {
    if let Ok(out) = run_checked(None, &Enter::default(), "ip", &["netns", "pids", name]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Every directory of a cgroup subtree, deepest first.
pub fn cgroup_dirs_deepest_first(root: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    // Bounded: a lab has a few hundred cgroups at most.
    while let Some(d) = stack.pop() {
        if all.len() > 100_000 {
            break;
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.filter_map(|e| e.ok()) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        all.push(d);
    }
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    all
}

/// Kills every process in a cgroup subtree, then removes its directories deepest first (bounded wait for
/// the processes to leave).
pub fn remove_cgroup_tree(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let dirs = cgroup_dirs_deepest_first(root);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut busy = false;
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                busy = true;
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if !busy || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut failed = Vec::new();
    for d in &dirs {
        // A just-killed process can hold the directory for a moment: retry a few times.
        let mut last = None;
        for _ in 0..50 {
            match std::fs::remove_dir(d) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(e) = last {
            failed.push(format!("rmdir {}: {e}", d.display()));
        }
    }
    if failed.is_empty() { Ok(()) } else { bail!("{}", failed.join("; ")) }
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone)]
pub struct StaleReport {
    /// Network namespaces deleted.
    pub netns: Vec<String>,
    /// cgroup subtrees removed.
    pub cgroups: Vec<PathBuf>,
    /// bpffs pin directories removed.
    pub pins: Vec<PathBuf>,
}

impl StaleReport {
    /// Whether nothing was left over.
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.cgroups.is_empty() && self.pins.is_empty()
    }
}

/// Removes lab namespaces, cgroups and pins whose owner process is dead: processes first, then pins (which
/// detaches the programs, attached only through pinned links), then cgroups, then namespaces.
pub fn cleanup_stale() -> Result<StaleReport> {
    let stale = |name: &str| owner_pid(name).is_some_and(|p| !pid_alive(p));
    let mut report = StaleReport::default();
    let ns: Vec<String> = netns_names().into_iter().filter(|n| stale(n)).collect();
    for n in &ns {
        kill_netns_pids(n);
    }
    let mut errors = Vec::new();
    for dir in lab_entries(Path::new(BPFFS)) {
        if stale(&dir.file_name().unwrap_or_default().to_string_lossy()) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => report.pins.push(dir),
                Err(e) => errors.push(format!("rm -r {}: {e}", dir.display())),
            }
        }
    }
    if let Ok(cg) = cgroup2_mount() {
        for dir in lab_entries(&cg) {
            if stale(&dir.file_name().unwrap_or_default().to_string_lossy()) {
                match remove_cgroup_tree(&dir) {
                    Ok(()) => report.cgroups.push(dir),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
    }
    for n in ns {
        match ip(&["netns", "del", &n]) {
            Ok(()) => report.netns.push(n),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if errors.is_empty() { Ok(report) } else { bail!("stale lab cleanup: {}", errors.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_and_owner() {
        let info = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    42 23 0:39 / /sys/fs/b\\040pf rw,relatime - bpf bpf rw\n";
        let m: Vec<_> = mounts(info).collect();
        assert_eq!(m[0], (PathBuf::from("/sys/fs/cgroup/unified"), "cgroup2".to_string()));
        assert_eq!(m[1].0, PathBuf::from("/sys/fs/b pf"));
        assert_eq!(owner_pid("kplab-123x4-n0"), Some(123));
        assert_eq!(owner_pid("other-123x4"), None);
    }
}
