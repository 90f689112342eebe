//! The tunnel protocol.
//!
//! A message is a type byte and a payload. Over TCP and TLS each message
//! is preceded by its length (u32, big endian, counting the type byte).
//! Over UDP a datagram is one message, or a fragment of one:
//! `[FRAG][id u32][index u8][count u8][offset u32][total u32][bytes]`, so
//! that frames bigger than the path MTU are carried, not lost. Frames
//! with offload metadata (TCP super-frames from a TAP) travel whole as
//! `FRAME_HDR` messages with their virtio-net header.
//!
//! Version 2 added the UDP handshake: a UDP hello carries a cookie after
//! the hello payload (zeroes the first time); a listener answers a hello
//! that does not echo a valid cookie with a `COOKIE` message only.
//! Version 3 (this one) binds UDP links to sessions: the connector's
//! hello carries a random nonce, the listener answers a hello with a
//! valid cookie with its own hello (the connector's nonce echoed, a nonce
//! of its own), and makes a port only when a datagram of that session
//! comes back; with a key, every datagram of a session carries a counter
//! and a tag under keys derived from both nonces ([`super::auth`]), and
//! stream messages are at most [`MAX_STREAM_MSG`]. Versions do not talk
//! to each other (the hello says which).

use std::time::{Duration, Instant};

pub const MSG_HELLO: u8 = 1;
pub const MSG_FRAME: u8 = 2;
pub const MSG_MATRIX: u8 = 3;
pub const MSG_KEEPALIVE: u8 = 4;
pub const MSG_FRAG: u8 = 5;
/// A frame with offloads: a 10-byte virtio-net header, then the frame.
pub const MSG_FRAME_HDR: u8 = 6;
/// UDP only: a listener's answer to a hello from an address it has not
/// confirmed: `[COOKIE][cookie]`, to be echoed in the next hello.
pub const MSG_COOKIE: u8 = 7;

/// Largest message over a stream (type byte included): a 64 KiB
/// super-frame with its header fits, and a matrix message is trimmed to
/// it; bigger only costs each peer's reader a bigger buffer.
pub const MAX_STREAM_MSG: usize = 256 * 1024;
/// UDP fragment header length.
pub const FRAG_HEADER: usize = 15;
/// At most this many fragments per message.
pub const MAX_FRAGS: usize = 64;

const MAGIC: &[u8; 4] = b"VNET";
const VERSION: u8 = 3;
pub const HELLO_LEN: usize = 4 + 1 + 8;
/// Bytes of a UDP cookie: 128 bits (as WireGuard's cookie MAC), which
/// cannot be guessed, and small enough that the `COOKIE` reply is
/// smaller than the hello it answers (no amplification).
pub const COOKIE_LEN: usize = 16;
/// The cookie of a first hello.
pub const NO_COOKIE: [u8; COOKIE_LEN] = [0; COOKIE_LEN];
/// Bytes of a handshake nonce: 128 random bits, so that no two sessions
/// of a key share one (and so their keys).
pub const NONCE_LEN: usize = 16;
/// Zero bytes at the end of a connector's UDP hello: as many as the
/// counter that the listener's answering hello carries as the first
/// datagram of its session, so that the answer is never bigger than the
/// hello (no amplification towards a replayed hello's address).
pub const HELLO_PAD: usize = 8;
/// A connector's UDP hello payload: a hello, the cookie, its nonce, the
/// padding.
pub const UDP_HELLO_LEN: usize = HELLO_LEN + COOKIE_LEN + NONCE_LEN + HELLO_PAD;
/// A listener's UDP hello payload: a hello, the connector's nonce echoed,
/// the listener's nonce.
pub const UDP_REPLY_LEN: usize = HELLO_LEN + 2 * NONCE_LEN;

/// A handshake nonce.
pub type Nonce = [u8; NONCE_LEN];

/// Errors decoding messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a VNET hello (bad magic or version)")]
    BadHello,
    #[error("message length {0} out of range")]
    BadLength(usize),
    #[error("malformed fragment")]
    BadFragment,
    #[error("message too big for {0} fragments")]
    TooBig(usize),
    #[error("malformed cookie")]
    BadCookie,
}

/// Hello payload: magic, version, and the sender's switch id.
pub fn hello(origin: u64) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4] = VERSION;
    b[5..].copy_from_slice(&origin.to_be_bytes());
    b
}

/// Parses a hello payload; returns the peer's switch id.
pub fn parse_hello(p: &[u8]) -> Result<u64, WireError> {
    if p.len() != HELLO_LEN || &p[..4] != MAGIC || p[4] != VERSION {
        return Err(WireError::BadHello);
    }
    Ok(u64::from_be_bytes(
        p[5..13].try_into().map_err(|_| WireError::BadHello)?,
    ))
}

/// A connector's UDP hello payload: a hello, the cookie the listener gave
/// (or [`NO_COOKIE`]) and the connector's nonce.
pub fn udp_hello(origin: u64, cookie: &[u8; COOKIE_LEN], nonce: &Nonce) -> [u8; UDP_HELLO_LEN] {
    let mut b = [0u8; UDP_HELLO_LEN];
    b[..HELLO_LEN].copy_from_slice(&hello(origin));
    b[HELLO_LEN..HELLO_LEN + COOKIE_LEN].copy_from_slice(cookie);
    b[HELLO_LEN + COOKIE_LEN..HELLO_LEN + COOKIE_LEN + NONCE_LEN].copy_from_slice(nonce);
    b
}

/// Parses a connector's UDP hello payload: the peer's switch id, its
/// cookie and its nonce.
pub fn parse_udp_hello(p: &[u8]) -> Result<(u64, [u8; COOKIE_LEN], Nonce), WireError> {
    if p.len() != UDP_HELLO_LEN {
        return Err(WireError::BadHello);
    }
    let (h, rest) = p.split_at(HELLO_LEN);
    let (c, rest) = rest.split_at(COOKIE_LEN);
    let nonce = rest[..NONCE_LEN]
        .try_into()
        .map_err(|_| WireError::BadHello)?;
    Ok((parse_hello(h)?, parse_cookie(c)?, nonce))
}

/// A listener's UDP hello payload: a hello, the connector's nonce, the
/// listener's.
pub fn udp_reply(origin: u64, theirs: &Nonce, ours: &Nonce) -> [u8; UDP_REPLY_LEN] {
    let mut b = [0u8; UDP_REPLY_LEN];
    b[..HELLO_LEN].copy_from_slice(&hello(origin));
    b[HELLO_LEN..HELLO_LEN + NONCE_LEN].copy_from_slice(theirs);
    b[HELLO_LEN + NONCE_LEN..].copy_from_slice(ours);
    b
}

/// Parses a listener's UDP hello payload: its switch id, the nonce it
/// echoes and its own.
pub fn parse_udp_reply(p: &[u8]) -> Result<(u64, Nonce, Nonce), WireError> {
    if p.len() != UDP_REPLY_LEN {
        return Err(WireError::BadHello);
    }
    let (h, rest) = p.split_at(HELLO_LEN);
    let (echo, ours) = rest.split_at(NONCE_LEN);
    let bad = |_| WireError::BadHello;
    Ok((
        parse_hello(h)?,
        echo.try_into().map_err(bad)?,
        ours.try_into().map_err(bad)?,
    ))
}

/// Parses a cookie payload.
pub fn parse_cookie(p: &[u8]) -> Result<[u8; COOKIE_LEN], WireError> {
    p.try_into().map_err(|_| WireError::BadCookie)
}

/// Appends a stream message (length, type, payload) to `out`.
pub fn encode_stream(out: &mut Vec<u8>, ty: u8, payload: &[u8]) {
    out.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    out.push(ty);
    out.extend_from_slice(payload);
}

/// Checks a stream length prefix.
pub fn stream_len(h: [u8; 4]) -> Result<usize, WireError> {
    let n = u32::from_be_bytes(h) as usize;
    if n == 0 || n > MAX_STREAM_MSG {
        return Err(WireError::BadLength(n));
    }
    Ok(n)
}

/// Splits message `msg` (type byte first) into datagrams of at most
/// `mtu` bytes and calls `send` for each (with a reused buffer).
pub fn fragment(
    msg: &[u8],
    id: u32,
    mtu: usize,
    buf: &mut Vec<u8>,
    mut send: impl FnMut(&[u8]) -> bool,
) -> Result<bool, WireError> {
    let chunk = mtu.saturating_sub(FRAG_HEADER).max(1);
    let count = msg.len().div_ceil(chunk);
    if count > MAX_FRAGS || count == 0 {
        return Err(WireError::TooBig(MAX_FRAGS));
    }
    for (i, c) in msg.chunks(chunk).enumerate() {
        buf.clear();
        buf.push(MSG_FRAG);
        buf.extend_from_slice(&id.to_be_bytes());
        buf.push(i as u8);
        buf.push(count as u8);
        buf.extend_from_slice(&((i * chunk) as u32).to_be_bytes());
        buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        buf.extend_from_slice(c);
        if !send(buf) {
            return Ok(false);
        }
    }
    Ok(true)
}

struct Slot {
    id: u32,
    count: u8,
    have: u64,
    total: usize,
    buf: Vec<u8>,
    started: Instant,
    busy: bool,
}

/// Reassembles fragmented messages of one peer; a few at a time, each
/// given up after a timeout. Buffers are reused.
pub struct Reassembler {
    slots: Vec<Slot>,
    timeout: Duration,
    /// Messages given up (evicted or timed out) since the last call to
    /// [`Reassembler::take_lost`].
    lost: u64,
}

impl Reassembler {
    pub fn new(slots: usize, timeout: Duration) -> Self {
        Reassembler {
            slots: (0..slots)
                .map(|_| Slot {
                    id: 0,
                    count: 0,
                    have: 0,
                    total: 0,
                    buf: Vec::new(),
                    started: Instant::now(),
                    busy: false,
                })
                .collect(),
            timeout,
            lost: 0,
        }
    }

    pub fn take_lost(&mut self) -> u64 {
        std::mem::take(&mut self.lost)
    }

    /// Takes one fragment datagram (type byte included). Returns the
    /// whole message once its last fragment arrives.
    pub fn push(&mut self, d: &[u8], max_total: usize) -> Result<Option<&[u8]>, WireError> {
        if d.len() < FRAG_HEADER || d[0] != MSG_FRAG {
            return Err(WireError::BadFragment);
        }
        let id = u32::from_be_bytes([d[1], d[2], d[3], d[4]]);
        let (index, count) = (d[5], d[6]);
        let offset = u32::from_be_bytes([d[7], d[8], d[9], d[10]]) as usize;
        let total = u32::from_be_bytes([d[11], d[12], d[13], d[14]]) as usize;
        let bytes = &d[FRAG_HEADER..];
        if count == 0
            || count as usize > MAX_FRAGS
            || index >= count
            || total == 0
            || total > max_total
            || offset + bytes.len() > total
        {
            return Err(WireError::BadFragment);
        }
        let now = Instant::now();
        for s in self.slots.iter_mut() {
            if s.busy && now.duration_since(s.started) > self.timeout {
                s.busy = false;
                self.lost += 1;
            }
        }
        let i = match self.slots.iter().position(|s| s.busy && s.id == id) {
            Some(i) => i,
            None => {
                let i = match self.slots.iter().position(|s| !s.busy) {
                    Some(i) => i,
                    None => {
                        self.lost += 1;
                        let (i, _) = self
                            .slots
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| s.started)
                            .ok_or(WireError::BadFragment)?;
                        i
                    }
                };
                let s = &mut self.slots[i];
                s.id = id;
                s.count = count;
                s.have = 0;
                s.total = total;
                s.buf.clear();
                s.buf.resize(total, 0);
                s.started = now;
                s.busy = true;
                i
            }
        };
        let s = &mut self.slots[i];
        if s.count != count || s.total != total {
            s.busy = false;
            self.lost += 1;
            return Err(WireError::BadFragment);
        }
        s.buf[offset..offset + bytes.len()].copy_from_slice(bytes);
        s.have |= 1 << index;
        let all = if count as usize == 64 {
            u64::MAX
        } else {
            (1u64 << count) - 1
        };
        if s.have == all {
            s.busy = false;
            return Ok(Some(&s.buf[..]));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_garbage_is_refused() {
        assert_eq!(parse_hello(&hello(42)), Ok(42));
        assert_eq!(parse_hello(b"HTTP/1.1 200 OK"), Err(WireError::BadHello));
        let mut h = hello(1);
        h[4] = 9;
        assert_eq!(parse_hello(&h), Err(WireError::BadHello));
        for old in [1, 2] {
            h[4] = old;
            assert_eq!(parse_hello(&h), Err(WireError::BadHello), "version {old}");
        }
        let (c, n, m) = ([7; COOKIE_LEN], [8; NONCE_LEN], [9; NONCE_LEN]);
        assert_eq!(parse_udp_hello(&udp_hello(42, &c, &n)), Ok((42, c, n)));
        assert_eq!(parse_udp_hello(&hello(42)), Err(WireError::BadHello));
        assert_eq!(parse_udp_reply(&udp_reply(42, &n, &m)), Ok((42, n, m)));
        assert_eq!(
            parse_udp_reply(&udp_hello(42, &c, &n)),
            Err(WireError::BadHello)
        );
        assert_eq!(parse_cookie(&[1; 3]), Err(WireError::BadCookie));
        assert!(stream_len([0, 0, 0, 0]).is_err());
        assert!(stream_len([0xff, 0, 0, 0]).is_err());
        let mut out = Vec::new();
        encode_stream(&mut out, MSG_FRAME, &[1, 2, 3]);
        assert_eq!(out, [0, 0, 0, 4, MSG_FRAME, 1, 2, 3]);
    }

    #[test]
    fn fragments_reassemble_in_any_order() {
        let msg: Vec<u8> = (0..9100u32).map(|i| i as u8).collect();
        let mut dgrams = Vec::new();
        let mut buf = Vec::new();
        assert!(
            fragment(&msg, 7, 1400, &mut buf, |d| {
                assert!(d.len() <= 1400);
                dgrams.push(d.to_vec());
                true
            })
            .unwrap()
        );
        assert_eq!(dgrams.len(), 7);
        dgrams.reverse();
        let mut r = Reassembler::new(4, Duration::from_secs(1));
        let mut done = None;
        for (i, d) in dgrams.iter().enumerate() {
            let out = r.push(d, 65536).unwrap();
            if i < dgrams.len() - 1 {
                assert!(out.is_none());
            } else {
                done = out.map(|m| m.to_vec());
            }
        }
        assert_eq!(done.unwrap(), msg);
        // A lost fragment: the message never completes and is counted lost
        // once it times out.
        let mut r = Reassembler::new(1, Duration::from_millis(10));
        assert!(r.push(&dgrams[0], 65536).unwrap().is_none());
        std::thread::sleep(Duration::from_millis(20));
        let mut other = Vec::new();
        fragment(&msg[..3000], 8, 1400, &mut buf, |d| {
            other.push(d.to_vec());
            true
        })
        .unwrap();
        for d in &other {
            let _ = r.push(d, 65536).unwrap();
        }
        assert_eq!(r.take_lost(), 1);
    }

    #[test]
    fn bad_fragments_are_errors_not_panics() {
        let mut r = Reassembler::new(2, Duration::from_secs(1));
        assert!(r.push(&[MSG_FRAG; 3], 65536).is_err());
        let mut d = vec![MSG_FRAG, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 10];
        d.extend_from_slice(&[0; 20]);
        assert!(r.push(&d, 65536).is_err(), "bytes past the total");
        d[5] = 3;
        assert!(r.push(&d, 65536).is_err(), "index past the count");
        let mut x: u32 = 99;
        for len in 0..200 {
            let g: Vec<u8> = (0..len)
                .map(|i| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    if i == 0 { MSG_FRAG } else { (x >> 16) as u8 }
                })
                .collect();
            let _ = r.push(&g, 65536);
        }
        assert!(fragment(&[0; 100_000], 1, 1000, &mut Vec::new(), |_| true).is_err());
    }
}
