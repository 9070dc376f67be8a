//! testguest: the project's instrument for end-to-end tests.
//!
//! A freestanding x86-64 image booted by the VMM through the PVH entry. A
//! small CPL0 stub in assembly (`asm/boot.S`, `asm/cpl0.S`) sets up long
//! mode, paging, GDT/TSS/IDT and drops to ring 3, where all of this crate's
//! Rust code runs (CPL0 is emulated instruction by instruction on the
//! development host, CPL3 runs natively). Ring 3 reaches CPL0 through the
//! `ud2` gate ([`gate`]). See README.md for the design, the gate ABI, the
//! memory map and the commands.
#![no_std]
#![no_main]

#[macro_use]
mod console;

mod balloon;
mod blk;
mod bootinfo;
mod builtins;
mod fault;
mod gate;
mod ged;
mod irq;
mod kbd;
mod lapic;
mod mem;
mod net;
mod pci;
mod percpu;
mod shell;
mod smp;
mod sync;
mod time;
mod virtio;
mod workload;

core::arch::global_asm!(
    include_str!("asm/boot.S"),
    include_str!("asm/cpl0.S"),
    MAX_CPUS = const percpu::MAX_CPUS,
    USTACK_SIZE = const percpu::USTACK_SIZE,
    CPL0_STACK_SIZE = const percpu::CPL0_STACK_SIZE,
    IST_SIZE = const percpu::IST_SIZE,
    FAULT_STACK_SIZE = const percpu::FAULT_STACK_SIZE,
    GATE_COUNT = const gate::svc::COUNT,
    AP_TRAMPOLINE = const smp::AP_TRAMPOLINE,
    options(att_syntax)
);

/// Ring-3 entry of the bootstrap processor (from `bsp_entry_user` in boot.S,
/// after `.bss` was zeroed). `start_info` is the physical address of the PVH
/// `struct hvm_start_info` the VMM passed in EBX; `entry_tsc` the TSC read
/// by the first instruction of the PVH entry.
#[no_mangle]
pub extern "C" fn bsp_main(start_info: u64, entry_tsc: u64) -> ! {
    time::mark_boot();
    irq::init_idt();
    // First output: only the boot stub and one gate call ran at CPL0 so far.
    gate::write(b"testguest: hello\n");
    let hello_tsc = time::rdtsc();

    let boot = bootinfo::init(start_info);
    mem::unmap_page0();
    let opts = shell::Options::parse(boot.cmdline());
    time::calibrate(opts.tsc_khz, hello_tsc.wrapping_sub(entry_tsc));
    irq::init_bsp_platform();
    lapic::init_local();
    mem::init(boot);
    smp::start_aps(opts.cpus, boot);
    lapic::calibrate_timer();
    gate::set_interrupts(true);
    println!(
        "testguest: ready cpus={} mem_mib={}",
        percpu::online_count(),
        mem::total_mib()
    );
    shell::run(opts, boot.cmdline())
}

/// Ring-3 entry of an application processor (from `ap_entry_user`).
#[no_mangle]
pub extern "C" fn ap_main(cpu: u64) -> ! {
    lapic::init_local();
    gate::set_interrupts(true);
    let cpu = cpu as usize;
    percpu::CPUS[cpu].mark_online();
    workload::ap_loop(cpu)
}
