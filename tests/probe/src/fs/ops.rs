//! The file system steps over FUSE: list a directory, read a file, write
//! a file.

use super::dev::{CHUNK, FsDev, FsError};
use super::fuse::{self, ROOT};
use crate::net::crc::{Crc32, Pattern};
use crate::net::time::Deadline;

/// Node id of `path` (absolute, `/`-separated) and whether it is a
/// directory, by LOOKUP of each component from the root.
pub fn lookup(fs: &mut FsDev, path: &str) -> Result<(u64, bool), FsError> {
    let mut node = ROOT;
    let mut dir = true;
    for name in path.split('/').filter(|c| !c.is_empty()) {
        let (n, d) = lookup_in(fs, node, name)?;
        node = n;
        dir = d;
    }
    Ok((node, dir))
}

/// LOOKUP of `name` in directory `parent`: (node id, is a directory).
fn lookup_in(fs: &mut FsDev, parent: u64, name: &str) -> Result<(u64, bool), FsError> {
    let reply = fs.request(fuse::LOOKUP, parent, &[name.as_bytes(), &[0]])?;
    if reply.len() < fuse::ENTRY_OUT {
        return Err(FsError::Msg("LOOKUP reply too short"));
    }
    let mode = fuse::u32_at(reply, fuse::ENTRY_ATTR_MODE);
    Ok((fuse::u64_at(reply, 0), mode & fuse::S_IFMT == fuse::S_IFDIR))
}

/// The names in directory `path` except `.` and `..`, each followed by a
/// NUL, in `names`; returns (bytes used, count).
pub fn list(fs: &mut FsDev, path: &str, names: &mut [u8]) -> Result<(usize, u32), FsError> {
    let (node, dir) = lookup(fs, path)?;
    if !dir {
        return Err(FsError::Errno(20)); // ENOTDIR
    }
    let reply = fs.request(fuse::OPENDIR, node, &[&fuse::open_in(fuse::O_RDONLY)])?;
    let fh = fuse::u64_at(reply, 0);
    let result = read_dir(fs, node, fh, names);
    let released = fs.request(fuse::RELEASEDIR, node, &[&fuse::release_in(fh, 0)]);
    let out = result?;
    released?;
    Ok(out)
}

fn read_dir(fs: &mut FsDev, node: u64, fh: u64, names: &mut [u8]) -> Result<(usize, u32), FsError> {
    let (mut used, mut count, mut offset) = (0usize, 0u32, 0u64);
    loop {
        let reply = fs.request(
            fuse::READDIR,
            node,
            &[&fuse::read_in(fh, offset, 16 * 1024)],
        )?;
        if reply.is_empty() {
            return Ok((used, count));
        }
        // fuse_dirent: ino u64, off u64, namelen u32, type u32, name,
        // padded to 8 bytes.
        let mut at = 0;
        while at + 24 <= reply.len() {
            let off = fuse::u64_at(reply, at + 8);
            let namelen = fuse::u32_at(reply, at + 16) as usize;
            let name = reply
                .get(at + 24..at + 24 + namelen)
                .ok_or(FsError::Msg("READDIR entry past the reply"))?;
            if name != b"." && name != b".." {
                if used + namelen + 1 > names.len() {
                    return Err(FsError::Msg("listing too long for the probe"));
                }
                names[used..used + namelen].copy_from_slice(name);
                names[used + namelen] = 0;
                used += namelen + 1;
                count += 1;
            }
            if off <= offset {
                return Err(FsError::Msg("READDIR offset did not advance"));
            }
            offset = off;
            at += (24 + namelen).div_ceil(8) * 8;
        }
    }
}

/// What `read` measured.
pub struct ReadResult {
    pub bytes: u64,
    pub crc: u32,
    pub ns: u64,
}

/// Reads the whole file `path` in chunks, computing its CRC-32.
pub fn read(fs: &mut FsDev, path: &str) -> Result<ReadResult, FsError> {
    let (node, dir) = lookup(fs, path)?;
    if dir {
        return Err(FsError::Errno(21)); // EISDIR
    }
    let reply = fs.request(fuse::OPEN, node, &[&fuse::open_in(fuse::O_RDONLY)])?;
    let fh = fuse::u64_at(reply, 0);
    let start = Deadline::after_ms(0);
    let mut crc = Crc32::new();
    let mut bytes = 0u64;
    let result = loop {
        let read_in = fuse::read_in(fh, bytes, CHUNK as u32);
        match fs.request_limited(fuse::READ, node, &[&read_in], CHUNK) {
            Ok([]) => break Ok(()),
            Ok(data) => {
                crc.update(data);
                bytes += data.len() as u64;
            }
            Err(e) => break Err(e),
        }
    };
    let ns = start.elapsed_ns();
    let released = fs.request(fuse::RELEASE, node, &[&fuse::release_in(fh, 0)]);
    result?;
    released?;
    Ok(ReadResult {
        bytes,
        crc: crc.value(),
        ns,
    })
}

/// Writes `len` bytes of the pattern to `path` (replacing any file there),
/// with FSYNC before RELEASE; `buf` is a chunk-sized scratch buffer.
/// Returns (CRC-32, nanoseconds).
pub fn write(fs: &mut FsDev, path: &str, len: u64, buf: &mut [u8]) -> Result<(u32, u64), FsError> {
    let (parent, name) = path
        .rsplit_once('/')
        .filter(|(_, n)| !n.is_empty())
        .ok_or(FsError::Msg("path names no file"))?;
    let (parent, dir) = lookup(fs, parent)?;
    if !dir {
        return Err(FsError::Errno(20)); // ENOTDIR
    }
    match lookup_in(fs, parent, name) {
        Ok((_, true)) => return Err(FsError::Errno(21)), // EISDIR
        Ok((_, false)) => {
            fs.request(fuse::UNLINK, parent, &[name.as_bytes(), &[0]])?;
        }
        Err(FsError::Errno(2)) => {}
        Err(e) => return Err(e),
    }
    let flags = fuse::O_WRONLY | fuse::O_CREAT | fuse::O_TRUNC;
    let reply = fs.request(
        fuse::CREATE,
        parent,
        &[&fuse::create_in(flags, 0o644), name.as_bytes(), &[0]],
    )?;
    if reply.len() < fuse::ENTRY_OUT + 16 {
        return Err(FsError::Msg("CREATE reply too short"));
    }
    let node = fuse::u64_at(reply, 0);
    let fh = fuse::u64_at(reply, fuse::ENTRY_OUT);
    let chunk = (fs.max_write as usize).min(buf.len());
    let start = Deadline::after_ms(0);
    let mut crc = Crc32::new();
    let mut pattern = Pattern::default();
    let mut done = 0u64;
    let mut result = Ok(());
    while done < len {
        let n = (len - done).min(chunk as u64) as usize;
        let data = &mut buf[..n];
        pattern.fill(data);
        crc.update(data);
        match fs.request(
            fuse::WRITE,
            node,
            &[&fuse::write_in(fh, done, n as u32), data],
        ) {
            Ok(r) if fuse::u32_at(r, 0) as usize == n => done += n as u64,
            Ok(_) => {
                result = Err(FsError::Msg("short WRITE"));
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = fs
            .request(fuse::FSYNC, node, &[&fuse::fsync_in(fh)])
            .map(|_| ());
    }
    let ns = start.elapsed_ns();
    let released = fs.request(fuse::RELEASE, node, &[&fuse::release_in(fh, flags)]);
    result?;
    released?;
    Ok((crc.value(), ns))
}
