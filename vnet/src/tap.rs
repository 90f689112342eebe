//! TAP ports: a host kernel interface joined to the switch, so that host
//! processes and network namespaces share the segment. One reader thread
//! per TAP; frames leave by a non-blocking write from the ingress thread.
//! TAPs carry virtio-net headers with checksum and TCP segmentation
//! offloads, so the kernel hands over 64 KiB TCP super-frames; ports that
//! take plain frames get them segmented by the switch.

use crate::counters::DropReason;
use crate::frame::{Frame, HdrFrame, NetHdr, copy_frame};
use crate::switch::{PortId, PortKind, PortSink, Switch};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFMTU: libc::c_ulong = 0x8922;

/// Errors of TAP ports.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] io::Error),
    #[error("TUNSETIFF {0}: another process holds this TAP: stop it, or give another name")]
    Busy(String, #[source] io::Error),
    #[error("TUNSETIFF {0}: an interface of that name exists and is not a TAP: give another name")]
    NotTap(String, #[source] io::Error),
    #[error("TUNSETIFF {0}: not allowed to create a TAP: run as root (CAP_NET_ADMIN)")]
    NotAllowed(String, #[source] io::Error),
    #[error("cannot start the TAP thread")]
    Thread(#[source] io::Error),
}

fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(
    fd: RawFd,
    what: &'static str,
    req: libc::c_ulong,
    ifr: &mut libc::ifreq,
) -> Result<(), TapError> {
    // Every request used here reads or writes one ifreq, which
    // `ifr` points to for the duration of the call.
    // SAFETY: sound for the reasons just given.
    let r = unsafe { libc::ioctl(fd, req as _, ifr as *mut libc::ifreq) };
    if r < 0 {
        return Err(TapError::Ioctl(what, io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the MTU of an interface and brings it up.
fn configure(name: &str, mtu: usize) -> Result<(), TapError> {
    // SAFETY: plain socket(2) call; the result is checked.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(TapError::Ioctl("socket", io::Error::last_os_error()));
    }
    // SAFETY: `s` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl(sock.as_raw_fd(), "SIOCSIFMTU", SIOCSIFMTU, &mut req)?;
    let mut req = ifreq(name)?;
    ioctl(sock.as_raw_fd(), "SIOCGIFFLAGS", SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(sock.as_raw_fd(), "SIOCSIFFLAGS", SIOCSIFFLAGS, &mut req)
}

/// Opens a TAP device (frames without packet information), non-blocking.
fn open_tap(name: &str) -> Result<(OwnedFd, String), TapError> {
    // SAFETY: the path is a NUL-terminated literal; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(TapError::Open(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    ioctl(
        fd.as_raw_fd(),
        "TUNSETIFF",
        libc::TUNSETIFF as libc::c_ulong,
        &mut req,
    )
    .map_err(|e| match e {
        TapError::Ioctl(_, e) if e.raw_os_error() == Some(libc::EBUSY) => {
            TapError::Busy(name.to_string(), e)
        }
        TapError::Ioctl(_, e) if e.raw_os_error() == Some(libc::EINVAL) => {
            TapError::NotTap(name.to_string(), e)
        }
        TapError::Ioctl(_, e) if e.raw_os_error() == Some(libc::EPERM) => {
            TapError::NotAllowed(name.to_string(), e)
        }
        e => e,
    })?;
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD as _,
            offloads as libc::c_ulong,
        )
    } < 0
    {
        return Err(TapError::Ioctl("TUNSETOFFLOAD", io::Error::last_os_error()));
    }
    let actual: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok((fd, String::from_utf8_lossy(&actual).into_owned()))
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2) call; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

struct TapSink {
    fd: Arc<OwnedFd>,
    scratch: Mutex<Vec<u8>>,
}

/// Writes a virtio-net header and a frame in one writev(2).
fn write_frame(fd: RawFd, hdr: &[u8; NetHdr::LEN], b: &[u8]) -> Result<(), DropReason> {
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // Both iovecs point to live buffers of the given lengths,
    // which the kernel only reads.
    // SAFETY: sound for the reasons just given.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
    if n == (hdr.len() + b.len()) as isize {
        return Ok(());
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Err(DropReason::QueueFull),
        _ => Err(DropReason::TxError),
    }
}

impl PortSink for TapSink {
    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
        let hdr = frame.net_hdr().unwrap_or_default().to_bytes();
        if let Some(b) = frame.as_contiguous() {
            return write_frame(self.fd.as_raw_fd(), &hdr, b);
        }
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if !copy_frame(frame, &mut s) {
            return Err(DropReason::TxError);
        }
        write_frame(self.fd.as_raw_fd(), &hdr, &s)
    }

    fn offloads(&self) -> bool {
        true
    }
}

/// A TAP interface that is a port of a switch. Dropping it removes the
/// port and deletes the interface.
pub struct TapPort {
    name: String,
    port: PortId,
    switch: Arc<Switch>,
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl TapPort {
    /// Creates interface `name` (MTU = the switch's, up) and adds it to
    /// the switch. Move it to a namespace with `ip link set NAME netns NS`.
    pub fn create(switch: &Arc<Switch>, name: &str) -> Result<TapPort, TapError> {
        let (fd, name) = open_tap(name)?;
        configure(&name, switch.mtu())?;
        let fd = Arc::new(fd);
        let stop = Arc::new(eventfd().map_err(TapError::Thread)?);
        let sink = Arc::new(TapSink {
            fd: fd.clone(),
            scratch: Mutex::new(Vec::new()),
        });
        let port = switch.add_port(&name, PortKind::Tap, sink);
        let sw = switch.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || reader(sw, port, fd, stop2));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = switch.remove_port(port);
                return Err(TapError::Thread(e));
            }
        };
        tracing::info!(tap = %name, port, "TAP port up");
        Ok(TapPort {
            name,
            port,
            switch: switch.clone(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> PortId {
        self.port
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.switch.remove_port(self.port);
    }
}

fn reader(switch: Arc<Switch>, port: PortId, fd: Arc<OwnedFd>, stop: Arc<OwnedFd>) {
    let mut buf = vec![0u8; NetHdr::LEN + crate::switch::MAX_GSO_FRAME + 1];
    loop {
        // SAFETY: reads into a live buffer of buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            let n = n as usize;
            match buf
                .get(..NetHdr::LEN)
                .and_then(|h| <&[u8; NetHdr::LEN]>::try_from(h).ok())
            {
                Some(h) if n >= NetHdr::LEN => {
                    let hdr = NetHdr::from_bytes(h);
                    switch.ingress(
                        port,
                        &HdrFrame {
                            hdr,
                            data: &buf[NetHdr::LEN..n],
                        },
                    );
                }
                _ => switch.count_drop(port, DropReason::Runt),
            }
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {}
            _ => {
                tracing::warn!(port, error = %err, "TAP read failed; port stops receiving");
                return;
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two pollfd structs in a live array.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
    }
}
