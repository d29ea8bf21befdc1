#!/usr/bin/env bash
# nixpool end to end on this machine (as root): a real Kubernetes control plane on loopback, the
# CRD, the operator, a real node (containerd, kubelet, kube-proxy) running the builder pods, the
# minimal example pool, builderctl machines-file, and a real remote nix-build, with timings.
#   sudo hack/demo.sh [--keep]     # --keep: explore with kubectl until Ctrl-C
#   sudo hack/demo.sh down         # remove what a killed run left behind
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
. hack/env.sh
cargo build --locked -q --workspace --bins
exec "$CARGO_TARGET_DIR/debug/nixpool-demo" --repo . "$@"
