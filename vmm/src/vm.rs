//! A VM: the KVM VM with its in-kernel irqchip and PIT, guest memory, the
//! buses and legacy devices, the loaded kernel and the vCPU threads.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use api::request::Counters;
use config::VmConfig;
use devices::bus::{Bus, BusError};
use devices::legacy::{
    GedDevice, I8042Device, PowerDevice, PowerEvent, PowerEventSink, ResetControl, SerialCounters,
    SerialDevice, GED_EVENT_PORT, GED_EVENT_PORT_LEN, SLEEP_CONTROL_PORT,
};
use devices::pci::{
    PciConfigIo, PciEcam, PciRoot, CONFIG_IO_LEN as PCI_CONFIG_IO_LEN,
    CONFIG_IO_PORT as PCI_CONFIG_IO_PORT,
};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootEntry, BootError};
use crate::console::Console;
use crate::device_manager::DeviceManager;
use crate::interrupt::GsiRouter;
use crate::layout;
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::pci::VmBarMapper;
use crate::vcpu::{Vcpu, VcpuError, VcpuSet, VcpuStop, VcpuStopSink};

/// I/O ports of the legacy devices (the ACPI DSDT describes them too).
pub(crate) const SERIAL_PORT: u64 = 0x3f8;
pub(crate) const SERIAL_PORT_LEN: u64 = 8;
pub(crate) const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;

/// What happened to the VM, for the control loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote a power-off or reset register.
    Power(PowerEvent),
    /// A vCPU stopped.
    Vcpu(u8, VcpuStop),
}

pub type VmEventSink = Arc<dyn Fn(VmEvent) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM lacks a capability the VMM needs: {0}")]
    MissingCapability(&'static str),
    #[error("KVM: {what}: {source}")]
    KvmCall {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{0}")]
    Device(String),
    #[error("cannot start vCPU threads: {0}")]
    Thread(std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// A built VM, its vCPUs parked until [`Vm::resume`].
pub struct Vm {
    #[allow(dead_code)] // Kept open for the life of the VM.
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemoryMmap>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_counters: Arc<SerialCounters>,
    i8042: Arc<Mutex<I8042Device>>,
    /// ACPI Generic Event Device: the power button.
    ged: Arc<Mutex<GedDevice>>,
    vcpus: Option<VcpuSet>,
    device_manager: DeviceManager,
    /// Where the kernel was entered; None for a VM restored from a migration.
    pub entry: Option<BootEntry>,
}

/// How a new VM gets its first state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStart {
    /// Load the kernel and enter it.
    Boot,
    /// Nothing: memory and state arrive from a migration source.
    Incoming,
}

impl Vm {
    /// Builds the VM described by `config` and loads its kernel. `events`
    /// receives power requests and vCPU stops.
    pub fn create(
        config: &VmConfig,
        console: &Console,
        events: VmEventSink,
        start: VmStart,
    ) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // Memory slots first: on shadow-paging hosts, creating the irqchip
        // and PIT before any slot exists makes all three several times slower.
        let memory = Arc::new(memory::create_guest_memory(
            &config.memory,
            config.transparent_huge_pages(),
        )?);
        register_memory(&vm_fd, &memory, false)?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let power_sink: PowerEventSink = {
            let events = events.clone();
            Arc::new(move |e| events(VmEvent::Power(e)))
        };

        let serial_irq = irq_line(&vm_fd, layout::SERIAL_IRQ)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console.output())));
        let serial_counters = serial.lock().unwrap_or_else(|e| e.into_inner()).counters();
        pio.insert(SERIAL_PORT, SERIAL_PORT_LEN, serial.clone())?;
        let kbd_irq = irq_line(&vm_fd, layout::I8042_KBD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042Device::new(kbd_irq, power_sink.clone())));
        pio.insert(I8042_PORT, I8042_PORT_LEN, i8042.clone())?;
        pio.insert(
            u64::from(SLEEP_CONTROL_PORT),
            1,
            Arc::new(Mutex::new(PowerDevice::new(power_sink.clone()))),
        )?;
        // ACPI GED (power button): event register and its IOAPIC pin.
        let ged_irq = irq_line(&vm_fd, layout::GED_IRQ)?;
        let ged = Arc::new(Mutex::new(GedDevice::new(ged_irq)));
        pio.insert(
            u64::from(GED_EVENT_PORT),
            u64::from(GED_EVENT_PORT_LEN),
            ged.clone(),
        )?;

        // PCI bus 0: config ports 0xCF8-0xCFF (which also carry the reset
        // control register at 0xCF9) and ECAM.
        let gsi_router = Arc::new(GsiRouter::new(vm_fd.clone()));
        let pci_root = Arc::new(Mutex::new(PciRoot::new(Arc::new(VmBarMapper {
            mmio: mmio.clone(),
            vm_fd: vm_fd.clone(),
        }))));
        pio.insert(
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(
                pci_root.clone(),
                Box::new(ResetControl::new(power_sink)),
            ))),
        )?;
        mmio.insert(
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam::new(pci_root.clone()))),
        )?;

        let mut device_manager = DeviceManager::new(pci_root, gsi_router, memory.clone());
        device_manager
            .add_configured(config, start == VmStart::Incoming)
            .map_err(VmError::Device)?;

        let cpus = config.cpus.boot_vcpus;
        let entry = match start {
            VmStart::Boot => {
                // ACPI tables, for the devices above (an incoming VM gets
                // them with its memory).
                let rsdp = crate::acpi::write_tables(&memory, cpus)?;
                Some(boot::load(&memory, &config.payload, cpus, Some(rsdp))?)
            }
            VmStart::Incoming => None,
        };

        let msr_list = Arc::new(
            kvm.get_msr_index_list()
                .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
        );
        let base_cpuid =
            crate::cpuid::supported(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(cpus));
        for id in 0..cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let vcpu = Vcpu::new(id, fd, pio.clone(), mmio.clone(), msr_list.clone());
            let cpuid = crate::cpuid::for_vcpu(&base_cpuid, id, cpus, vcpu.tsc_khz());
            vcpu.configure(&cpuid)?;
            vcpus.push(vcpu);
        }
        // Only the BSP starts at the kernel entry; APs wait for INIT-SIPI.
        if let Some(entry) = entry {
            let bsp = &vcpus[0];
            // Start from KVM's power-on special registers (APIC base and so on).
            let sregs = bsp.get_sregs()?;
            let (regs, sregs) = boot::boot_registers(&memory, entry.mode, entry.entry, sregs)?;
            bsp.set_boot_registers(&regs, &sregs)?;
        }

        let on_stop: VcpuStopSink = Arc::new(move |id, stop| events(VmEvent::Vcpu(id, stop)));
        let vcpus = VcpuSet::start(vcpus, on_stop).map_err(VmError::Thread)?;

        Ok(Vm {
            kvm,
            vm_fd,
            memory,
            serial,
            serial_counters,
            i8042,
            ged,
            vcpus: Some(vcpus),
            device_manager,
            entry,
        })
    }

    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial.clone()
    }

    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    pub fn device_manager(&self) -> &DeviceManager {
        &self.device_manager
    }

    /// The vCPU throttle (auto-converge).
    pub fn throttle(&self) -> Option<Arc<crate::vcpu::Throttle>> {
        self.vcpus.as_ref().map(|v| v.throttle())
    }

    pub fn pause(&self) {
        if let Some(v) = &self.vcpus {
            v.pause();
        }
    }

    pub fn resume(&self) {
        if let Some(v) = &self.vcpus {
            v.resume();
        }
    }

    /// Asks the guest to shut down: presses the ACPI power button.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.ged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .press_power_button()
    }

    /// Asks the guest to shut down the pre-ACPI way: Ctrl-Alt-Del on the
    /// i8042. False if the guest has not read earlier keyboard input.
    pub fn send_ctrl_alt_del(&self) -> bool {
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_ctrl_alt_del()
    }

    /// Stops the vCPU threads for good.
    pub fn stop(&mut self) {
        if let Some(v) = self.vcpus.take() {
            v.stop();
        }
    }

    pub fn counters(&self) -> Counters {
        let mut counters = Counters::new();
        if let Some(v) = &self.vcpus {
            for (id, vcpu_counters) in v.counters() {
                counters.insert(format!("vcpu{id}"), vcpu_counters.snapshot());
            }
        }
        let s = &self.serial_counters;
        counters.insert(
            "serial".into(),
            BTreeMap::from([
                ("out_bytes".into(), s.out_bytes.load(Ordering::Relaxed)),
                ("in_bytes".into(), s.in_bytes.load(Ordering::Relaxed)),
                ("lost_bytes".into(), s.lost_bytes.load(Ordering::Relaxed)),
            ]),
        );
        counters.extend(self.device_manager.counters());
        counters
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An eventfd wired to IOAPIC pin `gsi` with KVM_IRQFD.
fn irq_line(vm_fd: &VmFd, gsi: u32) -> Result<Arc<EventFd>, VmError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&fd, gsi)
        .map_err(kvm_err("KVM_IRQFD"))?;
    Ok(Arc::new(fd))
}

/// Gives every RAM region to KVM as a memory slot (slot i = region i).
pub fn register_memory(
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let flags = if log_dirty {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region's mapping lives in `memory`, which the VM keeps
        // (in an Arc) for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The whole VM state except memory, for migration.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmSnapshot {
    pub vcpus: Vec<crate::vcpu::VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_bindings::kvm_irqchip>,
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
    pub serial: devices::legacy::SerialState,
    pub i8042: devices::legacy::I8042State,
    /// The ACPI power button's pending events.
    pub ged: devices::legacy::GedState,
    /// Virtio devices by id: transport and device state.
    pub devices: BTreeMap<String, serde_json::Value>,
}

/// KVM's irqchip ids: PIC master, PIC slave, IOAPIC.
const IRQCHIP_IDS: [u32; 3] = [
    kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
    kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    kvm_bindings::KVM_IRQCHIP_IOAPIC,
];

impl Vm {
    /// Takes the state of a paused VM: vCPUs, in-kernel irqchip, PIT and
    /// clock, legacy devices and virtio devices (paused by this call).
    pub fn snapshot(&mut self) -> Result<VmSnapshot, String> {
        let vcpus = self.vcpus.as_ref().ok_or("the vCPUs are gone")?;
        let mut vcpu_states = Vec::new();
        for vcpu in vcpus.vcpus() {
            let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            vcpu_states.push(vcpu.save_state().map_err(|e| e.to_string())?);
        }
        let mut irqchips = Vec::new();
        for chip_id in IRQCHIP_IDS {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut chip)
                .map_err(|e| format!("KVM_GET_IRQCHIP {chip_id}: {e}"))?;
            irqchips.push(chip);
        }
        let pit = self
            .vm_fd
            .get_pit2()
            .map_err(|e| format!("KVM_GET_PIT2: {e}"))?;
        let clock = self
            .vm_fd
            .get_clock()
            .map_err(|e| format!("KVM_GET_CLOCK: {e}"))?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        let i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner()).state();
        let ged = self.ged.lock().unwrap_or_else(|e| e.into_inner()).state();
        let devices = self.device_manager.snapshot()?;
        Ok(VmSnapshot {
            vcpus: vcpu_states,
            irqchips,
            pit,
            clock,
            serial,
            i8042,
            ged,
            devices,
        })
    }

    /// Puts a snapshot into a VM built with [`VmStart::Incoming`] from the
    /// same config; the vCPUs stay parked until [`Vm::resume`].
    pub fn restore(&mut self, snapshot: &VmSnapshot) -> Result<(), String> {
        let vcpus = self.vcpus.as_ref().ok_or("the vCPUs are gone")?;
        if snapshot.vcpus.len() != vcpus.vcpus().len() {
            return Err(format!(
                "the snapshot has {} vCPUs, this VM {}",
                snapshot.vcpus.len(),
                vcpus.vcpus().len()
            ));
        }
        if snapshot.irqchips.len() != IRQCHIP_IDS.len()
            || snapshot
                .irqchips
                .iter()
                .zip(IRQCHIP_IDS)
                .any(|(c, id)| c.chip_id != id)
        {
            return Err("the snapshot's irqchip state is malformed".into());
        }
        // Order that works on KVM: irqchip and PIT, vCPUs, then the clock.
        for chip in &snapshot.irqchips {
            self.vm_fd
                .set_irqchip(chip)
                .map_err(|e| format!("KVM_SET_IRQCHIP {}: {e}", chip.chip_id))?;
        }
        self.vm_fd
            .set_pit2(&snapshot.pit)
            .map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
        for (vcpu, state) in vcpus.vcpus().iter().zip(&snapshot.vcpus) {
            let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            if state.id != vcpu.id {
                return Err(format!(
                    "vCPU state {} arrived for vcpu{}",
                    state.id, vcpu.id
                ));
            }
            vcpu.restore_state(state).map_err(|e| e.to_string())?;
        }
        let mut clock = snapshot.clock;
        // Only the clock value is ours to set; KVM computes the flags.
        clock.flags = 0;
        self.vm_fd
            .set_clock(&clock)
            .map_err(|e| format!("KVM_SET_CLOCK: {e}"))?;
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&snapshot.serial)?;
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&snapshot.i8042)?;
        self.ged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&snapshot.ged);
        self.device_manager.restore(&snapshot.devices)?;
        Ok(())
    }
}
