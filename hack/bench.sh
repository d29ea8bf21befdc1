#!/usr/bin/env bash
# Every benchmark, each printing a Markdown table (as root; release builds):
#   the operator with N pools on a real control plane (N=1000 unless POOLS is set),
#   the whole flow (apply to first build, build through a pool vs a hand-configured builder),
#   builder start against the size of the image's store (10 MiB and 500 MiB, overlay and copy),
#   the agent (start to ready, build latency), builderctl (machines-file for 100 pools).
#   sudo hack/bench.sh          # tables go to stdout; copy them into docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
. hack/env.sh
cargo build --release --locked -q --workspace --bins
echo "## Operator"
NIXPOOL_BENCH_POOLS="${POOLS:-1000}" cargo bench --locked -q -p nixpool-operator --bench pools
echo "## Whole flow"
cargo bench --locked -q -p nixpool-e2e --bench flow
echo "## Builder start and store size"
cargo bench --locked -q -p nixpool-e2e --bench store_start
echo "## Agent"
cargo bench --locked -q -p nixpool-agent --bench agent_bench
echo "## builderctl"
cargo bench --locked -q -p builderctl --bench machines_file
