//! The `probe=` command-line parameter: steps separated by `+`, each
//! `name[:arg[:arg...]]`, run in order on vCPU 0.

use crate::serial::{self, Json};
use crate::{blk, boot, clock, fs, hostile, hw, identity, lapic, mem, net, smp};
use core::arch::asm;

/// One parsed step.
#[derive(Clone, Copy)]
enum Step<'a> {
    Ready,
    Smp(Option<u32>),
    Count { n: u64, every: u64 },
    Shutdown(Via),
    Fault,
    Net(net::Cmd),
    Fs(fs::Cmd<'a>),
    Blk(blk::Cmd),
    Hostile(hostile::Cmd),
    Mem(mem::Cmd),
    Tick { ms: u64, n: Option<u64> },
    Identity,
    /// `vmgenid-watch:MS`: see [`identity::watch`].
    VmGenIdWatch(u64),
}

/// How `shutdown` ends the VM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// ACPI S5 if the firmware tables offer it, else the i8042.
    Any,
    Acpi,
    I8042,
}

/// A step that cannot run, with the message for the error line.
enum StepError<'a> {
    Unknown(&'a str),
    BadArg(&'a str, &'a str),
}

/// The value of the `probe=` parameter ("ready" without one).
pub fn program(cmdline: &str) -> &str {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("probe="))
        .unwrap_or("ready")
}

/// Checks every step, then runs them in order. Returns after the last one
/// (the caller prints "done"); halts on a bad step. `cmdline` is the whole
/// command line (the network steps find their devices there).
pub fn run(program: &str, cmdline: &str) {
    for text in steps(program) {
        if let Err(e) = parse(text) {
            match e {
                StepError::Unknown(name) => serial::line(format_args!(
                    r#"{{"probe":"error","msg":"unknown step {}"}}"#,
                    Json(name)
                )),
                StepError::BadArg(name, arg) => serial::line(format_args!(
                    r#"{{"probe":"error","msg":"bad argument '{}' for step {}"}}"#,
                    Json(arg),
                    Json(name)
                )),
            }
            boot::halt();
        }
    }
    let mut net = net::Ctx::new(cmdline);
    let mut fs = fs::Ctx::new(cmdline);
    let mut blk = blk::Ctx::new(cmdline);
    for text in steps(program) {
        if let Ok(step) = parse(text) {
            exec(step, cmdline, &mut net, &mut fs, &mut blk);
        }
    }
}

fn steps(program: &str) -> impl Iterator<Item = &str> {
    program.split('+').filter(|s| !s.is_empty())
}

fn parse(text: &str) -> Result<Step<'_>, StepError<'_>> {
    let mut parts = text.split(':');
    let name = parts.next().unwrap_or("");
    if let Some(cmd) = net::parse(name, &mut parts) {
        let cmd = cmd.map_err(|arg| StepError::BadArg(name, arg))?;
        return match parts.next() {
            Some(extra) => Err(StepError::BadArg(name, extra)),
            None => Ok(Step::Net(cmd)),
        };
    }
    if let Some(cmd) = fs::parse(name, &mut parts) {
        let cmd = cmd.map_err(|arg| StepError::BadArg(name, arg))?;
        return match parts.next() {
            Some(extra) => Err(StepError::BadArg(name, extra)),
            None => Ok(Step::Fs(cmd)),
        };
    }
    if let Some(cmd) = blk::parse(name, &mut parts) {
        let cmd = cmd.map_err(|arg| StepError::BadArg(name, arg))?;
        return match parts.next() {
            Some(extra) => Err(StepError::BadArg(name, extra)),
            None => Ok(Step::Blk(cmd)),
        };
    }
    if let Some(cmd) = hostile::parse(name, &mut parts) {
        let cmd = cmd.map_err(|arg| StepError::BadArg(name, arg))?;
        return match parts.next() {
            Some(extra) => Err(StepError::BadArg(name, extra)),
            None => Ok(Step::Hostile(cmd)),
        };
    }
    if let Some(cmd) = mem::parse(name, &mut parts) {
        let cmd = cmd.map_err(|arg| StepError::BadArg(name, arg))?;
        return match parts.next() {
            Some(extra) => Err(StepError::BadArg(name, extra)),
            None => Ok(Step::Mem(cmd)),
        };
    }
    if name == "shutdown" {
        let via = match parts.next() {
            None => Via::Any,
            Some("acpi") => Via::Acpi,
            Some("i8042") => Via::I8042,
            Some(a) => return Err(StepError::BadArg(name, a)),
        };
        return match parts.next() {
            Some(extra) => Err(StepError::BadArg(name, extra)),
            None => Ok(Step::Shutdown(via)),
        };
    }
    let mut arg = |min: u64| -> Result<Option<u64>, StepError<'_>> {
        match parts.next() {
            None => Ok(None),
            Some(a) => match a.parse::<u64>() {
                Ok(v) if v >= min && (name != "tick" || v <= TICK_MAX_MS) => Ok(Some(v)),
                _ => Err(StepError::BadArg(name, a)),
            },
        }
    };
    let step = match name {
        "ready" => Step::Ready,
        "smp" => Step::Smp(arg(1)?.map(|n| n.min(u64::from(u32::MAX)) as u32)),
        "count" => Step::Count {
            n: arg(0)?.unwrap_or(0),
            every: arg(1)?.unwrap_or(0),
        },
        "fault" => Step::Fault,
        "identity" => Step::Identity,
        "vmgenid-watch" => match arg(1)? {
            Some(ms) => Step::VmGenIdWatch(ms.min(TICK_MAX_MS)),
            None => return Err(StepError::BadArg(name, "")),
        },
        "tick" => match arg(1)? {
            Some(ms) => Step::Tick { ms, n: arg(0)? },
            None => return Err(StepError::BadArg(name, "")),
        },
        _ => return Err(StepError::Unknown(name)),
    };
    match parts.next() {
        Some(extra) => Err(StepError::BadArg(name, extra)),
        None => Ok(step),
    }
}

fn exec(
    step: Step<'_>,
    cmdline: &str,
    net: &mut net::Ctx<'_>,
    fs: &mut fs::Ctx<'_>,
    blk: &mut blk::Ctx<'_>,
) {
    match step {
        Step::Blk(cmd) => blk.exec(cmd),
        Step::Net(cmd) => net.exec(cmd),
        Step::Fs(cmd) => fs.exec(cmd),
        Step::Hostile(cmd) => hostile::exec(cmd, cmdline, net),
        Step::Mem(cmd) => mem::exec(cmd),
        Step::Tick { ms, n } => tick(ms, n),
        Step::Identity => identity::exec(cmdline),
        Step::VmGenIdWatch(ms) => identity::watch(ms),
        Step::Ready => {}
        Step::Smp(want) => smp::start_all(want),
        Step::Count { n, every } => count(n, every),
        Step::Shutdown(via) => shutdown(via),
        Step::Fault => {
            serial::line(format_args!(r#"{{"probe":"fault"}}"#));
            boot::triple_fault();
        }
    }
}

/// Counts to `n` at native speed, one line every `every` (0: none).
fn count(n: u64, every: u64) {
    let t0 = hw::rdtsc();
    let mut done = 0u64;
    while done < n {
        let chunk = if every == 0 {
            n - done
        } else {
            every.min(n - done)
        };
        spin(chunk);
        done += chunk;
        if every != 0 && done < n {
            serial::line(format_args!(
                r#"{{"probe":"count","vcpu":0,"at":{},"cycles":{}}}"#,
                done,
                hw::rdtsc().wrapping_sub(t0)
            ));
        }
    }
    let cycles = hw::rdtsc().wrapping_sub(t0);
    match clock::cycles_to_ns(cycles) {
        Some(ns) => serial::line(format_args!(
            r#"{{"probe":"count","vcpu":0,"n":{},"cycles":{},"ns":{}}}"#,
            n, cycles, ns
        )),
        None => serial::line(format_args!(
            r#"{{"probe":"count","vcpu":0,"n":{},"cycles":{}}}"#,
            n, cycles
        )),
    }
}

/// Longest tick period (and largest tick count), a day in ms.
const TICK_MAX_MS: u64 = 86_400_000;

/// Prints `{"probe":"tick","n":K}` every `ms` ms, `n` times or forever,
/// the vCPU asleep in between (see [`lapic::wait`]). K lives in guest
/// memory, so a restored or migrated VM goes on from the next K. Each
/// period starts at the previous deadline (no drift), unless that is a
/// period or more ago or the TSC went backwards (a restore, a migration, a
/// long pause): then it starts afresh from now, without a burst of
/// catch-up ticks.
fn tick(ms: u64, n: Option<u64>) {
    let period = clock::ticks_ms(ms);
    let mut start = hw::rdtsc();
    let mut k = 0u64;
    while n.is_none_or(|n| k < n) {
        lapic::wait(start, period);
        let now = hw::rdtsc();
        let deadline = start.wrapping_add(period);
        start = if now.wrapping_sub(deadline) < period {
            deadline
        } else {
            now
        };
        k += 1;
        serial::line(format_args!(r#"{{"probe":"tick","n":{}}}"#, k));
    }
}

/// A loop of `n` iterations the compiler cannot remove.
fn spin(n: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: a register-only countdown loop; no memory, no stack.
    unsafe {
        asm!(
            "2:",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) n => _,
            options(nomem, nostack),
        )
    };
}

/// Ends the VM: ACPI S5 through the FADT sleep control register if there
/// is one (Cloud Hypervisor reboots on an i8042 reset, QEMU microvm has no
/// i8042), then a reset through the i8042 (Firecracker and vmplant end the
/// VM on it), then halt. `shutdown:acpi` and `shutdown:i8042` use only the
/// one way, so a VMM's handling of each can be checked.
fn shutdown(via: Via) {
    serial::line(format_args!(r#"{{"probe":"shutdown"}}"#));
    if via != Via::I8042 {
        crate::acpi::power_off();
        clock::delay_us(10_000);
    }
    if via != Via::Acpi {
        hw::outb(0x64, 0xfe);
    }
    clock::delay_us(100_000);
    boot::halt();
}
