//! iptables backend, faithful to upstream kube-proxy's `--proxy-mode=iptables`.
//!
//! * [`proxier`]: the [`proxier::backend::Backend`] implementation ([`IptablesBackend`]): full and partial syncs,
//!   one `iptables-restore --noflush --counters` transaction per family per sync, canary monitoring, metrics.
//! * [`rules`]: pure generation of the restore input (upstream's chains, comments, hashes, probabilities).
//! * [`hash`]: upstream's hash-derived chain names; [`detect`]: local-traffic detection and `nodePortAddresses`.
//! * [`conntrack`]: stale UDP conntrack cleanup over ctnetlink.
//! * [`runner`], [`save`]: running `iptables-save`/`iptables-restore` per family and parsing saved rulesets.
//! * [`cleanup`]: removing kube-proxy's iptables, ipvs and nftables leftovers for `--cleanup` and mode switches.

pub mod cleanup;
pub mod conntrack;
pub mod detect;
pub mod hash;
pub mod proxier;
pub mod rules;
pub mod runner;
pub mod save;
pub mod sysctl;

pub use cleanup::{
    CleanupError, CleanupReport, FamilyReport, ProxyMode, cleanup_for_mode, cleanup_iptables_family, cleanup_leftovers,
};
pub use detect::{LocalDetector, LocalDetectorConfig, NodePortAddresses};
pub use proxier::{IptablesBackend, IptablesOptions};
pub use runner::{Error, Exec, Iptables, RestoreFailure, RestoreFlags, Table, Variant};
pub use save::{ChainDump, Rule, Ruleset, TableDump};
