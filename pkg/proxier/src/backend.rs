//! The interface every datapath backend (ebpf, iptables, ipvs) implements.

use crate::model::{Changes, IpFamily, Snapshot};

/// An error a backend reports from a sync or a cleanup; the runner logs it and retries with a full sync.
#[derive(Debug, thiserror::Error)]
#[error("{backend} backend: {message}")]
pub struct BackendError {
    /// The backend's name.
    pub backend: &'static str,
    /// What failed and on which input.
    pub message: String,
    /// The underlying cause, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// An error without an underlying cause.
    pub fn msg(backend: &'static str, message: impl Into<String>) -> Self {
        BackendError { backend, message: message.into(), source: None }
    }

    /// An error wrapping its cause.
    pub fn with_source(
        backend: &'static str,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BackendError { backend, message: message.into(), source: Some(Box::new(source)) }
    }
}

/// What a sync did, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The sync rewrote the backend's whole state (upstream's "full" sync) rather than only the changes.
    pub full: bool,
    /// Service ports written or removed.
    pub service_ports_programmed: usize,
    /// Backend-specific counts for logs, e.g. `("nat_rules", 1234)`.
    pub details: Vec<(&'static str, u64)>,
}

/// A datapath backend. It sees only the model, never Kubernetes objects.
pub trait Backend: Send {
    /// The mode name as `/proxyMode` reports it (`ebpf`, `iptables`, `ipvs`).
    fn name(&self) -> &'static str;

    /// The families this backend programs on this node.
    fn families(&self) -> &[IpFamily];

    /// Brings the datapath to `snapshot`; `changes` names what differs from the previous successful sync
    /// (when `changes.full` is set, everything must be rewritten and stale state removed).
    fn sync(&mut self, snapshot: &Snapshot, changes: &Changes) -> Result<SyncReport, BackendError>;

    /// Removes everything this backend may have programmed on the node.
    fn cleanup(&mut self) -> Result<(), BackendError>;
}
