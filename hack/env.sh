# Sourced by the hack/ scripts: where cargo builds go. The target dir lives outside the clone,
# keyed by the toolchain, so a repeat CI run (and a fresh clone) reuses earlier builds.
export NIXPOOL_CACHE="${NIXPOOL_CACHE:-/var/cache/nixpool}"
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  # Short: pod roots live below it, and Unix socket paths are limited to 108 bytes.
  key=$(rustc -Vv | sha256sum | cut -c1-8)
  export CARGO_TARGET_DIR="$NIXPOOL_CACHE/t-$key"
fi
mkdir -p "$CARGO_TARGET_DIR"
# The node's tools (runc, iptables, ip) live in sbin; a non-login root shell may lack it.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;; esac
