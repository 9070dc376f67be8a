//! PCI configuration space through ECAM (MMIO, usable from ring 3).
//!
//! The VMM exposes bus 0 at `ECAM_BASE`; BARs are assigned in the window
//! `BAR_WINDOW`. This module is the place for PCI helpers (capability walk,
//! BAR sizing, MSI-X table setup); virtio drivers go in their own modules
//! (e.g. `virtio.rs`) built on it and on `irq::alloc_vector`/`irq::wait_for`.

use core::ptr::{read_volatile, write_volatile};

/// ECAM base of bus 0 (1 MiB per bus).
pub const ECAM_BASE: u64 = 0xe000_0000;
/// BAR window the VMM assigns from.
#[allow(dead_code)]
pub const BAR_WINDOW: (u64, u64) = (0xc000_0000, 0xe000_0000);

fn addr(bus: u8, dev: u8, func: u8, reg: u16) -> u64 {
    ECAM_BASE
        | (bus as u64) << 20
        | (dev as u64 & 31) << 15
        | (func as u64 & 7) << 12
        | (reg as u64 & 0xffc)
}

/// Read a 32-bit config register (`reg` is rounded down to 4).
pub fn read32(bus: u8, dev: u8, func: u8, reg: u16) -> u32 {
    // SAFETY: ECAM is mapped user-accessible by boot.S (3..4 GiB, uncached).
    unsafe { read_volatile(addr(bus, dev, func, reg) as *const u32) }
}

/// Write a 32-bit config register.
#[allow(dead_code)]
pub fn write32(bus: u8, dev: u8, func: u8, reg: u16, value: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(addr(bus, dev, func, reg) as *mut u32, value) }
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

/// `lspci` command: one line per function, then a summary.
pub fn lspci() {
    let mut n = 0;
    for_each_function(|dev, func, id| {
        let class = read32(0, dev, func, 0x08) >> 8;
        println!(
            "pci: 00:{:02x}.{} vendor={:#06x} device={:#06x} class={:#08x}",
            dev,
            func,
            id & 0xffff,
            id >> 16,
            class
        );
        n += 1;
    });
    println!("pci: done functions={}", n);
}
