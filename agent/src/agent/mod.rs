//! The agent daemon (`vmplant agent`): a REST API on a unix socket (and
//! TLS on TCP),
//! records in the state dir, and one VMM process per VM.
//!
//! - `api.rs`: routes, handlers, authentication, the OpenAPI document;
//! - `vms/`: the VMs' lifecycle (`mod.rs`: create, clone, pause, stop,
//!   snapshot, destroy, quotas), their VMM processes' starts, ends and
//!   restart policies (`run.rs`), reconciliation at start (`adopt.rs`);
//! - `process.rs`: VMM processes (detached start, liveness, console logs);
//! - `store.rs`: the records (redb);
//! - `tokens.rs`: tenants, roles and quotas; `tls.rs`: the API over TLS;
//! - `model.rs`: the API's bodies and the records; `error.rs`: API errors.
//!
//! State dir layout: `agent.redb` (the records), `vms/ID/` (each VM's
//! `control.sock`, `console.log` and `vmm.log`), `snapshots/` (snapshots
//! taken without a directory of their own).

pub mod api;
mod error;
pub mod model;
mod process;
mod store;
mod tls;
pub mod tokens;
mod vms;

use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create the state dir {path:?}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the records in {path:?} (is another agent using this state dir?)")]
    Store {
        path: PathBuf,
        #[source]
        source: store::StoreError,
    },
    #[error(transparent)]
    Tokens(#[from] tokens::TokensError),
    #[error("{0:?} is not a listen address: use unix:PATH or tcp:ADDR:PORT")]
    Listen(String),
    #[error(
        "a tcp: listener needs --tls-cert and --tls-key (the API is not served in plaintext over TCP)"
    )]
    NoTls,
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("another agent serves {0:?}")]
    InUse(PathBuf),
    #[error("cannot serve {path:?}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state dir {0:?} is too long for the VMs' control socket paths (at most 60 bytes)")]
    PathTooLong(PathBuf),
    #[error("the kernel directory {path:?} is not there")]
    KernelDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this program to start VMMs with")]
    Exe(#[source] std::io::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("re-adopting the recorded VMs failed: {0}")]
    Adopt(String),
    #[error("the API server failed")]
    Serve(#[source] std::io::Error),
}

/// What `vmplant agent` was given.
pub struct Options {
    pub state_dir: PathBuf,
    pub listen: Vec<String>,
    pub tokens: PathBuf,
    /// The certificate chain and key for `tcp:` listeners (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where tenants' kernels and initrds may be.
    pub kernel_dirs: Vec<PathBuf>,
}

/// Where the API is served.
enum Listen {
    Unix(PathBuf),
    /// TLS on TCP.
    Tcp(String),
}

/// Runs the agent until SIGTERM or SIGINT. VMs keep running after it.
pub fn run(opts: Options) -> Result<(), AgentError> {
    let state_dir =
        std::path::absolute(&opts.state_dir).map_err(|source| AgentError::StateDir {
            path: opts.state_dir.clone(),
            source,
        })?;
    // vms/vm-XXXXXXXXXXXX/control.sock must fit sun_path (108 bytes).
    if state_dir.as_os_str().len() > 60 {
        return Err(AgentError::PathTooLong(state_dir));
    }
    for dir in [state_dir.clone(), state_dir.join("vms")] {
        vms::create_private_dir(&dir).map_err(|e| AgentError::StateDir {
            path: dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    let tokens = tokens::Tokens::load(&opts.tokens)?;
    let db = state_dir.join("agent.redb");
    let store = store::Store::open(&db).map_err(|source| AgentError::Store { path: db, source })?;
    let exe = std::env::current_exe().map_err(AgentError::Exe)?;
    let kernel_dirs = opts
        .kernel_dirs
        .iter()
        .map(|d| {
            std::fs::canonicalize(d).map_err(|source| AgentError::KernelDir {
                path: d.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let listens = opts
        .listen
        .iter()
        .map(|l| match l.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Listen::Unix(PathBuf::from(p))),
            Some(("tcp", a)) if !a.is_empty() => Ok(Listen::Tcp(a.to_owned())),
            _ => Err(AgentError::Listen(l.clone())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let acceptor = match &opts.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None if listens.iter().any(|l| matches!(l, Listen::Tcp(_))) => {
            return Err(AgentError::NoTls);
        }
        None => None,
    };
    let sockets: Vec<PathBuf> = listens
        .iter()
        .filter_map(|l| match l {
            Listen::Unix(p) => Some(p.clone()),
            Listen::Tcp(_) => None,
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async move {
        let vms = vms::Vms::new(store, state_dir.clone(), exe, kernel_dirs);
        vms.adopt()
            .await
            .map_err(|e| AgentError::Adopt(crate::cli::chain(&e)))?;
        vms.trim_consoles();
        let app = Arc::new(api::App { vms, tokens });
        let mut servers = tokio::task::JoinSet::new();
        tracing::info!("agent: state dir {}", state_dir.display());
        // Bind them all before serving any, so that a client that finds
        // one finds them all.
        let router = api::router(app);
        for listen in &listens {
            let router = router.clone();
            match (listen, &acceptor) {
                (Listen::Unix(path), _) => {
                    let listener = bind_unix(path)?;
                    eprintln!("agent: serving on unix:{}", path.display());
                    servers.spawn(async move { axum::serve(listener, router).await });
                }
                (Listen::Tcp(addr), Some(acceptor)) => {
                    let listener = tls::TlsListener::bind(addr, acceptor.clone()).await?;
                    use axum::serve::Listener;
                    let local = listener.local_addr().map_err(AgentError::Serve)?;
                    eprintln!("agent: serving on tcp:{local} (TLS)");
                    servers.spawn(async move { axum::serve(listener, router).await });
                }
                (Listen::Tcp(_), None) => return Err(AgentError::NoTls),
            }
        }
        let signal = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        let result = tokio::select! {
            () = signal => {
                tracing::info!("agent: stopping; the VMs run on");
                Ok(())
            }
            Some(done) = servers.join_next() => match done {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(AgentError::Serve(e)),
                Err(e) => Err(AgentError::Serve(std::io::Error::other(e))),
            },
        };
        for path in &sockets {
            let _ = std::fs::remove_file(path);
        }
        result
    })?;
    // Do not wait for streams still open (event watchers).
    runtime.shutdown_background();
    Ok(())
}

/// Binds the API socket, replacing a stale one (nobody answers on it),
/// refusing one another agent serves; readable and writable by its
/// owner and group.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, AgentError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AgentError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let bind = |source| AgentError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = tokio::net::UnixListener::bind(path).map_err(bind)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind)?;
    Ok(listener)
}
