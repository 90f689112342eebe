//! Global descriptor table entries, in the packed form the CPU reads and
//! the unpacked form KVM takes.

use kvm_bindings::kvm_segment;

/// One 8-byte segment descriptor built from flags, base and limit.
/// `flags` holds the access byte in bits 0-7 and G/DB/L/AVL in 12-15, as
/// in Linux's `GDT_ENTRY` macro.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xFF00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00FF_0000_0000) >> 16)
        | ((entry & 0x0000_0000_FFFF_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000F_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_FFFF)) as u32;
    // With the granularity bit the limit counts 4 KiB pages.
    if entry & (1 << 55) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM view of descriptor `index` of a table holding `entry`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        padding: 0,
        unusable: u8::from(bit(47) == 0),
    }
}

/// Descriptors for the 64-bit Linux entry: null, 64-bit code, data, TSS.
pub const GDT_64BIT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Descriptors for the PVH entry: null, 32-bit flat code, data, TSS.
pub const GDT_32BIT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_descriptor_matches_the_classic_encoding() {
        // The value every x86 VMM and Linux's head_64.S use for a flat
        // 64-bit code segment.
        assert_eq!(GDT_64BIT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_64BIT[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn unpacks_into_kvm_segments() {
        let cs = kvm_segment_from_gdt(GDT_64BIT[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.s, cs.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.g, cs.dpl), (0, 0xffff_ffff, 1, 0));
        let ds = kvm_segment_from_gdt(GDT_64BIT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x10, 3, 1, 0));
        let tss = kvm_segment_from_gdt(GDT_32BIT[3], 3);
        assert_eq!((tss.limit, tss.g, tss.s, tss.type_), (0x67, 0, 0, 0xb));
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcde);
    }
}
