# Sourced by the hack/ scripts: where cargo builds go. The target dir lives outside the clone,
# keyed by the toolchain, so a repeat CI run (and a fresh clone) reuses earlier builds.
export NIXPOOL_CACHE="${NIXPOOL_CACHE:-/var/cache/nixpool}"
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  key=$(rustc -Vv | sha256sum | cut -c1-12)
  export CARGO_TARGET_DIR="$NIXPOOL_CACHE/cargo-target-$key"
fi
mkdir -p "$CARGO_TARGET_DIR"
