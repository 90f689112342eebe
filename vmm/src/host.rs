//! What kind of KVM this host has. On a host whose KVM is backed by PVM
//! (Pagetable-based Virtual Machine) rather than VT-x or AMD-V, guest
//! kernel code is interpreted, so a stock Linux guest cannot boot there.

use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Virtualization {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// KVM backed by the kvm_pvm module: no hardware virtualization.
    Pvm,
    /// None of the above could be told.
    Unknown,
}

impl Virtualization {
    pub fn is_hardware(self) -> bool {
        matches!(self, Virtualization::Vmx | Virtualization::Svm)
    }
}

impl std::fmt::Display for Virtualization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Virtualization::Vmx => "hardware (Intel VT-x)",
            Virtualization::Svm => "hardware (AMD-V)",
            Virtualization::Pvm => "PVM (no hardware virtualization)",
            Virtualization::Unknown => "unknown",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub virtualization: Virtualization,
    pub kvm_api_version: i32,
    /// The most vCPUs KVM lets one VM have.
    pub max_vcpus: usize,
    /// The most vCPUs KVM recommends for one VM.
    pub recommended_vcpus: usize,
    pub mem_total_bytes: u64,
}

impl HostInfo {
    /// A line to log on a host where Linux guests need special kernels.
    pub fn warning(&self) -> Option<&'static str> {
        (self.virtualization == Virtualization::Pvm).then_some(
            "KVM on this host is backed by PVM, not VT-x or AMD-V: guest kernel code is \
             interpreted, and a Linux guest needs a kernel built with PVM guest support",
        )
    }
}

/// Tells the kind of virtualization from the loaded modules and the CPU
/// flags under `root` ("/" on a live host).
pub fn detect_virtualization(root: &Path) -> Virtualization {
    if root.join("sys/module/kvm_pvm").exists() {
        return Virtualization::Pvm;
    }
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    if has("vmx") {
        Virtualization::Vmx
    } else if has("svm") {
        Virtualization::Svm
    } else if root.join("sys/module/kvm_intel").exists() {
        Virtualization::Vmx
    } else if root.join("sys/module/kvm_amd").exists() {
        Virtualization::Svm
    } else {
        Virtualization::Unknown
    }
}

/// The host's total memory from /proc/meminfo.
pub fn mem_total_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(u64::MAX, |kb| kb * 1024)
}

/// Gathers the host facts from an open KVM handle.
pub fn info(kvm: &kvm_ioctls::Kvm) -> HostInfo {
    HostInfo {
        virtualization: detect_virtualization(Path::new("/")),
        kvm_api_version: kvm.get_api_version(),
        max_vcpus: kvm.get_max_vcpus(),
        recommended_vcpus: kvm.get_nr_vcpus(),
        mem_total_bytes: mem_total_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(cpu_flags: &str, modules: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc")).unwrap();
        std::fs::write(
            d.path().join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu {cpu_flags} sse2\n"),
        )
        .unwrap();
        for m in modules {
            std::fs::create_dir_all(d.path().join("sys/module").join(m)).unwrap();
        }
        d
    }

    #[test]
    fn tells_pvm_from_hardware() {
        assert_eq!(
            detect_virtualization(fake_root("", &["kvm", "kvm_pvm"]).path()),
            Virtualization::Pvm
        );
        assert_eq!(
            detect_virtualization(fake_root("vmx", &["kvm_intel"]).path()),
            Virtualization::Vmx
        );
        assert_eq!(
            detect_virtualization(fake_root("svm", &[]).path()),
            Virtualization::Svm
        );
        assert_eq!(
            detect_virtualization(fake_root("", &[]).path()),
            Virtualization::Unknown
        );
        // "vmxe" or similar is not the vmx flag.
        assert_eq!(
            detect_virtualization(fake_root("vmxe", &[]).path()),
            Virtualization::Unknown
        );
    }

    #[test]
    fn reads_host_memory() {
        assert!(mem_total_bytes() > 64 << 20);
    }
}
