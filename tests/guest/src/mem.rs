//! Guest RAM: what there is, what is free for workloads, and the page-table
//! extension for RAM above 4 GiB.
//!
//! Free RAM = the E820 RAM ranges from the PVH memory map, minus everything
//! below the end of the image (`__image_end`), clipped to the mapped range.
//! Workload regions (`pages`, `memfill`) are carved from it by [`choose`],
//! after taking out the two reservations of the virtio drivers: the DMA
//! arena (top of the largest range) and the pages the balloon holds
//! (bottom of the free RAM, see [`balloon_take`]).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::{BootInfo, E820_RAM};
use crate::sync::{BootCell, SpinLock};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const PAGE: u64 = 4096;
/// PCI hole start: no RAM is expected (or used) in [3 GiB, 4 GiB).
const HOLE_START: u64 = 0xc000_0000;
/// Highest address ring 3 maps (64 GiB; PDPT entries 4..63 are added here).
const MAX_MAPPED: u64 = 64 * GIB;
const MAX_RANGES: usize = 16;

extern "C" {
    static __image_end: u8;
    static mut pdpt: [u64; 512];
    static mut pt_first: [u64; 512];
}

/// Make page 0 non-present so that null-pointer accesses fault. Called once
/// the boot data (which may live in page 0) has been copied.
pub fn unmap_page0() {
    // SAFETY: page-table entry of page 0, which nothing uses any more.
    unsafe { core::ptr::write_volatile(&raw mut pt_first[0], 0) };
    crate::gate::flush_tlb();
}

/// Page directories for RAM in [4 GiB, 64 GiB). In the NOLOAD `.stacks`
/// section rather than `.bss` so that the boot path does not zero (and
/// first-touch) 240 KiB before the first output; `map_high` writes every
/// entry of a directory before using it.
#[repr(C, align(4096))]
struct PageDirs([[u64; 512]; 60]);
#[link_section = ".stacks"]
static mut HIGH_PDS: PageDirs = PageDirs([[0; 512]; 60]);

#[derive(Clone, Copy, Default, Debug)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
}

struct MemInfo {
    total: u64,
    free: [Range; MAX_RANGES],
    nfree: usize,
}

static INFO: BootCell<MemInfo> = BootCell::new();
static MAPPED_END: AtomicU64 = AtomicU64::new(4 * GIB);

/// Total RAM in the memory map, in MiB (rounded down).
pub fn total_mib() -> u64 {
    INFO.get().map_or(0, |m| m.total / MIB)
}

/// Free RAM ranges usable by workloads (ascending).
pub fn free_ranges() -> &'static [Range] {
    INFO.get().map_or(&[], |m| &m.free[..m.nfree])
}

/// Map RAM in [4 GiB, 64 GiB) with 2 MiB pages (user, RW): new PDPT entries
/// for previously non-present slots, so no TLB flush is needed.
fn map_high(ranges: &[Range]) {
    let mut highest = 4 * GIB;
    for r in ranges {
        highest = highest.max(r.end.min(MAX_MAPPED));
    }
    let gigs = highest.div_ceil(GIB);
    let pds = &raw mut HIGH_PDS;
    let pdpt_ptr = &raw mut pdpt;
    for g in 4..gigs {
        let pd = (g - 4) as usize;
        // SAFETY: single-threaded boot; these tables are not in use yet
        // (their PDPT slot is still non-present).
        unsafe {
            for (i, e) in (*pds).0[pd].iter_mut().enumerate() {
                *e = (g * GIB + i as u64 * 2 * MIB) | 0x87;
            }
            let pd_addr = (&raw const (*pds).0[pd]) as u64;
            core::ptr::write_volatile(&raw mut (*pdpt_ptr)[g as usize], pd_addr | 0x07);
        }
    }
    MAPPED_END.store(gigs.max(4) * GIB, Ordering::Relaxed);
}

pub fn init(boot: &BootInfo) {
    let image_end = &raw const __image_end as u64;
    let mut total = 0;
    let mut ram = [Range::default(); MAX_RANGES];
    let mut nram = 0;
    for e in boot.memmap() {
        if e.kind != E820_RAM || e.size == 0 {
            continue;
        }
        total += e.size;
        if nram < MAX_RANGES {
            ram[nram] = Range {
                start: e.addr,
                end: e.addr.saturating_add(e.size),
            };
            nram += 1;
        }
    }
    map_high(&ram[..nram]);
    let mapped = MAPPED_END.load(Ordering::Relaxed);
    let free_floor = image_end.next_multiple_of(MIB);
    let mut info = MemInfo {
        total,
        free: [Range::default(); MAX_RANGES],
        nfree: 0,
    };
    for r in &ram[..nram] {
        let mut start = r.start.max(free_floor).next_multiple_of(PAGE);
        let mut end = (r.end & !(PAGE - 1)).min(mapped);
        if start < HOLE_START && end > HOLE_START {
            end = HOLE_START;
        }
        if (HOLE_START..4 * GIB).contains(&start) {
            start = 4 * GIB;
        }
        if end > start {
            info.free[info.nfree] = Range { start, end };
            info.nfree += 1;
        }
    }
    info.free[..info.nfree].sort_unstable_by_key(|r| r.start);
    INFO.set(info);
}

/// [`free_ranges`] minus the DMA arena of the virtio drivers, once it is
/// reserved.
fn arena_free_ranges() -> ([Range; MAX_RANGES], usize) {
    let mut out = [Range::default(); MAX_RANGES];
    let mut n = 0;
    let (dma_base, dma_end) = (
        DMA_BASE.load(Ordering::Acquire),
        DMA_END.load(Ordering::Acquire),
    );
    let used = USED_BYTES.load(Ordering::Acquire);
    for r in free_ranges() {
        let mut r = *r;
        if dma_end > dma_base && r.start <= dma_base && dma_end <= r.end {
            // The arena is at the top of its range, the guest's "used"
            // memory right below it.
            r.end = dma_base - used.min(dma_base - r.start);
        }
        if r.end > r.start {
            out[n] = r;
            n += 1;
        }
    }
    (out, n)
}

/// Most pieces [`workload_ranges`] can return: every balloon run can split
/// one range in two.
const MAX_PIECES: usize = MAX_RANGES + MAX_BALLOON_RUNS;

/// Free ranges for workloads: [`free_ranges`] minus the DMA arena and minus
/// the pages the balloon holds (ascending).
fn workload_ranges() -> ([Range; MAX_PIECES], usize) {
    let (ranges, nr) = arena_free_ranges();
    let balloon = BALLOON.lock();
    let runs = &balloon.runs[..balloon.n];
    let mut out = [Range::default(); MAX_PIECES];
    let mut n = 0;
    for r in &ranges[..nr] {
        let mut start = r.start;
        // Runs are ascending and disjoint.
        for b in runs {
            if b.end <= start || b.start >= r.end {
                continue;
            }
            if b.start > start && n < MAX_PIECES {
                out[n] = Range {
                    start,
                    end: b.start,
                };
                n += 1;
            }
            start = start.max(b.end);
        }
        if r.end > start && n < MAX_PIECES {
            out[n] = Range { start, end: r.end };
            n += 1;
        }
    }
    (out, n)
}

/// Bytes of free RAM left for workloads (what the balloon driver reports
/// as free and available memory).
pub fn workload_free_bytes() -> u64 {
    let (ranges, n) = workload_ranges();
    ranges[..n].iter().map(Range::len).sum()
}

/// Total RAM in the memory map, in bytes.
pub fn total_bytes() -> u64 {
    INFO.get().map_or(0, |m| m.total)
}

/// Choose a region of `mib` MiB starting `off_mib` MiB into a free range
/// (free RAM minus the DMA arena and the balloon's pages): the first
/// (lowest) range that fits; if none does, the largest range, clamped.
/// Returns (base, bytes); None if there is no free RAM at all.
pub fn choose(mib: u64, off_mib: u64) -> Option<(u64, u64)> {
    let want = mib.saturating_mul(MIB);
    let off = off_mib.saturating_mul(MIB);
    let (ranges, n) = workload_ranges();
    let ranges = &ranges[..n];
    if let Some(r) = ranges.iter().find(|r| r.len() >= off.saturating_add(want)) {
        return Some((r.start + off, want));
    }
    let r = ranges.iter().max_by_key(|r| r.len())?;
    if r.len() <= off + PAGE {
        return None;
    }
    Some((r.start + off, (r.len() - off) & !(PAGE - 1)))
}

/// Fill `[base, base + bytes)` with the 8-byte `pattern`.
pub fn fill(base: u64, bytes: u64, pattern: u64) {
    let words = (bytes / 8) as usize;
    // SAFETY: the caller passes a region from `choose` (free, mapped RAM).
    let s = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, words) };
    s.fill(pattern);
}

/// First address in `[base, base + bytes)` not holding `pattern`, with the
/// value found there.
pub fn check(base: u64, bytes: u64, pattern: u64) -> Option<(u64, u64)> {
    let words = (bytes / 8) as usize;
    // SAFETY: as for `fill`.
    let s = unsafe { core::slice::from_raw_parts(base as *const u64, words) };
    s.iter()
        .position(|&w| w != pattern)
        .map(|i| (base + 8 * i as u64, s[i]))
}

// ----------------------------------------------------------- DMA arena ----

/// The virtio drivers' memory (rings, request headers, data buffers): the
/// top of the largest free range, reserved on first use (so that guests
/// that never touch a virtio device keep all free RAM for workloads) and
/// excluded from [`choose`] from then on. Never freed.
static DMA_BASE: AtomicU64 = AtomicU64::new(0);
static DMA_END: AtomicU64 = AtomicU64::new(0);
static DMA_NEXT: AtomicU64 = AtomicU64::new(0);
/// Arena size (less on small guests: at most a quarter of the range).
pub const DMA_ARENA: u64 = 12 * MIB;

/// The arena (base, end), if reserved.
pub fn dma_arena() -> Option<(u64, u64)> {
    let (b, e) = (
        DMA_BASE.load(Ordering::Acquire),
        DMA_END.load(Ordering::Acquire),
    );
    (e > b).then_some((b, e))
}

/// The arena a reservation would take now (base, end), without taking it.
pub fn dma_candidate() -> Option<(u64, u64)> {
    if let Some(a) = dma_arena() {
        return Some(a);
    }
    let r = free_ranges().iter().max_by_key(|r| r.len())?;
    let size = DMA_ARENA.min((r.len() / 4) & !(PAGE - 1));
    (size >= 256 * 1024).then(|| (r.end - size, r.end))
}

/// Reserve the arena (once; the BSP only). Returns it.
pub fn dma_reserve() -> Option<(u64, u64)> {
    if let Some(a) = dma_arena() {
        return Some(a);
    }
    let (base, end) = dma_candidate()?;
    DMA_NEXT.store(base, Ordering::Release);
    DMA_END.store(end, Ordering::Release);
    DMA_BASE.store(base, Ordering::Release);
    Some((base, end))
}

/// Allocate `bytes` zeroed bytes of the arena, `align`-aligned (a power of
/// two). None when the arena is not reserved or exhausted.
pub fn dma_alloc(bytes: u64, align: u64) -> Option<u64> {
    let end = DMA_END.load(Ordering::Acquire);
    let mut cur = DMA_NEXT.load(Ordering::Acquire);
    loop {
        if cur == 0 {
            return None;
        }
        let start = cur.checked_next_multiple_of(align.max(8))?;
        let next = start.checked_add(bytes)?;
        if next > end {
            return None;
        }
        match DMA_NEXT.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                fill(start, bytes.next_multiple_of(8), 0);
                return Some(start);
            }
            Err(c) => cur = c,
        }
    }
}

// ------------------------------------------------------- balloon pages ----

/// Most runs of ballooned pages; [`balloon_take`] stops taking pages when
/// a new run would not fit.
pub const MAX_BALLOON_RUNS: usize = 32;

/// The pages the virtio-balloon driver gave to the host (or is giving:
/// pages are recorded before the inflate buffer is queued and forgotten
/// only after the device returned the deflate buffer). Runs of pages,
/// ascending and disjoint; taken from the bottom, released from the top
/// (last in, first out).
struct BalloonRuns {
    runs: [Range; MAX_BALLOON_RUNS],
    n: usize,
    pages: u64,
}

static BALLOON: SpinLock<BalloonRuns> = SpinLock::new(BalloonRuns {
    runs: [Range { start: 0, end: 0 }; MAX_BALLOON_RUNS],
    n: 0,
    pages: 0,
});

/// Pages the balloon holds.
pub fn balloon_pages() -> u64 {
    BALLOON.lock().pages
}

/// Reserve up to `out.len()` free pages for the balloon and write their
/// page numbers (4 KiB units) to `out`; returns how many. Pages are taken in
/// ascending order from the first free page above the balloon's highest
/// page (so, from an empty balloon, from the start of the `memfill` area),
/// skipping the DMA arena and `avoid` (the region of a running `pages`
/// workload). From then on [`choose`] never returns them.
pub fn balloon_take(out: &mut [u32], avoid: Option<Range>) -> usize {
    let (ranges, nr) = arena_free_ranges();
    let mut b = BALLOON.lock();
    let mut taken = 0;
    while taken < out.len() {
        let cursor = if b.n > 0 { b.runs[b.n - 1].end } else { 0 };
        // The lowest free piece at or above the cursor.
        let piece = ranges[..nr].iter().find_map(|r| {
            let mut p = Range {
                start: r.start.max(cursor),
                end: r.end,
            };
            if let Some(a) = avoid.filter(|a| a.start < p.end && p.start < a.end) {
                if a.start > p.start {
                    p.end = a.start;
                } else {
                    p.start = a.end;
                }
            }
            (p.end > p.start).then_some(p)
        });
        let Some(piece) = piece else { break };
        // Page numbers are le32: nothing at or above 16 TiB.
        if piece.start / PAGE > u32::MAX as u64 {
            break;
        }
        let want = (out.len() - taken) as u64;
        let count = want.min(piece.len() / PAGE);
        let end = piece.start + count * PAGE;
        let n = b.n;
        if n > 0 && b.runs[n - 1].end == piece.start {
            b.runs[n - 1].end = end;
        } else if n < MAX_BALLOON_RUNS {
            b.runs[n] = Range {
                start: piece.start,
                end,
            };
            b.n += 1;
        } else {
            break;
        }
        for i in 0..count {
            out[taken] = ((piece.start / PAGE) + i) as u32;
            taken += 1;
        }
        b.pages += count;
    }
    taken
}

/// Page numbers of the `out.len()` (at most) most recently taken pages,
/// most recent first, without releasing them; returns how many.
pub fn balloon_top(out: &mut [u32]) -> usize {
    let b = BALLOON.lock();
    let mut k = 0;
    for r in b.runs[..b.n].iter().rev() {
        let mut page = r.end;
        while page > r.start && k < out.len() {
            page -= PAGE;
            out[k] = (page / PAGE) as u32;
            k += 1;
        }
        if k == out.len() {
            break;
        }
    }
    k
}

/// Release the `n` most recently taken pages (once the device has
/// acknowledged their deflation): they are free RAM for workloads again.
pub fn balloon_release(mut n: u64) {
    let mut b = BALLOON.lock();
    while n > 0 && b.n > 0 {
        let top = b.n - 1;
        let r = b.runs[top];
        let k = n.min(r.len() / PAGE);
        b.runs[top].end -= k * PAGE;
        b.pages -= k;
        n -= k;
        if b.runs[top].end == b.runs[top].start {
            b.n -= 1;
        }
    }
}

// ---------------------------------------------------------- used memory ----

/// Memory the guest "uses" (`memuse`): a region right below the DMA arena
/// that workloads and the balloon leave alone and the balloon statistics do
/// not count as free, so that the guest's own memory use can change over
/// time. It grows downwards, only into pages the balloon does not hold.
static USED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes the guest uses.
pub fn used_bytes() -> u64 {
    USED_BYTES.load(Ordering::Acquire)
}

/// Grows the used region by at most `bytes` (whole pages) into free RAM
/// below it, touching every new page so that the host backs it; shrinks it
/// at once when `bytes` is negative. Returns the used bytes after. Needs
/// the DMA arena (reserved here if it is not yet).
pub fn used_change(delta: i64) -> u64 {
    let Some((arena, _)) = dma_reserve() else {
        return 0;
    };
    let used = used_bytes();
    if delta <= 0 {
        let new = used.saturating_sub(delta.unsigned_abs() & !(PAGE - 1));
        USED_BYTES.store(new, Ordering::Release);
        return new;
    }
    // The range holding the arena, and the lowest address the region may
    // reach: above every ballooned page in that range.
    let Some(range) = free_ranges()
        .iter()
        .find(|r| r.start <= arena && arena <= r.end)
    else {
        return used;
    };
    let balloon = BALLOON.lock();
    let floor = balloon.runs[..balloon.n]
        .iter()
        .filter(|b| b.start < arena && b.end > range.start)
        .map(|b| b.end)
        .max()
        .unwrap_or(range.start)
        .max(range.start);
    let base = arena - used;
    let new_base = base
        .saturating_sub((delta as u64) & !(PAGE - 1))
        .max(floor);
    if new_base < base {
        // Touch the pages before they count as used: the host backs them.
        fill(new_base, base - new_base, 0x7573_6564_7573_6564);
        USED_BYTES.store(arena - new_base, Ordering::Release);
    }
    drop(balloon);
    used_bytes()
}
