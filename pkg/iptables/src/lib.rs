//! iptables backend, faithful to upstream kube-proxy. Not built yet.
