//! A store served by a GVFS server (in this process, on loopback) read
//! through `GvfsStore`: the image resolves as from the directory, a disk
//! reads the same bytes, only the chunks touched are fetched (whole, once,
//! however many threads want one at the same time), a second client with
//! the same cache directory fetches nothing, and a damaged store is an
//! error naming what is wrong.

use gvfs::client::ConnectConfig;
use gvfs::server::{DEFAULT_MAX_NODES, Server, ServerConfig, ServerHandle};
use images::{ChunkSource, Disk, GvfsStore, RemoteError, Store, StoreError};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const CHUNK: u32 = 64 * 1024;

fn serve(dir: &Path) -> (ServerHandle, String) {
    let server = Server::bind(
        ServerConfig {
            export: dir.to_path_buf(),
            token: b"t".to_vec(),
            read_only: true,
            tls: None,
            uid_map: Default::default(),
            gid_map: Default::default(),
            workers: 4,
            max_nodes: DEFAULT_MAX_NODES,
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .unwrap();
    let addr = server.local_addr().to_string();
    (server.spawn(), addr)
}

fn connect(addr: &str, cache: Option<&Path>) -> Result<GvfsStore, RemoteError> {
    GvfsStore::connect(
        ConnectConfig {
            addr: addr.to_string(),
            token: b"t".to_vec(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        },
        cache.map(Path::to_path_buf),
    )
}

/// 16 chunks of 64 KiB, each different.
fn raw(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..16 * CHUNK as usize)
        .map(|i| ((i * 7 + i / 4093) % 256) as u8)
        .collect();
    let path = dir.join("raw");
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

#[test]
fn a_remote_image_reads_as_the_local_one_and_fetches_only_what_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, bytes) = raw(dir.path());
    let store_dir = dir.path().join("store");
    let store = Store::open_or_create(&store_dir, CHUNK).unwrap();
    store.import("img", &raw, &mut |_| {}).unwrap();
    let (_server, addr) = serve(&store_dir);

    let cache = dir.path().join("cache");
    let remote = Arc::new(connect(&addr, Some(&cache)).unwrap());
    assert_eq!(remote.chunk_size(), CHUNK);
    let resolved = remote.resolve("img").unwrap();
    let local = store.resolve("img").unwrap();
    assert_eq!(
        (resolved.top.as_str(), resolved.size, &resolved.chunks),
        (local.top.as_str(), local.size, &local.chunks)
    );
    let meta = remote.fetched().bytes;
    assert!(meta > 0 && meta < 16 * 1024, "metadata: {meta} bytes");

    let disk =
        Disk::from_resolved(resolved, &dir.path().join("ovl"), remote.clone(), None).unwrap();
    // Chunk 3, across 3|4, and chunk 9, read by 4 threads at once.
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 3 * CHUNK as u64 + 512).unwrap();
    assert_eq!(buf[..], bytes[3 * CHUNK as usize + 512..][..4096]);
    disk.read_at(&mut buf, 4 * CHUNK as u64 - 1024).unwrap();
    assert_eq!(buf[..], bytes[4 * CHUNK as usize - 1024..][..4096]);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let disk = &disk;
            let bytes = &bytes;
            s.spawn(move || {
                let mut b = vec![0u8; 512];
                let at = 9 * CHUNK as u64 + t * 8192;
                disk.read_at(&mut b, at).unwrap();
                assert_eq!(b[..], bytes[at as usize..][..512]);
            });
        }
    });
    let f = remote.fetched();
    assert_eq!(f.chunks, 3, "{f:?}");
    assert_eq!(
        f.bytes - meta,
        3 * u64::from(CHUNK),
        "whole chunks, once: {f:?}"
    );
    // Read again: from the cache.
    disk.read_at(&mut buf, 3 * CHUNK as u64).unwrap();
    assert_eq!(remote.fetched().bytes, f.bytes);
    drop(disk);

    // Another client (another VM) with the same cache directory.
    let again = Arc::new(connect(&addr, Some(&cache)).unwrap());
    let resolved = again.resolve("img").unwrap();
    let disk =
        Disk::from_resolved(resolved, &dir.path().join("ovl2"), again.clone(), None).unwrap();
    disk.read_at(&mut buf, 9 * CHUNK as u64).unwrap();
    assert_eq!(buf[..], bytes[9 * CHUNK as usize..][..4096]);
    assert_eq!(again.fetched().bytes, 0, "all from the cache directory");
}

#[test]
fn a_damaged_or_absent_remote_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = raw(dir.path());
    let store_dir = dir.path().join("store");
    let store = Store::open_or_create(&store_dir, CHUNK).unwrap();
    store.import("img", &raw, &mut |_| {}).unwrap();
    let top = store.image_layer("img").unwrap();
    let (_server, addr) = serve(&store_dir);
    let remote = connect(&addr, None).unwrap();
    let e = remote.resolve("nope").unwrap_err();
    assert!(
        matches!(e, RemoteError::Store(StoreError::NoImage(_))),
        "{e}"
    );
    // A layer cut short on the server.
    let layer = store_dir.join("layers").join(format!("{top}.json"));
    let text = std::fs::read(&layer).unwrap();
    std::fs::write(&layer, &text[..text.len() / 2]).unwrap();
    let e = remote.resolve("img").unwrap_err();
    let msg = images::chain_message(&e);
    assert!(
        msg.contains("gvfs://") && msg.contains("corrupted"),
        "{msg}"
    );
    // A missing chunk is named.
    std::fs::write(&layer, &text).unwrap();
    let resolved = remote.resolve("img").unwrap();
    let h = resolved.chunks[2].unwrap();
    std::fs::remove_file(store_dir.join("chunks").join(h.to_hex())).unwrap();
    let mut b = [0u8; 512];
    let e = remote.read_chunk_at(&h, 0, &mut b).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    // A chunk whose bytes changed on the server (same size) is refused.
    let h = resolved.chunks[5].unwrap();
    let path = store_dir.join("chunks").join(h.to_hex());
    let mut data = std::fs::read(&path).unwrap();
    data[100] ^= 1;
    std::fs::write(&path, &data).unwrap();
    let e = remote.read_chunk_at(&h, 0, &mut b).unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");
    // Not a store at all; a server that is not there.
    let (_other, other) = serve(dir.path());
    let e = connect(&other, None).err().unwrap();
    assert!(
        images::chain_message(&e).contains("not an image store"),
        "{e}"
    );
    let e = connect("127.0.0.1:1", None).err().unwrap();
    assert!(matches!(e, RemoteError::Connect { .. }), "{e}");
}
