//! `vmplant ctl`: a client of the agent's API, one subcommand per call;
//! a table (or plain text) by default, the API's JSON with `--json`.
//!
//! It speaks HTTP/1.1 itself (one request per connection), over the
//! agent's unix socket or TLS on TCP (`https://HOST:PORT`, the agent's
//! certificate checked against `--ca`), so the command line needs no
//! async runtime.

use super::CliResult;
use clap::{Args, Subcommand};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio_rustls::rustls;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0:?} is not an agent address: use unix:PATH or https://HOST:PORT")]
    Address(String),
    #[error("https:// needs --ca FILE (the CA certificate that signs the agent's)")]
    NoCa,
    #[error("cannot read the CA certificate {path:?}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} holds no usable PEM certificate")]
    BadCa(PathBuf),
    #[error("TLS to the agent")]
    Tls(#[from] rustls::Error),
    #[error("{0:?} is not a host name for TLS")]
    ServerName(String),
    #[error("cannot read the token file {path:?}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the agent at {at}")]
    Connect {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection to the agent failed")]
    Io(#[from] std::io::Error),
    #[error("the agent's answer is not HTTP: {0}")]
    BadResponse(String),
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The agent: unix:PATH, or https://HOST:PORT (with --ca).
    #[arg(long, value_name = "unix:PATH|https://HOST:PORT")]
    agent: String,
    /// For https://: the CA certificate(s) that sign the agent's (PEM).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A file holding the bearer token.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    op: Op,
}

#[derive(Debug, Subcommand)]
enum Op {
    /// List the VMs.
    Ls,
    /// Show one VM.
    Show {
        id: String,
    },
    /// Create a VM (and start it unless --no-start).
    Create {
        #[arg(long, required_unless_present = "snapshot")]
        kernel: Option<PathBuf>,
        #[arg(long)]
        cmdline: Option<String>,
        #[arg(long)]
        vcpus: Option<u8>,
        #[arg(long, value_name = "MiB")]
        mem: Option<u64>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long = "net", value_name = "MAC")]
        nets: Vec<String>,
        /// never, on-failure or always.
        #[arg(long)]
        restart: Option<String>,
        /// Restore it from a snapshot taken by this agent.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "cmdline", "initrd", "vcpus", "mem"])]
        snapshot: Option<PathBuf>,
        #[arg(long)]
        no_start: bool,
    },
    /// Stop the VM's process (if any) and delete the VM.
    Rm {
        id: String,
    },
    Start {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Stop {
        id: String,
    },
    /// Snapshot the VM (into DIR: admins only; else under the state dir).
    Snapshot {
        id: String,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// A new VM restored from one of this VM's snapshots (its latest by
    /// default).
    Clone {
        id: String,
        #[arg(long, value_name = "DIR")]
        snapshot: Option<PathBuf>,
        #[arg(long)]
        restart: Option<String>,
        #[arg(long)]
        no_start: bool,
    },
    /// Print the VM's console log (its last MiB).
    Console {
        id: String,
    },
    /// Print lifecycle events as they happen (one JSON line each).
    Events,
    /// Show the host's capacity.
    Host,
}

/// A response: status and body.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

/// Where the agent is.
enum Target {
    Unix(PathBuf),
    Https {
        host: String,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    },
}

/// A connection to the agent.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

type Reader = BufReader<Box<dyn Conn>>;

pub(crate) struct Client {
    target: Target,
    token: String,
}

impl Client {
    /// A client of the agent at the unix socket `path`.
    pub(crate) fn unix(path: &Path, token: &str) -> Client {
        Client {
            target: Target::Unix(path.to_owned()),
            token: token.to_owned(),
        }
    }

    fn connect(&self) -> Result<Box<dyn Conn>, CtlError> {
        match &self.target {
            Target::Unix(path) => UnixStream::connect(path)
                .map(|s| Box::new(s) as Box<dyn Conn>)
                .map_err(|source| CtlError::Connect {
                    at: format!("unix:{}", path.display()),
                    source,
                }),
            Target::Https { host, port, tls } => {
                let tcp =
                    std::net::TcpStream::connect((host.as_str(), *port)).map_err(|source| {
                        CtlError::Connect {
                            at: format!("https://{host}:{port}"),
                            source,
                        }
                    })?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| CtlError::ServerName(host.clone()))?;
                let conn = rustls::ClientConnection::new(tls.clone(), name)?;
                Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reader, CtlError> {
        let mut stream = self.connect()?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.token,
            body.len()
        );
        // One write: an agent that refuses the request on its head (a
        // reader's, say) answers and closes without reading the body, and
        // its answer is still to be read after a broken pipe.
        let request = head + &body;
        match stream.write_all(request.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r?,
        }
        stream.flush()?;
        Ok(BufReader::new(stream))
    }

    /// Reads the status line and headers; returns the status and whether
    /// the body is chunked.
    fn head(reader: &mut Reader) -> Result<(u16, bool, Option<usize>), CtlError> {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| CtlError::BadResponse(line.trim().to_owned()))?;
        let (mut chunked, mut length) = (false, None);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("transfer-encoding:") {
                chunked = v.contains("chunked");
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().ok();
            }
        }
        Ok((status, chunked, length))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, CtlError> {
        let mut reader = self.send(method, path, body)?;
        let (status, chunked, length) = Self::head(&mut reader)?;
        let mut body = Vec::new();
        if chunked {
            while let Some(chunk) = read_chunk(&mut reader)? {
                body.extend_from_slice(&chunk);
            }
        } else if let Some(n) = length {
            reader.take(n as u64).read_to_end(&mut body)?;
        } else {
            match reader.read_to_end(&mut body) {
                // A TLS peer that closes without close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                r => {
                    r?;
                }
            }
        }
        if status >= 400 {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            return Err(CtlError::Api {
                status,
                code: v["code"].as_str().unwrap_or("?").to_owned(),
                message: v["message"]
                    .as_str()
                    .map_or_else(|| String::from_utf8_lossy(&body).into_owned(), String::from),
            });
        }
        Ok(Reply { status, body })
    }

    pub(crate) fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CtlError> {
        let reply = self.call(method, path, body)?;
        if reply.body.is_empty() || reply.status == 204 {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&reply.body).map_err(|e| {
            CtlError::BadResponse(format!("{e}: {}", String::from_utf8_lossy(&reply.body)))
        })
    }
}

/// One chunk of a chunked body (None at the end).
fn read_chunk(reader: &mut Reader) -> Result<Option<Vec<u8>>, CtlError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| CtlError::BadResponse(format!("bad chunk size {line:?}")))?;
    if size == 0 {
        return Ok(None);
    }
    let mut chunk = vec![0; size];
    reader.read_exact(&mut chunk)?;
    let mut crlf = [0; 2];
    reader.read_exact(&mut crlf)?;
    Ok(Some(chunk))
}

fn path_arg(p: &std::path::Path) -> Result<String, std::io::Error> {
    Ok(std::path::absolute(p)?.display().to_string())
}

pub fn run(args: CtlArgs) -> CliResult {
    let target = target(&args.agent, args.ca.as_deref())?;
    let token = std::fs::read_to_string(&args.token_file).map_err(|source| CtlError::Token {
        path: args.token_file.clone(),
        source,
    })?;
    let client = Client {
        target,
        token: token.trim().to_owned(),
    };
    let json = args.json;
    let show = |v: &serde_json::Value, table: &dyn Fn(&serde_json::Value)| {
        if json {
            println!("{v}");
        } else {
            table(v);
        }
    };
    match args.op {
        Op::Ls => {
            let v = client.json("GET", "/vms", None)?;
            show(&v, &|v| {
                vm_table(v["vms"].as_array().map_or(&[][..], |a| a))
            });
        }
        Op::Show { id } => {
            let v = client.json("GET", &format!("/vms/{id}"), None)?;
            show(&v, &|v| vm_details(v));
        }
        Op::Create {
            kernel,
            cmdline,
            vcpus,
            mem,
            initrd,
            nets,
            restart,
            snapshot,
            no_start,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(k) = kernel {
                body.insert("kernel".into(), path_arg(&k)?.into());
            }
            if let Some(c) = cmdline {
                body.insert("cmdline".into(), c.into());
            }
            if let Some(n) = vcpus {
                body.insert("vcpus".into(), n.into());
            }
            if let Some(m) = mem {
                body.insert("mem_mib".into(), m.into());
            }
            if let Some(i) = initrd {
                body.insert("initrd".into(), path_arg(&i)?.into());
            }
            if !nets.is_empty() {
                body.insert("nets".into(), nets.into());
            }
            if let Some(r) = restart {
                body.insert("restart".into(), r.into());
            }
            if let Some(s) = snapshot {
                body.insert("snapshot".into(), path_arg(&s)?.into());
            }
            if no_start {
                body.insert("start".into(), false.into());
            }
            let v = client.json("POST", "/vms", Some(&body.into()))?;
            show(&v, &|v| {
                println!(
                    "{}\t{}",
                    v["id"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?")
                )
            });
        }
        Op::Rm { id } => {
            client.json("DELETE", &format!("/vms/{id}"), None)?;
            show(&serde_json::json!({"deleted": id}), &|_| {});
        }
        Op::Start { id } => lifecycle(&client, &id, "start", json)?,
        Op::Pause { id } => lifecycle(&client, &id, "pause", json)?,
        Op::Resume { id } => lifecycle(&client, &id, "resume", json)?,
        Op::Stop { id } => lifecycle(&client, &id, "stop", json)?,
        Op::Snapshot { id, dir } => {
            let body = match dir {
                Some(d) => serde_json::json!({ "dir": path_arg(&d)? }),
                None => serde_json::json!({}),
            };
            let v = client.json("POST", &format!("/vms/{id}/snapshot"), Some(&body))?;
            show(&v, &|v| println!("{}", v["dir"].as_str().unwrap_or("?")));
        }
        Op::Clone {
            id,
            snapshot,
            restart,
            no_start,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(s) = snapshot {
                body.insert("snapshot".into(), path_arg(&s)?.into());
            }
            if let Some(r) = restart {
                body.insert("restart".into(), r.into());
            }
            if no_start {
                body.insert("start".into(), false.into());
            }
            let v = client.json("POST", &format!("/vms/{id}/clone"), Some(&body.into()))?;
            show(&v, &|v| {
                println!(
                    "{}\t{}",
                    v["id"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?")
                )
            });
        }
        Op::Console { id } => {
            let reply = client.call("GET", &format!("/vms/{id}/console"), None)?;
            std::io::stdout().write_all(&reply.body)?;
        }
        Op::Events => {
            let mut reader = client.send("GET", "/events", None)?;
            let (status, chunked, _) = Client::head(&mut reader)?;
            if status >= 400 {
                return Err(CtlError::Api {
                    status,
                    code: "?".into(),
                    message: "the agent refused the event stream".into(),
                }
                .into());
            }
            let mut out = std::io::stdout();
            if chunked {
                while let Some(chunk) = read_chunk(&mut reader)? {
                    out.write_all(&chunk)?;
                    out.flush()?;
                }
            } else {
                std::io::copy(&mut reader, &mut out)?;
            }
        }
        Op::Host => {
            let v = client.json("GET", "/host", None)?;
            show(&v, &|v| {
                println!("vCPUs\t{}", v["vcpus"]);
                println!(
                    "memory\t{} MiB ({} MiB free)",
                    v["mem_total_mib"], v["mem_free_mib"]
                );
                println!("VMs\t{} ({} with a process)", v["vms"], v["vms_running"]);
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn target(agent: &str, ca: Option<&Path>) -> Result<Target, CtlError> {
    if let Some(path) = agent.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let bad = || CtlError::Address(agent.to_owned());
    let rest = agent.strip_prefix("https://").ok_or_else(bad)?;
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let ca = ca.ok_or(CtlError::NoCa)?;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(ca).map_err(|source| CtlError::Ca {
        path: ca.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|_| CtlError::BadCa(ca.to_owned()))?;
        roots
            .add(cert)
            .map_err(|_| CtlError::BadCa(ca.to_owned()))?;
    }
    if roots.is_empty() {
        return Err(CtlError::BadCa(ca.to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Target::Https {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        tls: Arc::new(tls),
    })
}

fn lifecycle(client: &Client, id: &str, op: &str, json: bool) -> Result<(), CtlError> {
    let v = client.json("POST", &format!("/vms/{id}/{op}"), None)?;
    if json {
        println!("{v}");
    } else {
        println!("{id}\t{}", v["state"].as_str().unwrap_or("?"));
    }
    Ok(())
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn vm_table(vms: &[serde_json::Value]) {
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|v| {
            [
                cell(&v["id"]),
                cell(&v["tenant"]),
                cell(&v["state"]),
                cell(&v["pid"]),
                cell(&v["config"]["vcpus"]),
                cell(&v["config"]["mem_mib"]),
                cell(&v["uptime_s"]),
            ]
        })
        .collect();
    let header = [
        "ID", "TENANT", "STATE", "PID", "VCPUS", "MEM_MIB", "UPTIME_S",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let s: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(&header);
    for r in &rows {
        line(&r.each_ref().map(String::as_str));
    }
}

fn vm_details(v: &serde_json::Value) {
    for key in [
        "id",
        "tenant",
        "state",
        "reason",
        "last_exit",
        "pid",
        "uptime_s",
        "restart",
        "restarts",
    ] {
        println!("{key}\t{}", cell(&v[key]));
    }
    if let Some(config) = v["config"].as_object() {
        for (k, val) in config {
            println!("{k}\t{}", cell(val));
        }
    }
    if let Some(snaps) = v["snapshots"].as_array() {
        for s in snaps {
            println!("snapshot\t{}", cell(s));
        }
    }
}
