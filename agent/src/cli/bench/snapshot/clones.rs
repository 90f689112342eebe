//! The `clones` phase: a ticking guest saved once per VMM, then many clones
//! of it started one after another, each in its own process; then every
//! clone must tick, and the bench reads each one's PSS and the host's
//! MemAvailable against what it was before the first clone.

use super::host::{Pss, cpu_busy, kib_field, mem_available_kib, meminfo_growth, pss_of};
use super::http::connect_api;
use super::procs::{Guest, check_interrupt, end_all};
use super::{
    Medians, Result, Saved, Setup, SnapshotBenchError, Vmm, emit, firecracker, index, io_err,
    remove_saved, stats_of, vmplant,
};
use crate::cli::bench::guests::load_1m;
use crate::cli::bench::measure::{ms, round};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// The least pause between one VMM's clones and the next's: the host goes
/// on tearing VMs down for seconds after their processes were reaped.
const CLONES_SETTLE: Duration = Duration::from_secs(5);
/// The longest pause: then the next VMM's clones start however busy the
/// host still is.
const CLONES_SETTLE_MAX: Duration = Duration::from_secs(60);
/// How long a clone's first tick may take past its period.
const TICK_GRACE: Duration = Duration::from_secs(10);

/// What the clones of one VMM came to.
#[derive(Debug, Clone, Default)]
pub(super) struct CloneFigures {
    pub(super) wanted: u32,
    pub(super) started: u32,
    pub(super) ticking: u32,
    pub(super) per_s: f64,
    pub(super) pss_kib_mean: f64,
    pub(super) host_used_mib: f64,
    pub(super) stopped: Option<String>,
}

impl Setup {
    pub(super) fn clones_phase(&self, medians: &mut [Medians; 2]) -> Result<()> {
        let steps = format!("tick:{}", self.args.tick_ms);
        // How busy the host is without clones (other work on it).
        let baseline = cpu_busy(Duration::from_secs(1)).unwrap_or(0.0);
        for (k, &vmm) in self.args.only.iter().enumerate() {
            if k > 0 {
                self.settle(baseline)?;
            }
            let name = format!("clones-{}", vmm.name());
            let saved = match self.prepare(
                vmm,
                &name,
                self.args.clone_mem,
                &steps,
                &[r#""probe":"tick""#],
            ) {
                Ok((s, sv)) => {
                    emit(&self.create_line(vmm, None, "clones-snapshot", &s));
                    sv
                }
                Err(e) => {
                    self.note_failure(medians, "clones", vmm, None, e)?;
                    continue;
                }
            };
            let wanted = match vmm {
                Vmm::Vmplant => self.args.clones,
                Vmm::Firecracker => self.args.fc_clones.unwrap_or(self.args.clones),
            };
            let figures = self.clones_of(vmm, &saved, wanted)?;
            if let Some(why) = &figures.stopped {
                medians[index(vmm)].errors.push(format!("clones: {why}"));
            }
            medians[index(vmm)].clones = Some(figures);
            remove_saved(&saved);
        }
        Ok(())
    }

    /// Waits until the host has torn the last VMM's clones down: at least
    /// [`CLONES_SETTLE`], then until the CPUs are no busier than
    /// `baseline` (and half a CPU), at most [`CLONES_SETTLE_MAX`].
    fn settle(&self, baseline: f64) -> Result<()> {
        let t = Instant::now();
        std::thread::sleep(CLONES_SETTLE);
        let mut busy = None;
        while t.elapsed() < CLONES_SETTLE_MAX {
            check_interrupt()?;
            busy = cpu_busy(Duration::from_secs(1));
            if busy.is_none_or(|b| b <= baseline + 0.5) {
                break;
            }
        }
        emit(&json!({
            "bench": "snapshot", "phase": "clones-settle",
            "seconds": round(t.elapsed().as_secs_f64(), 1),
            "cpu_busy": busy.map(|b| round(b, 2)), "cpu_busy_baseline": round(baseline, 2),
        }));
        Ok(())
    }

    /// Starts `wanted` clones of `saved` one after another, checks that they
    /// tick, measures them, ends them.
    fn clones_of(&self, vmm: Vmm, saved: &Saved, wanted: u32) -> Result<CloneFigures> {
        let dir = self.path(&format!("clones-{}.d", vmm.name()));
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        nix::unistd::sync();
        std::thread::sleep(Duration::from_millis(500));
        let meminfo_before = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let before = kib_field(&meminfo_before, "MemAvailable").unwrap_or(0);
        let busy_before = cpu_busy(Duration::from_millis(500));
        let reserve = self.args.reserve_mib * 1024;
        let mut guests: Vec<Guest> = Vec::with_capacity(wanted as usize);
        let mut start_ms = Vec::with_capacity(wanted as usize);
        let mut stopped = None;
        let progress_every = (wanted / 10).max(1);
        let t_all = Instant::now();
        let result = (|| -> Result<()> {
            for i in 0..wanted {
                check_interrupt()?;
                let avail = mem_available_kib().unwrap_or(u64::MAX);
                if avail < reserve {
                    stopped = Some(format!(
                        "stopped at {i} of {wanted} clones: MemAvailable {} MiB, below the {} MiB reserve",
                        avail / 1024,
                        self.args.reserve_mib
                    ));
                    break;
                }
                let t = Instant::now();
                match self.start_clone(vmm, saved, &dir, i) {
                    Ok(g) => {
                        start_ms.push(ms(t.elapsed()));
                        guests.push(g);
                    }
                    Err(SnapshotBenchError::Interrupted) => {
                        return Err(SnapshotBenchError::Interrupted);
                    }
                    Err(e) => {
                        stopped = Some(format!(
                            "clone {} of {wanted} failed: {}",
                            i + 1,
                            crate::cli::chain(&e)
                        ));
                        break;
                    }
                }
                let n = i + 1;
                if n % progress_every == 0 || n == wanted {
                    let secs = t_all.elapsed().as_secs_f64();
                    emit(&json!({
                        "bench": "snapshot", "phase": "clones-progress", "vmm": vmm.name(),
                        "running": n, "seconds": round(secs, 3),
                        "clones_per_s": round(f64::from(n) / secs, 2),
                        "last_start_ms": start_ms.last().map(|m| round(*m, 3)),
                        "mem_available_mib": mem_available_kib().map(|k| k / 1024),
                        "host_load_1m": load_1m(),
                    }));
                }
            }
            Ok(())
        })();
        let seconds = t_all.elapsed().as_secs_f64();
        if let Err(e) = result {
            end_all(&mut guests);
            return Err(e);
        }
        if let Some(why) = &stopped {
            tracing::warn!("{} clones: {why}", vmm.name());
        }
        let started = guests.len() as u32;
        // Every clone must tick: a tick line in its console file.
        let mut ticking = vec![false; guests.len()];
        let deadline = Instant::now() + Duration::from_millis(self.args.tick_ms) + TICK_GRACE;
        loop {
            for (g, t) in guests.iter().zip(ticking.iter_mut()).filter(|(_, t)| !**t) {
                let text = std::fs::read_to_string(&g.console).unwrap_or_default();
                *t = text.contains(r#""probe":"tick""#);
            }
            if ticking.iter().all(|t| *t) || Instant::now() >= deadline {
                break;
            }
            if let Err(e) = check_interrupt() {
                end_all(&mut guests);
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut dead = 0;
        for g in guests.iter_mut() {
            if g.ended().is_some() {
                dead += 1;
            }
        }
        let pss: Vec<Pss> = guests.iter().filter_map(|g| pss_of(g.pid())).collect();
        let meminfo_after = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let after = kib_field(&meminfo_after, "MemAvailable").unwrap_or(0);
        let load = load_1m();
        let silent: Vec<String> = guests
            .iter()
            .zip(&ticking)
            .filter(|(_, t)| !**t)
            .take(2)
            .map(|(g, _)| format!("{}: {}", g.what, g.tail()))
            .collect();
        end_all(&mut guests);
        let ticking = ticking.iter().filter(|t| **t).count() as u32;
        let total: Vec<f64> = pss.iter().map(|p| p.total as f64).collect();
        let mean = |f: &dyn Fn(&Pss) -> u64| {
            if pss.is_empty() {
                0.0
            } else {
                pss.iter().map(|p| f(p) as f64).sum::<f64>() / pss.len() as f64
            }
        };
        let per_s = if seconds > 0.0 {
            f64::from(started) / seconds
        } else {
            0.0
        };
        let host_used_mib = before.saturating_sub(after) as f64 / 1024.0;
        emit(&json!({
            "bench": "snapshot", "phase": "clones", "vmm": vmm.name(),
            "clone_mem_mib": self.args.clone_mem, "tick_ms": self.args.tick_ms,
            "wanted": wanted, "started": started, "ticking": ticking, "dead": dead,
            "seconds": round(seconds, 3), "clones_per_s": round(per_s, 2),
            "start_ms": stats_of(&start_ms, 3),
            "pss_kib": stats_of(&total, 0),
            "pss_kib_mean": round(mean(&|p| p.total), 1),
            "pss_anon_kib_mean": round(mean(&|p| p.anon), 1),
            "pss_file_kib_mean": round(mean(&|p| p.file), 1),
            "pss_mib_sum": round(total.iter().sum::<f64>() / 1024.0, 1),
            "mem_available_mib_before": before / 1024,
            "mem_available_mib_after": after / 1024,
            "host_used_mib": round(host_used_mib, 1),
            "meminfo_growth_kib": meminfo_growth(&meminfo_before, &meminfo_after),
            "host_used_kib_per_clone": if started > 0 { round(host_used_mib * 1024.0 / f64::from(started), 1) } else { 0.0 },
            "stopped": stopped,
            "silent": silent,
            "cpu_busy_before": busy_before.map(|b| round(b, 2)),
            "host_load_1m": load,
        }));
        Ok(CloneFigures {
            wanted,
            started,
            ticking,
            per_s,
            pss_kib_mean: mean(&|p| p.total),
            host_used_mib,
            stopped,
        })
    }

    /// Starts clone `i` of `saved` and waits until it runs.
    fn start_clone(&self, vmm: Vmm, saved: &Saved, dir: &Path, i: u32) -> Result<Guest> {
        let console = dir.join(format!("{i}.console"));
        let log = dir.join(format!("{i}.log"));
        let sock = dir.join(format!("{i}.sock"));
        let deadline = Instant::now() + self.timeout;
        match vmm {
            Vmm::Vmplant => {
                let mut cmd = vmplant::restore_command(self, saved);
                cmd.arg("--control").arg(&sock);
                let mut g = Guest::spawn(format!("vmplant clone {i}"), &mut cmd, &console, &log)?;
                // The control socket is served once the vCPUs run.
                connect_api(&sock, deadline, &mut || g.ended()).map_err(|e| g.failed(&e))?;
                Ok(g)
            }
            Vmm::Firecracker => {
                let mut cmd = firecracker::command(self, &sock, &log)?;
                let errors = dir.join(format!("{i}.stderr"));
                let mut g = Guest::spawn(
                    format!("firecracker clone {i}"),
                    &mut cmd,
                    &console,
                    &errors,
                )?;
                g.log = log;
                let mut stream =
                    connect_api(&sock, deadline, &mut || g.ended()).map_err(|e| g.failed(&e))?;
                firecracker::load(&mut stream, saved).map_err(|e| g.failed(&e))?;
                Ok(g)
            }
        }
    }
}
