//! Guest RAM: the host mappings behind it, and the VMM-side dirty bitmap.
//!
//! Every region carries vm-memory's `AtomicBitmap`, which records the pages
//! the VMM itself writes (virtio rings, data read from disks): KVM's dirty
//! log does not see those, and live migration ORs both.

use std::fs::File;
use std::os::fd::FromRawFd;

use api::config::{MemoryBacking, MemoryConfig};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;

pub use devices::GuestMemoryMmap;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Guest pages are 4 KiB for dirty tracking, ballooning and migration.
pub const PAGE_SIZE: u64 = 4096;
/// Hugetlbfs backing uses 2 MiB pages.
const HUGE_PAGE_SIZE: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the memfd backing guest memory: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the memory backing to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map {size} bytes of guest memory at {start:#x}: {message}")]
    Map {
        start: u64,
        size: u64,
        message: String,
    },
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
    #[error("madvise({advice}) on guest memory failed: {source}")]
    Madvise {
        advice: &'static str,
        source: std::io::Error,
    },
}

/// Maps guest RAM as `config` asks.
pub fn create_guest_memory(config: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    let size = config.size_bytes();
    let ranges = layout::ram_ranges(size);
    let file = match config.backing {
        MemoryBacking::Anonymous => None,
        MemoryBacking::Memfd => Some(memfd(size, 0)?),
        MemoryBacking::Hugetlbfs => Some(memfd(size, libc::MFD_HUGETLB | libc::MFD_HUGE_2MB)?),
    };
    let mut regions = Vec::with_capacity(ranges.len());
    let mut file_offset = 0u64;
    for (start, len) in ranges {
        let map_error = |message: String| MemoryError::Map {
            start,
            size: len,
            message,
        };
        let len_usize = usize::try_from(len).map_err(|e| map_error(e.to_string()))?;
        let bitmap = AtomicBitmap::new(
            len_usize,
            std::num::NonZeroUsize::new(PAGE_SIZE as usize).expect("page size is not zero"),
        );
        let mut builder = MmapRegionBuilder::new_with_bitmap(len_usize, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        builder = match &file {
            None => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            Some(f) => {
                let f = f.try_clone().map_err(|e| map_error(e.to_string()))?;
                builder
                    .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                    .with_file_offset(FileOffset::new(f, file_offset))
                    .with_hugetlbfs(config.backing == MemoryBacking::Hugetlbfs)
            }
        };
        let mapping = builder.build().map_err(|e| map_error(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| map_error("region wraps the address space".into()))?;
        regions.push(region);
        file_offset += len;
    }
    let memory =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))?;
    if config.mergeable {
        madvise_all(&memory, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
    }
    Ok(memory)
}

/// A memfd of `size` bytes (hugetlbfs if `flags` says so).
fn memfd(size: u64, flags: libc::c_uint) -> Result<File, MemoryError> {
    let name = c"vmm-guest-ram";
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a
    // new fd we own or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let rounded = if flags & libc::MFD_HUGETLB != 0 {
        size.div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
    } else {
        size
    };
    file.set_len(rounded)
        .map_err(|source| MemoryError::Truncate {
            size: rounded,
            source,
        })?;
    Ok(file)
}

/// Applies `advice` to every region's host mapping.
pub fn madvise_all(
    memory: &GuestMemoryMmap,
    advice: libc::c_int,
    name: &'static str,
) -> Result<(), MemoryError> {
    for region in memory.iter() {
        let host = region.as_ptr();
        let len = region.len() as usize;
        // SAFETY: host..host+len is this region's own live mapping; madvise
        // does not invalidate it for the advices we use (MERGEABLE etc.).
        let rc = unsafe { libc::madvise(host.cast(), len, advice) };
        if rc != 0 {
            return Err(MemoryError::Madvise {
                advice: name,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Total guest RAM in bytes.
pub fn total_size(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn config(backing: MemoryBacking) -> MemoryConfig {
        MemoryConfig {
            size_mib: 16,
            backing,
            mergeable: false,
        }
    }

    #[test]
    fn anonymous_and_memfd_memory_is_usable_and_tracks_vmm_writes() {
        for backing in [MemoryBacking::Anonymous, MemoryBacking::Memfd] {
            let mem = create_guest_memory(&config(backing)).unwrap();
            assert_eq!(total_size(&mem), 16 << 20);
            mem.write_obj(0xdead_beefu32, GuestAddress(0x5000)).unwrap();
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
                0xdead_beef
            );
            let region = mem.find_region(GuestAddress(0)).unwrap();
            let bitmap = region.bitmap();
            use vm_memory::bitmap::Bitmap;
            assert!(bitmap.dirty_at(0x5000));
            assert!(!bitmap.dirty_at(0x6000));
        }
    }
}
