//! The caching client: connection, block cache and file-system core.

pub mod cache;
pub mod conn;
mod copies;
pub mod fs;

pub use cache::{BLOCK_SIZE, CacheStats};
pub use conn::{ClientError, ConnectConfig};
pub use fs::{
    BENCH_WHOLE_COPY_BYTES, DEFAULT_MAX_CACHED_DIR_ENTRIES, DEFAULT_MAX_DIR_ENTRIES,
    DEFAULT_MAX_IDLE_INODES, DEFAULT_MAX_OPEN_DIRS, DEFAULT_MAX_OPEN_FILES, DirItem, DirReader,
    Entry, FileState, Fs, FsOptions, FsState, InodeState, MAX_LISTING_BATCHES, MAX_SAVED_INODES,
    MAX_SAVED_NAME, OnDisconnect, Opened, ROOT_INO, StateError,
};
