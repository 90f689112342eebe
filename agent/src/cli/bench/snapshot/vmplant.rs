//! Driving vmplant: `vmplant run` booting the test guest with a control
//! socket, `vmplant vm --control C snapshot DIR --stop` saving it, and
//! `vmplant run --restore DIR` restoring it.

use super::create::CreateSample;
use super::host::disk_use;
use super::procs::Guest;
use super::{Result, Saved, Setup, SnapshotBenchError};
use crate::cli::bench::measure::{describe_status, ms};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `vmplant run` booting the test guest with `cmdline` and `mem` MiB, with
/// a control socket at `sock`.
pub(super) fn boot_command(setup: &Setup, cmdline: &str, mem: u32, sock: &Path) -> Command {
    let mut cmd = Command::new(&setup.vmplant);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&setup.kernel)
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--vcpus")
        .arg(setup.args.vcpus.to_string())
        .arg("--mem")
        .arg(mem.to_string())
        .arg("--no-stdin")
        .arg("--control")
        .arg(sock)
        .env("NO_COLOR", "1");
    cmd
}

/// Saves the running `guest` into the directory `dest` through its control
/// socket `sock` with `vmplant vm snapshot --stop`: the command's wall time
/// and vmplant's own `ms`, then the files' disk use. The guest then ends.
pub(super) fn save(
    setup: &Setup,
    guest: &mut Guest,
    sock: &Path,
    dest: &Path,
) -> Result<(CreateSample, Saved)> {
    let t = Instant::now();
    let out = Command::new(&setup.vmplant)
        .arg("vm")
        .arg("--control")
        .arg(sock)
        .arg("snapshot")
        .arg(dest)
        .arg("--stop")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SnapshotBenchError::Spawn {
            what: "vmplant vm snapshot".into(),
            source,
        })?;
    let wall = t.elapsed();
    if !out.status.success() {
        return Err(guest.failed(&format!(
            "vmplant vm snapshot: {}: {}",
            describe_status(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let files = vec![dest.join("state"), dest.join("memory")];
    let (disk, apparent) = disk_use(&files)?;
    if !guest.wait_exit(Duration::from_secs(5)) {
        tracing::warn!("{}: still running 5 s after snapshot --stop", guest.what);
    }
    Ok((
        CreateSample {
            wall_ms: ms(wall),
            own_ms: reply["ms"].as_f64(),
            pause_ms: None,
            create_ms: None,
            disk_bytes: disk,
            apparent_bytes: apparent,
            data_bytes: reply["memory_data_bytes"].as_u64(),
        },
        Saved {
            files,
            dir: dest.to_path_buf(),
        },
    ))
}

/// `vmplant run --restore` of `saved`, without standard input.
pub(super) fn restore_command(setup: &Setup, saved: &Saved) -> Command {
    let mut cmd = Command::new(&setup.vmplant);
    cmd.arg("run")
        .arg("--restore")
        .arg(&saved.dir)
        .arg("--no-stdin")
        .env("NO_COLOR", "1");
    cmd
}
