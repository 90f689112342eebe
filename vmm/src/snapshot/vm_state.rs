//! The VM-wide state KVM keeps in the kernel: the in-kernel interrupt
//! controllers (PIC master and slave, IOAPIC), the PIT and the kvmclock.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("KVM refused {what}")]
pub struct VmStateError {
    what: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn chip(fd: &VmFd, id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c).map_err(err(what))?;
    Ok(c)
}

impl KvmVmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(fd: &VmFd) -> Result<KvmVmState, VmStateError> {
        let mut clock = fd.get_clock().map_err(err("to report the kvmclock"))?;
        // Only the time goes back in: the flags KVM reports (whether the
        // clock is stable, say) are the host's, and KVM_SET_CLOCK takes
        // none of them.
        clock.flags = 0;
        Ok(KvmVmState {
            pic_master: chip(fd, KVM_IRQCHIP_PIC_MASTER, "to report the master PIC")?,
            pic_slave: chip(fd, KVM_IRQCHIP_PIC_SLAVE, "to report the slave PIC")?,
            ioapic: chip(fd, KVM_IRQCHIP_IOAPIC, "to report the IOAPIC")?,
            pit: fd.get_pit2().map_err(err("to report the PIT"))?,
            clock,
        })
    }

    /// Puts the state back into a new VM, before its vCPUs run.
    pub fn restore(&self, fd: &VmFd) -> Result<(), VmStateError> {
        fd.set_pit2(&self.pit).map_err(err("the PIT state"))?;
        fd.set_clock(&self.clock).map_err(err("the kvmclock"))?;
        fd.set_irqchip(&self.pic_master)
            .map_err(err("the master PIC state"))?;
        fd.set_irqchip(&self.pic_slave)
            .map_err(err("the slave PIC state"))?;
        fd.set_irqchip(&self.ioapic)
            .map_err(err("the IOAPIC state"))?;
        Ok(())
    }
}
