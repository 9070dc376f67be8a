//! The CPL0 call gate.
//!
//! Ring 3 executes `ud2` with the service number in RAX and arguments in RDI,
//! RSI, RDX. The #UD handler (asm/cpl0.S) checks that the faulting bytes are
//! `0F 0B` and that the fault came from CPL3, runs the service, advances RIP
//! by 2 and returns with `iretq`. Results come back in RAX (CPUID also uses
//! RDI, RSI, RDX). The gate clobbers RAX, RCX, RDX, RSI, RDI, R8-R11.
//!
//! One round trip costs about 27 us on the development host (exception
//! delivery and `iretq` are emulated), plus about 8 us per port I/O exit.

use core::arch::asm;
use core::sync::atomic::AtomicU64;

/// Service numbers (RAX). Must match `gate_table` in asm/cpl0.S (the
/// assembler checks the count).
#[allow(dead_code)]
pub mod svc {
    pub const WRITE: u64 = 0;
    pub const READ_SERIAL: u64 = 1;
    pub const READ_KBD: u64 = 2;
    pub const WAIT_IRQ: u64 = 3;
    pub const HALT: u64 = 4;
    pub const POWEROFF: u64 = 5;
    pub const RESET: u64 = 6;
    pub const TRIPLE_FAULT: u64 = 7;
    pub const CPUID: u64 = 8;
    pub const PORT_IN: u64 = 9;
    pub const PORT_OUT: u64 = 10;
    pub const RDMSR: u64 = 11;
    pub const WRMSR: u64 = 12;
    pub const PIT_CALIBRATE: u64 = 13;
    pub const SET_IF: u64 = 14;
    pub const NOP: u64 = 15;
    pub const FLUSH_TLB: u64 = 16;
    pub const CRASH: u64 = 17;
    /// Number of services.
    pub const COUNT: usize = 18;
}

/// Raw gate call. Returns (rax, rdi, rsi, rdx) after the call.
///
/// # Safety
/// The service must be given arguments it can use safely (valid buffers).
#[inline(always)]
pub unsafe fn call(service: u64, a0: u64, a1: u64, a2: u64) -> [u64; 4] {
    let (rax, rdi, rsi, rdx): (u64, u64, u64, u64);
    asm!(
        "ud2",
        inout("rax") service => rax,
        inout("rdi") a0 => rdi,
        inout("rsi") a1 => rsi,
        inout("rdx") a2 => rdx,
        out("rcx") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        options(nostack)
    );
    [rax, rdi, rsi, rdx]
}

/// Write bytes to COM1 (one `rep outsb`). Callers normally go through
/// `console` (which serialises CPUs); this is the raw path.
pub fn write(bytes: &[u8]) {
    if !bytes.is_empty() {
        // SAFETY: the buffer is valid for its length.
        unsafe { call(svc::WRITE, bytes.as_ptr() as u64, bytes.len() as u64, 0) };
    }
}

/// Read up to `buf.len()` bytes that COM1 has ready; returns how many.
pub fn read_serial(buf: &mut [u8]) -> usize {
    // SAFETY: the buffer is valid and writable for its length.
    let n = unsafe {
        call(
            svc::READ_SERIAL,
            buf.as_mut_ptr() as u64,
            buf.len() as u64,
            0,
        )[0]
    };
    (n as usize).min(buf.len())
}

/// Result of polling the i8042.
pub enum Kbd {
    /// A byte from the output buffer, with the status register read before it.
    Byte {
        status: u8,
        data: u8,
    },
    Empty,
    /// Status read 0xff: no controller on this machine.
    Absent,
}

pub fn read_kbd() -> Kbd {
    // SAFETY: no memory arguments.
    let r = unsafe { call(svc::READ_KBD, 0, 0, 0)[0] } as i64;
    match r {
        -1 => Kbd::Empty,
        -2 => Kbd::Absent,
        v => Kbd::Byte {
            status: (v >> 8) as u8,
            data: v as u8,
        },
    }
}

/// Sleep at CPL0 (`sti; hlt`) unless `counter` already differs from `seen`.
/// Returns after the next interrupt (whose handler ran on this CPU).
pub fn wait_irq(counter: &AtomicU64, seen: u64) {
    // SAFETY: the counter is a valid, aligned u64.
    unsafe { call(svc::WAIT_IRQ, counter.as_ptr() as u64, seen, 0) };
}

/// Halt this CPU forever (interrupts off).
pub fn halt_forever() -> ! {
    // SAFETY: no memory arguments; does not return.
    unsafe { call(svc::HALT, 0, 0, 0) };
    unreachable_halt()
}

pub fn poweroff() -> ! {
    // SAFETY: no memory arguments.
    unsafe { call(svc::POWEROFF, 0, 0, 0) };
    unreachable_halt()
}

pub fn reset() -> ! {
    // SAFETY: no memory arguments.
    unsafe { call(svc::RESET, 0, 0, 0) };
    unreachable_halt()
}

pub fn triple_fault() -> ! {
    // SAFETY: no memory arguments.
    unsafe { call(svc::TRIPLE_FAULT, 0, 0, 0) };
    unreachable_halt()
}

fn unreachable_halt() -> ! {
    loop {
        // SAFETY: no memory arguments.
        unsafe { call(svc::HALT, 0, 0, 0) };
    }
}

/// CPUID executed at CPL0 (at CPL3 the outer hypervisor may answer instead
/// of the VMM's KVM_SET_CPUID2 table). Returns [eax, ebx, ecx, edx].
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: no memory arguments.
    let r = unsafe { call(svc::CPUID, leaf as u64, subleaf as u64, 0) };
    [r[0] as u32, r[1] as u32, r[2] as u32, r[3] as u32]
}

/// Port input of `size` bytes (1, 2 or 4).
pub fn port_in(port: u16, size: u8) -> u32 {
    // SAFETY: no memory arguments.
    unsafe { call(svc::PORT_IN, port as u64, size as u64, 0)[0] as u32 }
}

/// Port output of `size` bytes (1, 2 or 4).
pub fn port_out(port: u16, size: u8, value: u32) {
    // SAFETY: no memory arguments.
    unsafe { call(svc::PORT_OUT, port as u64, size as u64, value as u64) };
}

pub fn outb(port: u16, value: u8) {
    port_out(port, 1, value as u32)
}

/// RDMSR at CPL0. A non-existent MSR raises #GP, reported as an exception.
pub fn rdmsr(msr: u32) -> u64 {
    // SAFETY: no memory arguments.
    unsafe { call(svc::RDMSR, msr as u64, 0, 0)[0] }
}

/// WRMSR at CPL0. A bad MSR or value raises #GP, reported as an exception.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: no memory arguments (an MSR pointing KVM at guest memory must
    // name memory the caller owns; see time.rs).
    unsafe { call(svc::WRMSR, msr as u64, value, 0) };
}

/// Count `pit_ticks` (< 65536) of PIT channel 2 at CPL0; returns the TSC
/// ticks elapsed, or 0 if the PIT never signalled (no PIT).
pub fn pit_calibrate(pit_ticks: u16) -> u64 {
    // SAFETY: no memory arguments.
    unsafe { call(svc::PIT_CALIBRATE, pit_ticks as u64, 0, 0)[0] }
}

/// Enable or disable interrupts for this CPU's ring-3 code (RFLAGS.IF).
pub fn set_interrupts(on: bool) {
    // SAFETY: no memory arguments.
    unsafe { call(svc::SET_IF, on as u64, 0, 0) };
}

/// Reload CR3: needed after ring 3 removes or changes a present mapping in
/// the (user-writable) page tables.
pub fn flush_tlb() {
    // SAFETY: no memory arguments.
    unsafe { call(svc::FLUSH_TLB, 0, 0, 0) };
}

/// A gate round trip that does nothing (for measurements).
pub fn nop() {
    // SAFETY: no memory arguments.
    unsafe { call(svc::NOP, 0, 0, 0) };
}

/// Execute at CPL0 an instruction this development host's KVM cannot
/// emulate (POPCNT): KVM_RUN fails with KVM_EXIT_INTERNAL_ERROR (suberror 1,
/// emulation failure) and the VMM reports a guest crash. Returns only where
/// CPL0 runs natively (hardware-assisted virtualization), where the
/// instruction is harmless.
pub fn crash() {
    // SAFETY: no memory arguments.
    unsafe { call(svc::CRASH, 0, 0, 0) };
}
