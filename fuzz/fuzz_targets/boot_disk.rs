//! Booting from the guest's own disk: the partition table, ext2/3/4 (and
//! the XFS/btrfs superblocks), fstab, grub.cfg, grubenv and
//! /etc/default/grub, all read from a disk image the guest may have
//! written. Nothing may panic, hang or allocate without bound; what is read
//! stays within the size caps.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(files) = vmm::boot::disk::find_boot_files_in_image(data) {
        // find_boot_files_in_image's caps.
        assert!(files.kernel.len() <= 64 << 20);
        assert!(files.initrd.as_ref().map_or(0, Vec::len) <= 64 << 20);
    }
});
