//! Booting and saving a guest in either VMM, and the `create` phase: how
//! long a snapshot takes and how much disk it uses.

use super::procs::{Guest, check_interrupt};
use super::{
    Medians, Result, Saved, Setup, Vmm, emit, firecracker, index, median, remove_saved, stats_of,
    vmplant,
};
use crate::cli::bench::guests::load_1m;
use crate::cli::bench::measure::round;
use serde_json::{Value, json};
use std::path::Path;

/// One snapshot's figures.
#[derive(Debug, Clone, Default)]
pub(super) struct CreateSample {
    /// The whole operation as the bench saw it: the `vmplant vm snapshot`
    /// command, or Firecracker's pause and create calls.
    pub(super) wall_ms: f64,
    /// vmplant's own `ms`.
    pub(super) own_ms: Option<f64>,
    pub(super) pause_ms: Option<f64>,
    pub(super) create_ms: Option<f64>,
    pub(super) disk_bytes: u64,
    pub(super) apparent_bytes: u64,
    /// vmplant's count of memory bytes written.
    pub(super) data_bytes: Option<u64>,
}

impl Setup {
    /// Boots the test guest with `steps` in `vmm`, with an API or control
    /// socket at `sock`; its console goes to `name`.console.
    fn boot(&self, vmm: Vmm, name: &str, mem: u32, steps: &str, sock: &Path) -> Result<Guest> {
        let cmdline = format!("console=ttyS0 probe={steps}");
        let console = self.path(&format!("{name}.console"));
        let log = self.path(&format!("{name}.log"));
        let _ = std::fs::remove_file(sock);
        match vmm {
            Vmm::Vmplant => {
                let mut cmd = vmplant::boot_command(self, &cmdline, mem, sock);
                Guest::spawn(format!("vmplant {name}"), &mut cmd, &console, &log)
            }
            Vmm::Firecracker => firecracker::boot(self, name, &cmdline, mem, sock, &console, &log),
        }
    }

    /// Saves the running `guest` into `dest` (a directory for vmplant, a
    /// file prefix for Firecracker), leaving it stopped or paused; times
    /// it, and measures the files.
    fn save(
        &self,
        vmm: Vmm,
        guest: &mut Guest,
        sock: &Path,
        dest: &Path,
    ) -> Result<(CreateSample, Saved)> {
        // Write back what earlier runs left in the page cache, outside the
        // timing.
        nix::unistd::sync();
        check_interrupt()?;
        match vmm {
            Vmm::Vmplant => vmplant::save(self, guest, sock, dest),
            Vmm::Firecracker => firecracker::save(guest, sock, dest),
        }
    }

    /// Boots a guest with `steps`, waits for `ready` on its console, saves
    /// it as `name`, and ends it.
    pub(super) fn prepare(
        &self,
        vmm: Vmm,
        name: &str,
        mem: u32,
        steps: &str,
        ready: &[&str],
    ) -> Result<(CreateSample, Saved)> {
        let sock = self.path(&format!("{name}.sock"));
        let mut guest = self.boot(vmm, name, mem, steps, &sock)?;
        for needle in ready {
            guest.wait_console(needle, self.timeout)?;
        }
        let r = self.save(vmm, &mut guest, &sock, &self.path(name));
        drop(guest);
        let _ = std::fs::remove_file(&sock);
        r
    }

    pub(super) fn create_line(
        &self,
        vmm: Vmm,
        run: Option<u32>,
        what: &str,
        s: &CreateSample,
    ) -> Value {
        json!({
            "bench": "snapshot", "phase": what, "vmm": vmm.name(), "run": run,
            "wall_ms": round(s.wall_ms, 3),
            "ms": s.own_ms.map(|m| round(m, 3)),
            "pause_ms": s.pause_ms.map(|m| round(m, 3)),
            "create_ms": s.create_ms.map(|m| round(m, 3)),
            "disk_bytes": s.disk_bytes, "apparent_bytes": s.apparent_bytes,
            "memory_data_bytes": s.data_bytes,
            "host_load_1m": load_1m(),
        })
    }

    pub(super) fn create_phase(&self, medians: &mut [Medians; 2]) -> Result<()> {
        let steps = format!("fill:{}+tick:1000", self.args.fill);
        let mut samples: [Vec<CreateSample>; 2] = [Vec::new(), Vec::new()];
        let mut failed = [0u32; 2];
        for run in 1..=self.args.runs {
            for &vmm in &self.args.only {
                let name = format!("create-{}-{run}", vmm.name());
                let r = self.prepare(
                    vmm,
                    &name,
                    self.args.mem,
                    &steps,
                    &[r#""probe":"fill""#, r#""probe":"tick""#],
                );
                match r {
                    Ok((s, saved)) => {
                        emit(&self.create_line(vmm, Some(run), "create", &s));
                        samples[index(vmm)].push(s);
                        remove_saved(&saved);
                    }
                    Err(e) => {
                        failed[index(vmm)] += 1;
                        self.note_failure(medians, "create", vmm, Some(run), e)?;
                    }
                }
            }
        }
        for &vmm in &self.args.only {
            let v = &samples[index(vmm)];
            let f = |g: &dyn Fn(&CreateSample) -> Option<f64>| {
                v.iter().filter_map(g).collect::<Vec<f64>>()
            };
            let wall = f(&|s| Some(s.wall_ms));
            let disk = f(&|s| Some(s.disk_bytes as f64));
            emit(&json!({
                "bench": "snapshot", "phase": "create", "vmm": vmm.name(),
                "runs": v.len(), "failed": failed[index(vmm)],
                "guest_mem_mib": self.args.mem, "guest_filled_mib": self.args.fill,
                "wall_ms": stats_of(&wall, 3),
                "ms": stats_of(&f(&|s| s.own_ms), 3),
                "pause_ms": stats_of(&f(&|s| s.pause_ms), 3),
                "create_ms": stats_of(&f(&|s| s.create_ms), 3),
                "disk_bytes": stats_of(&disk, 0),
                "apparent_bytes": stats_of(&f(&|s| Some(s.apparent_bytes as f64)), 0),
            }));
            let m = &mut medians[index(vmm)];
            m.create_ms = median(&wall);
            m.disk_mib = median(&disk).map(|d| d / (1024.0 * 1024.0));
        }
        Ok(())
    }
}
