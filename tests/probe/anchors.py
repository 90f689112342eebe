#!/usr/bin/env python3
"""Boot the probe in the anchor VMMs (Firecracker, Cloud Hypervisor, QEMU
microvm) for side-by-side checks and measurements.

  anchors.py run fc|ch|qemu [--vcpus N] [--timeout S] [--elf PATH] CMDLINE
      boots once, prints the guest's serial output and the exit status
  anchors.py boot-time [--runs N] [--elf PATH] [--vmm fc,ch,qemu]
      process start -> first '"probe":"ready"' on the serial port, taking
      the VMMs in turn, N runs each; prints medians and all runs (ms)

Firecracker and Cloud Hypervisor come from /work/shared/anchors (override
with $ANCHORS); QEMU is qemu-system-x86_64 from PATH.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ANCHORS = os.environ.get("ANCHORS", "/work/shared/anchors")
DEFAULT_ELF = os.path.join(ROOT, "target", "probe", "probe.elf")


def command(vmm, elf, vcpus, cmdline, tmp):
    if vmm == "fc":
        cfg = os.path.join(tmp, "fc.json")
        with open(cfg, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": elf, "boot_args": cmdline},
                       "machine-config": {"vcpu_count": vcpus, "mem_size_mib": 128},
                       "drives": []}, f)
        return [os.path.join(ANCHORS, "firecracker"), "--no-api", "--no-seccomp",
                "--level", "Error", "--config-file", cfg]
    if vmm == "ch":
        return [os.path.join(ANCHORS, "cloud-hypervisor"), "--kernel", elf, "--cmdline", cmdline,
                "--memory", "size=128M", "--cpus", f"boot={vcpus}", "--serial", "tty",
                "--console", "off"]
    if vmm == "qemu":
        return ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu",
                "host,-arch-capabilities", "-smp", str(vcpus), "-m", "128M", "-kernel", elf,
                "-append", cmdline, "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"]
    raise SystemExit(f"unknown VMM {vmm}")


def run(args):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(args.vmm, args.elf, args.vcpus, args.cmdline, tmp)
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=args.timeout)
            print(f"exit status {p.returncode}")
        except subprocess.TimeoutExpired:
            print(f"still running after {args.timeout} s (killed)")


def time_to_ready(cmd, limit=10.0):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    buf, took = b"", None
    try:
        while time.monotonic() - t0 < limit:
            chunk = p.stdout.read1(4096)
            if not chunk:
                break
            buf += chunk
            if b'"probe":"ready"' in buf:
                took = time.monotonic() - t0
                break
    finally:
        p.kill()
        p.wait()
    return took


def boot_time(args):
    vmms = args.vmm.split(",")
    results = {v: [] for v in vmms}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for v in vmms:
                results[v].append(time_to_ready(command(v, args.elf, 1, "console=ttyS0 probe=ready", tmp)))
    for v, runs in results.items():
        ok = [r * 1000 for r in runs if r is not None]
        med = f"{statistics.median(ok):.1f}" if ok else "-"
        print(f"{v}: median {med} ms, min {min(ok, default=0):.1f} ms, "
              f"failures {len(runs) - len(ok)}, runs {[round(r, 1) for r in ok]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("vmm", choices=["fc", "ch", "qemu"])
    r.add_argument("cmdline")
    r.add_argument("--vcpus", type=int, default=1)
    r.add_argument("--timeout", type=float, default=10)
    r.add_argument("--elf", default=DEFAULT_ELF)
    b = sub.add_parser("boot-time")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--vmm", default="fc,ch,qemu")
    b.add_argument("--elf", default=DEFAULT_ELF)
    args = ap.parse_args()
    args.elf = os.path.abspath(args.elf)
    if not os.path.exists(args.elf):
        sys.exit(f"{args.elf} missing: run tests/probe/build.sh")
    {"run": run, "boot-time": boot_time}[args.what](args)


if __name__ == "__main__":
    main()
