//! Per-CPU data and stacks.
//!
//! The stacks live in asm/boot.S (section `.stacks`); their sizes are these
//! constants (passed to the assembler as const operands). Ring 3 finds its
//! CPU index from its stack pointer, so no privileged register is needed.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Maximum number of vCPUs the guest supports.
pub const MAX_CPUS: usize = 8;
/// Ring-3 stack per CPU.
pub const USTACK_SIZE: usize = 0x10000;
/// CPL0 stack block per CPU: [IST stack (IST_SIZE) | kernel stack (rest)].
pub const CPL0_STACK_SIZE: usize = 0x4000;
pub const IST_SIZE: usize = 0x1000;
/// Ring-3 stack of the exception reporter per CPU.
pub const FAULT_STACK_SIZE: usize = 0x4000;

const _: () = assert!(CPL0_STACK_SIZE == 1 << 14, "exc_entry shifts by 14");

extern "C" {
    static ustacks: u8;
    static fault_stacks: u8;
}

/// Per-CPU state shared between CPUs. Cache-line aligned.
#[repr(C, align(64))]
pub struct PerCpu {
    /// Job requested by the BSP (`workload::JOB_*`).
    pub job: AtomicU32,
    /// Job this CPU is executing (its acknowledgement of `job`).
    pub state: AtomicU32,
    /// The `counters` workload's counter.
    pub counter: AtomicU64,
    /// Local APIC ID.
    pub apic_id: AtomicU32,
    pub online: AtomicBool,
    /// Set when the CPU took an exception or panicked and halted.
    pub dead: AtomicBool,
    /// Set while the CPU is reporting an exception/panic (nested faults).
    pub faulting: AtomicBool,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            job: AtomicU32::new(0),
            state: AtomicU32::new(0),
            counter: AtomicU64::new(0),
            apic_id: AtomicU32::new(0),
            online: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            faulting: AtomicBool::new(false),
        }
    }

    pub fn mark_online(&self) {
        self.online.store(true, Ordering::Release);
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Online and not halted by an exception.
    pub fn is_alive(&self) -> bool {
        self.is_online() && !self.dead.load(Ordering::Acquire)
    }
}

pub static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

/// Number of CPUs that came online (the BSP included).
pub fn online_count() -> usize {
    CPUS.iter().filter(|c| c.is_online()).count()
}

/// Index of the calling CPU (0 = BSP), from the ring-3 stack pointer.
pub fn cpu_id() -> usize {
    let rsp: usize;
    // SAFETY: reads the stack pointer only.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    let (us, fs) = (
        &raw const ustacks as usize,
        &raw const fault_stacks as usize,
    );
    if rsp > us && rsp <= us + MAX_CPUS * USTACK_SIZE {
        (rsp - us - 1) / USTACK_SIZE
    } else if rsp > fs && rsp <= fs + MAX_CPUS * FAULT_STACK_SIZE {
        (rsp - fs - 1) / FAULT_STACK_SIZE
    } else {
        0
    }
}
