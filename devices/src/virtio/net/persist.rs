//! The virtio-net device's state in a snapshot. The queues are saved by
//! the transport ([`crate::virtio::mmio::MmioPersist`]).

use super::Net;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPersist {
    pub mac: [u8; 6],
    pub acked_features: u64,
}

impl Net {
    pub fn save(&self) -> NetPersist {
        NetPersist {
            mac: self.mac().0,
            acked_features: self.acked_features(),
        }
    }
}
