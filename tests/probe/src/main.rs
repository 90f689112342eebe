//! vmplant probe: the test guest.
//!
//! Boots like a Linux vmlinux (64-bit entry, RSI = boot_params) or through
//! its PVH note (32-bit entry, EBX = hvm_start_info), drops to CPL3 within
//! a few dozen instructions (see [`boot`]), and then runs the steps of its
//! `probe=` command-line parameter, reporting each result as one JSON line
//! on the 8250 serial port at 0x3f8.

#![no_std]
#![no_main]

mod acpi;
mod blk;
mod boot;
mod clock;
mod fs;
mod hostile;
mod hw;
mod identity;
mod lapic;
mod mem;
mod net;
mod serial;
mod smp;
mod steps;

/// Where vCPU 0 writes [`BOOT_DONE_VALUE`] once it is up (Firecracker's
/// boot timer device).
const BOOT_DONE_ADDR: u64 = 0xc000_0000;
const BOOT_DONE_VALUE: u8 = 123;
/// Longest command line kept (Linux's x86 COMMAND_LINE_SIZE is 2048).
const CMDLINE_MAX: usize = 4096;

/// Rust entry of vCPU 0 at CPL3, after `.bss` is zeroed. `proto` 0: Linux
/// 64-bit entry, `info` = boot_params; 1: PVH, `info` = hvm_start_info.
extern "C" fn bsp_main(info: u64, proto: u64) -> ! {
    let boot = boot::BootInfo::read(info, proto);
    // Copy the command line first: the VMM's memory holding it may be reused.
    let mut buf = [0u8; CMDLINE_MAX];
    let mut len = 0;
    while len < CMDLINE_MAX && boot.cmdline != 0 {
        let b = hw::read_u8(boot.cmdline + len as u64);
        if b == 0 {
            break;
        }
        buf[len] = b;
        len += 1;
    }
    let cmdline = match core::str::from_utf8(&buf[..len]) {
        Ok(s) => s,
        // Keep the valid prefix; from_utf8 cannot fail on it.
        Err(e) => core::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or(""),
    };

    serial::line(format_args!(
        r#"{{"probe":"ready","vcpu":{}}}"#,
        smp::apic_id()
    ));
    hw::mmio_write_u8(BOOT_DONE_ADDR, BOOT_DONE_VALUE);
    acpi::set_rsdp_hint(boot.rsdp);
    mem::set_ram_map(&boot.ram);
    steps::run(steps::program(cmdline), cmdline);
    serial::line(format_args!(r#"{{"probe":"done"}}"#));
    boot::halt()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let line = info.location().map_or(0, |l| l.line());
    serial::line(format_args!(
        r#"{{"probe":"error","msg":"panic at line {}"}}"#,
        line
    ));
    boot::halt()
}
