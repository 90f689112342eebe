#!/usr/bin/env bash
# Fetches Debian's current cloud kernel and prepares what the Linux boot
# test (tests/tests/linux.rs) boots, in images/cache/linux/:
#
#   vmlinuz              the package's bzImage (its payload is LZ4)
#   vmlinux              the uncompressed ELF kernel, extracted from vmlinuz
#   VERSION              line 1: the kernel release (as in `Linux version`),
#                        line 2: the Debian package and its version
#   initramfs.cpio.gz    busybox-static and an /init that mounts proc, sys
#                        and dev, prints "vmplant-initramfs: shell ready"
#                        and runs a shell on the console, or reboots when
#                        the command line has vmplant.exit (booted to the end
#                        only on hosts with hardware virtualization, see
#                        /work/shared/ENVIRONMENT.md)
#
# The kernel is the one the metapackage linux-image-cloud-amd64 depends on
# (linux-image-<release>-cloud-amd64), in its -unsigned flavour. Packages
# come from the configured apt sources with `apt-get download`; nothing is
# installed. Needs: apt-get, dpkg-deb, tar, lz4 (Debian package lz4), gzip.
# Idempotent: what is already in the cache is kept (delete
# images/cache/linux to fetch the then-current kernel again).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache/linux"
work="$cache/.work"
log() { echo "fetch-linux: $*"; }
die() {
    echo "fetch-linux: error: $*" >&2
    exit 1
}

for tool in apt-get apt-cache dpkg-deb tar lz4 gzip; do
    command -v "$tool" >/dev/null || die "$tool is missing (lz4: apt-get install lz4; the others come with any Debian host)"
done

mkdir -p "$cache"

# apt-get download as root drops to the _apt user, which cannot write to
# most directories; download as root instead (we only unpack, never run,
# what we fetch).
apt_download() {
    (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$@") \
        || die "apt-get download $* failed (are the apt sources reachable?)"
}

# Makes sure apt knows package $1, running `apt-get update` once if not.
apt_knows() {
    apt-cache show --no-all-versions "$1" >/dev/null 2>&1 && return 0
    if [[ -z "${updated:-}" ]]; then
        log "apt does not know $1: running apt-get update"
        apt-get update -qq || die "apt-get update failed (it needs root and the network to the Debian mirror)"
        updated=1
    fi
    apt-cache show --no-all-versions "$1" >/dev/null 2>&1
}

is_elf() { [[ "$(head -c4 "$1" | od -An -tx1 | tr -d ' \n')" == "7f454c46" ]]; }

# Writes the ELF inside bzImage $1 to $2: try each LZ4 legacy-frame magic
# (02 21 4c 18) in turn, as Linux's scripts/extract-vmlinux does, and keep
# the first one that decompresses to an ELF.
extract_vmlinux() {
    local img="$1" out="$2" pos
    for pos in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$img" | cut -d: -f1); do
        # lz4 complains about the bytes after the frame (the rest of the
        # bzImage); what it wrote before that is the whole kernel.
        tail -c "+$((pos + 1))" "$img" | lz4 -dc >"$out" 2>/dev/null || true
        if [[ -s "$out" ]] && is_elf "$out"; then
            log "decompressed the LZ4 payload at offset $pos of $(basename "$img")"
            return 0
        fi
    done
    rm -f "$out"
    return 1
}

fetch_kernel() {
    if [[ -s "$cache/vmlinux" && -s "$cache/vmlinuz" && -s "$cache/VERSION" ]] && is_elf "$cache/vmlinux"; then
        log "kernel cached: $(head -1 "$cache/VERSION") in $cache (delete it to refetch)"
        return
    fi
    rm -rf "$work" && mkdir -p "$work"

    apt_knows linux-image-cloud-amd64 \
        || die "apt does not know linux-image-cloud-amd64 even after apt-get update (is this Debian with main in sources.list?)"
    local image pkg version release
    image="$(apt-cache depends linux-image-cloud-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')"
    [[ -n "$image" ]] || die "cannot resolve linux-image-cloud-amd64 to a kernel package"
    pkg="$image-unsigned"
    apt_knows "$pkg" || die "$image has no $pkg package"
    version="$(apt-cache show --no-all-versions "$pkg" | awk '$1 == "Version:" {print $2; exit}')"
    release="${image#linux-image-}"
    log "downloading $pkg $version"
    apt_download "$pkg"

    local deb
    deb="$(ls "$work"/"$pkg"_*.deb)"
    # Only boot/ is needed: the package's modules are most of its size.
    mkdir -p "$work/root"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/root" --wildcards './boot/vmlinuz-*' \
        || die "cannot unpack boot/vmlinuz-* from $deb"
    [[ -s "$work/root/boot/vmlinuz-$release" ]] || die "$deb has no boot/vmlinuz-$release"
    cp "$work/root/boot/vmlinuz-$release" "$work/vmlinuz"
    extract_vmlinux "$work/vmlinuz" "$work/vmlinux" \
        || die "no LZ4 payload in boot/vmlinuz-$release decompresses to an ELF (is lz4 from Debian's lz4 package?)"

    # VERSION last: it marks a complete cache.
    mv "$work/vmlinuz" "$work/vmlinux" "$cache/"
    printf '%s\n%s %s\n' "$release" "$pkg" "$version" >"$cache/VERSION"
    rm -rf "$work"
    log "kernel $release ($pkg $version): $cache/vmlinux ($(du -h "$cache/vmlinux" | cut -f1)), $cache/vmlinuz"
}

# The initramfs's /init.
init_script() {
    cat <<'EOF'
#!/bin/sh
# vmplant test initramfs (images/fetch-linux.sh).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vmplant-initramfs: shell ready ($(uname -r))"
# With vmplant.exit on the kernel command line, end the VM instead of
# giving a shell (for tests that cannot type): reboot, which with reboot=k
# goes through the i8042, and vmplant ends the VM when the guest resets.
if grep -qw vmplant.exit /proc/cmdline; then
    echo "vmplant-initramfs: rebooting (vmplant.exit)"
    reboot -f
fi
exec setsid cttyhack sh
EOF
}

build_initramfs() {
    local out="$cache/initramfs.cpio.gz" stamp="$cache/initramfs.init"
    # Cached only if it was built with this script's /init.
    if [[ -s "$out" && -f "$stamp" ]] && init_script | cmp -s - "$stamp"; then
        log "initramfs cached: $out"
        return
    fi
    rm -rf "$work" && mkdir -p "$work"
    apt_knows busybox-static || die "apt does not know busybox-static"
    log "downloading busybox-static"
    apt_download busybox-static
    dpkg-deb -x "$(ls "$work"/busybox-static_*.deb)" "$work/pkg" || die "dpkg-deb cannot unpack busybox-static"
    local busybox="$work/pkg/bin/busybox"
    [[ -x "$busybox" ]] || die "busybox-static has no bin/busybox"

    local root="$work/root"
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,root}
    cp "$busybox" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    # The kernel's built-in initramfs provides /dev/console (its default
    # cpio list) before this one is unpacked, so no device nodes are needed
    # here, and the cloud kernel has the 8250 serial driver built in: the
    # shell needs no modules.
    init_script >"$root/init"
    chmod 755 "$root/init"
    # busybox's own cpio writes the newc archive, so no cpio package is
    # needed.
    (cd "$root" && find . | sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$work/initramfs.cpio.gz"
    mv "$work/initramfs.cpio.gz" "$out"
    init_script >"$stamp"
    log "initramfs: $out ($(du -h "$out" | cut -f1)), $("$busybox" | head -1 | cut -d' ' -f1-2)"
    rm -rf "$work"
}

fetch_kernel
build_initramfs
