//! Helpers of the virtio-blk tests: test disk files, the probe's write
//! pattern, and a probe run on disks.

use crate::{Finished, Vmm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Sectors of the test disks (4 MiB).
pub const SECTORS: u64 = 8192;

/// A 4 MiB disk file whose byte `i` is `i % 253` (no sector is like
/// another at the same offset, nor all zeros).
pub fn disk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..SECTORS * 512).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The probe's `blk-write` bytes for SEED (see tests/probe/src/blk.rs):
/// a xorshift64 stream, 8 little-endian bytes per step.
pub fn pattern(seed: u64, sectors: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(sectors as usize * 512);
    while out.len() < sectors as usize * 512 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

pub fn crc(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

/// Boots the probe with `steps` on `disks` (`--disk` values) and waits
/// for it to power off.
pub fn run(steps: &str, disks: &[&str]) -> Finished {
    let mut extra = Vec::new();
    for d in disks {
        extra.extend(["--disk", d]);
    }
    let done = Vmm::probe(&format!("{steps}+shutdown"), &extra).wait(Duration::from_secs(30));
    done.assert_success();
    done
}

/// The lines of step `kind`, in order.
pub fn lines(done: &Finished, kind: &str) -> Vec<Value> {
    done.events()
        .into_iter()
        .filter(|v| v["probe"] == kind)
        .collect()
}
