#!/bin/bash
# Two `vmplant vnet` processes, each with a TAP in its own network
# namespace, joined by a udp, tcp or tls tunnel: ping and iperf3 across.
# Usage: two-processes.sh VMPLANT_BINARY [udp|tcp|tls]... (root; needs
# ip, ping, iperf3, openssl for tls). Cleans up on exit.
set -euo pipefail
export RUST_LOG=${RUST_LOG:-info}
BIN=${1:?usage: $0 VMPLANT [udp|tcp|tls]...}; shift
PROTOS=${*:-udp tcp tls}
ID=$$
NA=vpa$ID NB=vpb$ID TA=vpa$ID TB=vpb$ID
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  [ -f "$DIR/iperf.pid" ] && kill "$(cat "$DIR/iperf.pid")" 2>/dev/null || true
  ip netns del "$NA" 2>/dev/null || true
  ip netns del "$NB" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

certs() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=vnet-ca -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
  for n in a b; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=vnet \
      -keyout "$DIR/$n.key" -out "$DIR/$n.csr" 2>/dev/null
    openssl x509 -req -in "$DIR/$n.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -days 1 \
      -extfile <(printf "subjectAltName=IP:127.0.0.1,DNS:vnet\nbasicConstraints=CA:FALSE") \
      -out "$DIR/$n.pem" 2>/dev/null
  done
}

netns() { # NS TAP ADDR
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip link set "$2" netns "$1"
  ip -n "$1" addr add "$3" dev "$2"
  ip -n "$1" link set "$2" up
}

wait_tap() { for _ in $(seq 100); do ip link show "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }

port=47000
for proto in $PROTOS; do
  port=$((port + 1))
  tls=()
  if [ "$proto" = tls ]; then certs; fi
  [ "$proto" = tls ] && tls=(--tls-cert "$DIR/b.pem" --tls-key "$DIR/b.key" --tls-ca "$DIR/ca.pem")
  "$BIN" vnet --tap "$TB" --listen "$proto:127.0.0.1:$port" "${tls[@]}" 2>"$DIR/b.log" & PIDS+=($!)
  [ "$proto" = tls ] && tls=(--tls-cert "$DIR/a.pem" --tls-key "$DIR/a.key" --tls-ca "$DIR/ca.pem")
  "$BIN" vnet --tap "$TA" --connect "$proto:127.0.0.1:$port" "${tls[@]}" 2>"$DIR/a.log" & PIDS+=($!)
  wait_tap "$TA"; wait_tap "$TB"
  netns "$NA" "$TA" 10.99.40.1/24
  netns "$NB" "$TB" 10.99.40.2/24
  for _ in $(seq 50); do grep -q "tunnel up" "$DIR/a.log" && break; sleep 0.1; done
  rtt=$(ip netns exec "$NA" ping -c 5 -i 0.2 -W 2 10.99.40.2 | awk -F/ '/min\/avg/ {print $5}')
  ip netns exec "$NB" iperf3 -s -D -1 -I "$DIR/iperf.pid"; sleep 0.3
  mbps=$(ip netns exec "$NA" timeout 20 iperf3 -c 10.99.40.2 -t 2 -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
  echo "{\"test\":\"two_processes\",\"proto\":\"$proto\",\"rtt_ms\":$rtt,\"tcp_mbps\":$mbps}"
  # Clean shutdown on SIGTERM: both exit 0 and delete their TAPs.
  for p in "${PIDS[@]}"; do kill -TERM "$p"; done
  for p in "${PIDS[@]}"; do wait "$p" || { echo "exit status $? from $p" >&2; exit 1; }; done
  PIDS=()
  grep -h "tunnel" "$DIR/a.log" | head -3 >&2
  ip netns del "$NA"; ip netns del "$NB"
done
