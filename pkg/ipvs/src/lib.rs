//! IPVS backend over generic netlink, faithful to upstream kube-proxy's `--proxy-mode=ipvs`.
//!
//! * [`netlink`]: the `IPVS` generic netlink family (services, destinations, dumps, timeouts).
//! * [`ipvs_rules`]: pure computation of the desired virtual/real servers, ipset entries, `kube-ipvs0`
//!   addresses and the iptables rules IPVS mode still needs.
//! * [`kernel`]: the [`kernel::IpvsKernel`] trait over the client, so the sync diff is tested with a fake.
//! * [`graceful`]: graceful termination of real servers, re-checked by every sync and every minute.
//! * [`proxier`]: [`IpvsBackend`], the sync (a diff against what the kernel lists), metrics, conntrack cleanup.

pub mod graceful;
pub mod ipvs_rules;
pub mod kernel;
pub mod netlink;
pub mod proxier;

pub use proxier::{InitError, IpvsBackend, IpvsOptions};
