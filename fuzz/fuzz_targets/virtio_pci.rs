//! The virtio-pci transport with a balloon behind it, as a guest driver
//! (or a hostile one) reaches it: a sequence of PCI config space accesses
//! through ECAM (any offset and size, MSI-X capability, the PCI config
//! access window), through ECAM and ports 0xCF8/0xCFC, and BAR accesses (common config, ISR, device config,
//! notifications, MSI-X table and PBA), decoded from the input. Between
//! them the transport may be saved and restored through the migration
//! encoding (which must always succeed for a state it produced), or a
//! migration source may hand it a state of its own making (which must never
//! panic). Nothing may panic or hang.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use config::BalloonConfig;
use devices::bus::BusDevice;
use devices::pci::msix::{MsiController, MsiMessage, MsiVector};
use devices::pci::{
    BarMapper, PciConfigIo, PciDevice, PciEcam, PciError, PciRoot, SharedPciDevice,
};
use devices::virtio::balloon::{Balloon, BalloonBackend};
use devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use devices::virtio::VirtioDeviceSnapshot;
use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{memory, Input, RAM};
use vmm_sys_util::eventfd::EventFd;

struct NoMsi;

impl MsiController for NoMsi {
    fn allocate(&self) -> io::Result<MsiVector> {
        Ok(MsiVector {
            gsi: 0,
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
    fn route(&self, _vector: &MsiVector, _message: MsiMessage) -> io::Result<()> {
        Ok(())
    }
}

struct NoBackend;

impl BalloonBackend for NoBackend {
    fn discard(&self, gpa: u64, len: u64) -> io::Result<()> {
        let inside = RAM
            .iter()
            .any(|&(start, size)| gpa >= start && gpa.saturating_add(len) <= start + size);
        assert!(inside, "discarded {gpa:#x}+{len:#x}, not guest RAM");
        Ok(())
    }
}

struct NoMapper;

impl BarMapper for NoMapper {
    fn map(&self, _: &SharedPciDevice, _: usize, _: u64, _: u64) -> Result<(), PciError> {
        Ok(())
    }
    fn unmap(&self, _: &SharedPciDevice, _: usize, _: u64, _: u64) {}
}

struct NoReset;

impl BusDevice for NoReset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

const BAR_ADDRESS: u64 = 0xc000_0000;

fn transport(memory: &Arc<GuestMemoryMmap>) -> VirtioPciDevice {
    let config = BalloonConfig {
        target_mib: 1,
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_interval_s: 0,
    };
    let balloon = Balloon::new(&config, &RAM, Arc::new(NoBackend)).expect("balloon");
    VirtioPciDevice::new(
        "balloon",
        Box::new(balloon),
        memory.clone(),
        Arc::new(NoMsi),
        BAR_ADDRESS,
    )
    .expect("transport")
}

fn restore(memory: &Arc<GuestMemoryMmap>, snapshot: VirtioDeviceSnapshot) -> Result<(), String> {
    let mut fresh = transport(memory);
    let result = fresh.restore(snapshot).map_err(|e| e.to_string());
    drop(fresh);
    result
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let memory = Arc::new(memory());
    let device = Arc::new(Mutex::new(transport(&memory)));
    let mut root = PciRoot::new(Arc::new(NoMapper));
    let slot = root.add(device.clone() as SharedPciDevice).expect("slot");
    let root = Arc::new(Mutex::new(root));
    let mut ecam = PciEcam::new(root.clone());
    let mut io = PciConfigIo::new(root, Box::new(NoReset));
    let mut buf = [0u8; 8];
    // Saves and restores are slow (JSON of the whole config space): a few
    // per input keep the executions per second up.
    let mut migrations = 0;
    for _ in 0..1024 {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let len = 1 + usize::from(op >> 5);
        match op % 8 {
            0 | 1 => {
                // Our slot, or the host bridge's.
                let slot = if op & 8 != 0 { 0 } else { u64::from(slot) };
                let offset = (slot << 15) | u64::from(input.u16() & 0xfff);
                if op & 1 == 0 {
                    ecam.read(offset, &mut buf[..len]);
                } else {
                    let data = input.bytes(len);
                    ecam.write(offset, data);
                }
            }
            2 | 3 => {
                let bar = usize::from(op & 8 != 0);
                let offset = u64::from(input.u16()) % BAR_SIZE;
                let mut device = device.lock().unwrap();
                if op & 1 == 0 {
                    device.read_bar(bar, offset, &mut buf[..len]);
                } else {
                    let data = input.bytes(len);
                    device.write_bar(bar, offset, data);
                }
            }
            4 | 5 if migrations == 4 => {}
            4 => {
                migrations += 1;
                // Saved and put back as a migration does, on a fresh transport.
                let snapshot = device.lock().unwrap().snapshot();
                let json = serde_json::to_vec(&snapshot).expect("encodes");
                let decoded: VirtioDeviceSnapshot = serde_json::from_slice(&json).expect("decodes");
                assert!(decoded == snapshot, "changed through JSON");
                if let Err(e) = restore(&memory, decoded) {
                    panic!("its own state does not restore: {e}");
                }
                device.lock().unwrap().device_mut().resume();
            }
            5 => {
                migrations += 1;
                // A state made up by a migration source.
                let json = input.chunk(1 << 16);
                if let Ok(snapshot) = serde_json::from_slice::<VirtioDeviceSnapshot>(json) {
                    let _ = restore(&memory, snapshot);
                }
            }
            6 => {
                // Port 0xCF8: the address register.
                io.write(0, &input.u32().to_le_bytes());
            }
            _ => {
                // Ports 0xCFC-0xCFF: the data window (0xCF9 is the reset register).
                let port = 4 + u64::from(input.u8() % 4);
                let len = len.min(4);
                if op & 8 != 0 {
                    io.read(port, &mut buf[..len]);
                } else {
                    let data = input.bytes(len);
                    io.write(port, data);
                }
            }
        }
    }
    drop((ecam, io, device));
});
