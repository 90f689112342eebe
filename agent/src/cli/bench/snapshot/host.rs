//! /proc and file figures: the host's MemAvailable, CPU use and memory
//! counters, a process's PSS, and files' disk use.

use super::{Result, io_err};
use serde_json::{Value, json};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

/// A `Name:  N kB` field of /proc/meminfo or /proc/PID/smaps_rollup, in
/// KiB.
pub(super) fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// The host's MemAvailable, in KiB.
pub(super) fn mem_available_kib() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable",
    )
}

/// The busy and total jiffies of all CPUs, from the `cpu` line of
/// /proc/stat (busy: all but idle and iowait).
fn parse_cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total - v[3] - v[4], total))
}

fn cpu_jiffies() -> Option<(u64, u64)> {
    parse_cpu_jiffies(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// How many CPUs were busy, on average, over the next `period`.
pub(super) fn cpu_busy(period: Duration) -> Option<f64> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (b0, t0) = cpu_jiffies()?;
    std::thread::sleep(period);
    let (b1, t1) = cpu_jiffies()?;
    (t1 > t0).then(|| cpus * (b1 - b0) as f64 / (t1 - t0) as f64)
}

/// The /proc/meminfo fields that show where the clones' memory went.
const MEMINFO_FIELDS: [&str; 8] = [
    "AnonPages",
    "Cached",
    "Shmem",
    "Slab",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "SecPageTables",
];

/// How much each of [`MEMINFO_FIELDS`] grew from `before` to `after`
/// (/proc/meminfo texts), in KiB; fields missing from either are left out.
pub(super) fn meminfo_growth(before: &str, after: &str) -> serde_json::Map<String, Value> {
    MEMINFO_FIELDS
        .iter()
        .filter_map(|f| {
            let (b, a) = (kib_field(before, f)?, kib_field(after, f)?);
            Some((f.to_string(), json!(a as i64 - b as i64)))
        })
        .collect()
}

/// A process's proportional set size, in KiB: total, anonymous, file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pss {
    pub(super) total: u64,
    pub(super) anon: u64,
    pub(super) file: u64,
}

fn parse_pss(smaps_rollup: &str) -> Option<Pss> {
    Some(Pss {
        total: kib_field(smaps_rollup, "Pss")?,
        anon: kib_field(smaps_rollup, "Pss_Anon").unwrap_or(0),
        file: kib_field(smaps_rollup, "Pss_File").unwrap_or(0),
    })
}

pub(super) fn pss_of(pid: u32) -> Option<Pss> {
    parse_pss(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

/// Bytes allocated on disk (`st_blocks` * 512) and apparent sizes of
/// some files.
pub(super) fn disk_use(files: &[PathBuf]) -> Result<(u64, u64)> {
    let mut allocated = 0;
    let mut apparent = 0;
    for f in files {
        let m = std::fs::metadata(f).map_err(io_err("stat", f))?;
        allocated += m.blocks() * 512;
        apparent += m.len();
    }
    Ok((allocated, apparent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pss_and_meminfo() {
        let rollup = "55b228a50000-7fffaf9c7000 ---p 00000000 00:00 0    [rollup]\n\
                      Rss:                5348 kB\nPss:                4141 kB\n\
                      Pss_Dirty:           524 kB\nPss_Anon:            520 kB\n\
                      Pss_File:           3621 kB\nPss_Shmem:             0 kB\n";
        assert_eq!(
            parse_pss(rollup),
            Some(Pss {
                total: 4141,
                anon: 520,
                file: 3621
            })
        );
        assert_eq!(parse_pss("Rss: 12 kB\n"), None);
        // An older kernel without the split.
        assert_eq!(
            parse_pss("Pss:  7 kB\n"),
            Some(Pss {
                total: 7,
                anon: 0,
                file: 0
            })
        );
        let meminfo = "MemTotal:       24683524 kB\nMemFree:        17700000 kB\n\
                       MemAvailable:   23899000 kB\n";
        assert_eq!(kib_field(meminfo, "MemAvailable"), Some(23_899_000));
        assert_eq!(kib_field(meminfo, "MemAvail"), None);
        assert_eq!(kib_field("MemAvailable: 12 MB\n", "MemAvailable"), None);
        let after = "AnonPages: 1000 kB\nSlab: 50 kB\nPageTables: 10 kB\n";
        let growth = meminfo_growth("AnonPages: 400 kB\nSlab: 80 kB\n", after);
        assert_eq!(
            Value::Object(growth),
            json!({"AnonPages": 600, "Slab": -30})
        );
    }

    #[test]
    fn parses_cpu_jiffies() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\n";
        assert_eq!(parse_cpu_jiffies(stat), Some((170, 990)));
        assert_eq!(parse_cpu_jiffies("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(parse_cpu_jiffies("cpu  1 2 x 4 5\n"), None);
    }
}
