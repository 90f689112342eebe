//! Driving Firecracker through its API socket: booting the test guest from
//! a configuration file, `PATCH /vm` Paused then `PUT /snapshot/create`
//! Full to save it, `PUT /snapshot/load` (File backend, `resume_vm`) to
//! restore it in a fresh process.

use super::create::CreateSample;
use super::host::disk_use;
use super::http::{fc_call, fc_request};
use super::procs::Guest;
use super::{Result, Saved, Setup, io_err};
use crate::cli::bench::measure::ms;
use serde_json::json;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Firecracker with its API socket at `sock`, logging warnings to `log`,
/// which this creates first: Firecracker opens its log file but does not
/// create it.
pub(super) fn command(setup: &Setup, sock: &Path, log: &Path) -> Result<Command> {
    std::fs::File::create(log).map_err(io_err("create", log))?;
    let mut cmd = Command::new(&setup.firecracker);
    cmd.arg("--api-sock")
        .arg(sock)
        .args(["--no-seccomp", "--level", "Warn", "--log-path"])
        .arg(log);
    Ok(cmd)
}

/// Boots the test guest with `cmdline` and `mem` MiB from a configuration
/// file `name`.json, with its API socket at `sock`; its console goes to
/// `console`, its standard error to `stderr`, its log to `name`.fclog.
pub(super) fn boot(
    setup: &Setup,
    name: &str,
    cmdline: &str,
    mem: u32,
    sock: &Path,
    console: &Path,
    stderr: &Path,
) -> Result<Guest> {
    let config = setup.path(&format!("{name}.json"));
    let spec = json!({
        "boot-source": { "kernel_image_path": setup.kernel, "boot_args": cmdline },
        "machine-config": { "vcpu_count": setup.args.vcpus, "mem_size_mib": mem },
        "drives": [],
    });
    std::fs::write(&config, spec.to_string()).map_err(io_err("write", &config))?;
    let fc_log = setup.path(&format!("{name}.fclog"));
    let mut cmd = command(setup, sock, &fc_log)?;
    cmd.arg("--config-file").arg(&config);
    let mut g = Guest::spawn(format!("firecracker {name}"), &mut cmd, console, stderr)?;
    // Its log says more than its standard error.
    g.log = fc_log;
    Ok(g)
}

/// Saves the running `guest` through its API socket `sock` into
/// `dest`.state and `dest`.mem, leaving it paused: the pause and create
/// calls, each timed, then the files' disk use.
pub(super) fn save(guest: &mut Guest, sock: &Path, dest: &Path) -> Result<(CreateSample, Saved)> {
    let state = dest.with_extension("state");
    let memory = dest.with_extension("mem");
    let pause = fc_request(sock, "PATCH", "/vm", &json!({"state": "Paused"}))
        .map_err(|e| guest.failed(&e))?;
    let create = fc_request(
        sock,
        "PUT",
        "/snapshot/create",
        &json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory}),
    )
    .map_err(|e| guest.failed(&e))?;
    let files = vec![state, memory];
    let (disk, apparent) = disk_use(&files)?;
    Ok((
        CreateSample {
            wall_ms: ms(pause + create),
            own_ms: None,
            pause_ms: Some(ms(pause)),
            create_ms: Some(ms(create)),
            disk_bytes: disk,
            apparent_bytes: apparent,
            data_bytes: None,
        },
        Saved {
            files,
            dir: dest.to_path_buf(),
        },
    ))
}

/// Loads `saved` into the fresh Firecracker on the other end of `stream`
/// and resumes it; the load call's time.
pub(super) fn load(stream: &mut UnixStream, saved: &Saved) -> Result<Duration, String> {
    let [state, memory] = [&saved.files[0], &saved.files[1]];
    fc_call(
        stream,
        "PUT",
        "/snapshot/load",
        &json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": memory},
            "resume_vm": true,
        }),
    )
}
