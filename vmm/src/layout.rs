//! The guest physical address map of an x86-64 VM.
//!
//! ```text
//! 0x0000_0500  GDT used at boot (4 entries)
//! 0x0000_6000  PVH start_info, then its memory map
//! 0x0000_7000  Linux boot_params (zero page)
//! 0x0000_8ff0  boot stack top (64-bit Linux entry)
//! 0x0000_9000  boot page tables: PML4, PDPT, PD (identity map of 1 GiB)
//! 0x0002_0000  kernel command line (4 KiB)
//! 0x0009_fc00  MP table (end of base memory, the "EBDA")
//! 0x000a_0000  legacy VGA/ROM hole, not RAM (e820 reserved up to 1 MiB)
//! 0x000e_0000  ACPI: RSDP, then XSDT, FADT, DSDT, MADT, MCFG
//! 0x0010_0000  kernel image, then RAM
//!   ...        initrd at the top of low RAM
//! 0xc000_0000  MMIO hole: PCI BAR window (512 MiB)
//! 0xe000_0000  PCI ECAM (bus 0)
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  LAPIC
//! 0x1_0000_0000 RAM above 4 GiB, when guest memory does not fit below the hole
//! ```

/// GDT used during boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Most entries the boot GDT holds.
pub const BOOT_GDT_MAX: usize = 4;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map, right after start_info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Most entries in the PVH memory map (fits below the zero page).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;
/// Linux boot_params.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables for the 64-bit Linux entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// End of base memory; the MP table lives just below it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy hole below 1 MiB.
pub const LEGACY_HOLE_START: u64 = 0xa0000;
/// Kernels load here.
pub const HIGH_RAM_START: u64 = 0x10_0000;

// ACPI (vmm/src/acpi.rs). The RSDP is where Linux also finds it by scanning
// the BIOS area; the tables follow it, all inside the reserved legacy hole.
/// The ACPI RSDP.
pub const ACPI_RSDP_START: u64 = 0xe_0000;
/// End of the area the ACPI tables may fill.
pub const ACPI_TABLES_END: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; guest RAM below 4 GiB ends here at most.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// PCI BAR window (32-bit).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (bus 0 only: 1 MiB).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// RAM above the hole starts here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// KVM's private pages for the TSS and the identity map, just below the
/// IOAPIC, outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

// I/O ports (the ACPI DSDT and FADT describe them to the guest).
/// COM1 (8250 UART).
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
/// i8042 data (0x60) to command/status (0x64).
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// ACPI sleep control and status register (hardware-reduced ACPI).
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI GED event register (one byte). Not a legacy PC port, not in
/// ACPICA's list of protected ports, outside the PCI config ports.
pub const GED_EVENT_PORT: u16 = 0x700;
pub const GED_EVENT_PORT_LEN: u16 = 1;
/// PCI configuration address and data (0xCF8-0xCFF).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u16 = 8;
/// The reset control register, inside the PCI config ports (the PCI
/// config device forwards it).
pub const RESET_CONTROL_PORT: u16 = 0xcf9;

/// IOAPIC pins of the legacy devices.
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_KBD_IRQ: u32 = 1;
/// IOAPIC pin of the ACPI Generic Event Device (power button): an ISA pin
/// (edge, active high by default, as the GED's irqfd pulses it) that no
/// device uses.
pub const GED_IRQ: u32 = 5;

/// The guest RAM ranges `(start, size)` for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (RAM_64BIT_START, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_HOLE_START),
                (RAM_64BIT_START, (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }
}
