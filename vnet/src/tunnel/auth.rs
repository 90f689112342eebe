//! Keys and cookies of UDP tunnels.
//!
//! - A pre-shared [`UdpKey`] authenticates every datagram of a UDP link:
//!   each carries a tag, HMAC-SHA256 over the datagram truncated to
//!   [`TAG_LEN`] bytes, with one key per direction (derived from the
//!   shared secret) so that a datagram reflected back to its sender does
//!   not pass. Datagrams without a valid tag are dropped.
//! - A listener answers a hello from an address it has not confirmed with
//!   a cookie only (as WireGuard's cookie reply and DTLS's
//!   HelloVerifyRequest do): an HMAC over the source address and port
//!   with a secret that rotates. Only a hello that echoes a valid cookie,
//!   which proves the sender receives at that address, gets a port.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes of the tag each datagram carries when a key is set: 128 bits,
/// HMAC-SHA-256-128 as IPsec uses it (RFC 4868).
pub const TAG_LEN: usize = 16;
pub use super::wire::COOKIE_LEN;
/// Shortest pre-shared key accepted: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Largest key file read: a key is a few dozen bytes; anything much
/// bigger is the wrong file.
pub const MAX_KEY_FILE: u64 = 4096;
/// A cookie secret is replaced this often (and the previous one still
/// accepted), as WireGuard does: a cookie handed out is good for one to
/// two periods, long enough for any handshake.
pub const COOKIE_ROTATE: Duration = Duration::from_secs(120);

/// Errors loading a key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read key file {0}")]
    Read(String, #[source] std::io::Error),
    #[error("key file {0} is bigger than {MAX_KEY_FILE} bytes")]
    TooBig(String),
    #[error("key of {0} bytes is too short (at least {MIN_KEY_LEN})")]
    Short(usize),
}

/// A pre-shared key for UDP tunnels: both ends must have the same.
#[derive(Clone)]
pub struct UdpKey {
    to_listener: hmac::Key,
    to_connector: hmac::Key,
}

impl std::fmt::Debug for UdpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UdpKey(..)")
    }
}

impl UdpKey {
    /// A key from secret bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(secret: &[u8]) -> Result<UdpKey, AuthError> {
        if secret.len() < MIN_KEY_LEN {
            return Err(AuthError::Short(secret.len()));
        }
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive =
            |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&master, label).as_ref());
        Ok(UdpKey {
            to_listener: derive(b"vmplant vnet udp: connector to listener"),
            to_connector: derive(b"vmplant vnet udp: listener to connector"),
        })
    }

    /// A key from a file: its content, leading and trailing white space
    /// left out (so `openssl rand -hex 32 > FILE` makes one).
    pub fn from_file(path: &Path) -> Result<UdpKey, AuthError> {
        let name = || path.display().to_string();
        let len = std::fs::metadata(path)
            .map_err(|e| AuthError::Read(name(), e))?
            .len();
        if len > MAX_KEY_FILE {
            return Err(AuthError::TooBig(name()));
        }
        let b = std::fs::read(path).map_err(|e| AuthError::Read(name(), e))?;
        UdpKey::new(b.trim_ascii())
    }
}

/// Which end of a UDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    Connector,
    Listener,
}

/// Tags datagrams one end sends and checks those it receives.
#[derive(Clone, Default)]
pub(crate) struct Auth {
    keys: Option<(hmac::Key, hmac::Key)>,
}

/// Equal in time that does not depend on where the bytes differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y))) == 0
}

impl Auth {
    pub(crate) fn new(key: Option<&UdpKey>, end: End) -> Auth {
        Auth {
            keys: key.map(|k| match end {
                End::Connector => (k.to_listener.clone(), k.to_connector.clone()),
                End::Listener => (k.to_connector.clone(), k.to_listener.clone()),
            }),
        }
    }

    /// Bytes a tag adds to each datagram.
    pub(crate) fn overhead(&self) -> usize {
        if self.keys.is_some() { TAG_LEN } else { 0 }
    }

    /// The tag to append to datagram `d` (empty without a key).
    pub(crate) fn tag(&self, d: &[u8]) -> Tag {
        match &self.keys {
            Some((send, _)) => {
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(&hmac::sign(send, d).as_ref()[..TAG_LEN]);
                Tag(Some(t))
            }
            None => Tag(None),
        }
    }

    /// The datagram without its tag, or `None` if the tag is missing or
    /// wrong (anything goes without a key).
    pub(crate) fn open<'a>(&self, d: &'a [u8]) -> Option<&'a [u8]> {
        let Some((_, recv)) = &self.keys else {
            return Some(d);
        };
        let body_len = d.len().checked_sub(TAG_LEN)?;
        let (body, tag) = d.split_at(body_len);
        let want = hmac::sign(recv, body);
        ct_eq(&want.as_ref()[..TAG_LEN], tag).then_some(body)
    }
}

/// A tag, or nothing without a key.
pub(crate) struct Tag(Option<[u8; TAG_LEN]>);

impl Tag {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Some(t) => t,
            None => &[],
        }
    }
}

fn random_key() -> hmac::Key {
    let mut b = [0u8; 32];
    if SystemRandom::new().fill(&mut b).is_err() {
        // getrandom(2) does not fail once the kernel is seeded; if it ever
        // does, a key from the clock is still unknown to an off-path peer
        // that cannot tell when this listener started.
        tracing::error!("no system randomness for the cookie secret; using the clock");
        let t = format!("{:?} {}", Instant::now(), std::process::id());
        let k = hmac::Key::new(hmac::HMAC_SHA256, &b);
        b.copy_from_slice(hmac::sign(&k, t.as_bytes()).as_ref());
    }
    hmac::Key::new(hmac::HMAC_SHA256, &b)
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

    #[test]
    fn tags_check_one_direction_and_one_key() {
        let k = UdpKey::new(b"0123456789abcdef0123").unwrap();
        let (c, l) = (
            Auth::new(Some(&k), End::Connector),
            Auth::new(Some(&k), End::Listener),
        );
        let mut d = b"hello".to_vec();
        d.extend_from_slice(c.tag(&d).as_slice());
        assert_eq!(d.len(), 5 + TAG_LEN);
        assert_eq!(l.open(&d), Some(&b"hello"[..]));
        assert_eq!(c.open(&d), None, "a reflected datagram does not pass");
        let other = UdpKey::new(b"another key of 20 by").unwrap();
        assert_eq!(Auth::new(Some(&other), End::Listener).open(&d), None);
        d[0] ^= 1;
        assert_eq!(l.open(&d), None);
        assert_eq!(l.open(&[]), None);
        assert_eq!(l.open(&[1; TAG_LEN - 1]), None);
        let none = Auth::default();
        assert_eq!((none.overhead(), none.tag(b"x").as_slice()), (0, &[][..]));
        assert!(matches!(UdpKey::new(b"short"), Err(AuthError::Short(5))));
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
}
