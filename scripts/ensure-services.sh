#!/usr/bin/env bash
# Make sure the two backing services Colony needs locally are up:
#   - PostgreSQL on 127.0.0.1:5432, user `postgres`, trust auth on loopback
#   - NATS with JetStream on 127.0.0.1:4222
#
# Idempotent: a service that already answers is left alone. A stopped one is
# started; a missing one is installed with apt-get (Debian/Ubuntu) first.
# Prints one line per service saying what it did; exits non-zero, loudly, if a
# service is still not answering after WAIT_SECS (default 30).
#
# Runs as root (CI) or as a user with sudo. Never reads stdin.
set -euo pipefail

WAIT_SECS="${WAIT_SECS:-30}"
PG_HOST=127.0.0.1
PG_PORT=5432
NATS_HOST=127.0.0.1
NATS_PORT=4222
NATS_STORE_DIR="${NATS_STORE_DIR:-/var/lib/nats-server}"
NATS_LOG="${NATS_LOG:-/var/log/nats-server.log}"
# Our own pid file, so start-stop-daemon matches only a server this script
# started (not, say, a distribution nats-server running without JetStream).
NATS_PIDFILE="${NATS_PIDFILE:-/run/colony-nats-server.pid}"

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
else
    SUDO=(sudo -n)
fi

die() {
    echo "ensure-services: error: $*" >&2
    exit 1
}

say() {
    echo "ensure-services: $*"
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
    if [[ $APT_UPDATED -eq 0 ]]; then
        "${SUDO[@]}" apt-get update -qq </dev/null
        APT_UPDATED=1
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# wait_for <seconds> <command...>: poll once a second until the command succeeds.
wait_for() {
    local secs=$1
    shift
    local i
    for ((i = 0; i < secs; i++)); do
        if "$@"; then
            return 0
        fi
        sleep 1
    done
    "$@"
}

# ---------------------------------------------------------------- PostgreSQL

pg_up() {
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1
}

pg_auth_ok() {
    # -w: never prompt for a password (no stdin in CI).
    psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1' \
        </dev/null >/dev/null 2>&1
}

# The cluster to manage: the one configured on port 5432, else the first one.
pg_cluster() {
    local line
    if command -v pg_lsclusters >/dev/null 2>&1; then
        line=$(pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2; exit }')
        if [[ -n $line ]]; then
            echo "$line"
            return 0
        fi
    fi
    if [[ -d /etc/postgresql ]] && [[ -n $(ls -A /etc/postgresql 2>/dev/null) ]]; then
        # shellcheck disable=SC2012 # version directories: plain numbers
        echo "$(ls /etc/postgresql | head -1) main"
        return 0
    fi
    return 1
}

pg_installed() {
    command -v pg_ctlcluster >/dev/null 2>&1 && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# Put trust lines for loopback TCP at the top of pg_hba.conf (first match wins).
pg_trust_loopback() {
    local version=$1 cluster=$2
    local hba="/etc/postgresql/$version/$cluster/pg_hba.conf"
    local marker="# colony: trust on loopback (scripts/ensure-services.sh)"
    [[ -f $hba ]] || die "postgresql: $hba not found"
    if ! "${SUDO[@]}" grep -qF "$marker" "$hba"; then
        local tmp
        tmp=$(mktemp)
        {
            echo "$marker"
            echo "host    all             all             127.0.0.1/32            trust"
            echo "host    all             all             ::1/128                 trust"
            echo
            "${SUDO[@]}" cat "$hba"
        } >"$tmp"
        "${SUDO[@]}" cp "$tmp" "$hba"
        rm -f "$tmp"
    fi
    "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" reload </dev/null
}

ensure_postgres() {
    local did="" version cluster

    if pg_up; then
        did="already running"
    else
        if ! pg_installed; then
            apt_install postgresql
            did="installed"
        fi
        if ! read -r version cluster < <(pg_cluster); then
            # Package present but no cluster (dropped, or postinst skipped it).
            # shellcheck disable=SC2012 # version directories: plain numbers
            version=$(ls /usr/lib/postgresql | sort -V | tail -1)
            cluster=main
            "${SUDO[@]}" pg_createcluster --port "$PG_PORT" "$version" "$cluster" </dev/null >/dev/null
            did="${did:+$did, }created cluster $version/$cluster"
        fi
        "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start </dev/null ||
            pg_up || die "postgresql: pg_ctlcluster $version $cluster start failed"
        did="${did:+$did, }started cluster $version/$cluster"
        wait_for "$WAIT_SECS" pg_up ||
            die "postgresql: not accepting connections on $PG_HOST:$PG_PORT after ${WAIT_SECS}s"
    fi

    if ! pg_auth_ok; then
        # Answers but refuses a password-less `postgres` login over TCP: add trust
        # lines for loopback (only loopback) and reload.
        read -r version cluster < <(pg_cluster) ||
            die "postgresql: cannot log in as postgres without a password and no local cluster to fix"
        pg_trust_loopback "$version" "$cluster"
        wait_for 10 pg_auth_ok ||
            die "postgresql: still cannot log in as postgres on $PG_HOST:$PG_PORT after enabling trust"
        did="$did, enabled trust auth on loopback"
    fi
    say "postgresql: $did ($PG_HOST:$PG_PORT, user postgres)"
}

# ---------------------------------------------------------------------- NATS

nats_up() {
    (exec 3<>"/dev/tcp/$NATS_HOST/$NATS_PORT") >/dev/null 2>&1
}

# The server greets every client with `INFO {...}`; with JetStream enabled the
# JSON carries "jetstream":true. Prints yes / no / unknown.
nats_jetstream() {
    local line=""
    if { exec 3<>"/dev/tcp/$NATS_HOST/$NATS_PORT"; } 2>/dev/null; then
        IFS= read -r -t 3 line <&3 || true
        exec 3>&- 3<&-
    fi
    if [[ $line != INFO* ]]; then
        echo unknown
    elif [[ $line == *'"jetstream":true'* ]]; then
        echo yes
    else
        echo no
    fi
}

ensure_nats() {
    local did="" bin

    if nats_up; then
        did="already running"
    else
        if ! command -v nats-server >/dev/null 2>&1 && [[ ! -x /usr/sbin/nats-server ]]; then
            apt_install nats-server
            did="installed"
        fi
        bin=$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)
        "${SUDO[@]}" mkdir -p "$NATS_STORE_DIR"
        "${SUDO[@]}" start-stop-daemon --start --oknodo --background \
            --pidfile "$NATS_PIDFILE" --make-pidfile --exec "$bin" -- \
            -a "$NATS_HOST" -p "$NATS_PORT" -js -sd "$NATS_STORE_DIR" -l "$NATS_LOG" </dev/null
        did="${did:+$did, }started $bin with JetStream (store $NATS_STORE_DIR, log $NATS_LOG)"
        wait_for "$WAIT_SECS" nats_up ||
            die "nats: nothing listening on $NATS_HOST:$NATS_PORT after ${WAIT_SECS}s (see $NATS_LOG)"
    fi

    case $(nats_jetstream) in
        yes) ;;
        no)
            die "nats: a server answers on $NATS_HOST:$NATS_PORT but JetStream is disabled." \
                "Colony needs it: restart that server with -js (or add 'jetstream { store_dir: $NATS_STORE_DIR }' to its config)."
            ;;
        *) did="$did, JetStream not confirmed (no INFO greeting read)" ;;
    esac
    say "nats: $did ($NATS_HOST:$NATS_PORT, JetStream)"
}

# Usage: ensure-services.sh [postgres] [nats]   (default: both)
if [[ $# -eq 0 ]]; then
    set -- postgres nats
fi
for service in "$@"; do
    case $service in
        postgres | postgresql) ensure_postgres ;;
        nats) ensure_nats ;;
        *) die "unknown service '$service' (expected postgres or nats)" ;;
    esac
done
