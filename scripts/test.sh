#!/usr/bin/env bash
# The project's test command: installs the reference binaries (scripts/deps.sh), builds every
# test target, then runs the whole suite (unit, integration and doc tests) with `cargo test`.
#
#   scripts/test.sh [cargo test args...] [-- test binary args...]
#   e.g. scripts/test.sh --test harness_smoke -- --nocapture
#
# The tests run inside the network namespace `walden-test` (only `lo`, created if missing) so
# nothing they start can reach beyond 127.0.0.1. If namespaces are not permitted (not root, or
# a container without CAP_SYS_ADMIN) they run in the host namespace after a warning.
#
# Environment:
#   WALDEN_TEST_THREADS  tests run in parallel within one test binary (default 4)
#   WALDEN_NETNS         namespace name (default walden-test); set it empty to use the host's
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'test.sh: %s\n' "$*" >&2; }

# Split our arguments into cargo's and the test binaries'.
cargo_args=()
bin_args=()
seen_separator=0
for arg in "$@"; do
    if [ "$seen_separator" = 0 ] && [ "$arg" = -- ]; then
        seen_separator=1
    elif [ "$seen_separator" = 0 ]; then
        cargo_args+=("$arg")
    else
        bin_args+=("$arg")
    fi
done
threads="${WALDEN_TEST_THREADS:-4}"
bin_args+=("--test-threads=$threads")

started=$SECONDS
deps="$(scripts/deps.sh)"
WALDEN_WEED="$(sed -n 's/^weed=//p' <<<"$deps")"
WALDEN_LITESTREAM_03="$(sed -n 's/^litestream_03=//p' <<<"$deps")"
WALDEN_LITESTREAM_05="$(sed -n 's/^litestream_05=//p' <<<"$deps")"
export WALDEN_WEED WALDEN_LITESTREAM_03 WALDEN_LITESTREAM_05
export AWS_EC2_METADATA_DISABLED=true
log "deps ready in $((SECONDS - started)) s"

# Build everything first, with network access, so the run inside the namespace needs none.
started=$SECONDS
cargo test --no-run "${cargo_args[@]+"${cargo_args[@]}"}"
log "build done in $((SECONDS - started)) s"

netns="${WALDEN_NETNS-walden-test}"

# Makes sure the namespace exists with `lo` up and nothing else; returns 1 if not permitted.
ensure_netns() {
    local name="$1"
    command -v ip >/dev/null 2>&1 || { log "no ip command"; return 1; }
    if ! ip netns list 2>/dev/null | grep -q "^$name\b"; then
        ip netns add "$name" 2>/dev/null || { log "ip netns add $name failed"; return 1; }
    fi
    ip -n "$name" link set lo up 2>/dev/null || { log "cannot bring lo up in $name"; return 1; }
    local links
    links="$(ip -n "$name" -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
    if [ "$links" != "lo " ]; then
        log "namespace $name has interfaces other than lo ($links); delete it: ip netns del $name"
        exit 1
    fi
    ip netns exec "$name" true 2>/dev/null || { log "ip netns exec $name failed"; return 1; }
}

runner=()
if [ -z "$netns" ]; then
    log "WARNING: WALDEN_NETNS is empty; running tests in the host namespace"
elif ensure_netns "$netns"; then
    log "running tests in network namespace $netns (loopback only)"
    runner=(ip netns exec "$netns")
else
    log "WARNING: network namespaces are not available; running tests in the host namespace"
fi

started=$SECONDS
status=0
"${runner[@]+"${runner[@]}"}" env CARGO_NET_OFFLINE=true \
    cargo test "${cargo_args[@]+"${cargo_args[@]}"}" -- "${bin_args[@]}" || status=$?
log "tests finished in $((SECONDS - started)) s with status $status"
exit "$status"
