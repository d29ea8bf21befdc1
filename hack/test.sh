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
# Control planes keep their directories (logs, audit logs, etcd data) in /dev/shm for the scan
# below; drop the last runs' so RAM does not fill up run after run.
rm -rf /dev/shm/nixpool-cp-*
# Files the tests write after this marker are the ones the secret-leak scan reads.
marker=$(mktemp /var/tmp/nixpool-test-start.XXXXXX)
trap 'rm -f "$marker"' EXIT
cargo test --workspace --locked --no-fail-fast
# Every log, Event, ConfigMap, Pod, pool status and render output of the run, against every
# private key and token the run made: fails on any match.
cargo run --locked -q -p nixpool-testenv --bin nixpool-leak-scan -- --since "$marker"
