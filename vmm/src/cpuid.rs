//! The CPUID a vCPU sees: what KVM supports, with the topology and
//! hypervisor leaves a guest needs to find its CPUs and its host.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the logical processor count in EBX is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Hypervisor leaves start here; KVM's signature is "KVMKVMKVM".
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// The timing leaf (VMware/KVM convention): EAX = TSC kHz, EBX = APIC bus kHz.
const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's LAPIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// KVM's supported CPUID, before per-vCPU adjustments.
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// Adjusts `base` for vCPU `id` of `count` in a single-socket topology
/// with one thread per core.
pub fn for_vcpu(base: &CpuId, id: u8, count: u8, tsc_khz: Option<u32>) -> CpuId {
    let id = u32::from(id);
    let count = u32::from(count);
    // Bits needed to number `count` cores in the APIC id.
    let core_bits = 32 - (count.max(1) - 1).leading_zeros();
    let mut entries: Vec<kvm_cpuid_entry2> = base.as_slice().to_vec();
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | (count << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; caches are per core.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((count - 1) << 26);
                entry.eax &= !(0xfff << 14);
            }
            0xb | 0x1f => {
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    // Core level.
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
                entry.edx = id;
            }
            HYPERVISOR_LEAF if tsc_khz.is_some() => entry.eax = entry.eax.max(TIMING_LEAF),
            _ => {}
        }
    }
    if let Some(khz) = tsc_khz {
        entries.retain(|e| e.function != TIMING_LEAF);
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    // The list came from KVM and only shrank or grew by one entry.
    CpuId::from_entries(&entries).unwrap_or_else(|_| base.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0x1,
                ebx: 0xff00_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: HYPERVISOR_LEAF,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn topology_and_hypervisor_leaves() {
        let c = for_vcpu(&base(), 2, 3, Some(2_000_000));
        let get = |f, i| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        let leaf1 = get(0x1, 0);
        assert_eq!(leaf1.ebx >> 24, 2, "APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 3, "logical count");
        assert_eq!(leaf1.ebx & 0xffff, 0x1234, "other bits kept");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(get(0xb, 1).ebx, 3);
        assert_eq!(get(0xb, 1).eax, 2, "2 bits number 3 cores");
        assert_eq!(get(0xb, 0).edx, 2, "x2APIC id");
        assert_eq!(get(HYPERVISOR_LEAF, 0).eax, TIMING_LEAF);
        assert_eq!(get(TIMING_LEAF, 0).eax, 2_000_000);
    }
}
