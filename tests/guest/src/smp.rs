//! CPU discovery (MP table, ACPI MADT, `cpus=N`) and AP startup.
//!
//! APs are started one at a time by the BSP from ring 3: the LAPIC ICR is
//! MMIO, so INIT and STARTUP IPIs need no gate. The real-mode trampoline
//! (asm/boot.S) is copied to `AP_TRAMPOLINE`; it reads `ap_boot_cpu` to know
//! its index, loads that CPU's TSS and enters ring 3 at `ap_main`.

use core::sync::atomic::Ordering;

use crate::bootinfo::BootInfo;
use crate::percpu::{CPUS, MAX_CPUS};
use crate::{lapic, time};

/// Physical address of the AP trampoline (SIPI vector = this >> 12).
pub const AP_TRAMPOLINE: usize = 0x1000;

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static mut ap_boot_cpu: u32;
    static mut gdt_tss: [u64; 2 * MAX_CPUS];
    static tss_array: u8;
}

/// Where the CPU list came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    MpTable,
    Madt,
    Cmdline,
    None,
}

struct CpuList {
    ids: [u32; MAX_CPUS],
    n: usize,
    source: Source,
}

impl CpuList {
    fn push(&mut self, id: u32) {
        if self.n < MAX_CPUS && !self.ids[..self.n].contains(&id) {
            self.ids[self.n] = id;
            self.n += 1;
        }
    }
}

fn rd8(a: u64) -> u8 {
    // SAFETY: callers only pass addresses in identity-mapped low memory.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn rd16(a: u64) -> u16 {
    // SAFETY: as above.
    unsafe { core::ptr::read_unaligned(a as *const u16) }
}
fn rd32(a: u64) -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_unaligned(a as *const u32) }
}
fn rd64(a: u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_unaligned(a as *const u64) }
}

fn checksum_ok(a: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(a + i))) == 0
}

fn low_ok(a: u64, len: u64) -> bool {
    a >= 0x1000 && a.saturating_add(len) <= 0xc000_0000
}

/// Scan `[start, end)` on 16-byte boundaries for a signature.
fn scan(start: u64, end: u64, sig: &[u8], len: u64) -> Option<u64> {
    (start..end).step_by(16).find(|&a| {
        sig.iter().enumerate().all(|(i, &c)| rd8(a + i as u64) == c) && checksum_ok(a, len)
    })
}

/// MP floating pointer -> configuration table -> processor entries.
fn from_mp_table(fp: u64, out: &mut CpuList) -> bool {
    let table = rd32(fp + 4) as u64;
    if !low_ok(table, 44) || rd32(table) != u32::from_le_bytes(*b"PCMP") {
        return false;
    }
    let len = rd16(table + 4) as u64;
    let count = rd16(table + 34);
    let mut p = table + 44;
    let end = table + len;
    let mut found = false;
    for _ in 0..count {
        if p >= end {
            break;
        }
        match rd8(p) {
            0 => {
                // Processor: apic id at 1, flags at 3 (bit 0 enabled).
                if rd8(p + 3) & 1 != 0 {
                    out.push(rd8(p + 1) as u32);
                    found = true;
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => break,
        }
    }
    found
}

/// RSDP -> RSDT/XSDT -> "APIC" (MADT) -> local APIC entries.
fn from_rsdp(rsdp: u64, out: &mut CpuList) -> bool {
    if !low_ok(rsdp, 36) || &rd64(rsdp).to_le_bytes() != b"RSD PTR " {
        return false;
    }
    let rev = rd8(rsdp + 15);
    let (sdt, entry) = if rev >= 2 && rd64(rsdp + 24) != 0 {
        (rd64(rsdp + 24), 8)
    } else {
        (rd32(rsdp + 16) as u64, 4)
    };
    if !low_ok(sdt, 36) {
        return false;
    }
    let sdt_len = rd32(sdt + 4) as u64;
    let mut p = sdt + 36;
    while p + entry <= sdt + sdt_len {
        let t = if entry == 8 { rd64(p) } else { rd32(p) as u64 };
        p += entry;
        if !low_ok(t, 44) || rd32(t) != u32::from_le_bytes(*b"APIC") {
            continue;
        }
        let len = rd32(t + 4) as u64;
        let mut e = t + 44;
        let mut found = false;
        while e + 2 <= t + len {
            let (kind, elen) = (rd8(e), rd8(e + 1) as u64);
            if elen < 2 {
                break;
            }
            // Local APIC: apic id at 3, flags at 4 (bit 0 enabled, bit 1 online capable).
            if kind == 0 && rd32(e + 4) & 3 != 0 {
                out.push(rd8(e + 3) as u32);
                found = true;
            }
            e += elen;
        }
        return found;
    }
    false
}

fn discover(cmdline_cpus: Option<usize>, boot: &BootInfo) -> CpuList {
    let mut l = CpuList {
        ids: [0; MAX_CPUS],
        n: 0,
        source: Source::None,
    };
    let bsp = lapic::id();
    // As Linux does, ACPI first: the MADT through PVH's rsdp_paddr (our
    // VMM), then the MP table at 0x9FC00 (our VMM keeps it for guests
    // without ACPI), then the BIOS area (SeaBIOS puts both tables in the F
    // segment).
    if boot.rsdp != 0 && from_rsdp(boot.rsdp, &mut l) {
        l.source = Source::Madt;
    }
    if l.source == Source::None {
        if let Some(fp) = scan(0x9fc00, 0xa0000, b"_MP_", 16) {
            if from_mp_table(fp, &mut l) {
                l.source = Source::MpTable;
            }
        }
    }
    if l.source == Source::None {
        if let Some(fp) = scan(0xf0000, 0x100000, b"_MP_", 16) {
            if from_mp_table(fp, &mut l) {
                l.source = Source::MpTable;
            }
        }
    }
    if l.source == Source::None {
        if let Some(rsdp) = scan(0xe0000, 0x100000, b"RSD PTR ", 20) {
            if from_rsdp(rsdp, &mut l) {
                l.source = Source::Madt;
            }
        }
    }
    if let Some(n) = cmdline_cpus {
        let n = n.clamp(1, MAX_CPUS);
        if l.source == Source::None {
            // No table: assume APIC IDs 0..n-1 (KVM's default numbering).
            l.source = Source::Cmdline;
            for id in 0..n as u32 {
                l.push(id);
            }
        } else if n < l.n {
            // Keep the BSP plus the first n-1 others.
            let mut kept = CpuList {
                ids: [0; MAX_CPUS],
                n: 0,
                source: l.source,
            };
            kept.push(bsp);
            for &id in &l.ids[..l.n] {
                if kept.n < n {
                    kept.push(id);
                }
            }
            l = kept;
        }
    }
    if !l.ids[..l.n].contains(&bsp) {
        // Make sure the BSP is in the list (first).
        if l.n == MAX_CPUS {
            l.n -= 1;
        }
        l.ids.copy_within(0..l.n, 1);
        l.ids[0] = bsp;
        l.n += 1;
    }
    l
}

/// Write the GDT TSS descriptor of `cpu` (base of its TSS, type available).
fn set_tss_descriptor(cpu: usize) {
    let base = &raw const tss_array as u64 + 128 * cpu as u64;
    let lo = 0x67
        | ((base & 0xffff) << 16)
        | (((base >> 16) & 0xff) << 32)
        | (0x89 << 40)
        | (((base >> 24) & 0xff) << 56);
    let gdt = &raw mut gdt_tss;
    // SAFETY: descriptors of CPUs that are not running yet.
    unsafe {
        core::ptr::write_volatile(&raw mut (*gdt)[2 * cpu], lo);
        core::ptr::write_volatile(&raw mut (*gdt)[2 * cpu + 1], base >> 32);
    }
}

fn wait_online(cpu: usize, us: u64) -> bool {
    let end = time::deadline_after_us(us);
    while !time::passed(end) {
        if CPUS[cpu].is_online() {
            return true;
        }
        core::hint::spin_loop();
    }
    CPUS[cpu].is_online()
}

/// Find the CPUs and start the APs (at most `cmdline_cpus` CPUs in all when
/// given). Prints `testguest: cpu N online` for each AP that came up.
pub fn start_aps(cmdline_cpus: Option<usize>, boot: &BootInfo) {
    let list = discover(cmdline_cpus, boot);
    let source = match list.source {
        Source::MpTable => "mptable",
        Source::Madt => "madt",
        Source::Cmdline => "cmdline",
        Source::None => "none",
    };
    println!("testguest: cpus found={} source={}", list.n, source);
    let bsp = list.ids[0];
    CPUS[0].apic_id.store(bsp, Ordering::Relaxed);
    CPUS[0].mark_online();
    if list.n <= 1 {
        return;
    }
    // SAFETY: addresses of symbols from boot.S; the trampoline is a few
    // dozen bytes copied to free low memory (boot data was copied out).
    unsafe {
        let start = &raw const ap_tramp_start;
        let len = &raw const ap_tramp_end as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, AP_TRAMPOLINE as *mut u8, len);
    }
    let mut cpu = 1;
    for &apic in &list.ids[1..list.n] {
        set_tss_descriptor(cpu);
        CPUS[cpu].apic_id.store(apic, Ordering::Relaxed);
        // SAFETY: read by the AP's CPL0 entry only; no AP is starting now.
        unsafe { core::ptr::write_volatile(&raw mut ap_boot_cpu, cpu as u32) };
        lapic::send_init(apic);
        time::delay_us(100);
        lapic::send_startup(apic, (AP_TRAMPOLINE >> 12) as u8);
        if !wait_online(cpu, 5_000) {
            lapic::send_startup(apic, (AP_TRAMPOLINE >> 12) as u8);
        }
        if wait_online(cpu, 500_000) {
            println!("testguest: cpu {} online", cpu);
            cpu += 1;
        } else {
            // Start no more APs: a late riser then still owns this slot.
            println!(
                "testguest: error: cpu {} (apic {}) did not start",
                cpu, apic
            );
            break;
        }
    }
}
