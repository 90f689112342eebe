//! FUSE protocol 7.31 as the probe uses it: opcodes, header layouts,
//! little-endian field access, errno names.

pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;
/// The root directory's node id.
pub const ROOT: u64 = 1;

pub const LOOKUP: u32 = 1;
pub const UNLINK: u32 = 10;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const CREATE: u32 = 35;

pub const FUSE_BIG_WRITES: u32 = 1 << 5;

pub const O_RDONLY: u32 = 0;
pub const O_WRONLY: u32 = 1;
pub const O_CREAT: u32 = 0o100;
pub const O_TRUNC: u32 = 0o1000;

/// fuse_entry_out: nodeid at 0, attr at 40 (mode at 60 in it).
pub const ENTRY_OUT: usize = 128;
pub const ENTRY_ATTR_MODE: usize = 40 + 60;
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFDIR: u32 = 0o040_000;

/// Writes a fuse_in_header (uid, gid, pid 0).
pub fn in_header(buf: &mut [u8], len: u32, opcode: u32, unique: u64, nodeid: u64) {
    buf.fill(0);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&opcode.to_le_bytes());
    buf[8..16].copy_from_slice(&unique.to_le_bytes());
    buf[16..24].copy_from_slice(&nodeid.to_le_bytes());
}

/// (len, error, unique) of a fuse_out_header.
pub fn out_header(buf: &[u8]) -> (u32, i32, u64) {
    (u32_at(buf, 0), u32_at(buf, 4) as i32, u64_at(buf, 8))
}

/// The little-endian u32 at `at` (0 past the end).
pub fn u32_at(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// The little-endian u64 at `at` (0 past the end).
pub fn u64_at(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// fuse_read_in (also READDIR's): fh, offset, size; the rest 0.
pub fn read_in(fh: u64, offset: u64, size: u32) -> [u8; 40] {
    let mut b = [0u8; 40];
    b[0..8].copy_from_slice(&fh.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..20].copy_from_slice(&size.to_le_bytes());
    b
}

/// fuse_write_in: fh, offset, size; the data follows.
pub fn write_in(fh: u64, offset: u64, size: u32) -> [u8; 40] {
    read_in(fh, offset, size)
}

/// fuse_release_in (RELEASE, RELEASEDIR): fh, flags.
pub fn release_in(fh: u64, flags: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(&fh.to_le_bytes());
    b[8..12].copy_from_slice(&flags.to_le_bytes());
    b
}

/// fuse_open_in: flags.
pub fn open_in(flags: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&flags.to_le_bytes());
    b
}

/// fuse_create_in: flags, mode, umask; the name follows.
pub fn create_in(flags: u32, mode: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&flags.to_le_bytes());
    b[4..8].copy_from_slice(&mode.to_le_bytes());
    b
}

/// fuse_fsync_in: fh, fsync_flags 0 (data and metadata).
pub fn fsync_in(fh: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&fh.to_le_bytes());
    b
}

/// Displays an errno by its name where known, else `errno N`.
pub struct Errno(pub i32);

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            5 => "EIO",
            9 => "EBADF",
            12 => "ENOMEM",
            13 => "EACCES",
            17 => "EEXIST",
            20 => "ENOTDIR",
            21 => "EISDIR",
            22 => "EINVAL",
            27 => "EFBIG",
            28 => "ENOSPC",
            30 => "EROFS",
            36 => "ENAMETOOLONG",
            38 => "ENOSYS",
            39 => "ENOTEMPTY",
            71 => "EPROTO",
            110 => "ETIMEDOUT",
            111 => "ECONNREFUSED",
            _ => return write!(f, "errno {}", self.0),
        };
        f.write_str(name)
    }
}
