//! The PCI root bus (bus 0): configuration access through ports
//! 0xCF8/0xCFC (what Linux uses without ACPI) and through ECAM (MMIO, what
//! the test guest uses from ring 3), BARs that follow the guest's
//! programming, and MSI-X.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use config::{BarInfo, PciConfig, PciHeader, COMMAND_MEMORY, NUM_BARS};

/// Slots on bus 0.
pub const SLOTS: usize = 32;

/// Why a PCI device could not be built or placed.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("the PCI bus is full ({} devices)", SLOTS - 1)]
    BusFull,
    #[error("no room left in the PCI MMIO window")]
    NoMmioSpace,
    #[error("BAR {bar} at {address:#x}: {source}")]
    Map {
        bar: usize,
        address: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The device's config space does not fit (a programming error).
    #[error("config space: {0}")]
    Layout(#[from] config::PciConfigError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A PCI function as the root bus sees it.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A configuration write; devices react to their capabilities here.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Eventfds KVM should signal on a write at `offset` within `bar`
    /// (virtio queue notifications), registered wherever the BAR sits.
    fn ioeventfds(&self, _bar: usize) -> Vec<(u64, EventFd)> {
        Vec::new()
    }
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Where the VMM places and removes BAR mappings (MMIO bus ranges and the
/// ioeventfds inside them).
pub trait BarMapper: Send + Sync {
    fn map(
        &self,
        device: &SharedPciDevice,
        bar: usize,
        address: u64,
        size: u64,
    ) -> Result<(), PciError>;
    fn unmap(&self, device: &SharedPciDevice, bar: usize, address: u64, size: u64);
}

/// MMIO access to one BAR of a device, as a bus device.
pub struct BarAccess {
    pub device: SharedPciDevice,
    pub bar: usize,
}

impl BusDevice for BarAccess {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

fn lock(device: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

struct Slot {
    device: SharedPciDevice,
    /// Where each BAR is mapped now (None: not mapped).
    mapped: [Option<u64>; NUM_BARS],
}

/// Bus 0 and its devices.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mapper: Arc<dyn BarMapper>,
}

impl PciRoot {
    /// A bus with the host bridge at slot 0.
    pub fn new(mapper: Arc<dyn BarMapper>) -> PciRoot {
        let mut root = PciRoot {
            slots: (0..SLOTS).map(|_| None).collect(),
            mapper,
        };
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        root.slots[0] = Some(Slot {
            device: bridge,
            mapped: [None; NUM_BARS],
        });
        root
    }

    /// Plugs `device` into the first free slot and maps its BARs where its
    /// config says; returns the slot.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let index = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::BusFull)?;
        self.slots[index] = Some(Slot {
            device,
            mapped: [None; NUM_BARS],
        });
        self.update_mappings(index)?;
        Ok(index as u8)
    }

    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots
            .get(usize::from(slot))?
            .as_ref()
            .map(|s| s.device.clone())
    }

    /// Makes the BAR mappings of `slot` match its config: mapped at the
    /// programmed address while memory decoding is on, unmapped otherwise.
    /// A BAR that cannot be mapped (the guest placed it over another one)
    /// stays unmapped; the first such failure is returned.
    fn update_mappings(&mut self, index: usize) -> Result<(), PciError> {
        let Some(slot) = self.slots[index].as_mut() else {
            return Ok(());
        };
        let wanted: Vec<(Option<u64>, Option<BarInfo>)> = {
            let device = lock(&slot.device);
            let config = device.config();
            let decode = config.command() & COMMAND_MEMORY != 0;
            (0..NUM_BARS)
                .map(|bar| {
                    let info = config.bar(bar);
                    let address = config.bar_address(bar).filter(|&a| decode && a != 0);
                    (info.and(address), info)
                })
                .collect()
        };
        let mut failed = None;
        for (bar, (address, info)) in wanted.into_iter().enumerate() {
            let Some(info) = info else { continue };
            if slot.mapped[bar] == address {
                continue;
            }
            if let Some(old) = slot.mapped[bar].take() {
                self.mapper.unmap(&slot.device, bar, old, info.size);
            }
            if let Some(new) = address {
                match self.mapper.map(&slot.device, bar, new, info.size) {
                    Ok(()) => slot.mapped[bar] = Some(new),
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    pub fn config_read(&mut self, bus: u8, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, slot, function) {
            Some(device) => lock(&device).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&mut self, bus: u8, slot: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(device) = self.function(bus, slot, function) else {
            return;
        };
        lock(&device).write_config(offset, data);
        // Command register or BAR writes may move or (un)map BARs.
        let touches =
            |start: usize, len: usize| offset < start + len && start < offset + data.len();
        if touches(config::COMMAND, 2) || touches(config::BAR0, 4 * NUM_BARS) {
            // A guest placing a BAR over another one gets it unmapped.
            let _ = self.update_mappings(usize::from(slot));
        }
    }

    fn function(&self, bus: u8, slot: u8, function: u8) -> Option<SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.device(slot)
    }
}

/// The host bridge at 00.0, which some guests look for.
struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    fn new() -> HostBridge {
        HostBridge {
            config: PciConfig::new(&PciHeader {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                revision_id: 0,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Ports 0xCF8-0xCFF: the configuration address register (dword at 0xCF8)
/// and data window (0xCFC-0xCFF). The byte at 0xCF9 is the reset control
/// register, which shares the range and is forwarded.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
    reset_control: Box<dyn BusDevice>,
}

/// Address register: enable bit.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>, reset_control: Box<dyn BusDevice>) -> PciConfigIo {
        PciConfigIo {
            root,
            address: 0,
            reset_control,
        }
    }

    /// (bus, slot, function, register offset) of the current address, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        // Bits 11:8 extend the register number (AMD's extended config access).
        let register =
            (self.address & 0xfc) as usize | (((self.address >> 24) & 0xf) as usize) << 8;
        Some((bus, slot, function, register + data_offset as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 if data.len() == 4 && offset == 0 => {
                data.copy_from_slice(&self.address.to_le_bytes())
            }
            1 if data.len() == 1 => self.reset_control.read(0, data),
            4..=7 => match self.target(offset - 4) {
                Some((bus, slot, function, register)) => {
                    let len = data.len().min(8 - offset as usize);
                    self.root
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .config_read(bus, slot, function, register, &mut data[..len]);
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            }
            1 if data.len() == 1 => self.reset_control.write(0, data),
            4..=7 => {
                if let Some((bus, slot, function, register)) = self.target(offset - 4) {
                    let len = data.len().min(8 - offset as usize);
                    self.root
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .config_write(bus, slot, function, register, &data[..len]);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: configuration space as MMIO, 4 KiB per function.
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> PciEcam {
        PciEcam { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize) {
        let bus = (offset >> 20) as u8;
        let slot = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        (bus, slot, function, (offset & 0xfff) as usize)
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, register) = Self::decode(offset);
        if register + data.len() > config::CONFIG_SIZE {
            data.fill(0xff);
            return;
        }
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_read(bus, slot, function, register, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, function, register) = Self::decode(offset);
        if register + data.len() > config::CONFIG_SIZE {
            return;
        }
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_write(bus, slot, function, register, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Mapper {
        log: Mutex<Vec<String>>,
    }

    impl BarMapper for Mapper {
        fn map(
            &self,
            _d: &SharedPciDevice,
            bar: usize,
            address: u64,
            size: u64,
        ) -> Result<(), PciError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("map {bar} {address:#x} {size:#x}"));
            Ok(())
        }
        fn unmap(&self, _d: &SharedPciDevice, bar: usize, address: u64, _size: u64) {
            self.log
                .lock()
                .unwrap()
                .push(format!("unmap {bar} {address:#x}"));
        }
    }

    struct Dummy {
        config: PciConfig,
    }

    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    }

    fn dummy() -> SharedPciDevice {
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: (1, 0, 0),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 2,
        });
        config
            .add_bar(
                0,
                BarInfo {
                    size: 0x4000,
                    is_64bit: true,
                    prefetchable: false,
                },
                0xc000_0000,
            )
            .unwrap();
        config.set_command(COMMAND_MEMORY);
        Arc::new(Mutex::new(Dummy { config }))
    }

    #[test]
    fn config_io_and_ecam_reach_devices_and_bars_follow_the_guest() {
        let mapper = Arc::new(Mapper::default());
        let root = Arc::new(Mutex::new(PciRoot::new(mapper.clone())));
        let slot = root.lock().unwrap().add(dummy()).unwrap();
        assert_eq!(slot, 1);
        assert_eq!(
            mapper.log.lock().unwrap().as_slice(),
            ["map 0 0xc0000000 0x4000"]
        );

        let reset = Box::new(crate::legacy::ResetControl::new(Arc::new(|_| {})));
        let mut io = PciConfigIo::new(root.clone(), reset);
        let select = |io: &mut PciConfigIo, slot: u32, reg: u32| {
            io.write(
                0,
                &(CONFIG_ADDRESS_ENABLE | (slot << 11) | reg).to_le_bytes(),
            )
        };
        let mut id = [0u8; 4];
        select(&mut io, 1, 0);
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        select(&mut io, 0, 0);
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0d57_8086, "host bridge");
        select(&mut io, 7, 0);
        io.read(4, &mut id);
        assert_eq!(id, [0xff; 4], "empty slot");

        let mut ecam = PciEcam::new(root.clone());
        ecam.read(1 << 15, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);

        // Sizing with decode off does not map anything; moving does.
        ecam.write((1 << 15) | 4, &0u16.to_le_bytes());
        ecam.write((1 << 15) | 0x10, &[0xff; 4]);
        ecam.write((1 << 15) | 0x10, &0xd000_0000u32.to_le_bytes());
        ecam.write((1 << 15) | 4, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            mapper.log.lock().unwrap().as_slice(),
            [
                "map 0 0xc0000000 0x4000",
                "unmap 0 0xc0000000",
                "map 0 0xd0000000 0x4000"
            ]
        );
    }
}
