//! Exception reporter and panic handler.
//!
//! Any exception other than the gate's `ud2` (from ring 3, or from CPL0
//! itself) is redirected by `exc_entry` (asm/cpl0.S) to `fault_entry_user`,
//! which runs [`fault_report`] at CPL3 on the CPU's fault stack. It prints
//!
//! `testguest: EXCEPTION <name> vector=N rip=0x... addr=0x... cpu=N err=0x... cpl=N`
//!
//! (addr = CR2, meaningful for #PF) and halts that CPU.

use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::Ordering;

use crate::console::{write_bytes_emergency, LineBuf};
use crate::gate;
use crate::percpu::{cpu_id, CPUS, MAX_CPUS};

/// Mnemonic of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
        "#26", "#27", "#HV", "#VC", "#SX", "#31",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("#??")
}

/// Called at CPL3 by `fault_entry_user` (never returns).
#[no_mangle]
pub extern "C" fn fault_report(vector: u64, rip: u64, cr2: u64, err: u64, cpu: u64, cs: u64) -> ! {
    let cpu_ok = (cpu as usize) < MAX_CPUS;
    if cpu_ok && CPUS[cpu as usize].faulting.swap(true, Ordering::AcqRel) {
        // A fault while reporting a fault: one fixed line, then halt.
        write_bytes_emergency(b"testguest: EXCEPTION (nested fault while reporting)\n");
        gate::halt_forever();
    }
    let mut line = LineBuf::new_emergency();
    let _ = writeln!(
        line,
        "testguest: EXCEPTION {} vector={} rip={:#x} addr={:#x} cpu={} err={:#x} cpl={}",
        exception_name(vector),
        vector,
        rip,
        cr2,
        cpu,
        err,
        cs & 3
    );
    line.flush();
    if cpu_ok {
        CPUS[cpu as usize].dead.store(true, Ordering::Release);
    }
    gate::halt_forever()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let cpu = cpu_id();
    if CPUS[cpu].faulting.swap(true, Ordering::AcqRel) {
        write_bytes_emergency(b"testguest: PANIC (nested)\n");
        gate::halt_forever();
    }
    let mut line = LineBuf::new_emergency();
    let _ = write!(line, "testguest: PANIC cpu={} {}", cpu, info.message());
    if let Some(loc) = info.location() {
        let _ = write!(line, " at {}:{}", loc.file(), loc.line());
    }
    let _ = writeln!(line);
    line.flush();
    CPUS[cpu].dead.store(true, Ordering::Release);
    gate::halt_forever()
}

/// Deliberate exceptions for testing the report (`ud`, `fault kind=...`).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// `ud1` at CPL3 (#UD that is not the gate).
    Ud = 0,
    /// Read of address 0 (page 0 is unmapped): #PF.
    Pf = 1,
    /// Read of a non-canonical address: #GP.
    Gp = 2,
    /// Division by zero: #DE.
    De = 3,
    /// RDMSR of a non-existent MSR through the gate: #GP at CPL0.
    Cpl0 = 4,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "ud" => Kind::Ud,
            "pf" => Kind::Pf,
            "gp" => Kind::Gp,
            "de" => Kind::De,
            "cpl0" => Kind::Cpl0,
            _ => return None,
        })
    }

    pub fn from_u32(v: u32) -> Kind {
        match v {
            1 => Kind::Pf,
            2 => Kind::Gp,
            3 => Kind::De,
            4 => Kind::Cpl0,
            _ => Kind::Ud,
        }
    }
}

/// Raise the exception `kind` on this CPU; the reporter halts the CPU.
pub fn trigger(kind: Kind) -> ! {
    // SAFETY: deliberately faulting instructions; the exception handler
    // never returns here (the reporter halts this CPU).
    unsafe {
        match kind {
            Kind::Ud => core::arch::asm!("ud1 eax, eax", options(noreturn)),
            Kind::Pf => core::arch::asm!("mov rax, [0]", "ud2", options(noreturn)),
            Kind::Gp => core::arch::asm!(
                "movabs rax, 0x8000000000000000",
                "mov rax, [rax]",
                "ud2",
                options(noreturn)
            ),
            Kind::De => core::arch::asm!(
                "xor edx, edx",
                "xor ecx, ecx",
                "mov eax, 1",
                "div ecx",
                "ud2",
                options(noreturn)
            ),
            Kind::Cpl0 => {
                gate::rdmsr(0xdead_0000);
                core::arch::asm!("ud2", options(noreturn))
            }
        }
    }
}
