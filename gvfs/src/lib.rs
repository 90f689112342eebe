//! GVFS: a remote file server, its wire protocol, and a caching client
//! that the host FUSE mount and the virtio-fs device both sit on.

pub mod bench;
pub mod client;
pub mod fuse;
pub mod fuse_proto;
mod limit;
pub mod proto;
pub mod server;
mod sys;

pub use sys::{block_termination_signals, wait_termination};
pub mod transport;
