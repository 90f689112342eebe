//! One request to a VMM's control socket and its response.

use super::ControlError;
use super::protocol::{MAX_LINE, Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a request may take: a pause waits for every vCPU (5 s each at
/// most), so this is well above that. A snapshot writes all of guest
/// memory, which takes as long as the disk needs: it has no limit.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `request` to the VMM at `path` and returns its result.
pub fn call(path: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    call_with_progress(path, request, &mut |_| {})
}

/// [`call`], handing each progress report the VMM sends before its
/// response (`{"progress":REPORT}` lines) to `progress`.
pub fn call_with_progress(
    path: &Path,
    request: &Request,
    progress: &mut dyn FnMut(&serde_json::Value),
) -> Result<serde_json::Value, ControlError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    // Saving or moving a VM takes as long as its memory does.
    let read_timeout = match request {
        Request::Snapshot { .. } | Request::Migrate { .. } => None,
        _ => Some(TIMEOUT),
    };
    stream
        .set_read_timeout(read_timeout)
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(ControlError::Io)?;
    stream
        .write_all(request.to_line().as_bytes())
        .map_err(ControlError::Io)?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        (&mut reader)
            .take(MAX_LINE as u64 * 16)
            .read_until(b'\n', &mut line)
            .map_err(ControlError::Io)?;
        match serde_json::from_slice::<serde_json::Value>(&line) {
            Ok(v) if v.get("progress").is_some() => progress(&v["progress"]),
            _ => break,
        }
    }
    let response: Response = serde_json::from_slice(&line).map_err(|e| {
        ControlError::BadResponse(format!("{e}: {}", String::from_utf8_lossy(&line)))
    })?;
    match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (false, _, Some(e)) => Err(ControlError::Remote {
            code: e.code,
            message: e.message,
        }),
        _ => Err(ControlError::BadResponse(
            String::from_utf8_lossy(&line).into_owned(),
        )),
    }
}
