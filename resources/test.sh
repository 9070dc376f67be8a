#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine (as root):
# installs what the tests use, builds everything, runs `cargo test`.
#
#   ./resources/test.sh            # everything
#   ./resources/test.sh -- NAME    # only tests matching NAME (passed to cargo test)
#
# Tests that need KVM, tap devices, loop devices or Pacemaker run for real;
# a test skips (printing SKIP: and the reason) only where the host lacks the
# feature, e.g. hardware-assisted ring 0 for booting Linux.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    build-essential pkg-config curl ca-certificates
    qemu-system-x86        # the comparison peer in benchmarks and guest checks
    iproute2 util-linux mount procps kmod   # namespaces, veth, tap; losetup; sysctl; modprobe
    busybox-static cpio xz-utils   # the Linux guests' initramfs
    # tests/tests/linux.rs: the test kernel (resources/linux/build-test-kernel.sh builds it
    # from Debian's source package, with gcc/make from build-essential) and host-side ping
    linux-source-6.12 flex bison bc libelf-dev libssl-dev lz4 iputils-ping
    acpica-tools           # iasl/acpiexec check the VMM's ACPI tables
    pacemaker corosync pacemaker-cli-utils resource-agents   # tests/tests/cluster.rs: the OCF agent, a two-node cluster
    libxml2-utils jq       # ocf-tester's meta-data check (xmllint); the agent's config check
    drbd-utils             # the DRBD recipe's resource files (drbdadm and drbdadm-84 dump, dry runs)
    e2fsprogs fdisk        # tests/tests/disk_boot.rs: mkfs.ext4 -d, sfdisk (GPT and MBR)
    openssl                # tests/tests/migration_trust.rs: a CA and host certificates for migration TLS
    chromium chromium-driver   # tests/tests/web.rs: vmm-web in a real headless browser
    systemd man-db help2man    # tests/tests/units.rs, package.rs: systemd-analyze verify, man -w, man pages from --help
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

# KVM must be usable; the tests say so themselves if it is not.
[ -e /dev/kvm ] || echo "warning: /dev/kvm is missing; VM tests will skip"
modprobe tun 2>/dev/null || true
modprobe loop 2>/dev/null || true

rustup component add rustfmt clippy >/dev/null 2>&1 || true

args=()
if [ "${1:-}" = "--" ]; then shift; args=("$@"); fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
# The Linux test kernel: cached under /var/cache/vmm-test-linux by the hash of its inputs
# (seconds when cached; a first build takes 6-20 min here). Built before the tests so its
# progress shows and a broken build stops the run with the build's own error.
echo "building the Linux test kernel (resources/linux/build-test-kernel.sh)"
bash resources/linux/build-test-kernel.sh >/dev/null
# --no-fail-fast: one failing test file does not hide the others' results.
cargo test --workspace --no-fail-fast -- "${args[@]}"
# The whole suite also fuzzes every parser briefly (docs/fuzzing.md).
if [ ${#args[@]} -eq 0 ]; then
    ./resources/fuzz.sh 20
fi
