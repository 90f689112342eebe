//! The `identity` step: what tells this VM from its clones, as the guest
//! sees it: the MAC in each virtio-net device's config space and the ACPI
//! VM generation ID.

use crate::net::{Mac, mmio};
use crate::{acpi, hw, serial};
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
    let genid = acpi::vmgenid_addr().map(|addr| {
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = hw::mmio_read_u8(addr + i as u64);
        }
        id
    });
    serial::line(format_args!(
        r#"{{"probe":"identity","macs":{},"vmgenid":{}}}"#,
        macs,
        GenId(genid)
    ));
}
