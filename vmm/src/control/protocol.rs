//! Requests and responses of the control API, version [`VERSION`].
//!
//! A request is a JSON object with the protocol version `v` and the
//! operation `op` (`{"v":1,"op":"pause"}`); operations with arguments
//! carry them as further fields. A response is
//! `{"ok":true,"result":RESULT}` or
//! `{"ok":false,"error":{"code":CODE,"message":TEXT}}`. A long operation
//! (`migrate`) may send `{"progress":REPORT}` lines before its response. A later version
//! adds operations and fields; a VMM answers a request of another version
//! with the `unsupported-version` error, so that a client knows at once.

use serde::{Deserialize, Serialize};

/// The protocol version this VMM speaks.
pub const VERSION: u32 = 1;
/// The longest request line the VMM reads (requests are small).
pub const MAX_LINE: usize = 64 * 1024;

/// What a client asks of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The VM's state, vCPUs, memory and devices ([`Info`]).
    Info,
    /// Stops the vCPUs at their next exit; the devices go on.
    Pause,
    /// Lets the vCPUs run again.
    Resume,
    /// Ends the VM (the VMM process then exits with status 0).
    Stop,
    /// Pauses the VM, saves it into `dir` ([`Saved`]), and resumes it,
    /// or ends it with `stop`. A paused VM stays paused.
    Snapshot {
        dir: std::path::PathBuf,
        #[serde(default)]
        stop: bool,
    },
    /// Moves the VM to the VMM waiting at `to` (`tcp:HOST:PORT`,
    /// `tls:HOST:PORT` or `unix:PATH`: a `vmplant run --incoming`); the
    /// copy aims to leave no more than `downtime_ms` of memory for the
    /// pause, which also holds the state's transfer and the destination's
    /// start. Answers [`Migrated`] once that VMM runs it, and the VM ends
    /// here. On failure the VM runs on here, except once the destination
    /// took it without saying it runs it: then it stays paused.
    Migrate {
        to: String,
        #[serde(default)]
        downtime_ms: Option<u64>,
        /// For `tls:` destinations: this VMM's certificate chain, its
        /// key and the CA that signs the destination's (PEM files).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<TlsFiles>,
    },
}

/// The PEM files of a TLS identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

/// The answer to [`Request::Migrate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migrated {
    /// Always "completed" (a failed migration is an error response).
    pub migration: String,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub rounds: u32,
    /// Guest memory sent (pages with data).
    pub bytes: u64,
}

/// The answer to [`Request::Snapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The state file's size.
    pub state_bytes: u64,
    /// The memory file's size (all of guest RAM) and the bytes of it that
    /// hold data (the rest are holes).
    pub memory_bytes: u64,
    pub memory_data_bytes: u64,
    /// From the pause to the files being on disk.
    pub ms: f64,
}

impl Request {
    /// The request as one line of the wire form, newline included.
    pub fn to_line(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("v".into(), VERSION.into());
        }
        let mut line = v.to_string();
        line.push('\n');
        line
    }

    /// Reads a request line, checking its version first.
    pub fn from_line(line: &[u8]) -> Result<Request, (ErrorCode, String)> {
        let bad = |e: serde_json::Error| (ErrorCode::BadRequest, e.to_string());
        let value: serde_json::Value = serde_json::from_slice(line).map_err(bad)?;
        let Some(obj) = value.as_object() else {
            return Err((ErrorCode::BadRequest, "a request is a JSON object".into()));
        };
        match obj.get("v").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => {
                return Err((
                    ErrorCode::UnsupportedVersion,
                    format!("this VMM speaks control protocol version {VERSION}, not {v}"),
                ));
            }
            None => {
                return Err((
                    ErrorCode::BadRequest,
                    format!(
                        "the request has no protocol version \"v\" (this VMM speaks {VERSION})"
                    ),
                ));
            }
        }
        serde_json::from_value(value).map_err(bad)
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not a request: bad JSON, an unknown operation, a missing field.
    BadRequest,
    /// A request of another protocol version.
    UnsupportedVersion,
    /// The VMM is busy (too many control connections).
    Busy,
    /// The request was understood but could not be carried out.
    Failed,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).unwrap_or_default();
        f.write_str(s.as_str().unwrap_or("error"))
    }
}

/// A response on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl Response {
    pub fn from_result(r: Result<serde_json::Value, (ErrorCode, String)>) -> Response {
        match r {
            Ok(result) => Response {
                ok: true,
                result: Some(result),
                error: None,
            },
            Err((code, message)) => Response {
                ok: false,
                result: None,
                error: Some(ErrorBody { code, message }),
            },
        }
    }

    /// The response as one line of the wire form, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"ok":false,"error":{"code":"failed","message":"unprintable"}}"#.into()
        });
        line.push('\n');
        line
    }
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    Paused,
    /// Asked to stop, or the guest shut down: the VM is ending.
    Stopping,
}

/// The answer to [`Request::Info`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub state: RunState,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub devices: Vec<DeviceInfo>,
    /// The control protocol version the VMM speaks.
    pub protocol: u32,
}

/// One virtio device of the VM, in the order the guest sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum DeviceInfo {
    /// A NIC: its MAC and its port on the VNET switch.
    Net { mac: String, port: String },
    /// A file share served in-process by GVFS.
    Fs { tag: String, server: String },
    /// A file share served by an external vhost-user backend.
    VhostUserFs { tag: String, socket: String },
    /// A disk: its file (or `image=NAME`), its size in 512-byte
    /// sectors, and, on an image or a base under an overlay, the overlay
    /// and the image's store; on a remote store, what it fetched.
    Blk {
        path: String,
        read_only: bool,
        sectors: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        overlay: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        store: Option<String>,
        /// An image on a GVFS server: the bytes and chunks fetched so far.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fetched_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fetched_chunks: Option<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_their_version() {
        for r in [
            Request::Info,
            Request::Pause,
            Request::Resume,
            Request::Stop,
        ] {
            let line = r.to_line();
            assert!(line.ends_with('\n') && line.contains("\"v\":1"), "{line}");
            assert_eq!(Request::from_line(line.trim_end().as_bytes()).unwrap(), r);
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let code = |l: &str| Request::from_line(l.as_bytes()).unwrap_err();
        assert_eq!(code("not json").0, ErrorCode::BadRequest);
        assert_eq!(code("[1]").0, ErrorCode::BadRequest);
        let (c, m) = code(r#"{"op":"info"}"#);
        assert_eq!(c, ErrorCode::BadRequest);
        assert!(m.contains("no protocol version"), "{m}");
        let (c, m) = code(r#"{"v":2,"op":"info"}"#);
        assert_eq!(c, ErrorCode::UnsupportedVersion);
        assert!(m.contains("version 1, not 2"), "{m}");
        let (c, m) = code(r#"{"v":1,"op":"fly"}"#);
        assert_eq!(c, ErrorCode::BadRequest);
        assert!(m.contains("fly"), "{m}");
    }

    #[test]
    fn responses_carry_a_result_or_a_coded_error() {
        let ok = Response::from_result(Ok(serde_json::json!({"a": 1})));
        assert_eq!(ok.to_line(), "{\"ok\":true,\"result\":{\"a\":1}}\n");
        let err = Response::from_result(Err((ErrorCode::Busy, "later".into())));
        assert_eq!(
            err.to_line(),
            "{\"ok\":false,\"error\":{\"code\":\"busy\",\"message\":\"later\"}}\n"
        );
    }
}
