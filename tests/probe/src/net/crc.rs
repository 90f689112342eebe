//! CRC-32 (IEEE 802.3, as zlib's `crc32` and Python's `zlib.crc32`) and
//! the bulk-transfer byte pattern: byte `i` of a stream is `i % 251`.

const fn table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static TABLE: [u32; 256] = table();

/// A running CRC-32.
#[derive(Clone, Copy)]
pub struct Crc32(u32);

impl Crc32 {
    pub fn new() -> Self {
        Crc32(0xffff_ffff)
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        for &b in data {
            c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    pub fn value(&self) -> u32 {
        !self.0
    }
}

/// The pattern modulus: a prime, so the pattern does not line up with
/// segment or buffer sizes.
const PERIOD: u8 = 251;

/// Position in the bulk pattern.
#[derive(Clone, Copy, Default)]
pub struct Pattern(u8);

impl Pattern {
    /// Fills `buf` with the next bytes of the pattern.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut k = self.0;
        for b in buf {
            *b = k;
            k = if k + 1 == PERIOD { 0 } else { k + 1 };
        }
        self.0 = k;
    }

    /// Whether `data` are the next bytes of the pattern (it advances anyway).
    pub fn check(&mut self, data: &[u8]) -> bool {
        let mut k = self.0;
        let mut ok = true;
        for &b in data {
            ok &= b == k;
            k = if k + 1 == PERIOD { 0 } else { k + 1 };
        }
        self.0 = k;
        ok
    }
}
