//! virtio-balloon driver (virtio 1.2, 5.5) and the `balloon-*` commands.
//!
//! Features acked: MUST_TELL_HOST, STATS_VQ and PAGE_REPORTING when offered
//! (with VERSION_1; never DEFLATE_ON_OOM or FREE_PAGE_HINT). Queues are
//! numbered by the acked features, as Linux does: inflate 0, deflate 1,
//! then stats if STATS_VQ, then reporting if PAGE_REPORTING.
//!
//! **Memory.** The pages in the balloon are a reservation of `mem.rs`
//! ([`mem::balloon_take`]): runs of pages taken in ascending order from the
//! bottom of the free RAM (the start of the `memfill` area), released from
//! the top. `memfill`, `memcheck`, `pages` and `balloon-report` choose
//! their regions from the free RAM *minus* the balloon ([`mem::choose`]),
//! so while the balloon holds pages the workload area starts above them
//! (`off_mib` counts from there) and nothing touches a ballooned page. The
//! DMA arena is never ballooned, and inflation skips the region of a
//! running `pages` workload (it takes the pages above it instead).
//!
//! **Following** (`balloon-follow`, run from the BSP main loop through
//! `virtio::poll_background`): on a configuration interrupt, and every
//! 100 ms in case one was missed, the driver reads `num_pages`. It then
//! moves towards it one buffer at a time, for at most about 2 ms per
//! main-loop pass: an inflate buffer holds at most 256 le32 page numbers of
//! newly reserved pages (reserved before the buffer is queued); a deflate
//! buffer the most recently inflated pages, which become free RAM again
//! only once the device has returned the buffer (MUST_TELL_HOST). Each
//! buffer is waited for (queue interrupt, 2 s) before the next one, and
//! `actual` is written after each. A buffer the device never returns stops
//! the following for good (`testguest: warning: balloon: ...`).
//!
//! **Statistics.** One buffer of four 10-byte entries (le16 tag, le64
//! value, see [`Balloon::fill_stats`]) is queued at start; whenever the
//! device returns it (every `stats_interval_s`), the main loop fills it
//! again and re-queues it.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::mem::{self, Range, MIB, PAGE};
use crate::percpu::MAX_CPUS;
use crate::shell::{error, Args};
use crate::sync::SpinLock;
use crate::virtio::{self, wait_until, Device, Seg, Virtqueue, Wait};
use crate::{irq, pci, time, workload};

// Feature bits (5.5.3).
const F_MUST_TELL_HOST: u64 = 1 << 0;
const F_STATS_VQ: u64 = 1 << 1;
const F_PAGE_REPORTING: u64 = 1 << 5;
const WANTED: u64 = F_MUST_TELL_HOST | F_STATS_VQ | F_PAGE_REPORTING;

/// Configuration fields (le32): the host's target and the driver's count.
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;

/// Page numbers per inflate/deflate buffer (what Linux sends).
const PFNS_PER_BUFFER: usize = 256;
/// Size of the inflate and deflate queues (one buffer in flight, hostile
/// ones that were never returned aside).
const PFN_QUEUE: u16 = 16;
const STATS_QUEUE: u16 = 4;
const REPORTING_QUEUE: u16 = 256;
/// How long the device may keep an inflate/deflate/hostile buffer.
const BUFFER_TIMEOUT_MS: u64 = 2000;
/// How long it may keep a reporting buffer (it discards the whole range).
const REPORT_TIMEOUT_MS: u64 = 10_000;
/// `num_pages` is re-read this often even without a config interrupt.
const CONFIG_POLL_MS: u64 = 100;
/// Work per main-loop pass when following (at least one buffer).
const SLICE_US: u64 = 2000;
/// When no free page is left, try again this much later.
const FULL_RETRY_MS: u64 = 1000;
/// One descriptor of a reporting buffer covers this much.
const REPORT_PIECE: u64 = 2 * MIB;

/// Statistics tags (5.5.6.3).
const TAG_MINFLT: u16 = 3;
const TAG_MEMFREE: u16 = 4;
const TAG_MEMTOT: u16 = 5;
const TAG_AVAIL: u16 = 6;
const STAT_ENTRY: usize = 10;
const STAT_ENTRIES: usize = 4;

/// Page numbers of `balloon-hostile kind=pfn-range`: 16 TiB, far beyond RAM.
const HOSTILE_PFN: u32 = 0xffff_ff00;
/// Length field of `balloon-hostile kind=huge-len`: 67 M entries, in a
/// buffer that holds one.
const HOSTILE_HUGE_LEN: u32 = 0x1000_0000;

pub struct Balloon {
    dev: Device,
    inflate: Virtqueue,
    deflate: Virtqueue,
    stats: Virtqueue,
    reporting: Virtqueue,
    has_stats: bool,
    has_reporting: bool,
    /// Queues in use (2 to 4).
    queues: u16,
    /// Arena page with the page numbers of the inflate/deflate buffer.
    pfn_buf: u64,
    /// Arena page for `balloon-hostile` buffers.
    hostile_buf: u64,
    stats_buf: u64,
    /// Head of the stats buffer (queued at start, re-queued on each return).
    stats_head: Option<u16>,
    /// Times the device returned the stats buffer and it was re-queued.
    refills: u64,
    following: bool,
    /// Last `num_pages` read.
    target: u32,
    config_seen: u64,
    next_config_poll: u64,
    /// Target for which `balloon: actual=` was printed last.
    announced: Option<u32>,
    /// No free page was left for this target: retry at `retry_at`.
    full: Option<u32>,
    retry_at: u64,
    /// A buffer was never returned: inflation and deflation have stopped.
    broken: bool,
}

const UNTRIED: u8 = 0;
const READY: u8 = 1;
const ABSENT: u8 = 2;
const FAILED: u8 = 3;
static STATE: AtomicU8 = AtomicU8::new(UNTRIED);
/// Address of the `SpinLock<Balloon>` in the arena (0: none).
static DEVICE: AtomicU64 = AtomicU64::new(0);

fn device() -> Option<&'static SpinLock<Balloon>> {
    let a = DEVICE.load(Ordering::Acquire);
    // SAFETY: set once by `start` to a SpinLock<Balloon> placed in the arena.
    (a != 0).then(|| unsafe { &*(a as *const SpinLock<Balloon>) })
}

fn bytes_mut(a: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: arena memory of at least `len` bytes, used by the BSP only
    // (under the balloon's lock).
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) }
}

/// Write page numbers as le32 at `buf`.
fn write_pfns(buf: u64, pfns: &[u32]) {
    let b = bytes_mut(buf, 4 * pfns.len());
    for (chunk, pfn) in b.chunks_exact_mut(4).zip(pfns) {
        chunk.copy_from_slice(&pfn.to_le_bytes());
    }
}

/// Queue a one-chain buffer, notify, wait for the device to return it (on
/// the queue's interrupt). The used length, or why not: `timeout` (the
/// chain stays in flight) or `noroom` (not enough free descriptors).
fn submit(q: &mut Virtqueue, segs: &[Seg], timeout_ms: u64) -> Result<u32, &'static str> {
    let mut ids = [0u16; REPORTING_QUEUE as usize];
    let head = q.add_chain(segs, &mut ids).ok_or("noroom")?;
    q.publish(head);
    q.kick();
    let vector = q.vector;
    let done = wait_until(
        vector,
        time::deadline_after_ms(timeout_ms),
        Wait::Irq,
        || {
            q.poll();
            q.is_done(head)
        },
    );
    if done {
        q.take(head).ok_or("timeout")
    } else {
        Err("timeout")
    }
}

/// Start the driver on the first virtio-balloon function (once).
fn start() -> Result<&'static SpinLock<Balloon>, u8> {
    if let Some(b) = device() {
        return Ok(b);
    }
    match STATE.load(Ordering::Acquire) {
        UNTRIED => {}
        s => return Err(s),
    }
    if !virtio::init_all() {
        return Err(FAILED);
    }
    let mut found = None;
    pci::for_each_function(|dev, func, id| {
        if found.is_none() && pci::virtio_type(dev, func, id) == Some(5) {
            found = Some((dev, func));
        }
    });
    let Some((dev, func)) = found else {
        STATE.store(ABSENT, Ordering::Release);
        return Err(ABSENT);
    };
    match attach(dev, func) {
        Ok(b) => {
            STATE.store(READY, Ordering::Release);
            Ok(b)
        }
        Err(e) => {
            println!("testguest: error: virtio: 00:{:02x}.{}: {}", dev, func, e);
            STATE.store(FAILED, Ordering::Release);
            Err(FAILED)
        }
    }
}

fn attach(dev: u8, func: u8) -> Result<&'static SpinLock<Balloon>, &'static str> {
    // One MSI-X vector per queue we may use (at most 4) plus the config one.
    let msix = pci::Msix::find(dev, func).ok_or("no MSI-X capability")?;
    let vectors = (msix.count as usize).saturating_sub(1).min(4);
    if vectors < 2 {
        return Err("too few MSI-X vectors");
    }
    let mut d = Device::probe(dev, func, 5, vectors)?;
    d.begin(WANTED)?;
    let f = d.features;
    // Queue numbers follow the acked features.
    let mut next = 2u16;
    let mut take = |bit: u64| {
        (f & bit != 0).then(|| {
            next += 1;
            next - 1
        })
    };
    let stats_index = take(F_STATS_VQ);
    let reporting_index = take(F_PAGE_REPORTING);
    let queues = next;
    if queues as usize > vectors {
        d.fail();
        return Err("too few MSI-X vectors");
    }
    if d.num_queues() < queues {
        d.fail();
        return Err("fewer queues than the acked features need");
    }
    let alloc = |bytes: u64| mem::dma_alloc(bytes, mem::PAGE).ok_or("out of DMA memory");
    let mut b = Balloon {
        dev: d,
        inflate: Virtqueue::new(0, PFN_QUEUE),
        deflate: Virtqueue::new(1, PFN_QUEUE),
        stats: Virtqueue::new(stats_index.unwrap_or(2), STATS_QUEUE),
        reporting: Virtqueue::new(reporting_index.unwrap_or(3), REPORTING_QUEUE),
        has_stats: stats_index.is_some(),
        has_reporting: reporting_index.is_some(),
        queues,
        pfn_buf: alloc(PAGE)?,
        hostile_buf: alloc(PAGE)?,
        stats_buf: alloc(PAGE)?,
        stats_head: None,
        refills: 0,
        following: false,
        target: 0,
        config_seen: 0,
        next_config_poll: 0,
        announced: None,
        full: None,
        retry_at: 0,
        broken: false,
    };
    if let Err(e) = b.setup() {
        b.dev.fail();
        return Err(e);
    }
    println!(
        "virtio: 00:{:02x}.{} balloon ready features={:#x}",
        dev, func, b.dev.features
    );
    let cell = virtio::place(SpinLock::new(b)).ok_or("out of DMA memory")?;
    DEVICE.store(cell as *const _ as u64, Ordering::Release);
    Ok(cell)
}

impl Balloon {
    fn setup(&mut self) -> Result<(), &'static str> {
        self.dev.setup_queue(&mut self.inflate)?;
        self.dev.setup_queue(&mut self.deflate)?;
        if self.has_stats {
            self.dev.setup_queue(&mut self.stats)?;
        }
        if self.has_reporting {
            self.dev.setup_queue(&mut self.reporting)?;
        }
        for q in [
            &mut self.inflate,
            &mut self.deflate,
            &mut self.stats,
            &mut self.reporting,
        ] {
            if q.size != 0 {
                q.set_interrupts(true);
            }
        }
        // Prime the stats queue (the device takes it once DRIVER_OK is set).
        if self.has_stats {
            self.fill_stats();
            let seg = Seg::r(self.stats_buf, (STAT_ENTRY * STAT_ENTRIES) as u32);
            let mut ids = [0u16; 1];
            let head = self
                .stats
                .add_chain(&[seg], &mut ids)
                .ok_or("stats queue full")?;
            self.stats.publish(head);
            self.stats_head = Some(head);
        }
        self.config_seen = irq::count(self.dev.config_vector);
        self.dev.driver_ok()?;
        if self.has_stats {
            self.stats.kick();
        }
        self.target = self.read_target();
        self.write_actual();
        Ok(())
    }

    fn read_target(&self) -> u32 {
        self.dev.read_config(|c| c.u32(CFG_NUM_PAGES))
    }

    fn read_actual(&self) -> u32 {
        self.dev.read_config(|c| c.u32(CFG_ACTUAL))
    }

    fn write_actual(&self) {
        let pages = mem::balloon_pages().min(u32::MAX as u64) as u32;
        self.dev.write_config_u32(CFG_ACTUAL, pages);
    }

    /// The statistics: 4 free bytes and 6 available bytes = free RAM for
    /// workloads (free RAM outside the image, the DMA arena and the
    /// balloon; what `memfill` wrote counts as free), 5 total bytes = the
    /// E820 RAM, 3 minor faults = the number of refills so far (so the host
    /// sees each round trip).
    fn fill_stats(&mut self) {
        let free = mem::workload_free_bytes();
        let entries: [(u16, u64); STAT_ENTRIES] = [
            (TAG_MEMFREE, free),
            (TAG_MEMTOT, mem::total_bytes()),
            (TAG_AVAIL, free),
            (TAG_MINFLT, self.refills),
        ];
        let b = bytes_mut(self.stats_buf, STAT_ENTRY * STAT_ENTRIES);
        for (e, (tag, value)) in b.chunks_exact_mut(STAT_ENTRY).zip(entries) {
            e[0..2].copy_from_slice(&tag.to_le_bytes());
            e[2..10].copy_from_slice(&value.to_le_bytes());
        }
    }

    /// The device returned the stats buffer: refill it and queue it again.
    fn service_stats(&mut self) {
        if !self.has_stats || !self.stats.has_used() {
            return;
        }
        self.stats.poll();
        let Some(head) = self.stats_head else { return };
        if self.stats.is_done(head) {
            self.refills += 1;
            self.fill_stats();
            self.stats.repost(head);
            self.stats.kick();
        }
    }

    /// The region of a running `pages` workload (inflation skips it).
    fn pages_in_use() -> Option<Range> {
        let running = (0..MAX_CPUS).any(|c| workload::job_of(c) == workload::JOB_PAGES);
        let (base, pages) = workload::pages_region().filter(|_| running)?;
        Some(Range {
            start: base,
            end: base + pages * PAGE,
        })
    }

    /// One inflate buffer of at most `max` pages. Ok(pages given), Ok(0)
    /// when no free page is left, Err when the device kept the buffer.
    fn inflate_step(&mut self, max: u64) -> Result<usize, ()> {
        let mut pfns = [0u32; PFNS_PER_BUFFER];
        let n = (max as usize).min(PFNS_PER_BUFFER);
        let k = mem::balloon_take(&mut pfns[..n], Self::pages_in_use());
        if k == 0 {
            return Ok(0);
        }
        write_pfns(self.pfn_buf, &pfns[..k]);
        let seg = Seg::r(self.pfn_buf, 4 * k as u32);
        if submit(&mut self.inflate, &[seg], BUFFER_TIMEOUT_MS).is_err() {
            return Err(());
        }
        self.write_actual();
        Ok(k)
    }

    /// One deflate buffer of the (at most `max`) most recently inflated
    /// pages; they are free again once the device returned it.
    fn deflate_step(&mut self, max: u64) -> Result<usize, ()> {
        let mut pfns = [0u32; PFNS_PER_BUFFER];
        let n = (max as usize).min(PFNS_PER_BUFFER);
        let k = mem::balloon_top(&mut pfns[..n]);
        if k == 0 {
            return Ok(0);
        }
        write_pfns(self.pfn_buf, &pfns[..k]);
        let seg = Seg::r(self.pfn_buf, 4 * k as u32);
        if submit(&mut self.deflate, &[seg], BUFFER_TIMEOUT_MS).is_err() {
            return Err(());
        }
        mem::balloon_release(k as u64);
        self.write_actual();
        Ok(k)
    }

    /// Move towards `num_pages` for one main-loop slice.
    fn follow(&mut self) {
        if !self.following || self.broken {
            return;
        }
        let c = irq::count(self.dev.config_vector);
        if c != self.config_seen || time::passed(self.next_config_poll) {
            self.config_seen = c;
            self.next_config_poll = time::deadline_after_ms(CONFIG_POLL_MS);
            self.target = self.read_target();
        }
        let slice_end = time::deadline_after_us(SLICE_US);
        loop {
            let held = mem::balloon_pages();
            let target = self.target as u64;
            if held == target {
                if self.announced != Some(self.target) {
                    self.announced = Some(self.target);
                    println!("balloon: actual={} target={}", held, target);
                }
                return;
            }
            let step = if held < target {
                if self.full == Some(self.target) && !time::passed(self.retry_at) {
                    return;
                }
                self.inflate_step(target - held)
            } else {
                self.deflate_step(held - target)
            };
            match step {
                Ok(0) if held < target => {
                    if self.full != Some(self.target) {
                        self.full = Some(self.target);
                        println!("balloon: actual={} target={} status=full", held, target);
                    }
                    self.retry_at = time::deadline_after_ms(FULL_RETRY_MS);
                    return;
                }
                Ok(0) => return,
                Ok(_) => {}
                Err(()) => {
                    self.broken = true;
                    let what = if held < target { "inflate" } else { "deflate" };
                    println!(
                        "testguest: warning: balloon: the device kept the {} buffer for {} ms; \
                         inflation and deflation stopped",
                        what, BUFFER_TIMEOUT_MS
                    );
                    return;
                }
            }
            if time::passed(slice_end) {
                return;
            }
        }
    }

    fn print_ready(&self) {
        println!(
            "balloon: ready features={:#x} queues={} num_pages={}",
            self.dev.features, self.queues, self.target
        );
    }
}

/// BSP main loop: stats refills and, when following, inflation/deflation.
pub fn poll_background() {
    let Some(b) = device() else { return };
    let mut b = b.lock();
    b.service_stats();
    b.follow();
}

// ------------------------------------------------------------ commands ----

/// Commands `balloon-*`. Start the driver on first use.
pub fn command(cmd: &str, rest: &str) {
    let keys: &[&str] = match cmd {
        "balloon-follow" => &["on"],
        "balloon-info" => &[],
        "balloon-report" => &["mib", "off_mib"],
        "balloon-hostile" => &["kind"],
        _ => return println!("testguest: error: unknown command {}", cmd),
    };
    let Some(a) = Args::parse(cmd, rest, keys) else {
        return;
    };
    let b = match start() {
        Ok(b) => b,
        Err(ABSENT) => return println!("balloon: status=nodevice"),
        Err(_) => return error(cmd, format_args!("the balloon driver did not start")),
    };
    let mut b = b.lock();
    match cmd {
        "balloon-follow" => cmd_follow(&mut b, cmd, &a),
        "balloon-info" => println!(
            "balloon: num_pages={} actual={} inflated={} refills={}",
            b.read_target(),
            b.read_actual(),
            mem::balloon_pages(),
            b.refills
        ),
        "balloon-report" => cmd_report(&mut b, cmd, &a),
        _ => cmd_hostile(&mut b, cmd, &a),
    }
}

/// `balloon-follow [on=0|1]`.
fn cmd_follow(b: &mut Balloon, _cmd: &str, a: &Args) {
    let Ok(on) = a.num("on", 0..=1) else {
        return;
    };
    if on == Some(0) {
        b.following = false;
        println!(
            "balloon: follow=off actual={} target={}",
            mem::balloon_pages(),
            b.target
        );
        return;
    }
    b.target = b.read_target();
    b.config_seen = irq::count(b.dev.config_vector);
    b.next_config_poll = time::deadline_after_ms(CONFIG_POLL_MS);
    if !b.following {
        b.following = true;
        // Already there: nothing to announce until the target changes.
        if mem::balloon_pages() == b.target as u64 {
            b.announced = Some(b.target);
        }
    }
    b.print_ready();
}

/// `balloon-report mib=N [off_mib=M]`: one reporting buffer of 2 MiB
/// device-writable descriptors over N MiB of free RAM.
fn cmd_report(b: &mut Balloon, cmd: &str, a: &Args) {
    let max_mib = REPORTING_QUEUE as u64 * (REPORT_PIECE / MIB);
    let Ok(mib) = a.num("mib", 1..=max_mib) else {
        return;
    };
    let Ok(off) = a.num("off_mib", 0..=1 << 20) else {
        return;
    };
    let Some(mib) = mib else {
        return error(cmd, format_args!("usage: {} mib=N [off_mib=M]", cmd));
    };
    if !b.has_reporting {
        return println!("balloon: report status=noreporting mib={}", mib);
    }
    if (0..MAX_CPUS).any(|c| workload::job_of(c) == workload::JOB_PAGES) {
        return error(
            cmd,
            format_args!("the pages workload is running (stop first)"),
        );
    }
    let off = off.unwrap_or(0);
    let base = match mem::choose(mib, off) {
        Some((base, bytes)) if bytes == mib * MIB => base,
        _ => {
            return error(
                cmd,
                format_args!("not enough free RAM for off_mib={} mib={}", off, mib),
            )
        }
    };
    let mut segs = [Seg::w(0, 0); REPORTING_QUEUE as usize];
    let mut n = 0;
    let mut at = base;
    while at < base + mib * MIB {
        let len = REPORT_PIECE.min(base + mib * MIB - at);
        segs[n] = Seg::w(at, len as u32);
        n += 1;
        at += len;
    }
    match submit(&mut b.reporting, &segs[..n], REPORT_TIMEOUT_MS) {
        Ok(_) => println!("balloon: report status=ok mib={}", mib),
        Err(why) => println!("balloon: report status={} mib={}", why, mib),
    }
}

/// `balloon-hostile kind=pfn-range|write-only|huge-len`: one malformed
/// inflate buffer (none of them names a page the guest uses: the page
/// numbers are beyond RAM or that of the hostile buffer's own page).
fn cmd_hostile(b: &mut Balloon, cmd: &str, a: &Args) {
    let buf = b.hostile_buf;
    let own = (buf / PAGE) as u32;
    let (kind, seg) = match a.raw("kind") {
        Some(k @ "pfn-range") => {
            let mut pfns = [0u32; 16];
            for (i, p) in pfns.iter_mut().enumerate() {
                *p = HOSTILE_PFN + i as u32;
            }
            write_pfns(buf, &pfns);
            (k, Seg::r(buf, 64))
        }
        Some(k @ "write-only") => {
            write_pfns(buf, &[own; 16]);
            (k, Seg::w(buf, 64))
        }
        Some(k @ "huge-len") => {
            write_pfns(buf, &[own; 16]);
            (k, Seg::r(buf, HOSTILE_HUGE_LEN))
        }
        Some(k) => {
            return error(
                cmd,
                format_args!("bad value for kind: {} (pfn-range|write-only|huge-len)", k),
            )
        }
        None => {
            return error(
                cmd,
                format_args!("missing kind=pfn-range|write-only|huge-len"),
            )
        }
    };
    match submit(&mut b.inflate, &[seg], BUFFER_TIMEOUT_MS) {
        Ok(_) => println!("balloon-hostile kind={} status=used", kind),
        Err(why) => println!("balloon-hostile kind={} status={}", kind, why),
    }
}
