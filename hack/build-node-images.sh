#!/usr/bin/env bash
# Builds the root file system of the builder test image once per machine: Debian trixie's Nix
# (2.26), OpenSSH server, static busybox and CA certificates, made with mmdebstrap into a tar that
# becomes the image's base layer. The tests add a second layer with this checkout's
# `nixpool-agent` (built on the host; bookworm binaries run on trixie) and import both, with a pause
# image made from the control-plane build's static `pause`, into the test node's containerd.
# Cached outside the clone, keyed by the suite and the package list below.
#
# Usage: hack/build-node-images.sh          prints the directory holding builder-rootfs.tar and
#                                           builder-rootfs.tar.sha256
# Env:   NIXPOOL_CACHE (default /var/cache/nixpool)
set -euo pipefail

suite=trixie
packages=nix-bin,openssh-server,busybox-static,ca-certificates
key=$(printf '%s %s v1' "$suite" "$packages" | sha256sum | cut -c1-12)
cache="${NIXPOOL_CACHE:-/var/cache/nixpool}"
out="$cache/builder-image-$suite-$key"

if [ -s "$out/builder-rootfs.tar" ] && [ -s "$out/builder-rootfs.tar.sha256" ]; then echo "$out"; exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "build-node-images: needs root to run mmdebstrap (run as root or with sudo)" >&2
  exit 1
fi
command -v mmdebstrap >/dev/null || { echo "build-node-images: apt-get install mmdebstrap" >&2; exit 1; }
# The host's own mirror; never the host's apt: trixie packages must not reach the host.
mirror=$(grep -hoE '^URIs: *http[^ ]*/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
mirror=${mirror:-http://deb.debian.org/debian}

echo "build-node-images: mmdebstrap $suite ($packages) from $mirror, about 2 minutes" >&2
mkdir -p "$out.tmp"
# The mirror's snapshot is dated: accept its Release file.
mmdebstrap --variant=essential --include="$packages" \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='mkdir -p "$1/nix/store" "$1/nix/var/nix" "$1/run/sshd" "$1/var/empty"' \
  --customize-hook='rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/*' \
  "$suite" "$out.tmp/builder-rootfs.tar" "$mirror" >&2
# The layer's digest (the image config's diff_id), computed once.
sha256sum "$out.tmp/builder-rootfs.tar" | cut -d' ' -f1 >"$out.tmp/builder-rootfs.tar.sha256"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "build-node-images: done: $out" >&2
echo "$out"
