#!/usr/bin/env bash
# Run the whole Colony stack natively (no Docker) against the local PostgreSQL
# and nats-server:
#
#   scripts/run-native.sh          build (release), start all five services, wait; Ctrl-C stops them
#   PROFILE=debug scripts/run-native.sh   same with a debug build (faster to compile)
#   scripts/run-native.sh stop     stop services left running by an earlier, killed invocation
#
# Config: deploy/config/native/<service>.toml; any key can be overridden with
# environment variables (<SERVICE>__<SECTION>__<KEY>, e.g. ROUTER__HTTP__ADDR).
# Logs and pid files: .cache/run/<service>.{log,pid}
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PROFILE="${PROFILE:-release}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
RUN_DIR=.cache/run
CONFIG_DIR=deploy/config/native
DB_NAME=colony
READY_SECS="${READY_SECS:-60}"
STOP_GRACE_SECS="${STOP_GRACE_SECS:-35}" # > the services' own shutdown_grace (30s max)

# Start order: dependencies first. Stopped in reverse, so workers drain while
# the orchestrator, router and memory are still up.
SERVICES=(memory router orchestrator monitor agent-worker)
declare -A HTTP_PORT=(
    [orchestrator]=8080
    [router]=8081
    [memory]=8082
    [agent-worker]=8083
    [monitor]=8084
)
PACKAGES=(colony-orchestrator colony-agent-worker colony-memory colony-router colony-monitor colony)

case $PROFILE in
    release) BUILD_FLAGS=(--release) ;;
    debug | dev) PROFILE=debug BUILD_FLAGS=() ;;
    *) echo "run-native: PROFILE must be release or debug, not '$PROFILE'" >&2 && exit 2 ;;
esac
BIN_DIR="$TARGET_DIR/$PROFILE"

log() { echo "run-native: $*"; }

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# Plain HTTP GET status code over /dev/tcp (no curl needed). Prints the code or nothing.
http_status() {
    local port=$1 path=$2 line=""
    if { exec 4<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&4 || true
        IFS= read -r -t 2 line <&4 || true
        exec 4>&- 4<&-
    fi
    line=${line#HTTP/* }
    echo "${line%% *}"
}

stop_one() {
    local svc=$1 pidfile="$RUN_DIR/$1.pid" pid i
    [[ -f $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < STOP_GRACE_SECS * 10; i++)); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            log "$svc (pid $pid) did not stop within ${STOP_GRACE_SECS}s; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
        log "stopped $svc (pid $pid)"
    fi
    rm -f "$pidfile"
}

stop_all() {
    local i
    set +m # no job-status chatter while stopping
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        stop_one "${SERVICES[i]}"
    done
}

if [[ ${1:-} == stop ]]; then
    stop_all
    exit 0
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [stop]" >&2
    exit 2
fi

mkdir -p "$RUN_DIR"
for svc in "${SERVICES[@]}"; do
    if [[ -f $RUN_DIR/$svc.pid ]] && pid_alive "$(<"$RUN_DIR/$svc.pid")"; then
        echo "run-native: $svc is already running (pid $(<"$RUN_DIR/$svc.pid")); stop it with: $0 stop" >&2
        exit 1
    fi
    rm -f "$RUN_DIR/$svc.pid"
done

# 1. Build.
pkg_flags=()
for p in "${PACKAGES[@]}"; do pkg_flags+=(-p "$p"); done
log "building ($PROFILE): cargo build ${BUILD_FLAGS[*]} --bins ${pkg_flags[*]}"
cargo build "${BUILD_FLAGS[@]}" --bins "${pkg_flags[@]}"

# 2. Backing services and the database.
scripts/ensure-services.sh
if [[ -z $(psql -w -h 127.0.0.1 -U postgres -d postgres -Atc \
    "select 1 from pg_database where datname = '$DB_NAME'" </dev/null) ]]; then
    psql -w -h 127.0.0.1 -U postgres -d postgres -qc "create database $DB_NAME" </dev/null
    log "created database $DB_NAME"
else
    log "database $DB_NAME exists"
fi

# 3. Start the services, each in its own process group (set -m) so a Ctrl-C in
# the terminal reaches only this script, which then stops them in order.
trap 'echo; log "stopping"; stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT
set -m

for svc in "${SERVICES[@]}"; do
    bin="$BIN_DIR/colony-$svc"
    [[ -x $bin ]] || { echo "run-native: $bin not found after build" >&2; exit 1; }
    "$bin" --config "$CONFIG_DIR/$svc.toml" >"$RUN_DIR/$svc.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$svc.pid"
    log "started $svc (pid $!), log $RUN_DIR/$svc.log"
done

# 4. Wait for /readyz (a service that exits early is reported with its log tail).
deadline=$((SECONDS + READY_SECS))
pending=("${SERVICES[@]}")
while ((${#pending[@]} > 0)); do
    still=()
    for svc in "${pending[@]}"; do
        if ! pid_alive "$(<"$RUN_DIR/$svc.pid")"; then
            echo "run-native: $svc exited during startup; last lines of $RUN_DIR/$svc.log:" >&2
            tail -n 30 "$RUN_DIR/$svc.log" >&2 || true
            exit 1
        fi
        [[ $(http_status "${HTTP_PORT[$svc]}" /readyz) == 200 ]] || still+=("$svc")
    done
    pending=("${still[@]+"${still[@]}"}")
    if ((${#pending[@]} > 0 && SECONDS >= deadline)); then
        log "not ready after ${READY_SECS}s: ${pending[*]} (still running; see their logs)"
        break
    fi
    ((${#pending[@]} == 0)) || sleep 0.5
done

echo
echo "Colony is running ($PROFILE build)."
echo "  API (REST)                 http://127.0.0.1:${HTTP_PORT[orchestrator]}/v1/runs"
for svc in "${SERVICES[@]}"; do
    printf '  %-26s http://127.0.0.1:%s/metrics  (/healthz, /readyz)\n' "$svc" "${HTTP_PORT[$svc]}"
done
echo "  logs                       $RUN_DIR/<service>.log   (tail -f $RUN_DIR/*.log)"
echo "  config                     $CONFIG_DIR/<service>.toml"
echo "  LLM                        default is SmolLM2-135M run inside the router (offline, small);"
echo "                             add or choose providers in $CONFIG_DIR/router.toml"
echo
echo "Submit a goal:  $BIN_DIR/colony run \"summarise this repository\" --follow"
echo "Stop:           Ctrl-C"
echo

# 5. Stay in the foreground until Ctrl-C or until a service dies.
while true; do
    wait -n || true
    for svc in "${SERVICES[@]}"; do
        if ! pid_alive "$(<"$RUN_DIR/$svc.pid")"; then
            echo "run-native: $svc exited; last lines of $RUN_DIR/$svc.log:" >&2
            tail -n 30 "$RUN_DIR/$svc.log" >&2 || true
            exit 1
        fi
    done
done
