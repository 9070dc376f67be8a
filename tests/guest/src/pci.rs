//! PCI configuration space through ECAM (MMIO, usable from ring 3), and the
//! helpers the virtio drivers build on: capability walk, BAR addresses,
//! command register, MSI-X table setup.
//!
//! The VMM exposes bus 0 at `ECAM_BASE` (0xe0000000; `ecam=0x...` on the
//! command line overrides it, e.g. 0xb0000000 for QEMU q35); BARs are
//! assigned by the VMM (or the firmware) before the guest runs.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

/// Default ECAM base of bus 0 (1 MiB per bus).
pub const ECAM_BASE: u64 = 0xe000_0000;
/// BAR window the VMM assigns from.
#[allow(dead_code)]
pub const BAR_WINDOW: (u64, u64) = (0xc000_0000, 0xe000_0000);

static ECAM: AtomicU64 = AtomicU64::new(ECAM_BASE);

/// Capability IDs.
pub const CAP_MSIX: u8 = 0x11;
pub const CAP_VENDOR: u8 = 0x09;

/// Command register bits.
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// Status register: capability list present.
const STATUS_CAP_LIST: u32 = 1 << 4;

/// Use `base` as the ECAM base (boot option `ecam=`).
pub fn set_ecam_base(base: u64) {
    ECAM.store(base, Ordering::Relaxed);
}

pub fn ecam_base() -> u64 {
    ECAM.load(Ordering::Relaxed)
}

fn addr(bus: u8, dev: u8, func: u8, reg: u16) -> u64 {
    ecam_base()
        | (bus as u64) << 20
        | (dev as u64 & 31) << 15
        | (func as u64 & 7) << 12
        | (reg as u64 & 0xffc)
}

/// Read a 32-bit config register (`reg` is rounded down to 4).
pub fn read32(bus: u8, dev: u8, func: u8, reg: u16) -> u32 {
    // SAFETY: ECAM is mapped user-accessible by boot.S (0xe0000000 in the
    // uncached 3..4 GiB range; other bases below 3 GiB are mapped too, and
    // MMIO traps whatever the memory type).
    unsafe { read_volatile(addr(bus, dev, func, reg) as *const u32) }
}

/// Write a 32-bit config register.
pub fn write32(bus: u8, dev: u8, func: u8, reg: u16, value: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(addr(bus, dev, func, reg) as *mut u32, value) }
}

/// Read a byte of config space (one 32-bit access).
pub fn read8(dev: u8, func: u8, reg: u16) -> u8 {
    (read32(0, dev, func, reg) >> ((reg & 3) * 8)) as u8
}

/// Read 16 bits of config space (`reg` even).
pub fn read16(dev: u8, func: u8, reg: u16) -> u16 {
    (read32(0, dev, func, reg) >> ((reg & 2) * 8)) as u16
}

/// Call `f(dev, func, vendor_device)` for each function present on bus 0.
pub fn for_each_function(mut f: impl FnMut(u8, u8, u32)) {
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let id = read32(0, dev, func, 0);
            if id == u32::MAX || id == 0 {
                if func == 0 {
                    break;
                }
                continue;
            }
            f(dev, func, id);
            let multifunction = read32(0, dev, 0, 0x0c) & (0x80 << 16) != 0;
            if func == 0 && !multifunction {
                break;
            }
        }
    }
}

/// The capabilities of a function: `f(offset, id)` for each, in list order
/// (at most 48, so a looping list cannot hang us).
pub fn for_each_capability(dev: u8, func: u8, mut f: impl FnMut(u16, u8)) {
    if read32(0, dev, func, 0x04) >> 16 & STATUS_CAP_LIST == 0 {
        return;
    }
    let mut off = (read8(dev, func, 0x34) & 0xfc) as u16;
    for _ in 0..48 {
        if off < 0x40 {
            return;
        }
        let head = read32(0, dev, func, off);
        f(off, head as u8);
        off = ((head >> 8) & 0xfc) as u16;
    }
}

/// Memory address of BAR `bar` (0..=5), None for I/O BARs, unassigned or
/// invalid ones.
pub fn bar_address(dev: u8, func: u8, bar: u8) -> Option<u64> {
    if bar > 5 {
        return None;
    }
    let reg = 0x10 + 4 * bar as u16;
    let low = read32(0, dev, func, reg);
    if low & 1 != 0 {
        return None;
    }
    let mut address = (low & !0xf) as u64;
    if (low >> 1) & 3 == 2 {
        if bar == 5 {
            return None;
        }
        address |= (read32(0, dev, func, reg + 4) as u64) << 32;
    }
    (address != 0).then_some(address)
}

/// Turn on memory decoding and bus mastering (what a driver's
/// `pci_enable_device` + `pci_set_master` do; a no-op on our VMM, which
/// sets both).
pub fn enable_memory_and_master(dev: u8, func: u8) {
    let cmd = read32(0, dev, func, 0x04) & 0xffff;
    let want = cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER;
    if want != cmd {
        // The upper half is the status register (write-1-to-clear bits):
        // writing zeros there leaves it alone.
        write32(0, dev, func, 0x04, want);
    }
}

/// A function's MSI-X capability and table.
#[derive(Clone, Copy)]
pub struct Msix {
    dev: u8,
    func: u8,
    cap: u16,
    table: u64,
    /// Table size (number of vectors).
    pub count: u16,
}

impl Msix {
    /// Find the MSI-X capability; None without one (or with a table in an
    /// unusable BAR).
    pub fn find(dev: u8, func: u8) -> Option<Msix> {
        let mut cap = None;
        for_each_capability(dev, func, |off, id| {
            if id == CAP_MSIX && cap.is_none() {
                cap = Some(off);
            }
        });
        let cap = cap?;
        let control = read16(dev, func, cap + 2);
        let table = read32(0, dev, func, cap + 4);
        let bar = bar_address(dev, func, (table & 7) as u8)?;
        Some(Msix {
            dev,
            func,
            cap,
            table: bar + (table & !7) as u64,
            count: (control & 0x7ff) + 1,
        })
    }

    /// Address of the vector table.
    pub fn table(&self) -> u64 {
        self.table
    }

    /// Program table entry `entry` to send `vector` to the LAPIC `apic_id`
    /// (fixed delivery, physical destination, edge) and unmask it.
    pub fn set_entry(&self, entry: u16, vector: u8, apic_id: u32) {
        if entry >= self.count {
            return;
        }
        let e = self.table + 16 * entry as u64;
        // SAFETY: the table is in a BAR mapped uncached (3..4 GiB) or
        // otherwise trapped MMIO.
        unsafe {
            write_volatile(e as *mut u32, 0xfee0_0000 | (apic_id & 0xff) << 12);
            write_volatile((e + 4) as *mut u32, 0);
            write_volatile((e + 8) as *mut u32, vector as u32);
            write_volatile((e + 12) as *mut u32, 0);
        }
    }

    /// Mask (true) or unmask table entry `entry` (a masked vector only
    /// sets its pending bit; unmasking delivers it).
    pub fn mask(&self, entry: u16, masked: bool) {
        if entry < self.count {
            let e = self.table + 16 * entry as u64;
            // SAFETY: as in `set_entry`.
            unsafe { write_volatile((e + 12) as *mut u32, masked as u32) };
        }
    }

    /// Set (true) or clear the MSI-X enable bit, clearing the function mask.
    pub fn enable(&self, on: bool) {
        // Dword at the capability: ID, next (read-only), message control.
        let v = read32(0, self.dev, self.func, self.cap);
        let control = (v >> 16) & !(1 << 14);
        let control = if on {
            control | 1 << 15
        } else {
            control & !(1 << 15)
        };
        write32(
            0,
            self.dev,
            self.func,
            self.cap,
            (v & 0xffff) | control << 16,
        );
    }
}

/// Name of a virtio device type (as in `virtio=<name>` of `lspci`).
pub fn virtio_type_name(t: u16) -> &'static str {
    match t {
        1 => "net",
        2 => "blk",
        3 => "console",
        4 => "rng",
        5 => "balloon",
        8 => "scsi",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        19 => "vsock",
        _ => "other",
    }
}

/// The virtio device type of a function, from its IDs: modern devices are
/// 0x1040 + type, transitional ones 0x1000..0x103f with the type in the
/// subsystem ID.
pub fn virtio_type(dev: u8, func: u8, id: u32) -> Option<u16> {
    if id & 0xffff != 0x1af4 {
        return None;
    }
    match (id >> 16) as u16 {
        d @ 0x1040..=0x107f => Some(d - 0x1040),
        0x1000..=0x103f => Some(read16(dev, func, 0x2e)),
        _ => None,
    }
}

/// `lspci` command: one line per function (virtio devices with
/// `virtio=<type>`), then a summary.
pub fn lspci() {
    let mut n = 0;
    for_each_function(|dev, func, id| {
        let class = read32(0, dev, func, 0x08) >> 8;
        match virtio_type(dev, func, id) {
            Some(t) => println!(
                "pci: 00:{:02x}.{} vendor={:#06x} device={:#06x} class={:#08x} virtio={}",
                dev,
                func,
                id & 0xffff,
                id >> 16,
                class,
                virtio_type_name(t)
            ),
            None => println!(
                "pci: 00:{:02x}.{} vendor={:#06x} device={:#06x} class={:#08x}",
                dev,
                func,
                id & 0xffff,
                id >> 16,
                class
            ),
        }
        n += 1;
    });
    println!("pci: done functions={}", n);
}
