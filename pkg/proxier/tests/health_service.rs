//! Service health-check node ports over real HTTP. The server is driven from plain (non-runtime) threads,
//! as the sync runner drives it; requests run on a separate tokio runtime.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use proxier::healthcheck::{FakeClock, ListenFailure, ProxierHealthChecker, ProxyHealth, ServiceHealthServer};
use proxier::model::{HealthCheckService, IpFamily, NamespacedName, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::time::timeout;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

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
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
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

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// `N` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<_> = (0..N).map(|_| std::net::TcpListener::bind((LOCALHOST, 0)).unwrap()).collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// A proxy health that tests can flip.
struct Flag(AtomicBool);

impl ProxierHealthChecker for Flag {
    fn is_healthy(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn body(ns: &str, name: &str, n: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": \"{ns}\",\n\t\t\"name\": \"{name}\"\n\t}},\n\t\"localEndpoints\": {n},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
    )
}

#[test]
fn status_body_and_headers_follow_endpoints_and_proxy_health() {
    let rt = runtime();
    let healthy = Arc::new(Flag(AtomicBool::new(true)));
    let server = ServiceHealthServer::new("node-a", vec![LOCALHOST], healthy.clone(), rt.handle().clone());
    let svc = NamespacedName::new("default", "web");
    let port = free_port();
    let addr = SocketAddr::new(LOCALHOST, port);
    assert!(server.sync_services(&BTreeMap::from([(svc.clone(), port)])).is_empty());
    assert_eq!(server.services(), BTreeMap::from([(svc.clone(), port)]));

    // (local endpoints, proxy healthy, status)
    let cases = [(0, true, 503), (3, true, 200), (3, false, 503), (0, false, 503), (1, true, 200)];
    for (n, proxy_healthy, want) in cases {
        healthy.0.store(proxy_healthy, Ordering::SeqCst);
        server.sync_endpoints(&BTreeMap::from([(svc.clone(), n)]));
        for (method, path) in [("GET", "/"), ("POST", "/anything/at/all?x=1")] {
            let r = rt.block_on(request(addr, method, path)).unwrap();
            assert_eq!(r.status, want, "{n} endpoints, healthy={proxy_healthy}, {method} {path}");
            assert_eq!(r.body, body("default", "web", n, proxy_healthy));
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some(n.to_string().as_str()));
        }
    }

    // A Service missing from the endpoint map goes back to 0.
    server.sync_endpoints(&BTreeMap::new());
    let r = rt.block_on(request(addr, "GET", "/")).unwrap();
    assert_eq!((r.status, r.header("x-load-balancing-endpoint-weight")), (503, Some("0")));
}

#[test]
fn real_proxy_health_turns_service_checks_unhealthy() {
    let rt = runtime();
    let clock = Arc::new(FakeClock::new(SystemTime::now()));
    let health = Arc::new(ProxyHealth::with_clock(&[IpFamily::V4], Duration::from_secs(30), clock.clone()));
    // Node eligibility does not matter for service checks.
    health.set_node_eligible(false);
    health.sync_loop_started();
    let server = ServiceHealthServer::new("node-a", vec![LOCALHOST], health.clone(), rt.handle().clone());
    let svc = NamespacedName::new("ns", "lb");
    let port = free_port();
    let checks = BTreeMap::from([(svc, HealthCheckService { port, local_endpoints: 2 })]);
    assert!(server.sync(&checks).is_empty());
    let addr = SocketAddr::new(LOCALHOST, port);
    assert_eq!(rt.block_on(request(addr, "GET", "/healthz")).unwrap().status, 200);

    health.queued_update(IpFamily::V4);
    clock.advance(Duration::from_secs(60));
    let r = rt.block_on(request(addr, "GET", "/healthz")).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.body, body("ns", "lb", 2, false));
}

#[test]
fn removed_or_moved_services_close_their_listeners() {
    let rt = runtime();
    let server =
        ServiceHealthServer::new("node-a", vec![LOCALHOST], Arc::new(Flag(AtomicBool::new(true))), rt.handle().clone());
    let a = NamespacedName::new("default", "a");
    let b = NamespacedName::new("default", "b");
    let [pa, pb, pa2] = free_ports();
    assert!(server.sync_services(&BTreeMap::from([(a.clone(), pa), (b.clone(), pb)])).is_empty());
    server.sync_endpoints(&BTreeMap::from([(a.clone(), 1), (b.clone(), 1)]));
    // An idle keep-alive connection to b, which must be cut when b goes away.
    let mut idle = rt.block_on(TcpStream::connect((LOCALHOST, pb))).unwrap();

    // b removed, a moved to another port.
    assert!(server.sync_services(&BTreeMap::from([(a.clone(), pa2)])).is_empty());
    for port in [pa, pb] {
        let err = rt.block_on(request(SocketAddr::new(LOCALHOST, port), "GET", "/")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "port {port}");
    }
    let mut buf = [0u8; 16];
    let n = rt
        .block_on(async { timeout(Duration::from_secs(5), idle.read(&mut buf)).await })
        .expect("idle connection closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // The moved Service starts over with 0 endpoints until told otherwise.
    let r = rt.block_on(request(SocketAddr::new(LOCALHOST, pa2), "GET", "/")).unwrap();
    assert_eq!((r.status, r.body), (503, body("default", "a", 0, true)));

    // A port freed in one sync can be taken by another Service in the same sync.
    assert!(server.sync_services(&BTreeMap::from([(b.clone(), pa2)])).is_empty());
    let r = rt.block_on(request(SocketAddr::new(LOCALHOST, pa2), "GET", "/")).unwrap();
    assert_eq!(r.body, body("default", "b", 0, true));

    // Dropping the server closes everything.
    drop(server);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rt.block_on(request(SocketAddr::new(LOCALHOST, pa2), "GET", "/")).is_ok() {
        assert!(std::time::Instant::now() < deadline, "listener survived the server");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn port_conflict_is_reported_without_breaking_others() {
    let rt = runtime();
    let server =
        ServiceHealthServer::new("node-a", vec![LOCALHOST], Arc::new(Flag(AtomicBool::new(true))), rt.handle().clone());
    let blocker = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let taken = blocker.local_addr().unwrap().port();
    let free = free_port();
    let bad = NamespacedName::new("default", "bad");
    let good = NamespacedName::new("default", "good");

    let failures = server.sync_services(&BTreeMap::from([(bad.clone(), taken), (good.clone(), free)]));
    assert_eq!(failures.len(), 1, "{failures:?}");
    let ListenFailure { service, port, error, message } = &failures[0];
    assert_eq!((service, *port), (&bad, taken));
    assert!(error.starts_with(&format!("listen tcp 127.0.0.1:{taken}: ")), "{error}");
    assert_eq!(message, &format!("node node-a failed to start healthcheck \"default/bad\" on port {taken}: {error}"));
    assert_eq!(ListenFailure::REASON, "FailedToStartServiceHealthcheck");
    assert_eq!(ListenFailure::ACTION, "Listen");
    assert_eq!(server.services(), BTreeMap::from([(good.clone(), free)]));

    server.sync_endpoints(&BTreeMap::from([(good.clone(), 4), (bad.clone(), 4)]));
    let r = rt.block_on(request(SocketAddr::new(LOCALHOST, free), "GET", "/")).unwrap();
    assert_eq!((r.status, r.header("x-load-balancing-endpoint-weight")), (200, Some("4")));

    // The failed Service is retried on the next sync and succeeds once the port is free.
    drop(blocker);
    assert!(server.sync_services(&BTreeMap::from([(bad.clone(), taken), (good.clone(), free)])).is_empty());
    let r = rt.block_on(request(SocketAddr::new(LOCALHOST, taken), "GET", "/")).unwrap();
    assert_eq!(r.body, body("default", "bad", 0, true));
}

#[test]
fn a_partial_failure_releases_the_other_addresses() {
    let rt = runtime();
    // Two addresses; the second one is taken, so the first must be released again.
    let second = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let Ok(blocker) = std::net::TcpListener::bind((second, 0)) else {
        eprintln!("skipping: 127.0.0.2 is not usable here");
        return;
    };
    let port = blocker.local_addr().unwrap().port();
    let server = ServiceHealthServer::new(
        "node-a",
        vec![second, LOCALHOST],
        Arc::new(Flag(AtomicBool::new(true))),
        rt.handle().clone(),
    );
    let svc = NamespacedName::new("default", "x");
    let failures = server.sync_services(&BTreeMap::from([(svc, port)]));
    assert_eq!(failures.len(), 1);
    assert!(server.services().is_empty());
    let err = rt.block_on(request(SocketAddr::new(LOCALHOST, port), "GET", "/")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn unspecified_address_listens_on_both_families() {
    let rt = runtime();
    let Ok(probe) = std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)) else {
        eprintln!("skipping: no IPv6 here");
        return;
    };
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let server = ServiceHealthServer::new(
        "node-a",
        vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED), LOCALHOST],
        Arc::new(Flag(AtomicBool::new(true))),
        rt.handle().clone(),
    );
    assert_eq!(server.node_ips(), &[IpAddr::V4(Ipv4Addr::UNSPECIFIED)]);
    let svc = NamespacedName::new("kube-system", "dual");
    assert!(server.sync_services(&BTreeMap::from([(svc.clone(), port)])).is_empty());
    server.sync_endpoints(&BTreeMap::from([(svc, 1)]));
    for ip in [LOCALHOST, IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let r = rt.block_on(request(SocketAddr::new(ip, port), "GET", "/")).unwrap();
        assert_eq!(r.status, 200, "{ip}");
    }
}

#[test]
fn snapshot_merges_families_without_double_counting() {
    let rt = runtime();
    let server =
        ServiceHealthServer::new("node-a", vec![LOCALHOST], Arc::new(Flag(AtomicBool::new(true))), rt.handle().clone());
    let dual = NamespacedName::new("default", "dual");
    let v6only = NamespacedName::new("default", "v6");
    let [pd, p6] = free_ports();
    let mut snap = Snapshot::default();
    snap.v4.health_checks.insert(dual.clone(), HealthCheckService { port: pd, local_endpoints: 2 });
    snap.v6.health_checks.insert(dual.clone(), HealthCheckService { port: pd, local_endpoints: 3 });
    snap.v6.health_checks.insert(v6only.clone(), HealthCheckService { port: p6, local_endpoints: 1 });
    assert!(server.sync_snapshot(&snap).is_empty());
    assert_eq!(server.services(), BTreeMap::from([(dual, pd), (v6only, p6)]));
    let r = rt.block_on(request(SocketAddr::new(LOCALHOST, pd), "GET", "/")).unwrap();
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("3"));
    let r = rt.block_on(request(SocketAddr::new(LOCALHOST, p6), "GET", "/")).unwrap();
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("1"));

    // Everything gone: every listener closes.
    assert!(server.sync_snapshot(&Snapshot::default()).is_empty());
    for port in [pd, p6] {
        assert!(rt.block_on(request(SocketAddr::new(LOCALHOST, port), "GET", "/")).is_err());
    }
}
