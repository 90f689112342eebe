//! The bench's last line: each phase's medians, vmplant's over
//! Firecracker's.

use super::clones::CloneFigures;
use super::{Phase, Setup, Vmm};
use crate::cli::bench::guests::load_1m;

/// Medians of one VMM, for the summary.
#[derive(Debug, Clone, Default)]
pub(super) struct Medians {
    pub(super) create_ms: Option<f64>,
    pub(super) disk_mib: Option<f64>,
    pub(super) restore_ms: Option<f64>,
    pub(super) rss_mib: Option<f64>,
    pub(super) clones: Option<CloneFigures>,
    pub(super) errors: Vec<String>,
}

/// `0.42x`, or `-` when either side is missing.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// The last line: each phase's medians, vmplant's over Firecracker's.
pub(super) fn summary_line(setup: &Setup, medians: &[Medians; 2]) -> String {
    let (ours, fc) = (&medians[0], &medians[1]);
    let has = |v: Vmm| setup.args.only.contains(&v);
    let mut parts = Vec::new();
    let opt = |x: Option<f64>, unit: &str| x.map_or("-".into(), |x| format!("{x:.1} {unit}"));
    for phase in &setup.args.phases {
        let mut p = Vec::new();
        match phase {
            Phase::Create => {
                for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
                    if has(v) {
                        p.push(format!(
                            "{} {} {} on disk",
                            v.name(),
                            opt(m.create_ms, "ms"),
                            opt(m.disk_mib, "MiB")
                        ));
                    }
                }
                if has(Vmm::Vmplant) && has(Vmm::Firecracker) {
                    p.push(format!(
                        "vmplant/firecracker {} time, {} disk",
                        ratio(ours.create_ms, fc.create_ms),
                        ratio(ours.disk_mib, fc.disk_mib)
                    ));
                }
                parts.push(format!(
                    "create ({} MiB guest, {} MiB written): {}",
                    setup.args.mem,
                    setup.args.fill,
                    p.join(", ")
                ));
            }
            Phase::Restore => {
                for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
                    if has(v) {
                        p.push(format!(
                            "{} {} RSS {}",
                            v.name(),
                            opt(m.restore_ms, "ms"),
                            opt(m.rss_mib, "MiB")
                        ));
                    }
                }
                if has(Vmm::Vmplant) && has(Vmm::Firecracker) {
                    p.push(format!(
                        "vmplant/firecracker {} time, {} RSS",
                        ratio(ours.restore_ms, fc.restore_ms),
                        ratio(ours.rss_mib, fc.rss_mib)
                    ));
                }
                parts.push(format!("restore: {}", p.join(", ")));
            }
            Phase::Clones => {
                for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
                    if !has(v) {
                        continue;
                    }
                    match &m.clones {
                        Some(c) => p.push(format!(
                            "{} {}/{} ticking, {:.1}/s, PSS {:.2} MiB per clone, host {:.0} MiB",
                            v.name(),
                            c.ticking,
                            c.wanted,
                            c.per_s,
                            c.pss_kib_mean / 1024.0,
                            c.host_used_mib
                        )),
                        None => p.push(format!("{} -", v.name())),
                    }
                }
                if let (Some(a), Some(b)) = (&ours.clones, &fc.clones) {
                    p.push(format!(
                        "vmplant/firecracker {} rate, {} PSS, {} host memory per clone",
                        ratio(Some(a.per_s), Some(b.per_s)),
                        ratio(Some(a.pss_kib_mean), Some(b.pss_kib_mean)),
                        ratio(
                            (a.started > 0).then(|| a.host_used_mib / f64::from(a.started)),
                            (b.started > 0).then(|| b.host_used_mib / f64::from(b.started))
                        )
                    ));
                }
                parts.push(format!(
                    "clones ({} MiB): {}",
                    setup.args.clone_mem,
                    p.join(", ")
                ));
            }
        }
    }
    let mut line = format!("snapshot: {}", parts.join(" | "));
    for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
        for e in &m.errors {
            line += &format!(" | {} {e}", v.name());
        }
    }
    if let Some(l) = load_1m() {
        line += &format!(" | load {l:.2}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(5.0), Some(20.0)), "0.25x");
        assert_eq!(ratio(Some(5.0), None), "-");
        assert_eq!(ratio(Some(5.0), Some(0.0)), "-");
    }
}
