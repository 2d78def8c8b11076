#!/usr/bin/env bash
# The one test command: sets up the machine, checks formatting and lints, then runs every test of the
# workspace (unit, integration against the in-repo API server, and the privileged datapath suites, which
# skip with a printed reason where the kernel or privileges are missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  bash hack/setup.sh
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (binaries the end-to-end suites run)"
cargo build --workspace --bins --locked
echo "==> tests"
# Tests that cannot run here (no root, no IPVS in the kernel, ...) list themselves in this file.
export KP_SKIP_LOG="$PWD/target/skipped-tests.txt"
mkdir -p target && : > "$KP_SKIP_LOG"
status=0
# Privileged suites create network namespaces and cgroups; they need root and clean up after themselves.
cargo nextest run --workspace --locked --no-fail-fast --failure-output final "$@" || status=$?
if [ -s "$KP_SKIP_LOG" ]; then
  echo "==> skipped tests ($(wc -l < "$KP_SKIP_LOG")), with the reason each gave:"
  sort "$KP_SKIP_LOG"
fi
exit $status
