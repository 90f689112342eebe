//! HTTP/1.1 over a unix socket, one request at a time (Firecracker's API).
//! Each request goes on a connection of its own and exactly one response
//! is read (status line, headers, a `Content-Length` body).

use super::procs::interrupted;
use crate::cli::bench::measure::find;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest one HTTP request to Firecracker may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// Firecracker's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpResponse {
    status: u16,
    body: String,
}

/// The longest response head read.
const MAX_HEAD: usize = 16 * 1024;

/// Parses the HTTP/1.x response at the start of `buf`: `Ok(None)` while
/// its head or body is not all there. A body is what `Content-Length`
/// says (none without it: Firecracker sends it with every body); chunked
/// bodies are refused.
fn parse_response(buf: &[u8]) -> Result<Option<HttpResponse>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(format!("a response head longer than {MAX_HEAD} bytes"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "a response head not in UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => {
            code.parse::<u16>().ok().filter(|c| (100..1000).contains(c))
        }
        _ => None,
    }
    .ok_or_else(|| format!("a bad status line {status_line:?}"))?;
    let mut length = 0usize;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("a bad header line {line:?}"))?;
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .trim()
                .parse()
                .map_err(|_| format!("a bad Content-Length {:?}", value.trim()))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("a body in transfer encoding {:?}", value.trim()));
        }
    }
    let start = end + 4;
    let Some(body) = buf.get(start..start.saturating_add(length)) else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    }))
}

/// Connects to the API socket at `path`, again and again (every 100 µs)
/// until it takes the connection or `deadline`; `gone` says whether the
/// process that should serve it has ended, and why.
pub(super) fn connect_api(
    path: &Path,
    deadline: Instant,
    gone: &mut dyn FnMut() -> Option<String>,
) -> Result<UnixStream, String> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Some(why) = gone() {
                    return Err(format!(
                        "it ended ({why}) before serving {}",
                        path.display()
                    ));
                }
                if Instant::now() >= deadline || interrupted() {
                    return Err(format!("no connection to {}: {e}", path.display()));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

/// Sends one request on `stream` and reads its response.
fn http(
    stream: &mut UnixStream,
    method: &str,
    uri: &str,
    body: &Value,
) -> Result<HttpResponse, String> {
    let body = body.to_string();
    let request = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let what = |e: std::io::Error| format!("{method} {uri}: {e}");
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).map_err(what)?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).map_err(what)?;
    stream.write_all(request.as_bytes()).map_err(what)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).map_err(what)?;
        if n == 0 {
            return Err(format!(
                "{method} {uri}: the connection closed before a whole response"
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(r) = parse_response(&buf).map_err(|e| format!("{method} {uri}: {e}"))? {
            return Ok(r);
        }
    }
}

/// One request that must succeed (2xx), timed.
pub(super) fn fc_call(
    stream: &mut UnixStream,
    method: &str,
    uri: &str,
    body: &Value,
) -> Result<Duration, String> {
    let t = Instant::now();
    let r = http(stream, method, uri, body)?;
    let took = t.elapsed();
    if !(200..300).contains(&r.status) {
        return Err(format!(
            "{method} {uri}: HTTP {}: {}",
            r.status,
            r.body.trim()
        ));
    }
    Ok(took)
}

/// One request on a connection of its own, timed.
pub(super) fn fc_request(
    sock: &Path,
    method: &str,
    uri: &str,
    body: &Value,
) -> Result<Duration, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    fc_call(&mut s, method, uri, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::measure::ScratchDir;
    use serde_json::json;

    #[test]
    fn parses_firecracker_responses() {
        let ok = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(
            parse_response(ok),
            Ok(Some(HttpResponse {
                status: 204,
                body: String::new()
            }))
        );
        let body = r#"{"fault_message":"Load snapshot error: Cannot open the memory file"}"#;
        let bad = format!(
            "HTTP/1.1 400 \r\nServer: Firecracker API\r\nContent-Type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            parse_response(bad.as_bytes()),
            Ok(Some(HttpResponse {
                status: 400,
                body: body.into()
            }))
        );
        // Not all there yet: the head, then the body.
        assert_eq!(parse_response(&ok[..ok.len() - 2]), Ok(None));
        assert_eq!(parse_response(&bad.as_bytes()[..bad.len() - 1]), Ok(None));
        assert_eq!(parse_response(b""), Ok(None));
        // A reason phrase, and a body followed by more bytes.
        let r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}extra")
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
    }

    #[test]
    fn refuses_broken_responses() {
        for bad in [
            &b"HTTP/2 200\r\n\r\n"[..],
            b"HTTP/1.1 abc \r\n\r\n",
            b"HTTP/1.1 99 \r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 \r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 \r\nContent-Length: many\r\n\r\n",
            b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = vec![b'x'; MAX_HEAD + 1];
        assert!(parse_response(&endless).is_err());
    }

    #[test]
    fn talks_http_over_a_unix_socket() {
        let dir = ScratchDir::new("vmplant-bench-snapshot-test").unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.ends_with(b"}") {
                let n = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 400 \r\nContent-Length: 5\r\n\r\nno!!!")
                .unwrap();
            String::from_utf8(buf).unwrap()
        });
        let mut gone = || None;
        let mut s = connect_api(&path, Instant::now() + Duration::from_secs(5), &mut gone).unwrap();
        let e = fc_call(&mut s, "PUT", "/snapshot/load", &json!({"a": 1})).unwrap_err();
        assert_eq!(e, "PUT /snapshot/load: HTTP 400: no!!!");
        let request = server.join().unwrap();
        assert!(
            request.starts_with("PUT /snapshot/load HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 7\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n{\"a\":1}"), "{request}");
        let e = connect_api(
            &dir.path().join("none.sock"),
            Instant::now() + Duration::from_millis(5),
            &mut gone,
        )
        .unwrap_err();
        assert!(e.contains("no connection"), "{e}");
    }
}
