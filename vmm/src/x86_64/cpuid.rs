//! The CPUID a vCPU shows its guest: what KVM supports on this host, with
//! the topology of this VM, each vCPU's own APIC ID, the hypervisor bit
//! and the KVM signature, and no performance counters.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("the CPUID table is full")]
    Full,
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Topology level types of leaf 0xB / 0x1F, in ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adapts `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `vcpu` of
/// `vcpu_count`, one core each in one socket.
pub fn configure(cpuid: &mut CpuId, vcpu: u8, vcpu_count: u8) -> Result<(), CpuidError> {
    let apic_id = u32::from(vcpu);
    let count = u32::from(vcpu_count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC ID, logical processor count, CLFLUSH
                // line size (8 * 8 = 64 bytes).
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; [25:14]: threads
                // sharing this cache - 1 (one per core).
                e.eax &= 0x3fff;
                e.eax |= (count - 1) << 26;
            }
            LEAF_PMU => {
                // No guest performance counters: they are not saved in
                // snapshots and not always there on the destination.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_KVM_SIGNATURE => {
                e.eax = e.eax.max(LEAF_KVM_SIGNATURE + 1);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            _ => {}
        }
    }
    let has_signature = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_KVM_SIGNATURE);
    if !has_signature {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_KVM_SIGNATURE,
                eax: LEAF_KVM_SIGNATURE + 1,
                ebx: KVM_SIGNATURE[0],
                ecx: KVM_SIGNATURE[1],
                edx: KVM_SIGNATURE[2],
                ..Default::default()
            })
            .map_err(|_| CpuidError::Full)?;
    }
    Ok(())
}

/// Looks up a leaf (and subleaf, where the leaf is indexed).
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_like() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                edx: 0x0789_abcd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: 0xfc00_4121,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xa,
                eax: 0x0803_0805,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id_and_the_vm_topology() {
        let mut c = host_like();
        configure(&mut c, 1, 2).unwrap();
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 1, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 2, "logical processors");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let core = find(&c, 0xb, 1).unwrap();
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (1, 2, LEVEL_CORE, 1)
        );
        let smt = find(&c, 0xb, 0).unwrap();
        assert_eq!((smt.ebx, smt.edx), (1, 1));
        assert_eq!(find(&c, 4, 0).unwrap().eax >> 26, 1);
    }

    #[test]
    fn kvm_signature_is_added_and_pmu_hidden() {
        let mut c = host_like();
        configure(&mut c, 0, 1).unwrap();
        let sig = find(&c, LEAF_KVM_SIGNATURE, 0).unwrap();
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(find(&c, 0xa, 0).unwrap().eax, 0);
        assert_eq!(find(&c, 1, 0).unwrap().edx & EDX_HTT, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
