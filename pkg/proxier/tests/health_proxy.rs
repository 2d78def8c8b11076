//! The proxier health state machine and its `/healthz` + `/livez` server, over real HTTP on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxier::healthcheck::{
    FakeClock, HealthServerError, NodeState, ProxyHealth, go_rfc3339_nano, serve_proxy_health, serve_proxy_health_on,
};
use proxier::metrics::Metrics;
use proxier::model::IpFamily;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const SYNC_PERIOD: Duration = Duration::from_secs(30);
/// 2026-07-21T10:00:05Z.
const NOW_SECS: u64 = 1_784_628_005;

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends one request with `Connection: close` and reads the whole response, bounded by 5 s.
async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<HttpResponse> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = timeout(Duration::from_secs(5), io).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    let text = String::from_utf8(buf).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers =
        lines.map(|l| l.split_once(": ").unwrap()).map(|(n, v)| (n.to_ascii_lowercase(), v.to_string())).collect();
    Ok(HttpResponse { status, headers, body: body.to_string() })
}

fn counter(metrics: &Metrics, name: &str, code: u16) -> u64 {
    let needle = format!("{name}{{code=\"{code}\"}} ");
    metrics.encode().lines().find_map(|l| l.strip_prefix(needle.as_str()).map(|v| v.parse().unwrap())).unwrap_or(0)
}

/// Serves `health` on an ephemeral 127.0.0.1 port.
async fn start(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_proxy_health_on(listener, health, metrics));
    addr
}

#[test]
fn go_time_format() {
    let cases = [
        (UNIX_EPOCH, "1970-01-01T00:00:00Z"),
        (at(NOW_SECS, 123_456_789), "2026-07-21T10:00:05.123456789Z"),
        (at(NOW_SECS - 7, 100_000_000), "2026-07-21T09:59:58.1Z"),
        (at(NOW_SECS, 120_000), "2026-07-21T10:00:05.00012Z"),
        (at(951_868_799, 0), "2000-02-29T23:59:59Z"),
        (at(4_107_542_400, 1), "2100-03-01T00:00:00.000000001Z"),
        (UNIX_EPOCH - Duration::from_millis(500), "1969-12-31T23:59:59.5Z"),
    ];
    for (t, want) in cases {
        assert_eq!(go_rfc3339_nano(t), want);
    }
}

/// One step of a scenario: what happens, then what `/healthz` and `/livez` must answer.
enum Step {
    Advance(u64),
    SyncLoopStarted,
    Queued(IpFamily),
    Updated(IpFamily),
    Node(Option<NodeState>),
}

/// (name, families, steps, healthy (livez), node eligible)
type Case = (&'static str, Vec<IpFamily>, Vec<Step>, bool, bool);

#[test]
fn health_rules() {
    use IpFamily::{V4, V6};
    use Step::*;
    let eligible = Some(NodeState::default());
    let cases: Vec<Case> = vec![
        ("never synced, node unseen", vec![V4], vec![], true, false),
        ("never synced, node eligible", vec![V4], vec![Node(eligible)], true, true),
        ("sync loop started", vec![V4], vec![Node(eligible), SyncLoopStarted], true, true),
        (
            "pending younger than timeout",
            vec![V4],
            vec![Node(eligible), SyncLoopStarted, Queued(V4), Advance(59)],
            true,
            true,
        ),
        (
            "pending exactly the timeout",
            vec![V4],
            vec![Node(eligible), SyncLoopStarted, Queued(V4), Advance(60)],
            false,
            true,
        ),
        (
            "only the oldest pending counts",
            vec![V4],
            vec![Node(eligible), SyncLoopStarted, Queued(V4), Advance(50), Queued(V4), Advance(15)],
            false,
            true,
        ),
        (
            "updated clears pending",
            vec![V4],
            vec![Node(eligible), SyncLoopStarted, Queued(V4), Advance(59), Updated(V4), Advance(120)],
            true,
            true,
        ),
        (
            "queued before the first update is not tracked",
            vec![V4],
            vec![Node(eligible), Queued(V4), Advance(600)],
            true,
            true,
        ),
        (
            "node being deleted",
            vec![V4],
            vec![Node(Some(NodeState { deletion_timestamp: true, to_be_deleted_taint: false })), SyncLoopStarted],
            true,
            false,
        ),
        (
            "node tainted by the autoscaler",
            vec![V4],
            vec![Node(Some(NodeState { deletion_timestamp: false, to_be_deleted_taint: true })), SyncLoopStarted],
            true,
            false,
        ),
        ("node deleted", vec![V4], vec![Node(eligible), SyncLoopStarted, Node(None)], true, false),
        (
            "dual-stack, IPv6 stale",
            vec![V4, V6],
            vec![Node(eligible), SyncLoopStarted, Queued(V4), Queued(V6), Advance(30), Updated(V4), Advance(30)],
            false,
            true,
        ),
        (
            "dual-stack, both fresh",
            vec![V4, V6],
            vec![Node(eligible), SyncLoopStarted, Queued(V6), Advance(30), Updated(V6), Queued(V4), Advance(30)],
            true,
            true,
        ),
    ];

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (name, families, steps, want_healthy, want_eligible) in cases {
        let clock = Arc::new(FakeClock::new(at(NOW_SECS, 0)));
        let health = Arc::new(ProxyHealth::with_clock(&families, SYNC_PERIOD, clock.clone()));
        assert_eq!(health.health_timeout(), Duration::from_secs(60));
        for step in steps {
            match step {
                Advance(s) => clock.advance(Duration::from_secs(s)),
                SyncLoopStarted => health.sync_loop_started(),
                Queued(f) => health.queued_update(f),
                Updated(f) => health.updated(f),
                Node(n) => health.set_node(n),
            }
        }
        assert_eq!(health.is_healthy(), want_healthy, "{name}: is_healthy");
        assert_eq!(health.node_eligible(), want_eligible, "{name}: node_eligible");

        let metrics = Metrics::new("iptables");
        let (healthz, livez) = rt.block_on(async {
            let addr = start(health.clone(), metrics.clone()).await;
            (request(addr, "GET", "/healthz").await.unwrap(), request(addr, "GET", "/livez").await.unwrap())
        });
        let code = |ok: bool| if ok { 200 } else { 503 };
        assert_eq!(healthz.status, code(want_healthy && want_eligible), "{name}: /healthz");
        assert_eq!(livez.status, code(want_healthy), "{name}: /livez");
        assert!(healthz.body.contains(&format!("\"nodeEligible\":{want_eligible}")), "{name}: {}", healthz.body);
        assert!(!livez.body.contains("nodeEligible"), "{name}: {}", livez.body);
    }
}

#[test]
fn dual_stack_status_reports_the_stale_family() {
    let clock = Arc::new(FakeClock::new(at(NOW_SECS, 0)));
    let health = ProxyHealth::with_clock(&[IpFamily::V4, IpFamily::V6], SYNC_PERIOD, clock.clone());
    health.sync_loop_started();
    health.queued_update(IpFamily::V6);
    clock.advance(Duration::from_secs(61));
    health.updated(IpFamily::V4);
    let h = health.health();
    assert!(!h.healthy);
    assert!(h.status[&IpFamily::V4].healthy);
    assert!(!h.status[&IpFamily::V6].healthy);
    assert_eq!(h.last_updated, Some(at(NOW_SECS + 61, 0)));
    assert_eq!(h.status[&IpFamily::V6].last_updated, at(NOW_SECS, 0));
}

#[tokio::test]
async fn exact_bodies_headers_and_counters() {
    let clock = Arc::new(FakeClock::new(at(NOW_SECS - 7, 100_000_000)));
    let health = Arc::new(ProxyHealth::with_clock(&[IpFamily::V4, IpFamily::V6], SYNC_PERIOD, clock.clone()));
    let metrics = Metrics::new("iptables");
    let addr = start(health.clone(), metrics.clone()).await;
    let now = "2026-07-21T10:00:05.123456789Z";

    // Never synced, Node not seen yet: /healthz 503 with Go's zero time, /livez 200.
    clock.set(at(NOW_SECS, 123_456_789));
    let r = request(addr, "GET", "/healthz").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        format!(
            r#"{{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"{now}","nodeEligible":false,"healthy":true}}"#
        )
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()));
    let r = request(addr, "GET", "/livez").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!(r#"{{"lastUpdated":"{now}","currentTime":"{now}","healthy":true}}"#));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));

    // Synced both families (at different times), Node eligible: the reference example.
    clock.set(at(NOW_SECS - 7, 100_000_000));
    health.updated(IpFamily::V4);
    clock.set(at(NOW_SECS - 7, 200_000_000));
    health.updated(IpFamily::V6);
    health.set_node_eligible(true);
    clock.set(at(NOW_SECS, 123_456_789));
    let r = request(addr, "POST", "/healthz").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        format!(
            r#"{{"lastUpdated":"{now}","currentTime":"{now}","nodeEligible":true,"healthy":true,"status":{{"IPv4":{{"lastUpdated":"2026-07-21T09:59:58.1Z","healthy":true}},"IPv6":{{"lastUpdated":"2026-07-21T09:59:58.2Z","healthy":true}}}}}}"#
        )
    );

    // IPv6 change pending for the whole timeout: both 503, real last update at the top level.
    health.queued_update(IpFamily::V6);
    clock.advance(Duration::from_secs(60));
    let later = "2026-07-21T10:01:05.123456789Z";
    let r = request(addr, "GET", "/livez").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        format!(
            r#"{{"lastUpdated":"2026-07-21T09:59:58.2Z","currentTime":"{later}","healthy":false,"status":{{"IPv4":{{"lastUpdated":"2026-07-21T09:59:58.1Z","healthy":true}},"IPv6":{{"lastUpdated":"2026-07-21T09:59:58.2Z","healthy":false}}}}}}"#
        )
    );
    assert_eq!(request(addr, "GET", "/healthz").await.unwrap().status, 503);

    // Other paths are Go's 404 and count nowhere.
    for path in ["/", "/healthz/", "/metrics", "/livez/x"] {
        let r = request(addr, "GET", path).await.unwrap();
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.body, "404 page not found\n");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    }
    // A query string does not change the path.
    assert_eq!(request(addr, "GET", "/livez?verbose").await.unwrap().status, 503);

    assert_eq!(counter(&metrics, "kubeproxy_proxy_healthz_total", 200), 1);
    assert_eq!(counter(&metrics, "kubeproxy_proxy_healthz_total", 503), 2);
    assert_eq!(counter(&metrics, "kubeproxy_proxy_livez_total", 200), 1);
    assert_eq!(counter(&metrics, "kubeproxy_proxy_livez_total", 503), 2);

    // HEAD counts too and gets no body.
    let r = request(addr, "HEAD", "/livez").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "");
    assert_eq!(counter(&metrics, "kubeproxy_proxy_livez_total", 503), 3);
}

#[tokio::test]
async fn keep_alive_connection_serves_several_requests() {
    let health = Arc::new(ProxyHealth::new(&[IpFamily::V4], SYNC_PERIOD));
    let metrics = Metrics::new("ebpf");
    let addr = start(health, metrics.clone()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /livez HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(format!("{req}{req}").as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    timeout(Duration::from_secs(5), async {
        while seen.matches("HTTP/1.1 200 OK").count() < 2 {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed early: {seen}");
            seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
    })
    .await
    .expect("two responses");
    assert_eq!(counter(&metrics, "kubeproxy_proxy_livez_total", 200), 2);
}

#[tokio::test]
async fn hard_fail_returns_the_bind_error() {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = blocker.local_addr().unwrap();
    let health = Arc::new(ProxyHealth::new(&[IpFamily::V4], SYNC_PERIOD));
    let res = timeout(Duration::from_secs(5), serve_proxy_health(addr, health, Metrics::new("ipvs"), true))
        .await
        .expect("hard fail returns at once");
    let Err(err) = res;
    assert!(matches!(err, HealthServerError::Listen { addr: a, .. } if a == addr));
    assert!(err.to_string().starts_with(&format!("failed to start proxy healthz on {addr}: ")), "{err}");
}

#[tokio::test]
async fn soft_fail_retries_until_the_port_is_free() {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = blocker.local_addr().unwrap();
    let health = Arc::new(ProxyHealth::new(&[IpFamily::V4], SYNC_PERIOD));
    let server = tokio::spawn(serve_proxy_health(addr, health, Metrics::new("iptables"), false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!server.is_finished(), "soft fail keeps retrying");
    drop(blocker);
    // The retry period is 5 s; allow some slack.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(9);
    loop {
        if let Ok(r) = request(addr, "GET", "/livez").await {
            assert_eq!(r.status, 200);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "server never came up after the port was freed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.abort();
}
