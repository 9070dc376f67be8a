//! Guest RAM: the host mappings behind it, and the VMM-side dirty bitmap.
//!
//! Every region carries vm-memory's `AtomicBitmap`, which records the pages
//! the VMM itself writes (virtio rings, data read from disks): KVM's dirty
//! log does not see those, and live migration ORs both.

use std::fs::File;
use std::os::fd::FromRawFd;

use config::{MemoryBacking, MemoryConfig};
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
    #[error(
        "memory: the guest's {guest_mib} MiB is more than this host has \
         ({ram_mib} MiB RAM + {swap_mib} MiB swap); if that is intended, say so \
         with memory.overcommit (--memory size=...,overcommit=on)"
    )]
    TooBig {
        guest_mib: u64,
        ram_mib: u64,
        swap_mib: u64,
    },
}

impl MemoryError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            MemoryError::TooBig { .. } => config::ErrorClass::Caller,
            _ => config::ErrorClass::Host,
        }
    }
}

/// The host's MemTotal and SwapTotal in bytes, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<(u64, u64)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("SwapTotal:")?))
}

/// Refuses a guest bigger than the host's RAM plus swap, unless the config
/// says overcommit is intended: it would run until the host's OOM killer
/// picks a process, this VMM or another.
pub fn check_fits_host(config: &MemoryConfig) -> Result<(), MemoryError> {
    if config.overcommit {
        return Ok(());
    }
    // Without /proc/meminfo there is nothing to check against.
    let Some((ram, swap)) = host_memory_bytes() else {
        return Ok(());
    };
    if config.size_bytes() > ram.saturating_add(swap) {
        return Err(MemoryError::TooBig {
            guest_mib: config.size_mib,
            ram_mib: ram >> 20,
            swap_mib: swap >> 20,
        });
    }
    Ok(())
}

/// Maps guest RAM as `config` asks, with transparent huge pages if
/// `huge_pages` (anonymous memory only).
pub fn create_guest_memory(
    config: &MemoryConfig,
    huge_pages: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    check_fits_host(config)?;
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
                // hugetlbfs pages are reserved at mmap time (no NORESERVE), so
                // a host without enough of them refuses here instead of the
                // guest dying of SIGBUS later.
                let noreserve = if config.backing == MemoryBacking::Hugetlbfs {
                    0
                } else {
                    libc::MAP_NORESERVE
                };
                builder
                    .with_mmap_flags(libc::MAP_SHARED | noreserve)
                    .with_file_offset(FileOffset::new(f, file_offset))
                    .with_hugetlbfs(config.backing == MemoryBacking::Hugetlbfs)
            }
        };
        let mapping = builder.build().map_err(|e| {
            if config.backing == MemoryBacking::Hugetlbfs {
                map_error(format!(
                    "{e} (hugetlbfs backing needs {} free 2 MiB huge pages: see /proc/sys/vm/nr_hugepages)",
                    len.div_ceil(HUGE_PAGE_SIZE)
                ))
            } else {
                map_error(e.to_string())
            }
        })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| map_error("region wraps the address space".into()))?;
        regions.push(region);
        file_offset += len;
    }
    let memory =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))?;
    // Guest RAM stays out of the VMM's core dumps: it is the guest's data,
    // and gigabytes of it.
    madvise_all(&memory, libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
    if config.mergeable {
        madvise_all(&memory, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
    }
    if huge_pages {
        // Fewer, larger faults: a migration target fills 1 GiB several times
        // faster, and the guest's TLB covers more (as QEMU and Cloud
        // Hypervisor do by default).
        madvise_all(&memory, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
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
            ..Default::default()
        }
    }

    #[test]
    fn anonymous_and_memfd_memory_is_usable_and_tracks_vmm_writes() {
        for backing in [MemoryBacking::Anonymous, MemoryBacking::Memfd] {
            let mem = create_guest_memory(&config(backing), false).unwrap();
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

/// The host address of `[gpa, gpa + len)` if it lies inside one region.
pub fn host_range(memory: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<*mut u8> {
    let region = memory.find_region(GuestAddress(gpa))?;
    let offset = gpa - region.start_addr().0;
    if offset.checked_add(len)? > region.len() {
        return None;
    }
    // SAFETY: offset + len is inside the region's mapping (checked above).
    Some(unsafe { region.as_ptr().add(offset as usize) })
}

/// Whether the page at `ptr` is all zero bytes.
///
/// # Safety
/// `ptr` must point to a mapped guest page of [`PAGE_SIZE`] bytes. The guest
/// may write it concurrently; a torn read only makes the page look dirty or
/// clean for one round, and the dirty log sends it again.
pub unsafe fn is_zero_page(ptr: *const u8) -> bool {
    let words = ptr.cast::<u64>();
    (0..(PAGE_SIZE as usize / 8)).all(|i| {
        // SAFETY: i * 8 < PAGE_SIZE and the caller guarantees the page is mapped;
        // volatile because the guest may write it concurrently.
        unsafe { std::ptr::read_volatile(words.add(i)) == 0 }
    })
}

/// The /proc/self files the VMM reads while it runs, opened at start by a
/// VMM that drops root (`--user`): changing credentials makes the process
/// non-dumpable, and the kernel then gives its /proc files to root. Kept
/// open, they still read (with pread, so threads can share them).
static PROC_SELF: std::sync::OnceLock<Vec<(&'static str, File)>> = std::sync::OnceLock::new();

/// Opens the /proc/self files [`read_proc_self`] and [`touched_pages`] use,
/// and keeps them for the life of the process.
pub fn keep_proc_self_open() {
    let files = [
        "pagemap",
        "smaps_rollup",
        "statm",
        "ksm_merging_pages",
        "ksm_stat",
    ]
    .into_iter()
    // Missing ones (older kernels) are missing later too.
    .filter_map(|name| Some((name, File::open(format!("/proc/self/{name}")).ok()?)))
    .collect();
    let _ = PROC_SELF.set(files);
}

/// Runs `f` on /proc/self/`name`: the file kept open at start, or opened now.
fn with_proc_self<T>(
    name: &str,
    f: impl FnOnce(&File) -> std::io::Result<T>,
) -> std::io::Result<T> {
    if let Some((_, file)) = PROC_SELF
        .get()
        .and_then(|files| files.iter().find(|(n, _)| *n == name))
    {
        return f(file);
    }
    f(&File::open(format!("/proc/self/{name}"))?)
}

/// The text of /proc/self/`name`.
pub fn read_proc_self(name: &str) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    with_proc_self(name, |file| {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = file.read_at(&mut buf, text.len() as u64)?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    })
}

/// Pages of `region` the host has ever backed (present or swapped), from
/// /proc/self/pagemap: the others were never touched and read as zero.
pub fn touched_pages(region: &GuestRegionMmap) -> std::io::Result<migration::bitmap::DirtyBitmap> {
    with_proc_self("pagemap", |pagemap| touched_pages_in(region, pagemap))
}

fn touched_pages_in(
    region: &GuestRegionMmap,
    pagemap: &File,
) -> std::io::Result<migration::bitmap::DirtyBitmap> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pages = (region.len() / PAGE_SIZE) as usize;
    let mut bitmap = migration::bitmap::DirtyBitmap::new(pages);
    let first = region.as_ptr() as u64 / PAGE_SIZE;
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = 0;
    while page < pages {
        let chunk = (pages - page).min(4096);
        pagemap.read_exact_at(&mut buf[..chunk * 8], (first + page as u64) * 8)?;
        for (i, entry) in buf[..chunk * 8].chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & (PRESENT | SWAPPED) != 0 {
                bitmap.set(page + i);
            }
        }
        page += chunk;
    }
    Ok(bitmap)
}

/// Gives `[gpa, gpa + len)` back to the host; the guest reads zeros there
/// afterwards. Private anonymous memory is dropped with MADV_DONTNEED,
/// file-backed (memfd, hugetlbfs) memory by punching a hole.
pub fn discard_range(memory: &GuestMemoryMmap, gpa: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let region = memory
        .find_region(GuestAddress(gpa))
        .ok_or_else(|| std::io::Error::other(format!("{gpa:#x} is not guest RAM")))?;
    let offset = gpa - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(std::io::Error::other(format!(
            "{gpa:#x}+{len:#x} crosses the end of guest RAM"
        )));
    }
    match region.file_offset() {
        None => {
            let host = host_range(memory, gpa, len).expect("range checked above");
            // SAFETY: host..host+len is inside this region's private anonymous
            // mapping; MADV_DONTNEED keeps the mapping and zero-fills it.
            let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Some(file) => {
            let at = file.start() + offset;
            // SAFETY: fallocate on the region's own fd, within its size.
            let rc = unsafe {
                libc::fallocate(
                    file.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    at as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod range_tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn touched_pages_zero_detection_and_discard() {
        for backing in [MemoryBacking::Anonymous, MemoryBacking::Memfd] {
            let mem = create_guest_memory(
                &MemoryConfig {
                    size_mib: 16,
                    backing,
                    ..Default::default()
                },
                false,
            )
            .unwrap();
            mem.write_obj(7u64, GuestAddress(0x3000)).unwrap();
            let region = mem.find_region(GuestAddress(0)).unwrap();
            let touched = touched_pages(region).unwrap();
            assert!(touched.is_set(3), "{backing:?}");
            assert!(
                touched.count() < 8,
                "{backing:?}: {} pages",
                touched.count()
            );
            let page = host_range(&mem, 0x3000, PAGE_SIZE).unwrap();
            // SAFETY: a mapped guest page.
            assert!(!unsafe { is_zero_page(page) });
            discard_range(&mem, 0x3000, PAGE_SIZE).unwrap();
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
            // SAFETY: as above.
            assert!(unsafe { is_zero_page(page) });
            assert!(discard_range(&mem, (16 << 20) - 0x1000, 0x2000).is_err());
            assert!(host_range(&mem, 16 << 20, 1).is_none());
        }
    }
}

/// What KSM does for this process: `/proc/self/ksm_merging_pages` and
/// `/proc/self/ksm_stat` (Linux 6.1+; fields absent on older kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KsmProcessStats {
    /// Pages of this process currently merged with identical pages.
    pub merging_pages: Option<u64>,
    /// Pages KSM tracks (has scanned) in this process.
    pub rmap_items: Option<u64>,
    /// Bytes saved minus KSM's metadata for this process (may be negative).
    pub process_profit: Option<i64>,
}

impl KsmProcessStats {
    /// This process's figures.
    pub fn read() -> KsmProcessStats {
        let merging = read_proc_self("ksm_merging_pages").ok();
        let stat = read_proc_self("ksm_stat").unwrap_or_default();
        Self::parse(merging.as_deref(), &stat)
    }

    /// From the text of `ksm_merging_pages` (if present) and `ksm_stat`.
    pub fn parse(merging_pages: Option<&str>, ksm_stat: &str) -> KsmProcessStats {
        let field = |name: &str| {
            ksm_stat.lines().find_map(|line| {
                let (key, value) = line.split_once(char::is_whitespace)?;
                (key.trim_end_matches(':') == name).then(|| value.trim().to_string())
            })
        };
        KsmProcessStats {
            merging_pages: merging_pages
                .and_then(|t| t.trim().parse().ok())
                .or_else(|| field("ksm_merging_pages")?.parse().ok()),
            rmap_items: field("ksm_rmap_items").and_then(|v| v.parse().ok()),
            process_profit: field("ksm_process_profit").and_then(|v| v.parse().ok()),
        }
    }
}

#[cfg(test)]
mod ksm_tests {
    use super::*;

    #[test]
    fn ksm_figures_parse() {
        let stat = "ksm_rmap_items 120\nksm_zero_pages 0\nksm_merging_pages 7\n\
                    ksm_process_profit -4096\nksm_merge_any: no\nksm_mergeable: yes\n";
        assert_eq!(
            KsmProcessStats::parse(Some("9\n"), stat),
            KsmProcessStats {
                merging_pages: Some(9),
                rmap_items: Some(120),
                process_profit: Some(-4096),
            }
        );
        // Without the merging_pages file, ksm_stat's line; an old kernel has neither.
        assert_eq!(KsmProcessStats::parse(None, stat).merging_pages, Some(7));
        assert_eq!(KsmProcessStats::parse(None, ""), KsmProcessStats::default());
        // This kernel has them.
        if std::path::Path::new("/proc/self/ksm_stat").exists() {
            let here = KsmProcessStats::read();
            assert!(here.merging_pages.is_some() && here.rmap_items.is_some());
        }
    }
}
