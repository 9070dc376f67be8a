//! vCPUs: their configuration, their run loop on one thread each, pausing,
//! and their state for save/restore.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// MSRs set at boot, with their reset values.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SFMASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRR default type: enabled, write-back
];

/// AMD's hardware configuration register (MSR C001_0015).
const MSR_K7_HWCR: u32 = 0xc001_0015;
/// HWCR bit 24, TscFreqSel: the TSC counts at the P0 frequency. Read-only
/// and set on every AMD CPU since family 10h; Linux checks it on those and
/// logs "[Firmware Bug]: TSC doesn't count with P0 frequency!" when it is
/// clear. KVM keeps HWCR at 0 unless the VMM sets it (Linux 6.7+ lets it).
const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// Whether `cpuid` names an AMD (or Hygon, AMD-derived) CPU in leaf 0.
fn is_amd(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0 && e.index == 0)
        .is_some_and(|e| {
            let vendor = [e.ebx, e.edx, e.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect::<Vec<u8>>();
            vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
        })
}

// LAPIC registers and delivery modes for the local interrupt pins.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: std::cell::Cell<*mut kvm_bindings::kvm_run> =
        const { std::cell::Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit makes the current or the next KVM_RUN return
    // EINTR, so a kick that arrives just before KVM_RUN is not lost.
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by the vCPU
        // thread before the signal is unblocked and valid until the thread ends.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler; once per process.
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// Why a vCPU stopped the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// Triple fault or a KVM reset event.
    Reset,
    /// KVM reported a shutdown system event (ACPI S5 through KVM).
    PowerOff,
    /// The guest cannot continue: emulation failure, failed entry, KVM error.
    Crash(String),
}

/// How a vCPU thread reports to the VMM's control loop.
pub type VcpuStopSink = Arc<dyn Fn(u8, VcpuStop) + Send + Sync>;

/// Exit counters of one vCPU.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub exits: AtomicU64,
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub unhandled_io: AtomicU64,
    pub unhandled_mmio: AtomicU64,
    pub kicks: AtomicU64,
}

impl VcpuCounters {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("exits", &self.exits),
            ("io_exits", &self.io_exits),
            ("mmio_exits", &self.mmio_exits),
            ("unhandled_io", &self.unhandled_io),
            ("unhandled_mmio", &self.unhandled_mmio),
            ("kicks", &self.kicks),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// The full architectural state of a vCPU, in KVM's terms.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
#[error("vcpu{id}: {what}: {source}")]
pub struct VcpuError {
    pub id: u8,
    pub what: &'static str,
    pub source: kvm_ioctls::Error,
}

/// One vCPU: its KVM fd and the buses its exits go to.
pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pub counters: Arc<VcpuCounters>,
    /// The MSR indices saved and restored (KVM_GET_MSR_INDEX_LIST).
    msr_list: Arc<Vec<u32>>,
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>, msr_list: Arc<Vec<u32>>) -> Self {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            counters: Arc::new(VcpuCounters::default()),
            msr_list,
        }
    }

    fn err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError { id, what, source }
    }

    /// CPUID, boot MSRs, FPU and LAPIC pins: the power-on state.
    pub fn configure(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.err("KVM_SET_CPUID2"))?;
        let entries: Vec<kvm_msr_entry> = BOOT_MSRS
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).expect("the boot MSR list is small");
        self.fd.set_msrs(&msrs).map_err(self.err("KVM_SET_MSRS"))?;
        if is_amd(cpuid) {
            let hwcr = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_K7_HWCR,
                data: HWCR_TSC_FREQ_SEL,
                ..Default::default()
            }])
            .expect("one MSR");
            // A KVM older than 6.7 refuses the bit (0 MSRs set): the guest
            // then only logs its complaint, as on such a host with any VMM.
            let _ = self.fd.set_msrs(&hwcr);
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.err("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?;
        set_lapic_delivery_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lapic_delivery_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.err("KVM_SET_LAPIC"))?;
        Ok(())
    }

    pub fn set_boot_registers(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        self.fd
            .set_sregs(sregs)
            .map_err(self.err("KVM_SET_SREGS"))?;
        self.fd.set_regs(regs).map_err(self.err("KVM_SET_REGS"))?;
        Ok(())
    }

    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    /// Takes the whole state; the vCPU must not be running.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let entries: Vec<kvm_msr_entry> = self
            .msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError {
            id: self.id,
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.err("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..read]
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        Ok(VcpuState {
            id: self.id,
            regs: self.fd.get_regs().map_err(self.err("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(self.err("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(self.err("KVM_GET_XCRS"))?,
            lapic: self.fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?,
            msrs,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(self.err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.err("KVM_GET_MP_STATE"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(self.err("KVM_GET_DEBUGREGS"))?,
            tsc_khz: self.tsc_khz(),
        })
    }

    /// Puts a saved state back, in the order that works on KVM (see the
    /// platform notes): TSC_KHZ, SREGS, REGS, XSAVE, XCRS, LAPIC, MSRS,
    /// VCPU_EVENTS, MP_STATE, DEBUGREGS.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if let Some(khz) = state.tsc_khz {
            // Hosts that cannot scale the TSC refuse; the guest then sees ours.
            let _ = self.fd.set_tsc_khz(khz);
        }
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.err("KVM_SET_REGS"))?;
        // SAFETY: the xsave area came from KVM_GET_XSAVE of the same size.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.err("KVM_SET_XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.err("KVM_SET_XCRS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.err("KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError {
            id: self.id,
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd.set_msrs(&msrs).map_err(self.err("KVM_SET_MSRS"))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.err("KVM_SET_VCPU_EVENTS"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.err("KVM_SET_MP_STATE"))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(self.err("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }

    /// Runs the guest until it needs the VMM; returns a stop if the VM cannot go on.
    fn run_once(&mut self) -> Option<VcpuStop> {
        let counters = self.counters.clone();
        let result = self.fd.run();
        match result {
            Ok(exit) => {
                counters.exits.fetch_add(1, Ordering::Relaxed);
                match exit {
                    VcpuExit::IoIn(port, data) => {
                        counters.io_exits.fetch_add(1, Ordering::Relaxed);
                        if !self.pio.read(u64::from(port), data) {
                            counters.unhandled_io.fetch_add(1, Ordering::Relaxed);
                            data.fill(0xff);
                        }
                        None
                    }
                    VcpuExit::IoOut(port, data) => {
                        counters.io_exits.fetch_add(1, Ordering::Relaxed);
                        if !self.pio.write(u64::from(port), data) {
                            counters.unhandled_io.fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
                        if !self.mmio.read(addr, data) {
                            counters.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
                            data.fill(0xff);
                        }
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
                        if !self.mmio.write(addr, data) {
                            counters.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    }
                    // With the in-kernel LAPIC, HLT stays in KVM; an exit here is harmless.
                    VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
                    VcpuExit::Shutdown => Some(VcpuStop::Reset),
                    VcpuExit::SystemEvent(kind, _) => match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(VcpuStop::PowerOff),
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(VcpuStop::Reset),
                        other => Some(VcpuStop::Crash(format!("KVM system event {other}"))),
                    },
                    VcpuExit::InternalError => {
                        let run = self.fd.get_kvm_run();
                        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                        // `internal` member of the union is the valid one.
                        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        Some(VcpuStop::Crash(format!(
                            "KVM internal error, suberror {suberror} (1 = instruction emulation failed) at rip {rip:#x}"
                        )))
                    }
                    VcpuExit::FailEntry(reason, cpu) => Some(VcpuStop::Crash(format!(
                        "VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
                    ))),
                    other => Some(VcpuStop::Crash(format!("unexpected exit {other:?}"))),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                counters.kicks.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => Some(VcpuStop::Crash(format!("KVM_RUN failed: {e}"))),
        }
    }
}

fn set_lapic_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let value = u32::from_le_bytes(bytes);
    let value = (value & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[reg + i] = b as libc::c_char;
    }
}

/// Slows the vCPUs down for auto-converge: while set to P percent, every
/// vCPU is kicked out of KVM_RUN every [`THROTTLE_PERIOD`] and sleeps for P%
/// of it before running on.
pub struct Throttle {
    percent: AtomicU32,
    threads: Mutex<Vec<libc::pthread_t>>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

/// The throttle's duty cycle period.
pub const THROTTLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

impl Throttle {
    fn new() -> Throttle {
        Throttle {
            percent: AtomicU32::new(0),
            threads: Mutex::new(Vec::new()),
            ticker: Mutex::new(None),
        }
    }

    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::SeqCst)
    }

    /// Sets the throttle (0 stops it).
    pub fn set(self: &Arc<Self>, percent: u32) {
        let percent = percent.min(99);
        let old = self.percent.swap(percent, Ordering::SeqCst);
        let mut ticker = self.ticker.lock().unwrap_or_else(|e| e.into_inner());
        if percent == 0 {
            if let Some(t) = ticker.take() {
                // Wake it from its period's sleep: a switch-over waits here.
                t.thread().unpark();
                let _ = t.join();
            }
        } else if old == 0 && ticker.is_none() {
            let me = self.clone();
            *ticker = crate::seccomp::spawn(
                crate::seccomp::ThreadKind::Throttle,
                std::thread::Builder::new().name("vcpu-throttle".into()),
                move || {
                    while me.percent() > 0 {
                        for &thread in me.threads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                            // SAFETY: the vCPU threads outlive the ticker: the
                            // set stops it before joining them.
                            unsafe { libc::pthread_kill(thread, kick_signal()) };
                        }
                        std::thread::park_timeout(THROTTLE_PERIOD);
                    }
                },
            )
            .ok();
        }
    }
}

/// What the control loop wants a vCPU thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Exit,
}

struct ControlState {
    command: Command,
    /// Threads currently parked (not in KVM_RUN, waiting for Run).
    parked: usize,
}

/// Shared between the control loop and all vCPU threads of a VM.
struct Control {
    state: Mutex<ControlState>,
    /// Signalled when the command changes.
    command_changed: Condvar,
    /// Signalled when a thread parks.
    parked_changed: Condvar,
    throttle: Arc<Throttle>,
}

impl Control {
    /// Called by a kicked vCPU thread: sleeps its share of the throttle
    /// period, or less if a command (pause for the switch-over) comes.
    fn sleep_if_throttled(&self) {
        let percent = self.throttle.percent();
        if percent == 0 {
            return;
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ =
            self.command_changed
                .wait_timeout_while(state, THROTTLE_PERIOD * percent / 100, |s| {
                    s.command == Command::Run
                });
    }
}

/// The vCPU threads of a VM.
pub struct VcpuSet {
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    /// Each vCPU's counters, readable while its thread holds the vCPU in KVM_RUN.
    counters: Vec<(u8, Arc<VcpuCounters>)>,
    threads: Vec<JoinHandle<()>>,
    control: Arc<Control>,
}

impl VcpuSet {
    /// Starts one thread per vCPU, parked; `resume` lets them run. With
    /// `affinity` (host CPU numbers), each thread is pinned to those CPUs
    /// before it installs its seccomp filter, which then keeps it there.
    pub fn start(
        vcpus: Vec<Vcpu>,
        on_stop: VcpuStopSink,
        affinity: Option<Vec<usize>>,
    ) -> std::io::Result<VcpuSet> {
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                command: Command::Pause,
                parked: 0,
            }),
            command_changed: Condvar::new(),
            parked_changed: Condvar::new(),
            throttle: Arc::new(Throttle::new()),
        });
        let counters = vcpus.iter().map(|v| (v.id, v.counters.clone())).collect();
        let vcpus: Vec<Arc<Mutex<Vcpu>>> =
            vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let mut threads = Vec::new();
        for vcpu in &vcpus {
            let vcpu = vcpu.clone();
            let control = control.clone();
            let on_stop = on_stop.clone();
            let id = vcpu.lock().unwrap_or_else(|e| e.into_inner()).id;
            let builder = std::thread::Builder::new().name(format!("vcpu{id}"));
            let body = move || vcpu_thread(vcpu, control, on_stop);
            let thread = match affinity.clone() {
                None => crate::seccomp::spawn(crate::seccomp::ThreadKind::Vcpu, builder, body)?,
                Some(cpus) => confine::spawn_with_setup(
                    crate::seccomp::ThreadKind::Vcpu,
                    builder,
                    move || pin_current_thread(&cpus),
                    body,
                )?,
            };
            threads.push(thread);
        }
        {
            use std::os::unix::thread::JoinHandleExt;
            let mut ids = control
                .throttle
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *ids = threads.iter().map(|t| t.as_pthread_t()).collect();
        }
        let set = VcpuSet {
            vcpus,
            counters,
            threads,
            control,
        };
        set.wait_parked();
        Ok(set)
    }

    pub fn vcpus(&self) -> &[Arc<Mutex<Vcpu>>] {
        &self.vcpus
    }

    /// Exit counters per vCPU id (never blocks on a running vCPU).
    pub fn counters(&self) -> &[(u8, Arc<VcpuCounters>)] {
        &self.counters
    }

    pub fn throttle(&self) -> Arc<Throttle> {
        self.control.throttle.clone()
    }

    fn set_command(&self, command: Command) {
        let mut state = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        state.command = command;
        drop(state);
        self.control.command_changed.notify_all();
    }

    fn kick_all(&self) {
        for thread in &self.threads {
            // A thread that already ended cannot be kicked and needs not be.
            let _ = thread.kill(kick_signal());
        }
    }

    fn wait_parked(&self) {
        let mut state = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.parked < self.threads.len() && state.command == Command::Pause {
            state = self
                .control
                .parked_changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops every vCPU and returns once all are out of KVM_RUN.
    pub fn pause(&self) {
        self.set_command(Command::Pause);
        self.kick_all();
        self.wait_parked();
    }

    pub fn resume(&self) {
        self.set_command(Command::Run);
    }

    /// Ends the threads.
    pub fn stop(mut self) {
        self.control.throttle.set(0);
        self.set_command(Command::Exit);
        self.kick_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.throttle.set(0);
            self.set_command(Command::Exit);
            self.kick_all();
            for thread in self.threads.drain(..) {
                let _ = thread.join();
            }
        }
    }
}

/// Restricts the calling thread to the host CPUs `cpus` (each below
/// `config::MAX_HOST_CPUS`, which is CPU_SETSIZE).
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= config::MAX_HOST_CPUS {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: cpu is below CPU_SETSIZE, inside the set's bits.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of
    // the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The host CPUs this thread may run on (its affinity).
pub fn allowed_host_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: all zeroes is a valid (empty) cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is writable for its size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: every index is below CPU_SETSIZE.
    Ok((0..config::MAX_HOST_CPUS)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Checks that every host CPU of `cpus.affinity` is one this VMM may run
/// on (one the host has, in the VMM's cpuset), before any thread is pinned.
pub fn check_affinity(cpus: &config::CpusConfig) -> Result<(), config::ConfigError> {
    let Some(wanted) = cpus.affinity_cpus() else {
        return Ok(());
    };
    let field = "cpus.affinity";
    let available = allowed_host_cpus().map_err(|e| {
        config::ConfigError::new(
            field,
            format!("cannot read the host CPUs this VMM may use: {e}"),
        )
    })?;
    let missing: Vec<usize> = wanted
        .into_iter()
        .filter(|cpu| !available.contains(cpu))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(config::ConfigError::new(
        field,
        format!(
            "host CPU {} {} not available to this VMM (it may run on {})",
            config::format_cpu_list(&missing),
            if missing.len() == 1 { "is" } else { "are" },
            config::format_cpu_list(&available)
        ),
    ))
}

fn vcpu_thread(vcpu: Arc<Mutex<Vcpu>>, control: Arc<Control>, on_stop: VcpuStopSink) {
    {
        let mut guard = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let run: *mut kvm_bindings::kvm_run = guard.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run));
    }
    let id = vcpu.lock().unwrap_or_else(|e| e.into_inner()).id;
    loop {
        // Park while paused; leave on exit.
        {
            let mut state = control.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.command == Command::Pause {
                state.parked += 1;
                control.parked_changed.notify_all();
                while state.command == Command::Pause {
                    state = control
                        .command_changed
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                state.parked -= 1;
            }
            if state.command == Command::Exit {
                break;
            }
        }
        let (stop, kicked) = {
            let mut vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            let kicks = vcpu.counters.kicks.load(Ordering::Relaxed);
            let stop = vcpu.run_once();
            (stop, vcpu.counters.kicks.load(Ordering::Relaxed) != kicks)
        };
        if kicked {
            control.sleep_if_throttled();
        }
        if let Some(stop) = stop {
            on_stop(id, stop);
            // Wait for the control loop's decision (stop, or reboot and run).
            let mut state = control.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.command == Command::Run {
                state.command = Command::Pause;
                control.command_changed.notify_all();
            }
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

impl Vcpu {
    pub fn get_sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    /// A configured vCPU of an AMD host has HWCR.TscFreqSel set, as the
    /// hardware has, so Linux does not log a firmware bug about its TSC.
    #[test]
    fn amd_vcpus_have_hwcr_tsc_freq_sel_set() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIP: /dev/kvm cannot be opened");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap(); // the LAPIC that configure() sets up
        let cpuid = crate::cpuid::supported(&kvm).unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let bus = Arc::new(Bus::new());
        let vcpu = Vcpu::new(0, fd, bus.clone(), bus, Arc::new(Vec::new()));
        vcpu.configure(&crate::cpuid::for_vcpu(&cpuid, 0, 1, None))
            .unwrap();
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_K7_HWCR,
            ..Default::default()
        }])
        .unwrap();
        let read = vcpu.fd.get_msrs(&mut msrs).unwrap();
        if !is_amd(&cpuid) {
            println!("SKIP: not an AMD host (HWCR is AMD's)");
            return;
        }
        assert_eq!(read, 1, "KVM reads HWCR");
        let hwcr = msrs.as_slice()[0].data;
        assert_ne!(
            hwcr & HWCR_TSC_FREQ_SEL,
            0,
            "HWCR {hwcr:#x}: TscFreqSel (bit 24) is set"
        );
    }

    #[test]
    fn the_vendor_is_read_from_leaf_0() {
        let leaf0 = |vendor: &[u8; 12]| {
            let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
            CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 {
                function: 0,
                ebx: word(0),
                edx: word(4),
                ecx: word(8),
                ..Default::default()
            }])
            .unwrap()
        };
        assert!(is_amd(&leaf0(b"AuthenticAMD")));
        assert!(is_amd(&leaf0(b"HygonGenuine")));
        assert!(!is_amd(&leaf0(b"GenuineIntel")));
    }
}
