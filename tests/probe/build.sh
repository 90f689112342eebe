#!/bin/sh
# Builds the probe test guest and copies it to <repo>/target/probe/probe.elf.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$here"
if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
    rustup target add x86_64-unknown-none
fi
cargo build --release --target x86_64-unknown-none
mkdir -p "$root/target/probe"
cp target/x86_64-unknown-none/release/probe "$root/target/probe/probe.elf"
size=$(wc -c < "$root/target/probe/probe.elf")
echo "probe: $root/target/probe/probe.elf ($size bytes)"
