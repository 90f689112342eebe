//! A switch with its TAPs, tunnels and listeners: the run-time control
//! API (add and remove ports, tunnels and rules while traffic flows; list
//! everything with state and counters as serde structs).

use crate::Mac;
use crate::matrix::{MatrixEntry, Topology, Window, infer_topology};
use crate::switch::{
    MacInfo, PortId, PortInfo, PortKind, PortSink, Rule, SourcePolicy, Switch, SwitchConfig,
    SwitchError, SwitchInfo,
};
use crate::tap::{TapError, TapPort};
use crate::tunnel::{
    Endpoint, Listener, ListenerInfo, TlsConfig, Tunnel, TunnelError, TunnelInfo, TunnelOptions,
    UdpKey,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum VnetError {
    #[error(transparent)]
    Switch(#[from] SwitchError),
    #[error("TAP port")]
    Tap(#[from] TapError),
    #[error("tunnel")]
    Tunnel(#[from] TunnelError),
    #[error("no tunnel {0}")]
    NoSuchTunnel(u64),
    #[error("no listener {0}")]
    NoSuchListener(u64),
}

/// Settings of a [`Vnet`].
#[derive(Clone, Debug, Default)]
pub struct VnetConfig {
    pub switch: SwitchConfig,
    /// Certificates for `tls:` tunnels and listeners.
    pub tls: Option<TlsConfig>,
    /// Largest UDP payload of UDP tunnels (0:
    /// [`crate::tunnel::DEFAULT_UDP_MTU`]).
    pub udp_mtu: usize,
    /// Pre-shared key of UDP tunnels and listeners (see
    /// [`TunnelOptions::udp_key`]).
    pub udp_key: Option<UdpKey>,
}

/// Everything a [`Vnet`] has, for listing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VnetStatus {
    pub switch: SwitchInfo,
    pub ports: Vec<PortInfo>,
    pub macs: Vec<MacInfo>,
    pub rules: Vec<Rule>,
    /// Tunnels this switch connects.
    pub tunnels: Vec<TunnelInfo>,
    /// Listeners with the tunnels they accepted.
    pub listeners: Vec<ListenerInfo>,
}

/// A switch and the ports it owns.
pub struct Vnet {
    switch: Arc<Switch>,
    opts: TunnelOptions,
    taps: Mutex<BTreeMap<PortId, TapPort>>,
    tunnels: Mutex<BTreeMap<u64, Tunnel>>,
    listeners: Mutex<BTreeMap<u64, Listener>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vnet {
    pub fn new(cfg: VnetConfig) -> Result<Vnet, VnetError> {
        Ok(Vnet {
            switch: Switch::new(cfg.switch)?,
            opts: TunnelOptions {
                tls: cfg.tls,
                udp_mtu: cfg.udp_mtu,
                udp_key: cfg.udp_key,
            },
            taps: Mutex::default(),
            tunnels: Mutex::default(),
            listeners: Mutex::default(),
        })
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Creates TAP interface `name` as a new port.
    pub fn add_tap(&self, name: &str) -> Result<PortId, VnetError> {
        let tap = TapPort::create(&self.switch, name)?;
        let id = tap.port();
        lock(&self.taps).insert(id, tap);
        Ok(id)
    }

    /// Adds a port the caller drives: frames leave by `sink`, enter with
    /// `switch().ingress(id, frame)`.
    pub fn add_port(&self, name: &str, kind: PortKind, sink: Arc<dyn PortSink>) -> PortId {
        self.switch.add_port(name, kind, sink)
    }

    /// Adds a guest NIC's port, which may send only from `mac` until
    /// [`Vnet::set_source_policy`] says otherwise.
    pub fn add_guest_port(&self, name: &str, mac: Mac, sink: Arc<dyn PortSink>) -> PortId {
        self.switch.add_guest_port(name, mac, sink)
    }

    /// Sets which source addresses a port may send from (relaxes or
    /// restores a guest port's rule while traffic flows).
    pub fn set_source_policy(&self, port: PortId, policy: SourcePolicy) -> Result<(), VnetError> {
        Ok(self.switch.set_source_policy(port, policy)?)
    }

    /// Removes a port (a TAP is deleted with its interface).
    pub fn remove_port(&self, id: PortId) -> Result<(), VnetError> {
        let tap = lock(&self.taps).remove(&id);
        match tap {
            Some(t) => drop(t),
            None => self.switch.remove_port(id)?,
        }
        Ok(())
    }

    /// Starts a tunnel to `ep`; returns its id at once (it connects in
    /// the background; see [`Vnet::status`]).
    pub fn connect(&self, ep: Endpoint) -> Result<u64, VnetError> {
        let t = Tunnel::connect(&self.switch, ep, &self.opts)?;
        let id = t.id();
        lock(&self.tunnels).insert(id, t);
        Ok(id)
    }

    /// Stops and removes a tunnel this switch connects.
    pub fn remove_tunnel(&self, id: u64) -> Result<(), VnetError> {
        let t = lock(&self.tunnels)
            .remove(&id)
            .ok_or(VnetError::NoSuchTunnel(id))?;
        drop(t);
        Ok(())
    }

    /// Listens for tunnels on `ep`; returns the listener id and address.
    pub fn listen(&self, ep: Endpoint) -> Result<(u64, SocketAddr), VnetError> {
        let l = Listener::bind(&self.switch, ep, &self.opts)?;
        let r = (l.id(), l.local_addr());
        lock(&self.listeners).insert(l.id(), l);
        Ok(r)
    }

    /// Stops a listener and the tunnels it accepted.
    pub fn remove_listener(&self, id: u64) -> Result<(), VnetError> {
        let l = lock(&self.listeners)
            .remove(&id)
            .ok_or(VnetError::NoSuchListener(id))?;
        drop(l);
        Ok(())
    }

    pub fn add_rule(&self, rule: Rule) -> Result<(), VnetError> {
        Ok(self.switch.add_rule(rule)?)
    }

    pub fn remove_rule(&self, dst: Mac, vlan: Option<u16>) -> Result<Rule, VnetError> {
        Ok(self.switch.remove_rule(dst, vlan)?)
    }

    pub fn tunnels(&self) -> Vec<TunnelInfo> {
        lock(&self.tunnels).values().map(|t| t.info()).collect()
    }

    pub fn status(&self) -> VnetStatus {
        VnetStatus {
            switch: self.switch.info(),
            ports: self.switch.ports(),
            macs: self.switch.macs(),
            rules: self.switch.rules(),
            tunnels: self.tunnels(),
            listeners: lock(&self.listeners).values().map(|l| l.info()).collect(),
        }
    }

    /// The global traffic matrix (this switch and those heard of).
    pub fn matrix(&self) -> Vec<MatrixEntry> {
        self.switch.matrix().global()
    }

    /// Who talks to whom, from the global matrix.
    pub fn topology(&self, window: Window, fraction: f64) -> Topology {
        infer_topology(&self.matrix(), window, fraction)
    }

    /// Stops every tunnel and listener and deletes every TAP.
    pub fn shutdown(&self) {
        let tunnels = std::mem::take(&mut *lock(&self.tunnels));
        drop(tunnels);
        let listeners = std::mem::take(&mut *lock(&self.listeners));
        drop(listeners);
        let taps = std::mem::take(&mut *lock(&self.taps));
        drop(taps);
    }
}

impl Drop for Vnet {
    fn drop(&mut self) {
        self.shutdown();
    }
}
