//! Puts the kernel, the initrd and the command line into guest memory and
//! tells where the kernel wants to be entered.

use crate::config::BootProtocol;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::x86_64::boot_params::InitrdInfo;
use devices::virtio::GuestMemoryMmap;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

/// Offset of the 64-bit entry from a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {path:?}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(std::path::PathBuf),
    #[error("cannot load the kernel {path:?}")]
    Kernel {
        path: std::path::PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("the kernel has no PVH entry note, so it cannot boot through PVH")]
    NoPvhEntry,
    #[error("a bzImage boots only through the Linux 64-bit entry, not PVH")]
    PvhBzImage,
    #[error("the initrd ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { size: u64 },
    #[error("cannot read the initrd {path:?}")]
    Initrd {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed kernel command line: {0}")]
    Cmdline(String),
}

/// The kernel's entry point and the protocol to use it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Linux64(u64),
    Pvh(u64),
}

#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: Entry,
    /// The bzImage's setup header, to pass on in boot_params.
    pub header: Option<setup_header>,
    /// The first address past the kernel image.
    pub end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn format_of(file: &mut File, path: &Path) -> Result<Format, LoaderError> {
    let io = |source| LoaderError::Open {
        path: path.into(),
        source,
    };
    let mut magic = [0u8; 4];
    file.rewind().map_err(io)?;
    if file.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF" {
        return Ok(Format::Elf);
    }
    // A bzImage carries "HdrS" at 0x202 in its setup header.
    file.seek(SeekFrom::Start(0x202)).map_err(io)?;
    if file.read_exact(&mut magic).is_ok() && &magic == b"HdrS" {
        return Ok(Format::BzImage);
    }
    Err(LoaderError::UnknownFormat(path.into()))
}

/// Loads the kernel at `path`, choosing the entry as `protocol` says.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(|source| LoaderError::Open {
        path: path.into(),
        source,
    })?;
    let format = format_of(&mut file, path)?;
    let kernel_err = |source| LoaderError::Kernel {
        path: path.into(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        Format::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(kernel_err)?;
            let end = r.kernel_load.0 + r.kernel_end;
            let pvh = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            let entry = match (protocol, pvh) {
                (BootProtocol::Linux64, _) | (BootProtocol::Auto, None) => {
                    Entry::Linux64(r.kernel_load.0)
                }
                (BootProtocol::Pvh | BootProtocol::Auto, Some(a)) => Entry::Pvh(a),
                (BootProtocol::Pvh, None) => return Err(LoaderError::NoPvhEntry),
            };
            Ok(LoadedKernel {
                entry,
                header: None,
                end: end.max(r.kernel_end),
            })
        }
        Format::BzImage => {
            if protocol == BootProtocol::Pvh {
                return Err(LoaderError::PvhBzImage);
            }
            let r = BzImage::load(mem, None, &mut file, himem).map_err(kernel_err)?;
            Ok(LoadedKernel {
                entry: Entry::Linux64(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                header: r.setup_header,
                end: r.kernel_end,
            })
        }
    }
}

/// Loads the initrd at the top of low memory, page aligned, above the
/// kernel and below `max_addr` (the kernel's limit, if it states one).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_addr: Option<u64>,
) -> Result<InitrdInfo, LoaderError> {
    let read_err = |source| LoaderError::Initrd {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let low_end = (mem.last_addr().0 + 1).min(MMIO_GAP_START);
    let top = max_addr.map_or(low_end, |m| m.saturating_add(1).min(low_end));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE - 1))
        .filter(|&a| a >= kernel_end.max(HIMEM_START) && size > 0)
        .ok_or(LoaderError::InitrdTooLarge { size })?;
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|_| LoaderError::InitrdTooLarge { size })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(InitrdInfo { addr, size })
}

/// Validates the command line and writes it, NUL-terminated; returns its
/// size including the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, LoaderError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    Ok(c.as_cstring()
        .map(|s| s.as_bytes_with_nul().len())
        .unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        crate::memory::create(64 << 20, false).unwrap()
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x55; 4096]).unwrap();
        let err = load_kernel(&mem(), f.path(), BootProtocol::Auto).unwrap_err();
        assert!(matches!(err, LoaderError::UnknownFormat(_)), "{err}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(load_kernel(&mem(), empty.path(), BootProtocol::Auto).is_err());
    }

    #[test]
    fn truncated_elf_is_refused() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF\x02\x01\x01\0").unwrap();
        let err = load_kernel(&mem(), f.path(), BootProtocol::Auto).unwrap_err();
        assert!(matches!(err, LoaderError::Kernel { .. }), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_of_memory_page_aligned() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        let rd = load_initrd(&m, f.path(), 0x20_0000, None).unwrap();
        assert_eq!(rd.size, 5000);
        assert_eq!(rd.addr % PAGE, 0);
        assert!(rd.addr + rd.size <= 64 << 20 && rd.addr + rd.size + PAGE > 64 << 20);
        let b: u8 = m.read_obj(GuestAddress(rd.addr + 4999)).unwrap();
        assert_eq!(b, 7);
        // Respect the kernel's limit.
        let rd = load_initrd(&m, f.path(), 0x20_0000, Some(0x3ff_ffff)).unwrap();
        assert!(rd.addr + rd.size <= 0x400_0000);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let m = crate::memory::create(4 << 20, false).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 << 20).unwrap();
        assert!(matches!(
            load_initrd(&m, f.path(), 0x20_0000, None),
            Err(LoaderError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem();
        let n = load_cmdline(&m, "console=ttyS0 probe=ready").unwrap();
        assert_eq!(n, 26);
        let mut buf = [0u8; 26];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 probe=ready\0");
    }
}
