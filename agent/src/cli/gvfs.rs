//! `vmplant gvfs`: serve or mount a GVFS file system.

use super::CliResult;
use clap::{Args, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use gvfs::client::{ConnectConfig, Fs, FsOptions, OnDisconnect};
use gvfs::server::{IdMap, Server, ServerConfig};

#[derive(Debug, Subcommand)]
pub enum GvfsCommand {
    /// Export a directory to GVFS clients.
    Serve(ServeArgs),
    /// Mount a served directory on this host with FUSE (until Ctrl-C or SIGTERM).
    Mount(MountArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The directory to export; nothing outside it is reachable.
    #[arg(long, value_name = "DIR")]
    export: PathBuf,
    /// Address to listen on, IP:PORT, e.g. 0.0.0.0:7070.
    #[arg(long, value_name = "ADDR", value_parser = listen_addr)]
    listen: SocketAddr,
    /// File holding the token clients must present.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// Refuse every change (EROFS).
    #[arg(long)]
    read_only: bool,
    /// TLS certificate chain (PEM).
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "plaintext"
    )]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Plain TCP, allowed only on a loopback address.
    #[arg(long)]
    plaintext: bool,
    /// Client uid REMOTE is local uid LOCAL on this host (repeatable).
    #[arg(long, value_name = "REMOTE:LOCAL")]
    map_uid: Vec<String>,
    /// Client gid REMOTE is local gid LOCAL on this host (repeatable).
    #[arg(long, value_name = "REMOTE:LOCAL")]
    map_gid: Vec<String>,
    /// Threads executing requests.
    #[arg(long, default_value_t = 8)]
    workers: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Disconnect {
    /// Fail calls with EIO while the server is unreachable.
    Eio,
    /// Block calls until the server is back.
    Wait,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Server address, host:port (the host is checked against its certificate).
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// File holding the token.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// CA certificate(s) to trust for the server (PEM).
    #[arg(long, value_name = "FILE", conflicts_with = "plaintext")]
    tls_ca: Option<PathBuf>,
    /// Plain TCP (the server must allow it).
    #[arg(long)]
    plaintext: bool,
    /// Persistent block cache directory (default: memory only).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Size bound of the persistent cache, in MiB.
    #[arg(long, default_value_t = 4096, value_parser = crate::cli::mib)]
    cache_size_mib: u64,
    /// Size of the memory block cache, in MiB.
    #[arg(long, default_value_t = 256, value_parser = crate::cli::mib)]
    mem_cache_mib: u64,
    /// What calls do while the server is unreachable.
    #[arg(long, value_enum, default_value = "eio")]
    on_disconnect: Disconnect,
    /// Seconds to wait for an answer before the server counts as gone
    /// (the connection is dropped; then --on-disconnect applies).
    #[arg(long, default_value_t = 60.0)]
    request_timeout: f64,
    /// Seconds attributes and directory listings are trusted.
    #[arg(long, default_value_t = 1.0)]
    attr_timeout: f64,
    /// Keep whole local copies of files read in full, up to this many MiB
    /// (unnamed files in --cache-dir, or the temporary directory), and
    /// pass reads of an unchanged file with a copy through to it in the
    /// kernel: warm reads as fast as local ones, cold reads slower (each
    /// block is also written locally). Read-only mounts only. 0: off.
    #[arg(long, default_value_t = 0, value_parser = crate::cli::mib)]
    whole_copy_mib: u64,
    /// Where to mount.
    mountpoint: PathBuf,
}

pub fn run(cmd: GvfsCommand) -> CliResult {
    let res = match cmd {
        GvfsCommand::Serve(a) => serve(a),
        GvfsCommand::Mount(a) => mount(a),
    };
    // Print the whole cause chain ("cannot connect: connection refused").
    res.map_err(|e| super::switch::chain(e.as_ref()).into())
}

/// `--listen`: an IP address and a port (a name is not resolved here).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not IP:PORT (e.g. 127.0.0.1:7070, 0.0.0.0:7070 or [::]:7070)")
    })
}

pub(super) fn read_token(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = raw.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(format!("{} holds no token", path.display()));
    }
    Ok(token)
}

fn id_map(pairs: &[String]) -> Result<IdMap, String> {
    let pairs = pairs
        .iter()
        .map(|p| {
            IdMap::parse_pair(p).ok_or_else(|| format!("bad mapping {p:?}, want REMOTE:LOCAL"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(IdMap { pairs })
}

fn serve(a: ServeArgs) -> CliResult {
    let tls = match (&a.tls_cert, &a.tls_key, a.plaintext) {
        (Some(c), Some(k), false) => Some(gvfs::transport::server_tls_config(c, k)?),
        (None, None, true) => None,
        _ => return Err("give --tls-cert and --tls-key, or --plaintext".into()),
    };
    let cfg = ServerConfig {
        export: a.export,
        token: read_token(&a.token_file)?,
        read_only: a.read_only,
        tls,
        uid_map: id_map(&a.map_uid)?,
        gid_map: id_map(&a.map_gid)?,
        workers: a.workers,
        max_nodes: gvfs::server::DEFAULT_MAX_NODES,
    };
    // Signals go to the wait below, not to the server's threads.
    gvfs::block_termination_signals();
    let server = Server::bind(cfg, a.listen)?;
    eprintln!("gvfs: serving on {}", server.local_addr());
    let handle = server.spawn();
    let sig = loop {
        if let Some(sig) = gvfs::wait_termination(Duration::from_secs(3600)) {
            break sig;
        }
    };
    tracing::info!(sig, "shutting down");
    drop(handle);
    Ok(signal_exit(Some(sig)))
}

fn mount(a: MountArgs) -> CliResult {
    let tls = match (&a.tls_ca, a.plaintext) {
        (Some(ca), false) => Some(gvfs::transport::client_tls_config(ca)?),
        (None, true) => None,
        _ => return Err("give --tls-ca, or --plaintext".into()),
    };
    if !(a.attr_timeout >= 0.0 && a.attr_timeout < 1e6) {
        return Err("--attr-timeout must be between 0 and 1e6 seconds".into());
    }
    if !(a.request_timeout > 0.0 && a.request_timeout < 1e6) {
        return Err("--request-timeout must be between 0 and 1e6 seconds".into());
    }
    let connect = ConnectConfig {
        addr: a.server.clone(),
        token: read_token(&a.token_file)?,
        tls,
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs_f64(a.request_timeout),
    };
    let opts = FsOptions {
        attr_timeout: Duration::from_secs_f64(a.attr_timeout),
        on_disconnect: match a.on_disconnect {
            Disconnect::Eio => OnDisconnect::Eio,
            Disconnect::Wait => OnDisconnect::Wait,
        },
        cache_dir: a.cache_dir,
        mem_cache_bytes: a.mem_cache_mib << 20,
        disk_cache_bytes: a.cache_size_mib << 20,
        whole_copy_bytes: a.whole_copy_mib << 20,
        ..FsOptions::default()
    };
    // Signals go to the wait below, not to the threads started from here on.
    gvfs::block_termination_signals();
    let fs = Arc::new(Fs::new(connect, opts)?);
    fs.set_label(&a.mountpoint.display().to_string());
    fs.connect()?;
    let read_only = fs.read_only()?;
    let session = gvfs::fuse::mount(fs, &a.mountpoint, read_only)
        .map_err(|e| format!("cannot mount on {}: {e}", a.mountpoint.display()))?;
    eprintln!("gvfs: {} mounted on {}", a.server, a.mountpoint.display());
    let signal = loop {
        if let Some(sig) = gvfs::wait_termination(Duration::from_millis(500)) {
            tracing::info!(sig, "unmounting");
            break Some(sig);
        }
        if session.guard.is_finished() {
            // Unmounted from outside (fusermount3 -u, umount): a normal
            // end. The kernel's mount is gone, so the session must not
            // try to unmount it again (that fails with EINVAL).
            std::mem::forget(session);
            eprintln!("gvfs: {} was unmounted", a.mountpoint.display());
            return Ok(ExitCode::SUCCESS);
        }
    };
    unmount(&a.mountpoint, session)?;
    eprintln!("gvfs: unmounted {}", a.mountpoint.display());
    Ok(signal_exit(signal))
}

/// Unmounts `dir` and ends its FUSE session. A mount that is busy for a
/// moment (a file still being closed) is tried again for up to 2 s, and
/// then detached (it goes once the last user lets go); without the right
/// to unmount it directly (not root), fuser's own way (fusermount3 -u).
fn unmount(dir: &Path, session: gvfs::fuse::BackgroundSession) -> Result<(), String> {
    use nix::errno::Errno;
    use nix::mount::{MntFlags, umount2};
    let (mut tries, mut detached) = (0, false);
    let direct = loop {
        match umount2(dir, MntFlags::empty()) {
            Err(Errno::EBUSY) if tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(Errno::EBUSY) => {
                tracing::warn!(mountpoint = %dir.display(), "still busy after 2 s: detached");
                detached = true;
                break umount2(dir, MntFlags::MNT_DETACH);
            }
            other => break other,
        }
    };
    match direct {
        Ok(()) => {
            // The kernel ends the session (at once, or once a detached
            // mount's last user lets go); its thread ends with it. The
            // session must not unmount again (EINVAL).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !detached && !session.guard.is_finished() && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::mem::forget(session);
            Ok(())
        }
        Err(_) => session.umount_and_join().or_else(|e| {
            // The FUSE session may end with an error of its own once the
            // kernel let go; only a mount that is still there is a failure.
            if is_mounted(dir) {
                return Err(format!("cannot unmount {}: {e}", dir.display()));
            }
            tracing::warn!(error = %e, "the FUSE session ended with an error");
            Ok(())
        }),
    }
}

/// Whether something is mounted at `dir` (as /proc/self/mounts says).
fn is_mounted(dir: &Path) -> bool {
    // Not canonicalize: a mount whose FUSE session is gone fails stat.
    let Ok(dir) = std::path::absolute(dir) else {
        return false;
    };
    // Mount points are listed with blanks and backslashes escaped.
    let listed = dir
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split(' ').nth(1) == Some(listed.as_str()))
    })
}

/// The exit status after a termination signal: 128 + its number, as a
/// shell reports a process the signal killed (130 for Ctrl-C, 143 for
/// SIGTERM); 0 without one.
pub(super) fn signal_exit(signal: Option<i32>) -> ExitCode {
    match signal {
        Some(sig) => ExitCode::from(128u8.saturating_add(sig as u8)),
        None => ExitCode::SUCCESS,
    }
}
