//! Measures how fast this host's KVM runs guest ring 0.
//!
//! On hosts with VT-x/AMD-V, guest ring 0 runs natively (billions of
//! instructions per second). On a software-assisted nested hypervisor (as on
//! our development machines, see the platform notes) ring 0, real mode and
//! 32-bit mode are emulated one instruction at a time (a few million per
//! second), so a Linux kernel cannot boot in useful time. Tests that need a
//! fast ring 0 (Linux boot, benchmarks) call [`ring0_speed`] and skip with the
//! measured figure when [`Ring0Speed::is_native`] is false.
//!
//! The probe is a real measurement: a raw VM (no in-kernel irqchip, so `hlt`
//! exits to userspace) runs `dec ecx; jnz` loops ending in `hlt`, once in real
//! mode and once at CPL0 in 64-bit long mode, and is timed around `KVM_RUN`.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

/// Loop iterations per timed run (two instructions each).
pub const ITERATIONS: u32 = 200_000;
/// Timed runs at most per mode; the fastest counts (a preempted run is slow).
const RUNS: usize = 3;
/// Below this many instructions/s guest ring 0 is taken to be emulated.
/// Native: well over 1e9; emulated (nested, software-assisted): about 2e6.
pub const NATIVE_THRESHOLD_IPS: f64 = 1e8;

const MEM_SIZE: usize = 2 << 20;
const CODE_REAL: u64 = 0x0;
const CODE_LONG: u64 = 0x100;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;

/// What [`ring0_speed`] measured.
#[derive(Clone, Debug)]
pub struct Ring0Speed {
    /// Instructions per second of the real-mode loop (fastest run).
    pub real_mode_ips: f64,
    /// Instructions per second of the 64-bit CPL0 loop (fastest run).
    pub long_mode_ips: f64,
    /// Wall time of the fastest real-mode and long-mode runs.
    pub real_mode_time: Duration,
    pub long_mode_time: Duration,
    /// Loop iterations per run (2 instructions each).
    pub iterations: u32,
    /// `vmx` or `svm` when /proc/cpuinfo shows hardware virtualization.
    pub cpu_virt_flag: Option<&'static str>,
}

impl Ring0Speed {
    /// The slower of the two modes, in instructions per second.
    pub fn instructions_per_second(&self) -> f64 {
        self.real_mode_ips.min(self.long_mode_ips)
    }

    /// Whether guest ring 0 runs at hardware speed.
    pub fn is_native(&self) -> bool {
        self.instructions_per_second() >= NATIVE_THRESHOLD_IPS
    }

    /// One line with the figures, for test output.
    pub fn describe(&self) -> String {
        format!(
            "guest ring 0 {}: {} iterations of `dec ecx; jnz` took {:.2} ms in real mode \
             ({:.3e} instructions/s) and {:.2} ms in 64-bit CPL0 ({:.3e} instructions/s); \
             threshold {:.0e}/s; /proc/cpuinfo {}",
            if self.is_native() {
                "runs natively"
            } else {
                "is emulated"
            },
            self.iterations,
            self.real_mode_time.as_secs_f64() * 1e3,
            self.real_mode_ips,
            self.long_mode_time.as_secs_f64() * 1e3,
            self.long_mode_ips,
            NATIVE_THRESHOLD_IPS,
            match self.cpu_virt_flag {
                Some(flag) => format!("has {flag}"),
                None => "has neither vmx nor svm".to_string(),
            }
        )
    }
}

/// `vmx` or `svm` if the host CPU advertises hardware virtualization.
pub fn cpu_virt_flag() -> Option<&'static str> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    if flags.split_whitespace().any(|w| w == "vmx") {
        Some("vmx")
    } else if flags.split_whitespace().any(|w| w == "svm") {
        Some("svm")
    } else {
        None
    }
}

/// Measures guest ring-0 speed on this host's /dev/kvm (about 1 s where ring
/// 0 is emulated, a few ms where it is native).
pub fn ring0_speed() -> Result<Ring0Speed, String> {
    let (real_mode_time, real_mode_ips) = measure(Mode::Real)?;
    let (long_mode_time, long_mode_ips) = measure(Mode::Long)?;
    Ok(Ring0Speed {
        real_mode_ips,
        long_mode_ips,
        real_mode_time,
        long_mode_time,
        iterations: ITERATIONS,
        cpu_virt_flag: cpu_virt_flag(),
    })
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Real,
    Long,
}

/// Guest memory: an anonymous mapping, unmapped on drop.
struct Memory(*mut u8);

impl Memory {
    fn new() -> Result<Memory, String> {
        // SAFETY: a fresh private anonymous mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Memory(ptr.cast()))
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        assert!(addr as usize + bytes.len() <= MEM_SIZE);
        // SAFETY: in bounds of our mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(addr as usize), bytes.len())
        };
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: our mapping; the VM using it is dropped before (field order in `measure`).
        unsafe { libc::munmap(self.0.cast(), MEM_SIZE) };
    }
}

/// Returns the fastest run's time and instructions/s.
fn measure(mode: Mode) -> Result<(Duration, f64), String> {
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let mem = Memory::new()?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.0 as u64,
        flags: 0,
    };
    // SAFETY: the region is our mapping, which outlives `vm` (dropped first below).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;

    // `mov ecx, imm32; 1: dec ecx; jnz 1b; hlt` (0x66 prefixes for 32-bit
    // operands in real mode; `ff c9` is `dec ecx`/`dec cx` in every mode).
    let (code_addr, code): (u64, Vec<u8>) = match mode {
        Mode::Real => (
            CODE_REAL,
            vec![0x66, 0xb9, 0, 0, 0, 0, 0x66, 0xff, 0xc9, 0x75, 0xfb, 0xf4],
        ),
        Mode::Long => (
            CODE_LONG,
            vec![0xb9, 0, 0, 0, 0, 0xff, 0xc9, 0x75, 0xfc, 0xf4],
        ),
    };
    mem.write(code_addr, &code);
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    setup_sregs(&vcpu, mode, &mem)?;

    // A short untimed run faults the pages in; then the timed runs.
    run(&mut vcpu, &mem, mode, code_addr, 1000)?;
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let elapsed = run(&mut vcpu, &mem, mode, code_addr, ITERATIONS)?;
        best = best.min(elapsed);
        if 2.0 * ITERATIONS as f64 / best.as_secs_f64() >= NATIVE_THRESHOLD_IPS * 10.0 {
            break; // clearly native: no need to confirm
        }
    }
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok((best, 2.0 * ITERATIONS as f64 / best.as_secs_f64()))
}

fn setup_sregs(vcpu: &VcpuFd, mode: Mode, mem: &Memory) -> Result<(), String> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    match mode {
        Mode::Real => {
            // Out of reset CS is f000 with base ffff0000; run at 0:0 instead.
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        Mode::Long => {
            // Identity-map the first 2 MiB with one large page.
            mem.write(PML4, &(PDPT | 3).to_le_bytes());
            mem.write(PDPT, &(PD | 3).to_le_bytes());
            mem.write(PD, &0x83u64.to_le_bytes());
            let code = kvm_segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: 0x8,
                type_: 0xb,
                present: 1,
                dpl: 0,
                db: 0,
                s: 1,
                l: 1,
                g: 1,
                ..Default::default()
            };
            let data = kvm_segment {
                selector: 0x10,
                type_: 0x3,
                db: 1,
                l: 0,
                ..code
            };
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr3 = PML4;
            sregs.cr4 |= 1 << 5; // PAE
            sregs.cr0 |= (1 << 0) | (1 << 31); // PE, PG
            sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))
}

/// Runs the loop once with `iterations`; returns the time until `hlt`.
fn run(
    vcpu: &mut VcpuFd,
    mem: &Memory,
    mode: Mode,
    code_addr: u64,
    iterations: u32,
) -> Result<Duration, String> {
    // The loop count is the immediate of `mov ecx, imm32`.
    let imm_offset = match mode {
        Mode::Real => 2,
        Mode::Long => 1,
    };
    mem.write(code_addr + imm_offset, &iterations.to_le_bytes());
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = code_addr;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => return Ok(start.elapsed()),
            Ok(other) => return Err(format!("{mode:?} probe: unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("{mode:?} probe: KVM_RUN: {e}")),
        }
    }
}
