//! The `identity` step: what tells this VM from its clones, as the guest
//! sees it: the MAC in each virtio-net device's config space and the ACPI
//! VM generation ID. The `vmgenid-watch` step: the notification that the
//! generation ID changed (a restore), as a guest's ACPI generic event
//! device driver gets it.

use crate::net::{Mac, mmio};
use crate::{acpi, boot, clock, hw, lapic, serial};
use core::fmt;

/// Most network devices listed.
const MAX_NICS: usize = 32;
/// VIRTIO_NET_F_MAC: the config space holds a MAC.
const NET_F_MAC: u32 = 1 << 5;

/// The MACs of the virtio-net devices on the command line, in order
/// (`None` for a device that offers no MAC).
struct Macs {
    macs: [Option<[u8; 6]>; MAX_NICS],
    len: usize,
}

impl fmt::Display for Macs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, mac) in self.macs[..self.len].iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match mac {
                Some(m) => write!(f, "\"{}\"", Mac(*m))?,
                None => f.write_str("null")?,
            }
        }
        f.write_str("]")
    }
}

/// The 16 bytes of the generation ID as 32 hex digits in memory order, or
/// `null`.
struct GenId(Option<[u8; 16]>);

impl fmt::Display for GenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(id) = self.0 else {
            return f.write_str("null");
        };
        f.write_str("\"")?;
        for b in id {
            write!(f, "{b:02x}")?;
        }
        f.write_str("\"")
    }
}

/// Prints `{"probe":"identity","macs":[...],"vmgenid":"..."|null}`. The
/// devices are only read (feature word 0 and the config space), not reset
/// or brought up, so this may run before or after `net`.
pub fn exec(cmdline: &str) {
    let mut macs = Macs {
        macs: [None; MAX_NICS],
        len: 0,
    };
    for dev in mmio::devices(cmdline).filter(|d| d.device_id() == mmio::DEVICE_NET) {
        if macs.len == MAX_NICS {
            break;
        }
        macs.macs[macs.len] = (dev.features_lo() & NET_F_MAC != 0).then(|| {
            let mut mac = [0u8; 6];
            for (i, b) in mac.iter_mut().enumerate() {
                *b = hw::mmio_read_u8(dev.base + mmio::reg::CONFIG + i as u64);
            }
            mac
        });
        macs.len += 1;
    }
    serial::line(format_args!(
        r#"{{"probe":"identity","macs":{},"vmgenid":{}}}"#,
        macs,
        genid()
    ));
}

/// The VM generation ID as the guest reads it now.
fn genid() -> GenId {
    GenId(acpi::vmgenid_addr().map(|addr| {
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = hw::mmio_read_u8(addr + i as u64);
        }
        id
    }))
}

/// The I/O APIC (identity mapped): register select and data window.
const IOREGSEL: u64 = 0xfec0_0000;
const IOWIN: u64 = 0xfec0_0010;
const IOAPIC_PINS: u32 = 24;

/// The `vmgenid-watch:MS` step. Routes the ACPI generic event device's
/// interrupt (its GSI from the DSDT) to this vCPU (vector
/// [`boot::GED_VECTOR`], edge-triggered, active high) and prints
/// `{"probe":"vmgenid-watch","gsi":G,"vmgenid":"..."}`; then, forever, wakes
/// every MS ms and, when such interrupts came since it last looked, prints
/// `{"probe":"vmgenid-changed","interrupts":N,"vmgenid":"..."}` (N in all,
/// the ID as it reads now).
pub fn watch(ms: u64) {
    let Some(gsi) = acpi::ged_gsi().filter(|&g| g < IOAPIC_PINS) else {
        serial::line(format_args!(
            r#"{{"probe":"error","msg":"no generic event device interrupt in the DSDT"}}"#
        ));
        return;
    };
    // Redirection entry `gsi`: destination APIC 0 (this vCPU, the BSP)
    // first, then fixed delivery of the vector, unmasked.
    hw::mmio_write_u32(IOREGSEL, 0x11 + 2 * gsi);
    hw::mmio_write_u32(IOWIN, 0);
    hw::mmio_write_u32(IOREGSEL, 0x10 + 2 * gsi);
    hw::mmio_write_u32(IOWIN, boot::GED_VECTOR);
    let mut seen = boot::ged_interrupts();
    serial::line(format_args!(
        r#"{{"probe":"vmgenid-watch","gsi":{},"vmgenid":{}}}"#,
        gsi,
        genid()
    ));
    let period = clock::ticks_ms(ms);
    loop {
        lapic::wait(hw::rdtsc(), period);
        let now = boot::ged_interrupts();
        if now != seen {
            seen = now;
            serial::line(format_args!(
                r#"{{"probe":"vmgenid-changed","interrupts":{},"vmgenid":{}}}"#,
                now,
                genid()
            ));
        }
    }
}
