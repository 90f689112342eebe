//! `virtio_drivers::Hal` for the probe: DMA memory from the pool, and
//! virtual = physical (the identity map), so sharing a buffer is just
//! handing over its address.

use super::pool;
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// The probe's HAL.
pub struct ProbeHal;

// SAFETY: `dma_alloc` returns page-aligned, zeroed pool memory that nothing
// else refers to (the pool hands every byte out once); with the identity
// map, the pointer and the physical address are the same number, so
// `mmio_phys_to_virt` and `share` return valid addresses for the device.
unsafe impl Hal for ProbeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match pool::alloc(pages * PAGE_SIZE, PAGE_SIZE) {
            Some(ptr) => (ptr.as_ptr() as PhysAddr, ptr),
            // virtio-drivers treats physical address 0 as failure.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // The pool never frees; queues live for the whole run.
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
