//! The test guest's steps for snapshot, restore, clone and migration
//! tests (tests/probe/README.md, "Steps for snapshots, clones and
//! migration"), checked end to end in vmplant as a user of them would:
//! `tick` counts up in order at about its period while the vCPU sleeps,
//! `fill` and `verify` agree (and `verify` catches memory that was never
//! filled), `dirty` keeps the region verifiable, and `identity` reports
//! the MACs given with `--net`.
//!
//! Needs /dev/kvm, the `vmplant` debug build and the probe
//! (tests/probe/build.sh). Timings are loose: the host may be busy.

use serde_json::Value;
use std::time::{Duration, Instant};
use vmplant_tests::{Finished, Vmm};

const RUN: Duration = Duration::from_secs(30);

/// Where the memory steps' region starts, and their pattern, as the README
/// gives them.
const REGION: u64 = 0x200_0000;

fn pattern_word(seed: u64, generation: u64, addr: u64) -> u64 {
    let mut z = addr
        ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The lines of kind `kind`, failing with the console if there is none.
#[track_caller]
fn lines_of(done: &Finished, kind: &str) -> Vec<Value> {
    let found: Vec<Value> = done
        .events()
        .into_iter()
        .filter(|e| e["probe"] == kind)
        .collect();
    assert!(
        !found.is_empty(),
        "no {kind} line; console:\n{}\nstderr:\n{}",
        done.console(),
        done.stderr
    );
    found
}

/// Host CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) start at ") ".
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15, 12 and 13 after the command.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Runs `steps` (ending in `tick:50:5`) and checks the five ticks: n 1..5
/// in order, about 50 ms apart.
fn ticks_in_order(steps: &str, extra: &[&str]) {
    let mut vmm = Vmm::probe(&format!("{steps}+shutdown"), extra);
    let mut at = Vec::new();
    for k in 1..=5u64 {
        let line = vmm.expect_line(&format!("tick {k}"), RUN, |l| l.contains(r#""tick""#));
        let tick: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(tick, serde_json::json!({"probe":"tick","n":k}), "{line}");
        at.push(Instant::now());
    }
    // Four periods of 50 ms: not much less (the guest sleeps between
    // ticks) and not hugely more, even on a loaded host.
    let spread = at[4] - at[0];
    assert!(
        spread >= Duration::from_millis(150),
        "ticks 1..5 came within {spread:?}"
    );
    assert!(
        spread < Duration::from_secs(5),
        "ticks 1..5 took {spread:?}"
    );
    vmm.wait(RUN).assert_success();
}

#[test]
fn tick_counts_in_order_at_its_period() {
    ticks_in_order("tick:50:5", &[]);
}

#[test]
fn tick_works_with_two_vcpus() {
    ticks_in_order("smp+tick:50:5", &["--vcpus", "2"]);
}

/// Between ticks the vCPU sleeps in `hlt`, woken by the APIC timer: a
/// VM that ticks every 200 ms for 2 s must use a small part of a CPU (a
/// vCPU that spun would use all of one).
#[test]
fn a_ticking_guest_sleeps_between_ticks() {
    let mut vmm = Vmm::probe("tick:200:11+shutdown", &[]);
    vmm.expect_line("tick 1", RUN, |l| l.contains(r#""n":1}"#));
    let (cpu0, t0) = (cpu_time(vmm.pid()), Instant::now());
    vmm.expect_line("tick 11", RUN, |l| l.contains(r#""n":11}"#));
    let (cpu, wall) = (cpu_time(vmm.pid()) - cpu0, t0.elapsed());
    vmm.wait(RUN).assert_success();
    assert!(
        cpu < wall / 4,
        "the VMM used {cpu:?} of CPU in {wall:?} of ticking"
    );
}

#[test]
fn fill_then_verify_agree_on_the_documented_pattern() {
    let done = Vmm::probe("fill:2:7+verify:2:7+shutdown", &[]).wait(RUN);
    done.assert_success();
    let fill = &lines_of(&done, "fill")[0];
    let verify = &lines_of(&done, "verify")[0];
    assert_eq!(fill["mib"], 2, "{fill}");
    assert_eq!(verify["mib"], 2, "{verify}");
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(fill["crc32"], verify["crc32"], "{fill} {verify}");
    // The crc32 is zlib's over the region's bytes, which the host can
    // compute from the pattern.
    let mut crc = crc32fast::Hasher::new();
    for i in 0..(2u64 << 20) / 8 {
        crc.update(&pattern_word(7, 0, REGION + 8 * i).to_le_bytes());
    }
    assert_eq!(
        fill["crc32"],
        format!("{:08x}", crc.finalize()),
        "the fill pattern is not the documented one: {fill}"
    );
}

#[test]
fn verify_without_fill_fails() {
    let done = Vmm::probe("verify:4+shutdown", &[]).wait(RUN);
    done.assert_success();
    for verify in lines_of(&done, "verify") {
        assert_eq!(verify["ok"], false, "{verify}");
        assert_eq!(verify["first_bad"], "0x2000000", "{verify}");
        assert_eq!(verify["crc32"].as_str().map(str::len), Some(8), "{verify}");
    }
}

/// `dirty` rewrites pages with new generations and remembers how far it
/// got, so `verify` after it is still ok (with another crc32); a `verify`
/// with another seed is not.
#[test]
fn dirty_keeps_the_region_verifiable() {
    let done = Vmm::probe("fill:4:3+dirty:4:3:1+verify:4:3+verify:4:4+shutdown", &[]).wait(RUN);
    done.assert_success();
    let fill = &lines_of(&done, "fill")[0];
    let dirty = lines_of(&done, "dirty");
    let last = dirty.last().unwrap();
    assert_eq!(last["seconds"], 1, "{last}");
    let written = last["mib_written"].as_u64().unwrap();
    assert!((1..=4).contains(&written), "{last}");
    let verify = lines_of(&done, "verify");
    assert_eq!(verify[0]["ok"], true, "{}", verify[0]);
    assert_ne!(verify[0]["crc32"], fill["crc32"], "dirty changed nothing");
    assert_eq!(verify[1]["ok"], false, "{}", verify[1]);
}

/// The region must lie in RAM: with 40 MiB, 16 MiB from 32 MiB do not fit.
#[test]
fn fill_beyond_ram_is_refused() {
    let done = Vmm::probe("fill:16+shutdown", &["--mem", "40"]).wait(RUN);
    done.assert_success();
    let fill = &lines_of(&done, "fill")[0];
    let error = fill["error"].as_str().unwrap_or_default();
    assert!(error.contains("at least 48 MiB"), "{fill}");
}

#[test]
fn identity_lists_the_macs_given() {
    let macs = ["52:54:00:00:00:0c", "52:54:00:12:34:56"];
    let done = Vmm::probe("identity+shutdown", &["--net", macs[0], "--net", macs[1]]).wait(RUN);
    done.assert_success();
    let identity = &lines_of(&done, "identity")[0];
    assert_eq!(identity["macs"], serde_json::json!(macs), "{identity}");
    // A VM generation ID, if the VMM gives one, is 32 hex digits.
    match &identity["vmgenid"] {
        Value::Null => {}
        Value::String(id) => assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{identity}"
        ),
        other => panic!("vmgenid {other}"),
    }
}
