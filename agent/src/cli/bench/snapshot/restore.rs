//! The `restore` phase: a counting guest saved once per VMM, restored in a
//! fresh process run after run, timed to its first whole console line.

use super::http::connect_api;
use super::procs::{check_interrupt, die_with_us, guest_error};
use super::{
    Medians, Result, Saved, Setup, SnapshotBenchError, Vmm, emit, firecracker, index, io_err,
    median, stats_of, vmplant,
};
use crate::cli::bench::guests::{load_1m, strip_ansi};
use crate::cli::bench::measure::{Measured, describe_status, find, ms, round};
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Counts of the restore guest: enough for hours.
const COUNT_FOREVER: u64 = 1_000_000_000_000_000;

/// One restore's figures.
#[derive(Debug, Clone, Default)]
struct RestoreSample {
    line_ms: f64,
    first_byte_ms: Option<f64>,
    rss_kib: u64,
    api_ms: Option<f64>,
    load_ms: Option<f64>,
}

impl Setup {
    pub(super) fn restore_phase(&self, medians: &mut [Medians; 2]) -> Result<()> {
        let steps = format!(
            "fill:{}+count:{COUNT_FOREVER}:{}",
            self.args.fill, self.args.count_every
        );
        let mut saved: [Option<Saved>; 2] = [None, None];
        for &vmm in &self.args.only {
            let name = format!("restore-{}", vmm.name());
            let ready = [r#""probe":"fill""#, r#""probe":"count""#];
            match self.prepare(vmm, &name, self.args.mem, &steps, &ready) {
                Ok((s, sv)) => {
                    emit(&self.create_line(vmm, None, "restore-snapshot", &s));
                    saved[index(vmm)] = Some(sv);
                }
                Err(e) => self.note_failure(medians, "restore", vmm, None, e)?,
            }
        }
        let mut samples: [Vec<RestoreSample>; 2] = [Vec::new(), Vec::new()];
        let mut failed = [0u32; 2];
        for run in 1..=self.args.runs {
            for &vmm in &self.args.only {
                let Some(sv) = &saved[index(vmm)] else {
                    continue;
                };
                match self.restore_once(vmm, sv, run) {
                    Ok(s) => {
                        emit(&json!({
                            "bench": "snapshot", "phase": "restore", "vmm": vmm.name(), "run": run,
                            "line_ms": round(s.line_ms, 3),
                            "first_byte_ms": s.first_byte_ms.map(|m| round(m, 3)),
                            "api_ms": s.api_ms.map(|m| round(m, 3)),
                            "load_ms": s.load_ms.map(|m| round(m, 3)),
                            "rss_kib": s.rss_kib,
                        }));
                        samples[index(vmm)].push(s);
                    }
                    Err(e) => {
                        failed[index(vmm)] += 1;
                        self.note_failure(medians, "restore", vmm, Some(run), e)?;
                    }
                }
            }
        }
        for &vmm in &self.args.only {
            if saved[index(vmm)].is_none() {
                continue;
            }
            let v = &samples[index(vmm)];
            let f = |g: &dyn Fn(&RestoreSample) -> Option<f64>| {
                v.iter().filter_map(g).collect::<Vec<f64>>()
            };
            let line = f(&|s| Some(s.line_ms));
            let rss = f(&|s| Some(s.rss_kib as f64));
            emit(&json!({
                "bench": "snapshot", "phase": "restore", "vmm": vmm.name(),
                "runs": v.len(), "failed": failed[index(vmm)],
                "line_ms": stats_of(&line, 3),
                "first_byte_ms": stats_of(&f(&|s| s.first_byte_ms), 3),
                "api_ms": stats_of(&f(&|s| s.api_ms), 3),
                "load_ms": stats_of(&f(&|s| s.load_ms), 3),
                "rss_kib": stats_of(&rss, 0),
                "host_load_1m": load_1m(),
            }));
            let m = &mut medians[index(vmm)];
            m.restore_ms = median(&line);
            m.rss_mib = median(&rss).map(|r| r / 1024.0);
        }
        Ok(())
    }

    /// One restore in a fresh process, timed from just before its spawn to
    /// the first whole console line the restored guest begins.
    fn restore_once(&self, vmm: Vmm, saved: &Saved, run: u32) -> Result<RestoreSample> {
        check_interrupt()?;
        let log = self.path(&format!("restore-{}-{run}.log", vmm.name()));
        let errors = self.path(&format!("restore-{}-{run}.stderr", vmm.name()));
        // vmplant logs to standard error; Firecracker to its log file.
        let stderr_path = if vmm == Vmm::Vmplant { &log } else { &errors };
        let stderr = std::fs::File::create(stderr_path).map_err(io_err("create", stderr_path))?;
        let sock = self.path(&format!("restore-{}-{run}.sock", vmm.name()));
        let mut cmd = match vmm {
            Vmm::Vmplant => vmplant::restore_command(self, saved),
            Vmm::Firecracker => firecracker::command(self, &sock, &log)?,
        };
        cmd.stderr(Stdio::from(stderr));
        die_with_us(&mut cmd);
        let t0 = Instant::now();
        let mut m = Measured::spawn(&mut cmd)?;
        let deadline = t0 + self.timeout;
        let mut sample = RestoreSample::default();
        let last_words = |e: String| {
            let text = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            SnapshotBenchError::Failed(format!(
                "{} restore run {run}: {e}; log ends: {last}",
                vmm.name()
            ))
        };
        if vmm == Vmm::Firecracker {
            let mut stream = connect_api(&sock, deadline, &mut || {
                m.exit_status(Duration::ZERO).map(describe_status)
            })
            .map_err(last_words)?;
            sample.api_ms = Some(ms(t0.elapsed()));
            let load = firecracker::load(&mut stream, saved).map_err(last_words)?;
            sample.load_ms = Some(ms(load));
        }
        let needle = r#"{"probe":"count""#;
        let line = wait_line(&mut m, t0, needle, self.timeout)
            .map_err(|e| last_words(crate::cli::chain(&e)))?;
        sample.line_ms = ms(line);
        sample.first_byte_ms = m.first_output().map(ms);
        sample.rss_kib = m.rss_kib()?;
        let out = String::from_utf8_lossy(m.output()).into_owned();
        m.kill();
        let _ = std::fs::remove_file(&sock);
        if let Some(bad) = out.lines().find(|l| guest_error(l)) {
            return Err(last_words(format!("the guest reported {bad}")));
        }
        Ok(sample)
    }
}

/// Reads `m`'s output until a whole line that begins with `needle` is
/// there; returns the time from `t0` to then.
fn wait_line(m: &mut Measured, t0: Instant, needle: &str, timeout: Duration) -> Result<Duration> {
    m.wait_for(needle, timeout)?;
    let deadline = t0 + timeout;
    loop {
        let out = m.output();
        if let Some(p) = find(out, needle.as_bytes())
            && out[p..].contains(&b'\n')
        {
            return Ok(t0.elapsed());
        }
        if Instant::now() >= deadline {
            return Err(SnapshotBenchError::Failed(format!(
                "the line that begins with {needle:?} did not end within {timeout:?}"
            )));
        }
        check_interrupt()?;
        m.drain_for(Duration::from_micros(200))?;
    }
}
