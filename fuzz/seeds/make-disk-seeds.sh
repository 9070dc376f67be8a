#!/usr/bin/env bash
# Writes the disk image seeds of boot_disk and boot_partition (committed;
# run again after changing them): a small Debian-like root filesystem
# (ext2, 1 KiB blocks, /etc, /boot with a kernel, an initrd, grub.cfg and
# grubenv), as a whole-disk filesystem, behind an MBR table and behind a
# GPT. Needs mkfs.ext2 (e2fsprogs) and sfdisk (fdisk).
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tree=$work/tree
mkdir -p "$tree/etc/default" "$tree/boot/grub"
echo "UUID=5e3c0a44-0000-4000-8000-000000000001 / ext2 defaults 0 1" > "$tree/etc/fstab"
echo 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' > "$tree/etc/default/grub"
printf 'KERNEL 6.1.0-18' > "$tree/boot/vmlinuz-6.1.0-18-amd64"
printf 'INITRD 6.1.0-18' > "$tree/boot/initrd.img-6.1.0-18-amd64"
printf 'KERNEL 6.1.0-9' > "$tree/boot/vmlinuz-6.1.0-9-amd64"
ln -s boot/vmlinuz-6.1.0-18-amd64 "$tree/vmlinuz"
ln -s boot/initrd.img-6.1.0-18-amd64 "$tree/initrd.img"
cat > "$tree/boot/grub/grub.cfg" <<'CFG'
set default="0"
load_env
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple' {
	linux	/boot/vmlinuz-6.1.0-18-amd64 root=UUID=5e3c0a44-0000-4000-8000-000000000001 ro quiet
	initrd	/boot/initrd.img-6.1.0-18-amd64
}
CFG
printf '# GRUB Environment Block\nsaved_entry=gnulinux-simple\n' > "$tree/boot/grub/grubenv"

fs=$work/fs
# 192 KiB: about the smallest ext2 that holds the tree.
mkfs.ext2 -q -F -b 1024 -N 32 -m 0 -U 5e3c0a44-0000-4000-8000-000000000001 -d "$tree" "$fs" 192k >/dev/null

rm -rf boot_disk boot_partition
mkdir -p boot_disk boot_partition
cp "$fs" boot_disk/whole-disk-ext2

disk() { # NAME LABEL TYPE: the filesystem as partition 1 at sector 64
    local out=boot_disk/$1
    truncate -s $((64 * 512 + 192 * 1024 + 64 * 512)) "$out"
    printf 'label: %s\nstart=64, size=384, type=%s\n' "$2" "$3" | sfdisk -q "$out" >/dev/null
    dd if="$fs" of="$out" bs=512 seek=64 conv=notrunc status=none
}
disk mbr-ext2 dos 83
disk gpt-ext2 gpt 0FC63DAF-8483-4772-8E79-3D69D8477DE4

# Tables alone, on 48 KiB disks, for boot_partition: GPT with two
# partitions, MBR with an extended partition holding two logical ones.
table() { # NAME SFDISK-SCRIPT
    local out=boot_partition/$1
    rm -f "$out"
    truncate -s $((96 * 512)) "$out"
    printf '%b' "$2" | sfdisk -q "$out" >/dev/null
}
table gpt 'label: gpt\nstart=40, size=8, type=L\nstart=48, size=8, type=S\n'
table mbr-logical 'label: dos\nstart=8, size=8, type=83\nstart=16, size=64, type=5\nstart=24, size=8, type=83\nstart=40, size=8, type=82\n'
ls -l boot_disk boot_partition
