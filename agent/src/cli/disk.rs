//! `--disk` values (and the `disks` of a `--config` file): a guest disk
//! on a raw file, `PATH` (read-write) or `PATH,ro`, optionally rate
//! limited with `,bps=BYTES_PER_SECOND` and `,iops=REQUESTS_PER_SECOND`.

use devices::virtio::blk::{BackendError, Blk, RateLimit, RawFile};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// A guest disk; kept as it is given (the path made absolute) in a
/// snapshot's device plan, so that a restore opens it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    pub limit: RateLimit,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskError {
    #[error("{0:?}: want PATH[,ro][,bps=N][,iops=N]")]
    Syntax(String),
    #[error("{0:?}: unknown disk option {1:?} (known: ro, bps=N, iops=N)")]
    Option(String, String),
    #[error("{0:?}: {1:?} wants a whole number above 0")]
    Value(String, String),
}

impl FromStr for Disk {
    type Err = DiskError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DiskError::Syntax(s.into()));
        }
        let mut disk = Disk {
            path: PathBuf::from(path),
            read_only: false,
            limit: RateLimit::default(),
        };
        let rate = |o: &str, v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .map(Some)
                .ok_or_else(|| DiskError::Value(s.into(), o.into()))
        };
        for o in parts {
            match o.split_once('=') {
                None if o == "ro" => disk.read_only = true,
                Some(("bps", v)) => disk.limit.bytes_per_sec = rate(o, v)?,
                Some(("iops", v)) => disk.limit.ops_per_sec = rate(o, v)?,
                _ => return Err(DiskError::Option(s.into(), o.into())),
            }
        }
        Ok(disk)
    }
}

impl Disk {
    /// The disk as `--disk` takes it.
    pub fn spec(&self) -> String {
        let mut spec = self.path.display().to_string();
        if self.read_only {
            spec.push_str(",ro");
        }
        if let Some(n) = self.limit.bytes_per_sec {
            spec.push_str(&format!(",bps={n}"));
        }
        if let Some(n) = self.limit.ops_per_sec {
            spec.push_str(&format!(",iops={n}"));
        }
        spec
    }

    /// The disk with its file named by an absolute path (that of the
    /// working directory it was given in), for a restore elsewhere.
    pub fn absolute(&self) -> Disk {
        Disk {
            path: std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone()),
            ..self.clone()
        }
    }

    /// Opens the file and makes the device.
    pub fn open(&self) -> Result<Blk, BackendError> {
        let file = RawFile::open(&self.path, self.read_only)?;
        Ok(Blk::with_rate_limit(Arc::new(file), self.limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let d: Disk = "/d/a.img".parse().unwrap();
        assert_eq!((d.read_only, d.spec()), (false, "/d/a.img".to_string()));
        let d: Disk = "b.img,ro".parse().unwrap();
        assert!(d.read_only && d.absolute().path.is_absolute());
        assert_eq!(d.spec(), "b.img,ro");
        assert_eq!(
            "a.img,rw".parse::<Disk>().unwrap_err().to_string(),
            r#""a.img,rw": unknown disk option "rw" (known: ro, bps=N, iops=N)"#
        );
        let d: Disk = "c.img,iops=100,ro,bps=1048576".parse().unwrap();
        assert_eq!(
            (d.limit.bytes_per_sec, d.limit.ops_per_sec),
            (Some(1 << 20), Some(100))
        );
        assert_eq!(d.spec(), "c.img,ro,bps=1048576,iops=100");
        assert_eq!(d.spec().parse::<Disk>().unwrap(), d);
        for bad in ["c.img,iops=0", "c.img,bps=1M", "c.img,bps="] {
            assert!(
                matches!(bad.parse::<Disk>(), Err(DiskError::Value(..))),
                "{bad}"
            );
        }
        assert!(matches!(
            ",ro".parse::<Disk>().unwrap_err(),
            DiskError::Syntax(_)
        ));
    }

    #[test]
    fn a_missing_file_is_an_error_with_the_os_reason() {
        let d: Disk = "/nonexistent/disk.img".parse().unwrap();
        let e = d.open().err().expect("no such file");
        let line = crate::cli::chain(&e);
        assert!(
            line.contains("/nonexistent/disk.img") && line.contains("No such file"),
            "{line}"
        );
    }
}
