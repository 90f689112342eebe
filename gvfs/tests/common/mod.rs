//! Shared test harness: a served temp directory, clients, mounts that are
//! always unmounted, and bounded shell commands.
#![allow(dead_code)]

use std::ffi::CString;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use gvfs::client::{ConnectConfig, Fs, FsOptions};
use gvfs::server::{IdMap, Server, ServerConfig, ServerHandle};

pub const TOKEN: &[u8] = b"test-token-123";

pub fn server_config(export: &Path) -> ServerConfig {
    ServerConfig {
        export: export.to_path_buf(),
        token: TOKEN.to_vec(),
        read_only: false,
        tls: None,
        uid_map: IdMap::default(),
        gid_map: IdMap::default(),
        workers: 4,
        max_nodes: gvfs::server::DEFAULT_MAX_NODES,
    }
}

pub fn start(cfg: ServerConfig, addr: &str) -> ServerHandle {
    let addr: SocketAddr = addr.parse().unwrap();
    // The port of a server just stopped may take a moment to free up.
    for _ in 0..50 {
        match Server::bind(cfg.clone(), addr) {
            Ok(s) => return s.spawn(),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    panic!("cannot bind {addr}");
}

pub fn connect_config(addr: SocketAddr) -> ConnectConfig {
    ConnectConfig {
        addr: addr.to_string(),
        token: TOKEN.to_vec(),
        tls: None,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(30),
    }
}

pub fn client(addr: SocketAddr, opts: FsOptions) -> Arc<Fs> {
    Arc::new(Fs::new(connect_config(addr), opts).unwrap())
}

/// Unmounts (lazily, so that even a hung mount goes) when dropped.
pub struct MountGuard {
    pub path: PathBuf,
    pub session: Option<fuser::BackgroundSession>,
}

pub fn lazy_umount(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

impl MountGuard {
    pub fn mount(fs: Arc<Fs>, path: &Path) -> MountGuard {
        Self::mount_as(fs, path, false)
    }
    pub fn mount_read_only(fs: Arc<Fs>, path: &Path) -> MountGuard {
        Self::mount_as(fs, path, true)
    }
    fn mount_as(fs: Arc<Fs>, path: &Path, read_only: bool) -> MountGuard {
        std::fs::create_dir_all(path).unwrap();
        let session = gvfs::fuse::mount(fs, path, read_only).expect("mount");
        MountGuard {
            path: path.to_path_buf(),
            session: Some(session),
        }
    }
    pub fn unmount(mut self) {
        if let Some(s) = self.session.take() {
            s.umount_and_join().unwrap();
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.session.is_some() {
            lazy_umount(&self.path);
            self.session.take();
        }
    }
}

/// Runs `f` on a thread; fails the test if it takes longer than `secs`
/// (after lazily unmounting `mnt`, so nothing stays hung).
pub fn bounded<F: FnOnce() + Send + 'static>(secs: u64, mnt: Option<PathBuf>, f: F) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => t.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: report its message.
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            if let Some(m) = mnt {
                lazy_umount(&m);
            }
            panic!("test took longer than {secs} s");
        }
    }
}

/// Runs a shell command (bounded to 60 s); returns (success, stdout, stderr).
pub fn sh(cmd: &str) -> (bool, String, String) {
    let out = Command::new("timeout")
        .args(["60", "sh", "-c", cmd])
        .output()
        .expect("run sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn sh_ok(cmd: &str) -> String {
    let (ok, out, err) = sh(cmd);
    assert!(ok, "`{cmd}` failed: {err}");
    out
}

pub fn sha256(path: &Path) -> String {
    let out = sh_ok(&format!("sha256sum '{}'", path.display()));
    out.split_whitespace().next().unwrap().to_string()
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn read_ops(h: &ServerHandle) -> (u64, u64) {
    let c = h.op_stats(gvfs::proto::op::READ);
    (c.count, c.bytes)
}
