//! The virtio-balloon device model: features, config space, lifecycle
//! (activate, pause, resume, reset), the map of ballooned pages, and the
//! worker that serves the queues.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use config::BalloonConfig;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    BalloonError, CONFIG_SPACE_SIZE, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_MUST_TELL_HOST,
    F_PAGE_REPORTING, F_STATS_VQ, PAGE_SHIFT, PAGE_SIZE, QUEUE_SIZE, STATS_ENTRY_SIZE,
};
use crate::error::StateError;
use crate::virtio::worker::{DeviceWorker, EventLoop, WorkerHandler};
use crate::virtio::{
    avail_index_is_bogus, complete, counter_map, read_config_space, ActivateContext, ActivateError,
    DeviceState, VirtioDevice, VirtioInterrupt, COMMON_FEATURES, F_EVENT_IDX, TYPE_BALLOON,
};
use crate::GuestMemoryMmap;

/// Page numbers accepted in one inflate or deflate buffer (Linux sends at
/// most 256); a longer buffer is refused as a whole.
pub const MAX_PFNS_PER_BUFFER: usize = 1 << 16;
/// Bytes of a stats buffer that are parsed (Linux sends 16 entries, 160 bytes).
pub const MAX_STATS_BYTES: usize = 4096;
/// Buffers served per wakeup before going back to epoll.
const BUFFERS_PER_WAKEUP: u32 = QUEUE_SIZE as u32;
/// Worker token of the stats timer (queue tokens are the queue indices).
const TIMER_TOKEN: u64 = 1000;
/// Errors logged per device before going quiet.
const MAX_LOGGED_ERRORS: u64 = 16;

/// How the device gives guest memory back to the host; the VMM implements
/// it (madvise, hole punching), so the device knows nothing of the backing.
pub trait BalloonBackend: Send + Sync {
    /// Frees the host memory behind `[gpa, gpa + len)`: page aligned and
    /// inside one RAM region (the device checks). The guest reads zeros
    /// there afterwards.
    fn discard(&self, gpa: u64, len: u64) -> io::Result<()>;
}

/// Where each queue is, from the acked features (virtio 1.2, 5.5.2: a queue
/// exists only if its feature was negotiated, and later queues move down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueIndices {
    pub inflate: usize,
    pub deflate: usize,
    pub stats: Option<usize>,
    pub free_page_hint: Option<usize>,
    pub reporting: Option<usize>,
}

/// The queue indices for the features the driver acked.
pub fn queue_indices(acked_features: u64) -> QueueIndices {
    let mut next = 2;
    let mut take = |bit: u32| {
        (acked_features & (1 << bit) != 0).then(|| {
            next += 1;
            next - 1
        })
    };
    let stats = take(F_STATS_VQ);
    let free_page_hint = take(F_FREE_PAGE_HINT);
    let reporting = take(F_PAGE_REPORTING);
    QueueIndices {
        inflate: 0,
        deflate: 1,
        stats,
        free_page_hint,
        reporting,
    }
}

/// Counters, readable while the worker runs.
#[derive(Debug, Default)]
pub struct BalloonCounters {
    /// Page numbers put in the balloon (valid ones).
    pub inflated_pages: AtomicU64,
    /// Page numbers taken out of the balloon (valid ones).
    pub deflated_pages: AtomicU64,
    /// 4 KiB pages the guest reported free and the host discarded.
    pub reported_pages: AtomicU64,
    /// Page numbers or reported ranges outside guest RAM (ignored).
    pub invalid_pfns: AtomicU64,
    /// Buffers that could not be read (wrong direction, outside memory, too long).
    pub invalid_buffers: AtomicU64,
    /// Ranges the backend failed to discard.
    pub discard_errors: AtomicU64,
    /// Statistics buffers received from the guest.
    pub stats_updates: AtomicU64,
    /// Statistics buffers returned to the guest to ask for fresh ones.
    pub stats_requests: AtomicU64,
    /// Targets set by the host.
    pub target_changes: AtomicU64,
}

impl BalloonCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn to_map(&self) -> BTreeMap<String, u64> {
        counter_map([
            ("inflated_pages", &self.inflated_pages),
            ("deflated_pages", &self.deflated_pages),
            ("reported_pages", &self.reported_pages),
            ("invalid_pfns", &self.invalid_pfns),
            ("invalid_buffers", &self.invalid_buffers),
            ("discard_errors", &self.discard_errors),
            ("stats_updates", &self.stats_updates),
            ("stats_requests", &self.stats_requests),
            ("target_changes", &self.target_changes),
        ])
    }
}

/// The memory statistics the guest last sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestStats {
    /// Unix time in milliseconds when they arrived.
    pub unix_ms: u64,
    /// Tag (`STAT_*`) to value (the last entry of a tag wins).
    pub values: BTreeMap<u16, u64>,
}

impl GuestStats {
    /// The value of tag `tag` (one of the `STAT_*` constants), if the guest sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(&tag).copied()
    }

    /// Milliseconds since the guest sent them.
    pub fn age_ms(&self) -> u64 {
        unix_ms().saturating_sub(self.unix_ms)
    }
}

/// The balloon's size as host and guest see it, and the guest's last
/// statistics: what [`BalloonHandle::report`] gives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonReport {
    /// The target: 4 KiB pages the guest is asked to put in the balloon.
    pub target_pages: u64,
    /// The pages the guest says it has put in the balloon (`actual`).
    pub actual_pages: u64,
    /// Pages in the balloon as the device counts them (inflated and not
    /// deflated since); their host memory was given back.
    pub inflated_pages: u64,
    /// Absent until the guest sent statistics.
    pub guest: Option<GuestStats>,
}

/// The pages of one RAM region that are in the balloon: bit `i` of `words`
/// (least significant bit first) is page `i` of the region, as in KVM's
/// dirty log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionBitmap {
    pub start: u64,
    pub pages: usize,
    pub words: Vec<u64>,
}

/// One bit per 4 KiB page of guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageMap {
    regions: Vec<RegionBitmap>,
    count: u64,
}

impl PageMap {
    /// An empty map of the RAM regions `ram` (start, length in bytes; both
    /// page aligned).
    pub fn new(ram: &[(u64, u64)]) -> PageMap {
        PageMap {
            regions: ram
                .iter()
                .map(|&(start, len)| {
                    let pages = (len / PAGE_SIZE) as usize;
                    RegionBitmap {
                        start,
                        pages,
                        words: vec![0; pages.div_ceil(64)],
                    }
                })
                .collect(),
            count: 0,
        }
    }

    /// The RAM regions as (start, length in bytes).
    pub fn ram(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.start, r.pages as u64 * PAGE_SIZE))
            .collect()
    }

    pub fn ram_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages as u64).sum()
    }

    /// The region and page index of frame `pfn`, if it is RAM.
    pub fn locate(&self, pfn: u64) -> Option<(usize, usize)> {
        let gpa = pfn.checked_mul(PAGE_SIZE)?;
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let page = gpa.checked_sub(r.start)? / PAGE_SIZE;
            (page < r.pages as u64).then_some((i, page as usize))
        })
    }

    /// Sets a page; true if it was not set.
    pub fn set(&mut self, region: usize, page: usize) -> bool {
        let word = &mut self.regions[region].words[page / 64];
        let bit = 1u64 << (page % 64);
        let newly = *word & bit == 0;
        *word |= bit;
        self.count += u64::from(newly);
        newly
    }

    /// Clears a page; true if it was set.
    pub fn clear(&mut self, region: usize, page: usize) -> bool {
        let word = &mut self.regions[region].words[page / 64];
        let bit = 1u64 << (page % 64);
        let was = *word & bit != 0;
        *word &= !bit;
        self.count -= u64::from(was);
        was
    }

    pub fn is_set(&self, pfn: u64) -> bool {
        self.locate(pfn)
            .is_some_and(|(r, p)| self.regions[r].words[p / 64] & (1 << (p % 64)) != 0)
    }

    /// Pages set.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn clear_all(&mut self) {
        for r in &mut self.regions {
            r.words.fill(0);
        }
        self.count = 0;
    }

    pub fn regions(&self) -> &[RegionBitmap] {
        &self.regions
    }

    /// The set pages as (first frame number, count) runs, ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for r in &self.regions {
            let base = r.start / PAGE_SIZE;
            for (w, &word) in r.words.iter().enumerate() {
                if word == 0 {
                    continue;
                }
                for bit in 0..64 {
                    if word & (1 << bit) == 0 {
                        continue;
                    }
                    let pfn = base + (w * 64 + bit) as u64;
                    match runs.last_mut() {
                        Some((first, n)) if *first + *n == pfn => *n += 1,
                        _ => runs.push((pfn, 1)),
                    }
                }
            }
        }
        runs
    }

    /// Sets the pages of `runs`; fails on a page that is not RAM.
    pub fn set_runs(&mut self, runs: &[(u64, u64)]) -> Result<(), StateError> {
        for &(first, count) in runs {
            for pfn in first..first.saturating_add(count) {
                let (r, p) = self.locate(pfn).ok_or_else(|| {
                    StateError::Mismatch(format!("page frame {pfn:#x} is not guest RAM"))
                })?;
                self.set(r, p);
            }
        }
        Ok(())
    }

    /// `[gpa, gpa + len)` split at region boundaries, or None if any part
    /// of it is not RAM.
    pub fn ram_ranges(&self, gpa: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        let end = gpa.checked_add(len)?;
        let mut ranges = Vec::new();
        let mut at = gpa;
        while at < end {
            let region = self
                .regions
                .iter()
                .find(|r| at >= r.start && at - r.start < r.pages as u64 * PAGE_SIZE)?;
            let region_end = region.start + region.pages as u64 * PAGE_SIZE;
            let stop = end.min(region_end);
            ranges.push((at, stop - at));
            at = stop;
        }
        Some(ranges)
    }
}

/// State shared by the device, its worker and [`BalloonHandle`]s.
pub(crate) struct Inner {
    /// The target, in 4 KiB pages (`num_pages`).
    pub(crate) num_pages: u32,
    /// What the guest wrote to `actual`.
    pub(crate) actual: u32,
    pub(crate) acked_features: u64,
    pub(crate) pages: PageMap,
    pub(crate) stats: Option<GuestStats>,
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub(crate) counters: BalloonCounters,
    /// Bumped whenever pages leave the page map (deflate, reset, restore),
    /// after the map changed and before the driver is told.
    removals: AtomicU64,
    /// The driver's interrupt while the device is active (config changes).
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    ram_bytes: u64,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_interrupt(&self, interrupt: Option<Arc<dyn VirtioInterrupt>>) {
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = interrupt;
    }

    pub(crate) fn removed_pages(&self) {
        self.removals.fetch_add(1, Ordering::SeqCst);
    }

    fn interrupt(&self) -> Option<Arc<dyn VirtioInterrupt>> {
        self.interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the VMM keeps of the balloon to drive it from other threads (the
/// API, the migration sender) without going through the transport.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Asks the guest to give back `bytes` (rounded down to 4 KiB pages):
    /// updates `num_pages` and, once the driver runs, raises a config
    /// interrupt.
    pub fn set_target_bytes(&self, bytes: u64) -> Result<(), BalloonError> {
        if bytes > self.shared.ram_bytes {
            return Err(BalloonError::TargetTooLarge {
                target: bytes,
                ram: self.shared.ram_bytes,
            });
        }
        self.shared.lock().num_pages = (bytes / PAGE_SIZE) as u32;
        BalloonCounters::add(&self.shared.counters.target_changes, 1);
        if let Some(interrupt) = self.shared.interrupt() {
            // A lost interrupt leaves the guest at the old target until the
            // next change; nothing better to do.
            let _ = interrupt.notify_config();
        }
        Ok(())
    }

    pub fn target_bytes(&self) -> u64 {
        u64::from(self.shared.lock().num_pages) * PAGE_SIZE
    }

    /// What the guest says the balloon holds.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.shared.lock().actual) * PAGE_SIZE
    }

    /// Pages in the balloon as the device counts them.
    pub fn inflated_pages(&self) -> u64 {
        self.shared.lock().pages.count()
    }

    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.shared.ram_bytes
    }

    /// Whether the driver negotiated MUST_TELL_HOST: then it does not touch
    /// a ballooned page before the device has acknowledged its deflation,
    /// and [`BalloonHandle::ballooned_pages`] need not be migrated.
    pub fn must_tell_host(&self) -> bool {
        self.shared.lock().acked_features & (1 << F_MUST_TELL_HOST) != 0
    }

    /// Changes whenever pages leave the balloon. A reader of
    /// [`BalloonHandle::ballooned_pages`] takes this first and reads the map
    /// again when it changed: a page it still thinks ballooned may have
    /// been deflated and written since (the guest learns of a deflation
    /// only after this changed).
    pub fn removal_generation(&self) -> u64 {
        self.shared.removals.load(Ordering::SeqCst)
    }

    /// The pages in the balloon, per RAM region.
    pub fn ballooned_pages(&self) -> Vec<RegionBitmap> {
        self.shared.lock().pages.regions().to_vec()
    }

    /// Sizes and the guest's last statistics (the VMM turns them into
    /// `vm.balloon-statistics`).
    pub fn report(&self) -> BalloonReport {
        let inner = self.shared.lock();
        BalloonReport {
            target_pages: u64::from(inner.num_pages),
            actual_pages: u64::from(inner.actual),
            inflated_pages: inner.pages.count(),
            guest: inner.stats.clone(),
        }
    }

    /// Counters, as in `vm.counters`.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.shared.counters.to_map()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a queue is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The part of the device that runs on the worker thread.
pub(crate) struct BalloonHandler {
    memory: Arc<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    shared: Arc<Shared>,
    backend: Arc<dyn BalloonBackend>,
    /// Every queue the transport gave, in index order (unused ones too, so
    /// that snapshots list them all).
    pub(crate) queues: Vec<Queue>,
    events: Vec<EventFd>,
    /// The queues in use, by index.
    roles: Vec<(usize, Role)>,
    stats_timer: Option<TimerFd>,
    /// The stats buffer the driver gave, held until fresh stats are wanted.
    pub(crate) stats_head: Option<u16>,
    logged_errors: u64,
}

impl BalloonHandler {
    fn role(&self, index: usize) -> Option<Role> {
        self.roles
            .iter()
            .find_map(|&(i, role)| (i == index).then_some(role))
    }

    /// Serves every buffer available on queue `index`.
    pub(crate) fn process_queue(&mut self, index: usize) {
        let Some(role) = self.role(index) else {
            return;
        };
        let memory = self.memory.clone();
        let mem: &GuestMemoryMmap = &memory;
        let mut budget = BUFFERS_PER_WAKEUP;
        loop {
            let _ = self.queues[index].disable_notification(mem);
            let mut popped = false;
            while let Some(chain) = self.queues[index].pop_descriptor_chain(mem) {
                popped = true;
                if budget == 0 {
                    // Let a stop request in (pause must return): come back later.
                    self.queues[index].go_to_previous_position();
                    let _ = self.events[index].write(1);
                    return;
                }
                budget -= 1;
                let head = chain.head_index();
                let done = match role {
                    Role::Inflate | Role::Deflate => {
                        if let Some(pfns) = self.read_pfns(mem, chain) {
                            if role == Role::Inflate {
                                self.inflate(&pfns);
                            } else {
                                self.deflate(&pfns);
                            }
                        }
                        true
                    }
                    Role::Stats => {
                        self.take_stats(mem, chain, head);
                        false
                    }
                    Role::Reporting => {
                        self.report(chain);
                        true
                    }
                };
                if done {
                    self.complete(index, head);
                }
            }
            match self.queues[index].enable_notification(mem) {
                // More available but nothing could be popped: a bogus avail
                // index. Stop rather than spin; the driver is broken until reset.
                Ok(true) if !popped && avail_index_is_bogus(&self.queues[index], mem) => {
                    self.log(format_args!(
                        "queue {index}: invalid available ring index; queue stalled"
                    ));
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.log(format_args!("queue {index}: {e}"));
                    break;
                }
            }
        }
    }

    /// Returns buffer `head` of queue `index` with nothing written.
    fn complete(&mut self, index: usize, head: u16) {
        if let Err(e) = complete(
            &mut self.queues[index],
            &self.memory,
            &*self.interrupt,
            index as u16,
            head,
            0,
        ) {
            self.log(format_args!(
                "queue {index}: cannot return buffer {head}: {e}"
            ));
        }
    }

    /// The le32 page numbers of an inflate or deflate buffer; None (and
    /// counted) if any descriptor is not device-readable or not readable.
    fn read_pfns(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<Vec<u32>> {
        let mut pfns = Vec::new();
        for desc in chain {
            let n = desc.len() as usize / 4;
            if desc.is_write_only() || pfns.len() + n > MAX_PFNS_PER_BUFFER {
                BalloonCounters::add(&self.shared.counters.invalid_buffers, 1);
                return None;
            }
            let mut bytes = vec![0u8; n * 4];
            if mem.read_slice(&mut bytes, desc.addr()).is_err() {
                BalloonCounters::add(&self.shared.counters.invalid_buffers, 1);
                return None;
            }
            pfns.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Some(pfns)
    }

    /// Marks the pages ballooned and gives contiguous runs back to the host.
    fn inflate(&mut self, pfns: &[u32]) {
        let mut sorted: Vec<u64> = pfns.iter().map(|&p| u64::from(p)).collect();
        sorted.sort_unstable();
        sorted.dedup();
        // (region, first frame, count)
        let mut runs: Vec<(usize, u64, u64)> = Vec::new();
        let mut invalid = 0u64;
        {
            let mut inner = self.shared.lock();
            for &pfn in &sorted {
                let Some((region, page)) = inner.pages.locate(pfn) else {
                    invalid += 1;
                    continue;
                };
                inner.pages.set(region, page);
                match runs.last_mut() {
                    Some((r, first, n)) if *r == region && *first + *n == pfn => *n += 1,
                    _ => runs.push((region, pfn, 1)),
                }
            }
        }
        let counters = &self.shared.counters;
        BalloonCounters::add(&counters.invalid_pfns, invalid);
        BalloonCounters::add(&counters.inflated_pages, sorted.len() as u64 - invalid);
        for (_, first, count) in runs {
            self.discard(first << PAGE_SHIFT, count << PAGE_SHIFT);
        }
    }

    /// Takes the pages out of the balloon: the guest may use them again.
    fn deflate(&mut self, pfns: &[u32]) {
        let mut invalid = 0u64;
        let mut valid = 0u64;
        {
            let mut inner = self.shared.lock();
            for &pfn in pfns {
                match inner.pages.locate(u64::from(pfn)) {
                    Some((region, page)) => {
                        inner.pages.clear(region, page);
                        valid += 1;
                    }
                    None => invalid += 1,
                }
            }
        }
        if valid > 0 {
            self.shared.removed_pages();
        }
        let counters = &self.shared.counters;
        BalloonCounters::add(&counters.invalid_pfns, invalid);
        BalloonCounters::add(&counters.deflated_pages, valid);
    }

    fn discard(&mut self, gpa: u64, len: u64) {
        if let Err(e) = self.backend.discard(gpa, len) {
            BalloonCounters::add(&self.shared.counters.discard_errors, 1);
            self.log(format_args!("cannot discard {gpa:#x}+{len:#x}: {e}"));
        }
    }

    /// Records the statistics in a stats buffer and keeps the buffer.
    fn take_stats(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        head: u16,
    ) {
        let mut bytes = Vec::new();
        let mut valid = true;
        for desc in chain {
            if desc.is_write_only() {
                valid = false;
                break;
            }
            let n = (desc.len() as usize).min(MAX_STATS_BYTES - bytes.len());
            let start = bytes.len();
            bytes.resize(start + n, 0);
            if mem.read_slice(&mut bytes[start..], desc.addr()).is_err() {
                valid = false;
                break;
            }
            if bytes.len() == MAX_STATS_BYTES {
                break;
            }
        }
        if valid {
            let values = bytes
                .chunks_exact(STATS_ENTRY_SIZE)
                .map(|e| {
                    let tag = u16::from_le_bytes([e[0], e[1]]);
                    let mut value = [0u8; 8];
                    value.copy_from_slice(&e[2..10]);
                    (tag, u64::from_le_bytes(value))
                })
                .collect();
            self.shared.lock().stats = Some(GuestStats {
                unix_ms: unix_ms(),
                values,
            });
            BalloonCounters::add(&self.shared.counters.stats_updates, 1);
        } else {
            BalloonCounters::add(&self.shared.counters.invalid_buffers, 1);
        }
        // The driver has one stats buffer; if it gave another, return the
        // older one so it is not lost.
        if let Some(old) = self.stats_head.replace(head) {
            if let Some(index) = self.index_of(Role::Stats) {
                self.complete(index, old);
            }
        }
    }

    /// Returns the held stats buffer: the driver answers with fresh stats.
    pub(crate) fn request_stats(&mut self) {
        let Some(index) = self.index_of(Role::Stats) else {
            return;
        };
        if let Some(head) = self.stats_head.take() {
            BalloonCounters::add(&self.shared.counters.stats_requests, 1);
            self.complete(index, head);
        }
    }

    fn index_of(&self, role: Role) -> Option<usize> {
        self.roles
            .iter()
            .find_map(|&(i, r)| (r == role).then_some(i))
    }

    /// Discards every free page range of a reporting buffer.
    fn report(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) {
        let ranges: Vec<(u64, u64)> = chain.map(|d| (d.addr().0, u64::from(d.len()))).collect();
        for (addr, len) in ranges {
            // Only whole pages can be given back.
            let Some(start) = addr.checked_next_multiple_of(PAGE_SIZE) else {
                BalloonCounters::add(&self.shared.counters.invalid_pfns, 1);
                continue;
            };
            let end = addr.saturating_add(len) / PAGE_SIZE * PAGE_SIZE;
            if end <= start {
                continue;
            }
            let ram = self.shared.lock().pages.ram_ranges(start, end - start);
            let Some(ram) = ram else {
                BalloonCounters::add(&self.shared.counters.invalid_pfns, 1);
                continue;
            };
            for (gpa, len) in ram {
                self.discard(gpa, len);
                BalloonCounters::add(&self.shared.counters.reported_pages, len / PAGE_SIZE);
            }
        }
    }

    fn log(&mut self, message: std::fmt::Arguments) {
        if self.logged_errors < MAX_LOGGED_ERRORS {
            self.logged_errors += 1;
            log::warn!("balloon: {message}");
        }
    }
}

impl WorkerHandler for BalloonHandler {
    const THREAD_KIND: confine::ThreadKind = confine::ThreadKind::Balloon;

    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        for &(index, _) in &self.roles {
            events.add(self.events[index].as_raw_fd(), index as u64, EventSet::IN)?;
        }
        if let Some(timer) = &self.stats_timer {
            events.add(timer.as_raw_fd(), TIMER_TOKEN, EventSet::IN)?;
        }
        // Buffers made available while no worker ran (before DRIVER_OK, a
        // restore, a resume) are served now.
        let indices: Vec<usize> = self.roles.iter().map(|&(i, _)| i).collect();
        for index in indices {
            self.process_queue(index);
        }
        Ok(())
    }

    fn handle(&mut self, token: u64, _set: EventSet, _events: &EventLoop) {
        if token == TIMER_TOKEN {
            if let Some(timer) = &mut self.stats_timer {
                // Readable, so the read does not block; it only clears the count.
                let _ = timer.wait();
            }
            self.request_stats();
            return;
        }
        let index = token as usize;
        if let Some(event) = self.events.get(index) {
            // Only clears the counter; failure means nothing was pending.
            let _ = event.read();
            self.process_queue(index);
        }
    }
}

/// A virtio-balloon device.
pub struct Balloon {
    pub(crate) config: BalloonConfig,
    pub(crate) avail_features: u64,
    pub(crate) shared: Arc<Shared>,
    backend: Arc<dyn BalloonBackend>,
    pub(crate) worker: DeviceWorker<BalloonHandler>,
}

impl Balloon {
    /// A balloon over guest RAM `ram` (regions as start, length in bytes)
    /// giving memory back through `backend`, with the initial target of
    /// `config`.
    pub fn new(
        config: &BalloonConfig,
        ram: &[(u64, u64)],
        backend: Arc<dyn BalloonBackend>,
    ) -> Result<Balloon, BalloonError> {
        let pages = PageMap::new(ram);
        let ram_bytes = pages.ram_pages() * PAGE_SIZE;
        let target = config.target_mib.saturating_mul(1 << 20);
        if target > ram_bytes {
            return Err(BalloonError::TargetTooLarge {
                target,
                ram: ram_bytes,
            });
        }
        let mut avail_features = COMMON_FEATURES | (1 << F_MUST_TELL_HOST) | (1 << F_STATS_VQ);
        if config.deflate_on_oom {
            avail_features |= 1 << F_DEFLATE_ON_OOM;
        }
        if config.free_page_reporting {
            avail_features |= 1 << F_PAGE_REPORTING;
        }
        Ok(Balloon {
            config: config.clone(),
            avail_features,
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    num_pages: (target / PAGE_SIZE) as u32,
                    actual: 0,
                    acked_features: 0,
                    pages,
                    stats: None,
                }),
                counters: BalloonCounters::default(),
                removals: AtomicU64::new(0),
                interrupt: Mutex::new(None),
                ram_bytes,
            }),
            backend,
            worker: DeviceWorker::new("balloon", "balloon"),
        })
    }

    /// The handle to drive this balloon from other threads.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    pub fn config(&self) -> &BalloonConfig {
        &self.config
    }

    /// The features the driver accepted (0 before activation).
    pub fn acked_features(&self) -> u64 {
        self.shared.lock().acked_features
    }

    /// Whether the worker is running.
    pub fn is_running(&self) -> bool {
        self.worker.is_running()
    }

    /// Whether the driver activated the device (running or paused).
    pub fn is_activated(&self) -> bool {
        self.worker.is_active()
    }

    /// The stats buffer the device holds, if any (pauses the worker around
    /// the read if it runs).
    pub fn held_stats_buffer(&mut self) -> Option<u16> {
        self.worker.with_handler(|h| h.stats_head).flatten()
    }

    /// Returns the held stats buffer now, asking the driver for fresh
    /// statistics (as the timer does every `stats_interval_s`).
    pub fn request_stats(&mut self) {
        self.worker.with_handler(|h| h.request_stats());
    }

    /// Starts the worker on `queues` (shared by `activate` and restore):
    /// `acked` are the negotiated features, `stats_head` a stats buffer the
    /// device already holds (restore).
    pub(crate) fn start(
        &mut self,
        memory: Arc<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
        acked: u64,
        stats_head: Option<u16>,
    ) -> Result<(), ActivateError> {
        let indices = queue_indices(acked);
        let mut roles = vec![
            (indices.inflate, Role::Inflate),
            (indices.deflate, Role::Deflate),
        ];
        if let Some(i) = indices.stats {
            roles.push((i, Role::Stats));
        }
        if let Some(i) = indices.reporting {
            roles.push((i, Role::Reporting));
        }
        let (mut queues, events): (Vec<Queue>, Vec<EventFd>) = queues.into_iter().unzip();
        for &(index, role) in &roles {
            let Some(queue) = queues.get(index) else {
                return Err(ActivateError::MissingQueue(index));
            };
            if !queue.ready() {
                // Inflate and deflate are the device; the others are optional.
                if matches!(role, Role::Inflate | Role::Deflate) {
                    return Err(ActivateError::MissingQueue(index));
                }
                continue;
            }
            if !queue.is_valid(&*memory) {
                return Err(ActivateError::Other(format!(
                    "balloon: queue {index} does not fit in guest memory"
                )));
            }
        }
        roles.retain(|&(index, _)| queues[index].ready());
        for queue in &mut queues {
            queue.set_event_idx(acked & (1 << F_EVENT_IDX) != 0);
        }
        let stats_timer = match (indices.stats, self.config.stats_interval_s) {
            (Some(i), interval) if interval > 0 && queues[i].ready() => {
                let mut timer = TimerFd::new().map_err(|e| ActivateError::Worker(e.into()))?;
                let period = Duration::from_secs(u64::from(interval));
                timer
                    .reset(period, Some(period))
                    .map_err(|e| ActivateError::Worker(e.into()))?;
                Some(timer)
            }
            _ => None,
        };
        // Stop a previous worker, if the transport activates twice.
        self.worker.stop();
        self.shared.lock().acked_features = acked;
        self.shared.set_interrupt(Some(interrupt.clone()));
        let handler = BalloonHandler {
            memory,
            interrupt,
            shared: self.shared.clone(),
            backend: self.backend.clone(),
            queues,
            events,
            roles,
            stats_timer,
            stats_head,
            logged_errors: 0,
        };
        self.worker.start(handler).map_err(ActivateError::Worker)
    }

    /// `struct virtio_balloon_config`, little-endian.
    fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let inner = self.shared.lock();
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[0..4].copy_from_slice(&inner.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&inner.actual.to_le_bytes());
        // free_page_hint_cmd_id (8..12) and poison_val (12..16): neither
        // FREE_PAGE_HINT nor PAGE_POISON is offered.
        c
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // inflate, deflate, stats, and reporting if offered.
        let count = if self.avail_features & (1 << F_PAGE_REPORTING) != 0 {
            4
        } else {
            3
        };
        vec![QUEUE_SIZE; count]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's; partial writes merge.
        let mut inner = self.shared.lock();
        let mut actual = inner.actual.to_le_bytes();
        for (i, &byte) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if (4..8).contains(&at) {
                actual[(at - 4) as usize] = byte;
            }
        }
        inner.actual = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), ActivateError> {
        let acked = context.acked_features & self.avail_features;
        self.start(
            context.memory,
            context.interrupt,
            context.queues,
            acked,
            None,
        )
    }

    fn reset(&mut self) -> Option<Vec<QueueState>> {
        let states = self
            .worker
            .stop()
            .map(|h| h.queues.iter().map(|q| q.state()).collect());
        self.shared.set_interrupt(None);
        let mut inner = self.shared.lock();
        inner.acked_features = 0;
        inner.actual = 0;
        // A new driver knows nothing of the old one's balloon and will use
        // those pages without telling: they are ordinary memory again.
        inner.pages.clear_all();
        drop(inner);
        self.shared.removed_pages();
        states
    }

    fn pause(&mut self) {
        self.worker.pause();
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.shared.counters.to_map()
    }

    fn state(&mut self) -> DeviceState {
        DeviceState::Balloon(self.balloon_state())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.worker
            .handler()
            .map(|h| h.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    fn restore(
        &mut self,
        state: DeviceState,
        context: Option<ActivateContext>,
    ) -> Result<(), StateError> {
        match state {
            DeviceState::Balloon(state) => self.restore_balloon(&state, context),
            other => Err(StateError::WrongKind {
                expected: "balloon",
                found: other.kind(),
            }),
        }
    }
}
