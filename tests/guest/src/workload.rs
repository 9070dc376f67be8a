//! Workloads run by the CPUs (`counters`, `pages`) and the job protocol.
//!
//! The BSP (console owner) sets `CPUS[n].job`; an idle AP sleeps at CPL0
//! (`WAIT_IRQ` on the wake vector) and is woken with a fixed IPI. A CPU
//! running a job re-reads its `job` every few microseconds; when it changes,
//! the CPU leaves its loop and acknowledges by setting `state` to JOB_NONE.
//! The BSP runs its own job in slices between console polls (shell.rs).

use core::hint::spin_loop;
use core::ptr::write_volatile;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::percpu::{PerCpu, CPUS, MAX_CPUS};
use crate::{fault, gate, irq, lapic, time};

pub const JOB_NONE: u32 = 0;
pub const JOB_COUNTERS: u32 = 1;
pub const JOB_PAGES: u32 = 2;
pub const JOB_HALT: u32 = 3;
/// Raise the exception `FAULT_KIND` (test of the exception report).
pub const JOB_FAULT: u32 = 4;
/// The virtio-blk background reader (`blk-reader`, blk.rs).
pub const JOB_BLK_READER: u32 = 5;

/// `fault::Kind` for JOB_FAULT.
pub static FAULT_KIND: AtomicU32 = AtomicU32::new(0);

/// Iterations of the counter loop between checks of `job`.
const COUNTER_CHUNK: u64 = 1 << 16;
/// Pages written between checks of `job`.
pub const PAGES_CHUNK: u64 = 256;

// ---------------------------------------------------------------- jobs ----

/// Give `cpu` a job (the CPU must be idle: call `stop_cpu` first).
pub fn assign(cpu: usize, job: u32) {
    let c = &CPUS[cpu];
    c.job.store(job, Ordering::Release);
    if cpu != 0 {
        lapic::send_fixed(c.apic_id.load(Ordering::Relaxed), irq::VEC_WAKE);
    } else {
        c.state.store(job, Ordering::Release);
    }
}

/// Current job of `cpu`.
pub fn job_of(cpu: usize) -> u32 {
    CPUS[cpu].job.load(Ordering::Acquire)
}

/// Ask every alive CPU to leave its job and wait (up to 2 s) until all
/// acknowledged. Returns the CPUs that did not, as a bit mask.
pub fn stop_all() -> u32 {
    for (i, c) in CPUS.iter().enumerate() {
        c.job.store(JOB_NONE, Ordering::Release);
        if i == 0 {
            c.state.store(JOB_NONE, Ordering::Release);
        }
    }
    wait_idle(u32::MAX)
}

/// Stop one CPU's job; true when it acknowledged.
pub fn stop_cpu(cpu: usize) -> bool {
    CPUS[cpu].job.store(JOB_NONE, Ordering::Release);
    if cpu == 0 {
        CPUS[0].state.store(JOB_NONE, Ordering::Release);
    }
    wait_idle(1 << cpu) == 0
}

fn wait_idle(mask: u32) -> u32 {
    let deadline = time::deadline_after_ms(2000);
    loop {
        let mut busy = 0;
        for (i, c) in CPUS.iter().enumerate() {
            let halted = matches!(c.state.load(Ordering::Acquire), JOB_HALT | JOB_FAULT);
            if mask & (1 << i) != 0
                && c.is_alive()
                && !halted
                && c.state.load(Ordering::Acquire) != JOB_NONE
            {
                busy |= 1 << i;
            }
        }
        if busy == 0 || time::passed(deadline) {
            return busy;
        }
        spin_loop();
    }
}

/// Loop of an application processor: sleep until given a job, run it.
pub fn ap_loop(cpu: usize) -> ! {
    let me = &CPUS[cpu];
    loop {
        let seen = irq::count(irq::VEC_WAKE);
        let job = me.job.load(Ordering::Acquire);
        me.state.store(job, Ordering::Release);
        match job {
            JOB_NONE => irq::wait_for(irq::VEC_WAKE, seen),
            JOB_COUNTERS => while counters_slice(me) {},
            JOB_PAGES => {
                let mut w = Walker::from_region();
                while me.job.load(Ordering::Relaxed) == JOB_PAGES {
                    w.step(PAGES_CHUNK);
                }
            }
            JOB_HALT => gate::halt_forever(),
            JOB_FAULT => fault::trigger(fault::Kind::from_u32(FAULT_KIND.load(Ordering::Acquire))),
            JOB_BLK_READER => crate::blk::reader_ap(me),
            _ => me.job.store(JOB_NONE, Ordering::Release),
        }
    }
}

// ------------------------------------------------------------ counters ----

/// Count for one chunk; false when the CPU's job is no longer COUNTERS.
pub fn counters_slice(me: &PerCpu) -> bool {
    let p = me.counter.as_ptr();
    let mut c = me.counter.load(Ordering::Relaxed);
    for _ in 0..COUNTER_CHUNK {
        c += 1;
        // SAFETY: aligned u64 owned by this CPU while it runs COUNTERS; a
        // volatile store keeps every increment a real memory write.
        unsafe { write_volatile(p, c) };
    }
    me.job.load(Ordering::Relaxed) == JOB_COUNTERS
}

pub fn reset_counters() {
    for c in &CPUS {
        c.counter.store(0, Ordering::Relaxed);
    }
}

// --------------------------------------------------------------- pages ----

/// Region of the page-record workload (pages == 0: none yet).
static PAGES_BASE: AtomicU64 = AtomicU64::new(0);
static PAGES_COUNT: AtomicU64 = AtomicU64::new(0);
/// Last completed pass (0 = only the initialisation pass ran).
static PAGES_DONE: AtomicU64 = AtomicU64::new(0);
/// CPU running the walker.
pub static PAGES_CPU: AtomicU32 = AtomicU32::new(0);

/// The record stored in the first 8 bytes of page `index` during `pass`:
/// `{ pass: u32, page_index: u32 }` little-endian, written as one u64 store.
pub fn record(pass: u32, index: u32) -> u64 {
    pass as u64 | (index as u64) << 32
}

/// Walks the region in ascending page order, forever, writing records.
pub struct Walker {
    base: u64,
    pages: u64,
    pass: u32,
    index: u64,
}

impl Walker {
    /// A walker starting pass 1 at page 0 of the current region.
    pub fn from_region() -> Self {
        Self {
            base: PAGES_BASE.load(Ordering::Acquire),
            pages: PAGES_COUNT.load(Ordering::Acquire),
            pass: 1,
            index: 0,
        }
    }

    pub fn step(&mut self, n: u64) {
        if self.pages == 0 {
            return;
        }
        for _ in 0..n {
            let p = (self.base + self.index * 4096) as *mut u64;
            // SAFETY: the region is free RAM chosen by mem::choose.
            unsafe { write_volatile(p, record(self.pass, self.index as u32)) };
            self.index += 1;
            if self.index == self.pages {
                PAGES_DONE.store(self.pass as u64, Ordering::Release);
                self.pass = self.pass.wrapping_add(1);
                self.index = 0;
            }
        }
    }
}

/// Set up the region: write pass-0 records in every page (so that the
/// invariant holds from the start), reset the progress counter.
pub fn pages_prepare(base: u64, pages: u64, cpu: usize) {
    for i in 0..pages {
        // SAFETY: as in Walker::step.
        unsafe { write_volatile((base + i * 4096) as *mut u64, record(0, i as u32)) };
    }
    PAGES_BASE.store(base, Ordering::Release);
    PAGES_COUNT.store(pages, Ordering::Release);
    PAGES_DONE.store(0, Ordering::Release);
    PAGES_CPU.store(cpu as u32, Ordering::Release);
}

/// Last completed pass.
pub fn pages_done() -> u64 {
    PAGES_DONE.load(Ordering::Acquire)
}

/// (base, pages) of the current region, if any.
pub fn pages_region() -> Option<(u64, u64)> {
    let n = PAGES_COUNT.load(Ordering::Acquire);
    (n > 0).then(|| (PAGES_BASE.load(Ordering::Acquire), n))
}

pub enum PagesCheck {
    Ok {
        passes: u32,
        pages: u64,
    },
    BadIndex {
        page: u64,
        found: u32,
    },
    BadPass {
        page: u64,
        expected_max: u32,
        expected_min: u32,
        found: u32,
    },
}

/// Check the invariant (migration.md): every page's index is its own; pass
/// is non-increasing with ascending address, with at most one step, of 1.
pub fn pages_verify() -> Option<PagesCheck> {
    let (base, pages) = pages_region()?;
    let rd = |i: u64| -> (u32, u32) {
        // SAFETY: the region is mapped RAM.
        let r = unsafe { core::ptr::read_volatile((base + i * 4096) as *const u64) };
        (r as u32, (r >> 32) as u32)
    };
    let first = rd(0).0;
    let mut current = first;
    let mut stepped = false;
    for i in 0..pages {
        let (pass, index) = rd(i);
        if index as u64 != i {
            return Some(PagesCheck::BadIndex {
                page: i,
                found: index,
            });
        }
        if pass == current {
            continue;
        }
        if !stepped && current > 0 && pass == current - 1 {
            stepped = true;
            current = pass;
            continue;
        }
        let min = if stepped {
            current
        } else {
            current.saturating_sub(1)
        };
        return Some(PagesCheck::BadPass {
            page: i,
            expected_max: current,
            expected_min: min,
            found: pass,
        });
    }
    Some(PagesCheck::Ok {
        passes: first,
        pages,
    })
}

/// Number of CPU slots to print (online CPUs are contiguous from 0).
pub fn cpu_slots() -> usize {
    CPUS.iter()
        .take(MAX_CPUS)
        .take_while(|c| c.is_online())
        .count()
}
