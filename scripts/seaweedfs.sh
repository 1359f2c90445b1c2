#!/usr/bin/env bash
# Starts or stops a SeaweedFS S3 server (`weed mini`) on 127.0.0.1 for manual testing.
# The test suite starts its own servers (tests/support/mod.rs); this script uses the same flags.
#
#   scripts/seaweedfs.sh start [--port P] [--dir D] [--bucket B]
#   scripts/seaweedfs.sh stop  [--port P] [--keep-data]
#
# start: SigV4 enforced with one identity (access key WALDENTESTKEY, secret waldentestsecret123,
#   actions Admin/Read/Write/List/Tagging on all buckets), every listener on 127.0.0.1, telemetry,
#   admin UI, WebDAV, Iceberg and Lance off. S3 listens on P (default 8333); master, volume, filer
#   and admin use P+1..P+4, their gRPC ports P+5..P+8 and P+10004 (weed's worker dials admin+10000).
#   Data goes to D (default: a new .run/weed-P.XXXXXX); the PID file is .run/weed-P.pid. Waits
#   until the bucket B (default walden) serves signed requests, then prints
#   `endpoint=http://127.0.0.1:P pid=N bucket=B data=D`.
# stop: SIGTERM by PID file, SIGKILL after 10 s, then removes the data dir (only one this script
#   created or marked) unless --keep-data.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run_dir="$root/.run"
access_key=WALDENTESTKEY
secret_key=waldentestsecret123
marker=.walden-seaweedfs
empty_sha256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

die() { printf 'seaweedfs.sh: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '5,6p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2; exit 2; }

[ $# -ge 1 ] || usage
cmd="$1"; shift
port=8333 dir="" bucket=walden keep_data=0
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port="${2:?--port needs a value}"; shift 2 ;;
        --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
        --bucket) bucket="${2:?--bucket needs a value}"; shift 2 ;;
        --keep-data) keep_data=1; shift ;;
        *) usage ;;
    esac
done
case "$port" in ''|*[!0-9]*) die "--port must be a number" ;; esac
[ "$port" -ge 1024 ] && [ "$port" -le 55000 ] || die "--port must be in 1024..55000 (P+10004 is used too)"

pid_file="$run_dir/weed-$port.pid"
dir_file="$run_dir/weed-$port.dir"

is_weed() { [ -n "${1:-}" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = weed ]; }

# s3_status METHOD PATH: HTTP status of a SigV4-signed request without a body.
s3_status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X "$1" \
        --aws-sigv4 "aws:amz:us-east-1:s3" --user "$access_key:$secret_key" \
        -H "x-amz-content-sha256: $empty_sha256" "http://127.0.0.1:$port$2" || true
}

remove_sockets() {
    local p
    for p in $(seq "$port" $((port + 8))) $((port + 10004)); do
        rm -f /tmp/seaweedfs-*-"$p".sock
    done
}

start() {
    local weed="${WALDEN_WEED:-$root/.venv/weed/bin/weed}"
    [ -x "$weed" ] || die "weed not found at $weed: run scripts/deps.sh"
    mkdir -p "$run_dir"
    if [ -f "$pid_file" ] && is_weed "$(cat "$pid_file")"; then
        die "already running on port $port (pid $(cat "$pid_file")); stop it first"
    fi
    if [ -z "$dir" ]; then
        dir="$(mktemp -d "$run_dir/weed-$port.XXXXXX")"
    else
        mkdir -p "$dir"
        dir="$(cd "$dir" && pwd)"
        if [ ! -e "$dir/$marker" ] && [ -n "$(ls -A "$dir")" ]; then
            die "$dir is not empty and was not created by this script"
        fi
    fi
    touch "$dir/$marker"
    mkdir -p "$dir/data"
    cat >"$dir/s3.json" <<JSON
{
  "identities": [
    {
      "name": "walden-test",
      "credentials": [{ "accessKey": "$access_key", "secretKey": "$secret_key" }],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
JSON
    remove_sockets
    local p="$port"
    nohup "$weed" mini \
        -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
        -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
        -volume.preStopSeconds=0 \
        -dir="$dir/data" -s3.config="$dir/s3.json" -bucket="$bucket" \
        -s3.port="$p" -master.port=$((p + 1)) -volume.port=$((p + 2)) \
        -filer.port=$((p + 3)) -admin.port=$((p + 4)) \
        -s3.port.grpc=$((p + 5)) -master.port.grpc=$((p + 6)) \
        -volume.port.grpc=$((p + 7)) -filer.port.grpc=$((p + 8)) \
        -admin.port.grpc=$((p + 10004)) \
        >"$dir/weed.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$pid_file"
    echo "$dir" >"$dir_file"

    local started=$SECONDS created=0 code
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$dir/weed.log" >&2
            die "weed exited during start (log: $dir/weed.log)"
        fi
        if [ $((SECONDS - started)) -ge 60 ]; then
            tail -n 30 "$dir/weed.log" >&2
            die "not ready after 60 s (log: $dir/weed.log); stop it with: $0 stop --port $port"
        fi
        code="$(s3_status GET "/$bucket?list-type=2&max-keys=1")"
        if [ "$code" = 404 ] && [ "$created" = 0 ] && [ $((SECONDS - started)) -ge 10 ]; then
            # weed's -bucket flag should have created it; create it with a signed PUT.
            s3_status PUT "/$bucket" >/dev/null
            created=1
        fi
        if [ "$code" = 200 ] && volumes_known; then
            break
        fi
        sleep 0.1
    done
    echo "endpoint=http://127.0.0.1:$port pid=$pid bucket=$bucket data=$dir"
}

# After a restart on an existing --dir, S3 answers before the master knows the volumes on disk
# and reads fail until it does.
volumes_known() {
    local f id
    for f in "$dir"/data/*.dat; do
        [ -e "$f" ] || continue
        id="$(basename "$f" .dat)"
        id="${id##*_}"
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
            "http://127.0.0.1:$((port + 1))/dir/lookup?volumeId=$id" || true)" = 200 ] || return 1
    done
}

stop() {
    if [ ! -f "$pid_file" ]; then
        echo "not running on port $port (no $pid_file)"
        return 0
    fi
    local pid
    pid="$(cat "$pid_file")"
    if is_weed "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local waited=0
        while is_weed "$pid" && [ "$waited" -lt 100 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if is_weed "$pid"; then
            echo "weed (pid $pid) still running after 10 s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            while is_weed "$pid"; do sleep 0.1; done
        fi
        echo "stopped pid=$pid"
    else
        echo "pid $pid from $pid_file is not a running weed"
    fi
    rm -f "$pid_file"
    remove_sockets
    if [ -f "$dir_file" ]; then
        local data
        data="$(cat "$dir_file")"
        rm -f "$dir_file"
        if [ "$keep_data" = 1 ]; then
            echo "kept data=$data"
        elif [ -e "$data/$marker" ]; then
            rm -rf "$data"
        fi
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
