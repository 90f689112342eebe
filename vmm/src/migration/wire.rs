//! The migration stream, source to destination:
//!
//! ```text
//! hello   "VMPLMIGR", version (u32), regions (u32), then per region
//!         its guest-physical start and length (u64 each)
//! pages   1, guest-physical address (u64), pages (u32), the pages' bytes
//! zeros   2, guest-physical address (u64), pages (u32)
//! state   3, length (u64), the VM's state as a snapshot's state file
//!         holds it (magic, version, checksum around the body)
//! ```
//!
//! then a handshake of JSON lines: the destination's `{"ready":true}` once
//! it has built the VM (paused) or `{"error":"..."}`; the source's
//! `{"go":true,"run":BOOL}` once it has let the VM go (paused for good);
//! the destination's `{"running":true}` once the VM is its own. All
//! integers are little-endian. Every length is bounded before anything is allocated
//! for it, and every page range is checked against guest memory by the
//! receiver.

use super::MigrationError;
use std::io::{Read, Write};

pub const MAGIC: [u8; 8] = *b"VMPLMIGR";
pub const VERSION: u32 = 1;
pub const PAGE: u64 = 4096;
/// The bytes of a `pages` or `zeros` message before its pages.
pub const RUN_HEADER: u64 = 1 + 8 + 4;
/// Most pages in one `pages` or `zeros` message (1 MiB).
pub const MAX_RUN: u32 = 256;
/// Most memory regions a hello names.
const MAX_REGIONS: u32 = 16;
/// Longest state message: the state file's largest body and its framing.
const MAX_STATE: u64 = crate::snapshot::file::MAX_BODY + 64;
/// Longest reply line.
const MAX_REPLY: u64 = 4096;

const TAG_PAGES: u8 = 1;
const TAG_ZEROS: u8 = 2;
const TAG_STATE: u8 = 3;

/// A message after the hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Pages { gpa: u64, pages: u32 },
    Zeros { gpa: u64, pages: u32 },
    State { len: u64 },
}

pub fn write_hello(w: &mut impl Write, layout: &[(u64, u64)]) -> std::io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&(layout.len() as u32).to_le_bytes())?;
    for &(start, len) in layout {
        w.write_all(&start.to_le_bytes())?;
        w.write_all(&len.to_le_bytes())?;
    }
    Ok(())
}

pub fn read_hello(r: &mut impl Read) -> Result<Vec<(u64, u64)>, MigrationError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(MigrationError::Receive)?;
    if magic != MAGIC {
        return Err(MigrationError::Protocol(
            "not a vmplant migration stream".into(),
        ));
    }
    let version = read_u32(r)?;
    if version != VERSION {
        return Err(MigrationError::Protocol(format!(
            "migration stream version {version}; this vmplant speaks {VERSION}"
        )));
    }
    let n = read_u32(r)?;
    if n == 0 || n > MAX_REGIONS {
        return Err(MigrationError::Protocol(format!(
            "{n} memory regions (1 to {MAX_REGIONS})"
        )));
    }
    (0..n).map(|_| Ok((read_u64(r)?, read_u64(r)?))).collect()
}

pub fn write_pages(w: &mut impl Write, gpa: u64, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&[TAG_PAGES])?;
    w.write_all(&gpa.to_le_bytes())?;
    w.write_all(&((bytes.len() as u64 / PAGE) as u32).to_le_bytes())?;
    w.write_all(bytes)
}

pub fn write_zeros(w: &mut impl Write, gpa: u64, pages: u32) -> std::io::Result<()> {
    w.write_all(&[TAG_ZEROS])?;
    w.write_all(&gpa.to_le_bytes())?;
    w.write_all(&pages.to_le_bytes())
}

pub fn write_state(w: &mut impl Write, state: &[u8]) -> std::io::Result<()> {
    w.write_all(&[TAG_STATE])?;
    w.write_all(&(state.len() as u64).to_le_bytes())?;
    w.write_all(state)
}

/// The next message's header; its payload (pages, state) follows.
pub fn read_header(r: &mut impl Read) -> Result<Header, MigrationError> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).map_err(MigrationError::Receive)?;
    let run = |r: &mut dyn Read| -> Result<(u64, u32), MigrationError> {
        let gpa = read_u64(r)?;
        let pages = read_u32(r)?;
        if pages == 0 || pages > MAX_RUN || gpa % PAGE != 0 {
            return Err(MigrationError::Protocol(format!(
                "a run of {pages} pages at {gpa:#x} (1 to {MAX_RUN} whole pages)"
            )));
        }
        Ok((gpa, pages))
    };
    Ok(match tag[0] {
        TAG_PAGES => {
            let (gpa, pages) = run(r)?;
            Header::Pages { gpa, pages }
        }
        TAG_ZEROS => {
            let (gpa, pages) = run(r)?;
            Header::Zeros { gpa, pages }
        }
        TAG_STATE => {
            let len = read_u64(r)?;
            if len > MAX_STATE {
                return Err(MigrationError::Protocol(format!(
                    "a state of {len} bytes (at most {MAX_STATE})"
                )));
            }
            Header::State { len }
        }
        t => return Err(MigrationError::Protocol(format!("unknown message {t}"))),
    })
}

/// Writes one line of the handshake after the state (see the module
/// docs).
pub fn write_line(w: &mut impl Write, line: &serde_json::Value) -> std::io::Result<()> {
    writeln!(w, "{line}")?;
    w.flush()
}

/// Reads one line of the handshake, a byte at a time (nothing after it is
/// taken from the stream).
pub fn read_line(r: &mut impl Read) -> std::io::Result<serde_json::Value> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_REPLY as usize {
        if r.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the other end closed the connection",
            ));
        }
        if byte[0] == b'\n' {
            return serde_json::from_slice(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
        line.push(byte[0]);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "a handshake line longer than 4 KiB",
    ))
}

/// Reads the destination's answer, `{"WHAT":true}` or `{"error":".."}`.
pub fn expect(r: &mut impl Read, what: &str) -> Result<(), MigrationError> {
    let v = read_line(r).map_err(MigrationError::Confirm)?;
    if v[what] == true {
        return Ok(());
    }
    match v["error"].as_str() {
        Some(why) => Err(MigrationError::Refused(why.to_string())),
        None => Err(MigrationError::Protocol(format!(
            "the destination answered {v} instead of {what}"
        ))),
    }
}

fn read_u32(r: &mut (impl Read + ?Sized)) -> Result<u32, MigrationError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(MigrationError::Receive)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut (impl Read + ?Sized)) -> Result<u64, MigrationError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(MigrationError::Receive)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written() {
        let mut buf = Vec::new();
        write_hello(&mut buf, &[(0, 1 << 20)]).unwrap();
        write_pages(&mut buf, 0x2000, &[7u8; 8192]).unwrap();
        write_zeros(&mut buf, 0x5000, 3).unwrap();
        write_state(&mut buf, b"abc").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_hello(&mut r).unwrap(), vec![(0, 1 << 20)]);
        assert_eq!(
            read_header(&mut r).unwrap(),
            Header::Pages {
                gpa: 0x2000,
                pages: 2
            }
        );
        r = &r[8192..];
        assert_eq!(
            read_header(&mut r).unwrap(),
            Header::Zeros {
                gpa: 0x5000,
                pages: 3
            }
        );
        assert_eq!(read_header(&mut r).unwrap(), Header::State { len: 3 });
    }

    #[test]
    fn bad_streams_are_refused_with_the_reason() {
        let bad = |bytes: &[u8]| read_hello(&mut &bytes[..]).unwrap_err().to_string();
        assert!(bad(b"GARBAGE!\x01\0\0\0").contains("not a vmplant migration stream"));
        let mut v2 = MAGIC.to_vec();
        v2.extend(2u32.to_le_bytes());
        assert!(bad(&v2).contains("version 2"));
        let mut many = MAGIC.to_vec();
        many.extend(VERSION.to_le_bytes());
        many.extend(1000u32.to_le_bytes());
        assert!(bad(&many).contains("1000 memory regions"));
        assert!(bad(&MAGIC[..4]).contains("stream"), "{}", bad(&MAGIC[..4]));

        let header = |bytes: &[u8]| read_header(&mut &bytes[..]).unwrap_err().to_string();
        let mut huge = vec![TAG_PAGES];
        huge.extend(0u64.to_le_bytes());
        huge.extend(100_000u32.to_le_bytes());
        assert!(header(&huge).contains("100000 pages"));
        let mut odd = vec![TAG_ZEROS];
        odd.extend(0x123u64.to_le_bytes());
        odd.extend(1u32.to_le_bytes());
        assert!(header(&odd).contains("0x123"));
        let mut state = vec![TAG_STATE];
        state.extend(u64::MAX.to_le_bytes());
        assert!(header(&state).contains("state of"));
        assert!(header(&[9]).contains("unknown message 9"));
    }

    #[test]
    fn the_handshake_says_ready_running_or_why_not() {
        let mut ok = Vec::new();
        write_line(&mut ok, &serde_json::json!({"ready": true})).unwrap();
        write_line(&mut ok, &serde_json::json!({"running": true})).unwrap();
        let mut r = &ok[..];
        expect(&mut r, "ready").unwrap();
        expect(&mut r, "running").unwrap();
        let mut no = Vec::new();
        write_line(&mut no, &serde_json::json!({"error": "no room"})).unwrap();
        let e = expect(&mut &no[..], "ready").unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
        let e = expect(&mut &b""[..], "ready").unwrap_err().to_string();
        assert!(e.contains("confirm"), "{e}");
        let e = expect(&mut &b"{\"running\":true}\n"[..], "ready")
            .unwrap_err()
            .to_string();
        assert!(e.contains("instead of ready"), "{e}");
        let long = vec![b'x'; 5000];
        assert!(read_line(&mut &long[..]).is_err());
    }
}
