//! Helpers shared by the end-to-end suites: running the real `kube-proxy` binary, plain HTTP probes of its
//! servers, bounded waiting, and object builders for the test API server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Reports a skipped test: printed, and appended to the file named by `KP_SKIP_LOG` (hack/test.sh sets it and
/// prints the file at the end, because the test runner hides the output of tests that pass).
pub fn note_skip(line: &str) {
    println!("SKIP {line}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "SKIP {line}");
        }
    }
}

/// The variable naming the file skipped tests are listed in.
pub const SKIP_LOG_ENV: &str = "KP_SKIP_LOG";

/// `skip!("{test}: {reason}")`: [`note_skip`] with `format!` arguments.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => { $crate::note_skip(&format!($($arg)*)) };
}

pub mod bench;
pub mod lab;
pub mod objects;

/// The `kube-proxy` binary next to the test executable (`target/<profile>/kube-proxy`).
pub fn kube_proxy_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test executables live in target/<profile>/deps/.
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("kube-proxy");
    assert!(bin.exists(), "{} missing: run `cargo build --bins` first (hack/test.sh does)", bin.display());
    bin
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body text.
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; `None` when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<Vec<_>>();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Some(HttpResponse { status, headers, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the first sample line of `metric` whose labels contain every `labels` pair, from `/metrics` text.
pub fn metric_value(metrics: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name_labels, value) = l.rsplit_once(' ')?;
        let (name, lbl) = match name_labels.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (name_labels, ""),
        };
        if name != metric {
            return None;
        }
        let ok = labels.iter().all(|(k, v)| lbl.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        if ok { value.parse().ok() } else { None }
    })
}

/// A running `kube-proxy`; killed (SIGKILL) when dropped. Its stderr goes to a file kept for failure output.
pub struct ProxyProcess {
    child: Child,
    /// The stderr log file.
    pub log: PathBuf,
}

impl ProxyProcess {
    /// Starts the binary with `args` and `envs`, logging to `log`.
    pub fn start(args: &[String], envs: &[(&str, String)], log: &Path) -> ProxyProcess {
        let file = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new(kube_proxy_bin());
        cmd.args(args).stdout(Stdio::null()).stderr(file).env("RUST_LOG", "debug,kube=info,tower=info,hyper=info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn kube-proxy");
        ProxyProcess { child, log: log.to_path_buf() }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || self.try_exit())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- kube-proxy log ({}) ---\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Reads the recording backend's file: one JSON object per sync.
pub fn read_syncs(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The process's resident set size in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Whether the tests run as root (datapath suites need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
