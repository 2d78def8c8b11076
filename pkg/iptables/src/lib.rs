//! iptables backend plumbing, faithful to upstream kube-proxy: running `iptables-save`/`iptables-restore` per IP
//! family ([`runner`]), parsing saved rulesets ([`save`]), and removing kube-proxy's iptables, ipvs and nftables
//! leftovers for `--cleanup` and mode switches ([`cleanup`]).

pub mod cleanup;
pub mod runner;
pub mod save;

pub use cleanup::{
    CleanupError, CleanupReport, FamilyReport, ProxyMode, cleanup_for_mode, cleanup_iptables_family, cleanup_leftovers,
};
pub use runner::{Error, Exec, Iptables, RestoreFailure, RestoreFlags, Table, Variant};
pub use save::{ChainDump, Rule, Ruleset, TableDump};
