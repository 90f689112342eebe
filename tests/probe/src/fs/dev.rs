//! The virtio-fs device (virtio-mmio version 2, device id 26): found on
//! the command line like the network devices, initialised with the status
//! bits written one at a time in Linux's order, VERSION_1 only, both
//! queues set up (0 = hiprio, unused; 1 = requests), polled. Then one
//! FUSE request at a time on the request queue.

use super::fuse::{self, Errno};
use super::queue::{Queue, QueueError, SIZE};
use crate::hw;
use crate::net::mmio::reg::*;
use crate::net::mmio::{self, MmioDevice};
use crate::net::pool;

/// Virtio device id of a file system device.
pub const DEVICE_FS: u32 = 26;
/// Largest READ or WRITE payload the probe asks for.
pub const CHUNK: usize = 64 * 1024;
/// Room for headers and names besides a chunk.
const SLACK: usize = 4096;
/// How long one request may take.
const REQUEST_MS: u64 = 5000;

/// Why a request failed.
#[derive(Clone, Copy)]
pub enum FsError {
    /// The server's answer: a FUSE errno.
    Errno(i32),
    /// Something on the probe's side or the device's, with a message.
    Msg(&'static str),
}

impl core::fmt::Display for FsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FsError::Errno(e) => write!(f, "{}", Errno(*e)),
            FsError::Msg(m) => f.write_str(m),
        }
    }
}

/// A started virtio-fs device.
pub struct FsDev {
    pub base: u64,
    pub irq: u32,
    pub tag: [u8; 36],
    /// The server's max_write from FUSE_INIT.
    pub max_write: u32,
    hiprio: Queue,
    req: Queue,
    /// Request bytes: fuse_in_header + body.
    inbuf: &'static mut [u8],
    /// Reply bytes: fuse_out_header + body.
    outbuf: &'static mut [u8],
    unique: u64,
    /// A request timed out: the device may still own the buffers.
    broken: bool,
}

impl FsDev {
    /// Finds the first virtio-fs device on `cmdline` and brings it up,
    /// then sends FUSE_INIT.
    pub fn up(cmdline: &str) -> Result<Self, FsError> {
        let dev = mmio::devices(cmdline)
            .find(|d| d.device_id() == DEVICE_FS)
            .ok_or(FsError::Msg(
                "no virtio-fs device (id 26) on the command line",
            ))?;
        let mut fs = Self::init(dev)?;
        fs.fuse_init()?;
        Ok(fs)
    }

    fn reg(&self, off: u64) -> u32 {
        hw::mmio_read_u32(self.base + off)
    }

    fn set(&self, off: u64, v: u32) {
        hw::mmio_write_u32(self.base + off, v)
    }

    fn init(dev: MmioDevice) -> Result<Self, FsError> {
        let nomem = FsError::Msg("DMA pool exhausted");
        let mut fs = FsDev {
            base: dev.base,
            irq: dev.irq,
            tag: [0; 36],
            max_write: CHUNK as u32,
            hiprio: Queue::new().ok_or(nomem)?,
            req: Queue::new().ok_or(nomem)?,
            inbuf: pool::bytes(CHUNK + SLACK).ok_or(nomem)?,
            outbuf: pool::bytes(CHUNK + SLACK).ok_or(nomem)?,
            unique: 0,
            broken: false,
        };
        if fs.reg(VERSION) != 2 {
            return Err(FsError::Msg("not a virtio-mmio version 2 device"));
        }
        // Reset, then ACKNOWLEDGE, DRIVER, one write each (as Linux).
        fs.set(STATUS, 0);
        fs.set(STATUS, ACKNOWLEDGE);
        fs.set(STATUS, ACKNOWLEDGE | DRIVER);
        fs.set(DEVICE_FEATURES_SEL, 1);
        if fs.reg(DEVICE_FEATURES) & VERSION_1_WORD1 == 0 {
            fs.set(STATUS, ACKNOWLEDGE | DRIVER | FAILED);
            return Err(FsError::Msg("device does not offer VERSION_1"));
        }
        fs.set(DRIVER_FEATURES_SEL, 0);
        fs.set(DRIVER_FEATURES, 0);
        fs.set(DRIVER_FEATURES_SEL, 1);
        fs.set(DRIVER_FEATURES, VERSION_1_WORD1);
        fs.set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if fs.reg(STATUS) & FEATURES_OK == 0 {
            return Err(FsError::Msg("device refused FEATURES_OK"));
        }
        for (i, b) in fs.tag.iter_mut().enumerate() {
            *b = hw::read_u8(dev.base + CONFIG + i as u64);
        }
        // The hiprio ring is set up (as Linux does) and never used.
        fs.queue(0, &fs.hiprio)?;
        fs.queue(1, &fs.req)?;
        fs.set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let status = fs.reg(STATUS);
        if status & (DEVICE_NEEDS_RESET | FAILED) != 0 || status & DRIVER_OK == 0 {
            return Err(FsError::Msg(
                "device status not DRIVER_OK after initialisation",
            ));
        }
        Ok(fs)
    }

    fn queue(&self, index: u32, q: &Queue) -> Result<(), FsError> {
        self.set(QUEUE_SEL, index);
        if self.reg(QUEUE_READY) != 0 {
            return Err(FsError::Msg("queue already ready"));
        }
        if self.reg(QUEUE_NUM_MAX) < u32::from(SIZE) {
            return Err(FsError::Msg("queue too small"));
        }
        self.set(QUEUE_NUM, u32::from(SIZE));
        let (desc, driver, device) = q.areas();
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, driver),
            (QUEUE_DEVICE, device),
        ] {
            self.set(reg, addr as u32);
            self.set(reg + 4, (addr >> 32) as u32);
        }
        self.set(QUEUE_READY, 1);
        Ok(())
    }

    /// The tag from config space, up to its first NUL.
    pub fn tag(&self) -> &str {
        let n = self.tag.iter().position(|b| *b == 0).unwrap_or(36);
        core::str::from_utf8(&self.tag[..n]).unwrap_or("?")
    }

    /// Sends one request: `opcode` on `nodeid`, its body the concatenation
    /// of `parts`; returns the reply body (after the out header).
    pub fn request(&mut self, opcode: u32, nodeid: u64, parts: &[&[u8]]) -> Result<&[u8], FsError> {
        self.request_limited(opcode, nodeid, parts, usize::MAX)
    }

    /// Like [`Self::request`], but the reply buffer offered to the device
    /// holds at most `body_max` bytes of body, as Linux does for READ (a
    /// server such as virtiofsd fills whatever buffer it is given).
    pub fn request_limited(
        &mut self,
        opcode: u32,
        nodeid: u64,
        parts: &[&[u8]],
        body_max: usize,
    ) -> Result<&[u8], FsError> {
        if self.broken {
            return Err(FsError::Msg("device stopped answering earlier"));
        }
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let len = fuse::IN_HEADER + body;
        if len > self.inbuf.len() {
            return Err(FsError::Msg("request too big"));
        }
        self.unique += 1;
        let unique = self.unique;
        fuse::in_header(
            &mut self.inbuf[..fuse::IN_HEADER],
            len as u32,
            opcode,
            unique,
            nodeid,
        );
        let mut at = fuse::IN_HEADER;
        for p in parts {
            self.inbuf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        self.outbuf[..fuse::OUT_HEADER].fill(0);
        let base = self.base;
        let out_len = self
            .outbuf
            .len()
            .min(fuse::OUT_HEADER.saturating_add(body_max));
        let written = match self.req.transact(
            &self.inbuf[..len],
            &mut self.outbuf[..out_len],
            || hw::mmio_write_u32(base + QUEUE_NOTIFY, 1),
            REQUEST_MS,
        ) {
            Ok(n) => n as usize,
            Err(QueueError::Timeout) => {
                self.broken = true;
                return Err(FsError::Msg("request timed out (5 s)"));
            }
            Err(QueueError::BadUsed) => {
                self.broken = true;
                return Err(FsError::Msg("device returned an unknown descriptor"));
            }
        };
        if written < fuse::OUT_HEADER {
            return Err(FsError::Msg("reply shorter than fuse_out_header"));
        }
        let (olen, error, ounique) = fuse::out_header(&self.outbuf[..fuse::OUT_HEADER]);
        if ounique != unique {
            return Err(FsError::Msg("reply for another request"));
        }
        if error != 0 {
            return Err(FsError::Errno(-error));
        }
        let olen = (olen as usize).min(written);
        if olen < fuse::OUT_HEADER {
            return Err(FsError::Msg("reply length below fuse_out_header"));
        }
        Ok(&self.outbuf[fuse::OUT_HEADER..olen])
    }

    fn fuse_init(&mut self) -> Result<(), FsError> {
        let mut body = [0u8; 16];
        body[0..4].copy_from_slice(&7u32.to_le_bytes());
        body[4..8].copy_from_slice(&31u32.to_le_bytes());
        body[8..12].copy_from_slice(&(CHUNK as u32).to_le_bytes()); // max_readahead
        body[12..16].copy_from_slice(&fuse::FUSE_BIG_WRITES.to_le_bytes());
        let reply = self.request(fuse::INIT, 0, &[&body])?;
        if reply.len() < 24 {
            return Err(FsError::Msg("FUSE_INIT reply too short"));
        }
        let major = fuse::u32_at(reply, 0);
        if major != 7 {
            return Err(FsError::Msg("FUSE major version is not 7"));
        }
        let max_write = fuse::u32_at(reply, 20);
        self.max_write = max_write.clamp(4096, CHUNK as u32);
        Ok(())
    }
}
