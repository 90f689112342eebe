//! File system steps: a minimal FUSE client over a virtio-fs device
//! (virtio-mmio, found on the kernel command line like the network
//! devices). virtio-drivers has no virtio-fs driver, so this is one.
//!
//! - `queue`: a split virtqueue for one request at a time, polled;
//! - `dev`: device discovery and initialisation, FUSE_INIT, requests;
//! - `fuse`: FUSE 7.31 opcodes and layouts;
//! - `ops`: list, read, write.
//!
//! Reused from the network steps: `virtio_mmio.device=` parsing, the DMA
//! pool, CRC-32 and the byte pattern, TSC time.

mod dev;
mod fuse;
mod ops;
mod queue;

use crate::net::pool;
use crate::net::time::Mbps;
use crate::serial::{self, Json};
use dev::{FsDev, FsError};

/// One parsed file system step.
#[derive(Clone, Copy)]
pub enum Cmd<'a> {
    Ls(&'a str),
    Read(&'a str),
    Write(&'a str, u64),
}

/// Parses file system step `name`: `None` if it is not one, `Err(arg)`
/// for a bad or missing argument.
pub fn parse<'a>(
    name: &str,
    args: &mut impl Iterator<Item = &'a str>,
) -> Option<Result<Cmd<'a>, &'a str>> {
    let path = |a: Option<&'a str>| a.filter(|p| p.starts_with('/')).ok_or(a.unwrap_or(""));
    Some(match name {
        "fs-ls" => path(args.next()).map(Cmd::Ls),
        "fs-read" => path(args.next()).map(Cmd::Read),
        "fs-write" => path(args.next()).and_then(|p| {
            let a = args.next().unwrap_or("");
            a.parse().map(|n| Cmd::Write(p, n)).map_err(|_| a)
        }),
        _ => return None,
    })
}

/// State the file system steps share: the device once the first step
/// brought it up (or why it did not come up), and buffers.
pub struct Ctx<'a> {
    cmdline: &'a str,
    dev: Option<Result<&'static mut FsDev, FsError>>,
    /// Names of a listing, NUL-separated; also the write step's chunk.
    scratch: Option<&'static mut [u8]>,
}

/// Room for a listing's names.
const NAMES: usize = 64 * 1024;

impl<'a> Ctx<'a> {
    pub fn new(cmdline: &'a str) -> Self {
        Ctx {
            cmdline,
            dev: None,
            scratch: None,
        }
    }

    /// Runs one file system step.
    pub fn exec(&mut self, cmd: Cmd<'_>) {
        let (step, path) = match cmd {
            Cmd::Ls(p) => ("fs-ls", p),
            Cmd::Read(p) => ("fs-read", p),
            Cmd::Write(p, _) => ("fs-write", p),
        };
        let fail = |e: FsError| {
            serial::line(format_args!(
                r#"{{"probe":"{}","path":"{}","error":"{}"}}"#,
                step,
                Json(path),
                e
            ))
        };
        if self.dev.is_none() {
            self.dev = Some(up(self.cmdline));
        }
        let fs = match &mut self.dev {
            Some(Ok(fs)) => &mut **fs,
            Some(Err(e)) => return fail(*e),
            None => return,
        };
        if self.scratch.is_none() {
            self.scratch = pool::bytes(NAMES.max(dev::CHUNK));
        }
        let Some(scratch) = self.scratch.as_deref_mut() else {
            return fail(FsError::Msg("DMA pool exhausted"));
        };
        match cmd {
            Cmd::Ls(path) => match ops::list(fs, path, scratch) {
                Ok((used, count)) => serial::line(format_args!(
                    r#"{{"probe":"fs-ls","path":"{}","entries":[{}],"count":{}}}"#,
                    Json(path),
                    Names(&scratch[..used]),
                    count
                )),
                Err(e) => fail(e),
            },
            Cmd::Read(path) => match ops::read(fs, path) {
                Ok(r) => serial::line(format_args!(
                    r#"{{"probe":"fs-read","path":"{}","bytes":{},"crc32":"{:08x}","ns":{},"mbit_s":{}}}"#,
                    Json(path),
                    r.bytes,
                    r.crc,
                    r.ns,
                    Mbps(r.bytes, r.ns)
                )),
                Err(e) => fail(e),
            },
            Cmd::Write(path, len) => match ops::write(fs, path, len, scratch) {
                Ok((crc, ns)) => serial::line(format_args!(
                    r#"{{"probe":"fs-write","path":"{}","bytes":{},"crc32":"{:08x}","ns":{},"mbit_s":{}}}"#,
                    Json(path),
                    len,
                    crc,
                    ns,
                    Mbps(len, ns)
                )),
                Err(e) => fail(e),
            },
        }
    }
}

/// Brings the device up and reports it in an `fs` line.
fn up(cmdline: &str) -> Result<&'static mut FsDev, FsError> {
    let fs = FsDev::up(cmdline)?;
    let fs = pool::place(fs).ok_or(FsError::Msg("DMA pool exhausted"))?;
    serial::line(format_args!(
        r#"{{"probe":"fs","tag":"{}","base":"{:#x}","irq":{},"max_write":{}}}"#,
        Json(fs.tag()),
        fs.base,
        fs.irq,
        fs.max_write
    ));
    Ok(fs)
}

/// Displays NUL-terminated names as JSON strings separated by commas.
struct Names<'a>(&'a [u8]);

impl core::fmt::Display for Names<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for name in self.0.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            let s = core::str::from_utf8(name).unwrap_or("(not UTF-8)");
            write!(f, r#""{}""#, Json(s))?;
        }
        Ok(())
    }
}
