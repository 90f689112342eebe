//! The snapshot's `state` file: a magic number, a format version, the
//! length of the body, the body (the state's serde form in `bitcode`, a
//! maintained compact binary format), and a CRC-32 of all that comes
//! before it. A file that is cut short, corrupted, of another version or
//! not a snapshot at all is refused with an error saying which.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"VMPLSNAP";
/// The format version this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version and body length.
const HEADER: usize = 8 + 4 + 8;
/// The CRC-32 after the body.
const TRAILER: usize = 4;
/// The largest body read: a VM's state is kilobytes per vCPU and device;
/// a length past this is a corrupted header, not a state to allocate for.
pub const MAX_BODY: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read the state file {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the state file {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} is not a vmplant snapshot state file (wrong magic number)")]
    Magic { path: PathBuf },
    #[error(
        "{path:?} is snapshot format version {found}; this vmplant reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path:?} is truncated: {len} bytes, the header says {want}")]
    Truncated { path: PathBuf, len: u64, want: u64 },
    #[error("{path:?} says its state is {len} bytes, more than the {MAX_BODY} a state can be")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path:?} is corrupted (checksum mismatch)")]
    Checksum { path: PathBuf },
    #[error("{path:?} holds a state this vmplant cannot decode: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("the state cannot be encoded: {0}")]
    Encode(String),
}

/// The state file's bytes for `state`: header, body, checksum.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    let body = bitcode::serialize(state).map_err(|e| StateFileError::Encode(e.to_string()))?;
    let mut bytes = Vec::with_capacity(HEADER + body.len() + TRAILER);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Writes `state` into `file` (new and empty, at `path`) and syncs it;
/// returns its size.
pub fn write<T: Serialize>(file: &mut File, path: &Path, state: &T) -> Result<u64, StateFileError> {
    let bytes = encode(state)?;
    let err = |source| StateFileError::Write {
        path: path.to_owned(),
        source,
    };
    file.write_all(&bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(bytes.len() as u64)
}

/// Reads the state at `path`, checking magic, version, length and
/// checksum before decoding.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let bytes = std::fs::read(path).map_err(|source| StateFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    decode(path, &bytes)
}

/// Decodes state bytes (as [`encode`] makes them) that came from `path`
/// (named in errors), checking them as [`read`] does.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StateFileError> {
    let path = path.to_owned();
    let len = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(StateFileError::Magic { path });
    }
    if bytes.len() < HEADER {
        return Err(StateFileError::Truncated {
            path,
            len,
            want: (HEADER + TRAILER) as u64,
        });
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if found != FORMAT_VERSION {
        return Err(StateFileError::Version { path, found });
    }
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    if body_len > MAX_BODY {
        return Err(StateFileError::TooLarge {
            path,
            len: body_len,
        });
    }
    let want = (HEADER + TRAILER) as u64 + body_len;
    if len < want {
        return Err(StateFileError::Truncated { path, len, want });
    }
    // Lengths were checked above: these ranges are in bounds.
    let end = HEADER + body_len as usize;
    let crc = u32::from_le_bytes(bytes[end..end + TRAILER].try_into().unwrap_or_default());
    if len > want || crc32fast::hash(&bytes[..end]) != crc {
        return Err(StateFileError::Checksum { path });
    }
    bitcode::deserialize(&bytes[HEADER..end]).map_err(|e| StateFileError::Decode {
        path,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        nested: Option<Box<Sample>>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            regs: (0..100).collect(),
            nested: Some(Box::new(Sample {
                name: "inner".into(),
                regs: vec![7],
                nested: None,
            })),
        }
    }

    fn written() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mut file = File::create(&path).unwrap();
        write(&mut file, &path, &sample()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (dir, path, bytes)
    }

    #[test]
    fn a_state_reads_back_equal() {
        let (_d, path, _) = written();
        assert_eq!(read::<Sample>(&path).unwrap(), sample());
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let (_d, path, good) = written();
        let check = |bytes: &[u8], want: &str| {
            let e = decode::<Sample>(&path, bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        check(b"", "wrong magic");
        check(b"ELF\x7f....................", "wrong magic");
        check(&good[..10], "truncated");
        check(&good[..good.len() - 1], "truncated");
        let mut v = good.clone();
        v[8] = 2;
        check(&v, "format version 2");
        let mut v = good.clone();
        v[HEADER + 3] ^= 0x40;
        check(&v, "checksum mismatch");
        let mut v = good.clone();
        v.push(0);
        check(&v, "checksum mismatch");
        let mut v = good.clone();
        v[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&v, "more than");
        // A well-formed file with a body of another shape.
        let other = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(other.path(), encode(&(1u8, 2u8)).unwrap()).unwrap();
        let e = read::<Sample>(other.path()).unwrap_err().to_string();
        assert!(e.contains("cannot decode"), "{e}");
    }
}
