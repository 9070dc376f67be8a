#!/usr/bin/env bash
# Runs the benchmarks (ours beside QEMU 7.2) and updates docs/benchmarks/.
#
#   ./resources/bench.sh          # all of them
#   ./resources/bench.sh boot     # one
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-system-x86_64 >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-system-x86
}
cargo build --release --workspace
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(boot migration devices overcommit linux)
for b in "${benches[@]}"; do
    cargo bench -p vmm-tests --bench "$b"
done
