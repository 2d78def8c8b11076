#!/usr/bin/env bash
# The benchmark: for each backend (ebpf, iptables; a mode that is not built yet is skipped with a note) and
# each number of Services N, the real kube-proxy in the lab (network namespaces as nodes and pods, the in-repo
# API server): full-sync time, endpoint-update latency, connect+request+close latency and short-connection
# throughput via the ClusterIP against the pod IPs, one bulk TCP stream (iperf3), north-south NodePort
# throughput from the lab's external client (short TCP connections and small UDP request/replies to remote
# backends, against the same client reaching the pod IPs over the same hops), and the proxy's cost (RSS,
# CPU, BPF map memory / iptables rule count). Writes results.json, results.md, meta.json and PNG plots.
# Needs root. See BENCHMARKS.md.
#
#   hack/bench.sh                      # full matrix (N up to 100k; long), results in results/bench/
#   hack/bench.sh --quick              # reduced matrix (N <= 1k), under 3 minutes
#   hack/bench.sh --backends ebpf --scales 1000,10000 --out results/ebpf-10k
#   hack/bench.sh cleanup --all-stale  # remove leftovers of a run that was killed hard
#
# Everything lives in lab-created namespaces (198.18.0.0/15, no route off the machine), a lab cgroup and
# /sys/fs/bpf/kplab-*; nothing is dialled from or added to the host's network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "hack/bench.sh: needs root (network namespaces, cgroups, eBPF); try: sudo $0 $*" >&2
  exit 1
fi
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  bash hack/setup.sh
fi

echo "==> cargo build --release (kube-proxy, kpctl and the lab binaries)"
cargo build --release --locked -p kube-proxy -p e2e --bins

bench=target/release/bench
# The bench tears down on its own (Drop, Ctrl-C handler); this is the backstop for one killed hard.
trap '"$bench" cleanup --all-stale >/dev/null 2>&1 || true' EXIT
echo "==> bench"
"$bench" "$@"
