//! Block device steps, with virtio-drivers' `VirtIOBlk` on a virtio-blk
//! device (virtio-mmio, found on the kernel command line like the network
//! devices): the first one, or the INDEX-th (from 0) given as the step's
//! last argument. Requests are polled, one at a time.
//!
//! The write pattern of `blk-write:SECTOR:COUNT:SEED` is a xorshift64
//! stream (13, 7, 17) from the state `SEED * 0x9E3779B97F4A7C15 | 1`,
//! each state after a step written as 8 little-endian bytes, from the
//! write's first byte: a test can make the same bytes on the host.

use crate::net::crc::Crc32;
use crate::net::hal::ProbeHal;
use crate::net::mmio::{self, MmioDevice};
use crate::net::pool;
use crate::net::transport::Linuxish;
use crate::net::time::{self, per_sec};
use crate::serial::{self, Json};
use core::ptr::NonNull;
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};

/// Virtio device id of a block device.
const DEVICE_BLK: u32 = 2;
/// Devices the steps can address.
const MAX_DEVICES: usize = 4;
/// The largest request the steps send, and the buffer they use.
const BUF: usize = 1 << 20;

/// Status bits set one at a time, as Linux does: Firecracker refuses
/// virtio-drivers' ACKNOWLEDGE|DRIVER in one write.
type Disk = VirtIOBlk<ProbeHal, Linuxish<MmioTransport<'static>>>;

/// One parsed block step; `dev` is the device index.
#[derive(Clone, Copy)]
pub enum Cmd {
    Info {
        dev: u32,
    },
    Write {
        sector: u64,
        count: u64,
        seed: u64,
        dev: u32,
    },
    Read {
        sector: u64,
        count: u64,
        dev: u32,
    },
    RandRead {
        count: u64,
        bytes: u64,
        dev: u32,
    },
    SeqRead {
        mib: u64,
        dev: u32,
    },
    /// `blk-write-loop:SECTOR:COUNT:N`: the `blk-write` of seeds 1 to N
    /// in turn over the same sectors, each flushed, then reported.
    WriteLoop {
        sector: u64,
        count: u64,
        n: u64,
        dev: u32,
    },
}

/// Parses block step `name`: `None` if it is not one, `Err(arg)` for a
/// bad or missing argument.
pub fn parse<'a>(
    name: &str,
    args: &mut impl Iterator<Item = &'a str>,
) -> Option<Result<Cmd, &'a str>> {
    if !KNOWN.contains(&name) {
        return None;
    }
    Some(parse_args(name, args))
}

const KNOWN: [&str; 6] = [
    "blk-info",
    "blk-write",
    "blk-read",
    "blk-rand-read",
    "blk-seq-read",
    "blk-write-loop",
];

fn parse_args<'a>(name: &str, args: &mut impl Iterator<Item = &'a str>) -> Result<Cmd, &'a str> {
    let mut num = || -> Result<u64, &'a str> {
        let a = args.next().unwrap_or("");
        a.parse().map_err(|_| a)
    };
    // The device index, last and optional: the first device without it.
    let dev = |v: Result<u64, &'a str>| -> Result<u32, &'a str> {
        match v {
            Ok(i) if i < MAX_DEVICES as u64 => Ok(i as u32),
            Ok(_) => Err("index"),
            Err("") => Ok(0),
            Err(a) => Err(a),
        }
    };
    let nonzero = |v: u64| if v == 0 { Err("0") } else { Ok(v) };
    Ok(match name {
        "blk-info" => Cmd::Info { dev: dev(num())? },
        "blk-write" => Cmd::Write {
            sector: num()?,
            count: nonzero(num()?)?,
            seed: num()?,
            dev: dev(num())?,
        },
        "blk-read" => Cmd::Read {
            sector: num()?,
            count: nonzero(num()?)?,
            dev: dev(num())?,
        },
        "blk-write-loop" => Cmd::WriteLoop {
            sector: num()?,
            count: nonzero(num()?)?,
            n: nonzero(num()?)?,
            dev: dev(num())?,
        },
        "blk-rand-read" => {
            let count = nonzero(num()?)?;
            let bytes = num()?;
            if bytes == 0 || bytes % SECTOR_SIZE as u64 != 0 || bytes > BUF as u64 {
                return Err("bytes");
            }
            Cmd::RandRead {
                count,
                bytes,
                dev: dev(num())?,
            }
        }
        _ => Cmd::SeqRead {
            mib: nonzero(num()?)?,
            dev: dev(num())?,
        },
    })
}

/// The devices brought up so far, and the request buffer.
pub struct Ctx<'a> {
    cmdline: &'a str,
    devs: [Option<Result<&'static mut Up, &'static str>>; MAX_DEVICES],
    buf: Option<&'static mut [u8]>,
}

/// A device that came up, with what was read before the driver took it.
struct Up {
    disk: Disk,
    features: u32,
}

impl<'a> Ctx<'a> {
    pub fn new(cmdline: &'a str) -> Self {
        Ctx {
            cmdline,
            devs: [const { None }; MAX_DEVICES],
            buf: None,
        }
    }

    /// Runs one block step.
    pub fn exec(&mut self, cmd: Cmd) {
        let (step, dev) = match cmd {
            Cmd::Info { dev } => ("blk-info", dev),
            Cmd::Write { dev, .. } => ("blk-write", dev),
            Cmd::Read { dev, .. } => ("blk-read", dev),
            Cmd::RandRead { dev, .. } => ("blk-rand-read", dev),
            Cmd::SeqRead { dev, .. } => ("blk-seq-read", dev),
            Cmd::WriteLoop { dev, .. } => ("blk-write-loop", dev),
        };
        // The messages (the probe's and virtio-drivers' errors) hold no
        // quote or backslash: they go into the JSON string as they are.
        let range = match cmd {
            Cmd::Write { sector, count, .. }
            | Cmd::Read { sector, count, .. }
            | Cmd::WriteLoop { sector, count, .. } => Some((sector, count)),
            _ => None,
        };
        let fail = |e: &dyn core::fmt::Display| match range {
            Some((sector, count)) => serial::line(format_args!(
                r#"{{"probe":"{}","dev":{},"sector":{},"count":{},"error":"{}"}}"#,
                step, dev, sector, count, e
            )),
            None => serial::line(format_args!(
                r#"{{"probe":"{}","dev":{},"error":"{}"}}"#,
                step, dev, e
            )),
        };
        let slot = &mut self.devs[dev as usize];
        if slot.is_none() {
            *slot = Some(up(self.cmdline, dev));
        }
        let up = match slot {
            Some(Ok(up)) => &mut **up,
            Some(Err(e)) => return fail(e),
            None => return,
        };
        if self.buf.is_none() {
            self.buf = pool::bytes(BUF);
        }
        let Some(buf) = self.buf.as_deref_mut() else {
            return fail(&"DMA pool exhausted");
        };
        let disk = &mut up.disk;
        match cmd {
            Cmd::Info { .. } => {
                let mut id = [0u8; 20];
                let serial = match disk.device_id(&mut id) {
                    Ok(n) => core::str::from_utf8(&id[..n]).unwrap_or("?"),
                    Err(_) => "",
                };
                serial::line(format_args!(
                    r#"{{"probe":"blk-info","dev":{},"sectors":{},"read_only":{},"features":"{:#x}","serial":"{}"}}"#,
                    dev,
                    disk.capacity(),
                    disk.readonly(),
                    up.features,
                    Json(serial)
                ));
            }
            Cmd::Write {
                sector,
                count,
                seed,
                ..
            } => {
                let mut pattern = Pattern::new(seed);
                let mut crc = Crc32::new();
                let mut done = 0u64;
                while done < count {
                    let n = (count - done).min((BUF / SECTOR_SIZE) as u64);
                    let chunk = &mut buf[..n as usize * SECTOR_SIZE];
                    pattern.fill(chunk);
                    crc.update(chunk);
                    if let Err(e) = disk.write_blocks((sector + done) as usize, chunk) {
                        return fail(&e);
                    }
                    done += n;
                }
                serial::line(format_args!(
                    r#"{{"probe":"blk-write","dev":{},"sector":{},"count":{},"crc32":"{:08x}"}}"#,
                    dev,
                    sector,
                    count,
                    crc.value()
                ));
            }
            Cmd::WriteLoop {
                sector, count, n, ..
            } => {
                let bytes = count as usize * SECTOR_SIZE;
                if bytes > BUF {
                    return fail(&"at most 1 MiB");
                }
                for seed in 1..=n {
                    let chunk = &mut buf[..bytes];
                    Pattern::new(seed).fill(chunk);
                    if let Err(e) = disk.write_blocks(sector as usize, chunk) {
                        return fail(&e);
                    }
                    if let Err(e) = disk.flush() {
                        return fail(&e);
                    }
                    serial::line(format_args!(
                        r#"{{"probe":"blk-write-loop","dev":{},"seed":{}}}"#,
                        dev, seed
                    ));
                }
            }
            Cmd::Read { sector, count, .. } => {
                let mut crc = Crc32::new();
                let mut done = 0u64;
                while done < count {
                    let n = (count - done).min((BUF / SECTOR_SIZE) as u64);
                    let chunk = &mut buf[..n as usize * SECTOR_SIZE];
                    if let Err(e) = disk.read_blocks((sector + done) as usize, chunk) {
                        return fail(&e);
                    }
                    crc.update(chunk);
                    done += n;
                }
                serial::line(format_args!(
                    r#"{{"probe":"blk-read","dev":{},"sector":{},"count":{},"crc32":"{:08x}"}}"#,
                    dev,
                    sector,
                    count,
                    crc.value()
                ));
            }
            Cmd::RandRead { count, bytes, .. } => {
                let per = bytes / SECTOR_SIZE as u64;
                let slots = disk.capacity() / per;
                if slots == 0 {
                    return fail(&"the disk is smaller than one request");
                }
                let chunk = &mut buf[..bytes as usize];
                let mut rng = Pattern::new(count ^ bytes);
                let t0 = crate::hw::rdtsc();
                for _ in 0..count {
                    let at = rng.next() % slots * per;
                    if let Err(e) = disk.read_blocks(at as usize, chunk) {
                        return fail(&e);
                    }
                }
                let ns = time::ns(crate::hw::rdtsc().wrapping_sub(t0));
                serial::line(format_args!(
                    r#"{{"probe":"blk-rand-read","dev":{},"count":{},"bytes":{},"ns":{},"iops":{}}}"#,
                    dev,
                    count,
                    bytes,
                    ns,
                    per_sec(count, ns)
                ));
            }
            Cmd::SeqRead { mib, .. } => {
                let per = (BUF / SECTOR_SIZE) as u64;
                // Round and round a disk smaller than MIB MiB.
                let slots = disk.capacity() / per;
                if slots == 0 {
                    return fail(&"the disk is smaller than 1 MiB");
                }
                let t0 = crate::hw::rdtsc();
                for i in 0..mib {
                    if let Err(e) = disk.read_blocks((i % slots * per) as usize, buf) {
                        return fail(&e);
                    }
                }
                let ns = time::ns(crate::hw::rdtsc().wrapping_sub(t0));
                serial::line(format_args!(
                    r#"{{"probe":"blk-seq-read","dev":{},"mib":{},"ns":{},"mb_s":{}}}"#,
                    dev,
                    mib,
                    ns,
                    per_sec(mib << 20, ns) / 1_000_000
                ));
            }
        }
    }
}

/// Brings up the `index`-th virtio-blk device on `cmdline`.
fn up(cmdline: &str, index: u32) -> Result<&'static mut Up, &'static str> {
    let dev: MmioDevice = mmio::devices(cmdline)
        .filter(|d| d.device_id() == DEVICE_BLK)
        .nth(index as usize)
        .ok_or("no such virtio-blk device (id 2) on the command line")?;
    let features = dev.features_lo();
    let header = NonNull::new(dev.base as *mut VirtIOHeader).ok_or("device at address 0")?;
    // `dev.base` is a virtio-mmio register block (its magic and
    // device id were checked) of `dev.size` bytes inside the identity map;
    // nothing else in the probe touches it while the transport lives, and
    // it lives for the rest of the run.
    // SAFETY: sound for the reasons just given.
    let transport = unsafe { MmioTransport::new(header, dev.size as usize) }
        .map_err(|_| "not a virtio-mmio device")?;
    let mut disk = Disk::new(Linuxish::stepwise_status(transport, dev.base))
        .map_err(|_| "the driver could not set the device up")?;
    // The probe polls.
    disk.disable_interrupts();
    pool::place(Up { disk, features }).ok_or("DMA pool exhausted")
}

/// The write pattern (see the module's doc), also the random positions
/// of `blk-rand-read`.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Fills `buf` (a multiple of 8 bytes) with the next bytes.
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
    }
}
