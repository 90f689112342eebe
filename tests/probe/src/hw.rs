//! Small CPL3 hardware helpers: port I/O (IOPL=3), physical memory through
//! the identity map, CPUID, TSC.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the probe runs with IOPL=3, so `out` is allowed at CPL3; it
    // touches no memory the compiler knows about.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the probe runs with IOPL=3, so `in` is allowed at CPL3; it
    // touches no memory the compiler knows about.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Whether `addr..addr+len` lies inside the identity map (0..4 GiB) and
/// does not start at 0.
pub fn mapped(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= 1 << 32)
}

macro_rules! phys_reader {
    ($name:ident, $ty:ty) => {
        /// Reads physical memory through the identity map (0 if unmapped).
        pub fn $name(addr: u64) -> $ty {
            if !mapped(addr, core::mem::size_of::<$ty>() as u64) {
                return 0;
            }
            // SAFETY: `addr` is non-null and inside the identity map of
            // 0..4 GiB that every level of the page tables marks present,
            // writable and user; a volatile, unaligned read of firmware or
            // VMM data there cannot alias a Rust reference we rely on.
            unsafe { core::ptr::read_unaligned(addr as *const $ty) }
        }
    };
}
phys_reader!(read_u8, u8);
phys_reader!(read_u16, u16);
phys_reader!(read_u32, u32);
phys_reader!(read_u64, u64);

/// Writes a 32-bit MMIO register through the identity map.
pub fn mmio_write_u32(addr: u64, value: u32) {
    assert!(mapped(addr, 4) && addr.is_multiple_of(4));
    // SAFETY: aligned, inside the identity map, and an MMIO register (or
    // RAM no Rust object lives in), so no Rust reference is invalidated.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) };
}

/// Reads a 32-bit MMIO register through the identity map.
pub fn mmio_read_u32(addr: u64) -> u32 {
    assert!(mapped(addr, 4) && addr.is_multiple_of(4));
    // SAFETY: aligned and inside the identity map; see `mmio_write_u32`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes one byte to an MMIO address through the identity map.
pub fn mmio_write_u8(addr: u64, value: u8) {
    assert!(mapped(addr, 1));
    // SAFETY: inside the identity map; an MMIO address (or RAM no Rust
    // object lives in), so no Rust reference is invalidated.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) };
}

/// Reads one byte of MMIO (or of RAM that changes behind our back, such
/// as the VM generation ID) through the identity map.
pub fn mmio_read_u8(addr: u64) -> u8 {
    assert!(mapped(addr, 1));
    // SAFETY: inside the identity map; an MMIO register or RAM no Rust
    // object lives in, read once (volatile).
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID is unprivileged and has no memory effects; RBX is
    // reserved by LLVM, so it is saved and restored around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") subleaf => c,
            out("edx") d,
            options(nomem, nostack, preserves_flags),
        )
    };
    (a, b, c, d)
}

/// Reads the time-stamp counter (CR4.TSD is clear, so allowed at CPL3).
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC is allowed at CPL3 (CR4.TSD = 0) and has no memory
    // effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}
