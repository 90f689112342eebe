//! The virtio-net device: a guest NIC that is a port of a VNET switch.
//!
//! Frames the guest transmits are read in place from its TX buffers and
//! handed to the switch; frames the switch sends to this port are written
//! straight into the guest's RX buffers. The switch decides where a frame
//! goes from its header alone, so a frame from one guest reaches another
//! guest's memory with one copy.
//!
//! - `queue.rs`: TX and RX processing on plain queues and guest memory,
//!   testable with virtio-queue's mock driver;
//! - `device.rs`: the [`Net`] device (features, config space, activation)
//!   and its switch port;
//! - `backlog.rs`: frames held while the guest has no RX buffers free;
//! - `event_handler.rs`: the event-loop glue;
//! - `persist.rs`: the state kept in a snapshot.

mod backlog;
mod device;
mod event_handler;
pub mod persist;
pub mod queue;

pub use device::{Net, NetCounters, NetError};

/// The virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Length of `virtio_net_hdr_v1`, in front of every frame in both
/// directions (VERSION_1 always has the `num_buffers` field).
pub const NET_HDR_LEN: usize = 12;
/// Queue size offered for RX and TX.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    pub const CSUM: u32 = 0;
    pub const GUEST_CSUM: u32 = 1;
    pub const MTU: u32 = 3;
    pub const GUEST_TSO4: u32 = 7;
    pub const GUEST_TSO6: u32 = 8;
    pub const HOST_TSO4: u32 = 11;
    pub const HOST_TSO6: u32 = 12;
    pub const MAC: u32 = 5;
    pub const MRG_RXBUF: u32 = 15;
    pub const STATUS: u32 = 16;
}

/// `status` bit in the config space: the link is up.
pub const LINK_UP: u16 = 1;
