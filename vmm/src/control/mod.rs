//! The control API of a VMM process: what a client (the `vmplant vm`
//! command, the agent daemon, tests) asks a running VM to do, over a unix
//! socket (`vmplant run --control PATH`).
//!
//! - `protocol.rs`: the typed, versioned requests and responses and their
//!   JSON-lines wire form;
//! - `server.rs`: the socket, its connections and their bounds;
//! - `client.rs`: one request and its response, for the CLI;
//! - [`VmControl`]: the requests carried out on a [`RunningVm`].
//!
//! The wire form is one JSON object per line each way, so that a shell
//! user can speak it with `socat` and a client in any language needs only
//! a JSON parser: `{"v":1,"op":"info"}` gets `{"ok":true,"result":{...}}`
//! or `{"ok":false,"error":{"code":"...","message":"..."}}`.

mod client;
pub mod protocol;
mod server;

pub use client::{call, call_with_progress};
pub use protocol::{DeviceInfo, ErrorCode, Info, Request, RunState, VERSION};
pub use server::{ControlServer, Handler, Reply, clear_stale};

use crate::vm::RunningVm;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control socket {path:?} is in use by a running VMM")]
    InUse { path: std::path::PathBuf },
    #[error("{path:?} exists and is not a socket")]
    NotASocket { path: std::path::PathBuf },
    #[error("cannot serve the control socket {path:?}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the VMM at {path:?}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control connection failed")]
    Io(#[source] std::io::Error),
    #[error("the VMM's answer is not a control response: {0}")]
    BadResponse(String),
    #[error("{message} ({code})")]
    Remote { code: ErrorCode, message: String },
}

/// Carries out control requests on one running VM.
pub struct VmControl {
    vm: Arc<RunningVm>,
    vcpus: u8,
    mem_mib: u64,
    devices: Vec<DeviceInfo>,
    /// Brings the devices' figures up to date for an info request.
    refresh: Option<DeviceRefresh>,
    /// What a snapshot keeps for the owner to build the devices again.
    owner: String,
}

/// Fills in what changes as the VM runs (a remote disk's bytes fetched)
/// in the devices an info request reports.
pub type DeviceRefresh = Box<dyn Fn(&mut [DeviceInfo]) + Send + Sync>;

impl VmControl {
    pub fn new(
        vm: Arc<RunningVm>,
        vcpus: u8,
        mem_mib: u64,
        devices: Vec<DeviceInfo>,
        owner: String,
    ) -> Self {
        VmControl {
            vm,
            vcpus,
            mem_mib,
            devices,
            refresh: None,
            owner,
        }
    }

    /// The same, the devices' figures brought up to date by `refresh`
    /// for each info request.
    pub fn with_refresh(mut self, refresh: DeviceRefresh) -> Self {
        self.refresh = Some(refresh);
        self
    }
}

impl Handler for VmControl {
    fn handle(
        &self,
        request: Request,
        report: &mut dyn FnMut(serde_json::Value),
    ) -> Result<Reply, (ErrorCode, String)> {
        let failed = |e: crate::VmError| (ErrorCode::Failed, chain(&e));
        let json = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| (ErrorCode::Failed, e.to_string()))
        };
        // Ending the VM ends the process: only once the client has its
        // answer.
        let then_stop = |result: serde_json::Value| {
            let vm = self.vm.clone();
            Reply {
                result,
                then: Some(Box::new(move || {
                    if let Err(e) = vm.stop() {
                        tracing::error!("cannot stop the VM: {e}");
                    }
                })),
            }
        };
        match request {
            Request::Info => {
                let mut devices = self.devices.clone();
                if let Some(refresh) = &self.refresh {
                    refresh(&mut devices);
                }
                let info = Info {
                    state: self.vm.state(),
                    vcpus: self.vcpus,
                    mem_mib: self.mem_mib,
                    devices,
                    protocol: VERSION,
                };
                json(serde_json::to_value(info)).map(Reply::from)
            }
            Request::Pause => self
                .vm
                .pause()
                .map_err(failed)
                .map(|()| serde_json::json!({}).into()),
            Request::Resume => self
                .vm
                .resume()
                .map_err(failed)
                .map(|()| serde_json::json!({}).into()),
            Request::Stop => Ok(then_stop(serde_json::json!({}))),
            Request::Snapshot { dir, stop } => {
                let saved = self.vm.snapshot(&dir, &self.owner, stop).map_err(failed)?;
                let result = json(serde_json::to_value(protocol::Saved {
                    state_bytes: saved.state_bytes,
                    memory_bytes: saved.memory.size,
                    memory_data_bytes: saved.memory.data,
                    ms: saved.took.as_secs_f64() * 1e3,
                }))?;
                Ok(if stop {
                    then_stop(result)
                } else {
                    result.into()
                })
            }
            Request::Migrate {
                to,
                downtime_ms,
                tls,
            } => {
                let mut opts = crate::migration::MigrateOptions::default();
                if let Some(ms) = downtime_ms {
                    opts.downtime = std::time::Duration::from_millis(ms);
                }
                let mut stream = connect_migration(&to, tls.as_ref()).map_err(|e| {
                    (
                        ErrorCode::Failed,
                        format!("{}; the VM runs on here", chain(&e)),
                    )
                })?;
                let done = self
                    .vm
                    .migrate(&mut stream, &to, &self.owner, opts, &mut |p| {
                        let mib_s = p.bytes_per_s / f64::from(1 << 20);
                        tracing::info!(
                            round = p.round,
                            sent_mib = p.sent >> 20,
                            left_kib = p.left >> 10,
                            mib_s = mib_s as u64,
                            "migrating to {to}"
                        );
                        report(serde_json::json!({
                            "round": p.round,
                            "sent_bytes": p.sent,
                            "dirty_bytes": p.left,
                            "mib_s": (mib_s * 10.0).round() / 10.0,
                        }));
                    })
                    .map_err(failed)?;
                let result = json(serde_json::to_value(protocol::Migrated {
                    migration: "completed".into(),
                    total_ms: done.total.as_secs_f64() * 1e3,
                    downtime_ms: done.downtime.as_secs_f64() * 1e3,
                    rounds: done.rounds,
                    bytes: done.bytes,
                }))?;
                Ok(then_stop(result))
            }
        }
    }
}

/// Connects to a migration destination, with the TLS identity in
/// `tls` for a `tls:` one.
fn connect_migration(
    to: &str,
    tls: Option<&protocol::TlsFiles>,
) -> Result<crate::migration::link::Conn, crate::migration::link::LinkError> {
    use crate::migration::link;
    let to: link::Address = to.parse()?;
    let tls = tls
        .map(|t| vnet::tunnel::TlsConfig::from_pem_files(&t.cert, &t.key, &t.ca))
        .transpose()?;
    link::connect(&to, tls.as_ref())
}

/// `e` and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    msg
}
