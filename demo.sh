#!/usr/bin/env bash
# The Pagoda hook bus, end to end, on this machine:
#
#   1. builds the workspace's binaries;
#   2. starts a nats-server with JetStream on a free port with a temp store dir
#      (unless NATS_URL is set: then that server is used);
#   3. starts the bus (`hookbus run`) and the example plugins hello-world,
#      audit-log and flaky, each one's output prefixed with its name;
#   4. creates an admin API token and starts the reference host (`hookbus host`)
#      on a SQLite model store, relaying its outbox to the stream;
#   5. runs `hookbus demo` against the host's HTTP API: writes that run the
#      synchronous hooks (a validator that rejects, a before_create that fills a
#      default) and commit their events, which the bus dispatches in priority
#      order; a read through get_attrs; a plugin API route; a plugin task as a job;
#   6. stops everything it started and removes its temp dir (also on Ctrl-C or
#      on failure).
#
#   ./demo.sh            # run the demo and stop
#   ./demo.sh --keep     # keep everything running after the demo, until Ctrl-C,
#                        # to look around with the `nats` CLI and curl
#
# Environment: NATS_URL (use this server instead of starting one),
# RUST_LOG (default error: only the handler lines and dead letters show),
# ENABLED_PLUGINS (default hello-world,audit-log,flaky).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=tests/setup/ensure-tools.sh
source tests/setup/ensure-tools.sh

KEEP=0
for arg in "$@"; do
    case "$arg" in
    --keep) KEEP=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "demo.sh: unknown argument '$arg' (try --help)" >&2
        exit 2
        ;;
    esac
done

PLUGINS=(hello-world audit-log flaky)
export ENABLED_PLUGINS="${ENABLED_PLUGINS:-$(
    IFS=,
    echo "${PLUGINS[*]}"
)}"
export RUST_LOG="${RUST_LOG:-error}"

say() { printf '\n==> %s\n' "$*" >&2; }
die() {
    printf 'demo.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

# --- cleanup: everything started here is stopped on exit ---------------------

WORK="$(mktemp -d -t hookbus-demo.XXXXXX)"
PIDS=()   # in start order; stopped in reverse
NAMES=()

# stop PID...: SIGTERM, up to 10 s to exit, then SIGKILL.
stop() {
    local pid deadline=$((SECONDS + 10))
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

cleanup() {
    local status=$? i
    local -a clients=() servers=()
    trap - EXIT INT TERM
    if [ "${#PIDS[@]}" -gt 0 ]; then
        say "stopping ${NAMES[*]}"
        # The bus and the plugins first, so they can drain while NATS still runs.
        for i in "${!PIDS[@]}"; do
            if [ "${NAMES[i]}" = nats-server ]; then
                servers+=("${PIDS[i]}")
            else
                clients+=("${PIDS[i]}")
            fi
        done
        [ "${#clients[@]}" -eq 0 ] || stop "${clients[@]}"
        [ "${#servers[@]}" -eq 0 ] || stop "${servers[@]}"
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Colour for a name's prefix, when the output is a terminal.
colour() {
    [ -t 1 ] || return 0
    local colours=(36 33 35 32 34 31) sum=0 i
    for ((i = 0; i < ${#1}; i++)); do sum=$((sum + $(printf '%d' "'${1:i:1}"))); done
    printf '\033[%sm' "${colours[sum % ${#colours[@]}]}"
}

# start NAME COMMAND [ARGS...]: runs COMMAND in the background, its output
# prefixed with [NAME], and records its pid.
start() {
    local name="$1" prefix reset=""
    shift
    prefix="$(colour "$name")[$name]"
    [ -t 1 ] && reset=$'\033[0m'
    # Plugins tag their own lines with [NAME]; only untagged lines get the prefix.
    "$@" > >(sed -u "/^\\[${name}\\]/!s/^/${prefix//\//\\/}${reset} /") 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
}

# True when the process recorded for NAME still runs.
running() {
    local i
    for i in "${!NAMES[@]}"; do
        [ "${NAMES[i]}" = "$1" ] && kill -0 "${PIDS[i]}" 2>/dev/null && return 0
    done
    return 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True when GET /healthz on 127.0.0.1:$1 answers 200 (bash's /dev/tcp; no curl needed).
healthz() {
    local line
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    IFS= read -r -t 2 line <&3 || true
    exec 3<&- 3>&-
    [[ "$line" == HTTP/1.?" 200"* ]]
}

# --- 1. build ----------------------------------------------------------------

say "building the workspace's binaries"
cargo build --workspace --bins
BIN="${CARGO_TARGET_DIR:-target}/debug"
for bin in hookbus "${PLUGINS[@]}"; do
    [ -x "$BIN/$bin" ] || die "$BIN/$bin was not built: does its crate (bus/ for hookbus, subscribers/ for the plugins) declare this binary?"
done

# --- 2. NATS -----------------------------------------------------------------

if [ -n "${NATS_URL:-}" ]; then
    say "using the NATS server at $NATS_URL"
else
    port="$(free_port)"
    monitor="$(free_port)"
    export NATS_URL="nats://127.0.0.1:$port"
    say "starting nats-server with JetStream at $NATS_URL (store $WORK/store, log $WORK/nats-server.log)"
    "$NATS_SERVER_BIN" -a 127.0.0.1 -p "$port" -m "$monitor" --name hookbus-demo \
        -js -sd "$WORK/store" >"$WORK/nats-server.log" 2>&1 &
    PIDS+=("$!")
    NAMES+=(nats-server)
    deadline=$((SECONDS + 20))
    until healthz "$monitor"; do
        if ! running nats-server || [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$WORK/nats-server.log" >&2 || true
            die "nats-server did not become ready on port $port"
        fi
        sleep 0.1
    done
    echo "nats-server ready; monitoring at http://127.0.0.1:$monitor" >&2
fi

# --- 3. the bus and the plugins ------------------------------------------------

export AUDIT_LOG_PATH="${AUDIT_LOG_PATH:-$WORK/audit.jsonl}"
say "starting the bus: hookbus run (ENABLED_PLUGINS=$ENABLED_PLUGINS)"
start hookbus "$BIN/hookbus" run --http-addr off
for plugin in "${PLUGINS[@]}"; do
    say "starting plugin $plugin"
    start "$plugin" "$BIN/$plugin"
done

# Wait until the bus reports healthy.
deadline=$((SECONDS + 30))
until "$BIN/hookbus" health >/dev/null 2>&1; do
    for name in hookbus "${PLUGINS[@]}"; do
        running "$name" || die "$name exited during start-up (see its output above)"
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "demo.sh: WARNING: 'hookbus health' is not healthy after 30 s; going on anyway" >&2
        break
    fi
    sleep 0.2
done

# --- 4. the reference host -------------------------------------------------------

# The model store (SQLite): the host writes every change with its event in the
# outbox and relays it to the stream.
export HOOKBUS_DATABASE_URL="${HOOKBUS_DATABASE_URL:-sqlite://$WORK/pagoda.db}"
# hello-world's task `count` (offset 0) gets operation id 5000.
default_ops='{"hello-world": [5000, 5099]}'
export PLUGIN_OPERATION_ID_CONFIG="${PLUGIN_OPERATION_ID_CONFIG:-$default_ops}"
say "creating an admin API token: hookbus token create --user admin --superuser"
TOKEN="$("$BIN/hookbus" token create --user admin --superuser)"
host_port="$(free_port)"
export HOOKBUS_HOST_URL="http://127.0.0.1:$host_port"
say "starting the reference host: hookbus host at $HOOKBUS_HOST_URL (database $HOOKBUS_DATABASE_URL)"
start host "$BIN/hookbus" host --listen "127.0.0.1:$host_port"
deadline=$((SECONDS + 30))
until healthz "$host_port"; do
    running host || die "the host exited during start-up (see its output above)"
    [ "$SECONDS" -lt "$deadline" ] || die "the host did not answer /healthz within 30 s"
    sleep 0.1
done

# --- 5. the demo ---------------------------------------------------------------

say "running: hookbus demo --host-url $HOOKBUS_HOST_URL"
HOOKBUS_TOKEN="$TOKEN" "$BIN/hookbus" demo 2>&1 | sed -u "s/^/$(colour demo)[demo]$([ -t 1 ] && printf '\033[0m') /"

if [ "$KEEP" = 1 ]; then
    say "everything is still running (NATS_URL=$NATS_URL, host $HOOKBUS_HOST_URL, token $TOKEN); Ctrl-C stops it"
    wait
fi
say "demo finished"
