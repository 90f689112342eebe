#!/usr/bin/env python3
"""Linux peer for the probe's TCP steps (see README, "Network steps").

  netpeer.py recv PORT [SECONDS]        accept one connection, read to EOF
  netpeer.py send HOST PORT BYTES       send BYTES of the pattern, close
  netpeer.py echo HOST PORT BYTES       send BYTES to an echo server, check them

The pattern is byte i = i % 251; checksums are CRC-32 (zlib), as the probe
prints them. Each mode prints one JSON line.
"""
import json
import socket
import sys
import threading
import time
import zlib

PERIOD = bytes(range(251))


def pattern(offset, n):
    start = offset % 251
    reps = (start + n) // 251 + 1
    return (PERIOD * reps)[start:start + n]


def recv(port, seconds=60):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(seconds)
    conn, peer = srv.accept()
    conn.settimeout(seconds)
    crc, got, ok, t0 = 0, 0, True, None
    while True:
        data = conn.recv(1 << 20)
        if t0 is None:
            t0 = time.monotonic()
        if not data:
            break
        ok = ok and data == pattern(got, len(data))
        crc = zlib.crc32(data, crc)
        got += len(data)
    ns = int((time.monotonic() - t0) * 1e9)
    print(json.dumps({"peer": "recv", "from": "%s:%d" % peer, "bytes": got, "ns": ns,
                      "mbit_s": round(got * 8e3 / max(ns, 1), 1), "crc32": "%08x" % crc,
                      "pattern_ok": ok}))


def send(host, port, nbytes):
    conn = socket.create_connection((host, port), timeout=10)
    t0 = time.monotonic()
    sent, crc = 0, 0
    while sent < nbytes:
        chunk = pattern(sent, min(1 << 16, nbytes - sent))
        conn.sendall(chunk)
        crc = zlib.crc32(chunk, crc)
        sent += len(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(30)
    conn.recv(1)  # wait for the probe's FIN
    ns = int((time.monotonic() - t0) * 1e9)
    print(json.dumps({"peer": "send", "bytes": sent, "ns": ns,
                      "mbit_s": round(sent * 8e3 / max(ns, 1), 1), "crc32": "%08x" % crc}))


def echo(host, port, nbytes):
    conn = socket.create_connection((host, port), timeout=10)
    t0 = time.monotonic()
    data = pattern(0, nbytes)
    # Send from a thread while reading: an echo client that sends all
    # before reading deadlocks once both directions' buffers are full.
    sender = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
    sender.start()
    back = bytearray()
    conn.settimeout(30)
    while len(back) < nbytes:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        back += chunk
    sender.join(5)
    conn.close()
    ns = int((time.monotonic() - t0) * 1e9)
    print(json.dumps({"peer": "echo", "sent": nbytes, "received": len(back),
                      "intact": back == data, "ns": ns}))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "recv":
        recv(int(args[0]), *(float(a) for a in args[1:]))
    elif mode == "send":
        send(args[0], int(args[1]), int(args[2]))
    elif mode == "echo":
        echo(args[0], int(args[1]), int(args[2]))
    else:
        sys.exit(__doc__)
