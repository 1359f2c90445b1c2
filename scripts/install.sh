#!/usr/bin/env bash
# Installs Walden on a server: the binary, /etc/walden.yml, /etc/walden/walden.env (root-owned,
# mode 0600, holding the S3 keys) and a systemd unit.
#
#   scripts/install.sh [options]
#
#   --db PATH             database to replicate (required)
#   --bucket NAME         S3 bucket (required)
#   --endpoint URL        S3 endpoint for non-AWS stores, e.g. https://s3.us-west-001.backblazeb2.com
#   --region REGION       default us-east-1
#   --path PREFIX         key prefix in the bucket (default: the database file name)
#   --access-key-id ID    or $WALDEN_ACCESS_KEY_ID / $LITESTREAM_ACCESS_KEY_ID / $AWS_ACCESS_KEY_ID
#   --secret-access-key K or $WALDEN_SECRET_ACCESS_KEY / $LITESTREAM_SECRET_ACCESS_KEY / $AWS_SECRET_ACCESS_KEY
#                         (prefer the environment: a flag is visible in `ps`)
#   --exec CMD            install walden-app.service running CMD under Walden;
#                         without it, the standalone replicator walden.service
#   --binary PATH         walden binary to install (default: target/release/walden, built if missing)
#   --root DIR            install below DIR instead of / (for packaging and tests)
#   --no-systemctl        write the unit but do not run systemctl
#
# On a terminal, missing values are asked for (the secret without echo). Without a terminal
# they must come from flags or the environment. The secret is never printed.
set -euo pipefail

root_dir="" db="" bucket="" endpoint="" region="" prefix="" exec_cmd="" binary="" systemctl=1
key_id="${WALDEN_ACCESS_KEY_ID:-${LITESTREAM_ACCESS_KEY_ID:-${AWS_ACCESS_KEY_ID:-}}}"
secret="${WALDEN_SECRET_ACCESS_KEY:-${LITESTREAM_SECRET_ACCESS_KEY:-${AWS_SECRET_ACCESS_KEY:-}}}"

die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --db) need "$@"; db="$2"; shift 2 ;;
        --bucket) need "$@"; bucket="$2"; shift 2 ;;
        --endpoint) need "$@"; endpoint="$2"; shift 2 ;;
        --region) need "$@"; region="$2"; shift 2 ;;
        --path) need "$@"; prefix="$2"; shift 2 ;;
        --access-key-id) need "$@"; key_id="$2"; shift 2 ;;
        --secret-access-key) need "$@"; secret="$2"; shift 2 ;;
        --exec) need "$@"; exec_cmd="$2"; shift 2 ;;
        --binary) need "$@"; binary="$2"; shift 2 ;;
        --root) need "$@"; root_dir="${2%/}"; shift 2 ;;
        --no-systemctl) systemctl=0; shift ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

interactive=0
[ -t 0 ] && [ -t 1 ] && interactive=1

# ask VAR PROMPT [DEFAULT]: fills an empty VAR from the terminal.
ask() {
    local var="$1" prompt="$2" default="${3:-}" value=""
    [ -n "${!var}" ] && return
    if [ "$interactive" = 1 ]; then
        read -r -p "$prompt${default:+ [$default]}: " value
    fi
    printf -v "$var" '%s' "${value:-$default}"
}

ask db "Database path"
ask bucket "S3 bucket"
ask endpoint "S3 endpoint (empty for AWS)"
ask region "Region" "us-east-1"
ask key_id "Access key id"
if [ -z "$secret" ] && [ "$interactive" = 1 ]; then
    read -r -s -p "Secret access key (not echoed): " secret
    echo
fi

[ -n "$db" ] || die "missing --db (no terminal to ask on)"
[ -n "$bucket" ] || die "missing --bucket (no terminal to ask on)"
[ -n "$key_id" ] || die "missing --access-key-id or \$LITESTREAM_ACCESS_KEY_ID (no terminal to ask on)"
[ -n "$secret" ] || die "missing the secret: set \$LITESTREAM_SECRET_ACCESS_KEY (no terminal to ask on)"
case "$db" in /*) ;; *) die "--db must be an absolute path" ;; esac
case "$region$bucket$endpoint$db$key_id" in *$'\n'*|*'"'*) die "values may not contain newlines or double quotes" ;; esac
case "$secret$key_id" in *$'\n'*) die "keys may not contain newlines" ;; esac
[ -n "$prefix" ] || prefix="$(basename "$db")"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "$binary" ]; then
    binary="$here/target/release/walden"
    [ -x "$binary" ] || (cd "$here" && cargo build --release --quiet --bin walden)
fi
[ -x "$binary" ] || die "no walden binary at $binary"

install -d -m 0755 "$root_dir/usr/local/bin" "$root_dir/etc/systemd/system"
install -d -m 0700 "$root_dir/etc/walden"
install -m 0755 "$binary" "$root_dir/usr/local/bin/walden"

# The env file holds the keys; created with 0600 before anything is written to it.
env_file="$root_dir/etc/walden/walden.env"
umask 077
: >"$env_file"
chmod 0600 "$env_file"
[ "$(id -u)" = 0 ] && chown root:root "$env_file"
printf 'LITESTREAM_ACCESS_KEY_ID=%s\nLITESTREAM_SECRET_ACCESS_KEY=%s\n' "$key_id" "$secret" >"$env_file"
umask 022

config="$root_dir/etc/walden.yml"
{
    echo "# Written by scripts/install.sh. Keys are in /etc/walden/walden.env."
    [ -n "$exec_cmd" ] && printf 'exec: "%s"\n' "${exec_cmd//\"/\\\"}"
    echo "dbs:"
    printf '  - path: "%s"\n' "$db"
    echo "    replicas:"
    echo "      - type: s3"
    printf '        bucket: "%s"\n' "$bucket"
    printf '        path: "%s"\n' "$prefix"
    printf '        region: "%s"\n' "$region"
    [ -n "$endpoint" ] && printf '        endpoint: "%s"\n' "$endpoint"
} >"$config"
chmod 0644 "$config"

if [ -n "$exec_cmd" ]; then
    unit=walden-app.service
    sed -e "s|-exec \"/usr/local/bin/my-app\"||" \
        -e "s|my-app under Walden|application under Walden|" \
        "$here/systemd/walden-app.service" >"$root_dir/etc/systemd/system/$unit"
else
    unit=walden.service
    cp "$here/systemd/walden.service" "$root_dir/etc/systemd/system/$unit"
fi

echo "installed: $root_dir/usr/local/bin/walden, $config, $env_file (0600), $root_dir/etc/systemd/system/$unit"
if [ "$systemctl" = 1 ] && [ -z "$root_dir" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable --now "$unit"
    echo "started $unit"
else
    echo "start it with: systemctl daemon-reload && systemctl enable --now $unit"
fi
