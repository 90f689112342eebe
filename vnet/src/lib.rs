//! VNET: an in-process layer-2 switch with guest, TAP and tunnel ports,
//! and a traffic matrix (Virtuoso's VTTIF).
//!
//! - [`switch::Switch`]: the forwarding core; any [`switch::PortSink`] is a
//!   port, frames enter with [`switch::Switch::ingress`].
//! - [`tap::TapPort`]: a host TAP interface as a port.
//! - [`tunnel`]: UDP, TCP and TLS tunnels to the switch of another process.
//! - [`node::Vnet`]: a switch with its TAPs, tunnels and listeners, and the
//!   run-time control API.
//! - [`matrix`]: traffic matrix and topology inference.
//! - [`testbed`]: namespaces, veths, a Linux bridge, TAPs, ping and iperf3
//!   runs with parsed output, a throwaway PKI: shared by the tests and
//!   `vmplant bench vnet`.

pub mod counters;
pub mod frame;
pub mod matrix;
pub mod node;
pub mod offload;
mod ratelimit;
pub mod switch;
pub mod tap;
pub mod testbed;
pub mod tunnel;

pub use counters::{CounterSnapshot, DropReason};
pub use frame::{Frame, Mac};
pub use node::{Vnet, VnetConfig, VnetError, VnetStatus};
pub use switch::{
    PortId, PortInfo, PortKind, PortSink, Rule, SourcePolicy, Switch, SwitchConfig, SwitchError,
};
