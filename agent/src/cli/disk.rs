//! `--disk` values (and the `disks` of a `--config` file):
//!
//! - `PATH` (a raw file, read-write) or `PATH,ro`;
//! - `PATH,overlay=FILE`: the raw file read-only, the guest's writes in
//!   the copy-on-write overlay FILE (made if missing);
//! - `image=NAME,store=DIR,overlay=FILE`: image NAME of the local store
//!   DIR under the overlay FILE;
//! - `image=NAME,store=gvfs://HOST:PORT,token-file=F,(tls-ca=F|plaintext)[,cache-dir=D],overlay=FILE`:
//!   the same from a store served by `vmplant gvfs serve`, its chunks
//!   fetched on demand through a GVFS client (its block cache in D);
//!
//! each optionally rate limited with `,bps=BYTES_PER_SECOND` and
//! `,iops=REQUESTS_PER_SECOND`.

use devices::virtio::blk::{
    BackendError, Blk, ImageBackend, ImageBackendError, RateLimit, RawFile,
};
use images::{GvfsStore, SourceStats};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Where an image's store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAt {
    /// A local directory.
    Dir(PathBuf),
    /// A GVFS server whose export is a store's directory.
    Gvfs {
        server: String,
        token_file: PathBuf,
        tls_ca: Option<PathBuf>,
        cache_dir: Option<PathBuf>,
    },
}

/// What the guest's disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    Raw {
        path: PathBuf,
        read_only: bool,
    },
    /// A raw file read-only under an overlay.
    RawOverlay {
        path: PathBuf,
        overlay: PathBuf,
    },
    Image {
        name: String,
        store: StoreAt,
        overlay: PathBuf,
    },
}

/// A guest disk; kept as it is given (the paths made absolute) in a
/// snapshot's device plan, so that a restore opens it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub kind: DiskKind,
    pub limit: RateLimit,
    /// `poll=MICROSECONDS`: the device polls the queue that long after
    /// each request ([`Blk::with_poll`]).
    pub poll_us: Option<u64>,
}

const FORMS: &str = "PATH[,ro], PATH,overlay=FILE, image=NAME,store=DIR,overlay=FILE or \
     image=NAME,store=gvfs://HOST:PORT,token-file=F,(tls-ca=F|plaintext)[,cache-dir=D],overlay=FILE, \
     each with [,bps=N][,iops=N][,poll=MICROSECONDS]";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskError {
    #[error("{0:?}: want {FORMS}")]
    Syntax(String),
    #[error(
        "{0:?}: unknown disk option {1:?} (known: ro, overlay=FILE, image=NAME, store=DIR|gvfs://HOST:PORT, token-file=F, tls-ca=F, plaintext, cache-dir=D, bps=N, iops=N, poll=US)"
    )]
    Option(String, String),
    #[error("{0:?}: {1:?} wants a whole number above 0")]
    Value(String, String),
    #[error("{0:?}: {1}")]
    Combination(String, &'static str),
}

/// What opening a disk can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Raw(#[from] BackendError),
    #[error(transparent)]
    Backend(#[from] ImageBackendError),
    #[error("image {name:?}")]
    Image {
        name: String,
        #[source]
        source: images::DiskError,
    },
    #[error("image {name:?}")]
    Store {
        name: String,
        #[source]
        source: images::StoreError,
    },
    #[error("image {name:?}")]
    Remote {
        name: String,
        #[source]
        source: images::RemoteError,
    },
    #[error("{0}")]
    Token(String),
    #[error("the store's TLS CA")]
    Tls(#[from] gvfs::transport::TransportError),
}

/// What the VMM keeps of an opened disk, to flush and report at exit.
#[derive(Clone)]
pub struct DiskHandle {
    pub image: Option<Arc<ImageBackend>>,
    pub remote: Option<Arc<GvfsStore>>,
}

impl DiskHandle {
    /// What an image's disk read from its chunk source, and fetched from
    /// its server.
    pub fn report(&self) -> Option<(SourceStats, Option<images::FetchStats>)> {
        let stats = self.image.as_ref()?.source_stats()?;
        Some((stats, self.remote.as_ref().map(|r| r.fetched())))
    }

    /// Makes the overlay durable (its bitmap is in memory until a flush).
    pub fn flush(&self) -> std::io::Result<()> {
        use devices::virtio::blk::BlockBackend;
        self.image.as_ref().map_or(Ok(()), |b| b.flush())
    }
}

impl FromStr for Disk {
    type Err = DiskError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default();
        if first.is_empty() {
            return Err(DiskError::Syntax(s.into()));
        }
        let (mut path, mut image) = (None, None);
        match first.split_once('=') {
            Some(("image", name)) if !name.is_empty() => image = Some(name.to_string()),
            Some(_) => return Err(DiskError::Syntax(s.into())),
            None => path = Some(PathBuf::from(first)),
        }
        let mut limit = RateLimit::default();
        let mut poll_us = None;
        let mut read_only = false;
        let (mut overlay, mut store, mut token_file, mut tls_ca, mut cache_dir) =
            (None, None, None, None, None);
        let mut plaintext = false;
        let rate = |o: &str, v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .map(Some)
                .ok_or_else(|| DiskError::Value(s.into(), o.into()))
        };
        let file = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
        for o in parts {
            let bad = || DiskError::Option(s.into(), o.into());
            match o.split_once('=') {
                None if o == "ro" => read_only = true,
                None if o == "plaintext" => plaintext = true,
                Some(("bps", v)) => limit.bytes_per_sec = rate(o, v)?,
                Some(("iops", v)) => limit.ops_per_sec = rate(o, v)?,
                Some(("poll", v)) => {
                    poll_us = rate(o, v)?;
                    if poll_us > Some(1_000_000) {
                        return Err(DiskError::Value(s.into(), o.into()));
                    }
                }
                Some(("overlay", v)) => overlay = Some(file(v).ok_or_else(bad)?),
                Some(("store", v)) if !v.is_empty() => store = Some(v.to_string()),
                Some(("token-file", v)) => token_file = Some(file(v).ok_or_else(bad)?),
                Some(("tls-ca", v)) => tls_ca = Some(file(v).ok_or_else(bad)?),
                Some(("cache-dir", v)) => cache_dir = Some(file(v).ok_or_else(bad)?),
                _ => return Err(bad()),
            }
        }
        let combo = |why| Err(DiskError::Combination(s.into(), why));
        let remote_opts =
            token_file.is_some() || tls_ca.is_some() || plaintext || cache_dir.is_some();
        let kind = match (path, image) {
            (Some(path), _) => {
                if store.is_some() || remote_opts {
                    return combo(
                        "store, token-file, tls-ca, plaintext and cache-dir go with image=NAME",
                    );
                }
                match overlay {
                    Some(_) if read_only => {
                        return combo("a disk with an overlay is written to: drop ro");
                    }
                    Some(overlay) => DiskKind::RawOverlay { path, overlay },
                    None => DiskKind::Raw { path, read_only },
                }
            }
            (None, Some(name)) => {
                if read_only {
                    return combo("an image's disk is written to its overlay: drop ro");
                }
                let Some(overlay) = overlay else {
                    return combo("an image needs overlay=FILE for the guest's writes");
                };
                let Some(store) = store else {
                    return combo("an image needs store=DIR or store=gvfs://HOST:PORT");
                };
                let store = match store.strip_prefix("gvfs://") {
                    Some(server) => {
                        if server.is_empty() || server.contains('/') {
                            return combo("store=gvfs:// wants HOST:PORT");
                        }
                        if plaintext == tls_ca.is_some() {
                            return combo(
                                "a gvfs:// store wants tls-ca=FILE or plaintext, not both",
                            );
                        }
                        let Some(token_file) = token_file else {
                            return combo("a gvfs:// store wants token-file=FILE");
                        };
                        StoreAt::Gvfs {
                            server: server.to_string(),
                            token_file,
                            tls_ca,
                            cache_dir,
                        }
                    }
                    None => {
                        if remote_opts {
                            return combo(
                                "token-file, tls-ca, plaintext and cache-dir go with store=gvfs://",
                            );
                        }
                        StoreAt::Dir(PathBuf::from(store))
                    }
                };
                DiskKind::Image {
                    name,
                    store,
                    overlay,
                }
            }
            (None, None) => return Err(DiskError::Syntax(s.into())),
        };
        Ok(Disk {
            kind,
            limit,
            poll_us,
        })
    }
}

impl Disk {
    /// The disk as `--disk` takes it.
    pub fn spec(&self) -> String {
        let p = |p: &Path| p.display().to_string();
        let mut spec = match &self.kind {
            DiskKind::Raw { path, read_only } => {
                let mut s = p(path);
                if *read_only {
                    s.push_str(",ro");
                }
                s
            }
            DiskKind::RawOverlay { path, overlay } => format!("{},overlay={}", p(path), p(overlay)),
            DiskKind::Image {
                name,
                store,
                overlay,
            } => {
                let store = match store {
                    StoreAt::Dir(d) => p(d),
                    StoreAt::Gvfs {
                        server,
                        token_file,
                        tls_ca,
                        cache_dir,
                    } => {
                        let mut s = format!("gvfs://{server},token-file={}", p(token_file));
                        match tls_ca {
                            Some(ca) => s.push_str(&format!(",tls-ca={}", p(ca))),
                            None => s.push_str(",plaintext"),
                        }
                        if let Some(c) = cache_dir {
                            s.push_str(&format!(",cache-dir={}", p(c)));
                        }
                        s
                    }
                };
                format!("image={name},store={store},overlay={}", p(overlay))
            }
        };
        if let Some(n) = self.limit.bytes_per_sec {
            spec.push_str(&format!(",bps={n}"));
        }
        if let Some(n) = self.limit.ops_per_sec {
            spec.push_str(&format!(",iops={n}"));
        }
        if let Some(n) = self.poll_us {
            spec.push_str(&format!(",poll={n}"));
        }
        spec
    }

    /// The disk with its files named through `f` (each path of it).
    fn map_paths(&self, f: impl Fn(&PathBuf) -> PathBuf) -> Disk {
        let kind = match &self.kind {
            DiskKind::Raw { path, read_only } => DiskKind::Raw {
                path: f(path),
                read_only: *read_only,
            },
            DiskKind::RawOverlay { path, overlay } => DiskKind::RawOverlay {
                path: f(path),
                overlay: f(overlay),
            },
            DiskKind::Image {
                name,
                store,
                overlay,
            } => DiskKind::Image {
                name: name.clone(),
                store: match store {
                    StoreAt::Dir(d) => StoreAt::Dir(f(d)),
                    StoreAt::Gvfs {
                        server,
                        token_file,
                        tls_ca,
                        cache_dir,
                    } => StoreAt::Gvfs {
                        server: server.clone(),
                        token_file: f(token_file),
                        tls_ca: tls_ca.as_ref().map(&f),
                        cache_dir: cache_dir.as_ref().map(&f),
                    },
                },
                overlay: f(overlay),
            },
        };
        Disk {
            kind,
            limit: self.limit,
            poll_us: self.poll_us,
        }
    }

    /// The disk with its files named by absolute paths (those of the
    /// working directory it was given in), for a restore elsewhere.
    pub fn absolute(&self) -> Disk {
        self.map_paths(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
    }

    /// The disk with relative paths taken as relative to `base` (a
    /// `--config` file's directory).
    pub fn relative_to(&self, base: &Path) -> Disk {
        self.map_paths(|p| base.join(p))
    }

    /// The file (or image) the guest's disk shows, for `vm info`.
    pub fn describe(&self) -> String {
        match &self.kind {
            DiskKind::Raw { path, .. } | DiskKind::RawOverlay { path, .. } => {
                path.display().to_string()
            }
            DiskKind::Image { name, .. } => format!("image={name}"),
        }
    }

    pub fn read_only(&self) -> bool {
        matches!(
            self.kind,
            DiskKind::Raw {
                read_only: true,
                ..
            }
        )
    }

    /// The overlay the guest's writes go to, if any.
    pub fn overlay(&self) -> Option<&Path> {
        match &self.kind {
            DiskKind::Raw { .. } => None,
            DiskKind::RawOverlay { overlay, .. } | DiskKind::Image { overlay, .. } => Some(overlay),
        }
    }

    /// Where an image's store is (`DIR` or `gvfs://HOST:PORT`).
    pub fn store(&self) -> Option<String> {
        match &self.kind {
            DiskKind::Image {
                store: StoreAt::Dir(d),
                ..
            } => Some(d.display().to_string()),
            DiskKind::Image {
                store: StoreAt::Gvfs { server, .. },
                ..
            } => Some(format!("gvfs://{server}")),
            _ => None,
        }
    }

    /// Opens the file (or the image and its overlay) and makes the
    /// device.
    pub fn open(&self) -> Result<(Blk, DiskHandle), OpenError> {
        let (backend, image, remote): (Arc<dyn devices::virtio::blk::BlockBackend>, _, _) =
            match &self.kind {
                DiskKind::Raw { path, read_only } => {
                    (Arc::new(RawFile::open(path, *read_only)?), None, None)
                }
                DiskKind::RawOverlay { path, overlay } => {
                    let b = Arc::new(ImageBackend::raw_overlay(path, overlay)?);
                    (b.clone(), Some(b), None)
                }
                DiskKind::Image {
                    name,
                    store,
                    overlay,
                } => {
                    let (disk, remote) = open_image(name, store, overlay)?;
                    let b = Arc::new(ImageBackend::image(disk, overlay)?);
                    (b.clone(), Some(b), remote)
                }
            };
        let blk = Blk::with_rate_limit(backend, self.limit)
            .with_poll(Duration::from_micros(self.poll_us.unwrap_or(0)));
        Ok((blk, DiskHandle { image, remote }))
    }
}

/// An image's disk from a local store or a GVFS server.
fn open_image(
    name: &str,
    store: &StoreAt,
    overlay: &Path,
) -> Result<(images::Disk, Option<Arc<GvfsStore>>), OpenError> {
    match store {
        StoreAt::Dir(dir) => {
            let store = images::Store::open(dir).map_err(|source| OpenError::Store {
                name: name.into(),
                source,
            })?;
            let disk =
                images::Disk::open(&store, name, overlay).map_err(|source| OpenError::Image {
                    name: name.into(),
                    source,
                })?;
            Ok((disk, None))
        }
        StoreAt::Gvfs {
            server,
            token_file,
            tls_ca,
            cache_dir,
        } => {
            let tls = match tls_ca {
                Some(ca) => Some(gvfs::transport::client_tls_config(ca)?),
                None => None,
            };
            let cfg = gvfs::client::ConnectConfig {
                addr: server.clone(),
                token: super::gvfs::read_token(token_file).map_err(OpenError::Token)?,
                tls,
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(60),
            };
            let remote = |source| OpenError::Remote {
                name: name.into(),
                source,
            };
            let store = Arc::new(GvfsStore::connect(cfg, cache_dir.clone()).map_err(remote)?);
            let resolved = store.resolve(name).map_err(remote)?;
            tracing::info!(
                "disk image {name:?} from {}: {} bytes in {} chunks of {} KiB, fetched as the guest reads them",
                store.url(),
                resolved.size,
                resolved.chunks.iter().filter(|c| c.is_some()).count(),
                resolved.chunk_size / 1024
            );
            let disk = images::Disk::from_resolved(resolved, overlay, store.clone(), None)
                .map_err(|source| OpenError::Image {
                    name: name.into(),
                    source,
                })?;
            Ok((disk, Some(store)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let d: Disk = "/d/a.img".parse().unwrap();
        assert_eq!((d.read_only(), d.spec()), (false, "/d/a.img".to_string()));
        let d: Disk = "b.img,ro".parse().unwrap();
        assert!(d.read_only());
        assert!(matches!(&d.absolute().kind, DiskKind::Raw { path, .. } if path.is_absolute()));
        assert_eq!(d.spec(), "b.img,ro");
        assert!(
            "a.img,rw"
                .parse::<Disk>()
                .unwrap_err()
                .to_string()
                .contains(r#"unknown disk option "rw""#)
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
    fn overlays_and_images_parse_and_print_back() {
        for spec in [
            "base.img,overlay=vm.ovl",
            "image=web,store=/s,overlay=o,iops=10,poll=50",
            "image=web,store=gvfs://h:7000,token-file=/t,plaintext,overlay=/o",
            "image=web,store=gvfs://h:7000,token-file=/t,tls-ca=/ca,cache-dir=/c,overlay=/o",
        ] {
            let d: Disk = spec.parse().unwrap();
            assert_eq!(d.spec(), spec);
            assert!(!d.read_only() && d.overlay().is_some(), "{spec}");
        }
        let d: Disk = "image=web,store=gvfs://h:7000,token-file=t,plaintext,overlay=o"
            .parse()
            .unwrap();
        assert_eq!(d.store().as_deref(), Some("gvfs://h:7000"));
        let rel = d.relative_to(Path::new("/cfg"));
        assert_eq!(
            rel.spec(),
            "image=web,store=gvfs://h:7000,token-file=/cfg/t,plaintext,overlay=/cfg/o"
        );
        let combos = [
            "base.img,overlay=o,ro",
            "base.img,store=/s",
            "base.img,plaintext",
            "image=web,store=/s",
            "image=web,overlay=o",
            "image=web,store=/s,overlay=o,ro",
            "image=web,store=/s,overlay=o,plaintext",
            "image=web,store=gvfs://h:1,overlay=o,plaintext",
            "image=web,store=gvfs://h:1,overlay=o,token-file=t",
            "image=web,store=gvfs://h:1,overlay=o,token-file=t,plaintext,tls-ca=c",
        ];
        for bad in combos {
            assert!(
                matches!(bad.parse::<Disk>(), Err(DiskError::Combination(..))),
                "{bad}: {:?}",
                bad.parse::<Disk>()
            );
        }
        for bad in ["image=,store=/s,overlay=o", "x=y"] {
            assert!(
                matches!(bad.parse::<Disk>(), Err(DiskError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "a.img,overlay=".parse::<Disk>(),
            Err(DiskError::Option(..))
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
        let d: Disk = "image=x,store=/nonexistent/store,overlay=/tmp/o"
            .parse()
            .unwrap();
        let line = crate::cli::chain(&d.open().err().expect("no store"));
        assert!(line.contains("is not an image store"), "{line}");
    }
}
