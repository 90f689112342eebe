//! Thin, checked wrappers over the *at system calls the server uses.
//! Every path given here is either one validated name component or a
//! path resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

fn cstr(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cpath(p: &Path) -> io::Result<CString> {
    if p.as_os_str().is_empty() {
        Ok(c".".to_owned())
    } else {
        cstr(p.as_os_str())
    }
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` relative to `dir`; nothing in the path (`..`, absolute or
/// relative symlinks, magic links) may resolve outside `dir`.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 {
            mode as u64
        } else {
            0
        },
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: `p` is a valid NUL-terminated string and `how` a valid
        // open_how whose size we pass; the kernel only reads both.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                p.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new file descriptor we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a concurrent rename or mount raced the lookup; retry.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; an empty name stats `dir`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let (n, flags) = if name.is_empty() {
        (
            c"".to_owned(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    } else {
        (cstr(name)?, libc::AT_SYMLINK_NOFOLLOW)
    };
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `n` is NUL-terminated and `st` points to writable memory of
    // the right size for the kernel to fill.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), n.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

/// What `fd` refers to, as `fstat(2)` says.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    stat_at(fd, OsStr::new(""))
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: `n` is a valid NUL-terminated string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) }).map(drop)
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: `n` is a valid NUL-terminated string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) }).map(drop)
}

pub fn rename_at(
    from: BorrowedFd<'_>,
    name: &OsStr,
    to: BorrowedFd<'_>,
    new_name: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let a = cstr(name)?;
    let b = cstr(new_name)?;
    // SAFETY: both names are valid NUL-terminated strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            from.as_raw_fd(),
            a.as_ptr(),
            to.as_raw_fd(),
            b.as_ptr(),
            flags,
        )
    };
    check(r as i32).map(drop)
}

pub fn link_at(
    from: BorrowedFd<'_>,
    name: &OsStr,
    to: BorrowedFd<'_>,
    new_name: &OsStr,
) -> io::Result<()> {
    let a = cstr(name)?;
    let b = cstr(new_name)?;
    // SAFETY: both names are valid NUL-terminated strings; flags 0 does not
    // follow a symlink at `name`.
    check(unsafe { libc::linkat(from.as_raw_fd(), a.as_ptr(), to.as_raw_fd(), b.as_ptr(), 0) })
        .map(drop)
}

pub fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = cstr(OsStr::from_bytes(target))?;
    let n = cstr(name)?;
    // SAFETY: both strings are valid and NUL-terminated.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) }).map(drop)
}

pub fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let n = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for `buf.len()` bytes; `n` is NUL-terminated.
    let r = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`; u32::MAX leaves one alone.
pub fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let (n, flags) = if name.is_empty() {
        (
            c"".to_owned(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    } else {
        (cstr(name)?, libc::AT_SYMLINK_NOFOLLOW)
    };
    // SAFETY: `n` is NUL-terminated; the call does not follow symlinks.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), n.as_ptr(), uid, gid, flags) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }).map(drop)
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is writable memory of the right size.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded and filled `st`.
    Ok(unsafe { st.assume_init() })
}

pub fn lseek_set(fd: BorrowedFd<'_>, off: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as i64, libc::SEEK_SET) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One directory entry from `getdents64`.
pub struct RawDirent<'a> {
    pub off: u64,
    pub name: &'a CStr,
}

/// Reads a batch of entries; an empty vector is the end of the directory.
pub fn getdents<'a>(fd: BorrowedFd<'_>, buf: &'a mut [u8]) -> io::Result<Vec<RawDirent<'a>>> {
    // SAFETY: `buf` is writable for `buf.len()` bytes.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let buf = &buf[..n as usize];
    let mut out = Vec::new();
    let mut pos = 0usize;
    // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name.
    while pos + 19 <= buf.len() {
        let off = u64::from_ne_bytes(buf[pos + 8..pos + 16].try_into().unwrap_or([0; 8]));
        let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
        if reclen < 20 || pos + reclen > buf.len() {
            break;
        }
        let name = CStr::from_bytes_until_nul(&buf[pos + 19..pos + reclen])
            .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        out.push(RawDirent { off, name });
        pos += reclen;
    }
    Ok(out)
}

/// Waits until `fd` has one of `events` (or an error or hang-up) or
/// `timeout` passes; whether it has. The timeout is rounded up to whole
/// milliseconds, so that a wait for what is left of a deadline never
/// spins on a zero timeout.
fn wait_for(fd: BorrowedFd<'_>, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms =
        libc::c_int::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `p` is one valid pollfd and we pass a count of one.
    let n = check(unsafe { libc::poll(&mut p, 1, ms) })?;
    Ok(n > 0)
}

/// Waits until `fd` is readable (for a listener: a connection is
/// pending) or `timeout` passes; whether it is readable. Unlike a
/// blocking accept(2), which reserves a descriptor for the connection it
/// waits for, this holds none.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    wait_for(fd, libc::POLLIN, timeout)
}

/// Waits until the socket `fd` can take more bytes (or failed) or
/// `timeout` passes; whether it can.
pub fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    wait_for(fd, libc::POLLOUT, timeout)
}

/// Sends what the socket `fd` takes of `buf` now, without blocking
/// (`MSG_DONTWAIT`: the descriptor's own blocking mode, shared with its
/// reader, is left alone) and without SIGPIPE; `WouldBlock` if it takes
/// nothing.
pub fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is readable for `buf.len()` bytes; the kernel only
    // reads it.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The `/proc` path of our own descriptor `fd`: what the calls that take
/// no empty path on an `O_PATH` descriptor (on older kernels) act on.
fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `fchmodat2(fd, "", mode, AT_EMPTY_PATH)`: changes the mode of what
/// `fd` (also an `O_PATH` descriptor) refers to, without opening it. On a
/// kernel without fchmodat2 (before 6.6), through `/proc/self/fd`.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: the path is a valid NUL-terminated (empty) string; with
    // AT_EMPTY_PATH the call acts on `fd` itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode,
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    let p = proc_fd_path(fd);
    // SAFETY: `p` is a valid NUL-terminated path naming our own
    // descriptor.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// `utimensat(fd, "", times, AT_EMPTY_PATH)`: sets the times of what `fd`
/// (also an `O_PATH` descriptor) refers to, without opening it; through
/// `/proc/self/fd` on a kernel that refuses the empty path.
pub fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: the path is a valid NUL-terminated (empty) string and
    // `times` points to two valid timespecs.
    let r = unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    let p = proc_fd_path(fd);
    // SAFETY: `p` is a valid NUL-terminated path naming our own
    // descriptor and `times` points to two valid timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

/// Raises the soft descriptor limit to the hard one; returns the soft
/// limit now in force (1024, the usual default, if it cannot be read).
pub fn raise_nofile_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `raised` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        lim = raised;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

fn termination_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised by sigemptyset just above.
    let mut set = unsafe { set.assume_init() };
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `set` is a valid, initialised signal set.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and the threads
/// it starts afterwards, so that [`wait_termination`] receives them.
pub fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: `set` is a valid signal set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits up to `timeout` for a blocked termination signal; returns it.
pub fn wait_termination(timeout: Duration) -> Option<i32> {
    let set = termination_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    // SAFETY: `set` and `ts` are valid; no siginfo is requested.
    let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}
