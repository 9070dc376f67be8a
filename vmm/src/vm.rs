//! A VM: the KVM VM with its in-kernel irqchip and PIT, guest memory, the
//! buses and legacy devices, the loaded kernel and the vCPU threads.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use api::request::Counters;
use config::{ErrorClass, VmConfig};
use devices::bus::{Bus, BusError};
use devices::legacy::{
    GedDevice, I8042Device, PowerDevice, PowerEvent, PowerEventSink, ResetControl, SerialCounters,
    SerialDevice,
};
use devices::pci::{PciConfigIo, PciEcam, PciRoot};
use devices::DeviceError;
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
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot start vCPU threads: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

impl VmError {
    pub fn class(&self) -> ErrorClass {
        match self {
            VmError::Boot(e) => e.class(),
            VmError::Device(e) => e.class(),
            VmError::Memory(e) => e.class(),
            VmError::Cgroup(e) => e.class(),
            VmError::Kvm(_)
            | VmError::MissingCapability(_)
            | VmError::KvmCall { .. }
            | VmError::Vcpu(_)
            | VmError::Bus(_)
            | VmError::EventFd(_)
            | VmError::Thread(_) => ErrorClass::Host,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// A built VM, its vCPUs parked until [`Vm::resume`].
pub struct Vm {
    #[allow(dead_code)] // Kept open for the life of the VM.
    kvm: Kvm,
    pub(crate) vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemoryMmap>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    serial_counters: Arc<SerialCounters>,
    pub(crate) i8042: Arc<Mutex<I8042Device>>,
    /// ACPI Generic Event Device: the power button.
    pub(crate) ged: Arc<Mutex<GedDevice>>,
    pub(crate) vcpus: Option<VcpuSet>,
    pub(crate) device_manager: DeviceManager,
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
        let kvm = open_kvm()?;
        let (vm_fd, memory) = create_vm_with_memory(&kvm, config)?;
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let power_sink: PowerEventSink = {
            let events = events.clone();
            Arc::new(move |e| events(VmEvent::Power(e)))
        };
        let legacy = LegacyDevices::add(&vm_fd, &pio, console, power_sink.clone())?;
        let device_manager =
            add_pci_bus(&vm_fd, &pio, &mmio, power_sink, &memory).and_then(|mut devices| {
                devices.add_configured(config, start == VmStart::Incoming)?;
                Ok(devices)
            })?;

        let cpus = config.cpus.boot_vcpus;
        let entry = match start {
            VmStart::Boot => {
                // ACPI tables, for the devices above (an incoming VM gets
                // them with its memory).
                let rsdp = crate::acpi::write_tables(&memory, cpus)?;
                Some(boot::load(&memory, config, cpus, Some(rsdp))?)
            }
            VmStart::Incoming => None,
        };
        let vcpus = create_vcpus(&kvm, &vm_fd, &pio, &mmio, cpus)?;
        // Only the BSP starts at the kernel entry; APs wait for INIT-SIPI.
        if let Some(entry) = entry {
            let bsp = &vcpus[0];
            // Start from KVM's power-on special registers (APIC base and so on).
            let sregs = bsp.get_sregs()?;
            let (regs, sregs) = boot::boot_registers(&memory, entry.mode, entry.entry, sregs)?;
            bsp.set_boot_registers(&regs, &sregs)?;
        }
        let on_stop: VcpuStopSink = Arc::new(move |id, stop| events(VmEvent::Vcpu(id, stop)));
        let vcpus =
            VcpuSet::start(vcpus, on_stop, config.cpus.affinity_cpus()).map_err(VmError::Thread)?;

        let LegacyDevices {
            serial,
            serial_counters,
            i8042,
            ged,
        } = legacy;
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

/// Opens /dev/kvm and checks it has what the VMM needs.
/// /dev/kvm opened once at start, for a VMM that then drops root
/// (`--user`): every VM it creates later uses a duplicate of it.
static KVM_DEVICE: std::sync::OnceLock<std::os::fd::OwnedFd> = std::sync::OnceLock::new();

/// Opens /dev/kvm now and keeps it for every VM this process creates.
pub fn keep_kvm_open() -> Result<(), VmError> {
    let fd = Kvm::open_with_cloexec(true).map_err(VmError::Kvm)?;
    // SAFETY: a fresh fd that nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let _ = KVM_DEVICE.set(fd);
    Ok(())
}

fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = match KVM_DEVICE.get() {
        Some(fd) => {
            let fd = fd
                .try_clone()
                .map_err(|e| VmError::Kvm(kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0))))?;
            // SAFETY: a fresh duplicate of the /dev/kvm fd, owned by the new Kvm.
            unsafe {
                <Kvm as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                    fd,
                ))
            }
        }
        None => Kvm::new().map_err(VmError::Kvm)?,
    };
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
    Ok(kvm)
}

/// The KVM VM with guest memory in its slots, the in-kernel irqchip and PIT.
fn create_vm_with_memory(
    kvm: &Kvm,
    config: &VmConfig,
) -> Result<(Arc<VmFd>, Arc<GuestMemoryMmap>), VmError> {
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
    Ok((vm_fd, memory))
}

/// The legacy port devices: COM1, the i8042, the ACPI sleep register and GED.
struct LegacyDevices {
    serial: Arc<Mutex<SerialDevice>>,
    serial_counters: Arc<SerialCounters>,
    i8042: Arc<Mutex<I8042Device>>,
    ged: Arc<Mutex<GedDevice>>,
}

impl LegacyDevices {
    fn add(
        vm_fd: &VmFd,
        pio: &Bus,
        console: &Console,
        power_sink: PowerEventSink,
    ) -> Result<LegacyDevices, VmError> {
        let serial_irq = irq_line(vm_fd, layout::SERIAL_IRQ)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console.output())));
        let serial_counters = serial.lock().unwrap_or_else(|e| e.into_inner()).counters();
        pio.insert(
            u64::from(layout::SERIAL_PORT),
            u64::from(layout::SERIAL_PORT_LEN),
            serial.clone(),
        )?;
        let kbd_irq = irq_line(vm_fd, layout::I8042_KBD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042Device::new(kbd_irq, power_sink.clone())));
        pio.insert(
            u64::from(layout::I8042_PORT),
            u64::from(layout::I8042_PORT_LEN),
            i8042.clone(),
        )?;
        pio.insert(
            u64::from(layout::SLEEP_CONTROL_PORT),
            1,
            Arc::new(Mutex::new(PowerDevice::new(power_sink))),
        )?;
        // ACPI GED (power button): event register and its IOAPIC pin.
        let ged_irq = irq_line(vm_fd, layout::GED_IRQ)?;
        let ged = Arc::new(Mutex::new(GedDevice::new(ged_irq)));
        pio.insert(
            u64::from(layout::GED_EVENT_PORT),
            u64::from(layout::GED_EVENT_PORT_LEN),
            ged.clone(),
        )?;
        Ok(LegacyDevices {
            serial,
            serial_counters,
            i8042,
            ged,
        })
    }
}

/// PCI bus 0: config ports 0xCF8-0xCFF (which also carry the reset
/// control register at 0xCF9) and ECAM; the device manager plugs devices in.
fn add_pci_bus(
    vm_fd: &Arc<VmFd>,
    pio: &Bus,
    mmio: &Arc<Bus>,
    power_sink: PowerEventSink,
    memory: &Arc<GuestMemoryMmap>,
) -> Result<DeviceManager, VmError> {
    let gsi_router = Arc::new(GsiRouter::new(vm_fd.clone()));
    let pci_root = Arc::new(Mutex::new(PciRoot::new(Arc::new(VmBarMapper {
        mmio: Arc::downgrade(mmio),
        vm_fd: vm_fd.clone(),
    }))));
    pio.insert(
        u64::from(layout::PCI_CONFIG_IO_PORT),
        u64::from(layout::PCI_CONFIG_IO_LEN),
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
    Ok(DeviceManager::new(pci_root, gsi_router, memory.clone()))
}

/// The vCPUs, configured (CPUID, MSRs) but not started.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    cpus: u8,
) -> Result<Vec<Vcpu>, VmError> {
    let msr_list = Arc::new(
        kvm.get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec(),
    );
    let base_cpuid = crate::cpuid::supported(kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
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
    Ok(vcpus)
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
