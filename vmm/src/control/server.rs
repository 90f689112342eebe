//! The control socket: a listener thread, a thread per connection (at
//! most [`MAX_CONNECTIONS`]), one request line and one response line at a
//! time. Requests are small and rare, so threads are simpler than an
//! event loop here and keep a slow request (a pause waits for every vCPU)
//! from holding up the VM's own event loop.

use super::ControlError;
use super::protocol::{ErrorCode, MAX_LINE, Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Control connections served at once; one more is told `busy`. A VMM
/// has one owner (the agent or a user), so a handful is plenty.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a response may take to write before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may sit without sending a request: idle clients
/// must not hold the connection places for good.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Whoever carries out the requests.
pub trait Handler: Send + Sync + 'static {
    /// Carries out one request: its result, or an error code and message.
    /// A long request may report how it goes through `progress`, each
    /// report a `{"progress":REPORT}` line before the response.
    fn handle(
        &self,
        request: Request,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> Result<Reply, (ErrorCode, String)>;
}

/// A request's result, and what to do once the client has it (ending
/// the VM, whose process then exits, must wait for the answer to go out).
pub struct Reply {
    pub result: serde_json::Value,
    pub then: Option<Box<dyn FnOnce() + Send>>,
}

impl From<serde_json::Value> for Reply {
    fn from(result: serde_json::Value) -> Self {
        Reply { result, then: None }
    }
}

/// A control socket being served; dropping it stops serving and removes
/// the socket file.
pub struct ControlServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    /// The listening socket, to shut down (which ends the accept loop
    /// whatever happened to the socket file).
    listener: UnixListener,
    /// The open connections, to shut down when the VM ends.
    conns: Conns,
    thread: Option<JoinHandle<()>>,
}

/// Open connections by id.
type Conns = Arc<std::sync::Mutex<std::collections::HashMap<u64, UnixStream>>>;

impl ControlServer {
    /// Serves `handler` on a unix socket at `path`, readable and writable
    /// by this user only. A socket file left by a VMM that is gone is
    /// replaced; one a live VMM serves is not.
    pub fn serve(path: &Path, handler: Arc<dyn Handler>) -> Result<ControlServer, ControlError> {
        clear_stale(path)?;
        let bind = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let conns = Conns::default();
        let (stop, accepted, open) = (
            stopping.clone(),
            listener.try_clone().map_err(bind)?,
            conns.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("vm-control".into())
            .spawn(move || accept_loop(accepted, handler, stop, open))
            .map_err(bind)?;
        tracing::debug!(?path, "control socket ready");
        Ok(ControlServer {
            path: path.to_owned(),
            stopping,
            listener,
            conns,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        use std::os::fd::AsFd;
        self.stopping.store(true, Ordering::SeqCst);
        // accept() then fails at once (EINVAL), and the loop sees why.
        let _ = nix::sys::socket::shutdown(
            self.listener.as_fd().as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Connections still open get no more answers from this VM.
        for c in lock(&self.conns).values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Checks that a control socket can be served at `path` (nothing there, or
/// a socket file a VMM that is gone left behind, which is removed), so
/// that a VM is not started only to find its socket taken.
pub fn clear_stale(path: &Path) -> Result<(), ControlError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    stopping: Arc<AtomicBool>,
    conns: Conns,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket: {e}");
                // Out of descriptors, say: give the others time to close.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let busy = Response::from_result(Err((
                ErrorCode::Busy,
                format!("{MAX_CONNECTIONS} control connections are open already"),
            )));
            let _ = stream.write_all(busy.to_line().as_bytes());
            continue;
        }
        let id = next_id;
        next_id += 1;
        if let Ok(c) = stream.try_clone() {
            lock(&conns).insert(id, c);
        }
        let (handler, count, gone) = (handler.clone(), open.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name("vm-control-conn".into())
            .spawn(move || {
                serve_connection(stream, handler.as_ref());
                lock(&gone).remove(&id);
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("control socket: cannot serve a connection: {e}");
            lock(&conns).remove(&id);
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers requests on one connection until the client closes it, sends
/// a line longer than [`MAX_LINE`], or stops reading.
fn serve_connection(stream: UnixStream, handler: &dyn Handler) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = (MAX_LINE + 1) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        let (response, then) = if !complete && line.len() > MAX_LINE {
            let too_long = Err((
                ErrorCode::BadRequest,
                format!("a request line is at most {MAX_LINE} bytes"),
            ));
            (Response::from_result(too_long), None)
        } else {
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let reply = Request::from_line(text).and_then(|r| {
                tracing::debug!(request = ?r, "control request");
                handler.handle(r, &mut |report| {
                    let line = serde_json::json!({ "progress": report });
                    let _ = out.write_all(format!("{line}\n").as_bytes());
                })
            });
            match reply {
                Ok(Reply { result, then }) => (Response::from_result(Ok(result)), then),
                Err(e) => (Response::from_result(Err(e)), None),
            }
        };
        let written = out.write_all(response.to_line().as_bytes());
        if let Some(then) = then {
            then();
        }
        if written.is_err() || !complete {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Answers every request with its own operation name.
    struct Echo;
    impl Handler for Echo {
        fn handle(
            &self,
            request: Request,
            _progress: &mut dyn FnMut(serde_json::Value),
        ) -> Result<Reply, (ErrorCode, String)> {
            match request {
                Request::Stop => Err((ErrorCode::Failed, "no".into())),
                r => Ok(serde_json::json!({ "did": format!("{r:?}") }).into()),
            }
        }
    }

    fn ask(stream: &mut UnixStream, line: &str) -> serde_json::Value {
        // A server that refuses the connection (busy) may close it before
        // the request is sent; its answer is there to read all the same.
        let _ = stream.write_all(line.as_bytes());
        let mut got = Vec::new();
        let mut byte = [0u8];
        while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            got.push(byte[0]);
        }
        serde_json::from_slice(&got).unwrap()
    }

    #[test]
    fn requests_get_answers_in_order_on_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let server = ControlServer::serve(&path, Arc::new(Echo)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut s = UnixStream::connect(&path).unwrap();
        assert_eq!(
            ask(&mut s, "{\"v\":1,\"op\":\"pause\"}\n")["result"]["did"],
            "Pause"
        );
        let e = ask(&mut s, "{\"v\":1,\"op\":\"stop\"}\n");
        assert_eq!(
            (e["ok"].as_bool(), e["error"]["code"].as_str()),
            (Some(false), Some("failed"))
        );
        let e = ask(&mut s, "{\"v\":9,\"op\":\"info\"}\n");
        assert_eq!(e["error"]["code"], "unsupported-version");
        let e = ask(&mut s, "garbage\n");
        assert_eq!(e["error"]["code"], "bad-request");
        // The connection survives bad requests.
        assert_eq!(ask(&mut s, &Request::Info.to_line())["ok"], true);
        drop(server);
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn an_endless_line_is_refused_and_the_connection_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let _server = ControlServer::serve(&path, Arc::new(Echo)).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        let e = ask(&mut s, &"x".repeat(MAX_LINE + 10));
        assert_eq!(e["error"]["code"], "bad-request");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed after the refusal");
    }

    #[test]
    fn connections_past_the_bound_are_told_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let _server = ControlServer::serve(&path, Arc::new(Echo)).unwrap();
        let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        // Each held connection is served: answer one request on each.
        for s in &mut held {
            assert_eq!(ask(s, &Request::Info.to_line())["ok"], true);
        }
        let mut extra = UnixStream::connect(&path).unwrap();
        assert_eq!(
            ask(&mut extra, &Request::Info.to_line())["error"]["code"],
            "busy"
        );
        drop(held.pop());
        // Once one closes, a new one is served (the count drops when its
        // thread ends).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = UnixStream::connect(&path).unwrap();
            if ask(&mut s, &Request::Info.to_line())["ok"] == true {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "still busy");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        // Left by a VMM that is gone: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let server = ControlServer::serve(&path, Arc::new(Echo)).unwrap();
        let again = ControlServer::serve(&path, Arc::new(Echo));
        assert!(matches!(again, Err(ControlError::InUse { .. })));
        drop(server);
        std::fs::write(&path, b"a file").unwrap();
        let file = ControlServer::serve(&path, Arc::new(Echo));
        assert!(matches!(file, Err(ControlError::NotASocket { .. })));
    }

    #[test]
    fn stopping_ends_open_connections_even_without_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let server = ControlServer::serve(&path, Arc::new(Echo)).unwrap();
        let mut held = UnixStream::connect(&path).unwrap();
        assert_eq!(ask(&mut held, &Request::Info.to_line())["ok"], true);
        std::fs::remove_file(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(server);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the server did not stop");
        // The held connection gets no more answers: it is closed.
        let _ = held.write_all(Request::Info.to_line().as_bytes());
        let mut rest = Vec::new();
        let _ = held.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
}
