#!/usr/bin/env bash
# Builds Kubernetes from Debian bookworm's `kubernetes` source package (upstream 1.20.2, dependencies
# vendored) so the test suite and the demo run a real control plane (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl) and a real node (kubelet, kube-proxy, and the
# static `pause` binary of the pod sandbox image) on this machine. The binaries are cached outside
# the clone, keyed by the package version, so only the first run on a machine pays the ~10 minute
# build.
#
# Usage: hack/build-control-plane.sh            prints the directory holding the binaries
# Env:   NIXPOOL_CACHE (default /var/cache/nixpool)
set -euo pipefail

version="1.20.5+really1.20.2-1.1+deb12u1"
cache="${NIXPOOL_CACHE:-/var/cache/nixpool}"
out="$cache/kube-$version"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy pause)

have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

if [ "$(id -u)" != 0 ]; then
  echo "build-control-plane: needs root to apt-get the build dependencies (run as root or with sudo)" >&2
  exit 1
fi

log() { echo "build-control-plane: $*" >&2; }

# A deb-src line for bookworm main, in its own file so the user's sources are untouched.
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  cat >/etc/apt/sources.list.d/nixpool-deb-src.sources <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq >&2
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-1.19-go rsync jq dpkg-dev gcc libc6-dev \
  golang-github-modern-go-reflect2-dev >&2

work="$cache/kube-src-$version"
rm -rf "$work"; mkdir -p "$work"; cd "$work"
log "fetching the kubernetes source package $version"
apt-get source --download-only "kubernetes=$version" >&2
dpkg-source -x --skip-patches kubernetes_*.dsc src >&2 || dpkg-source -x kubernetes_*.dsc src >&2
cd src

# reflect2 1.0.1 (vendored) crashes under Go >= 1.18 on the first custom-object write; 1.0.2 is fixed.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
sed -i 's#^\(\s*github.com/modern-go/reflect2\) v1.0.1#\1 v1.0.2#' go.mod vendor/modules.txt || true

export PATH=/usr/lib/go-1.19/bin:$PATH GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on
export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean
log "building ${bins[*]} (about 10 minutes on 2 cores)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl cmd/kubelet cmd/kube-proxy" >&2
mkdir -p _output/local/bin/linux/amd64
# The pod sandbox's process: the same source tree's pause.c, static so the image needs nothing else.
gcc -Os -static -DVERSION=v1.20.2-nixpool -o _output/local/bin/linux/amd64/pause build/pause/linux/pause.c >&2

mkdir -p "$out.tmp"
for b in "${bins[@]}"; do cp "_output/local/bin/linux/amd64/$b" "$out.tmp/$b"; done
rm -rf "$out"; mv "$out.tmp" "$out"
cd /; rm -rf "$work"
log "done: $out"
echo "$out"
