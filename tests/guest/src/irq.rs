//! IDT and interrupt vectors.
//!
//! The IDT is written here, natively at ring 3, before the first gate call
//! (it is plain user-mapped memory; CPL0 only ran `lidt`). Every vector v
//! points at the 16-byte stub `isr_table + 16 * v` in asm/cpl0.S.
//!
//! Vectors 32..=255 are external interrupts: the CPL0 stub increments
//! `IRQ_COUNTS[v]` and sends the LAPIC EOI. A driver (e.g. a future MSI-X
//! driver in `pci.rs`/`virtio.rs`) takes a vector with [`alloc_vector`],
//! programs its MSI-X table entry with address 0xFEE00000 | (apic_id << 12)
//! and data = vector, and waits with [`wait_for`].
//! Vector 2 (NMI) is counted in `IRQ_COUNTS[2]` too.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::gate;

/// LAPIC timer (BSP idle sleep, one-shot).
pub const VEC_TIMER: u8 = 0x20;
/// Wake-up IPI sent to an idle AP when it is given a job.
pub const VEC_WAKE: u8 = 0x21;
/// First vector handed out by `alloc_vector`.
pub const VEC_DYNAMIC_FIRST: u8 = 0x30;
/// Last vector handed out by `alloc_vector`.
pub const VEC_DYNAMIC_LAST: u8 = 0xef;
/// LAPIC spurious-interrupt vector (counted, no EOI).
pub const VEC_SPURIOUS: u8 = 0xff;

/// Interrupt counters, incremented at CPL0 by `irq_entry` (asm/cpl0.S).
#[no_mangle]
pub static IRQ_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    reserved: u32,
}

#[repr(C, align(4096))]
pub struct Idt([IdtEntry; 256]);

/// The IDT (`idtr` in asm/boot.S points here).
#[no_mangle]
pub static mut IDT: Idt = Idt([IdtEntry {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    attr: 0,
    offset_mid: 0,
    offset_hi: 0,
    reserved: 0,
}; 256]);

extern "C" {
    static isr_table: u8;
}

const KERNEL_CS: u16 = 0x08;
/// Present, DPL0, 64-bit interrupt gate (IF cleared on entry).
const INTERRUPT_GATE: u8 = 0x8e;

/// Fill all 256 IDT entries. Runs on the BSP before the first gate call.
pub fn init_idt() {
    let base = &raw const isr_table as u64;
    let idt = &raw mut IDT;
    for v in 0..256usize {
        let handler = base + 16 * v as u64;
        let ist = matches!(v, 2 | 8 | 18) as u8;
        let e = IdtEntry {
            offset_lo: handler as u16,
            selector: KERNEL_CS,
            ist,
            attr: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_hi: (handler >> 32) as u32,
            reserved: 0,
        };
        // SAFETY: single-threaded boot; the IDT is not in use yet.
        unsafe { (*idt).0[v] = e };
    }
}

/// Mask both legacy PICs (firmware such as SeaBIOS leaves them enabled with
/// vectors that collide with exceptions).
pub fn init_bsp_platform() {
    gate::outb(0x21, 0xff);
    gate::outb(0xa1, 0xff);
}

/// The counter of `vector`.
pub fn counter(vector: u8) -> &'static AtomicU64 {
    &IRQ_COUNTS[vector as usize]
}

pub fn count(vector: u8) -> u64 {
    IRQ_COUNTS[vector as usize].load(Ordering::Acquire)
}

/// Sleep until `vector`'s counter differs from `seen` (returns at once if it
/// already does). Other interrupts also end the sleep: callers loop.
pub fn wait_for(vector: u8, seen: u64) {
    gate::wait_irq(counter(vector), seen);
}

static NEXT_VECTOR: AtomicUsize = AtomicUsize::new(VEC_DYNAMIC_FIRST as usize);

/// Take an unused vector for a device interrupt (None when exhausted).
#[allow(dead_code)]
pub fn alloc_vector() -> Option<u8> {
    let v = NEXT_VECTOR.fetch_add(1, Ordering::Relaxed);
    (v <= VEC_DYNAMIC_LAST as usize).then_some(v as u8)
}
