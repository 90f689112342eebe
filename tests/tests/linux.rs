//! Booting a real Linux kernel: Debian's cloud kernel, which
//! images/fetch-linux.sh fetches into images/cache/linux (run it first;
//! scripts/test and CI do).
//!
//! How far a stock kernel gets depends on the host (see
//! /work/shared/ENVIRONMENT.md):
//!
//! - On a PVM host (KVM without VT-x/AMD-V, as on the development and CI
//!   machines) the kernel's CPL0 code is interpreted by KVM's instruction
//!   emulator: it prints its banner, its command line, its e820 map,
//!   where its initrd lies, the ACPI tables it found and how many CPUs
//!   their MADT gave it on the early console within tens of seconds, and
//!   then stops on an instruction the emulator does not implement.
//!   These tests check that early console, which shows what our boot
//!   protocols handed the kernel, and then kill the VM.
//! - With hardware virtualization ("vmx"/"svm" in `vmplant host`) the same
//!   tests go on to boot the initramfs (busybox) to its shell marker and
//!   let it reboot through the i8042, which ends the VM with status 0.
//!
//! Each test says on stderr which of the two it checked.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use vmplant_tests::{Vmm, root, vmplant};

/// Time limit for each early-console line. On a PVM host the kernel needs
/// about 15 s of CPU time to reach its e820 map and 18 s to its initrd
/// (20 to 25 s alone on the machine); the limit leaves room for a loaded
/// machine with 2 shared cores.
const EARLY_CONSOLE: Duration = Duration::from_secs(180);
/// Time limit from the e820 map to the initramfs's shell and its reboot
/// (hardware virtualization only).
const FULL_BOOT: Duration = Duration::from_secs(60);

/// A file fetched by images/fetch-linux.sh; fails the test if missing.
fn cached(name: &str) -> PathBuf {
    let path = root().join("images/cache/linux").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run images/fetch-linux.sh (it fetches Debian's cloud kernel)",
        path.display()
    );
    path
}

/// The kernel release the fetch script recorded (first line of VERSION),
/// as the `Linux version` banner shows it.
fn release() -> String {
    let version = std::fs::read_to_string(cached("VERSION")).unwrap();
    version
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whether KVM here has hardware virtualization (VT-x or AMD-V), from
/// `vmplant host`. Without it (PVM), a stock kernel cannot boot to the
/// end: see ENVIRONMENT.md.
fn hardware_virtualization() -> bool {
    let out = Command::new(vmplant())
        .arg("host")
        .output()
        .expect("cannot run vmplant host");
    assert!(out.status.success(), "vmplant host failed: {out:?}");
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("vmplant host printed no JSON");
    match info["virtualization"].as_str() {
        Some("vmx" | "svm") => true,
        Some("pvm") => false,
        other => panic!("unexpected virtualization {other:?} in {info}"),
    }
}

/// An e820 range as Linux prints it: first and last byte, and type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct E820 {
    first: u64,
    last: u64,
    kind: String,
}

/// Parses the range and what follows in `... {prefix}[mem 0x...-0x...] rest`.
fn parse_mem_range<'a>(line: &'a str, prefix: &str) -> Option<(u64, u64, &'a str)> {
    let rest = line.split(&format!("{prefix}[mem ")).nth(1)?;
    let (range, rest) = rest.split_once(']')?;
    let (first, last) = range.split_once('-')?;
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some((hex(first)?, hex(last)?, rest.trim()))
}

/// Parses `... BIOS-e820: [mem 0x...-0x...] usable`.
fn parse_e820(line: &str) -> Option<E820> {
    let (first, last, kind) = parse_mem_range(line, "BIOS-e820: ")?;
    Some(E820 {
        first,
        last,
        kind: kind.to_string(),
    })
}

/// The map vmplant gives a guest of `mem_mib` MiB, as Linux prints it:
/// base memory below the EBDA, the EBDA and BIOS area reserved, RAM from
/// 1 MiB up to the 3 GiB MMIO gap, and the rest above 4 GiB.
fn expected_e820(mem_mib: u64) -> Vec<E820> {
    const GAP_START: u64 = 0xc000_0000;
    const GAP_END: u64 = 0x1_0000_0000;
    let mem = mem_mib << 20;
    let e = |first, last, kind: &str| E820 {
        first,
        last,
        kind: kind.to_string(),
    };
    let mut map = vec![
        e(0, 0x9_fbff, "usable"),
        e(0x9_fc00, 0xf_ffff, "reserved"),
        e(0x10_0000, mem.min(GAP_START) - 1, "usable"),
    ];
    if mem > GAP_START {
        map.push(e(GAP_END, GAP_END + (mem - GAP_START) - 1, "usable"));
    }
    map
}

/// The command line of every boot here. earlyprintk=serial: the kernel
/// (and the bzImage's decompressor) print on 0x3f8 from their first
/// steps. nokaslr: fixed addresses, less work, and the decompressor says
/// so on the console. reboot=k and vmplant.exit: the initramfs reboots
/// through the i8042 once it is up, which ends the VM.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial nokaslr reboot=k panic=-1 vmplant.exit";

/// What the bzImage's decompressor prints with `nokaslr` on its command
/// line, before it decompresses (Debian's kernel has no
/// CONFIG_X86_VERBOSE_BOOTUP, so it never prints "Decompressing Linux...").
const DECOMPRESSOR_LINE: &str = "KASLR disabled: 'nokaslr' on cmdline.";

/// One Linux boot to check.
struct Boot<'a> {
    /// `vmlinux` (ELF) or `vmlinuz` (bzImage), from the cache.
    kernel: &'a str,
    /// `--boot`: pvh or linux64 (`auto` picks pvh for this vmlinux, which
    /// has the PVH note; a bzImage always gets the 64-bit entry).
    entry: &'a str,
    mem_mib: u64,
    /// `--vcpus`: the kernel must find them all through ACPI (Debian's
    /// kernel has no MP table support).
    vcpus: u8,
    /// Whether a PVM host waits for the kernel to count its CPUs from the
    /// MADT: about 8 s more of interpreted code with 256 MiB, over a
    /// minute with 3.5 GiB (with hardware virtualization, always checked).
    cpus_from_madt: bool,
}

/// Where vmplant puts its ACPI tables (the RSDP first): vmm::layout's
/// ACPI_START..ACPI_END.
const ACPI_TABLES: std::ops::Range<u64> = 0xe_0000..0xf_0000;

/// Parses `... ACPI: SIG 0xADDRESS LENGTH (...)`, the line Linux prints
/// for each ACPI table it found: signature and address.
fn parse_acpi_table(line: &str) -> Option<(String, u64)> {
    let rest = line.split("ACPI: ").nth(1)?;
    let mut words = rest.split_whitespace();
    let sig = words.next().filter(|s| s.len() == 4)?;
    let addr = words.next()?.strip_prefix("0x")?;
    Some((sig.to_string(), u64::from_str_radix(addr, 16).ok()?))
}

/// Parses `... smpboot: Allowing N CPUs, M hotplug CPUs`: N and M.
fn parse_allowed_cpus(line: &str) -> Option<(u32, u32)> {
    let rest = line.split("smpboot: Allowing ").nth(1)?;
    let (n, rest) = rest.split_once(" CPUs, ")?;
    let m = rest.strip_suffix(" hotplug CPUs")?;
    Some((n.parse().ok()?, m.parse().ok()?))
}

/// Boots the kernel and checks the early console: the banner, the command
/// line echoed back, the e820 map and the initrd's place. With hardware
/// virtualization, then also boots the initramfs to its shell and lets it
/// end the VM.
fn boot_linux(b: &Boot) {
    let kernel = cached(b.kernel);
    let initrd = cached("initramfs.cpio.gz");
    let release = release();
    let full = hardware_virtualization();
    let what = format!(
        "linux ({}, --boot {}, {} MiB)",
        b.kernel, b.entry, b.mem_mib
    );
    let mem = b.mem_mib.to_string();
    let vcpus = b.vcpus.to_string();
    let start = Instant::now();
    let mut vm = Vmm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
        "--boot",
        b.entry,
        "--mem",
        &mem,
        "--vcpus",
        &vcpus,
        "--no-stdin",
    ]);

    if b.kernel == "vmlinuz" {
        // The decompressor (entered at the bzImage's 64-bit entry) read
        // our command line from the zero page, and printed on the serial
        // port that earlyprintk=serial names.
        vm.expect_line("the decompressor's KASLR line", EARLY_CONSOLE, |l| {
            l.contains(DECOMPRESSOR_LINE)
        });
        let t = start.elapsed().as_secs_f64();
        if !full {
            // Decompressing 50 MB would take many minutes of interpreted
            // code: this is as far as a PVM host gets in a test.
            vm.kill();
            eprintln!(
                "{what}: checked the decompressor's early console only (PVM host): \
                 \"{DECOMPRESSOR_LINE}\" after {t:.1} s"
            );
            return;
        }
    }

    let banner = vm.expect_line("the Linux version banner", EARLY_CONSOLE, |l| {
        l.contains("Linux version ")
    });
    assert!(
        banner.contains(&format!("Linux version {release} ")),
        "the banner is not that of {release}: {banner}"
    );
    let echoed = vm.expect_line("the command line", EARLY_CONSOLE, |l| {
        l.contains("Command line: ")
    });
    assert_eq!(
        echoed.split("Command line: ").nth(1),
        Some(CMDLINE),
        "the kernel did not get the command line we passed: {echoed}"
    );

    // The map follows "BIOS-provided physical RAM map:", a line a range.
    let first = vm.expect_line("the e820 map", EARLY_CONSOLE, |l| l.contains("BIOS-e820: "));
    let mut map = vec![parse_e820(&first).unwrap_or_else(|| panic!("bad e820 line {first}"))];
    loop {
        let line = vm.expect_line("the end of the e820 map", EARLY_CONSOLE, |_| true);
        if !line.contains("BIOS-e820: ") {
            break;
        }
        map.push(parse_e820(&line).unwrap_or_else(|| panic!("bad e820 line {line}")));
    }
    let to_e820 = start.elapsed().as_secs_f64();
    assert_eq!(
        map,
        expected_e820(b.mem_mib),
        "the kernel's e820 map does not match --mem {}",
        b.mem_mib
    );
    let usable: u64 = map
        .iter()
        .filter(|e| e.kind == "usable")
        .map(|e| e.last - e.first + 1)
        .sum();
    // All the memory given but the EBDA and BIOS area below 1 MiB.
    assert_eq!(usable, (b.mem_mib << 20) - (0x10_0000 - 0x9_fc00));

    // A little later (about 3 s of interpreted code) the kernel reserves
    // the initrd it was given (zero page, or PVH module list): all of it,
    // in usable RAM.
    let line = vm.expect_line("the RAMDISK line", EARLY_CONSOLE, |l| {
        l.contains("RAMDISK: [mem ")
    });
    let (rd_first, rd_last, _) =
        parse_mem_range(&line, "RAMDISK: ").unwrap_or_else(|| panic!("bad RAMDISK line {line}"));
    let initrd_size = std::fs::metadata(&initrd).unwrap().len();
    assert_eq!(
        rd_last - rd_first + 1,
        initrd_size.next_multiple_of(4096),
        "the kernel did not get the whole initrd: {line}"
    );
    assert!(
        map.iter()
            .any(|e| e.kind == "usable" && e.first <= rd_first && rd_last <= e.last),
        "the initrd is not in usable RAM: {line}"
    );
    let to_initrd = start.elapsed().as_secs_f64();

    // Right after, the ACPI tables: the RSDP where vmplant put it (the
    // boot protocol gives its address), then each table the XSDT and FADT
    // lead to, all in the BIOS area.
    let rsdp = vm.expect_line("the ACPI RSDP line", EARLY_CONSOLE, |l| {
        l.contains("ACPI: RSDP ")
    });
    assert_eq!(
        parse_acpi_table(&rsdp).map(|(_, addr)| addr),
        Some(ACPI_TABLES.start),
        "the kernel did not find the RSDP where vmplant put it: {rsdp}"
    );
    assert!(rsdp.contains("VMPLNT"), "not vmplant's RSDP: {rsdp}");
    let mut tables = Vec::new();
    loop {
        let line = vm.expect_line("the ACPI table lines", EARLY_CONSOLE, |_| true);
        let Some((sig, addr)) = parse_acpi_table(&line) else {
            break;
        };
        assert!(
            ACPI_TABLES.contains(&addr),
            "an ACPI table outside vmplant's area: {line}"
        );
        tables.push(sig);
    }
    tables.sort();
    assert_eq!(
        tables,
        ["APIC", "DSDT", "FACP", "XSDT"],
        "the ACPI tables found"
    );
    let to_acpi = start.elapsed().as_secs_f64();
    let mut cpus = String::new();
    if b.cpus_from_madt || full {
        // Later (about 8 s of interpreted code with 256 MiB) the kernel
        // takes its CPUs from the MADT: all of them, none for hotplug.
        vm.expect_line("the kernel's use of the MADT", EARLY_CONSOLE, |l| {
            l.contains("ACPI: Using ACPI (MADT) for SMP configuration information")
        });
        let line = vm.expect_line("the smpboot CPU count", EARLY_CONSOLE, |l| {
            l.contains("smpboot: Allowing ")
        });
        assert_eq!(
            parse_allowed_cpus(&line),
            Some((u32::from(b.vcpus), 0)),
            "the kernel did not find --vcpus {} CPUs: {line}",
            b.vcpus
        );
        cpus = format!(
            ", {} CPUs from the MADT after {:.1} s",
            b.vcpus,
            start.elapsed().as_secs_f64()
        );
    }

    if !full {
        vm.kill();
        eprintln!(
            "{what}: checked early console only (PVM host): banner, command line, \
             e820 map after {to_e820:.1} s, initrd after {to_initrd:.1} s, \
             ACPI tables after {to_acpi:.1} s{cpus}"
        );
        return;
    }
    // Needs hardware virtualization, see ENVIRONMENT.md: the rest of the
    // kernel's boot, the initramfs, and a reboot through the i8042.
    vm.expect_line("the initramfs shell", FULL_BOOT, |l| {
        l.contains("vmplant-initramfs: shell ready")
    });
    let done = vm.wait(FULL_BOOT);
    assert!(
        done.status.success(),
        "the guest's reboot did not end the VM cleanly: {:?}\n{}",
        done.status,
        done.stderr
    );
    eprintln!(
        "{what}: checked the full boot to the initramfs shell (hardware virtualization): \
         e820 after {to_e820:.1} s, shell and reboot after {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn linux_vmlinux_boots_through_the_pvh_entry_with_256_mib() {
    boot_linux(&Boot {
        kernel: "vmlinux",
        entry: "pvh",
        mem_mib: 256,
        vcpus: 2,
        cpus_from_madt: true,
    });
}

/// 3.5 GiB: the last 512 MiB lie above 4 GiB, past the MMIO gap.
#[test]
fn linux_vmlinux_boots_through_the_64bit_entry_with_ram_above_4_gib() {
    boot_linux(&Boot {
        kernel: "vmlinux",
        entry: "linux64",
        mem_mib: 3584,
        vcpus: 2,
        cpus_from_madt: false,
    });
}

#[test]
fn linux_bzimage_decompressor_starts() {
    boot_linux(&Boot {
        kernel: "vmlinuz",
        entry: "linux64",
        mem_mib: 256,
        vcpus: 1,
        cpus_from_madt: false,
    });
}

#[test]
fn parsers_read_linux_lines() {
    assert_eq!(
        parse_e820("[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        Some(E820 {
            first: 0x10_0000,
            last: 0xfff_ffff,
            kind: "usable".into()
        })
    );
    assert_eq!(parse_e820("Command line: x"), None);
    assert_eq!(
        parse_mem_range(
            "[    3.44] RAMDISK: [mem 0x0ff04000-0x0fffffff]",
            "RAMDISK: "
        ),
        Some((0xff0_4000, 0xfff_ffff, ""))
    );
    assert_eq!(
        parse_acpi_table("[    1.29] ACPI: RSDP 0x00000000000E0000 000024 (v02 VMPLNT)"),
        Some(("RSDP".into(), 0xe_0000))
    );
    assert_eq!(
        parse_acpi_table(
            "[    1.36] ACPI: APIC 0x00000000000E01C0 00004E (v05 VMPLNT VMPLMADT 00000001 RVAT 01000000)"
        ),
        Some(("APIC".into(), 0xe_01c0))
    );
    assert_eq!(
        parse_acpi_table("[    1.39] ACPI: Reserving FACP table memory at [mem 0xe00a0-0xe01b3]"),
        None
    );
    assert_eq!(
        parse_allowed_cpus("[    9.40] smpboot: Allowing 2 CPUs, 0 hotplug CPUs"),
        Some((2, 0))
    );
}

#[test]
fn expected_e820_splits_memory_around_the_mmio_gap() {
    let e = expected_e820(3584);
    assert_eq!(e.len(), 4);
    assert_eq!((e[2].first, e[2].last), (0x10_0000, 0xbfff_ffff));
    assert_eq!((e[3].first, e[3].last), (0x1_0000_0000, 0x1_1fff_ffff));
    assert_eq!(expected_e820(256).len(), 3);
}
