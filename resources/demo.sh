#!/usr/bin/env bash
# Builds everything and boots the bundled demo guest (the project's test
# guest) with a disk and a NIC, showing its console. Run as root on Debian 12.
#
#   ./resources/demo.sh            # interactive: type guest commands (help), poweroff to end
#   DEMO_BATCH=1 ./resources/demo.sh   # runs the demo commands and powers off
#
# The guest runs as an admin would run it: its API socket is in the standard
# socket directory ($VMM_SOCKET_DIR, default /run/vmm) as demo.sock, so
# `vmmctl list` shows it and `vmmctl info demo` reaches it, and its console
# is a socket that `vmmctl console demo` attaches to: every key, Ctrl-C
# included, goes to the guest; Ctrl-] detaches and leaves it running.
#
# The guest enumerates its PCI devices, writes a pattern to its virtio-blk
# disk and reads it back, and sends frames on its virtio-net NIC (a tap
# device, vmmdemo0, visible on the host: `tcpdump -i vmmdemo0` shows them).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null || ! command -v curl >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends build-essential curl ca-certificates iproute2
fi
if ! command -v cargo >/dev/null; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
[ -w /dev/kvm ] || { echo "demo: /dev/kvm is missing or not writable (run as root on a KVM host)" >&2; exit 1; }

cargo build --release --workspace

work=resources/demo/work
mkdir -p "$work"
disk="$work/disk.img"
[ -f "$disk" ] || truncate -s 64M "$disk"

tap=vmmdemo0
net_args=()
if ip tuntap add dev "$tap" mode tap 2>/dev/null || ip link show "$tap" >/dev/null 2>&1; then
    ip link set "$tap" up
    net_args=(--net "tap=$tap,mac=52:54:00:de:e0:01")
    trap 'ip link del "$tap" 2>/dev/null || true' EXIT
else
    echo "demo: cannot create tap $tap (needs root); booting without a NIC" >&2
fi

commands="info; lspci; blk-info; blk-id; blk-write sector=0 count=64 pattern=c0ffee; \
blk-read sector=0 count=64 pattern=c0ffee; net-info; net-send count=3 size=128; \
counters period_ms=1000; sleep ms=2500; stop; echo demo: type help for commands, poweroff to end (Ctrl-] detaches)"
batch=
if [ -n "${DEMO_BATCH:-}" ] || [ ! -t 0 ]; then
    commands="$commands; poweroff"
    batch=1
fi

sockets=${VMM_SOCKET_DIR:-/run/vmm}
mkdir -p "$sockets"
api="$sockets/demo.sock"
vmmctl=target/release/vmmctl
if "$vmmctl" ping demo >/dev/null 2>&1; then
    echo "demo: a demo guest already runs: $vmmctl console demo (or $vmmctl shutdown-vmm demo)" >&2
    exit 1
fi
log="$work/vmm.log"
echo "demo: booting tests/guest/target/release/testguest as 'demo' (API $api, log $log)"
# Its own session: nothing typed at this terminal reaches the VMM as a signal.
setsid target/release/vmm \
    --kernel tests/guest/target/release/testguest \
    --cmdline "-- $commands" \
    --cpus 2 --memory size=256M \
    --disk "path=$disk,serial=demo-disk" \
    "${net_args[@]}" \
    --serial "socket=$sockets/demo.console" \
    --api-socket "$api" \
    --log-file "$log" </dev/null &
vmm=$!
for _ in $(seq 100); do
    "$vmmctl" ping demo >/dev/null 2>&1 && break
    kill -0 "$vmm" 2>/dev/null || break
    sleep 0.1
done
"$vmmctl" list
echo "demo: attaching to the console (vmmctl console demo); Ctrl-] detaches, the guest runs on"
if [ -n "$batch" ]; then
    "$vmmctl" console demo </dev/null || true
else
    "$vmmctl" console demo || true
fi
if kill -0 "$vmm" 2>/dev/null && "$vmmctl" ping demo >/dev/null 2>&1; then
    # Detached: the guest keeps running, with its tap.
    trap - EXIT
    echo "demo: the guest runs on in the background:"
    echo "  $vmmctl list; $vmmctl info demo; $vmmctl console demo"
    echo "  $vmmctl shutdown demo --timeout 10s   (or: $vmmctl shutdown-vmm demo)"
    [ ${#net_args[@]} -eq 0 ] || echo "  then: ip link del $tap"
    exit 0
fi
set +e
wait "$vmm"
status=$?
set -e
echo "demo: vmm exited with status $status (0: the guest powered off)"
if [ -s "$log" ]; then
    echo "demo: the end of its log ($log):"
    tail -n 5 "$log" | sed 's/^/  /'
fi
exit "$status"
