#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test kube-proxy-rs: Debian packages for the datapath
# tests (iproute2, iptables, conntrack, nftables), nightly's rust-src and bpf-linker for the kernel programs.
# Idempotent: every step checks first, so a second run takes seconds.
set -euo pipefail

step() { printf '==> %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

pkgs=()
have ip || pkgs+=(iproute2)
have iptables-restore || pkgs+=(iptables)
have conntrack || pkgs+=(conntrack)
have ipset || pkgs+=(ipset)
have nft || pkgs+=(nftables)
have ethtool || pkgs+=(ethtool)
have iperf3 || pkgs+=(iperf3)
have gnuplot || pkgs+=(gnuplot-nox)
if [ ${#pkgs[@]} -gt 0 ]; then
  step "apt-get install ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
else
  step "Debian packages present"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  step "rustup toolchain install nightly"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  step "rustup component add rust-src --toolchain nightly"
  rustup component add rust-src --toolchain nightly
else
  step "nightly rust-src present"
fi
if ! have bpf-linker || ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.0'; then
  # 0.10.0 is the last release that uses rustc's own LLVM; later ones need a system LLVM 23.
  step "cargo install bpf-linker@0.10.0"
  cargo install bpf-linker@0.10.0 --locked
else
  step "bpf-linker 0.10.0 present"
fi

# bpffs for pinned maps (normally mounted by systemd; containers may lack it).
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  step "mount bpffs on /sys/fs/bpf"
  $SUDO mount -t bpf bpf /sys/fs/bpf || echo "warning: could not mount bpffs; eBPF tests will skip" >&2
fi
step "setup done"
