//! Guest RAM above the image (0x200000..0x2000000) for DMA rings, frame
//! buffers and socket buffers: a bump allocator that never frees. With the
//! identity map, a pool address is both the pointer and the guest-physical
//! address a device uses.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

/// First byte of the pool (the README's "free for later steps").
pub const START: u64 = 0x20_0000;
/// End of the pool: network steps need 32 MiB of RAM.
pub const END: u64 = 0x200_0000;

static NEXT: AtomicU64 = AtomicU64::new(START);

/// `size` zeroed bytes aligned to `align` (a power of two), or `None` when
/// the pool is exhausted.
pub fn alloc(size: usize, align: usize) -> Option<NonNull<u8>> {
    let align = align.max(1) as u64;
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        let start = cur.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size as u64)?;
        if end > END {
            return None;
        }
        match NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                let ptr = NonNull::new(start as *mut u8)?;
                // SAFETY: start..end lies in the pool (RAM inside the
                // identity map, outside the image and stacks) and was just
                // handed out once, so nothing else refers to it.
                unsafe { ptr.as_ptr().write_bytes(0, size) };
                return Some(ptr);
            }
            Err(now) => cur = now,
        }
    }
}

/// A zeroed byte buffer of `len` bytes that lives for the rest of the run.
pub fn bytes(len: usize) -> Option<&'static mut [u8]> {
    let ptr = alloc(len, 64)?;
    // SAFETY: `alloc` returned `len` zeroed bytes that no one else refers
    // to and that are never freed.
    Some(unsafe { core::slice::from_raw_parts_mut(ptr.as_ptr(), len) })
}

/// Moves `value` into the pool, for objects too big for the 32 KiB stack
/// to keep for long.
pub fn place<T>(value: T) -> Option<&'static mut T> {
    let ptr = alloc(size_of::<T>(), align_of::<T>())?.cast::<T>();
    // SAFETY: `ptr` is aligned for `T`, points to `size_of::<T>()` bytes
    // of the pool handed out only here, and is never freed.
    unsafe { ptr.as_ptr().write(value) };
    // SAFETY: just initialised above; the only reference ever made to it.
    Some(unsafe { &mut *ptr.as_ptr() })
}
