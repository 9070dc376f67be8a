//! TSC-based time.
//!
//! The TSC frequency comes from, in this order:
//! 1. `tsc_khz=N` on the kernel command line (source `cmdline`);
//! 2. CPUID leaf 0x40000010 EAX (TSC kHz) executed at CPL0, when the
//!    hypervisor leaf range reaches it (source `cpuid`);
//! 3. kvmclock: the `tsc_to_system_mul`/`tsc_shift` pair KVM writes into a
//!    pvclock structure after a WRMSR to MSR_KVM_SYSTEM_TIME(_NEW) (source
//!    `kvmclock`; kvmclock is switched off again right after);
//! 4. PIT channel 2 counting 10 ms at CPL0 (source `pit`);
//! 5. a guess of 2 GHz (source `guess`; times are then wrong).

use core::hint::spin_loop;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::gate;

static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is available at CPL3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Record the boot time reference (first thing in ring 3).
pub fn mark_boot() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
}

/// TSC ticks per millisecond (0 before calibration).
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Milliseconds since `mark_boot`.
pub fn now_ms() -> u64 {
    let khz = tsc_khz().max(1);
    rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed)) / khz
}

/// TSC value `ms` milliseconds from now.
pub fn deadline_after_ms(ms: u64) -> u64 {
    rdtsc().wrapping_add(ms.saturating_mul(tsc_khz()))
}

/// TSC value `us` microseconds from now.
pub fn deadline_after_us(us: u64) -> u64 {
    rdtsc().wrapping_add(us.saturating_mul(tsc_khz()) / 1000)
}

/// Whether the TSC passed `deadline`.
pub fn passed(deadline: u64) -> bool {
    (rdtsc().wrapping_sub(deadline) as i64) >= 0
}

pub fn delay_us(us: u64) {
    let end = deadline_after_us(us);
    while !passed(end) {
        spin_loop();
    }
}

fn sane(khz: u64) -> bool {
    (100_000..=20_000_000).contains(&khz)
}

/// Determine the TSC frequency and print `testguest: tsc khz=K source=S
/// hello_us=U` (U: microseconds from the first instruction of the PVH entry
/// to the `testguest: hello` output, given as `hello_ticks` TSC ticks).
pub fn calibrate(cmdline_khz: Option<u64>, hello_ticks: u64) {
    let (khz, source) = if let Some(k) = cmdline_khz.filter(|&k| k > 0) {
        (k, "cmdline")
    } else if let Some(k) = from_cpuid().filter(|&k| sane(k)) {
        (k, "cpuid")
    } else if let Some(k) = from_kvmclock().filter(|&k| sane(k)) {
        (k, "kvmclock")
    } else if let Some(k) = from_pit().filter(|&k| sane(k)) {
        (k, "pit")
    } else {
        (2_000_000, "guess")
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    println!(
        "testguest: tsc khz={} source={} hello_us={}",
        khz,
        source,
        hello_ticks.saturating_mul(1000) / khz
    );
}

fn hypervisor_leaf() -> ([u32; 4], bool) {
    let r = gate::cpuid(0x4000_0000, 0);
    let kvm = r[1] == 0x4b4d_564b && r[2] == 0x564b_4d56 && r[3] == 0x4d;
    (r, kvm)
}

fn from_cpuid() -> Option<u64> {
    let (r, _) = hypervisor_leaf();
    if r[0] >= 0x4000_0010 && r[0] < 0x4000_0100 {
        Some(gate::cpuid(0x4000_0010, 0)[0] as u64)
    } else {
        None
    }
}

/// pvclock structure KVM fills in (32-byte aligned).
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

fn from_kvmclock() -> Option<u64> {
    const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    let (_, kvm) = hypervisor_leaf();
    if !kvm {
        return None;
    }
    let features = gate::cpuid(0x4000_0001, 0)[0];
    let msr = if features & (1 << 3) != 0 {
        MSR_KVM_SYSTEM_TIME_NEW
    } else if features & 1 != 0 {
        MSR_KVM_SYSTEM_TIME
    } else {
        return None;
    };
    let pv = &raw mut PVCLOCK;
    // Identity mapped: the virtual address is the guest-physical address.
    gate::wrmsr(msr, pv as u64 | 1);
    // SAFETY: KVM wrote the structure before resuming us; we only read it.
    let (version, mul, shift) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*pv).version),
            core::ptr::read_volatile(&raw const (*pv).tsc_to_system_mul),
            core::ptr::read_volatile(&raw const (*pv).tsc_shift),
        )
    };
    gate::wrmsr(msr, 0);
    if mul == 0 || version & 1 != 0 {
        return None;
    }
    // ns = ((tsc << shift) * mul) >> 32  =>  tsc_hz = 1e9 * 2^32 / mul / 2^shift
    let base = (1_000_000u128 << 32) / mul as u128;
    let khz = if shift >= 0 {
        base >> shift
    } else {
        base << (-shift)
    };
    Some(khz as u64)
}

fn from_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u16 = 11_932; // 10 ms
    let tsc = gate::pit_calibrate(TICKS);
    if tsc == 0 {
        return None;
    }
    Some(tsc * PIT_HZ / (TICKS as u64 * 1000))
}
