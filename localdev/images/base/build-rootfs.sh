#!/usr/bin/env bash
# Stand-in for python:3.11-slim-bookworm built from Debian packages, for machines where no
# registry is reachable: debootstrap bookworm minbase + python3 (3.11), tarred for `podman import`.
# Usage: build-rootfs.sh <rootfs dir> <output tarball> [debian mirror]
set -euo pipefail
rootfs=$1
tarball=$2
mirror=${3:-http://deb.debian.org/debian}

cleanup() {
    # debootstrap mounts these while configuring packages; never leave them behind.
    for m in proc sys dev/pts dev; do
        mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m" || true
    done
}
trap cleanup EXIT

debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,ca-certificates,netbase,tzdata \
    bookworm "$rootfs" "$mirror"
cleanup

# Like the official image: `python` and `pip` on PATH, pip may install into the system Python.
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED

cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES

# Slim: no package lists, caches, documentation or man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/tmp/* "$rootfs"/root/.cache
find "$rootfs"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +

tar --numeric-owner -C "$rootfs" -cf "$tarball" .
