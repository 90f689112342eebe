//! The VNET switch flags shared by `vmplant vnet` and `vmplant run`: TAP
//! ports, tunnels to other switches, MTU and TLS.

use clap::Args;
use std::path::PathBuf;
use vnet::tunnel::{DEFAULT_UDP_MTU, Endpoint, TlsConfig, UdpKey};
use vnet::{SwitchConfig, Vnet, VnetConfig};

#[derive(Debug, Args)]
pub struct SwitchArgs {
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
    /// Pre-shared key of UDP tunnels, in hex or base64, at least 16 bytes
    /// once decoded (`openssl rand -hex 32 > FILE`): every datagram is
    /// authenticated and replays are dropped; peers without it are
    /// refused. Give both ends the same.
    #[arg(long, value_name = "FILE")]
    pub udp_key: Option<PathBuf>,
    /// Forward between tunnels (the hub of a star): `--hub`, or
    /// `--hub false`. Default: hub when it listens and connects nowhere.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub hub: Option<bool>,
}

impl SwitchArgs {
    /// Whether any port besides guests' was asked for.
    pub fn has_ports(&self) -> bool {
        !(self.taps.is_empty() && self.listen.is_empty() && self.connect.is_empty())
    }

    /// Starts the switch with its TAPs, listeners and tunnels.
    pub fn start(&self) -> Result<Vnet, Box<dyn std::error::Error + Send + Sync>> {
        let tls = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(a)) => Some(TlsConfig::from_pem_files(c, k, a)?),
            _ => None,
        };
        let udp_key = match &self.udp_key {
            Some(f) => Some(UdpKey::from_file(f).map_err(|e| format!("--udp-key: {}", chain(&e)))?),
            None => None,
        };
        let hub = self
            .hub
            .unwrap_or(!self.listen.is_empty() && self.connect.is_empty());
        let vnet = Vnet::new(VnetConfig {
            switch: SwitchConfig {
                mtu: self.mtu.into(),
                hub,
                ..Default::default()
            },
            tls,
            udp_mtu: self.udp_mtu.into(),
            udp_key,
        })?;
        for name in &self.taps {
            vnet.add_tap(name)
                .map_err(|e| format!("TAP {name}: {}", chain(&e)))?;
        }
        for ep in &self.listen {
            let (_, local) = vnet
                .listen(ep.clone())
                .map_err(|e| format!("listen {ep}: {}", chain(&e)))?;
            tracing::info!(listen = %ep, %local, "listening");
        }
        for ep in &self.connect {
            vnet.connect(ep.clone())
                .map_err(|e| format!("connect {ep}: {}", chain(&e)))?;
        }
        // A switch with guest NICs only says nothing: its ports are the VMs'.
        if self.has_ports() {
            tracing::info!(
                taps = self.taps.len(),
                listen = self.listen.len(),
                connect = self.connect.len(),
                hub,
                "switch running"
            );
        }
        Ok(vnet)
    }
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}
