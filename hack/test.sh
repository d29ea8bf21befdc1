#!/usr/bin/env bash
# The whole test suite: installs what it needs (as root), then runs every test of the workspace,
# the real control plane, sshd and nix-daemon ones included, plus fmt and clippy.
#   sudo hack/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
. hack/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
