//! Register state at the kernel's entry point, for the two boot protocols.
//!
//! - PVH: 32-bit protected mode, paging off, flat segments, EBX pointing at
//!   `hvm_start_info` (<https://xenbits.xen.org/docs/unstable/misc/pvh.html>).
//! - Linux 64-bit boot protocol: long mode with an identity map of the first
//!   1 GiB, RSI pointing at `boot_params` (Documentation/arch/x86/boot.rst).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout::{
    BOOT_GDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

// Control register and EFER bits.
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Descriptor flags as in the GDT (bits 40-55 of an entry, limit bits removed):
// G(15) D/B(14) L(13) AVL(12) | P(7) DPL(6:5) S(4) TYPE(3:0).
const CODE64: u16 = 0xa09b;
const CODE32: u16 = 0xc09b;
const DATA: u16 = 0xc093;
const TSS32_BUSY: u16 = 0x008b;

// Page table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// Which protocol the kernel is entered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    Pvh,
    Linux64,
}

/// A GDT entry from flags, base and limit (limit in 4 KiB units if G is set).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The segment register (with its hidden part) a GDT entry loads.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let flags = (entry >> 40) as u16;
    let g = (flags >> 15) & 1;
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((flags >> 7) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: limit as u32,
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and returns the registers for entering at `entry`.
/// `sregs` is the vCPU's current special registers (keeps APIC base etc.).
pub fn boot_registers(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    entry: u64,
    mut sregs: kvm_sregs,
) -> Result<(kvm_regs, kvm_sregs), BootError> {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(CODE32, 0, 0xfffff),
        EntryMode::Linux64 => gdt_entry(CODE64, 0, 0xfffff),
    };
    let gdt = [
        0,
        code,
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS32_BUSY, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| BootError::Memory("boot GDT"))?;
    }
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_START;
        }
        EntryMode::Linux64 => {
            write_identity_map(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    Ok((regs, sregs))
}

/// Identity-maps the first 1 GiB with 2 MiB pages, for the 64-bit entry.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |_| BootError::Memory("boot page tables");
    mem.write_obj(
        PDPTE_START | PTE_PRESENT | PTE_WRITE,
        GuestAddress(PML4_START),
    )
    .map_err(err)?;
    mem.write_obj(
        PDE_START | PTE_PRESENT | PTE_WRITE,
        GuestAddress(PDPTE_START),
    )
    .map_err(err)?;
    let mut pd = [0u8; 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        let pde = ((i as u64) << 21) | PTE_PRESENT | PTE_WRITE | PTE_HUGE;
        chunk.copy_from_slice(&pde.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START)).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt_entry(CODE64, 0, 0xfffff), 1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (code.type_, code.l, code.db, code.g, code.present),
            (0xb, 1, 0, 1, 1)
        );
        let data = segment(gdt_entry(DATA, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.db, data.s, data.l), (3, 1, 1, 0));
        let tss = segment(gdt_entry(TSS32_BUSY, 0x1234_5678, 0x67), 3);
        assert_eq!(
            (tss.base, tss.limit, tss.s, tss.g),
            (0x1234_5678, 0x67, 0, 0)
        );
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
