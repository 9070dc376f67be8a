#!/usr/bin/env bash
# build-linux.sh: builds a bootable Linux guest for our VMM from Debian 12 packages.
#
# Usage:  resources/linux/build-linux.sh [OUTPUT_DIR]
#         (or LINUX_GUEST_DIR=OUTPUT_DIR resources/linux/build-linux.sh)
#         Default OUTPUT_DIR: resources/linux/work/ (gitignored).
#
# Produces in OUTPUT_DIR:
#   bzImage             Debian 12's stock cloud kernel (vmlinuz from the real package that
#                       linux-image-cloud-amd64 depends on, e.g. linux-image-6.1.0-NN-cloud-amd64)
#   vmlinux             the same kernel, uncompressed (ELF with a PVH note), taken out of the
#                       bzImage: boots through our ELF/PVH path, and without the decompression
#   kernel-version      its version string (`uname -r` in the guest), e.g. 6.1.0-NN-cloud-amd64
#   initramfs.cpio.gz   busybox initramfs (newc cpio, gzip): /bin/busybox + applet links,
#                       /init, /dev, /proc, /sys, and the virtio kernel modules that the
#                       package ships as .ko (decompressed, with their dependencies)
#   modules.txt         which virtio-related drivers are built in, modules, or absent
#   debs/               the downloaded .debs (reused by the next build)
#   .stamp              the inputs (package versions, this script's hash) of this build
#
# The guest's /init mounts proc, sys and devtmpfs, loads the modules in dependency order,
# prints
#   linux-guest: init started kernel=<uname -r>
#   linux-guest: blk <block devices | none>
#   linux-guest: net <net interfaces | none>
#   linux-guest: virtio-drivers <driver bound to each virtio device>
#   linux-guest: cpus <online CPUs>
# and then, if the kernel command line contains `linux-guest.shell`, runs a shell on the
# console; otherwise prints `linux-guest: done` and ends the VM: `poweroff -f` when the
# kernel has ACPI (our S5 register; exit code 0), else `reboot -f` (without ACPI the kernel
# turns a power-off into a halt that never returns; with reboot=k the reset goes through the
# i8042 and the VMM exits with code 3).
#
# Boot it:
#   target/release/vmm --kernel OUT/bzImage --initrd OUT/initramfs.cpio.gz \
#       --cmdline "console=ttyS0 reboot=k panic=-1" --memory size=512M
#
# Requirements: Debian 12 (bookworm) with apt sources for main. Run as root on a fresh
# machine: the script runs `apt-get update` when the package lists are missing and
# installs `cpio`, `xz-utils`, `lz4` and `kmod` (depmod) when missing. The kernel and
# busybox-static packages are only downloaded (`apt-get download`) and unpacked with
# `dpkg-deb -x`, never installed, so the host is not changed by them (busybox-static
# would conflict with `busybox`). The package ships no modules.dep: depmod -b makes it.
# It is idempotent: when OUTPUT_DIR already holds a build from the same package versions
# and the same script, it only prints where the artifacts are (one apt-cache call, ~1 s).
# Concurrent runs on one OUTPUT_DIR are serialized with flock.
# Set LINUX_GUEST_FORCE=1 to rebuild anyway.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-${LINUX_GUEST_DIR:-$script_dir/work}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# One build at a time per output dir (tests may run this concurrently).
exec 9>"$out/.lock"
flock 9

log() { echo "build-linux: $*" >&2; }
die() { echo "build-linux: error: $*" >&2; exit 1; }

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
    die "needs apt-get and dpkg-deb (a Debian 12 host)"

# The modules a guest needs for our devices (virtio-pci transport, block, net, balloon),
# with the Kconfig symbol that builds each.
wanted_modules=(virtio virtio_ring virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
                virtio_blk virtio_net net_failover failover virtio_balloon)
declare -A kconfig=(
    [virtio]=CONFIG_VIRTIO [virtio_ring]=CONFIG_VIRTIO [virtio_pci]=CONFIG_VIRTIO_PCI
    [virtio_pci_modern_dev]=CONFIG_VIRTIO_PCI_LIB
    [virtio_pci_legacy_dev]=CONFIG_VIRTIO_PCI_LIB_LEGACY
    [virtio_blk]=CONFIG_VIRTIO_BLK [virtio_net]=CONFIG_VIRTIO_NET
    [net_failover]=CONFIG_NET_FAILOVER [failover]=CONFIG_FAILOVER
    [virtio_balloon]=CONFIG_VIRTIO_BALLOON
)

# --- tools ----------------------------------------------------------------------------
missing=()
command -v cpio >/dev/null || missing+=(cpio)
command -v xz >/dev/null || missing+=(xz-utils)
command -v gzip >/dev/null || missing+=(gzip)
command -v lz4 >/dev/null || missing+=(lz4)   # Debian 12's bzImage payload is LZ4
PATH=$PATH:/usr/sbin:/sbin
command -v depmod >/dev/null || missing+=(kmod)
apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    [ "$(id -u)" = 0 ] || die "apt-get update needs root"
    log "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
}
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: install them (as root)"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
        { apt_update; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }
fi

# --- resolve the packages ---------------------------------------------------------------
# One apt-cache call (about 1 s): the candidate records of the metapackage, whose Depends
# names the real kernel package with its exact version, and of busybox-static.
resolve() {
    apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static 2>/dev/null | awk '
        /^Package:/ { pkg = $2 }
        /^Version:/ && pkg == "busybox-static" { bb = $2 }
        /^Depends:/ && pkg == "linux-image-cloud-amd64" {
            n = split(substr($0, 10), deps, ",")
            for (i = 1; i <= n; i++)
                if (match(deps[i], /linux-image-6\.1\.[^ ]*-cloud-amd64 \(= [^)]*\)/)) {
                    split(substr(deps[i], RSTART, RLENGTH), f, /[ ()=]+/)
                    kpkg = f[1]; kver = f[2]
                }
        }
        END { if (kpkg != "" && bb != "") print kpkg, kver, bb }'
}
resolved=$(resolve || true)
if [ -z "$resolved" ]; then
    apt_update
    resolved=$(resolve || true)
fi
[ -n "$resolved" ] ||
    die "cannot resolve linux-image-cloud-amd64 to a linux-image-6.1.*-cloud-amd64 package, or busybox-static"
read -r kpkg kver_pkg bb_ver <<< "$resolved"

stamp="$kpkg=$kver_pkg busybox-static=$bb_ver script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

print_result() {
    local kv
    kv=$(cat "$out/kernel-version")
    echo "Linux guest ($kpkg $kver_pkg, kernel $kv):"
    echo "  $out/bzImage ($(stat -c %s "$out/bzImage") bytes)"
    echo "  $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes)"
    echo "  $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes, the same kernel as an ELF with a PVH entry)"
    echo "  $out/modules.txt"
    echo "Boot it with:"
    echo "  target/release/vmm --kernel $out/bzImage --initrd $out/initramfs.cpio.gz \\"
    echo "      --cmdline \"console=ttyS0 reboot=k panic=-1\" --memory size=512M"
    echo "  (add linux-guest.shell to the command line for a shell on the console)"
}

if [ "${LINUX_GUEST_FORCE:-0}" != 1 ] && [ -f "$out/.stamp" ] &&
   [ "$(cat "$out/.stamp")" = "$stamp" ] && [ -s "$out/bzImage" ] &&
   [ -s "$out/initramfs.cpio.gz" ] && [ -s "$out/kernel-version" ] && [ -s "$out/vmlinux" ]; then
    log "up to date ($stamp)"
    print_result
    exit 0
fi

# --- download and unpack ----------------------------------------------------------------
build="$out/.build"
rm -rf "$build"
mkdir -p "$build/kernel" "$build/busybox" "$build/root"
trap 'rm -rf "$build"' EXIT
# The .debs are kept in OUTPUT_DIR/debs (only the current versions).
debs="$out/debs"
mkdir -p "$debs"
deb_of() { ls "$debs/${1}_"*"_amd64.deb" 2>/dev/null | grep -F "_${2/:/%3a}_" | head -n1 || true; }
for pv in "$kpkg=$kver_pkg" "busybox-static=$bb_ver"; do
    p=${pv%%=*} v=${pv#*=}
    if [ -z "$(deb_of "$p" "$v")" ]; then
        rm -f "$debs/${p}_"*.deb
        log "downloading $p=$v"
        # As root, apt downloads as the _apt user, which cannot write here.
        (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$p=$v" >&2)
    fi
    [ -n "$(deb_of "$p" "$v")" ] || die "apt-get download $p=$v gave no .deb"
done
dpkg-deb -x "$(deb_of "$kpkg" "$kver_pkg")" "$build/kernel"
dpkg-deb -x "$(deb_of busybox-static "$bb_ver")" "$build/busybox"

vmlinuz=$(ls "$build/kernel/boot/"vmlinuz-* | head -n1)
kv=${vmlinuz##*/vmlinuz-}
config="$build/kernel/boot/config-$kv"
moddir="$build/kernel/lib/modules/$kv"
[ -d "$moddir" ] || moddir="$build/kernel/usr/lib/modules/$kv"
[ -f "$vmlinuz" ] && [ -f "$config" ] && [ -d "$moddir" ] || die "unexpected layout of $kpkg"
# A bzImage has "HdrS" at offset 0x202.
[ "$(dd if="$vmlinuz" bs=1 skip=514 count=4 2>/dev/null)" = HdrS ] || die "$vmlinuz is not a bzImage"
log "kernel $kv"

# --- vmlinux: the ELF inside the bzImage --------------------------------------------------
# The setup header gives the compressed payload's place (setup_sects at 0x1f1,
# payload_offset/payload_length at 0x248); all but gzip end in a 4-byte size.
setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$vmlinuz" | tr -d ' ')
[ "$setup_sects" != 0 ] || setup_sects=4
read -r payload_offset payload_length < <(od -An -tu4 -j $((0x248)) -N8 "$vmlinuz")
payload_start=$(( (setup_sects + 1) * 512 + payload_offset ))
magic=$(od -An -tx1 -j "$payload_start" -N6 "$vmlinuz" | tr -d ' \n')
case $magic in
    02214c18*) decompress=(lz4 -dc) trailer=4 ;;
    fd377a585a00) decompress=(xz -dc) trailer=4 ;;
    28b52ffd*) decompress=(zstd -qdc) trailer=4 ;;
    1f8b*) decompress=(gzip -dc) trailer=0 ;;
    *) die "unknown bzImage payload compression (magic $magic)" ;;
esac
dd if="$vmlinuz" bs=64K iflag=skip_bytes,count_bytes status=none \
    skip="$payload_start" count=$((payload_length - trailer)) | "${decompress[@]}" > "$build/vmlinux"
[ "$(od -An -tx1 -N4 "$build/vmlinux" | tr -d ' \n')" = 7f454c46 ] ||
    die "the bzImage payload did not decompress to an ELF vmlinux"

# --- modules: built in, .ko or absent ---------------------------------------------------
# The package ships modules.order and modules.builtin; modules.dep is made by depmod at
# install time, so make it here the same way.
if [ ! -f "$moddir/modules.dep" ]; then
    depmod -b "${moddir%/lib/modules/$kv}" "$kv"
fi
declare -A ko_path=()     # module name -> path relative to $moddir
declare -A ko_deps=()     # module name -> its dependencies (names)
modname() { REPLY=${1##*/}; REPLY=${REPLY%%.ko*}; REPLY=${REPLY//-/_}; }  # no subshell
while IFS= read -r line; do
    file=${line%%:*}
    modname "$file"; name=$REPLY
    ko_path[$name]=$file
    deps=""
    for d in ${line#*:}; do modname "$d"; deps+=" $REPLY"; done
    ko_deps[$name]=$deps
done < "$moddir/modules.dep"
declare -A builtin=()
while IFS= read -r file; do modname "$file"; builtin[$REPLY]=1; done < "$moddir/modules.builtin"

declare -A loaded=()
load_order=()
visit() {  # depth-first: a module after everything it depends on
    local m=$1 d
    [ -n "${loaded[$m]:-}" ] && return 0
    loaded[$m]=1
    for d in ${ko_deps[$m]:-}; do visit "$d"; done
    load_order+=("$m")
}
: > "$build/modules.txt"
for m in "${wanted_modules[@]}"; do
    sym=${kconfig[$m]}
    setting=$(grep -E "^$sym=|^# $sym is not set" "$config" || echo "$sym absent")
    if [ -n "${ko_path[$m]:-}" ]; then
        state=module
        visit "$m"
    elif [ -n "${builtin[$m]:-}" ]; then
        state=built-in
    else
        state=absent
    fi
    printf '%-22s %-9s (%s)\n' "$m" "$state" "$setting" >> "$build/modules.txt"
done
# Dependencies pulled in beyond the wanted list (none expected).
for m in "${load_order[@]}"; do
    case " ${wanted_modules[*]} " in *" $m "*) ;; *)
        printf '%-22s %-9s (dependency)\n' "$m" module >> "$build/modules.txt" ;;
    esac
done
sed 's/^/build-linux:   /' "$build/modules.txt" >&2

# --- the initramfs tree -----------------------------------------------------------------
root="$build/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,lib/modules/"$kv"}
cp "$build/busybox/bin/busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
"$root/bin/busybox" --list-full | while IFS= read -r applet; do
    [ "$applet" = bin/busybox ] || [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
# The kernel opens /dev/console before running /init (its built-in initramfs has one too).
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
fi

modlist="$root/lib/modules/$kv/load-order"
: > "$modlist"
for m in "${load_order[@]}"; do
    src="$moddir/${ko_path[$m]}"
    dst="$root/lib/modules/$kv/$m.ko"
    case "$src" in
        *.ko.xz) xz -dc "$src" > "$dst" ;;
        *.ko.gz) gzip -dc "$src" > "$dst" ;;
        *.ko.zst) command -v zstd >/dev/null || die "$src needs zstd"; zstd -qdc "$src" > "$dst" ;;
        *.ko) cp "$src" "$dst" ;;
        *) die "unknown module file $src" ;;
    esac
    echo "$m" >> "$modlist"
done
cp "$build/modules.txt" "$root/lib/modules/$kv/modules.txt"

cat > "$root/init" <<'EOF'
#!/bin/sh
# /init of the linux-guest initramfs (made by resources/linux/build-linux.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
kv=$(uname -r)
echo "linux-guest: init started kernel=$kv"
for m in $(cat /lib/modules/$kv/load-order 2>/dev/null); do
    insmod /lib/modules/$kv/$m.ko || echo "linux-guest: insmod $m failed"
done
# Give the drivers' probes a moment to register their devices.
i=0
while [ $i -lt 10 ] && [ -z "$(ls /sys/class/block 2>/dev/null)" ]; do
    sleep 0.1; i=$((i + 1))
done
blk=$(echo $(ls /sys/class/block 2>/dev/null | grep -v -e '^loop' -e '^ram'))
net=$(echo $(ls /sys/class/net 2>/dev/null))
echo "linux-guest: blk ${blk:-none}"
echo "linux-guest: net ${net:-none}"
# Which virtio driver bound each virtio device (virtio_blk, virtio_net, virtio_balloon).
drivers=""
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/driver" ] && drivers="$drivers $(basename "$(readlink "$d/driver")")"
done
echo "linux-guest: virtio-drivers${drivers:- none}"
cpus=$(grep -c ^processor /proc/cpuinfo)
echo "linux-guest: cpus $cpus"
if grep -qw linux-guest.shell /proc/cmdline; then
    echo "linux-guest: shell (exit it to end the VM)"
    setsid cttyhack sh || sh
fi
echo "linux-guest: done"
sync
# Without ACPI the kernel turns a power-off into a halt that never returns, so choose.
if [ -d /sys/firmware/acpi ]; then
    poweroff -f
    sleep 1
fi
reboot -f
sleep 5
echo "linux-guest: reboot -f returned"
EOF
chmod 755 "$root/init"

log "packing the initramfs"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
    gzip -9n > "$build/initramfs.cpio.gz"

# --- install the artifacts --------------------------------------------------------------
cp "$vmlinuz" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
mv "$build/vmlinux" "$out/vmlinux"
mv "$build/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
mv "$build/modules.txt" "$out/modules.txt"
echo "$kv" > "$out/kernel-version"
echo "$stamp" > "$out/.stamp"
print_result
