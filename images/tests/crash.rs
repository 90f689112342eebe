//! A process killed (SIGKILL) while it writes to a disk leaves an overlay
//! that reopens consistent: every sector holds its contents from before
//! the process started or those of one of its writes to that sector, and
//! writes a flush returned for are there (unless written over later).
//!
//! The writer is this test binary run again with `VMPLANT_IMAGES_CRASH_DIR`
//! set (the `crash_child` test, which does nothing otherwise). Its writes
//! follow from a seed, so the parent can tell which write a sector's
//! contents come from.

use images::{Disk, Store};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SECTOR: usize = 512;
const SECTORS: u64 = 8192; // 4 MiB
const CS: u32 = 64 * 1024;
const ENV_DIR: &str = "VMPLANT_IMAGES_CRASH_DIR";
const ENV_ROUND: &str = "VMPLANT_IMAGES_CRASH_ROUND";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Write number `tag` (from 1) of round `round`: first sector and count.
fn write_n(round: u64, tag: u64) -> (u64, u64) {
    let mut r = Rng((round << 32 | tag).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    r.next();
    // Mostly small writes (copy-ups of 4 KiB blocks), some long ones.
    let count = if r.next() & 7 == 0 {
        1 + r.next() % 300
    } else {
        1 + r.next() % 8
    };
    let first = r.next() % (SECTORS - count);
    (first, count)
}

/// The contents write `tag` of round `round` gives sector `s`.
fn sector_bytes(round: u64, tag: u64, s: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(SECTOR);
    b.extend_from_slice(b"CRASHSEC");
    b.extend_from_slice(&round.to_le_bytes());
    b.extend_from_slice(&tag.to_le_bytes());
    b.extend_from_slice(&s.to_le_bytes());
    let mut r = Rng((round * 1_000_003 + tag * 8191 + s) | 1);
    while b.len() < SECTOR {
        b.push(r.next() as u8);
    }
    b
}

fn open(dir: &Path) -> Disk {
    let store = Store::open(&dir.join("store")).unwrap();
    Disk::open(&store, "base", &dir.join("vm.ovl")).unwrap()
}

#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(ENV_DIR) else {
        return;
    };
    let round: u64 = std::env::var(ENV_ROUND).unwrap().parse().unwrap();
    let disk = open(Path::new(&dir));
    for tag in 1.. {
        let (first, count) = write_n(round, tag);
        let mut buf = Vec::with_capacity(count as usize * SECTOR);
        for s in first..first + count {
            buf.extend_from_slice(&sector_bytes(round, tag, s));
        }
        disk.write_at(&buf, first * SECTOR as u64).unwrap();
        if tag & 15 == 0 {
            disk.flush().unwrap();
            println!("flushed {tag}");
        }
    }
}

#[test]
fn killed_writer_leaves_old_or_new_sectors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = Store::open_or_create(&dir.join("store"), CS).unwrap();
    let mut rng = Rng(0x1234_5678);
    let base: Vec<u8> = (0..SECTORS as usize * SECTOR)
        .map(|_| rng.next() as u8)
        .collect();
    std::fs::write(dir.join("base.raw"), &base).unwrap();
    store
        .import("base", &dir.join("base.raw"), &mut |_| {})
        .unwrap();

    let mut before = base;
    for round in 1..=4u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV_DIR, dir)
            .env(ENV_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("flushed ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        // Let it write and flush a while, then kill it wherever it is.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the writer never flushed");
        std::thread::sleep(Duration::from_millis(50 + 40 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let flushed = rx.try_iter().fold(first, u64::max);

        // The last write of each sector a flush covered.
        let mut floor = vec![0u64; SECTORS as usize];
        for tag in 1..=flushed {
            let (f, c) = write_n(round, tag);
            for s in f..f + c {
                floor[s as usize] = tag;
            }
        }
        let disk = open(dir);
        let mut now = vec![0u8; SECTORS as usize * SECTOR];
        disk.read_at(&mut now, 0).unwrap();
        let (mut new, mut old) = (0, 0);
        for s in 0..SECTORS {
            let range = s as usize * SECTOR..(s as usize + 1) * SECTOR;
            let got = &now[range.clone()];
            if got == &before[range] {
                assert_eq!(
                    floor[s as usize], 0,
                    "round {round}: sector {s} lost a flushed write"
                );
                old += 1;
                continue;
            }
            assert!(
                got.starts_with(b"CRASHSEC"),
                "round {round}: sector {s} holds neither old nor new contents"
            );
            let field =
                |i: usize| u64::from_le_bytes(got[8 + 8 * i..16 + 8 * i].try_into().unwrap());
            let (r, tag) = (field(0), field(1));
            assert_eq!(r, round, "round {round}: sector {s} is from round {r}");
            let (f, c) = write_n(round, tag);
            assert!(
                (f..f + c).contains(&s),
                "round {round}: sector {s} holds write {tag}, which did not write it"
            );
            assert_eq!(
                got,
                sector_bytes(round, tag, s),
                "round {round}: sector {s} is torn"
            );
            assert!(
                tag >= floor[s as usize],
                "round {round}: sector {s} lost flushed write {}",
                floor[s as usize]
            );
            new += 1;
        }
        eprintln!("round {round}: {flushed}+ writes flushed, {new} sectors new, {old} old");
        assert!(new > 0);
        drop(disk);
        before = now;
    }
}
