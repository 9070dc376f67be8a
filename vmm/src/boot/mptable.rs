//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI finds its CPUs, its IOAPIC and the routing of the ISA interrupts.
//! Linux finds the floating pointer in the last KiB of base memory.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::memory::GuestMemoryMmap;

/// Number of IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 in the processor signature; FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_BUS_ID: u8 = 0;

/// Builds the table bytes for `cpus` vCPUs; the table's own address is
/// `base` (the floating pointer comes first, then the configuration table).
pub fn build(base: u64, cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus; // APIC ids 0..cpus belong to the CPUs.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend([MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([MP_BUS, ISA_BUS_ID]);
    entries.extend(*b"ISA   ");
    count += 1;
    entries.extend([MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n goes to IOAPIC pin n, conforming polarity and trigger.
    for irq in 0..IOAPIC_PINS {
        entries.extend([MP_INTSRC, MP_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every CPU is the PIC (ExtINT), LINT1 is NMI.
    entries.extend([MP_LINTSRC, MP_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend([MP_LINTSRC, MP_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    const MPF_SIZE: usize = 16;
    const HEADER_SIZE: usize = 44;
    let table_addr = base + MPF_SIZE as u64;
    let table_len = (HEADER_SIZE + entries.len()) as u16;

    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend(*b"PCMP");
    header.extend(table_len.to_le_bytes());
    header.push(MP_SPEC_REV);
    header.push(0); // checksum, below
    header.extend(*b"RUSTVMM ");
    header.extend(*b"VMM 1.0     ");
    header.extend(0u32.to_le_bytes()); // OEM table pointer
    header.extend(0u16.to_le_bytes()); // OEM table size
    header.extend(count.to_le_bytes());
    header.extend((APIC_START as u32).to_le_bytes());
    header.extend(0u32.to_le_bytes()); // extended table length, checksum
    let mut table = header;
    table.extend(entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend(*b"_MP_");
    mpf.extend((table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum, below
    mpf.extend([0u8; 5]); // feature bytes: a configuration table is present
    mpf[10] = checksum(&mpf);

    mpf.extend(table);
    mpf
}

/// The byte that makes the sum of `bytes` zero (its own slot must be 0).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes the table at the end of base memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootError> {
    let bytes = build(EBDA_START, cpus);
    if EBDA_START + bytes.len() as u64 > crate::layout::LEGACY_HOLE_START {
        return Err(BootError::TooManyCpus(cpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| BootError::Memory("MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_consistent() {
        for cpus in [1u8, 2, 32] {
            let t = build(EBDA_START, cpus);
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, cpus as u16 + 2 + IOAPIC_PINS as u16 + 2);
            let pointer = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
            assert_eq!(pointer, EBDA_START + 16);
            // 32 CPUs still fit below the legacy hole.
            assert!(EBDA_START + t.len() as u64 <= crate::layout::LEGACY_HOLE_START);
        }
    }
}
