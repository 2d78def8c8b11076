#!/usr/bin/env bash
# The lab demo: network namespaces as 2 nodes x 2 pods running the real kube-proxy (eBPF socket load
# balancing), three Services, traffic from a pod and a node process, a table of which pod answered, ClusterIP
# vs pod-IP latency, then a complete teardown (also on Ctrl-C or failure). Needs root.
#
#   hack/lab.sh                  # setup (skip with SKIP_SETUP=1), release build, demo
#   hack/lab.sh --requests 500   # extra flags go to lab-driver (see `lab-driver --help`)
#   hack/lab.sh cleanup --all-stale
#
# Everything lives in lab-created namespaces (198.18.0.0/15, 2001:db8::/32, no route off the machine), a
# lab cgroup under the cgroup2 mount and /sys/fs/bpf/kplab-*; nothing is added to the host's network.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "hack/lab.sh: needs root (network namespaces, cgroups, eBPF); try: sudo $0 $*" >&2
  exit 1
fi
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  bash hack/setup.sh
fi

echo "==> cargo build --release (kube-proxy and the lab binaries)"
cargo build --release --locked -p kube-proxy -p e2e --bins

driver=target/release/lab-driver
# The driver tears down on its own (Drop, Ctrl-C handler); this is the backstop for a driver killed hard.
trap '"$driver" cleanup --all-stale >/dev/null 2>&1 || true' EXIT
echo "==> lab"
"$driver" "$@"
