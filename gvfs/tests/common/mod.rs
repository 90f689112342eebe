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

/// A tiny server speaking the wire protocol that answers every request
/// with `answer`: what a hostile or broken server can send a client.
/// Its threads end with the test process.
pub fn fake_server<F>(answer: F) -> SocketAddr
where
    F: Fn(gvfs::proto::Request) -> gvfs::proto::Response + Send + Sync + 'static,
{
    use gvfs::proto;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut s) = sock else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let Ok(Some(_hello)) = proto::read_frame(&mut s) else {
                    return;
                };
                let welcome = proto::encode_welcome(&proto::Welcome {
                    version: proto::VERSION,
                    status: proto::HelloStatus::Accepted,
                    read_only: false,
                });
                if proto::write_frame(&mut s, &welcome).is_err() {
                    return;
                }
                while let Ok(Some(body)) = proto::read_frame(&mut s) {
                    let Ok((id, Ok(req))) = proto::decode_request(&body) else {
                        return;
                    };
                    let frame = proto::response_frame(id, &answer(req));
                    if proto::write_whole_frame(&mut s, &frame).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The client's handshake frame with the test token.
pub fn hello_frame() -> Vec<u8> {
    let body = gvfs::proto::encode_hello(&gvfs::proto::Hello {
        version: gvfs::proto::VERSION,
        token: TOKEN.to_vec(),
    });
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// A TCP connection to `dst` from the loopback address `src` (another
/// peer, as far as the server can tell).
pub fn connect_from(src: [u8; 4], dst: SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4 only")
    };
    let sin = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a socket we just created and own.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let local = sin(src, 0);
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes.
    let r = unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let remote = sin(dst.ip().octets(), dst.port());
    // SAFETY: `remote` is a valid sockaddr_in of `len` bytes.
    let r = unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) };
    assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
    stream
}

/// Whether the server closed `s` (end of stream or reset) within
/// `within`; false if it is still open then. Data already sent is read
/// and dropped.
pub fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    let end = std::time::Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Polls `f` until it holds or `within` has passed; whether it held.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
