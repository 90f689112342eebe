//! The VM generation ID (ACPI "Virtual Machine Generation ID"): 16 random
//! bytes at [`VMGENID_START`] that the DSDT's VMGenID device points to.
//! Every boot and every restore writes a new one, so that clones of one
//! snapshot tell themselves apart (Linux's vmgenid driver reseeds its
//! random number generator from it).

use crate::layout::VMGENID_START;
use devices::virtio::GuestMemoryMmap;
use std::io::Read;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot read random bytes for the VM generation ID")]
    Random(#[source] std::io::Error),
    #[error("cannot write the VM generation ID into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// 16 random bytes from the kernel.
pub fn random_bytes() -> std::io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id))?;
    Ok(id)
}

/// Writes a fresh random generation ID into guest memory and returns it.
pub fn renew(mem: &GuestMemoryMmap) -> Result<[u8; 16], VmGenIdError> {
    let id = random_bytes().map_err(VmGenIdError::Random)?;
    mem.write_slice(&id, GuestAddress(VMGENID_START))
        .map_err(VmGenIdError::Write)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_renewal_is_a_new_id_in_guest_memory() {
        let mem = crate::memory::create(4 << 20, false).unwrap();
        let a = renew(&mem).unwrap();
        let b = renew(&mem).unwrap();
        assert_ne!(a, b);
        let mut seen = [0u8; 16];
        mem.read_slice(&mut seen, GuestAddress(VMGENID_START))
            .unwrap();
        assert_eq!(seen, b);
    }
}
