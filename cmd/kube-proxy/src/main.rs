//! `kube-proxy`: upstream's flags and config, our backends.
fn main() {}
