//! `vmplant vnet`: a switch with no VMs.
//!
//! Runs one VNET switch with TAP ports and tunnels until SIGINT or
//! SIGTERM, then stops the tunnels and deletes the TAPs. Tunnel state
//! changes are logged (`-v` for more).

use super::CliResult;
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;
use vnet::tunnel::{DEFAULT_UDP_MTU, Endpoint, TlsConfig};
use vnet::{SwitchConfig, Vnet, VnetConfig};

#[derive(Debug, Args)]
pub struct VnetArgs {
    /// Create TAP interface NAME as a port (repeatable). Move it into a
    /// namespace with `ip link set NAME netns NS`.
    #[arg(long = "tap", value_name = "NAME")]
    pub taps: Vec<String>,
    /// Accept tunnels from other switches on PROTO:HOST:PORT, PROTO one
    /// of udp, tcp, tls (repeatable).
    #[arg(long, value_name = "PROTO:ADDR")]
    pub listen: Vec<Endpoint>,
    /// Keep a tunnel to another switch at PROTO:HOST:PORT (repeatable).
    #[arg(long, value_name = "PROTO:ADDR")]
    pub connect: Vec<Endpoint>,
    /// This switch's certificate chain (PEM), for tls: tunnels.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) that sign peers' certificates (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Largest IP packet a frame may carry (68..=9000); TAPs get it too.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..=9000))]
    pub mtu: u16,
    /// Largest UDP payload a UDP tunnel sends; bigger frames are
    /// fragmented within the tunnel.
    #[arg(long, default_value_t = DEFAULT_UDP_MTU as u16, value_parser = clap::value_parser!(u16).range(64..=65000))]
    pub udp_mtu: u16,
    /// Forward between tunnels (the hub of a star): `--hub`, or
    /// `--hub false`. Default: hub when it listens and connects nowhere.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub hub: Option<bool>,
    /// Print the status (ports, tunnels, counters) as one JSON line on
    /// standard output every this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub status_every: u64,
}

pub fn run(args: VnetArgs) -> CliResult {
    if args.taps.is_empty() && args.listen.is_empty() && args.connect.is_empty() {
        return Err("nothing to switch: give --tap, --listen or --connect".into());
    }
    // Block the signals before any thread starts, so that only sigwait
    // below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(c), Some(k), Some(a)) => Some(TlsConfig::from_pem_files(c, k, a)?),
        _ => None,
    };
    let hub = args
        .hub
        .unwrap_or(!args.listen.is_empty() && args.connect.is_empty());
    let vnet = Vnet::new(VnetConfig {
        switch: SwitchConfig {
            mtu: args.mtu.into(),
            hub,
            ..Default::default()
        },
        tls,
        udp_mtu: args.udp_mtu.into(),
    })?;
    for name in &args.taps {
        vnet.add_tap(name)
            .map_err(|e| format!("TAP {name}: {}", chain(&e)))?;
    }
    for ep in &args.listen {
        let (_, local) = vnet
            .listen(ep.clone())
            .map_err(|e| format!("listen {ep}: {}", chain(&e)))?;
        tracing::info!(listen = %ep, %local, "listening");
    }
    for ep in &args.connect {
        vnet.connect(ep.clone())
            .map_err(|e| format!("connect {ep}: {}", chain(&e)))?;
    }
    tracing::info!(
        taps = args.taps.len(),
        listen = args.listen.len(),
        connect = args.connect.len(),
        hub,
        "switch running"
    );

    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = tx.send(sig);
            }
        })?;
    let every = match args.status_every {
        0 => Duration::from_secs(3600),
        n => Duration::from_secs(n),
    };
    let sig = loop {
        match rx.recv_timeout(every) {
            Ok(sig) => break sig,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if args.status_every > 0 {
                    println!("{}", serde_json::to_string(&vnet.status())?);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break Signal::SIGTERM,
        }
    };
    tracing::info!(signal = %sig, "shutting down");
    vnet.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}
