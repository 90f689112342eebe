//! docs/getting-started.md runs as written: every fenced block whose info
//! string is `sh test` is run by bash (`set -euo pipefail`), each in a
//! fresh empty directory, with `vmplant` (the binary under test) first on
//! PATH and `$PROBE` the test guest, as the guide's "Before you start"
//! sets them. A block starts and stops its own background processes;
//! whatever it leaves running is killed with its process group, and a
//! block that runs over its time limit fails.
//!
//! Needs what the guide needs: root (TAPs, network namespaces, FUSE),
//! /dev/kvm, `ip`, `ping`, `openssl`, `fusermount3`.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmplant_tests::{probe_elf, root, vmplant};

const BLOCK_LIMIT: Duration = Duration::from_secs(180);

/// A block to run: the line its text starts on, and the text.
struct Block {
    line: usize,
    heading: String,
    text: String,
}

/// The `sh test` blocks of a Markdown text, with the heading above each.
fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    let mut heading = String::new();
    for (i, line) in md.lines().enumerate() {
        if current.is_some() && line.trim_end() == "```" {
            out.extend(current.take());
        } else if let Some(b) = &mut current {
            b.text.push_str(line);
            b.text.push('\n');
        } else if line.trim_end() == "```sh test" {
            current = Some(Block {
                line: i + 2,
                heading: heading.clone(),
                text: String::new(),
            });
        } else if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_string();
        }
    }
    assert!(current.is_none(), "a ```sh test block is not closed");
    out
}

/// Runs one block; returns its combined output, or why it failed.
fn run(block: &Block) -> Result<String, String> {
    let dir = tempfile::Builder::new()
        .prefix("vmplant-guide-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let script = dir.path().join("block.sh");
    std::fs::write(&script, format!("set -euo pipefail\n{}", block.text))
        .map_err(|e| e.to_string())?;
    let bin = vmplant();
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = dir.path().join("output");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new("bash")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("PROBE", probe_elf())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group, so that what it leaves behind can go.
        .process_group(0)
        .spawn()
        .map_err(|e| e.to_string())?;
    let pgid = child.id() as i32;
    let deadline = Instant::now() + BLOCK_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // kill(2) on the block's own process group (its pid, made
    // leader above) has no memory effects.
    // SAFETY: sound for the reasons just given.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(output),
        Some(s) => Err(format!("exited with {s}\n{output}")),
        None => Err(format!("ran over {BLOCK_LIMIT:?}\n{output}")),
    }
}

#[test]
fn the_guide_has_tested_blocks_for_each_use_case() {
    let md = std::fs::read_to_string(root().join("docs/getting-started.md")).unwrap();
    let blocks = blocks(&md);
    let all = blocks.iter().map(|b| b.text.as_str()).collect::<String>();
    for needle in [
        "vmplant run --kernel",
        "vmplant run --config",
        "vmplant vnet",
        "--listen udp:",
        "--listen tls:",
        "vmplant pki",
        "vmplant gvfs serve",
        "vmplant gvfs mount",
        "--fs data=",
    ] {
        assert!(all.contains(needle), "no tested block has {needle:?}");
    }
}

#[test]
fn the_guide_runs_as_written() {
    let md = std::fs::read_to_string(root().join("docs/getting-started.md")).unwrap();
    let blocks = blocks(&md);
    assert!(blocks.len() >= 6, "only {} tested blocks", blocks.len());
    let mut failed = Vec::new();
    for b in &blocks {
        let started = Instant::now();
        match run(b) {
            Ok(_) => eprintln!(
                "guide line {} ({}): ok in {:.1} s",
                b.line,
                b.heading,
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("guide line {} ({}): FAILED: {e}", b.line, b.heading);
                failed.push(format!("line {} ({})", b.line, b.heading));
            }
        }
    }
    assert!(failed.is_empty(), "guide blocks failed: {failed:?}");
}
