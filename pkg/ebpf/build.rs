//! Builds the kernel programs (`ebpf/programs`, nightly + bpf-linker via aya-build) into OUT_DIR.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../../ebpf");
    let programs = ebpf.join("programs").canonicalize().expect("ebpf/programs exists");
    let common = ebpf.join("common").canonicalize().expect("ebpf/common exists");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    // The layouts are shared: a change there must rebuild the programs too.
    println!("cargo:rerun-if-changed={}", common.display());

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Lets clippy/docs run without nightly; EbpfBackend::new then fails with EbpfError::NotBuilt.
        fs::write(out.join("kube-proxy-sock"), []).expect("write placeholder object");
    }
    // aya-build runs `cargo build --package ebpf-programs` in the current directory; the kernel crate is a
    // workspace of its own (excluded from the root one), so run it from there.
    env::set_current_dir(&programs).expect("chdir to ebpf/programs");
    let root = programs.to_str().expect("utf-8 path");
    let package = aya_build::Package { name: "ebpf-programs", root_dir: root, ..Default::default() };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!("building the eBPF programs failed (needs nightly with rust-src and bpf-linker): {e:#}");
    }
}
