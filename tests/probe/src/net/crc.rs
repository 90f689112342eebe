//! CRC-32 (IEEE 802.3, as zlib's `crc32` and Python's `zlib.crc32`) and
//! the bulk-transfer byte pattern: byte `i` of a stream is `i % 251`.

/// Slicing-by-8 tables: `TABLES[0]` is the classic byte table, and
/// `TABLES[k][b]` is the CRC of byte `b` followed by `k` zero bytes.
const fn tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
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
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static TABLES: [[u32; 256]; 8] = tables();

/// A running CRC-32.
#[derive(Clone, Copy)]
pub struct Crc32(u32);

impl Crc32 {
    pub fn new() -> Self {
        Crc32(0xffff_ffff)
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut chunks = data.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.update_u64(u64::from_le_bytes(word));
        }
        let t = &TABLES[0];
        let mut c = self.0;
        for &b in chunks.remainder() {
            c = t[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    /// Adds the 8 bytes of `word` in little-endian order (slicing-by-8).
    #[inline]
    pub fn update_u64(&mut self, word: u64) {
        let x = word ^ u64::from(self.0);
        let t = &TABLES;
        self.0 = t[7][(x & 0xff) as usize]
            ^ t[6][((x >> 8) & 0xff) as usize]
            ^ t[5][((x >> 16) & 0xff) as usize]
            ^ t[4][((x >> 24) & 0xff) as usize]
            ^ t[3][((x >> 32) & 0xff) as usize]
            ^ t[2][((x >> 40) & 0xff) as usize]
            ^ t[1][((x >> 48) & 0xff) as usize]
            ^ t[0][(x >> 56) as usize];
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
