//! Hostile-driver steps: the probe acts as a buggy or malicious driver, so
//! that a test can check the VMM contains it (the device fails with
//! DEVICE_NEEDS_RESET and comes back after a reset; the console, the log
//! and the switch stay bounded) while other guests carry on.
//!
//! - `hostile-ring:ID[:INDEX]`: an avail index far ahead of the device;
//! - `hostile-repost:ID[:INDEX]`: one head made available 8 times at once;
//! - `hostile-console:BYTES`: a console line that never ends;
//! - `hostile-status:ID:N[:INDEX]`: N refused status writes;
//! - `hostile-spoof:MAC:SECONDS`: frames from another NIC's MAC;
//! - `hostile-blk[:INDEX]`: malformed virtio-blk requests, one at a time.
//!
//! The ring steps bring a device up by hand (as `fs::dev` does, with
//! 8-entry queues in pool memory) rather than through virtio-drivers,
//! whose queues cannot be made to misbehave.

use crate::net::mmio::reg::*;
use crate::net::mmio::{self, MmioDevice};
use crate::net::time::{self, Deadline};
use crate::net::{self, ErrorField, Mac, pool};
use crate::{clock, hw, serial};
use core::sync::atomic::{Ordering, fence};

/// One parsed hostile step.
#[derive(Clone, Copy)]
pub enum Cmd {
    Ring { id: u32, index: u32 },
    Repost { id: u32, index: u32 },
    Console { bytes: u64 },
    Status { id: u32, writes: u64, index: u32 },
    Spoof { mac: [u8; 6], secs: u64 },
    Blk { index: u32 },
}

/// Parses hostile step `name`: `None` if it is not one, `Err(arg)` for a
/// bad or missing argument.
pub fn parse<'a>(
    name: &str,
    args: &mut impl Iterator<Item = &'a str>,
) -> Option<Result<Cmd, &'a str>> {
    const NAMES: [&str; 6] = [
        "hostile-ring",
        "hostile-repost",
        "hostile-console",
        "hostile-status",
        "hostile-spoof",
        "hostile-blk",
    ];
    if !NAMES.contains(&name) {
        return None;
    }
    let mut cmd = || -> Result<Cmd, &'a str> {
        let mut next = || args.next().ok_or("");
        let num = |a: &'a str, max: u64| -> Result<u64, &'a str> {
            a.parse().ok().filter(|v| *v <= max).ok_or(a)
        };
        let id = |a: &'a str| num(a, 0xffff).map(|v| v as u32);
        let index = |a: Result<&'a str, &'a str>| match a {
            Err(_) => Ok(0),
            Ok(a) => num(a, 64).map(|v| v as u32),
        };
        Ok(match name {
            "hostile-ring" => Cmd::Ring {
                id: id(next()?)?,
                index: index(next())?,
            },
            "hostile-repost" => Cmd::Repost {
                id: id(next()?)?,
                index: index(next())?,
            },
            "hostile-console" => Cmd::Console {
                bytes: num(next()?, 1 << 30)?,
            },
            "hostile-blk" => Cmd::Blk {
                index: index(next())?,
            },
            "hostile-status" => Cmd::Status {
                id: id(next()?)?,
                writes: num(next()?, 100_000_000)?,
                index: index(next())?,
            },
            _ => {
                let a = next()?;
                Cmd::Spoof {
                    mac: net::mac(a).ok_or(a)?,
                    secs: net::secs(next()?)?,
                }
            }
        })
    };
    Some(cmd())
}

/// Runs one hostile step; `spoof` needs the interface `net` brought up.
pub fn exec(cmd: Cmd, cmdline: &str, net: &mut net::Ctx<'_>) {
    match cmd {
        Cmd::Ring { id, index } => ring(cmdline, id, index),
        Cmd::Repost { id, index } => repost(cmdline, id, index),
        Cmd::Console { bytes } => console(bytes),
        Cmd::Status { id, writes, index } => status(cmdline, id, writes, index),
        Cmd::Spoof { mac, secs } => spoof(net, mac, secs),
        Cmd::Blk { index } => blk(cmdline, index),
    }
}

/// Entries in each queue.
const QSIZE: u16 = 8;
/// Queues set up (virtio-net: receiveq, transmitq; virtio-fs: hiprio,
/// requests).
const QUEUES: usize = 2;
/// Layout of one queue's page: descriptors, avail ring, used ring.
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// How long a ring step waits for the device to fail.
const FAIL_MS: u64 = 1000;

/// A device brought up by hand with two 8-entry queues.
struct Dev {
    base: u64,
    /// Each queue's page (guest-physical = virtual).
    rings: [u64; QUEUES],
}

impl Dev {
    fn reg(&self, off: u64) -> u32 {
        hw::mmio_read_u32(self.base + off)
    }

    fn set(&self, off: u64, v: u32) {
        hw::mmio_write_u32(self.base + off, v)
    }

    /// Reset, ACKNOWLEDGE, DRIVER (one write each), VERSION_1 only,
    /// FEATURES_OK, both queues, DRIVER_OK; checks the device took each.
    fn up(dev: MmioDevice) -> Result<Dev, &'static str> {
        Dev::up_with(dev, QUEUES)
    }

    /// [`Dev::up`] with the first `queues` queues only.
    fn up_with(dev: MmioDevice, queues: usize) -> Result<Dev, &'static str> {
        let mut rings = [0; QUEUES];
        for r in &mut rings {
            *r = pool::alloc(0x1000, 0x1000)
                .ok_or("DMA pool exhausted")?
                .as_ptr() as u64;
        }
        let d = Dev {
            base: dev.base,
            rings,
        };
        if d.reg(VERSION) != 2 {
            return Err("not a virtio-mmio version 2 device");
        }
        d.set(STATUS, 0);
        d.set(STATUS, ACKNOWLEDGE);
        d.set(STATUS, ACKNOWLEDGE | DRIVER);
        d.set(DEVICE_FEATURES_SEL, 1);
        if d.reg(DEVICE_FEATURES) & VERSION_1_WORD1 == 0 {
            d.set(STATUS, ACKNOWLEDGE | DRIVER | FAILED);
            return Err("device does not offer VERSION_1");
        }
        d.set(DRIVER_FEATURES_SEL, 0);
        d.set(DRIVER_FEATURES, 0);
        d.set(DRIVER_FEATURES_SEL, 1);
        d.set(DRIVER_FEATURES, VERSION_1_WORD1);
        d.set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if d.reg(STATUS) & FEATURES_OK == 0 {
            return Err("device refused FEATURES_OK");
        }
        for (i, &ring) in d.rings.iter().enumerate().take(queues) {
            d.set(QUEUE_SEL, i as u32);
            if d.reg(QUEUE_READY) != 0 {
                return Err("queue already ready");
            }
            if d.reg(QUEUE_NUM_MAX) < u32::from(QSIZE) {
                return Err("queue too small");
            }
            d.set(QUEUE_NUM, u32::from(QSIZE));
            w16(ring + AVAIL, VRING_AVAIL_F_NO_INTERRUPT);
            for (reg, addr) in [
                (QUEUE_DESC, ring + DESC),
                (QUEUE_DRIVER, ring + AVAIL),
                (QUEUE_DEVICE, ring + USED),
            ] {
                d.set(reg, addr as u32);
                d.set(reg + 4, (addr >> 32) as u32);
            }
            d.set(QUEUE_READY, 1);
        }
        d.set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        if d.reg(STATUS) != ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK {
            return Err("device status not DRIVER_OK after initialisation");
        }
        Ok(d)
    }

    /// Publishes avail index `idx` on queue `q` and notifies it.
    fn kick(&self, q: usize, idx: u16) {
        // The ring entries and descriptors before the index (virtio 1.2,
        // 2.7.13), the index before the notification.
        fence(Ordering::SeqCst);
        w16(self.rings[q] + AVAIL + 2, idx);
        fence(Ordering::SeqCst);
        self.set(QUEUE_NOTIFY, q as u32);
    }

    /// Polls Status for DEVICE_NEEDS_RESET for up to `FAIL_MS`, and then
    /// InterruptStatus for the configuration-change bit within the same
    /// time (the device sets the status bit first and then notifies, as
    /// the specification orders); then resets the device. Returns the
    /// outcome to report.
    fn await_failure_and_reset(&self) -> Failure {
        let wait = Deadline::after_ms(FAIL_MS);
        let mut status = self.reg(STATUS);
        while status & DEVICE_NEEDS_RESET == 0 && !wait.expired() {
            core::hint::spin_loop();
            status = self.reg(STATUS);
        }
        let us = wait.elapsed_ns() / 1000;
        let mut int_status = self.reg(INTERRUPT_STATUS);
        while status & DEVICE_NEEDS_RESET != 0 && int_status & INT_CONFIG == 0 && !wait.expired() {
            core::hint::spin_loop();
            int_status = self.reg(INTERRUPT_STATUS);
        }
        self.set(STATUS, 0);
        Failure {
            needs_reset: status & DEVICE_NEEDS_RESET != 0,
            status,
            int_status,
            us,
            after_reset: self.reg(STATUS),
        }
    }
}

/// What a ring step saw.
struct Failure {
    needs_reset: bool,
    /// Status when DEVICE_NEEDS_RESET showed (or at the timeout).
    status: u32,
    /// InterruptStatus once it showed a configuration change (bit 1), or
    /// at the timeout.
    int_status: u32,
    /// Microseconds from the kick to DEVICE_NEEDS_RESET (or the timeout).
    us: u64,
    /// Status read back after writing 0.
    after_reset: u32,
}

/// Writes a 16-bit value to ring memory.
fn w16(addr: u64, v: u16) {
    // `addr` is an even offset inside a page the pool handed to
    // one `Dev` (ring memory only the device and this module use);
    // volatile because the device reads it.
    // SAFETY: sound for the reasons just given.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) };
}

/// Writes descriptor `i` of the queue whose page is `ring`.
fn desc(ring: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let at = ring + DESC + 16 * i;
    // Descriptor `i` < QSIZE lies in the first 0x80 bytes of the
    // queue's pool page, 16-byte aligned, in memory only the device and
    // this module use; volatile because the device reads it.
    // SAFETY: sound for the reasons just given.
    unsafe { core::ptr::write_volatile(at as *mut u64, addr) };
    // SAFETY: as above (8 bytes further, 4-aligned).
    unsafe { core::ptr::write_volatile((at + 8) as *mut u32, len) };
    w16(at + 12, flags);
    w16(at + 14, next);
}

/// The `index`-th device with device id `id` on the command line, up.
fn find_up(cmdline: &str, id: u32, index: u32) -> Result<Dev, &'static str> {
    let dev = find(cmdline, id, index)?;
    Dev::up(dev)
}

fn find(cmdline: &str, id: u32, index: u32) -> Result<MmioDevice, &'static str> {
    mmio::devices(cmdline)
        .filter(|d| d.device_id() == id)
        .nth(index as usize)
        .ok_or("no virtio-mmio device with that id and index on the command line")
}

fn report(step: &str, id: u32, outcome: Result<Failure, &'static str>) {
    match outcome {
        Ok(f) => serial::line(format_args!(
            r#"{{"probe":"{}","device":{},"needs_reset":{},"after_reset":{},"status":{},"int_status":{},"us":{}}}"#,
            step, id, f.needs_reset, f.after_reset, f.status, f.int_status, f.us
        )),
        Err(e) => serial::line(format_args!(
            r#"{{"probe":"{}","device":{}{}}}"#,
            step,
            id,
            ErrorField(Some(e))
        )),
    }
}

/// `hostile-ring:ID[:INDEX]`: queue 1's avail index set 1000 ahead of the
/// device (its ring holds 8), then a kick.
fn ring(cmdline: &str, id: u32, index: u32) {
    let outcome = find_up(cmdline, id, index).map(|d| {
        d.kick(1, 1000);
        d.await_failure_and_reset()
    });
    report("hostile-ring", id, outcome);
}

/// `hostile-repost:ID[:INDEX]`: one FUSE GETATTR chain (heads 0 -> 1) made
/// available 8 times at once on queue 1: the device may hold a head only
/// once.
fn repost(cmdline: &str, id: u32, index: u32) {
    let outcome = find_up(cmdline, id, index).and_then(|d| {
        let req = pool::bytes(40).ok_or("DMA pool exhausted")?;
        let reply = pool::bytes(4096).ok_or("DMA pool exhausted")?;
        // fuse_in_header: len 40, opcode 3 (GETATTR), unique 1, nodeid 1.
        req[0..4].copy_from_slice(&40u32.to_le_bytes());
        req[4..8].copy_from_slice(&3u32.to_le_bytes());
        req[8..16].copy_from_slice(&1u64.to_le_bytes());
        req[16..24].copy_from_slice(&1u64.to_le_bytes());
        let ring = d.rings[1];
        desc(ring, 0, req.as_ptr() as u64, 40, VIRTQ_DESC_F_NEXT, 1);
        desc(
            ring,
            1,
            reply.as_ptr() as u64,
            reply.len() as u32,
            VIRTQ_DESC_F_WRITE,
            0,
        );
        for slot in 0..u64::from(QSIZE) {
            w16(ring + AVAIL + 4 + 2 * slot, 0);
        }
        d.kick(1, QSIZE);
        Ok(d.await_failure_and_reset())
    });
    report("hostile-repost", id, outcome);
}

/// Reads a 32-bit value the device wrote to ring memory.
fn r32(addr: u64) -> u32 {
    // `addr` is a 4-aligned offset inside a page the pool handed
    // to one `Dev`; volatile because the device writes it.
    // SAFETY: sound for the reasons just given.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// virtio-blk request types and the device id.
const BLK_ID: u32 = 2;
const BLK_IN: u32 = 0;
const BLK_OUT: u32 = 1;
/// A guest-physical address far past any test guest's RAM.
const NOWHERE: u64 = 1 << 40;

/// `hostile-blk[:INDEX]`: requests a driver must not send, each as one
/// chain on an 8-entry queue, then a good read: a header of 8 bytes, a
/// read of 100 bytes, a read far past the end, request type 77, a read
/// into memory that is not there, a write whose status descriptor is
/// device-readable, a read of sector 0. Prints the status byte each left
/// (255: untouched) and each used length, and whether the device failed.
fn blk(cmdline: &str, index: u32) {
    let outcome = find(cmdline, BLK_ID, index)
        .and_then(|dev| Dev::up_with(dev, 1))
        .and_then(|d| {
            let nomem = "DMA pool exhausted";
            let hdr = pool::bytes(16).ok_or(nomem)?;
            let data = pool::bytes(512).ok_or(nomem)?;
            let st = pool::bytes(1).ok_or(nomem)?;
            let (h, dp, sp) = (
                hdr.as_ptr() as u64,
                data.as_ptr() as u64,
                st.as_ptr() as u64,
            );
            const R: u16 = 0;
            const W: u16 = VIRTQ_DESC_F_WRITE;
            // Type, sector, descriptors (address, length, flags).
            type Case<'a> = (u32, u64, &'a [(u64, u32, u16)]);
            let cases: [Case<'_>; 7] = [
                (BLK_IN, 0, &[(h, 8, R), (sp, 1, W)]),
                (BLK_IN, 0, &[(h, 16, R), (dp, 100, W), (sp, 1, W)]),
                (
                    BLK_IN,
                    u64::MAX / 2,
                    &[(h, 16, R), (dp, 512, W), (sp, 1, W)],
                ),
                (77, 0, &[(h, 16, R), (sp, 1, W)]),
                (BLK_IN, 0, &[(h, 16, R), (NOWHERE, 512, W), (sp, 1, W)]),
                (BLK_OUT, 0, &[(h, 16, R), (dp, 512, R), (sp, 1, R)]),
                (BLK_IN, 0, &[(h, 16, R), (dp, 512, W), (sp, 1, W)]),
            ];
            let ring = d.rings[0];
            let mut status = [0u8; 7];
            let mut used = [0u32; 7];
            for (i, (kind, sector, descs)) in cases.iter().enumerate() {
                hdr[0..4].copy_from_slice(&kind.to_le_bytes());
                hdr[4..8].fill(0);
                hdr[8..16].copy_from_slice(&sector.to_le_bytes());
                st[0] = 0xff;
                for (j, &(addr, len, flags)) in descs.iter().enumerate() {
                    let more = j + 1 < descs.len();
                    let flags = if more {
                        flags | VIRTQ_DESC_F_NEXT
                    } else {
                        flags
                    };
                    desc(ring, j as u64, addr, len, flags, j as u16 + 1);
                }
                let slot = i as u64 % u64::from(QSIZE);
                w16(ring + AVAIL + 4 + 2 * slot, 0);
                let idx = i as u16 + 1;
                d.kick(0, idx);
                let wait = Deadline::after_ms(FAIL_MS);
                while r32(ring + USED) >> 16 != u32::from(idx) {
                    if wait.expired() {
                        d.set(STATUS, 0);
                        return Err("a request was not answered within 1 s");
                    }
                    core::hint::spin_loop();
                }
                fence(Ordering::SeqCst);
                status[i] = st[0];
                used[i] = r32(ring + USED + 4 + 8 * slot + 4);
            }
            let needs_reset = d.reg(STATUS) & DEVICE_NEEDS_RESET != 0;
            d.set(STATUS, 0);
            Ok((status, used, needs_reset))
        });
    match outcome {
        Ok((s, u, needs_reset)) => serial::line(format_args!(
            r#"{{"probe":"hostile-blk","status":[{},{},{},{},{},{},{}],"used":[{},{},{},{},{},{},{}],"needs_reset":{}}}"#,
            s[0],
            s[1],
            s[2],
            s[3],
            s[4],
            s[5],
            s[6],
            u[0],
            u[1],
            u[2],
            u[3],
            u[4],
            u[5],
            u[6],
            needs_reset
        )),
        Err(e) => serial::line(format_args!(
            r#"{{"probe":"hostile-blk"{}}}"#,
            ErrorField(Some(e))
        )),
    }
}

/// `hostile-console:BYTES`: BYTES times `x` with no newline, then one.
fn console(bytes: u64) {
    let t0 = hw::rdtsc();
    serial::repeat_line(b'x', bytes);
    let ns = time::ns(hw::rdtsc().wrapping_sub(t0));
    serial::line(format_args!(
        r#"{{"probe":"hostile-console","bytes":{},"ns":{}}}"#,
        bytes, ns
    ));
}

/// `hostile-status:ID:N[:INDEX]`: resets the device, writes DRIVER_OK
/// alone N times (each refused: the bits before it are missing), reads
/// Status, resets it again.
fn status(cmdline: &str, id: u32, writes: u64, index: u32) {
    let dev = match find(cmdline, id, index) {
        Ok(d) => d,
        Err(e) => {
            return serial::line(format_args!(
                r#"{{"probe":"hostile-status","device":{}{}}}"#,
                id,
                ErrorField(Some(e))
            ));
        }
    };
    let reg = dev.base + STATUS;
    let t0 = hw::rdtsc();
    hw::mmio_write_u32(reg, 0);
    for _ in 0..writes {
        hw::mmio_write_u32(reg, DRIVER_OK);
    }
    let status = hw::mmio_read_u32(reg);
    hw::mmio_write_u32(reg, 0);
    let ns = time::ns(hw::rdtsc().wrapping_sub(t0));
    serial::line(format_args!(
        r#"{{"probe":"hostile-status","device":{},"writes":{},"status":{},"ns":{}}}"#,
        id, writes, status, ns
    ));
}

/// EtherType of spoofed frames (IEEE local experimental, as `burst`).
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Spoofed frames carry this after the EtherType.
const MAGIC: &[u8; 4] = b"vmph";
/// Gap between spoofed frames.
const SPOOF_GAP_US: u64 = 100;

/// `hostile-spoof:MAC:SECONDS`: 60-byte broadcast frames whose source is
/// MAC, about one every 100 µs, each kicked at once, for SECONDS.
fn spoof(net: &mut net::Ctx<'_>, mac: [u8; 6], secs: u64) {
    let Some(stack) = net.stack() else {
        serial::line(format_args!(
            r#"{{"probe":"hostile-spoof","error":"no interface (run net:IP/PREFIX first)"}}"#
        ));
        return;
    };
    let gap = clock::ticks_ms(1) * SPOOF_GAP_US / 1000;
    let end = Deadline::after_ms(secs * 1000);
    let t0 = hw::rdtsc();
    let mut sent = 0u64;
    let mut error = None;
    while !end.expired() {
        let ok = stack.dev.send_with(60, |f| {
            f[0..6].fill(0xff);
            f[6..12].copy_from_slice(&mac);
            f[12..14].copy_from_slice(&ETHERTYPE);
            f[14..18].copy_from_slice(MAGIC);
            f[18..22].copy_from_slice(&(sent as u32).to_be_bytes());
            f[22..].fill(0);
        });
        stack.dev.flush_tx();
        if !ok {
            error = Some("no transmit buffer came free in 1 s");
            break;
        }
        sent += 1;
        // Frames arriving meanwhile are dropped, not left in the ring.
        let next = t0.wrapping_add(sent.saturating_mul(gap));
        loop {
            while stack.dev.recv_with(|_| ()).is_some() {}
            if hw::rdtsc().wrapping_sub(t0) >= next.wrapping_sub(t0) || end.expired() {
                break;
            }
            core::hint::spin_loop();
        }
    }
    serial::line(format_args!(
        r#"{{"probe":"hostile-spoof","as":"{}","sent":{},"ns":{}{}}}"#,
        Mac(mac),
        sent,
        time::ns(hw::rdtsc().wrapping_sub(t0)),
        ErrorField(error)
    ));
}
