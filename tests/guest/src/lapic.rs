//! Local APIC (xAPIC, MMIO at 0xFEE00000), accessed from ring 3.
//!
//! Each access is an MMIO exit (about 25 us from CPL3 on the development
//! host), so the hot paths avoid it; EOI is sent by the CPL0 stub.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::{irq, time};

pub const BASE: usize = 0xfee0_0000;

const ID: usize = 0x20;
const TPR: usize = 0x80;
const SVR: usize = 0xf0;
const ICR_LO: usize = 0x300;
const ICR_HI: usize = 0x310;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const LVT_ERROR: usize = 0x370;
const TIMER_INIT: usize = 0x380;
const TIMER_CUR: usize = 0x390;
const TIMER_DIV: usize = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
const ICR_INIT: u32 = 0x4500; // INIT, level assert, edge
const ICR_STARTUP: u32 = 0x4600; // STARTUP, level assert
const ICR_FIXED: u32 = 0x4000; // fixed, level assert

/// LAPIC timer ticks per millisecond (divide by 1); 0 if unusable.
static TIMER_PER_MS: AtomicU64 = AtomicU64::new(0);

fn read(reg: usize) -> u32 {
    // SAFETY: the LAPIC page is mapped user-accessible (boot.S page tables).
    unsafe { read_volatile((BASE + reg) as *const u32) }
}

fn write(reg: usize, value: u32) {
    // SAFETY: as above.
    unsafe { write_volatile((BASE + reg) as *mut u32, value) }
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(ID) >> 24
}

/// Software-enable the LAPIC, accept all priorities, mask LINT0 (the PIC's
/// ExtINT line) and the error LVT. Run by every CPU before it sets IF.
pub fn init_local() {
    write(SVR, SVR_ENABLE | irq::VEC_SPURIOUS as u32);
    write(TPR, 0);
    write(LVT_LINT0, LVT_MASKED);
    write(LVT_ERROR, LVT_MASKED | 0xfe);
}

fn send_ipi(apic_id: u32, icr: u32) {
    write(ICR_HI, apic_id << 24);
    write(ICR_LO, icr);
}

pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, ICR_INIT);
}

/// STARTUP IPI: the AP starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u32, page: u8) {
    send_ipi(apic_id, ICR_STARTUP | page as u32);
}

pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, ICR_FIXED | vector as u32);
}

/// Measure the LAPIC timer rate against the TSC (about 2 ms, BSP, IF=0).
pub fn calibrate_timer() {
    if time::tsc_khz() == 0 {
        return;
    }
    write(TIMER_DIV, 0xb); // divide by 1
    write(LVT_TIMER, LVT_MASKED | irq::VEC_TIMER as u32);
    write(TIMER_INIT, u32::MAX);
    let t0 = time::rdtsc();
    time::delay_us(2000);
    let cur = read(TIMER_CUR);
    let t1 = time::rdtsc();
    write(TIMER_INIT, 0);
    // From now on the timer is an unmasked one-shot; oneshot_us only writes
    // the initial count (one MMIO exit).
    write(LVT_TIMER, irq::VEC_TIMER as u32);
    let ticks = (u32::MAX - cur) as u64;
    let tsc = t1 - t0;
    let per_ms = (ticks * time::tsc_khz()).checked_div(tsc).unwrap_or(0);
    // A LAPIC that does not count (or absurd rates) disables timer sleeps.
    let per_ms = if (1_000..=100_000_000).contains(&per_ms) {
        per_ms
    } else {
        0
    };
    TIMER_PER_MS.store(per_ms, Ordering::Relaxed);
}

/// Arm a one-shot timer interrupt on `irq::VEC_TIMER` in `us`
/// microseconds. Returns false if the timer is not usable.
pub fn oneshot_us(us: u64) -> bool {
    let per_ms = TIMER_PER_MS.load(Ordering::Relaxed);
    if per_ms == 0 {
        return false;
    }
    let ticks = (per_ms * us / 1000).clamp(1, u32::MAX as u64) as u32;
    write(TIMER_INIT, ticks);
    true
}
