#!/usr/bin/env python3
"""Two probes on one Ethernet segment, for checking a virtio-net device.

  netpair.py qemu|vmplant [--timeout S] [--vmplant PATH] [--elf PATH] STEPS_A STEPS_B

A gets `net:10.0.0.1/24` and MAC 52:54:00:00:00:0a, B `net:10.0.0.2/24`
and 52:54:00:00:00:0b, each followed by its STEPS (`+`-separated probe
steps). qemu: two QEMU microvm processes joined by a socket netdev (A
listens on 127.0.0.1:14567); vmplant: one `vmplant run --config` with both
VMs on its switch. Prints each probe's JSON lines prefixed with A/B, then
vmplant's stderr warnings; exits 1 if a line has "error" or a probe did
not print "done".

Example: netpair.py vmplant "tcp-bulk-recv:5001:40" \\
             "serve:1+tcp-bulk-send:10.0.0.1:5001:100000000"
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_ELF = os.path.join(ROOT, "target", "probe", "probe.elf")
PEERS = (("A", "10.0.0.1/24", "52:54:00:00:00:0a"), ("B", "10.0.0.2/24", "52:54:00:00:00:0b"))


def qemu(args, steps, tmp):
    base = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm",
            "-cpu", "host,-arch-capabilities", "-m", "64", "-kernel", args.elf,
            "-nographic", "-no-reboot"]
    procs, logs = [], []
    for (name, ip, mac), s, how in zip(PEERS, steps, ("listen", "connect")):
        log = os.path.join(tmp, name + ".log")
        cmd = base + ["-append", f"console=ttyS0 probe=net:{ip}+{s}",
                      "-netdev", f"socket,id=n0,{how}=127.0.0.1:14567",
                      "-device", f"virtio-net-device,netdev=n0,mac={mac}"]
        procs.append(subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT))
        logs.append(log)
        time.sleep(0.5)
    return procs, logs, None


def vmplant(args, steps, tmp):
    vms, logs = [], []
    for (name, ip, mac), s in zip(PEERS, steps):
        log = os.path.join(tmp, name + ".log")
        vms.append({"name": name, "kernel": args.elf, "mem_mib": 64, "nets": [mac],
                    "cmdline": f"console=ttyS0 probe=net:{ip}+{s}", "serial_file": log})
        logs.append(log)
    cfg = os.path.join(tmp, "vms.json")
    with open(cfg, "w") as f:
        json.dump({"vms": vms}, f)
    err = os.path.join(tmp, "stderr.log")
    proc = subprocess.Popen([args.vmplant, "run", "--config", cfg],
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                            env=dict(os.environ, NO_COLOR="1"))
    return [proc], logs, err


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vmm", choices=["qemu", "vmplant"])
    p.add_argument("steps_a")
    p.add_argument("steps_b")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--elf", default=DEFAULT_ELF)
    p.add_argument("--vmplant", default=os.path.join(ROOT, "target", "debug", "vmplant"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs, err = (qemu if args.vmm == "qemu" else vmplant)(args, (args.steps_a, args.steps_b), tmp)
        done = [False, False]
        end = time.monotonic() + args.timeout
        while time.monotonic() < end and not all(done):
            time.sleep(0.2)
            for i, log in enumerate(logs):
                done[i] = os.path.exists(log) and '"probe":"done"' in open(log, errors="replace").read()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        bad = not all(done)
        for (name, _, _), log in zip(PEERS, logs):
            for line in open(log, errors="replace") if os.path.exists(log) else []:
                if '"probe"' in line:
                    print(name, line.strip()[line.find("{"):] if "{" in line else line.strip())
                    bad |= '"error"' in line
        if err:
            for line in open(err, errors="replace"):
                if "WARN" in line or "ERROR" in line:
                    print("vmplant:", line.strip())
        if not all(done):
            print("timeout: done from", [n for (n, _, _), d in zip(PEERS, done) if d])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
