#!/usr/bin/env bash
# build-test-kernel.sh: builds the project's test Linux kernel and initramfs from Debian's
# linux-source-6.12 and busybox-static, cached by the hash of all their inputs.
#
# Usage:  resources/linux/build-test-kernel.sh [OUT_DIR]
#         Default OUT_DIR: $VMM_TEST_LINUX_CACHE/<key>, or /var/cache/vmm-test-linux/<key>.
#         The last line on stdout is OUT_DIR; progress goes to stderr.
#
# Produces in OUT_DIR:
#   vmlinux             the kernel as a stripped ELF with its PVH entry note (boot this one:
#                       no emulated decompression)
#   bzImage             the same kernel as a bzImage (LZ4 payload)
#   initramfs.cpio      busybox initramfs, uncompressed newc cpio (boot this one: inflating
#                       the gzip one costs over a minute of emulated ring 0 here):
#                       /bin/busybox with every applet as a hard link, /init = test-init.sh
#                       (console command protocol, see that file), /bin/linux-test-helper
#                       (test-helper.c, static: memory pattern loop, TCP echo, BLKZEROOUT,
#                       hole punching), /etc/fstab, and /etc/acpi/PWRF/00000080 (busybox
#                       acpid's power-button handler)
#   initramfs.cpio.gz   the same, gzip-compressed
#   config, System.map  the kernel's .config and symbols (to read oopses)
#   kernel-version      `uname -r` in the guest
#   .stamp              the inputs of this build (versions and file hashes); written last
#
# Two cache levels under the cache root: kernel-<key>/ holds a kernel built from
# linux-source-6.12, test-kernel.config, patches/*.patch and the kernel recipe below
# (`kernel_recipe`), and <key>/ the whole output, whose key adds this script, test-init.sh,
# test-helper.c and busybox-static. Changing the initramfs side rebuilds in seconds; only the
# kernel's own inputs cost a kernel build.
#
# The kernel: `make tinyconfig`, then test-kernel.config, then `make olddefconfig` (every
# `=y` of the fragment is checked to have survived), with patches/*.patch applied: three
# workarounds for hosts whose KVM emulates guest ring 0 (see ../shared/notes/linux-here.md),
# harmless elsewhere. Its built-in command line adds "noxsave clearcpuid=..." in front of
# whatever the VMM passes (see test-kernel.config).
#
# Boot it (PVH), e.g.:
#   vmm --kernel OUT/vmlinux --initrd OUT/initramfs.cpio --memory size=256M --cpus 2 \
#       --cmdline "console=ttyS0 reboot=k panic=-1" [--serial socket=PATH]
#   and add `ip=GUEST::GW:MASK::eth0:off` for a configured eth0 (kernel IP autoconfig).
#
# Requirements: a Debian 12 host, as root when packages are missing: it installs with
# apt-get whatever is missing of linux-source-6.12, gcc, make, libc6-dev, flex, bison, bc,
# libelf-dev, libssl-dev, cpio, gzip, xz-utils, lz4, binutils. busybox-static is used as
# installed, or else downloaded (`apt-get download`) and unpacked, never installed (it
# conflicts with `busybox`).
# Runs are serialized with flock (tests may start several at once); a cached build is
# found in about a second. About 6-20 min on 2 cores otherwise (the kernel; the initramfs
# alone takes seconds).
# VMM_TEST_LINUX_FORCE=1 rebuilds anyway (kernel included).
set -euo pipefail

script=$(readlink -f "${BASH_SOURCE[0]}")
script_dir=$(dirname "$script")
fragment=$script_dir/test-kernel.config
init_script=$script_dir/test-init.sh
helper_src=$script_dir/test-helper.c
patch_dir=$script_dir/patches
cache_root=${VMM_TEST_LINUX_CACHE:-/var/cache/vmm-test-linux}
src_pkg=linux-source-6.12
src_tar=/usr/src/linux-source-6.12.tar.xz

log() { echo "build-test-kernel: $*" >&2; }
die() { echo "build-test-kernel: error: $*" >&2; exit 1; }

command -v apt-get >/dev/null && command -v dpkg-query >/dev/null ||
    die "needs apt-get and dpkg-query (a Debian 12 host)"
export PATH=$PATH:/usr/sbin:/sbin

apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    [ "$(id -u)" = 0 ] || die "apt-get update needs root"
    log "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
}
apt_install() {
    [ "$(id -u)" = 0 ] || die "missing $*: install them (as root), or run this as root"
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 ||
        { apt_update; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2; }
}
installed_version() { dpkg-query -W -f '${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null |
    awk '$1 == "ii" { print $2 }'; }
candidate_version() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" { print $2 }'; }
package_version() {  # installed, else the candidate (after an apt-get update if need be)
    local v
    v=$(installed_version "$1")
    [ -n "$v" ] || v=$(candidate_version "$1")
    if [ -z "$v" ]; then apt_update; v=$(candidate_version "$1"); fi
    [ -n "$v" ] || die "no package $1 in apt's lists"
    echo "$v"
}

# --- the keys -------------------------------------------------------------------------------
# Bump when the kernel's build steps below change (the kernel key does not hash this script).
kernel_recipe=1
src_ver=$(package_version "$src_pkg")
bb_ver=$(package_version busybox-static)
shopt -s nullglob
patches=("$patch_dir"/*.patch)
shopt -u nullglob
[ ${#patches[@]} -gt 0 ] || die "no patches in $patch_dir"
kernel_inputs=$(
    echo "kernel_recipe=$kernel_recipe"
    echo "$src_pkg=$src_ver"
    cd "$script_dir" && sha256sum test-kernel.config "${patches[@]#"$script_dir"/}"
)
kernel_key=$(echo "$kernel_inputs" | sha256sum | cut -c1-16)
inputs=$(
    echo "$kernel_inputs"
    echo "busybox-static=$bb_ver"
    cd "$script_dir" &&
        sha256sum "${script#"$script_dir"/}" test-init.sh test-helper.c
)
key=$(echo "$inputs" | sha256sum | cut -c1-16)
out=${1:-$cache_root/$key}
mkdir -p "$out"
out=$(cd "$out" && pwd)
kdir=$cache_root/kernel-$kernel_key

kernel_files=(vmlinux bzImage config System.map kernel-version gen_init_cpio)
have_kernel() {
    [ -f "$kdir/.stamp" ] && [ "$(cat "$kdir/.stamp")" = "$kernel_inputs" ] || return 1
    local f
    for f in "${kernel_files[@]}"; do [ -s "$kdir/$f" ] || return 1; done
}
have_all() {
    [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$inputs" ] && [ -s "$out/vmlinux" ] &&
        [ -s "$out/bzImage" ] && [ -s "$out/initramfs.cpio" ] && [ -s "$out/initramfs.cpio.gz" ]
}
if [ "${VMM_TEST_LINUX_FORCE:-0}" != 1 ] && have_all; then
    log "up to date (key $key)"
    echo "$out"
    exit 0
fi

# One build at a time (one lock in the cache root, which the kernel cache is shared through).
mkdir -p "$cache_root"
lock=$cache_root/.vmm-test-linux.lock
exec 9>"$lock"
if ! flock -n 9; then
    log "waiting for another build ($lock)"
    flock 9
fi
if [ "${VMM_TEST_LINUX_FORCE:-0}" != 1 ] && have_all; then
    log "built meanwhile by another run (key $key)"
    echo "$out"
    exit 0
fi
started=$(date +%s)
log "building key $key into $out"
echo "$inputs" | sed 's/^/build-test-kernel:   /' >&2

# --- tools and sources ------------------------------------------------------------------------
need_kernel=1
[ "${VMM_TEST_LINUX_FORCE:-0}" != 1 ] && have_kernel && need_kernel=0
missing=()
if [ "$need_kernel" = 1 ]; then
    [ -n "$(installed_version "$src_pkg")" ] && [ -f "$src_tar" ] || missing+=("$src_pkg")
fi
for tool in gcc:gcc make:make flex:flex bison:bison bc:bc cpio:cpio gzip:gzip xz:xz-utils \
            lz4:lz4 strip:binutils patch:patch perl:perl-base; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
for pkg in libc6-dev libelf-dev libssl-dev; do
    [ -n "$(installed_version "$pkg")" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
if [ "$need_kernel" = 1 ] && [ "$(installed_version "$src_pkg")" != "$src_ver" ]; then
    die "$src_pkg $(installed_version "$src_pkg") installed, but the key was made for $src_ver; run again"
fi

build=$out/.build
rm -rf "$build"
mkdir -p "$build"
trap 'rm -rf "$build"' EXIT

# busybox: the installed busybox-static, else its .deb unpacked.
if [ "$(installed_version busybox-static)" = "$bb_ver" ]; then
    busybox=$(dpkg-query -L busybox-static | grep -m1 '/bin/busybox$')
else
    mkdir -p "$build/debs" "$build/bb"
    log "downloading busybox-static=$bb_ver"
    (cd "$build/debs" && apt-get download -qq -o APT::Sandbox::User=root "busybox-static=$bb_ver" >&2) ||
        { apt_update; (cd "$build/debs" && apt-get download -qq -o APT::Sandbox::User=root "busybox-static=$bb_ver" >&2); }
    dpkg-deb -x "$build/debs/"busybox-static_*.deb "$build/bb"
    busybox=$build/bb/bin/busybox
fi
[ -x "$busybox" ] || die "no busybox binary ($busybox)"

build_kernel() {
    log "unpacking $src_tar"
    tar -xJf "$src_tar" -C "$build"
    src=$(echo "$build"/linux-source-*)
    [ -f "$src/Makefile" ] || die "unexpected layout of $src_tar"

    for p in "${patches[@]}"; do
        log "applying ${p#"$script_dir"/}"
        patch -d "$src" -p1 --quiet --forward --no-backup-if-mismatch < "$p" ||
            die "${p#"$script_dir"/} does not apply to $src_pkg $src_ver"
    done

    # --- configure --------------------------------------------------------------------------------
    make_() { make -C "$src" -s "$@"; }
    make_ tinyconfig >/dev/null 2>&1 || die "make tinyconfig failed"
    cat "$fragment" >> "$src/.config"
    make_ olddefconfig >/dev/null 2>"$build/olddefconfig.log" ||
        { cat "$build/olddefconfig.log" >&2; die "make olddefconfig failed"; }
    lost=()
    while IFS= read -r line; do
        grep -qxF "$line" "$src/.config" || lost+=("$line")
    done < <(grep -E '^CONFIG_[A-Z0-9_]+=' "$fragment")
    while read -r _ sym _; do
        grep -q "^$sym=" "$src/.config" && lost+=("# $sym is not set")
    done < <(grep -E '^# CONFIG_[A-Z0-9_]+ is not set' "$fragment")
    [ ${#lost[@]} -eq 0 ] || die "olddefconfig did not keep: ${lost[*]} (missing dependencies?)"

    # --- build ------------------------------------------------------------------------------------
    jobs=$(nproc)
    log "make -j$jobs bzImage (log: $build/make.log)"
    t0=$(date +%s)
    if ! make -C "$src" -j"$jobs" KBUILD_BUILD_USER=vmm KBUILD_BUILD_HOST=test \
            bzImage > "$build/make.log" 2>&1; then
        tail -n 40 "$build/make.log" >&2
        die "the kernel build failed"
    fi
    log "kernel built in $(( $(date +%s) - t0 )) s"
    # Into the kernel cache: the kernel and what the initramfs needs of its tree.
    local kbuild=$kdir.new
    rm -rf "$kbuild"
    mkdir -p "$kbuild"
    strip -o "$kbuild/vmlinux" "$src/vmlinux"
    cp "$src/arch/x86/boot/bzImage" "$src/.config" "$src/System.map" "$src/usr/gen_init_cpio" \
        "$kbuild/"
    mv "$kbuild/.config" "$kbuild/config"
    make_ kernelrelease > "$kbuild/kernel-version"
    echo "$kernel_inputs" > "$kbuild/.stamp"
    rm -rf "$kdir"
    mv "$kbuild" "$kdir"
    rm -rf "$src"

}
if [ "$need_kernel" = 1 ]; then
    build_kernel
else
    log "kernel up to date ($kdir)"
fi
kver=$(cat "$kdir/kernel-version")

# --- initramfs ----------------------------------------------------------------------------------
# gen_init_cpio (built with the kernel) makes the device nodes without root, reproducibly.
list=$build/initramfs.list
{
    for d in bin sbin usr usr/bin usr/sbin dev proc sys tmp root etc etc/acpi etc/acpi/PWRF \
             var var/log mnt run; do
        echo "dir /$d 0755 0 0"
    done
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    # The applets as hard links, not symlinks: the kernel unpacks a hard link for almost
    # nothing, a symlink for about 30 ms of emulated ring 0 (about 12 s for 400 of them).
    printf 'file /bin/busybox %s 0755 0 0' "$busybox"
    "$busybox" --list-full | LC_ALL=C sort | while IFS= read -r applet; do
        [ "$applet" = bin/busybox ] || printf ' /%s' "$applet"
    done
    echo
    echo "file /init $init_script 0755 0 0"
    echo "file /bin/linux-test-helper $build/linux-test-helper 0755 0 0"
    echo "file /etc/acpi/PWRF/00000080 $build/power-button 0755 0 0"
    echo "file /etc/passwd $build/passwd 0644 0 0"
    echo "file /etc/group $build/group 0644 0 0"
    echo "file /etc/fstab $build/fstab 0644 0 0"
} > "$list"
cat > "$build/power-button" <<'EOF'
#!/bin/sh
# busybox acpid's handler for the ACPI power button (KEY_POWER): power off cleanly, as a
# distribution would (busybox `poweroff` signals /init, which stops everything first).
echo "linux-test: power-button" > /dev/console
exec poweroff
EOF
echo "root:x:0:0:root:/root:/bin/sh" > "$build/passwd"
echo "root:x:0:" > "$build/group"
cat > "$build/fstab" <<'EOF'
proc      /proc  proc      defaults   0 0
sysfs     /sys   sysfs     defaults   0 0
devtmpfs  /dev   devtmpfs  defaults   0 0
tmpfs     /tmp   tmpfs     mode=1777  0 0
EOF
# The helper: static, so it needs nothing of the initramfs (no libc, no loader).
gcc -static -O2 -s -Wall -Wextra -Werror -o "$build/linux-test-helper" "$helper_src" >&2 ||
    die "test-helper.c does not build (gcc -static needs libc6-dev)"
"$kdir/gen_init_cpio" -t 0 "$list" > "$build/initramfs.cpio"
gzip -9nc "$build/initramfs.cpio" > "$build/initramfs.cpio.gz"

# --- install ------------------------------------------------------------------------------------
rm -f "$out/.stamp"
for f in vmlinux bzImage config System.map kernel-version; do
    # Hard links where the cache allows (same file system), copies otherwise.
    rm -f "$out/$f"
    ln "$kdir/$f" "$out/$f" 2>/dev/null || cp "$kdir/$f" "$out/$f"
done
mv "$build/initramfs.cpio" "$out/initramfs.cpio"
mv "$build/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$inputs" > "$out/.stamp"
log "done in $(( $(date +%s) - started )) s: kernel $kver, vmlinux $(stat -c %s "$out/vmlinux") B," \
    "bzImage $(stat -c %s "$out/bzImage") B, initramfs.cpio $(stat -c %s "$out/initramfs.cpio") B"
echo "$out"
