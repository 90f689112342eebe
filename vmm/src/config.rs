//! What a VM is made of, and the checks that turn bad input into one
//! clear error before anything is created.

use crate::layout::CMDLINE_MAX_SIZE;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The command line a guest gets when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Below this a guest has no room for its boot structures and a kernel.
pub const MIN_MEM_MIB: u64 = 4;

/// Which entry point of the kernel to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootProtocol {
    /// PVH when the ELF kernel has a PVH note, else the Linux 64-bit entry.
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol (long mode, boot_params in RSI).
    Linux64,
    /// The PVH entry (32-bit protected mode, start info in EBX).
    Pvh,
}

/// Where the serial console's output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialOutput {
    #[default]
    Stdout,
    File(PathBuf),
    /// Standard output, each line behind this prefix (several VMs
    /// sharing one terminal).
    StdoutPrefixed(String),
    /// Discarded.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The kernel command line; [`DEFAULT_CMDLINE`] when `None`.
    pub cmdline: Option<String>,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub boot: BootProtocol,
    pub serial: SerialOutput,
    /// Feed standard input to the serial console.
    pub serial_input: bool,
    /// Back guest RAM with a memfd that can be shared with another
    /// process; vhost-user devices need it.
    pub shared_memory: bool,
}

impl VmConfig {
    /// A config with the defaults a developer expects: 1 vCPU, 128 MiB.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            vcpus: 1,
            mem_mib: 128,
            boot: BootProtocol::Auto,
            serial: SerialOutput::Stdout,
            serial_input: false,
            shared_memory: false,
        }
    }

    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }

    /// Guest memory in bytes; a size too large for 64 bits saturates
    /// (and [`Self::validate`] refuses it as larger than the host).
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib.saturating_mul(1 << 20)
    }

    /// Checks the config against what this host offers.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        self.validate_resources(limits)?;
        self.validate_boot()
    }

    /// Checks the vCPUs and memory against what this host offers (all a
    /// restored VM needs: its kernel is not loaded again).
    pub fn validate_resources(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if usize::from(self.vcpus) > limits.max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                asked: self.vcpus,
                max: limits.max_vcpus,
            });
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        if self.mem_bytes() > limits.host_mem_bytes {
            return Err(ConfigError::MemoryTooLarge {
                asked_mib: self.mem_mib,
                host_mib: limits.host_mem_bytes >> 20,
            });
        }
        Ok(())
    }

    /// Checks the kernel, initrd and command line a boot loads.
    fn validate_boot(&self) -> Result<(), ConfigError> {
        let cmdline = self.cmdline();
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        if let Some(c) = cmdline.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(ConfigError::CmdlineCharacter(c));
        }
        for (what, path) in [
            ("kernel", Some(&self.kernel)),
            ("initrd", self.initrd.as_ref()),
        ] {
            if let Some(p) = path {
                let meta = std::fs::metadata(p).map_err(|source| ConfigError::Unreadable {
                    what,
                    path: p.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    return Err(ConfigError::NotAFile {
                        what,
                        path: p.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What the host allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    pub max_vcpus: usize,
    pub host_mem_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("{asked} vCPUs asked for, but KVM on this host allows at most {max}")]
    TooManyVcpus { asked: u8, max: usize },
    #[error("{0} MiB of memory is too small (at least {MIN_MEM_MIB} MiB)")]
    MemoryTooSmall(u64),
    #[error("{asked_mib} MiB of memory asked for, but the host has {host_mib} MiB")]
    MemoryTooLarge { asked_mib: u64, host_mib: u64 },
    #[error("the kernel command line is {0} bytes long (at most {max})", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("the kernel command line holds {0:?}, which is not printable ASCII")]
    CmdlineCharacter(char),
    #[error("cannot read the {what} {path:?}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {path:?} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 2,
        host_mem_bytes: 1 << 30,
    };

    fn valid() -> (tempfile::NamedTempFile, VmConfig) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let c = VmConfig::new(f.path());
        (f, c)
    }

    #[test]
    fn defaults_are_valid() {
        let (_f, c) = valid();
        c.validate(&LIMITS).unwrap();
        assert_eq!(c.cmdline(), DEFAULT_CMDLINE);
    }

    #[test]
    fn bad_inputs_get_errors_that_name_them() {
        let (_f, c) = valid();
        let check = |c: VmConfig| c.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            check(VmConfig {
                vcpus: 3,
                ..c.clone()
            })
            .contains("at most 2")
        );
        assert!(
            check(VmConfig {
                vcpus: 0,
                ..c.clone()
            })
            .contains("at least one vCPU")
        );
        assert!(
            check(VmConfig {
                mem_mib: 1,
                ..c.clone()
            })
            .contains("too small")
        );
        assert!(
            check(VmConfig {
                mem_mib: 4096,
                ..c.clone()
            })
            .contains("host has 1024 MiB")
        );
        assert!(
            check(VmConfig {
                cmdline: Some("a\u{7}b".into()),
                ..c.clone()
            })
            .contains("printable")
        );
        assert!(
            check(VmConfig {
                cmdline: Some("x".repeat(5000)),
                ..c.clone()
            })
            .contains("5000 bytes")
        );
        assert!(
            check(VmConfig {
                kernel: "/nonexistent/vmlinux".into(),
                ..c.clone()
            })
            .contains("cannot read the kernel")
        );
        assert!(
            check(VmConfig {
                initrd: Some("/".into()),
                ..c
            })
            .contains("not a regular file")
        );
    }
}
