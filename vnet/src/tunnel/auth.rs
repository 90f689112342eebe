//! Keys, sessions and cookies of UDP tunnels.
//!
//! - A pre-shared [`UdpKey`] authenticates every datagram of a UDP link.
//!   The handshake (the connector's hellos, the listener's cookies) is
//!   tagged under keys derived from the shared secret alone, one per
//!   direction, so that a datagram reflected back to its sender does not
//!   pass. Everything after it belongs to a session: each hello carries a
//!   random nonce, and the session's keys (again one per direction) are
//!   derived from the secret and both nonces (HKDF-SHA256), so that a
//!   datagram of one session, or of one listener, is worth nothing on
//!   another. Each datagram of a session ends with a counter and a tag
//!   (HMAC-SHA256 over the datagram and the counter, truncated); the
//!   receiver keeps a sliding window of the counters it took (as IPsec
//!   and WireGuard do), so a datagram sent again is dropped as replayed.
//! - A listener answers a hello from an address it has not confirmed with
//!   a cookie only (as WireGuard's cookie reply and DTLS's
//!   HelloVerifyRequest do): an HMAC over the source address and port
//!   with a secret that rotates. Only a hello that echoes a valid cookie,
//!   which proves the sender receives at that address, gets an answer,
//!   and only a datagram of the session that answer starts gets a port.

use super::wire::{NONCE_LEN, Nonce};
use crate::counters::DropReason;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Bytes of the tag each datagram carries when a key is set: 128 bits,
/// HMAC-SHA-256-128 as IPsec uses it (RFC 4868).
pub const TAG_LEN: usize = 16;
/// Bytes of the counter each datagram of a keyed session carries: 64
/// bits never wrap (WireGuard's and IPsec ESN's size).
pub const COUNTER_LEN: usize = 8;
pub use super::wire::COOKIE_LEN;
/// Shortest pre-shared key accepted, in bytes (decoded from the key
/// file's hex or base64): 128 bits, what HMAC-SHA256 needs against
/// guessing.
pub const MIN_KEY_LEN: usize = 16;
/// The key length to use: 256 bits, HMAC-SHA256's own strength
/// (`openssl rand -hex 32`).
pub const RECOMMENDED_KEY_LEN: usize = 32;
/// Largest key file read: a key is a few dozen characters; anything much
/// bigger is the wrong file.
pub const MAX_KEY_FILE: u64 = 4096;
/// A cookie secret is replaced this often (and the previous one still
/// accepted), as WireGuard does: a cookie handed out is good for one to
/// two periods, long enough for any handshake.
pub const COOKIE_ROTATE: Duration = Duration::from_secs(120);
/// Counters a receiver remembers below the highest it took: a datagram
/// that far behind is dropped as too old. A sender numbers its datagrams
/// in the order it sends them (under one lock per peer), so only the
/// network reorders them: 1024 is 16 messages of 64 fragments overtaken
/// in flight, for 128 bytes per peer (IPsec's default is 64, WireGuard's
/// 8192).
pub const REPLAY_WINDOW: u64 = 1024;
/// Words of the replay window's bitmap.
const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize;
/// Salt of the key derivation (HKDF-Extract): names the protocol and its
/// version, so the same secret gives other keys anywhere else.
const KDF_SALT: &[u8] = b"vmplant vnet udp v3";

/// Errors loading a key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read key file {0}")]
    Read(String, #[source] std::io::Error),
    #[error("key file {0} is bigger than {MAX_KEY_FILE} bytes")]
    TooBig(String),
    #[error("key file {0} is neither hex nor base64 (make one with `openssl rand -hex 32`)")]
    Format(String),
    #[error(
        "key of {0} bytes is too short (at least {MIN_KEY_LEN}, {RECOMMENDED_KEY_LEN} recommended)"
    )]
    Short(usize),
}

/// HKDF-Expand (RFC 5869) of one block: HMAC(prk, info | 0x01), as a key.
fn expand(prk: &hmac::Key, info: &[&[u8]]) -> hmac::Key {
    let mut c = hmac::Context::with_key(prk);
    for i in info {
        c.update(i);
    }
    c.update(&[1]);
    hmac::Key::new(hmac::HMAC_SHA256, c.sign().as_ref())
}

const CONNECTOR_TO_LISTENER: &[u8] = b"connector to listener";
const LISTENER_TO_CONNECTOR: &[u8] = b"listener to connector";

/// A pre-shared key for UDP tunnels: both ends must have the same.
#[derive(Clone)]
pub struct UdpKey {
    /// HKDF's pseudo-random key, what every other key comes from.
    prk: hmac::Key,
    to_listener: hmac::Key,
    to_connector: hmac::Key,
}

impl std::fmt::Debug for UdpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UdpKey(..)")
    }
}

/// Hex digits to bytes; `None` unless all are hex digits, in pairs.
fn from_hex(s: &[u8]) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Base64 (standard or URL-safe alphabet, padding optional) to bytes.
fn from_base64(s: &[u8]) -> Option<Vec<u8>> {
    let body = s.strip_suffix(b"==").or(s.strip_suffix(b"=")).unwrap_or(s);
    if body.len() % 4 == 1 || (body.len() != s.len() && !s.len().is_multiple_of(4)) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in body {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6 | u32::from(v)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

impl UdpKey {
    /// A key from secret bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(secret: &[u8]) -> Result<UdpKey, AuthError> {
        if secret.len() < MIN_KEY_LEN {
            return Err(AuthError::Short(secret.len()));
        }
        let salt = hmac::Key::new(hmac::HMAC_SHA256, KDF_SALT);
        let prk = hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&salt, secret).as_ref());
        Ok(UdpKey {
            to_listener: expand(&prk, &[b"handshake ", CONNECTOR_TO_LISTENER]),
            to_connector: expand(&prk, &[b"handshake ", LISTENER_TO_CONNECTOR]),
            prk,
        })
    }

    /// A key from a file: hex (`openssl rand -hex 32 > FILE`) or base64
    /// (`openssl rand -base64 32 > FILE`), white space around it left out;
    /// at least [`MIN_KEY_LEN`] bytes once decoded.
    pub fn from_file(path: &Path) -> Result<UdpKey, AuthError> {
        let name = || path.display().to_string();
        let len = std::fs::metadata(path)
            .map_err(|e| AuthError::Read(name(), e))?
            .len();
        if len > MAX_KEY_FILE {
            return Err(AuthError::TooBig(name()));
        }
        let b = std::fs::read(path).map_err(|e| AuthError::Read(name(), e))?;
        let text = b.trim_ascii();
        let secret = if text.iter().all(u8::is_ascii_hexdigit) {
            from_hex(text)
        } else {
            from_base64(text)
        };
        UdpKey::new(&secret.ok_or_else(|| AuthError::Format(name()))?)
    }

    /// The keys of the session the two nonces start: (connector to
    /// listener, listener to connector).
    fn session(&self, connector: &Nonce, listener: &Nonce) -> (hmac::Key, hmac::Key) {
        (
            expand(
                &self.prk,
                &[b"session ", CONNECTOR_TO_LISTENER, connector, listener],
            ),
            expand(
                &self.prk,
                &[b"session ", LISTENER_TO_CONNECTOR, connector, listener],
            ),
        )
    }
}

/// Which end of a UDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    Connector,
    Listener,
}

#[cfg(test)]
thread_local! {
    /// Tags checked on this thread (tests count the work a datagram costs).
    pub(crate) static CHECKED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The tag of `parts` under `key`.
fn tag_of(key: &hmac::Key, parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut c = hmac::Context::with_key(key);
    for p in parts {
        c.update(p);
    }
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&c.sign().as_ref()[..TAG_LEN]);
    t
}

/// Whether `tag` is that of `parts` under `key`, in time that does not
/// depend on where they differ.
fn check_tag(key: &hmac::Key, parts: &[&[u8]], tag: &[u8]) -> bool {
    #[cfg(test)]
    CHECKED.with(|c| c.set(c.get() + 1));
    ct_eq(&tag_of(key, parts), tag)
}

/// Equal in time that does not depend on where the bytes differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y))) == 0
}

/// One end's key: tags its handshake datagrams, checks the other end's,
/// and starts sessions.
#[derive(Clone)]
pub(crate) struct Auth {
    key: Option<UdpKey>,
    end: End,
}

impl Auth {
    pub(crate) fn new(key: Option<&UdpKey>, end: End) -> Auth {
        Auth {
            key: key.cloned(),
            end,
        }
    }

    /// Bytes a tag adds to each handshake datagram.
    pub(crate) fn handshake_overhead(&self) -> usize {
        if self.key.is_some() { TAG_LEN } else { 0 }
    }

    /// Bytes a session adds to each datagram.
    pub(crate) fn session_overhead(&self) -> usize {
        if self.key.is_some() {
            COUNTER_LEN + TAG_LEN
        } else {
            0
        }
    }

    fn handshake_keys(&self) -> Option<(&hmac::Key, &hmac::Key)> {
        self.key.as_ref().map(|k| match self.end {
            End::Connector => (&k.to_listener, &k.to_connector),
            End::Listener => (&k.to_connector, &k.to_listener),
        })
    }

    /// Handshake datagram `body` and its tag over `body` and `context`
    /// (bytes both ends know and that are not sent: what the datagram
    /// answers), written to the start of `out`; `None` if it does not fit.
    pub(crate) fn seal_handshake<'a>(
        &self,
        body: &[u8],
        context: &[u8],
        out: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        let out = out.get_mut(..body.len() + self.handshake_overhead())?;
        let (b, t) = out.split_at_mut(body.len());
        b.copy_from_slice(body);
        if let Some((send, _)) = self.handshake_keys() {
            t.copy_from_slice(&tag_of(send, &[body, context]));
        }
        Some(out)
    }

    /// The handshake datagram without its tag, or `None` if the tag is
    /// missing or wrong (anything goes without a key).
    pub(crate) fn open_handshake<'a>(&self, d: &'a [u8], context: &[u8]) -> Option<&'a [u8]> {
        let Some((_, recv)) = self.handshake_keys() else {
            return Some(d);
        };
        let (body, tag) = d.split_at(d.len().checked_sub(TAG_LEN)?);
        check_tag(recv, &[body, context], tag).then_some(body)
    }

    /// The two halves of the session that the connector's and the
    /// listener's nonces start.
    pub(crate) fn session(&self, connector: &Nonce, listener: &Nonce) -> (Sender, Receiver) {
        let keys = self.key.as_ref().map(|k| {
            let (c2l, l2c) = k.session(connector, listener);
            match self.end {
                End::Connector => (c2l, l2c),
                End::Listener => (l2c, c2l),
            }
        });
        let (send, recv) = match keys {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        (
            Sender {
                key: send,
                next: AtomicU64::new(0),
            },
            Receiver {
                key: recv,
                window: Window::default(),
            },
        )
    }
}

/// Counter and tag that end a datagram of a session (nothing without a
/// key).
pub(crate) struct Trailer {
    b: [u8; COUNTER_LEN + TAG_LEN],
    len: usize,
}

impl Trailer {
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.b[..self.len]
    }
}

/// The sending half of a session: numbers and tags datagrams.
pub(crate) struct Sender {
    key: Option<hmac::Key>,
    next: AtomicU64,
}

impl Sender {
    /// Bytes added to each datagram.
    pub(crate) fn overhead(&self) -> usize {
        if self.key.is_some() {
            COUNTER_LEN + TAG_LEN
        } else {
            0
        }
    }

    /// The trailer of datagram `d`, with the next counter; an error once
    /// the counters are spent (2^64 datagrams: never, in practice).
    pub(crate) fn seal(&self, d: &[u8]) -> Result<Trailer, DropReason> {
        let mut t = Trailer {
            b: [0; COUNTER_LEN + TAG_LEN],
            len: 0,
        };
        let Some(key) = &self.key else {
            return Ok(t);
        };
        let n = self
            .next
            .fetch_update(Relaxed, Relaxed, |n| n.checked_add(1))
            .map_err(|_| DropReason::TxError)?;
        let n = n.to_be_bytes();
        t.b[..COUNTER_LEN].copy_from_slice(&n);
        t.b[COUNTER_LEN..].copy_from_slice(&tag_of(key, &[d, &n]));
        t.len = t.b.len();
        Ok(t)
    }
}

/// Which counters a receiver took: the highest and a bitmap of the
/// [`REPLAY_WINDOW`] below it (RFC 6479's ring of bits).
#[derive(Default)]
struct Window {
    /// One past the highest counter taken (0: none yet).
    next: u64,
    bits: [u64; WINDOW_WORDS],
}

impl Window {
    fn bit(c: u64) -> (usize, u64) {
        let i = c % REPLAY_WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Whether counter `c` may be taken: newer than any, or within the
    /// window and not taken yet (never `u64::MAX`, which no sender uses).
    fn fresh(&self, c: u64) -> bool {
        if c == u64::MAX {
            return false;
        }
        if c >= self.next {
            return true;
        }
        if self.next - c > REPLAY_WINDOW {
            return false;
        }
        let (w, b) = Window::bit(c);
        self.bits[w] & b == 0
    }

    /// Takes counter `c` (checked with [`Window::fresh`]).
    fn take(&mut self, c: u64) {
        if c >= self.next {
            if c - self.next >= REPLAY_WINDOW {
                self.bits = [0; WINDOW_WORDS];
            } else {
                for k in self.next..=c {
                    let (w, b) = Window::bit(k);
                    self.bits[w] &= !b;
                }
            }
            self.next = c.saturating_add(1);
        }
        let (w, b) = Window::bit(c);
        self.bits[w] |= b;
    }
}

/// The receiving half of a session: checks tags and counters.
pub(crate) struct Receiver {
    key: Option<hmac::Key>,
    window: Window,
}

impl Receiver {
    /// The datagram without counter and tag; `Replayed` if its counter was
    /// taken already or is too old (found before any tag is computed),
    /// `Unauthenticated` if the tag is missing or wrong. Anything goes
    /// without a key.
    pub(crate) fn open<'a>(&mut self, d: &'a [u8]) -> Result<&'a [u8], DropReason> {
        let Some(key) = &self.key else {
            return Ok(d);
        };
        let body_len = d
            .len()
            .checked_sub(COUNTER_LEN + TAG_LEN)
            .ok_or(DropReason::Unauthenticated)?;
        let (body, rest) = d.split_at(body_len);
        let (n, tag) = rest.split_at(COUNTER_LEN);
        let mut c = [0u8; COUNTER_LEN];
        c.copy_from_slice(n);
        let c = u64::from_be_bytes(c);
        if !self.window.fresh(c) {
            return Err(DropReason::Replayed);
        }
        if !check_tag(key, &[body, n], tag) {
            return Err(DropReason::Unauthenticated);
        }
        self.window.take(c);
        Ok(body)
    }
}

/// A random nonce.
pub(crate) fn nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&random_bytes()[..NONCE_LEN]);
    n
}

/// 32 random bytes.
fn random_bytes() -> [u8; 32] {
    static FALLBACKS: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 32];
    if SystemRandom::new().fill(&mut b).is_err() {
        // getrandom(2) does not fail once the kernel is seeded; if it ever
        // does, bytes from the clock, the process and a counter are still
        // unknown to an off-path peer and never the same twice.
        tracing::error!("no system randomness; using the clock");
        let t = format!(
            "{:?} {} {}",
            Instant::now(),
            std::process::id(),
            FALLBACKS.fetch_add(1, Relaxed)
        );
        let k = hmac::Key::new(hmac::HMAC_SHA256, &b);
        b.copy_from_slice(hmac::sign(&k, t.as_bytes()).as_ref());
    }
    b
}

fn random_key() -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, &random_bytes())
}

/// Makes and checks the cookies of one listener.
pub(crate) struct Cookies {
    current: hmac::Key,
    previous: hmac::Key,
    rotated: Instant,
}

fn addr_bytes(a: SocketAddr) -> ([u8; 19], usize) {
    let mut b = [0u8; 19];
    let n = match a {
        SocketAddr::V4(v) => {
            b[0] = 4;
            b[1..5].copy_from_slice(&v.ip().octets());
            5
        }
        SocketAddr::V6(v) => {
            b[0] = 6;
            b[1..17].copy_from_slice(&v.ip().octets());
            17
        }
    };
    b[n..n + 2].copy_from_slice(&a.port().to_be_bytes());
    (b, n + 2)
}

fn cookie_with(key: &hmac::Key, from: SocketAddr) -> [u8; COOKIE_LEN] {
    let (b, n) = addr_bytes(from);
    let mut c = [0u8; COOKIE_LEN];
    c.copy_from_slice(&hmac::sign(key, &b[..n]).as_ref()[..COOKIE_LEN]);
    c
}

impl Default for Cookies {
    fn default() -> Self {
        Cookies::new()
    }
}

impl Cookies {
    pub(crate) fn new() -> Cookies {
        Cookies {
            current: random_key(),
            previous: random_key(),
            rotated: Instant::now(),
        }
    }

    fn rotate_if_due(&mut self) {
        if self.rotated.elapsed() >= COOKIE_ROTATE {
            self.previous = std::mem::replace(&mut self.current, random_key());
            self.rotated = Instant::now();
        }
    }

    /// The cookie for a sender at `from`.
    pub(crate) fn make(&mut self, from: SocketAddr) -> [u8; COOKIE_LEN] {
        self.rotate_if_due();
        cookie_with(&self.current, from)
    }

    /// Whether `cookie` is one this listener gave to `from` lately.
    pub(crate) fn check(&mut self, from: SocketAddr, cookie: &[u8]) -> bool {
        self.rotate_if_due();
        ct_eq(&cookie_with(&self.current, from), cookie)
            || ct_eq(&cookie_with(&self.previous, from), cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(k: Option<&UdpKey>) -> (Auth, Auth) {
        (Auth::new(k, End::Connector), Auth::new(k, End::Listener))
    }

    #[test]
    fn handshake_tags_check_one_direction_one_key_and_the_context() {
        let k = UdpKey::new(b"0123456789abcdef0123").unwrap();
        let (c, l) = ends(Some(&k));
        let mut buf = [0u8; 64];
        let mut d = c
            .seal_handshake(b"hello", b"ctx", &mut buf)
            .unwrap()
            .to_vec();
        assert_eq!(d.len(), 5 + TAG_LEN);
        assert_eq!(l.open_handshake(&d, b"ctx"), Some(&b"hello"[..]));
        assert_eq!(l.open_handshake(&d, b"other"), None, "another context");
        assert_eq!(c.open_handshake(&d, b"ctx"), None, "reflected");
        let other = UdpKey::new(b"another key of 20 by").unwrap();
        assert_eq!(ends(Some(&other)).1.open_handshake(&d, b"ctx"), None);
        d[0] ^= 1;
        assert_eq!(l.open_handshake(&d, b"ctx"), None);
        assert_eq!(l.open_handshake(&[], b""), None);
        assert_eq!(l.open_handshake(&[1; TAG_LEN - 1], b""), None);
        let (none, _) = ends(None);
        let d = none.seal_handshake(b"x", b"", &mut buf).unwrap();
        assert_eq!((none.handshake_overhead(), d), (0, &b"x"[..]));
        assert!(
            c.seal_handshake(&[0; 60], b"", &mut buf).is_none(),
            "too big"
        );
        assert!(matches!(UdpKey::new(b"short"), Err(AuthError::Short(5))));
    }

    /// `d` and its trailer from `s`.
    fn sealed(s: &Sender, d: &[u8]) -> Vec<u8> {
        let mut v = d.to_vec();
        v.extend_from_slice(s.seal(d).unwrap().as_slice());
        v
    }

    #[test]
    fn sessions_drop_replays_and_each_others_datagrams() {
        let k = UdpKey::new(&[3; 32]).unwrap();
        let (c, l) = ends(Some(&k));
        let (n1, n2, n3) = ([1; NONCE_LEN], [2; NONCE_LEN], [3; NONCE_LEN]);
        let (cs, mut cr) = c.session(&n1, &n2);
        let (ls, mut lr) = l.session(&n1, &n2);
        let d0 = sealed(&cs, b"zero");
        assert_eq!(d0.len(), 4 + COUNTER_LEN + TAG_LEN);
        let d1 = sealed(&cs, b"one");
        // Out of order is fine, once each.
        assert_eq!(lr.open(&d1), Ok(&b"one"[..]));
        assert_eq!(lr.open(&d0), Ok(&b"zero"[..]));
        assert_eq!(lr.open(&d0), Err(DropReason::Replayed));
        assert_eq!(lr.open(&d1), Err(DropReason::Replayed));
        // Reflected back to its sender: the other direction's key.
        assert_eq!(
            cr.open(&sealed(&cs, b"x")),
            Err(DropReason::Unauthenticated)
        );
        assert_eq!(cr.open(&sealed(&ls, b"back")), Ok(&b"back"[..]));
        // Another session of the same key (another listener nonce).
        let (_, mut other) = l.session(&n1, &n3);
        assert_eq!(
            other.open(&sealed(&cs, b"y")),
            Err(DropReason::Unauthenticated)
        );
        // A forged counter does not pass, nor move the window.
        let mut f = sealed(&cs, b"z");
        f[1 + 7] = 0xff;
        assert_eq!(lr.open(&f), Err(DropReason::Unauthenticated));
        assert_eq!(
            lr.open(&[0; COUNTER_LEN + TAG_LEN - 1]),
            Err(DropReason::Unauthenticated)
        );
        // Far behind the newest is too old, however valid.
        let old = sealed(&cs, b"old");
        for _ in 0..REPLAY_WINDOW {
            lr.open(&sealed(&cs, b"n")).unwrap();
        }
        assert_eq!(lr.open(&old), Err(DropReason::Replayed));
        // Without a key, anything passes as it is.
        let (s, mut r) = ends(None).0.session(&n1, &n2);
        assert_eq!(s.overhead(), 0);
        assert_eq!(r.open(&sealed(&s, b"p")), Ok(&b"p"[..]));
    }

    #[test]
    fn the_replay_window_slides() {
        let mut w = Window::default();
        for c in [5, 3, 1000, 1000 + REPLAY_WINDOW, 7000] {
            assert!(w.fresh(c), "{c}");
            w.take(c);
            assert!(!w.fresh(c), "{c}");
        }
        assert!(!w.fresh(7000 - REPLAY_WINDOW), "too old");
        assert!(w.fresh(7001 - REPLAY_WINDOW) && w.fresh(6999));
        w.take(6999);
        assert!(!w.fresh(6999) && w.fresh(6998));
        w.take(u64::MAX - 1);
        assert!(!w.fresh(u64::MAX - 1) && !w.fresh(u64::MAX) && !w.fresh(7000));
    }

    #[test]
    fn cookies_are_per_address_and_survive_one_rotation() {
        let mut c = Cookies::new();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:4000".parse().unwrap(),
            "10.0.0.1:4001".parse().unwrap(),
        );
        let ca = c.make(a);
        assert!(c.check(a, &ca));
        assert!(!c.check(b, &ca));
        assert!(!c.check(a, &[0; COOKIE_LEN]));
        assert!(!c.check(a, &ca[..8]));
        c.rotated -= COOKIE_ROTATE;
        assert!(c.check(a, &ca), "the previous secret still counts");
        c.rotated -= COOKIE_ROTATE;
        assert!(!c.check(a, &ca), "two rotations later it is gone");
    }

    #[test]
    fn key_files_are_hex_or_base64_of_at_least_16_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            UdpKey::from_file(&p)
        };
        // 16 hex digits are 8 bytes (64 bits), not 16.
        assert!(matches!(
            file("hex16", "0123456789abcdef\n"),
            Err(AuthError::Short(8))
        ));
        assert!(matches!(
            file("text", "correct horse battery staple\n"),
            Err(AuthError::Format(_))
        ));
        assert!(matches!(
            file("odd", &"a".repeat(33)),
            Err(AuthError::Format(_))
        ));
        assert!(matches!(
            file("b64short", "AAECAwQFBgcICQ=="),
            Err(AuthError::Short(10))
        ));
        let hex = "00112233445566778899aabbccddeeff";
        let b64 = "ABEiM0RVZneImaq7zN3u/w==";
        let raw: Vec<u8> = (0..16u8).map(|i| i * 0x11).collect();
        for (name, text) in [
            ("hex", hex),
            ("HEX", &hex.to_uppercase()),
            ("b64", b64),
            ("b64 unpadded", b64.trim_end_matches('=')),
        ] {
            let k = file(name, &format!("  {text}\n")).unwrap();
            // The same key as its decoded bytes: a tag one makes, the other takes.
            let (c, _) = ends(Some(&k));
            let (_, l) = ends(Some(&UdpKey::new(&raw).unwrap()));
            let mut buf = [0u8; 64];
            let d = c.seal_handshake(b"x", b"", &mut buf).unwrap();
            assert_eq!(l.open_handshake(d, b""), Some(&b"x"[..]), "{name}");
        }
    }
}
