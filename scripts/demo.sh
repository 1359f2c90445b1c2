#!/usr/bin/env bash
# The demo: a sample app writes rows under `walden replicate -exec` to a local SeaweedFS
# (S3 with SigV4, on 127.0.0.1), then the database is deleted and restored from the bucket,
# and the restored rows are compared with the original ones.
#
#   scripts/demo.sh [ROWS]     (default 600 rows; installs what it needs itself)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rows="${1:-600}"
port="${WALDEN_DEMO_PORT:-18333}"
say() { printf '\n== %s\n' "$*"; }

say "installing SeaweedFS into .venv and building walden (release)"
scripts/deps.sh >/dev/null
cargo build --release --quiet --bin walden
walden="$root/target/release/walden"

work="$(mktemp -d "${TMPDIR:-/tmp}/walden-demo.XXXXXX")"
cleanup() {
    scripts/seaweedfs.sh stop --port "$port" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

say "starting SeaweedFS on 127.0.0.1:$port"
scripts/seaweedfs.sh start --port "$port" --bucket demo

export AWS_EC2_METADATA_DISABLED=true
export LITESTREAM_ACCESS_KEY_ID=WALDENTESTKEY
export LITESTREAM_SECRET_ACCESS_KEY=waldentestsecret123
cat >"$work/walden.yml" <<YAML
dbs:
  - path: $work/app.db
    replicas:
      - type: s3
        bucket: demo
        path: app
        endpoint: http://127.0.0.1:$port
        region: us-east-1
        sync-interval: 1s
YAML

count() {
    python3 - "$1" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(db.execute("SELECT count(*) FROM events").fetchone()[0])
PY
}

say "running the sample app under: walden replicate -config walden.yml -exec 'python3 scripts/sample_app.py …'"
"$walden" replicate -config "$work/walden.yml" \
    -exec "python3 $root/scripts/sample_app.py $work/app.db $rows"
original="$(count "$work/app.db")"

say "what is in the bucket"
"$walden" generations -config "$work/walden.yml" "$work/app.db"
"$walden" snapshots -config "$work/walden.yml" "$work/app.db"

say "deleting the database and restoring it from the bucket"
rm -f "$work/app.db" "$work/app.db-wal" "$work/app.db-shm"
"$walden" restore -config "$work/walden.yml" "$work/app.db"
restored="$(count "$work/app.db")"
integrity="$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("PRAGMA integrity_check").fetchone()[0])' "$work/app.db")"

say "result"
echo "rows written:  $original"
echo "rows restored: $restored"
echo "integrity:     $integrity"
if [ "$original" = "$restored" ] && [ "$integrity" = ok ]; then
    echo "OK: the restored database holds every row"
else
    echo "MISMATCH" >&2
    exit 1
fi
