#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each, one after
# the other, one job each, and prints a table: target, executions,
# coverage (cov/ft as libFuzzer counts them), crashes.
#
#   ./resources/fuzz.sh                 # 60 s per target
#   ./resources/fuzz.sh 20              # what CI runs (resources/test.sh)
#   ./resources/fuzz.sh 600 virtio_net  # one target for 10 minutes
#
# Installs the nightly toolchain (minimal profile) and cargo-fuzz when they
# are missing. Targets build with AddressSanitizer. Each target starts from
# its committed seeds (fuzz/seeds/TARGET/) and keeps what it finds in
# fuzz/corpus/TARGET/ (not committed); a crash leaves its input in
# fuzz/artifacts/TARGET/ and its log in fuzz/artifacts/TARGET.log, and makes
# the script exit 1. Reproduce one with
#   cd fuzz && cargo +nightly fuzz run TARGET artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
all=(http_request vm_config migration_protocol migration_receive virtio_blk_request
    virtio_net virtio_pci balloon_queues boot_disk boot_partition boot_grub)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

# `cargo fuzz build` takes one target or none (all of them).
if [ ${#targets[@]} -eq 1 ]; then
    cargo +nightly fuzz build -O "${targets[0]}"
else
    cargo +nightly fuzz build -O
fi
bin=target/x86_64-unknown-linux-gnu/release

rows=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=artifacts/$t.log
    status=0
    # -timeout: an input that runs 10 s is a hang, reported as a crash.
    "$bin/$t" "corpus/$t" "seeds/$t" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1 | awk '{print $2 "/" $4}')
    crashes=0
    what=""
    if [ "$status" -ne 0 ]; then
        crashes=1
        failed=1
        what=$(grep -m1 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)' "$log" || true)
    fi
    rows+=("$(printf '%-20s %12s %14s %8s  %s' "$t" "${execs:-?}" "${cov:-?}" "$crashes" "$what")")
done

printf '\n%-20s %12s %14s %8s  (%s s each)\n' target executions cov/ft crashes "$seconds"
printf '%s\n' "${rows[@]}"
exit "$failed"
