//! In-process Kubernetes API server for tests. Not built yet.
