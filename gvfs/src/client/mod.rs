//! The caching client: connection, block cache and file-system core.

pub mod cache;
pub mod conn;
mod copies;
pub mod fs;

pub use cache::{BLOCK_SIZE, CacheStats};
pub use conn::{ClientError, ConnectConfig};
pub use fs::{
    BENCH_WHOLE_COPY_BYTES, DirItem, DirReader, Entry, Fs, FsOptions, OnDisconnect, Opened,
    ROOT_INO,
};
