#!/usr/bin/env bash
# Runs nixpool locally: a real Kubernetes control plane on loopback, the CRD, the operator and the
# minimal example pool, then shows what the operator made of it. Pass --keep to explore it with
# kubectl until Ctrl-C.
#   sudo hack/demo.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
. hack/env.sh
cargo build --locked -q -p nixpool-operator -p nixpool-testenv --bins
exec "$CARGO_TARGET_DIR/debug/nixpool-demo" --operator "$CARGO_TARGET_DIR/debug/nixpool-operator" --repo . "$@"
