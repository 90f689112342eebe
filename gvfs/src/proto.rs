//! The GVFS wire protocol.
//!
//! Every message is a frame: a little-endian `u32` length followed by that
//! many bytes of body. A connection opens with a handshake (client
//! [`Hello`], server [`Welcome`]); after that every request body starts
//! with a `u64` request id and a `u8` op code, and every response body
//! starts with the id of the request it answers and a `u8` tag, so that
//! one connection carries many requests at once and answers may arrive in
//! any order.
//!
//! Decoding never trusts the peer: every length is bounded, every read is
//! checked, and a malformed message yields [`ProtoError`], never a panic.

use std::io::{self, Read, Write};

/// Magic bytes that open both handshake messages.
pub const MAGIC: [u8; 4] = *b"GVFS";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Largest frame body accepted.
pub const MAX_FRAME: usize = 2 * 1024 * 1024;
/// Largest read or write payload in one request.
pub const MAX_IO: u32 = 1024 * 1024;
/// Largest file name (one path component).
pub const MAX_NAME: usize = 255;
/// Largest symlink target.
pub const MAX_TARGET: usize = 4096;
/// Largest authentication token.
pub const MAX_TOKEN: usize = 1024;
/// Largest [`Hello`] frame body (magic, version, token length and the
/// largest token): all a server reads from a peer before it is
/// authenticated.
pub const MAX_HELLO_FRAME: usize = 4 + 2 + 4 + MAX_TOKEN;
/// Size of a [`Welcome`] frame body (magic, version, status, read-only
/// flag): all a client reads from a server before it knows it speaks GVFS.
pub const WELCOME_FRAME: usize = 4 + 2 + 1 + 1;
/// Bytes of a frame body allocated before they arrive; a larger body
/// grows as it is read, so that a length alone does not cost memory.
const FRAME_PREALLOC: usize = 64 * 1024;
/// Budget in bytes of encoded entries for one readdir answer.
pub const MAX_READDIR_BYTES: u32 = 1024 * 1024;
/// The root of an export always has this node id.
pub const ROOT_NODE: u64 = 1;

/// What can go wrong while encoding or decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("message truncated")]
    Truncated,
    #[error("{0} bytes left over after the message")]
    Trailing(usize),
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("field of {0} bytes exceeds its limit")]
    FieldTooLarge(usize),
    #[error("unknown op code {0}")]
    UnknownOp(u8),
    #[error("unknown response tag {0}")]
    UnknownTag(u8),
    #[error("unknown file kind {0}")]
    UnknownKind(u8),
    #[error("bad magic in handshake")]
    BadMagic,
    #[error("transport failed")]
    Io(#[from] io::Error),
}

/// Kind of a file, as carried in [`Attr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
            Kind::Fifo => 3,
            Kind::Socket => 4,
            Kind::CharDev => 5,
            Kind::BlockDev => 6,
        }
    }
    fn from_code(c: u8) -> Result<Kind, ProtoError> {
        Ok(match c {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::Fifo,
            4 => Kind::Socket,
            5 => Kind::CharDev,
            6 => Kind::BlockDev,
            c => return Err(ProtoError::UnknownKind(c)),
        })
    }
    /// The kind encoded in the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => Kind::File,
        }
    }
}

/// A point in time: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// Attributes of a file as the server reports them (owner already mapped
/// to the client's identities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// The server's node id for this file.
    pub node: u64,
    /// Device and inode number on the server: a stable file identity.
    pub dev: u64,
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (no file-type bits).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub blksize: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
}

impl Attr {
    /// A value that changes whenever the file's content may have changed:
    /// size, mtime and ctime (the change counter) together.
    pub fn version(&self) -> u64 {
        let mut fields = [0u8; 32];
        fields[..8].copy_from_slice(&self.size.to_le_bytes());
        fields[8..16].copy_from_slice(&self.mtime.sec.to_le_bytes());
        fields[16..20].copy_from_slice(&self.mtime.nsec.to_le_bytes());
        fields[20..28].copy_from_slice(&self.ctime.sec.to_le_bytes());
        fields[28..32].copy_from_slice(&self.ctime.nsec.to_le_bytes());
        let lo = crc32fast::hash(&fields) as u64;
        fields.reverse();
        let hi = crc32fast::hash(&fields) as u64;
        (hi << 32) | lo
    }
}

/// How to set a time in [`SetAttr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Time),
}

/// The attributes a setattr request changes; `None` leaves one alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// One entry of a readdir answer, with its attributes ("readdirplus").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// File-system statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Counters of one op on the server: how many answers, how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpCount {
    pub op: u8,
    pub count: u64,
    pub bytes: u64,
}

/// Ids of the ops, as sent on the wire.
pub mod op {
    pub const LOOKUP: u8 = 1;
    pub const GETATTR: u8 = 2;
    pub const SETATTR: u8 = 3;
    pub const READDIR: u8 = 4;
    pub const OPEN: u8 = 5;
    pub const READ: u8 = 6;
    pub const WRITE: u8 = 7;
    pub const CREATE: u8 = 8;
    pub const MKDIR: u8 = 9;
    pub const UNLINK: u8 = 10;
    pub const RMDIR: u8 = 11;
    pub const RENAME: u8 = 12;
    pub const LINK: u8 = 13;
    pub const SYMLINK: u8 = 14;
    pub const READLINK: u8 = 15;
    pub const STATFS: u8 = 16;
    pub const FSYNC: u8 = 17;
    pub const RELEASE: u8 = 18;
    pub const STATS: u8 = 19;
    /// One past the largest op code.
    pub const COUNT: usize = 20;
    /// A printable name for an op code.
    pub fn name(op: u8) -> &'static str {
        const NAMES: [&str; super::op::COUNT] = [
            "none", "lookup", "getattr", "setattr", "readdir", "open", "read", "write", "create",
            "mkdir", "unlink", "rmdir", "rename", "link", "symlink", "readlink", "statfs", "fsync",
            "release", "stats",
        ];
        NAMES.get(op as usize).copied().unwrap_or("unknown")
    }
}

/// A request from client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    Getattr {
        node: u64,
    },
    Setattr {
        node: u64,
        set: SetAttr,
    },
    /// Entries of a directory from `cookie` (0: the start) on, with their
    /// attributes.
    Readdir {
        node: u64,
        cookie: u64,
    },
    Open {
        node: u64,
        flags: u32,
    },
    Read {
        handle: u64,
        offset: u64,
        len: u32,
    },
    Write {
        handle: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Create {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Unlink {
        parent: u64,
        name: Vec<u8>,
    },
    Rmdir {
        parent: u64,
        name: Vec<u8>,
    },
    Rename {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
    },
    Link {
        node: u64,
        new_parent: u64,
        new_name: Vec<u8>,
    },
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Readlink {
        node: u64,
    },
    Statfs,
    Fsync {
        handle: u64,
        datasync: bool,
    },
    Release {
        handle: u64,
    },
    Stats,
}

impl Request {
    /// The op code of this request.
    pub fn op(&self) -> u8 {
        match self {
            Request::Lookup { .. } => op::LOOKUP,
            Request::Getattr { .. } => op::GETATTR,
            Request::Setattr { .. } => op::SETATTR,
            Request::Readdir { .. } => op::READDIR,
            Request::Open { .. } => op::OPEN,
            Request::Read { .. } => op::READ,
            Request::Write { .. } => op::WRITE,
            Request::Create { .. } => op::CREATE,
            Request::Mkdir { .. } => op::MKDIR,
            Request::Unlink { .. } => op::UNLINK,
            Request::Rmdir { .. } => op::RMDIR,
            Request::Rename { .. } => op::RENAME,
            Request::Link { .. } => op::LINK,
            Request::Symlink { .. } => op::SYMLINK,
            Request::Readlink { .. } => op::READLINK,
            Request::Statfs => op::STATFS,
            Request::Fsync { .. } => op::FSYNC,
            Request::Release { .. } => op::RELEASE,
            Request::Stats => op::STATS,
        }
    }
}

/// An answer from server to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The op failed with this errno.
    Error(i32),
    Ok,
    /// lookup, getattr, setattr, mkdir, link, symlink.
    Attr(Attr),
    /// readdir: entries and the cookie to continue from, or `None` at the end.
    Dir {
        entries: Vec<DirEntry>,
        next: Option<u64>,
    },
    /// open and create: a server-side handle and the file's attributes.
    Opened {
        handle: u64,
        attr: Attr,
    },
    Data(Vec<u8>),
    Written {
        len: u32,
        attr: Attr,
    },
    Target(Vec<u8>),
    StatFs(StatFs),
    Stats(Vec<OpCount>),
}

mod tag {
    pub const ERROR: u8 = 0;
    pub const OK: u8 = 1;
    pub const ATTR: u8 = 2;
    pub const DIR: u8 = 3;
    pub const OPENED: u8 = 4;
    pub const DATA: u8 = 5;
    pub const WRITTEN: u8 = 6;
    pub const TARGET: u8 = 7;
    pub const STATFS: u8 = 8;
    pub const STATS: u8 = 9;
}

/// The client's half of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub token: Vec<u8>,
}

/// Outcome of a handshake, as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloStatus {
    Accepted,
    BadToken,
    BadVersion,
}

/// The server's half of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub status: HelloStatus,
    pub read_only: bool,
}

// ---------------------------------------------------------------- encoding

/// Appends fields to a message body.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    fn time(&mut self, t: Time) {
        self.i64(t.sec);
        self.u32(t.nsec);
    }
    fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.u32(v);
            }
            None => self.u8(0),
        }
    }
    fn set_time(&mut self, v: Option<SetTime>) {
        match v {
            None => self.u8(0),
            Some(SetTime::Now) => self.u8(1),
            Some(SetTime::At(t)) => {
                self.u8(2);
                self.time(t);
            }
        }
    }
    fn attr(&mut self, a: &Attr) {
        self.u64(a.node);
        self.u64(a.dev);
        self.u64(a.ino);
        self.u8(a.kind.code());
        self.u32(a.perm);
        self.u32(a.nlink);
        self.u32(a.uid);
        self.u32(a.gid);
        self.u64(a.rdev);
        self.u64(a.size);
        self.u64(a.blocks);
        self.u32(a.blksize);
        self.time(a.atime);
        self.time(a.mtime);
        self.time(a.ctime);
    }
}

/// Encoded size of one [`Attr`].
pub const ATTR_LEN: usize = 8 * 3 + 1 + 4 * 4 + 8 * 3 + 4 + 12 * 3;

/// Reads fields from a message body, checking every bound.
pub struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Dec<'a> {
        Dec { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn i64(&mut self) -> Result<i64, ProtoError> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        Ok(self.u8()? != 0)
    }
    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, ProtoError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ProtoError::FieldTooLarge(n));
        }
        Ok(self.take(n)?.to_vec())
    }
    fn time(&mut self) -> Result<Time, ProtoError> {
        let sec = self.i64()?;
        let nsec = self.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(ProtoError::FieldTooLarge(nsec as usize));
        }
        Ok(Time { sec, nsec })
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, ProtoError> {
        Ok(if self.bool()? {
            Some(self.u32()?)
        } else {
            None
        })
    }
    fn set_time(&mut self) -> Result<Option<SetTime>, ProtoError> {
        Ok(match self.u8()? {
            0 => None,
            1 => Some(SetTime::Now),
            _ => Some(SetTime::At(self.time()?)),
        })
    }
    fn attr(&mut self) -> Result<Attr, ProtoError> {
        Ok(Attr {
            node: self.u64()?,
            dev: self.u64()?,
            ino: self.u64()?,
            kind: Kind::from_code(self.u8()?)?,
            perm: self.u32()?,
            nlink: self.u32()?,
            uid: self.u32()?,
            gid: self.u32()?,
            rdev: self.u64()?,
            size: self.u64()?,
            blocks: self.u64()?,
            blksize: self.u32()?,
            atime: self.time()?,
            mtime: self.time()?,
            ctime: self.time()?,
        })
    }
    fn name(&mut self) -> Result<Vec<u8>, ProtoError> {
        self.bytes(MAX_NAME)
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing(self.buf.len()))
        }
    }
}

/// Encodes a request body.
pub fn encode_request(id: u64, req: &Request) -> Vec<u8> {
    let mut e = Enc::default();
    encode_request_into(&mut e, id, req);
    e.buf
}

/// A whole request frame (length prefix and body) in one buffer.
pub fn request_frame(id: u64, req: &Request) -> Vec<u8> {
    let hint = match req {
        Request::Write { data, .. } => data.len() + 64,
        _ => 128,
    };
    let mut e = Enc {
        buf: Vec::with_capacity(hint),
    };
    e.buf.extend_from_slice(&[0; 4]);
    encode_request_into(&mut e, id, req);
    finish_frame(e.buf)
}

fn finish_frame(mut buf: Vec<u8>) -> Vec<u8> {
    let n = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&n.to_le_bytes());
    buf
}

fn encode_request_into(e: &mut Enc, id: u64, req: &Request) {
    e.u64(id);
    e.u8(req.op());
    match req {
        Request::Lookup { parent, name }
        | Request::Unlink { parent, name }
        | Request::Rmdir { parent, name } => {
            e.u64(*parent);
            e.bytes(name);
        }
        Request::Getattr { node } | Request::Readlink { node } => e.u64(*node),
        Request::Setattr { node, set } => {
            e.u64(*node);
            e.opt_u32(set.mode);
            e.opt_u32(set.uid);
            e.opt_u32(set.gid);
            match set.size {
                Some(s) => {
                    e.u8(1);
                    e.u64(s);
                }
                None => e.u8(0),
            }
            e.set_time(set.atime);
            e.set_time(set.mtime);
        }
        Request::Readdir { node, cookie } => {
            e.u64(*node);
            e.u64(*cookie);
        }
        Request::Open { node, flags } => {
            e.u64(*node);
            e.u32(*flags);
        }
        Request::Read {
            handle,
            offset,
            len,
        } => {
            e.u64(*handle);
            e.u64(*offset);
            e.u32(*len);
        }
        Request::Write {
            handle,
            offset,
            data,
        } => {
            e.u64(*handle);
            e.u64(*offset);
            e.bytes(data);
        }
        Request::Create {
            parent,
            name,
            mode,
            flags,
            uid,
            gid,
        } => {
            e.u64(*parent);
            e.bytes(name);
            e.u32(*mode);
            e.u32(*flags);
            e.u32(*uid);
            e.u32(*gid);
        }
        Request::Mkdir {
            parent,
            name,
            mode,
            uid,
            gid,
        } => {
            e.u64(*parent);
            e.bytes(name);
            e.u32(*mode);
            e.u32(*uid);
            e.u32(*gid);
        }
        Request::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => {
            e.u64(*parent);
            e.bytes(name);
            e.u64(*new_parent);
            e.bytes(new_name);
            e.u32(*flags);
        }
        Request::Link {
            node,
            new_parent,
            new_name,
        } => {
            e.u64(*node);
            e.u64(*new_parent);
            e.bytes(new_name);
        }
        Request::Symlink {
            parent,
            name,
            target,
            uid,
            gid,
        } => {
            e.u64(*parent);
            e.bytes(name);
            e.bytes(target);
            e.u32(*uid);
            e.u32(*gid);
        }
        Request::Statfs | Request::Stats => {}
        Request::Fsync { handle, datasync } => {
            e.u64(*handle);
            e.u8(*datasync as u8);
        }
        Request::Release { handle } => e.u64(*handle),
    }
}

/// Decodes a request body into its id and request.
///
/// A body too short to hold an id is an error without an id; otherwise
/// the id is returned with the result so the server can answer it.
pub fn decode_request(body: &[u8]) -> Result<(u64, Result<Request, ProtoError>), ProtoError> {
    let mut d = Dec::new(body);
    let id = d.u64()?;
    Ok((id, decode_request_rest(&mut d)))
}

fn decode_request_rest(d: &mut Dec<'_>) -> Result<Request, ProtoError> {
    let code = d.u8()?;
    let req = match code {
        op::LOOKUP => Request::Lookup {
            parent: d.u64()?,
            name: d.name()?,
        },
        op::UNLINK => Request::Unlink {
            parent: d.u64()?,
            name: d.name()?,
        },
        op::RMDIR => Request::Rmdir {
            parent: d.u64()?,
            name: d.name()?,
        },
        op::GETATTR => Request::Getattr { node: d.u64()? },
        op::READLINK => Request::Readlink { node: d.u64()? },
        op::SETATTR => Request::Setattr {
            node: d.u64()?,
            set: SetAttr {
                mode: d.opt_u32()?,
                uid: d.opt_u32()?,
                gid: d.opt_u32()?,
                size: if d.bool()? { Some(d.u64()?) } else { None },
                atime: d.set_time()?,
                mtime: d.set_time()?,
            },
        },
        op::READDIR => Request::Readdir {
            node: d.u64()?,
            cookie: d.u64()?,
        },
        op::OPEN => Request::Open {
            node: d.u64()?,
            flags: d.u32()?,
        },
        op::READ => {
            let handle = d.u64()?;
            let offset = d.u64()?;
            let len = d.u32()?;
            if len > MAX_IO {
                return Err(ProtoError::FieldTooLarge(len as usize));
            }
            Request::Read {
                handle,
                offset,
                len,
            }
        }
        op::WRITE => Request::Write {
            handle: d.u64()?,
            offset: d.u64()?,
            data: d.bytes(MAX_IO as usize)?,
        },
        op::CREATE => Request::Create {
            parent: d.u64()?,
            name: d.name()?,
            mode: d.u32()?,
            flags: d.u32()?,
            uid: d.u32()?,
            gid: d.u32()?,
        },
        op::MKDIR => Request::Mkdir {
            parent: d.u64()?,
            name: d.name()?,
            mode: d.u32()?,
            uid: d.u32()?,
            gid: d.u32()?,
        },
        op::RENAME => Request::Rename {
            parent: d.u64()?,
            name: d.name()?,
            new_parent: d.u64()?,
            new_name: d.name()?,
            flags: d.u32()?,
        },
        op::LINK => Request::Link {
            node: d.u64()?,
            new_parent: d.u64()?,
            new_name: d.name()?,
        },
        op::SYMLINK => Request::Symlink {
            parent: d.u64()?,
            name: d.name()?,
            target: d.bytes(MAX_TARGET)?,
            uid: d.u32()?,
            gid: d.u32()?,
        },
        op::STATFS => Request::Statfs,
        op::STATS => Request::Stats,
        op::FSYNC => Request::Fsync {
            handle: d.u64()?,
            datasync: d.bool()?,
        },
        op::RELEASE => Request::Release { handle: d.u64()? },
        c => return Err(ProtoError::UnknownOp(c)),
    };
    d.finish()?;
    Ok(req)
}

/// Encodes a response body.
pub fn encode_response(id: u64, resp: &Response) -> Vec<u8> {
    let mut e = Enc::default();
    encode_response_into(&mut e, id, resp);
    e.buf
}

/// A whole response frame (length prefix and body) in one buffer.
pub fn response_frame(id: u64, resp: &Response) -> Vec<u8> {
    let hint = match resp {
        Response::Data(d) => d.len() + 64,
        _ => 256,
    };
    let mut e = Enc {
        buf: Vec::with_capacity(hint),
    };
    e.buf.extend_from_slice(&[0; 4]);
    encode_response_into(&mut e, id, resp);
    finish_frame(e.buf)
}

fn encode_response_into(e: &mut Enc, id: u64, resp: &Response) {
    e.u64(id);
    match resp {
        Response::Error(errno) => {
            e.u8(tag::ERROR);
            e.u32(*errno as u32);
        }
        Response::Ok => e.u8(tag::OK),
        Response::Attr(a) => {
            e.u8(tag::ATTR);
            e.attr(a);
        }
        Response::Dir { entries, next } => {
            e.u8(tag::DIR);
            e.u32(entries.len() as u32);
            for ent in entries {
                e.bytes(&ent.name);
                e.attr(&ent.attr);
            }
            match next {
                Some(c) => {
                    e.u8(1);
                    e.u64(*c);
                }
                None => e.u8(0),
            }
        }
        Response::Opened { handle, attr } => {
            e.u8(tag::OPENED);
            e.u64(*handle);
            e.attr(attr);
        }
        Response::Data(d) => {
            e.u8(tag::DATA);
            e.bytes(d);
        }
        Response::Written { len, attr } => {
            e.u8(tag::WRITTEN);
            e.u32(*len);
            e.attr(attr);
        }
        Response::Target(t) => {
            e.u8(tag::TARGET);
            e.bytes(t);
        }
        Response::StatFs(s) => {
            e.u8(tag::STATFS);
            e.u64(s.blocks);
            e.u64(s.bfree);
            e.u64(s.bavail);
            e.u64(s.files);
            e.u64(s.ffree);
            e.u32(s.bsize);
            e.u32(s.namelen);
            e.u32(s.frsize);
        }
        Response::Stats(v) => {
            e.u8(tag::STATS);
            e.u32(v.len() as u32);
            for c in v {
                e.u8(c.op);
                e.u64(c.count);
                e.u64(c.bytes);
            }
        }
    }
}

/// Decodes a response body into the id it answers and the response.
pub fn decode_response(body: &[u8]) -> Result<(u64, Response), ProtoError> {
    let mut d = Dec::new(body);
    let id = d.u64()?;
    let t = d.u8()?;
    let resp = match t {
        tag::ERROR => Response::Error(d.u32()? as i32),
        tag::OK => Response::Ok,
        tag::ATTR => Response::Attr(d.attr()?),
        tag::DIR => {
            let n = d.u32()? as usize;
            // Every entry takes at least ATTR_LEN + 4 bytes: bound the count
            // by what the body can hold before allocating.
            if n > body.len() / (ATTR_LEN + 4) {
                return Err(ProtoError::FieldTooLarge(n));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(DirEntry {
                    name: d.name()?,
                    attr: d.attr()?,
                });
            }
            let next = if d.bool()? { Some(d.u64()?) } else { None };
            Response::Dir { entries, next }
        }
        tag::OPENED => Response::Opened {
            handle: d.u64()?,
            attr: d.attr()?,
        },
        tag::DATA => Response::Data(d.bytes(MAX_IO as usize)?),
        tag::WRITTEN => Response::Written {
            len: d.u32()?,
            attr: d.attr()?,
        },
        tag::TARGET => Response::Target(d.bytes(MAX_TARGET)?),
        tag::STATFS => Response::StatFs(StatFs {
            blocks: d.u64()?,
            bfree: d.u64()?,
            bavail: d.u64()?,
            files: d.u64()?,
            ffree: d.u64()?,
            bsize: d.u32()?,
            namelen: d.u32()?,
            frsize: d.u32()?,
        }),
        tag::STATS => {
            let n = d.u32()? as usize;
            if n > op::COUNT {
                return Err(ProtoError::FieldTooLarge(n));
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(OpCount {
                    op: d.u8()?,
                    count: d.u64()?,
                    bytes: d.u64()?,
                });
            }
            Response::Stats(v)
        }
        t => return Err(ProtoError::UnknownTag(t)),
    };
    d.finish()?;
    Ok((id, resp))
}

/// Encodes the client's handshake.
pub fn encode_hello(h: &Hello) -> Vec<u8> {
    let mut e = Enc::default();
    e.buf.extend_from_slice(&MAGIC);
    e.u16(h.version);
    e.bytes(&h.token);
    e.buf
}

/// Decodes the client's handshake.
pub fn decode_hello(body: &[u8]) -> Result<Hello, ProtoError> {
    let mut d = Dec::new(body);
    if d.arr::<4>()? != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let version = d.u16()?;
    let token = d.bytes(MAX_TOKEN)?;
    d.finish()?;
    Ok(Hello { version, token })
}

/// Encodes the server's handshake.
pub fn encode_welcome(w: &Welcome) -> Vec<u8> {
    let mut e = Enc::default();
    e.buf.extend_from_slice(&MAGIC);
    e.u16(w.version);
    e.u8(match w.status {
        HelloStatus::Accepted => 0,
        HelloStatus::BadToken => 1,
        HelloStatus::BadVersion => 2,
    });
    e.u8(w.read_only as u8);
    e.buf
}

/// Decodes the server's handshake.
pub fn decode_welcome(body: &[u8]) -> Result<Welcome, ProtoError> {
    let mut d = Dec::new(body);
    if d.arr::<4>()? != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let version = d.u16()?;
    let status = match d.u8()? {
        0 => HelloStatus::Accepted,
        1 => HelloStatus::BadToken,
        _ => HelloStatus::BadVersion,
    };
    let read_only = d.bool()?;
    d.finish()?;
    Ok(Welcome {
        version,
        status,
        read_only,
    })
}

/// Writes one frame: length, then body.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> Result<(), ProtoError> {
    if body.len() > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Writes a frame built by [`request_frame`] or [`response_frame`].
pub fn write_whole_frame(w: &mut impl Write, frame: &[u8]) -> Result<(), ProtoError> {
    if frame.len() < 4 || frame.len() - 4 > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge(frame.len()));
    }
    w.write_all(frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame body. `Ok(None)` is a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, ProtoError> {
    read_frame_max(r, MAX_FRAME)
}

/// Reads one frame body of at most `max` bytes (a longer one is refused
/// before its body is read). `Ok(None)` is a clean end of stream between
/// frames.
pub fn read_frame_max(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > max.min(MAX_FRAME) {
        return Err(ProtoError::FrameTooLarge(n));
    }
    let mut body = Vec::with_capacity(n.min(FRAME_PREALLOC));
    r.take(n as u64).read_to_end(&mut body)?;
    if body.len() < n {
        return Err(ProtoError::Truncated);
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr() -> Attr {
        Attr {
            node: 7,
            dev: 2049,
            ino: 1234,
            kind: Kind::File,
            perm: 0o644,
            nlink: 1,
            uid: 1000,
            gid: 100,
            rdev: 0,
            size: 4096,
            blocks: 8,
            blksize: 4096,
            atime: Time { sec: 1, nsec: 2 },
            mtime: Time { sec: 3, nsec: 4 },
            ctime: Time { sec: 5, nsec: 6 },
        }
    }

    fn all_requests() -> Vec<Request> {
        let n = b"name".to_vec();
        vec![
            Request::Lookup {
                parent: 1,
                name: n.clone(),
            },
            Request::Getattr { node: 3 },
            Request::Setattr {
                node: 3,
                set: SetAttr {
                    mode: Some(0o600),
                    uid: None,
                    gid: Some(5),
                    size: Some(10),
                    atime: Some(SetTime::Now),
                    mtime: Some(SetTime::At(Time { sec: 9, nsec: 1 })),
                },
            },
            Request::Readdir {
                node: 1,
                cookie: 99,
            },
            Request::Open { node: 2, flags: 2 },
            Request::Read {
                handle: 1,
                offset: 1 << 40,
                len: 4096,
            },
            Request::Write {
                handle: 1,
                offset: 5,
                data: vec![1, 2, 3],
            },
            Request::Create {
                parent: 1,
                name: n.clone(),
                mode: 0o644,
                flags: 0o1101,
                uid: 1,
                gid: 2,
            },
            Request::Mkdir {
                parent: 1,
                name: n.clone(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            Request::Unlink {
                parent: 1,
                name: n.clone(),
            },
            Request::Rmdir {
                parent: 1,
                name: n.clone(),
            },
            Request::Rename {
                parent: 1,
                name: n.clone(),
                new_parent: 2,
                new_name: b"other".to_vec(),
                flags: 0,
            },
            Request::Link {
                node: 4,
                new_parent: 1,
                new_name: n.clone(),
            },
            Request::Symlink {
                parent: 1,
                name: n,
                target: b"../x".to_vec(),
                uid: 0,
                gid: 0,
            },
            Request::Readlink { node: 4 },
            Request::Statfs,
            Request::Fsync {
                handle: 3,
                datasync: true,
            },
            Request::Release { handle: 3 },
            Request::Stats,
        ]
    }

    fn all_responses() -> Vec<Response> {
        vec![
            Response::Error(libc::ENOENT),
            Response::Ok,
            Response::Attr(attr()),
            Response::Dir {
                entries: vec![
                    DirEntry {
                        name: b"a".to_vec(),
                        attr: attr(),
                    },
                    DirEntry {
                        name: b"bb".to_vec(),
                        attr: attr(),
                    },
                ],
                next: Some(77),
            },
            Response::Dir {
                entries: vec![],
                next: None,
            },
            Response::Opened {
                handle: 9,
                attr: attr(),
            },
            Response::Data(vec![7; 100]),
            Response::Written {
                len: 3,
                attr: attr(),
            },
            Response::Target(b"/etc".to_vec()),
            Response::StatFs(StatFs {
                blocks: 1,
                bfree: 2,
                bavail: 3,
                files: 4,
                ffree: 5,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
            }),
            Response::Stats(vec![OpCount {
                op: op::READ,
                count: 3,
                bytes: 300,
            }]),
        ]
    }

    #[test]
    fn requests_round_trip() {
        for (i, req) in all_requests().into_iter().enumerate() {
            let body = encode_request(i as u64 + 100, &req);
            let (id, back) = decode_request(&body).unwrap();
            assert_eq!(id, i as u64 + 100);
            assert_eq!(back.unwrap(), req);
        }
    }

    #[test]
    fn responses_round_trip() {
        for (i, resp) in all_responses().into_iter().enumerate() {
            let body = encode_response(i as u64, &resp);
            let (id, back) = decode_response(&body).unwrap();
            assert_eq!(id, i as u64);
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn attr_len_matches_encoding() {
        let mut e = Enc::default();
        e.attr(&attr());
        assert_eq!(e.buf.len(), ATTR_LEN);
    }

    #[test]
    fn every_truncation_is_an_error() {
        for req in all_requests() {
            let body = encode_request(1, &req);
            for cut in 0..body.len() {
                match decode_request(&body[..cut]) {
                    Err(_) => assert!(cut < 8),
                    Ok((_, r)) => assert!(r.is_err(), "{req:?} cut at {cut} decoded"),
                }
            }
        }
        for resp in all_responses() {
            let body = encode_response(1, &resp);
            for cut in 0..body.len() {
                assert!(decode_response(&body[..cut]).is_err(), "{resp:?} cut {cut}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut body = encode_request(1, &Request::Getattr { node: 1 });
        body.push(0);
        assert!(matches!(
            decode_request(&body).unwrap().1,
            Err(ProtoError::Trailing(1))
        ));
        let mut body = encode_response(1, &Response::Ok);
        body.push(0);
        assert!(decode_response(&body).is_err());
    }

    #[test]
    fn oversized_fields_are_refused() {
        // A name longer than a path component.
        let body = encode_request(
            1,
            &Request::Lookup {
                parent: 1,
                name: vec![b'a'; MAX_NAME + 1],
            },
        );
        assert!(matches!(
            decode_request(&body).unwrap().1,
            Err(ProtoError::FieldTooLarge(_))
        ));
        // A read larger than MAX_IO.
        let body = encode_request(
            1,
            &Request::Read {
                handle: 1,
                offset: 0,
                len: MAX_IO + 1,
            },
        );
        assert!(decode_request(&body).unwrap().1.is_err());
        // A length prefix claiming 4 GiB must not allocate it.
        let mut body = encode_request(1, &Request::Getattr { node: 1 });
        body.truncate(9);
        body[8] = op::LOOKUP;
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_request(&body).unwrap().1.is_err());
        // A directory answer claiming more entries than bytes.
        let mut body = 1u64.to_le_bytes().to_vec();
        body.push(tag::DIR);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_response(&body),
            Err(ProtoError::FieldTooLarge(_))
        ));
    }

    #[test]
    fn unknown_codes_are_refused() {
        let mut body = 5u64.to_le_bytes().to_vec();
        body.push(200);
        let (id, r) = decode_request(&body).unwrap();
        assert_eq!(id, 5);
        assert!(matches!(r, Err(ProtoError::UnknownOp(200))));
        body[8] = 0;
        assert!(decode_request(&body).unwrap().1.is_err());
        assert!(matches!(
            decode_response(&[0, 0, 0, 0, 0, 0, 0, 0, 99]),
            Err(ProtoError::UnknownTag(99))
        ));
        let mut a = encode_response(1, &Response::Attr(attr()));
        a[9 + 24] = 42; // the kind byte
        assert!(matches!(
            decode_response(&a),
            Err(ProtoError::UnknownKind(42))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A small deterministic generator: the decoders must return, not panic.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..600usize {
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode_request(&buf);
            let _ = decode_response(&buf);
            let _ = decode_hello(&buf);
            let _ = decode_welcome(&buf);
            if len > 9 {
                // Valid op codes followed by garbage.
                for code in 0..op::COUNT as u8 {
                    buf[8] = code;
                    let _ = decode_request(&buf);
                    let _ = decode_response(&buf);
                }
            }
        }
    }

    #[test]
    fn handshake_round_trip_and_bad_magic() {
        let h = Hello {
            version: VERSION,
            token: b"secret".to_vec(),
        };
        assert_eq!(decode_hello(&encode_hello(&h)).unwrap(), h);
        let w = Welcome {
            version: VERSION,
            status: HelloStatus::BadToken,
            read_only: true,
        };
        assert_eq!(decode_welcome(&encode_welcome(&w)).unwrap(), w);
        let mut bad = encode_hello(&h);
        bad[0] = b'X';
        assert!(matches!(decode_hello(&bad), Err(ProtoError::BadMagic)));
        let big = Hello {
            version: 1,
            token: vec![0; MAX_TOKEN + 1],
        };
        assert!(decode_hello(&encode_hello(&big)).is_err());
    }

    #[test]
    fn whole_frames_equal_length_plus_body() {
        for (i, req) in all_requests().into_iter().enumerate() {
            let frame = request_frame(i as u64, &req);
            let mut r = &frame[..];
            let body = read_frame(&mut r).unwrap().unwrap();
            assert_eq!(body, encode_request(i as u64, &req));
            assert!(r.is_empty());
        }
        for (i, resp) in all_responses().into_iter().enumerate() {
            let frame = response_frame(i as u64, &resp);
            let mut out = Vec::new();
            write_whole_frame(&mut out, &frame).unwrap();
            let body = read_frame(&mut &out[..]).unwrap().unwrap();
            assert_eq!(decode_response(&body).unwrap(), (i as u64, resp));
        }
    }

    #[test]
    fn frames_round_trip_and_bound() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), b"hello");
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), b"");
        assert!(read_frame(&mut r).unwrap().is_none());
        // A length over the limit is refused before any allocation.
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(ProtoError::FrameTooLarge(_))
        ));
        // A stream that ends inside a frame is truncated, not clean.
        let mut cut = Vec::new();
        write_frame(&mut cut, b"abcdef").unwrap();
        assert!(matches!(
            read_frame(&mut &cut[..6]),
            Err(ProtoError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &cut[..2]),
            Err(ProtoError::Truncated)
        ));
        assert!(write_frame(&mut Vec::new(), &vec![0; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn a_hello_frame_fits_its_bound_and_nothing_larger_is_read() {
        let hello = encode_hello(&Hello {
            version: VERSION,
            token: vec![7; MAX_TOKEN],
        });
        assert_eq!(hello.len(), MAX_HELLO_FRAME);
        let mut buf = Vec::new();
        write_frame(&mut buf, &hello).unwrap();
        let got = read_frame_max(&mut &buf[..], MAX_HELLO_FRAME).unwrap();
        assert_eq!(got.unwrap(), hello);
        // One byte more: refused on its length alone.
        let len = ((MAX_HELLO_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame_max(&mut &len[..], MAX_HELLO_FRAME),
            Err(ProtoError::FrameTooLarge(_))
        ));
        let welcome = encode_welcome(&Welcome {
            version: VERSION,
            status: HelloStatus::Accepted,
            read_only: true,
        });
        assert_eq!(welcome.len(), WELCOME_FRAME);
        // A body larger than what is preallocated still reads whole.
        let big = vec![3u8; 3 * FRAME_PREALLOC + 5];
        let mut buf = Vec::new();
        write_frame(&mut buf, &big).unwrap();
        assert_eq!(read_frame(&mut &buf[..]).unwrap().unwrap(), big);
    }
}
