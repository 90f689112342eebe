//! The virtio-net device on the VM's event loop: it registers its queue
//! events once the driver has started it, then sends what the guest
//! queues for transmission.

use super::device::{Net, RX_QUEUE, TX_QUEUE};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::os::fd::AsRawFd;
use vmm_sys_util::epoll::EventSet;

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            if !self.events_registered {
                for (i, evt) in self.queue_events.iter().enumerate() {
                    if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                        tracing::error!("virtio-net: cannot watch queue {i}: {e}");
                    }
                }
                self.events_registered = true;
            }
            // Frames may have been queued before the event loop looked.
            self.process_tx();
            return;
        }
        match events.data() as usize {
            TX_QUEUE => {
                let _ = self.queue_events[TX_QUEUE].read();
                self.process_tx();
            }
            RX_QUEUE => {
                // The guest gave more RX buffers (it only says so while
                // frames are held for it).
                let _ = self.queue_events[RX_QUEUE].read();
                self.process_rx_refill();
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            tracing::error!("virtio-net: cannot watch for activation: {e}");
        }
    }
}
