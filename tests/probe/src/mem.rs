//! Memory steps: `fill`, `verify` and `dirty` over a region of guest RAM
//! from [`BASE`] (32 MiB, just above the network steps' DMA pool), for
//! snapshot, restore and migration tests.
//!
//! Every 8-byte word holds [`word`]`(seed, generation, address)`, a
//! splitmix64 mix of the three, so any word can be checked alone. `fill`
//! writes generation 0 everywhere. `dirty` rewrites the region page by
//! page, in order and round and round, each page with its generation plus
//! one; it keeps in guest memory (this module's statics, which a snapshot
//! or a migration carries) how far it got, so `verify` knows each page's
//! generation: after `fill` (and any `dirty`) `verify` over the same
//! region is ok, and its crc32 equals `fill`'s only if no `dirty` ran.
//! Stale pages (an old generation a faulty migration left behind) fail.

use crate::net::crc::Crc32;
use crate::{clock, hw, lapic, serial};
use core::sync::atomic::{AtomicU64, Ordering};

/// First byte of the region (the network steps' pool ends here).
pub const BASE: u64 = 0x200_0000;
/// The identity map (and so the region) ends at 4 GiB.
const MAP_END: u64 = 1 << 32;
const PAGE: u64 = 4096;
const WORDS_PER_PAGE: u64 = PAGE / 8;
const PAGES_PER_MIB: u64 = 256;
/// Largest region, MiB (up to the 4 GiB end of the identity map).
pub const MAX_MIB: u64 = (MAP_END - BASE) >> 20;
/// Seed without a `:SEED` argument.
pub const DEFAULT_SEED: u64 = 1;

/// End of the RAM run that holds [`BASE`], from the boot memory map;
/// 0: the VMM gave no map (then the region is not checked).
static RAM_END: AtomicU64 = AtomicU64::new(0);

/// The region's generations, in guest memory so that they travel with it:
/// page `p` holds generation `GEN_BASE + (p < SPLIT)` if `p < DIRTY_PAGES`,
/// else 0. `SEED` is `fill`'s seed, which `dirty` reuses (0: no fill yet).
static SEED: AtomicU64 = AtomicU64::new(0);
static DIRTY_PAGES: AtomicU64 = AtomicU64::new(0);
static GEN_BASE: AtomicU64 = AtomicU64::new(0);
static SPLIT: AtomicU64 = AtomicU64::new(0);

/// Remembers where the RAM holding the region ends (from the boot map).
pub fn set_ram_map(ram: &crate::boot::RamMap) {
    if ram.known() {
        RAM_END.store(ram.run_end(BASE), Ordering::Relaxed);
    }
}

/// One parsed memory step.
#[derive(Clone, Copy)]
pub enum Cmd {
    Fill {
        mib: u64,
        seed: u64,
    },
    Verify {
        mib: u64,
        seed: u64,
    },
    Dirty {
        mib: u64,
        rate: u64,
        secs: Option<u64>,
    },
}

/// Parses memory step `name`: `None` if it is not one, `Err(arg)` for a
/// bad or missing argument.
pub fn parse<'a>(
    name: &str,
    args: &mut impl Iterator<Item = &'a str>,
) -> Option<Result<Cmd, &'a str>> {
    if !["fill", "verify", "dirty"].contains(&name) {
        return None;
    }
    let mut cmd = || -> Result<Cmd, &'a str> {
        let mut next = || args.next().ok_or("");
        let num = |a: &'a str, min: u64, max: u64| -> Result<u64, &'a str> {
            a.parse().ok().filter(|v| (min..=max).contains(v)).ok_or(a)
        };
        let mib = num(next()?, 1, MAX_MIB)?;
        Ok(match name {
            "fill" | "verify" => {
                let seed = match next() {
                    Err(_) => DEFAULT_SEED,
                    Ok(a) => num(a, 0, u64::MAX)?,
                };
                if name == "fill" {
                    Cmd::Fill { mib, seed }
                } else {
                    Cmd::Verify { mib, seed }
                }
            }
            _ => Cmd::Dirty {
                mib,
                rate: num(next()?, 1, 1 << 20)?,
                secs: match next() {
                    Err(_) => None,
                    Ok(a) => Some(crate::net::secs(a).ok().filter(|&s| s > 0).ok_or(a)?),
                },
            },
        })
    };
    Some(cmd())
}

/// Runs one memory step.
pub fn exec(cmd: Cmd) {
    let (name, mib) = match cmd {
        Cmd::Fill { mib, .. } => ("fill", mib),
        Cmd::Verify { mib, .. } => ("verify", mib),
        Cmd::Dirty { mib, .. } => ("dirty", mib),
    };
    let end = BASE + (mib << 20);
    let ram_end = RAM_END.load(Ordering::Relaxed);
    if ram_end != 0 && ram_end < end {
        serial::line(format_args!(
            r#"{{"probe":"{}","mib":{},"error":"RAM ends at {:#x}, the region needs {:#x}..{:#x}: give the VM at least {} MiB"}}"#,
            name,
            mib,
            ram_end,
            BASE,
            end,
            end >> 20
        ));
        return;
    }
    match cmd {
        Cmd::Fill { mib, seed } => fill(mib, seed),
        Cmd::Verify { mib, seed } => verify(mib, seed),
        Cmd::Dirty { mib, rate, secs } => dirty(mib, rate, secs),
    }
}

/// The value of the word at `addr` in generation `generation` of `seed`'s
/// pattern: splitmix64's finaliser of
/// `addr ^ seed * 0x9e3779b97f4a7c15 ^ generation * 0xd1b54a32d192ed03`
/// (wrapping arithmetic), as the README gives it for host-side checks.
pub fn word(seed: u64, generation: u64, addr: u64) -> u64 {
    let mut z = addr
        ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generation page `page` (counted from [`BASE`]) should hold.
fn generation(page: u64) -> u64 {
    if page < DIRTY_PAGES.load(Ordering::Relaxed) {
        GEN_BASE.load(Ordering::Relaxed) + u64::from(page < SPLIT.load(Ordering::Relaxed))
    } else {
        0
    }
}

/// Writes page `page` of the region with `generation`, adding its bytes to
/// `crc` if given.
fn write_page(page: u64, seed: u64, generation: u64, mut crc: Option<&mut Crc32>) {
    let start = BASE + page * PAGE;
    for i in 0..WORDS_PER_PAGE {
        let addr = start + i * 8;
        let w = word(seed, generation, addr);
        // SAFETY: `addr` is 8-aligned, inside the region, which `exec`
        // checked lies in RAM below 4 GiB (identity mapped, writable from
        // CPL3) above the image, stacks and DMA pool; no Rust object lives
        // there. Volatile, so that every page is really written (dirtied).
        unsafe { core::ptr::write_volatile(addr as *mut u64, w) };
        if let Some(c) = crc.as_deref_mut() {
            c.update_u64(w);
        }
    }
}

fn fill(mib: u64, seed: u64) {
    SEED.store(seed, Ordering::Relaxed);
    DIRTY_PAGES.store(0, Ordering::Relaxed);
    GEN_BASE.store(0, Ordering::Relaxed);
    SPLIT.store(0, Ordering::Relaxed);
    let mut crc = Crc32::new();
    for page in 0..mib * PAGES_PER_MIB {
        write_page(page, seed, 0, Some(&mut crc));
    }
    serial::line(format_args!(
        r#"{{"probe":"fill","mib":{},"crc32":"{:08x}"}}"#,
        mib,
        crc.value()
    ));
}

fn verify(mib: u64, seed: u64) {
    let mut crc = Crc32::new();
    let mut first_bad = None;
    for page in 0..mib * PAGES_PER_MIB {
        let generation = generation(page);
        let start = BASE + page * PAGE;
        for i in 0..WORDS_PER_PAGE {
            let addr = start + i * 8;
            // SAFETY: as in `write_page`: aligned, in the checked region,
            // no Rust object there; volatile so each word is really read.
            let w = unsafe { core::ptr::read_volatile(addr as *const u64) };
            crc.update_u64(w);
            if first_bad.is_none() && w != word(seed, generation, addr) {
                first_bad = Some(addr);
            }
        }
    }
    match first_bad {
        None => serial::line(format_args!(
            r#"{{"probe":"verify","mib":{},"ok":true,"crc32":"{:08x}"}}"#,
            mib,
            crc.value()
        )),
        Some(addr) => serial::line(format_args!(
            r#"{{"probe":"verify","mib":{},"ok":false,"crc32":"{:08x}","first_bad":"{:#x}"}}"#,
            mib,
            crc.value(),
            addr
        )),
    }
}

/// Time slice of `dirty`: it writes what is due, then sleeps to the next.
const SLICE_MS: u64 = 10;

fn dirty(mib: u64, rate: u64, secs: Option<u64>) {
    let pages = mib * PAGES_PER_MIB;
    let known = DIRTY_PAGES.load(Ordering::Relaxed);
    if known != 0 && known != pages {
        serial::line(format_args!(
            r#"{{"probe":"dirty","mib":{},"error":"an earlier dirty step used {} MiB: use the same size"}}"#,
            mib,
            known / PAGES_PER_MIB
        ));
        return;
    }
    DIRTY_PAGES.store(pages, Ordering::Relaxed);
    let seed = match SEED.load(Ordering::Relaxed) {
        0 => DEFAULT_SEED,
        s => s,
    };
    let second = clock::ticks_ms(1000);
    let slice = clock::ticks_ms(SLICE_MS);
    let per_sec = rate * PAGES_PER_MIB;
    // Time is counted in slices measured one by one, so that a TSC that
    // jumps (restore, migration) counts as one slice, not as the jump.
    let mut elapsed = 0u64;
    let mut written = 0u64;
    let mut reported = 0u64;
    let mut last = hw::rdtsc();
    loop {
        let now = hw::rdtsc();
        let step = now.wrapping_sub(last);
        elapsed += if step > 2 * second { slice } else { step };
        last = now;
        let due = (u128::from(per_sec) * u128::from(elapsed) / u128::from(second)) as u64;
        // At most 1 MiB between clock reads, so reports stay on time when
        // the rate is more than the memory can take.
        let batch = due.saturating_sub(written).min(PAGES_PER_MIB);
        for _ in 0..batch {
            let page = SPLIT.load(Ordering::Relaxed);
            let generation = GEN_BASE.load(Ordering::Relaxed) + 1;
            write_page(page, seed, generation, None);
            if page + 1 == pages {
                GEN_BASE.store(generation, Ordering::Relaxed);
                SPLIT.store(0, Ordering::Relaxed);
            } else {
                SPLIT.store(page + 1, Ordering::Relaxed);
            }
        }
        written += batch;
        if elapsed / second > reported {
            reported = elapsed / second;
            serial::line(format_args!(
                r#"{{"probe":"dirty","mib_written":{}}}"#,
                written / PAGES_PER_MIB
            ));
            if secs.is_some_and(|s| reported >= s) {
                break;
            }
        }
        if written >= due {
            lapic::wait(last, slice);
        }
    }
    serial::line(format_args!(
        r#"{{"probe":"dirty","mib":{},"mib_written":{},"seconds":{}}}"#,
        mib,
        written / PAGES_PER_MIB,
        reported
    ));
}
