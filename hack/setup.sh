#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian/Ubuntu machine (as root), and
# builds the Kubernetes control plane once (cached in $NIXPOOL_CACHE, default /var/cache/nixpool).
# Idempotent: a second run installs nothing and builds nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

packages=(
  etcd-server openssl util-linux ca-certificates   # the test control plane
  nix-bin openssh-server openssh-client busybox-static iproute2   # real builders: nix, sshd, namespaces
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root (sudo $0) to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  # Installing openssh-server or nix-bin must not start system services in a container.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
"$here/build-control-plane.sh" >/dev/null
