//! Library side of the `kube-proxy` binary.

pub mod config;
pub mod options;
