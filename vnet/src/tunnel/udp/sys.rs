//! The socket side of UDP tunnels: buffer sizes, segmentation offload
//! (UDP_SEGMENT) and receive offload (UDP_GRO) with recvmsg(2).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Socket send and receive buffers: a few milliseconds of a 10 Gbit/s
/// link, so that bursts are not dropped by the kernel.
const SOCK_BUF: libc::c_int = 4 << 20;

pub(super) fn set_bufs(s: &UdpSocket) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: passes a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SOCK_BUF as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Sets the `SOL_UDP` option `opt` to `value`; whether it took.
fn set_udp_option(s: &UdpSocket, opt: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Turns on UDP segmentation offload (sends of up to 64 KiB are cut
/// into `mtu`-byte datagrams by the kernel) and GRO on receive. Returns
/// whether segmentation offload is on.
pub(super) fn set_offloads(s: &UdpSocket, mtu: usize) -> bool {
    set_udp_option(s, libc::UDP_GRO, 1);
    set_udp_option(s, libc::UDP_SEGMENT, mtu as libc::c_int)
}

pub(super) fn clear_segment(s: &UdpSocket) {
    set_udp_option(s, libc::UDP_SEGMENT, 0);
}

/// recvmsg(2) that also returns the source and the GRO segment size
/// (0 when the buffer holds a single datagram).
/// Whether a receive error only means "nothing yet" (the socket's read
/// timeout, or a signal): the receive loop goes round again.
pub(super) fn nothing_yet(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

pub(super) fn recv_gro(
    s: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<SocketAddr>, usize)> {
    // SAFETY: sockaddr_storage and msghdr are plain old data; zeroes are
    // valid values.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // The field is a usize in glibc and a socklen_t (u32) in musl.
    msg.msg_controllen = size_of_val(&cbuf) as _;
    // SAFETY: every pointer in `msg` points to a live buffer of the size
    // given next to it, for the duration of the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut seg = 0;
    // SAFETY: `msg` was filled in by recvmsg; the CMSG macros walk the
    // control buffer within msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a non-null header inside the control buffer.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_UDP && h.cmsg_type == libc::UDP_GRO {
            // SAFETY: `c` is a valid header; CMSG_DATA only computes an
            // address inside the control buffer.
            let data = unsafe { libc::CMSG_DATA(c) };
            // SAFETY: a UDP_GRO message carries one int after its header,
            // possibly unaligned.
            let v = unsafe { std::ptr::read_unaligned(data.cast::<libc::c_int>()) };
            seg = v.max(0) as usize;
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    let src = match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((
                a.sin6_addr.s6_addr,
                u16::from_be(a.sin6_port),
            )))
        }
        _ => None,
    };
    Ok((n as usize, src, seg))
}

/// The datagrams in a receive buffer (one, or several coalesced by GRO).
pub(super) fn datagrams(b: &[u8], seg: usize) -> std::slice::Chunks<'_, u8> {
    b.chunks(if seg == 0 { b.len().max(1) } else { seg })
}

pub(super) fn bind_any(addr: &SocketAddr) -> std::io::Result<UdpSocket> {
    if addr.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")
    } else {
        UdpSocket::bind("[::]:0")
    }
}
