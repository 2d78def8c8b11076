//! Kernel tests, each in a network namespace it creates; skipped visibly when the kernel has no IPVS.

use std::net::IpAddr;

use proxy_ipvs::netlink::{self, Destination, IpvsClient, Service};
use proxy_ipvs::{InitError, IpvsBackend, IpvsOptions};

/// Runs `f` on a thread moved into a fresh network namespace; `None` (with a SKIP line) when that is impossible.
fn in_netns<T: Send>(test: &str, f: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only changes this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                skip(test, &format!("cannot create a network namespace: {}", std::io::Error::last_os_error()));
                return None;
            }
            Some(f())
        })
        .join()
        .expect("netns thread")
    })
}

/// Prints on the real stderr, which libtest does not capture, so a skip is visible in plain `cargo test`.
fn skip(test: &str, why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    // hack/test.sh lists skipped tests at the end: the runner hides a passing test's output.
    if let Some(path) = std::env::var_os("KP_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(f, "SKIP {test}: {why}");
    }
}

fn ipvs_present(test: &str) -> bool {
    match netlink::resolve_family(netlink::IPVS_GENL_NAME) {
        Ok(Some(_)) => true,
        Ok(None) => {
            skip(test, "IPVS genetlink family not present in this kernel");
            false
        }
        Err(e) => {
            skip(test, &format!("cannot query generic netlink: {e}"));
            false
        }
    }
}

#[test]
fn backend_refuses_to_start_without_ipvs_naming_the_module() {
    let test = "backend_refuses_to_start_without_ipvs_naming_the_module";
    in_netns(test, || {
        if matches!(netlink::resolve_family(netlink::IPVS_GENL_NAME), Ok(Some(_))) {
            skip(test, "IPVS is present in this kernel; nothing to refuse");
            return;
        }
        let mut o = IpvsOptions::new();
        o.sysctl = Some(std::sync::Arc::new(proxy_iptables::sysctl::NoSysctl));
        let err = IpvsBackend::new(o).expect_err("no IPVS in this kernel");
        assert!(matches!(err, InitError::ModuleMissing), "{err}");
        assert!(err.to_string().contains("kernel module ip_vs is not loaded"), "{err}");
    });
}

#[test]
fn services_and_destinations_round_trip_through_the_kernel() {
    let test = "services_and_destinations_round_trip_through_the_kernel";
    in_netns(test, || {
        if !ipvs_present(test) {
            return;
        }
        let mut c = IpvsClient::new().expect("client");
        let mut svc = Service::new("198.51.100.0".parse().unwrap(), 6, 20000, "rr");
        svc.flags = netlink::SVC_F_PERSISTENT;
        svc.timeout = 60;
        c.new_service(&svc).expect("add service");
        let listed = c.services().expect("list");
        let got = listed.iter().find(|s| s.addr == svc.addr && s.port == 20000).expect("listed");
        assert_eq!(got.flags & netlink::SVC_F_PERSISTENT, netlink::SVC_F_PERSISTENT);
        let ip: IpAddr = "10.244.0.5".parse().unwrap();
        c.new_dest(&svc, &Destination::new(ip, 8080, 1)).expect("add dest");
        let d = c.destinations(&svc).expect("dests");
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].addr, d[0].port, d[0].weight), (ip, 8080, 1));
        c.set_dest(&svc, &Destination::new(ip, 8080, 0)).expect("weight 0");
        assert_eq!(c.destinations(&svc).unwrap()[0].weight, 0);
        c.del_dest(&svc, &Destination::new(ip, 8080, 0)).expect("del dest");
        c.del_service(&svc).expect("del service");
    });
}
