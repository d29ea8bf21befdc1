#!/usr/bin/env bash
# Builds Kubernetes 1.36's standalone CRD engine, `k8s.io/apiextensions-apiserver`, from Debian sid's
# `golang-k8s-apiextensions-apiserver-dev` package so the CRD test can install our CRD into the same
# code that a 1.36 kube-apiserver uses to accept CRDs (structural schema, CEL cost budget, patterns)
# and post custom resources to it. The test control plane (hack/build-control-plane.sh) is 1.20,
# which ignores CEL altogether.
#
# The build runs in a throwaway sid root made by mmdebstrap: sid's Go 1.27 and libc never touch the
# host (installing sid packages on bookworm upgrades libc6 and breaks the machine). The sources are
# Debian's unpacked Go packages, so the build is GOPATH mode against /usr/share/gocode, no network.
# The result is one static binary, cached outside the clone and keyed by the package version, so
# only the first run on a machine pays the ~3 minute build.
#
# Usage: hack/build-apiextensions-apiserver.sh   prints the directory holding the binary
# Env:   NIXPOOL_CACHE (default /var/cache/nixpool)
set -euo pipefail

version="0.36.4-1"   # golang-k8s-apiextensions-apiserver-dev in sid (Kubernetes 1.36)
go_pkg="golang-1.27-go"
cache="${NIXPOOL_CACHE:-/var/cache/nixpool}"
out="$cache/apiextensions-apiserver-$version"
bin="$out/apiextensions-apiserver"

if [ -x "$bin" ]; then echo "$out"; exit 0; fi

if [ "$(id -u)" != 0 ]; then
  echo "build-apiextensions-apiserver: needs root for mmdebstrap's chroot (run as root or with sudo)" >&2
  exit 1
fi

log() { echo "build-apiextensions-apiserver: $*" >&2; }

# mmdebstrap itself comes from bookworm (the host's own release); nothing from sid is installed here.
if ! command -v mmdebstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >&2
fi

# The mirror the host's apt already uses (deb822 URIs: or one-line deb), else deb.debian.org.
mirror=$(grep -rhsoE '^URIs:[[:space:]]*https?://[^[:space:]]*/debian/?$' /etc/apt/sources.list.d/ \
  | head -n1 | sed -E 's/^URIs:[[:space:]]*//') || true
if [ -z "$mirror" ]; then
  mirror=$(grep -hsoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]*/debian/?[[:space:]]' \
    /etc/apt/sources.list | head -n1 | awk '{print $NF}') || true
fi
mirror="${mirror:-http://deb.debian.org/debian}"

root="$cache/apiextensions-apiserver-root-$version"
cleanup() { rm -rf "$root"; }
trap cleanup EXIT
rm -rf "$root"
mkdir -p "$cache"

log "making a sid root from $mirror with golang-k8s-apiextensions-apiserver-dev=$version and $go_pkg"
# Check-Valid-Until off: the mirror may be a dated snapshot whose Release file has expired.
mmdebstrap --variant=apt --mode=root \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --include="golang-k8s-apiextensions-apiserver-dev=$version,$go_pkg" \
  sid "$root" "$mirror" >&2

pkg_dir="$root/usr/share/gocode/src/k8s.io/apiextensions-apiserver"
if [ ! -f "$pkg_dir/main.go" ]; then
  log "expected $pkg_dir/main.go (the server's command) in the -dev package; not found"
  exit 1
fi

log "building k8s.io/apiextensions-apiserver (GOPATH mode, CGO off; about 3 minutes on 2 cores)"
# The chroot has no /proc, so Go cannot find its own GOROOT from /proc/self/exe: say it.
chroot "$root" /usr/bin/env -i PATH=/usr/lib/go-1.27/bin:/usr/bin:/bin HOME=/tmp \
  GOROOT=/usr/lib/go-1.27 GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=/tmp/gocache \
  GOFLAGS= GOPROXY=off CGO_ENABLED=0 \
  go build -trimpath -o /tmp/apiextensions-apiserver k8s.io/apiextensions-apiserver >&2

mkdir -p "$out.tmp"
cp "$root/tmp/apiextensions-apiserver" "$out.tmp/apiextensions-apiserver"
chmod 0755 "$out.tmp/apiextensions-apiserver"
rm -rf "$out"; mv "$out.tmp" "$out"
log "done: $bin"
echo "$out"
