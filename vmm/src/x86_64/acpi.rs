//! ACPI tables (hardware-reduced ACPI, as Firecracker and Cloud Hypervisor
//! give their guests): how a kernel built without MP table support, such
//! as Debian's cloud kernel, learns its CPUs, its interrupt controllers and
//! how to power off.
//!
//! ```text
//! RSDP (rev 2) -> XSDT -> FADT -> DSDT   (\_S5_, COM1, virtio-mmio devices)
//!                      -> MADT           (local APICs, IOAPIC, LAPIC NMI)
//! ```
//!
//! All of it lies in the BIOS area from [`ACPI_START`], RSDP first, where
//! guests that get no RSDP address at boot search for it. The FADT's sleep
//! control/status and reset registers are the I/O ports of
//! [`devices::legacy::acpi_pm`].
//!
//! Hardware-reduced ACPI has no legacy PIC, so Linux numbers its IRQs
//! apart from the GSIs and only finds a device's interrupt through ACPI:
//! the DSDT describes COM1 and every virtio-mmio device (as Firecracker
//! does); the `virtio_mmio.device=` command line parameters stay for
//! kernels without ACPI.
//!
//! The MADT has no interrupt source overrides: KVM's default routing wires
//! GSI n to IOAPIC pin n for the ISA IRQs (the in-kernel PIT's IRQ 0
//! reaches pin 0, not pin 2 as on PC chipsets and in QEMU), which is what
//! ACPI means without overrides, and what our MP table says too. A
//! hardware-reduced Linux does not use the PIT as its timer anyway.

use crate::layout::{ACPI_END, ACPI_START, GED_GSI, IOAPIC_START, LAPIC_START, VMGENID_START};
use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use devices::legacy::acpi_pm::{
    ACPI_PM_BASE, RESET_OFFSET, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL_OFFSET,
    SLEEP_STATUS_OFFSET,
};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "{0} vCPUs do not fit in the ACPI MADT (1 to {MAX_CPUS}: local APIC ids are 8 bits, \
         255 is the broadcast id, and the IOAPIC takes the id after the last vCPU's)"
    )]
    TooManyCpus(usize),
    #[error(
        "virtio-mmio device {index} at {base:#x}+{len:#x} does not fit the DSDT (32-bit addresses, at most 1000 devices)"
    )]
    VirtioDevice { index: usize, base: u64, len: u64 },
    #[error("the ACPI tables take {size} bytes, more than the {room} set aside for them")]
    TooLarge { size: usize, room: u64 },
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The most vCPUs the tables describe (the MP table's limit too).
pub const MAX_CPUS: usize = 254;
/// Virtio devices are named V000 to V999 in the DSDT.
const MAX_VIRTIO_DEVICES: usize = 1000;

const OEM_ID: [u8; 6] = *b"VMPLNT";
const OEM_REVISION: u32 = 1;
/// FADT: "VMPLANT" in the hypervisor vendor identity field.
const HYPERVISOR_VENDOR: u64 = u64::from_le_bytes(*b"VMPLANT\0");
/// FADT IA-PC boot architecture flags: no VGA, no MSI (there is no PCI),
/// no CMOS RTC at ports 0x70/0x71.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// MADT flags: the machine also has dual 8259 PICs (KVM's irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_REVISION: u8 = 5;
const MADT_LAPIC_NMI: u8 = 4;
/// Every processor (ACPI processor UID 0xFF): NMI on LINT1, polarity and
/// trigger as the bus defines, as in the MP table.
const LAPIC_NMI_ALL: [u8; 6] = [MADT_LAPIC_NMI, 6, 0xff, 0, 0, 1];
/// Each table starts on this alignment after the previous one.
const TABLE_ALIGN: usize = 16;

/// A virtio-mmio device as the DSDT describes it: its register window
/// and its GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmio {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// The tables laid out from `base`: the bytes to copy there, the RSDP at
/// offset 0.
#[derive(Debug)]
pub struct AcpiTables {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl AcpiTables {
    /// Where the RSDP lies.
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }
}

/// Appends tables to an image that will lie at `base`.
struct Image {
    base: u64,
    bytes: Vec<u8>,
}

impl Image {
    /// Appends `table` at the next aligned offset; returns its address.
    fn add(&mut self, table: &[u8]) -> u64 {
        let at = self.bytes.len().next_multiple_of(TABLE_ALIGN);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(table);
        self.base + at as u64
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// A table with the standard header and `body` after it, checksummed.
fn sdt(signature: [u8; 4], revision: u8, table_id: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(signature, 36, revision, OEM_ID, table_id, OEM_REVISION);
    t.append_slice(body);
    t.as_slice().to_vec()
}

/// The DSDT: `\_S5_` (the sleep type the FADT's sleep control register
/// takes for power off), COM1 and the virtio-mmio devices, so that Linux
/// finds their interrupts through ACPI as hardware-reduced platforms need.
fn dsdt(virtio: &[VirtioMmio]) -> Result<Vec<u8>, AcpiError> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    );
    let mut body = aml_bytes(&s5);
    // Temporaries live to the end of the statement that serializes them.
    body.extend(aml_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_BASE, COM1_BASE, 1, COM1_LEN as u8),
                    // Consumer, edge-triggered, active high, exclusive.
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )));
    // The VM generation ID device (ACPI's "Virtual Machine Generation ID"
    // spec): Linux's vmgenid driver matches the _HID, other guests the
    // _CID; ADDR is the ID's guest-physical address, low then high half.
    let (genid_low, genid_high) = (VMGENID_START as u32, (VMGENID_START >> 32) as u32);
    body.extend(aml_bytes(&aml::Device::new(
        "_SB_.VMGN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMGENCTR"),
            &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new(
                "ADDR".into(),
                &aml::Package::new(vec![&genid_low, &genid_high]),
            ),
        ],
    )));
    // A generic event device (hardware-reduced ACPI's way to raise
    // events): its interrupt makes the guest's GED driver call _EVT, which
    // notifies the VMGenID device that its ID changed (0x80), so that
    // Linux reseeds its random number generator in every clone.
    body.extend(aml_bytes(&aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    // Consumer, edge-triggered, active high, exclusive.
                    &aml::Interrupt::new(true, true, false, false, GED_GSI),
                ]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&aml::If::new(
                    &aml::Equal::new(&aml::Arg(0), &GED_GSI),
                    vec![&aml::Notify::new(&aml::Path::new("\\_SB_.VMGN"), &0x80u8)],
                )],
            ),
        ],
    )));
    for (index, dev) in virtio.iter().enumerate() {
        let bad = || AcpiError::VirtioDevice {
            index,
            base: dev.base,
            len: dev.len,
        };
        let base = u32::try_from(dev.base).map_err(|_| bad())?;
        let len = u32::try_from(dev.len).map_err(|_| bad())?;
        if index >= MAX_VIRTIO_DEVICES || base.checked_add(len).is_none() {
            return Err(bad());
        }
        // Linux's virtio-mmio driver matches LNRO0005; the interrupt is
        // edge-triggered, as an irqfd is.
        body.extend(aml_bytes(&aml::Device::new(
            format!("_SB_.V{index:03}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(index as u32)),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base, len),
                        &aml::Interrupt::new(true, true, false, false, dev.gsi),
                    ]),
                ),
            ],
        )));
    }
    Ok(sdt(*b"DSDT", 2, *b"VMPLDSDT", &body))
}

/// An 8-bit register at an I/O port.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT: hardware-reduced ACPI (no PM1 blocks, no SCI, no PM timer),
/// no fixed power or sleep button, power off and reset through the
/// registers of [`devices::legacy::AcpiPowerControl`].
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"VMPLFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sleep_control_reg = io_register(ACPI_PM_BASE + u16::from(SLEEP_CONTROL_OFFSET));
    f.sleep_status_reg = io_register(ACPI_PM_BASE + u16::from(SLEEP_STATUS_OFFSET));
    f.reset_reg = io_register(ACPI_PM_BASE + u16::from(RESET_OFFSET));
    f.reset_value = RESET_VALUE;
    f.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).into();
    f.hypervisor_vendor_identity = HYPERVISOR_VENDOR.into();
    aml_bytes(&f.finalize())
}

/// The MADT: one enabled local APIC per vCPU (ACPI processor UID and APIC
/// id both the vCPU index), the IOAPIC with GSIs from 0, and NMI on LINT1.
fn madt(cpus: usize) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend((LAPIC_START as u32).to_le_bytes());
    body.extend(MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..cpus as u8 {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    // The same IOAPIC id as in the MP table: the one after the vCPUs'.
    IoApic::new(cpus as u8, IOAPIC_START as u32, 0).to_aml_bytes(&mut body);
    body.extend(LAPIC_NMI_ALL);
    sdt(*b"APIC", MADT_REVISION, *b"VMPLMADT", &body)
}

/// Builds the tables for `cpus` vCPUs and the `virtio` devices, laid out
/// from `base`.
pub fn build(cpus: usize, virtio: &[VirtioMmio], base: u64) -> Result<AcpiTables, AcpiError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(cpus));
    }
    let rsdp_len = Rsdp::len();
    let mut image = Image {
        base,
        bytes: vec![0; rsdp_len],
    };
    let dsdt_addr = image.add(&dsdt(virtio)?);
    let fadt_addr = image.add(&fadt(dsdt_addr));
    let madt_addr = image.add(&madt(cpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"VMPLXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = image.add(&aml_bytes(&xsdt));
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    image.bytes[..rsdp_len].copy_from_slice(&rsdp);
    Ok(AcpiTables {
        base,
        bytes: image.bytes,
    })
}

/// Writes the tables for `cpus` vCPUs and the `virtio` devices into the
/// BIOS area; returns the RSDP's address (for boot_params.acpi_rsdp_addr
/// and the PVH start info).
pub fn write<M: GuestMemory>(
    mem: &M,
    cpus: usize,
    virtio: &[VirtioMmio],
) -> Result<u64, AcpiError> {
    let tables = build(cpus, virtio, ACPI_START)?;
    let room = ACPI_END - ACPI_START;
    if tables.bytes.len() as u64 > room {
        return Err(AcpiError::TooLarge {
            size: tables.bytes.len(),
            room,
        });
    }
    mem.write_slice(&tables.bytes, GuestAddress(ACPI_START))
        .map_err(AcpiError::Write)?;
    tracing::debug!(
        rsdp = format_args!("{:#x}", tables.rsdp_addr()),
        bytes = tables.bytes.len(),
        "ACPI tables written"
    );
    Ok(tables.rsdp_addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Reads the tables back as a guest does, from the RSDP.
    struct Parsed<'a> {
        tables: &'a AcpiTables,
    }

    impl<'a> Parsed<'a> {
        fn bytes_at(&self, addr: u64, len: usize) -> &'a [u8] {
            let at = usize::try_from(addr - self.tables.base).unwrap();
            &self.tables.bytes[at..at + len]
        }

        /// The table at `addr`, checked: signature, length within the
        /// image, checksum.
        fn table(&self, addr: u64, signature: &[u8; 4]) -> &'a [u8] {
            let header = self.bytes_at(addr, 36);
            assert_eq!(&header[..4], signature, "signature at {addr:#x}");
            let len = u32_at(header, 4) as usize;
            assert!(len >= 36, "{signature:?} length {len}");
            let t = self.bytes_at(addr, len);
            assert_eq!(sum(t), 0, "{signature:?} checksum");
            assert_eq!(&t[10..16], b"VMPLNT", "{signature:?} OEM id");
            t
        }

        fn rsdp(&self) -> &'a [u8] {
            let r = self.bytes_at(self.tables.rsdp_addr(), 36);
            assert_eq!(&r[..8], b"RSD PTR ");
            assert_eq!(sum(&r[..20]), 0, "RSDP checksum (first 20 bytes)");
            assert_eq!(r[15], 2, "RSDP revision 2 (has an XSDT)");
            assert_eq!(u32_at(r, 20), 36, "RSDP length");
            assert_eq!(sum(r), 0, "RSDP extended checksum");
            r
        }

        /// The tables the XSDT lists, by signature.
        fn xsdt_entries(&self) -> Vec<(String, u64)> {
            let xsdt = self.table(u64_at(self.rsdp(), 24), b"XSDT");
            xsdt[36..]
                .chunks(8)
                .map(|c| {
                    let addr = u64::from_le_bytes(c.try_into().unwrap());
                    let sig = String::from_utf8_lossy(self.bytes_at(addr, 4)).into_owned();
                    (sig, addr)
                })
                .collect()
        }

        fn find(&self, signature: &[u8; 4]) -> &'a [u8] {
            let sig = std::str::from_utf8(signature).unwrap();
            let (_, addr) = self
                .xsdt_entries()
                .into_iter()
                .find(|(s, _)| s == sig)
                .unwrap_or_else(|| panic!("the XSDT lists no {sig}"));
            self.table(addr, signature)
        }

        fn fadt(&self) -> &'a [u8] {
            self.find(b"FACP")
        }

        fn dsdt(&self) -> &'a [u8] {
            let fadt = self.fadt();
            assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
            self.table(u64_at(fadt, 140), b"DSDT")
        }

        /// MADT entries as (type, bytes).
        fn madt_entries(&self) -> Vec<(u8, &'a [u8])> {
            let madt = self.find(b"APIC");
            let mut at = 44;
            let mut entries = Vec::new();
            while at < madt.len() {
                let len = usize::from(madt[at + 1]);
                assert!(len >= 2);
                entries.push((madt[at], &madt[at..at + len]));
                at += len;
            }
            assert_eq!(at, madt.len(), "entries fill the MADT exactly");
            entries
        }
    }

    fn parse(tables: &AcpiTables) -> Parsed<'_> {
        Parsed { tables }
    }

    #[test]
    fn rsdp_leads_to_every_table_with_valid_checksums() {
        let t = build(2, &[], ACPI_START).unwrap();
        let p = parse(&t);
        let sigs: Vec<String> = p.xsdt_entries().into_iter().map(|(s, _)| s).collect();
        assert_eq!(sigs, ["FACP", "APIC"]);
        p.fadt();
        p.dsdt();
        // All of it in the space set aside, RSDP 16-byte aligned first.
        assert_eq!(t.rsdp_addr() % 16, 0);
        assert!(t.base + t.bytes.len() as u64 <= ACPI_END);
    }

    #[test]
    fn madt_lists_one_enabled_local_apic_per_vcpu_and_the_ioapic() {
        for cpus in [1, 2, 7] {
            let t = build(cpus, &[], ACPI_START).unwrap();
            let p = parse(&t);
            let madt = p.find(b"APIC");
            assert_eq!(u64::from(u32_at(madt, 36)), LAPIC_START);
            let entries = p.madt_entries();
            let lapics: Vec<(u8, u8, u32)> = entries
                .iter()
                .filter(|(kind, _)| *kind == 0)
                .map(|(_, e)| (e[2], e[3], u32_at(e, 4)))
                .collect();
            let want: Vec<(u8, u8, u32)> = (0..cpus as u8).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, want, "(processor uid, APIC id, enabled) for {cpus}");
            let ioapics: Vec<&[u8]> = entries
                .iter()
                .filter(|(kind, _)| *kind == 1)
                .map(|(_, e)| *e)
                .collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!(ioapics[0][2], cpus as u8, "IOAPIC id as in the MP table");
            assert_eq!(u64::from(u32_at(ioapics[0], 4)), IOAPIC_START);
            assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
            // No interrupt source overrides: ISA IRQ n is GSI n under
            // KVM's default routing.
            assert!(entries.iter().all(|(kind, _)| *kind != 2));
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_power_off_and_reset_ports() {
        let t = build(1, &[], ACPI_START).unwrap();
        let fadt = parse(&t).fadt();
        assert_eq!(fadt.len(), 276, "an ACPI 6 FADT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // Sleep control (244) and status (256): byte-wide I/O at the port.
        for at in [244, 256] {
            assert_eq!(&fadt[at..at + 4], &[1, 8, 0, 1], "GAS at {at}");
            assert_eq!(u64_at(fadt, at + 4), u64::from(ACPI_PM_BASE));
        }
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1], "reset register");
        assert_eq!(u64_at(fadt, 120), u64::from(ACPI_PM_BASE) + 1);
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(u64_at(fadt, 268), HYPERVISOR_VENDOR);
    }

    #[test]
    fn dsdt_gives_s5_the_sleep_type_the_power_control_takes() {
        let t = build(1, &[], ACPI_START).unwrap();
        let dsdt = parse(&t).dsdt();
        // Name(_S5_, Package(2) { 5, 5 }): NameOp, name, PackageOp,
        // PkgLength, NumElements, BytePrefix 5, BytePrefix 5.
        let at = dsdt.windows(4).position(|w| w == b"_S5_").unwrap();
        assert_eq!(dsdt[at - 1], 0x08, "NameOp");
        assert_eq!(&dsdt[at + 4..at + 11], &[0x12, 6, 2, 0x0a, 5, 0x0a, 5]);
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
    }

    #[test]
    fn dsdt_points_the_vmgenid_device_at_the_id() {
        let t = build(1, &[], ACPI_START).unwrap();
        let dsdt = parse(&t).dsdt();
        let at = dsdt.windows(4).position(|w| w == b"VMGN").expect("VMGN");
        let dev = &dsdt[at..];
        assert!(dev.windows(8).any(|w| w == b"VMGENCTR"), "_HID");
        assert!(dev.windows(14).any(|w| w == b"VM_Gen_Counter"), "_CID");
        // Name (ADDR, Package (2) { DWord low, Zero }).
        let mut addr = b"ADDR".to_vec();
        addr.extend([0x12, 0x08, 0x02, 0x0c]);
        addr.extend((VMGENID_START as u32).to_le_bytes());
        addr.push(0x00);
        assert!(dev.windows(addr.len()).any(|w| w == addr), "ADDR {dev:x?}");
    }

    /// The DSDT as ACPICA's disassembler reads it (the ASL text), so that
    /// what a guest's AML interpreter makes of the bytes is checked, not
    /// just the bytes.
    fn disassembled_dsdt(dsdt: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let aml = dir.path().join("dsdt.aml");
        std::fs::write(&aml, dsdt).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .output()
            .expect("iasl (Debian's acpica-tools, which scripts/setup installs) runs");
        assert!(out.status.success(), "iasl -d: {out:?}");
        std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap()
    }

    #[test]
    fn the_generic_event_device_notifies_the_vmgenid_device() {
        let t = build(1, &[], ACPI_START).unwrap();
        let asl = disassembled_dsdt(parse(&t).dsdt());
        // Without comments and whitespace, from the GED device on.
        let mut code = String::new();
        let mut rest = asl.as_str();
        while let Some(at) = rest.find("/*") {
            code.push_str(&rest[..at]);
            rest = rest[at..].split_once("*/").map_or("", |(_, after)| after);
        }
        code.push_str(rest);
        let flat: String = code
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .flat_map(|l| l.split_whitespace())
            .collect();
        let ged = flat
            .find("Device(_SB.GED)")
            .unwrap_or_else(|| panic!("no GED in\n{asl}"));
        let ged = &flat[ged..];
        assert!(ged.contains(r#"Name(_HID,"ACPI0013")"#), "{asl}");
        let gsi = format!("{GED_GSI:#010X}").replace("0X", "0x");
        assert!(
            ged.contains(&format!(
                "Interrupt(ResourceConsumer,Edge,ActiveHigh,Exclusive,,,){{{gsi},}}"
            )),
            "{asl}"
        );
        let evt = ged.find("Method(_EVT,1,Serialized)").expect("_EVT");
        let gsi_byte = format!("{GED_GSI:#04X}").replace("0X", "0x");
        assert!(
            ged[evt..].starts_with(&format!(
                "Method(_EVT,1,Serialized){{If((Arg0=={gsi_byte})){{Notify(\\_SB.VMGN,0x80)"
            )),
            "{asl}"
        );
    }

    #[test]
    fn dsdt_describes_each_virtio_device_with_its_window_and_gsi() {
        let devs: Vec<VirtioMmio> = (0..3)
            .map(|i| VirtioMmio {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        let t = build(1, &devs, ACPI_START).unwrap();
        let dsdt = parse(&t).dsdt();
        for (i, d) in devs.iter().enumerate() {
            let name = format!("V{i:03}");
            let at = dsdt
                .windows(4)
                .position(|w| w == name.as_bytes())
                .unwrap_or_else(|| panic!("no {name}"));
            let dev = &dsdt[at..];
            assert!(dev.windows(8).any(|w| w == b"LNRO0005"), "{name} _HID");
            // Memory32Fixed: tag 0x86, length 9, read-write, base, length.
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend((d.base as u32).to_le_bytes());
            mem.extend((d.len as u32).to_le_bytes());
            assert!(dev.windows(mem.len()).any(|w| w == mem), "{name} window");
            // Extended interrupt: tag 0x89, length 6, consumer + edge, one GSI.
            let mut irq = vec![0x89, 6, 0, 0b11, 1];
            irq.extend(d.gsi.to_le_bytes());
            assert!(dev.windows(irq.len()).any(|w| w == irq), "{name} GSI");
        }
        let above_4g = [VirtioMmio {
            base: 1 << 32,
            len: 0x1000,
            gsi: 5,
        }];
        assert!(matches!(
            build(1, &above_4g, ACPI_START),
            Err(AcpiError::VirtioDevice { index: 0, .. })
        ));
    }

    #[test]
    fn refuses_cpu_counts_the_madt_cannot_describe() {
        for bad in [0, 255, 300] {
            let e = build(bad, &[], ACPI_START).unwrap_err();
            assert!(matches!(e, AcpiError::TooManyCpus(n) if n == bad));
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("{bad} vCPUs do not fit")), "{msg}");
            assert!(msg.contains("1 to 254"), "{msg}");
        }
        // The largest set still fits in the space set aside.
        let t = build(MAX_CPUS, &[], ACPI_START).unwrap();
        assert!(t.bytes.len() as u64 <= ACPI_END - ACPI_START);
        assert_eq!(
            parse(&t)
                .madt_entries()
                .iter()
                .filter(|(k, _)| *k == 0)
                .count(),
            MAX_CPUS
        );
    }

    #[test]
    fn write_puts_the_tables_in_guest_memory_below_the_mp_table() {
        let mem = crate::memory::create(64 << 20, false).unwrap();
        let rsdp = write(&mem, 2, &[]).unwrap();
        assert_eq!(rsdp, ACPI_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        // The MP table written after it is untouched, and vice versa.
        crate::x86_64::mptable::write(&mem, 2).unwrap();
        let again = build(2, &[], ACPI_START).unwrap();
        let mut back = vec![0u8; again.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(back, again.bytes);
    }
}
