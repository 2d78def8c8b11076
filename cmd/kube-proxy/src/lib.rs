//! Library side of the `kube-proxy` binary.

pub mod app;
pub mod backends;
pub mod config;
pub mod logging;
pub mod metrics_server;
pub mod options;
