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

pub use client::call;
pub use protocol::{DeviceInfo, ErrorCode, Info, Request, RunState, VERSION};
pub use server::{ControlServer, Handler, clear_stale};

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
}

impl VmControl {
    pub fn new(vm: Arc<RunningVm>, vcpus: u8, mem_mib: u64, devices: Vec<DeviceInfo>) -> Self {
        VmControl {
            vm,
            vcpus,
            mem_mib,
            devices,
        }
    }
}

impl Handler for VmControl {
    fn handle(&self, request: Request) -> Result<serde_json::Value, (ErrorCode, String)> {
        let failed = |e: crate::VmError| {
            let mut msg = e.to_string();
            let causes = std::iter::successors(std::error::Error::source(&e), |s| s.source());
            for cause in causes {
                msg = format!("{msg}: {cause}");
            }
            (ErrorCode::Failed, msg)
        };
        match request {
            Request::Info => {
                let info = Info {
                    state: self.vm.state(),
                    vcpus: self.vcpus,
                    mem_mib: self.mem_mib,
                    devices: self.devices.clone(),
                    protocol: VERSION,
                };
                serde_json::to_value(info).map_err(|e| (ErrorCode::Failed, e.to_string()))
            }
            Request::Pause => self
                .vm
                .pause()
                .map_err(failed)
                .map(|()| serde_json::json!({})),
            Request::Resume => self
                .vm
                .resume()
                .map_err(failed)
                .map(|()| serde_json::json!({})),
            Request::Stop => self
                .vm
                .stop()
                .map_err(failed)
                .map(|()| serde_json::json!({})),
        }
    }
}
