//! An image store: a directory of content-addressed chunks, layers and
//! named images (the layout is in images/README.md).
//!
//! Metadata is plain JSON files, one per layer and one per image, each
//! replaced atomically (written, synced, renamed): no index database. A
//! store holds a few thousand layers at most, every command reads only the
//! files it needs, and the files stay readable with `cat` and `jq`, and
//! servable as they are by a GVFS server (the remote store to come). A
//! layer is named by the blake3 hash of its file, so a damaged or
//! truncated layer is detected on load. Chunks are files named by their
//! hash; identical chunks are one file; all-zero chunks are not stored.
//!
//! Commands that change the store (import, commit, rm, gc) hold an
//! exclusive `flock` on `DIR/lock`, so gc never sees a half-made layer. A
//! disk open on an image holds a shared lock on `DIR/locks/NAME.lock`,
//! which rm checks.

use crate::chunk::{ChunkError, ChunkHash, LocalChunks};
use crate::fsutil::{self, LockKind};
use crate::overlay::{self, BaseIdentity, BaseKind, CowDisk, Overlay, OverlayError};
use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} is not an image store (no store.json)")]
    NotAStore(PathBuf),
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupted")]
    BadJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is corrupted: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("layer {0} is missing")]
    MissingLayer(String),
    #[error("no image named {0:?}")]
    NoImage(String),
    #[error("an image named {0:?} exists already")]
    Exists(String),
    #[error(
        "{0:?} is not a valid image name (1-128 of A-Z a-z 0-9 . _ -, not starting with . or -)"
    )]
    BadName(String),
    #[error("the chunk size must be a power of two from 4 KiB to 64 MiB, not {0}")]
    BadChunkSize(u64),
    #[error("{path} is too large ({size} bytes; at most {MAX_CHUNKS} chunks)")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error(
        "{0} is a qcow2 image; converting it needs qemu-img, which is not installed (apt-get install qemu-utils)"
    )]
    NoQemuImg(PathBuf),
    #[error("qemu-img could not convert {path}: {stderr}")]
    Convert { path: PathBuf, stderr: String },
    #[error("image {name:?} is in use by a running VM (a disk holds {lock})")]
    InUse { name: String, lock: PathBuf },
    #[error("image {name:?} is the base of image {child:?}")]
    HasDependents { name: String, child: String },
    #[error("the store's layers are broken, gc refuses to delete anything")]
    Broken(#[source] Box<StoreError>),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

type Result<T> = std::result::Result<T, StoreError>;

/// Layers with their ids, top first.
pub type Chain = Vec<(String, Layer)>;

/// Default chunk size: 512 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 512 * 1024;
const FORMAT: u32 = 1;
/// Most chunks a disk may have (8 TiB in 512 KiB chunks): a resolved
/// image holds 33 bytes a chunk in memory.
pub const MAX_CHUNKS: u64 = 1 << 24;
/// Longest parent chain followed before a store counts as corrupted.
const MAX_DEPTH: usize = 4096;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoreConfig {
    format: u32,
    chunk_size: u32,
}

/// What a layer holds for one chunk index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zeros (not stored): hides whatever a lower layer holds there.
    Zero,
    Data(ChunkHash),
}

impl Serialize for ChunkRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ChunkRef::Zero => s.serialize_str("zero"),
            ChunkRef::Data(h) => h.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s == "zero" {
            return Ok(ChunkRef::Zero);
        }
        ChunkHash::from_hex(&s)
            .map(ChunkRef::Data)
            .map_err(serde::de::Error::custom)
    }
}

/// A layer: chunks by index over its parent (chunk indices it does not
/// hold come from the parent, or are zeros without one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layer {
    pub format: u32,
    pub parent: Option<String>,
    /// The disk's size in bytes with this layer on top.
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: BTreeMap<u64, ChunkRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageFile {
    format: u32,
    layer: String,
}

/// An image resolved to the chunk of each index, top layer down.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    pub top: String,
    pub size: u64,
    pub chunk_size: u32,
    /// One entry per chunk of the disk: `None` reads as zeros.
    pub chunks: Vec<Option<ChunkHash>>,
}

impl ResolvedImage {
    /// What an overlay on this image records as its base.
    pub fn identity(&self) -> BaseIdentity {
        let mut id = [0u8; 32];
        if let Ok(h) = ChunkHash::from_hex(&self.top) {
            id = h.0;
        }
        BaseIdentity {
            kind: BaseKind::Image,
            id,
            size: self.size,
            name: self.name.clone(),
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub name: String,
    pub layer: String,
    pub size: u64,
    /// Chunks of the image that are not all zeros.
    pub chunks: u64,
    /// Of those, chunks the store did not hold yet.
    pub new_chunks: u64,
    pub ms: u64,
}

/// What a commit did.
#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    pub name: String,
    pub layer: String,
    pub parent: String,
    /// Chunks of the new layer (those the overlay changed).
    pub changed_chunks: u64,
    /// Of those, chunks the store did not hold yet.
    pub new_chunks: u64,
}

/// One line of `ls`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub name: String,
    pub size: u64,
    pub layer: String,
    pub layers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub id: String,
    pub parent: Option<String>,
    /// Chunk indices the layer sets (zeros included).
    pub entries: usize,
    /// Bytes of stored chunks it references.
    pub bytes: u64,
}

/// What `info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    /// Layers, top first.
    pub layers: Vec<LayerInfo>,
    /// Chunks of the disk that are not zeros.
    pub chunks: u64,
    /// Distinct stored chunks its layers reference.
    pub stored_chunks: u64,
    /// Chunks (and their bytes) that no other image's layers reference.
    pub unique_chunks: u64,
    pub unique_bytes: u64,
}

/// What gc removed.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub layers_removed: u64,
    pub chunks_removed: u64,
    pub bytes_freed: u64,
    pub chunks_kept: u64,
}

/// An image store directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    chunk_size: u32,
}

/// Checks an image name: it becomes a file name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_string()))
    }
}

fn is_zero(buf: &[u8]) -> bool {
    // OR-folding fixed blocks vectorises; an early exit per byte does not.
    let mut blocks = buf.chunks_exact(64);
    blocks.all(|c| c.iter().fold(0, |a, &b| a | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

/// Reads the metadata files of a store by their path below its root:
/// the local directory ([`Store`]), or the same files on a GVFS server
/// (`crate::remote`).
pub trait StoreFiles {
    /// The whole file at `rel`; `Ok(None)` if there is none.
    fn read_file(&self, rel: &Path) -> std::io::Result<Option<Vec<u8>>>;
    /// Where `rel` is, for messages.
    fn describe(&self, rel: &Path) -> PathBuf;
}

/// A store's directory on this host.
struct LocalFiles<'a>(&'a Path);

impl StoreFiles for LocalFiles<'_> {
    fn read_file(&self, rel: &Path) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.0.join(rel)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn describe(&self, rel: &Path) -> PathBuf {
        self.0.join(rel)
    }
}

/// Reads `store.json` through `files`: the store's chunk size.
pub fn read_config(files: &dyn StoreFiles) -> Result<u32> {
    let rel = Path::new("store.json");
    let path = files.describe(rel);
    let Some(bytes) = files.read_file(rel).map_err(io(&path))? else {
        return Err(StoreError::NotAStore(files.describe(Path::new(""))));
    };
    let cfg: StoreConfig =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
            path: path.clone(),
            source,
        })?;
    if cfg.format != FORMAT {
        return Err(StoreError::Corrupt {
            path,
            what: format!("format {} (this vmplant reads {FORMAT})", cfg.format),
        });
    }
    check_chunk_size(u64::from(cfg.chunk_size)).map_err(|_| StoreError::Corrupt {
        path: path.clone(),
        what: format!("bad chunk size {}", cfg.chunk_size),
    })?;
    Ok(cfg.chunk_size)
}

/// Image `name` of the store `files` reads (chunk size `chunk_size`, from
/// [`read_config`]), resolved to one chunk per index: what a disk on a
/// remote store needs.
pub fn resolve_in(files: &dyn StoreFiles, chunk_size: u32, name: &str) -> Result<ResolvedImage> {
    Meta { files, chunk_size }.resolve(name)
}

/// The reading half of a store, over any [`StoreFiles`].
struct Meta<F: StoreFiles> {
    files: F,
    chunk_size: u32,
}

impl<F: StoreFiles> Meta<F> {
    fn image_layer(&self, name: &str) -> Result<String> {
        check_name(name)?;
        let rel = PathBuf::from("images").join(format!("{name}.json"));
        let path = self.files.describe(&rel);
        let Some(bytes) = self.files.read_file(&rel).map_err(io(&path))? else {
            return Err(StoreError::NoImage(name.to_string()));
        };
        let img: ImageFile =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
                path: path.clone(),
                source,
            })?;
        if img.format != FORMAT || ChunkHash::from_hex(&img.layer).is_err() {
            return Err(StoreError::Corrupt {
                path,
                what: "bad format or layer id".into(),
            });
        }
        Ok(img.layer)
    }

    fn layer(&self, id: &str) -> Result<Layer> {
        let rel = PathBuf::from("layers").join(format!("{id}.json"));
        let path = self.files.describe(&rel);
        // An id is a hash: anything else names no layer (and no path).
        if ChunkHash::from_hex(id).is_err() {
            return Err(StoreError::MissingLayer(id.to_string()));
        }
        let Some(bytes) = self.files.read_file(&rel).map_err(io(&path))? else {
            return Err(StoreError::MissingLayer(id.to_string()));
        };
        if ChunkHash::of(&bytes).to_hex() != id {
            return Err(StoreError::Corrupt {
                path,
                what: "its contents do not match its id (damaged or truncated)".into(),
            });
        }
        let layer: Layer =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
                path: path.clone(),
                source,
            })?;
        let chunks = layer.size.div_ceil(u64::from(layer.chunk_size.max(1)));
        if layer.format != FORMAT
            || layer.chunk_size != self.chunk_size
            || chunks > MAX_CHUNKS
            || layer
                .chunks
                .keys()
                .next_back()
                .is_some_and(|&i| i >= chunks)
        {
            return Err(StoreError::Corrupt {
                path,
                what: "bad format, chunk size, size or chunk index".into(),
            });
        }
        Ok(layer)
    }

    fn chain(&self, top: &str) -> Result<Chain> {
        let mut out = Vec::new();
        let mut next = Some(top.to_string());
        while let Some(id) = next {
            if out.len() >= MAX_DEPTH {
                return Err(StoreError::Corrupt {
                    path: self
                        .files
                        .describe(&PathBuf::from("layers").join(format!("{top}.json"))),
                    what: format!("more than {MAX_DEPTH} layers under it"),
                });
            }
            let layer = self.layer(&id)?;
            next = layer.parent.clone();
            out.push((id, layer));
        }
        Ok(out)
    }

    fn resolve(&self, name: &str) -> Result<ResolvedImage> {
        let top = self.image_layer(name)?;
        let chain = self.chain(&top)?;
        let size = chain.first().map_or(0, |(_, l)| l.size);
        let n = size.div_ceil(u64::from(self.chunk_size)) as usize;
        let mut chunks: Vec<Option<ChunkHash>> = vec![None; n];
        let mut set = vec![false; n];
        for (_, layer) in &chain {
            for (&i, r) in &layer.chunks {
                let Some(slot) = set.get_mut(i as usize) else {
                    continue;
                };
                if !*slot {
                    *slot = true;
                    chunks[i as usize] = match r {
                        ChunkRef::Zero => None,
                        ChunkRef::Data(h) => Some(*h),
                    };
                }
            }
        }
        Ok(ResolvedImage {
            name: name.to_string(),
            top,
            size,
            chunk_size: self.chunk_size,
            chunks,
        })
    }
}

impl<F: StoreFiles + ?Sized> StoreFiles for &F {
    fn read_file(&self, rel: &Path) -> std::io::Result<Option<Vec<u8>>> {
        (**self).read_file(rel)
    }

    fn describe(&self, rel: &Path) -> PathBuf {
        (**self).describe(rel)
    }
}

impl Store {
    /// Opens an existing store.
    pub fn open(dir: &Path) -> Result<Store> {
        let chunk_size = read_config(&LocalFiles(dir)).map_err(|e| match e {
            StoreError::NotAStore(_) => StoreError::NotAStore(dir.to_path_buf()),
            e => e,
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
            chunk_size,
        })
    }

    /// Opens the store at `dir`, making it (with `chunk_size`) if it is
    /// missing or empty.
    pub fn open_or_create(dir: &Path, chunk_size: u32) -> Result<Store> {
        if dir.join("store.json").exists() {
            return Store::open(dir);
        }
        check_chunk_size(u64::from(chunk_size))?;
        for sub in ["chunks", "layers", "images", "locks", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let cfg = serde_json::to_vec_pretty(&StoreConfig {
            format: FORMAT,
            chunk_size,
        })
        .map_err(|source| StoreError::BadJson {
            path: dir.join("store.json"),
            source,
        })?;
        let path = dir.join("store.json");
        fsutil::write_atomic(&path, &cfg).map_err(io(&path))?;
        Store::open(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn chunks_dir(&self) -> PathBuf {
        self.dir.join("chunks")
    }

    /// The source that reads this store's chunks.
    pub fn local_chunks(&self) -> LocalChunks {
        LocalChunks::new(&self.chunks_dir())
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.dir.join("images").join(format!("{name}.json"))
    }

    fn layer_path(&self, id: &str) -> PathBuf {
        self.dir.join("layers").join(format!("{id}.json"))
    }

    /// The lock file a disk open on image `name` holds shared.
    pub fn image_lock_path(&self, name: &str) -> PathBuf {
        self.dir.join("locks").join(format!("{name}.lock"))
    }

    /// Takes the store's exclusive lock (commands that change it).
    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join("lock");
        let f = fsutil::open_lock_file(&path).map_err(io(&path))?;
        fsutil::lock(f, LockKind::Exclusive).map_err(io(&path))
    }

    /// Holds image `name` in use until the lock is dropped (rm refuses it
    /// meanwhile).
    pub fn lock_image(&self, name: &str) -> Result<Flock<File>> {
        check_name(name)?;
        let path = self.image_lock_path(name);
        let f = fsutil::open_lock_file(&path).map_err(io(&path))?;
        let l = fsutil::lock(f, LockKind::Shared).map_err(io(&path))?;
        // rm may have removed the image while we waited.
        self.image_layer(name)?;
        Ok(l)
    }

    /// The top layer of image `name`.
    pub fn image_layer(&self, name: &str) -> Result<String> {
        self.meta().image_layer(name)
    }

    /// Loads a layer, checking that its contents match its id.
    pub fn layer(&self, id: &str) -> Result<Layer> {
        self.meta().layer(id)
    }

    fn meta(&self) -> Meta<LocalFiles<'_>> {
        Meta {
            files: LocalFiles(&self.dir),
            chunk_size: self.chunk_size,
        }
    }

    /// Writes a layer and returns its id.
    fn put_layer(&self, layer: &Layer) -> Result<String> {
        let bytes = serde_json::to_vec(layer).map_err(|source| StoreError::BadJson {
            path: self.dir.join("layers"),
            source,
        })?;
        let id = ChunkHash::of(&bytes).to_hex();
        let path = self.layer_path(&id);
        if !path.exists() {
            fsutil::write_atomic(&path, &bytes).map_err(io(&path))?;
        }
        Ok(id)
    }

    fn put_image(&self, name: &str, layer: &str) -> Result<()> {
        let path = self.image_path(name);
        let bytes = serde_json::to_vec_pretty(&ImageFile {
            format: FORMAT,
            layer: layer.to_string(),
        })
        .map_err(|source| StoreError::BadJson {
            path: path.clone(),
            source,
        })?;
        fsutil::write_atomic(&path, &bytes).map_err(io(&path))
    }

    /// Layers from `top` down to the base layer, top first.
    pub fn chain(&self, top: &str) -> Result<Chain> {
        self.meta().chain(top)
    }

    /// Image `name` resolved to one chunk per index.
    pub fn resolve(&self, name: &str) -> Result<ResolvedImage> {
        self.meta().resolve(name)
    }

    /// Names of the images, sorted.
    pub fn image_names(&self) -> Result<Vec<String>> {
        let dir = self.dir.join("images");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if check_name(name).is_ok() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Stores a chunk unless it is there; true if it was new. Not synced:
    /// callers sync the file system before writing the layer.
    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool> {
        let path = self.chunks_dir().join(hash.to_hex());
        // One cut short by a power failure before its import synced (and
        // named by no layer then) is written again.
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64) {
            return Ok(false);
        }
        let tmp = self
            .chunks_dir()
            .join(format!(".tmp-{}-{}", std::process::id(), hash.to_hex()));
        std::fs::write(&tmp, data).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(true)
    }

    /// Makes the chunks written so far durable (before a layer names them).
    fn sync_chunks(&self) -> Result<()> {
        let dir = self.chunks_dir();
        let f = File::open(&dir).map_err(io(&dir))?;
        nix::unistd::syncfs(&f).map_err(|e| io(&dir)(e.into()))
    }

    /// Imports a raw (or, through qemu-img, qcow2) disk image as a new
    /// image of one layer. `progress` gets the percentage done.
    pub fn import(
        &self,
        name: &str,
        file: &Path,
        progress: &mut dyn FnMut(u32),
    ) -> Result<ImportReport> {
        check_name(name)?;
        let _lock = self.lock()?;
        if self.image_path(name).exists() {
            return Err(StoreError::Exists(name.to_string()));
        }
        let mut f = File::open(file).map_err(io(file))?;
        let mut magic = [0u8; 4];
        let qcow2 = f.read_exact(&mut magic).is_ok() && magic == *b"QFI\xfb";
        if qcow2 {
            let raw = self.convert_qcow2(file)?;
            let res = self.import_raw(name, &raw, progress);
            let _ = std::fs::remove_file(&raw);
            return res;
        }
        self.import_raw(name, file, progress)
    }

    fn convert_qcow2(&self, file: &Path) -> Result<PathBuf> {
        let tmp = self.dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let out = tmp.join(format!("convert-{}.raw", std::process::id()));
        let res = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(file)
            .arg(&out)
            .output();
        match res {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NoQemuImg(file.to_path_buf()))
            }
            Err(e) => Err(io(Path::new("qemu-img"))(e)),
            Ok(o) if !o.status.success() => {
                let _ = std::fs::remove_file(&out);
                Err(StoreError::Convert {
                    path: file.to_path_buf(),
                    stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
                })
            }
            Ok(_) => Ok(out),
        }
    }

    fn import_raw(
        &self,
        name: &str,
        file: &Path,
        progress: &mut dyn FnMut(u32),
    ) -> Result<ImportReport> {
        let start = std::time::Instant::now();
        let mut f = File::open(file).map_err(io(file))?;
        // Seeking to the end sizes block devices too.
        let size = f.seek(SeekFrom::End(0)).map_err(io(file))?;
        f.seek(SeekFrom::Start(0)).map_err(io(file))?;
        if size == 0 {
            return Err(StoreError::Empty(file.to_path_buf()));
        }
        if size.div_ceil(u64::from(self.chunk_size)) > MAX_CHUNKS {
            return Err(StoreError::TooLarge {
                path: file.to_path_buf(),
                size,
            });
        }
        let cs = self.chunk_size as usize;
        let mut buf = vec![0u8; cs];
        let mut chunks = BTreeMap::new();
        let (mut stored, mut new) = (0u64, 0u64);
        let n = size.div_ceil(cs as u64);
        let mut last_pct = 0;
        for i in 0..n {
            let want = (size - i * cs as u64).min(cs as u64) as usize;
            buf[want..].fill(0);
            f.read_exact(&mut buf[..want]).map_err(io(file))?;
            if !is_zero(&buf) {
                let h = ChunkHash::of(&buf);
                new += u64::from(self.put_chunk(&h, &buf)?);
                stored += 1;
                chunks.insert(i, ChunkRef::Data(h));
            }
            let pct = ((i + 1) * 100 / n) as u32;
            if pct / 10 > last_pct / 10 {
                last_pct = pct;
                progress(pct);
            }
        }
        self.sync_chunks()?;
        let layer = self.put_layer(&Layer {
            format: FORMAT,
            parent: None,
            size,
            chunk_size: self.chunk_size,
            chunks,
        })?;
        self.put_image(name, &layer)?;
        Ok(ImportReport {
            name: name.to_string(),
            layer,
            size,
            chunks: stored,
            new_chunks: new,
            ms: start.elapsed().as_millis() as u64,
        })
    }

    /// Turns the overlay of a stopped VM on image `base` into a new layer
    /// on top of `base`'s, holding only the chunks it changed, and an
    /// image `name` of it.
    pub fn commit(&self, overlay_path: &Path, base: &str, name: &str) -> Result<CommitReport> {
        check_name(name)?;
        let _lock = self.lock()?;
        if self.image_path(name).exists() {
            return Err(StoreError::Exists(name.to_string()));
        }
        let resolved = self.resolve(base)?;
        // Refused while a VM has it open (it holds the overlay's lock).
        let overlay = Overlay::open(overlay_path, Some(&resolved.identity()))?;
        let chunk_size = u64::from(self.chunk_size);
        let bs = overlay.block_size();
        let mut touched = BTreeSet::new();
        for b in overlay.present_blocks() {
            let start = b * bs;
            let end = (start + bs).min(resolved.size);
            for c in start / chunk_size..=(end - 1) / chunk_size {
                touched.insert(c);
            }
        }
        let size = resolved.size;
        let top = resolved.top.clone();
        let base_chunks = resolved.chunks.clone();
        let source = Arc::new(self.local_chunks());
        let disk = CowDisk::new(overlay, crate::disk::ImageBase::new(resolved, source));
        let mut buf = vec![0u8; chunk_size as usize];
        let mut chunks = BTreeMap::new();
        let mut new = 0;
        for c in touched {
            let start = c * chunk_size;
            let len = (size - start).min(chunk_size) as usize;
            buf[len..].fill(0);
            disk.read_at(&mut buf[..len], start)?;
            let now = if is_zero(&buf) {
                None
            } else {
                Some(ChunkHash::of(&buf))
            };
            let was = base_chunks.get(c as usize).copied().flatten();
            if now == was {
                continue;
            }
            match now {
                None => {
                    chunks.insert(c, ChunkRef::Zero);
                }
                Some(h) => {
                    new += u64::from(self.put_chunk(&h, &buf)?);
                    chunks.insert(c, ChunkRef::Data(h));
                }
            }
        }
        drop(disk);
        self.sync_chunks()?;
        let changed = chunks.len() as u64;
        let layer = self.put_layer(&Layer {
            format: FORMAT,
            parent: Some(top.clone()),
            size,
            chunk_size: self.chunk_size,
            chunks,
        })?;
        self.put_image(name, &layer)?;
        Ok(CommitReport {
            name: name.to_string(),
            layer,
            parent: top,
            changed_chunks: changed,
            new_chunks: new,
        })
    }

    /// The images with their layer chains.
    fn all_chains(&self) -> Result<Vec<(String, Chain)>> {
        let mut out = Vec::new();
        for name in self.image_names()? {
            let top = self.image_layer(&name)?;
            let chain = self.chain(&top)?;
            out.push((name, chain));
        }
        Ok(out)
    }

    pub fn list(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for (name, chain) in self.all_chains()? {
            out.push(ImageSummary {
                name,
                size: chain.first().map_or(0, |(_, l)| l.size),
                layer: chain.first().map_or_else(String::new, |(id, _)| id.clone()),
                layers: chain.len(),
            });
        }
        Ok(out)
    }

    pub fn info(&self, name: &str) -> Result<ImageInfo> {
        let resolved = self.resolve(name)?;
        let chain = self.chain(&resolved.top)?;
        let chunk_size = u64::from(self.chunk_size);
        let mut mine: HashSet<ChunkHash> = HashSet::new();
        let mut layers = Vec::new();
        for (id, layer) in &chain {
            let mut bytes = 0;
            for r in layer.chunks.values() {
                if let ChunkRef::Data(h) = r {
                    mine.insert(*h);
                    bytes += chunk_size;
                }
            }
            layers.push(LayerInfo {
                id: id.clone(),
                parent: layer.parent.clone(),
                entries: layer.chunks.len(),
                bytes,
            });
        }
        // Chunks any other image's layers reference (shared layers too).
        let mut others: HashSet<ChunkHash> = HashSet::new();
        for other in self.image_names()? {
            if other == name {
                continue;
            }
            let top = self.image_layer(&other)?;
            for (_, layer) in self.chain(&top)? {
                for r in layer.chunks.values() {
                    if let ChunkRef::Data(h) = r {
                        others.insert(*h);
                    }
                }
            }
        }
        let unique = mine.difference(&others).count() as u64;
        Ok(ImageInfo {
            name: name.to_string(),
            size: resolved.size,
            chunk_size: self.chunk_size,
            layers,
            chunks: resolved.chunks.iter().filter(|c| c.is_some()).count() as u64,
            stored_chunks: mine.len() as u64,
            unique_chunks: unique,
            unique_bytes: unique * chunk_size,
        })
    }

    /// Removes image `name` (its layers and chunks stay until gc). Refused
    /// while a disk has it open or another image is made on its top layer.
    pub fn remove(&self, name: &str) -> Result<()> {
        let _lock = self.lock()?;
        let top = self.image_layer(name)?;
        for (other, chain) in self.all_chains()? {
            let other_top = chain.first().map(|(id, _)| id.as_str());
            if other != name && other_top != Some(&top) && chain.iter().any(|(id, _)| *id == top) {
                return Err(StoreError::HasDependents {
                    name: name.to_string(),
                    child: other,
                });
            }
        }
        let lock_path = self.image_lock_path(name);
        let f = fsutil::open_lock_file(&lock_path).map_err(io(&lock_path))?;
        let Some(_held) = fsutil::try_lock(f, LockKind::Exclusive).map_err(io(&lock_path))? else {
            return Err(StoreError::InUse {
                name: name.to_string(),
                lock: lock_path,
            });
        };
        let path = self.image_path(name);
        std::fs::remove_file(&path).map_err(io(&path))?;
        fsutil::sync_parent(&path).map_err(io(&path))?;
        let _ = std::fs::remove_file(&lock_path);
        Ok(())
    }

    /// Deletes the layers no image reaches and the chunks no remaining
    /// layer references (and leftovers of interrupted writes).
    pub fn gc(&self) -> Result<GcReport> {
        let _lock = self.lock()?;
        let chains = self
            .all_chains()
            .map_err(|e| StoreError::Broken(Box::new(e)))?;
        let mut live_layers: HashSet<String> = HashSet::new();
        let mut live_chunks: HashSet<ChunkHash> = HashSet::new();
        for (_, chain) in &chains {
            for (id, layer) in chain {
                if live_layers.insert(id.clone()) {
                    for r in layer.chunks.values() {
                        if let ChunkRef::Data(h) = r {
                            live_chunks.insert(*h);
                        }
                    }
                }
            }
        }
        let mut report = GcReport {
            layers_removed: 0,
            chunks_removed: 0,
            bytes_freed: 0,
            chunks_kept: 0,
        };
        let layers = self.dir.join("layers");
        for e in std::fs::read_dir(&layers).map_err(io(&layers))? {
            let e = e.map_err(io(&layers))?;
            let fname = e.file_name().to_string_lossy().into_owned();
            let live = fname
                .strip_suffix(".json")
                .is_some_and(|id| live_layers.contains(id));
            if !live {
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                if !fname.starts_with(".tmp-") {
                    report.layers_removed += 1;
                }
            }
        }
        let dir = self.chunks_dir();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let fname = e.file_name().to_string_lossy().into_owned();
            match ChunkHash::from_hex(&fname) {
                Ok(h) if live_chunks.contains(&h) => report.chunks_kept += 1,
                parsed => {
                    let len = e.metadata().map_or(0, |m| m.len());
                    std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                    if parsed.is_ok() {
                        report.chunks_removed += 1;
                        report.bytes_freed += len;
                    }
                }
            }
        }
        let tmp = self.dir.join("tmp");
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for d in [&layers, &dir] {
            fsutil::sync_dir(d).map_err(io(d))?;
        }
        Ok(report)
    }

    /// A map of chunk hash to how many images' chains reference it (for
    /// tests and reports).
    pub fn chunk_refs(&self) -> Result<HashMap<ChunkHash, usize>> {
        let mut out = HashMap::new();
        for (_, chain) in self.all_chains()? {
            let mut mine = HashSet::new();
            for (_, l) in &chain {
                for r in l.chunks.values() {
                    if let ChunkRef::Data(h) = r {
                        mine.insert(*h);
                    }
                }
            }
            for h in mine {
                *out.entry(h).or_insert(0) += 1;
            }
        }
        Ok(out)
    }
}

fn check_chunk_size(n: u64) -> Result<()> {
    if n.is_power_of_two() && (4096..=(64 << 20)).contains(&n) {
        Ok(())
    } else {
        Err(StoreError::BadChunkSize(n))
    }
}

/// Creates an overlay for image `name` (used by tests and the CLI).
pub fn create_overlay(store: &Store, name: &str, path: &Path) -> Result<()> {
    let resolved = store.resolve(name)?;
    overlay::create(path, resolved.identity(), overlay::DEFAULT_BLOCK_SIZE)?;
    Ok(())
}
