#!/usr/bin/env bash
# Builds shardgate, starts the local PostgreSQL cluster (deploy/local/cluster.sh) and
# runs shardgate in front of it.
#
# Usage: run.sh [--detach] [--no-build]   start; when shardgate answers, print KEY=value
#                                         lines (DATABASE_URL, ADMIN_URL, METRICS_URL,
#                                         SHARD<i>_PRIMARY_URL, SHARD<i>_REPLICA<j>_URL)
#                                         on stdout and save them in $SHARDGATE_HOME/env
#        run.sh stop [--purge]            stop shardgate and the cluster (--purge: and
#                                         delete the cluster's data and shardgate's files)
#        run.sh status                    is shardgate running; the cluster's status
#
# Without --detach shardgate runs in the foreground (logs on stderr); Ctrl-C stops it
# and the cluster. With --detach it runs in the background (pid in
# $SHARDGATE_HOME/shardgate.pid, log in $SHARDGATE_HOME/shardgate.log) and run.sh
# returns once shardgate answers `SELECT 1`.
#
# Environment (besides cluster.sh's SHARDGATE_HOME, SHARDGATE_PG_PORT, SHARDGATE_SHARDS,
# SHARDGATE_REPLICAS):
#   SHARDGATE_PORT           shardgate's listen port (default 6432)
#   SHARDGATE_METRICS_PORT   Prometheus endpoint port (default 9930)
#   SHARDGATE_BIN            the binary (default <repo>/target/release/shardgate)
#   SHARDGATE_START_TIMEOUT  seconds to wait for shardgate to answer (default 60)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
CLUSTER=$SCRIPT_DIR/cluster.sh
TEMPLATE=$SCRIPT_DIR/shardgate.toml

SHARDGATE_HOME=$(realpath -m "${SHARDGATE_HOME:-$REPO_ROOT/.shardgate}")
export SHARDGATE_HOME
PORT=${SHARDGATE_PORT:-6432}
METRICS_PORT=${SHARDGATE_METRICS_PORT:-9930}
BIN=${SHARDGATE_BIN:-$REPO_ROOT/target/release/shardgate}
START_TIMEOUT=${SHARDGATE_START_TIMEOUT:-60}
CONFIG=$SHARDGATE_HOME/shardgate.toml
PID_FILE=$SHARDGATE_HOME/shardgate.pid
LOG_FILE=$SHARDGATE_HOME/shardgate.log
ENV_FILE=$SHARDGATE_HOME/env

log() { printf 'run: %s\n' "$*" >&2; }
die() { printf 'run: error: %s\n' "$*" >&2; exit 1; }

for p in "$PORT" "$METRICS_PORT"; do
    if ! { [[ $p =~ ^[0-9]+$ ]] && (( p > 0 && p < 65536 )); }; then
        die "bad port '$p'"
    fi
done

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The pid of the detached shardgate of this SHARDGATE_HOME, if it is running.
running_pid() {
    local pid
    [[ -f $PID_FILE ]] || return 1
    pid=$(<"$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # Make sure the pid is still our shardgate and not a recycled pid.
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--config $CONFIG" || return 1
    echo "$pid"
}

build() {
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
    log "building shardgate (cargo build --release -p shardgate)"
    (cd "$REPO_ROOT" && cargo build --release -p shardgate >&2) || die "build failed"
}

# $SHARDGATE_HOME/shardgate.toml: the example config with our ports and the cluster's
# actual shards (one [[databases.shards]] per shard: primary first, then replicas).
write_config() {
    local blocks
    blocks=$("$CLUSTER" env | awk -F= '
        {
            url = $2
            sub(/^postgres:\/\/[^@]*@/, "", url)   # user:password@
            sub(/\/.*$/, "", url)                  # /database
            match($1, /^SHARD[0-9]+/)
            i = substr($1, 6, RLENGTH - 5) + 0
            if (count[i]++) hosts[i] = hosts[i] ", \"" url "\""; else hosts[i] = "\"" url "\""
            if (i + 1 > n) n = i + 1
        }
        END { for (i = 0; i < n; i++) printf "[[databases.shards]]\nhosts = [%s]\n", hosts[i] }')
    [[ -n $blocks ]] || die "cluster.sh env printed no servers"
    BLOCKS=$blocks awk -v port="$PORT" -v mport="$METRICS_PORT" '
        /^[[:space:]]*\[/ {
            if ($0 ~ /^[[:space:]]*\[\[databases\.shards\]\]/) {
                if (!done) { print ENVIRON["BLOCKS"]; done = 1 }
                in_shards = 1
                next
            }
            in_shards = 0
        }
        in_shards { next }
        /^[[:space:]]*listen[[:space:]]*=/ { print "listen = \"127.0.0.1:" port "\""; next }
        /^[[:space:]]*metrics_listen[[:space:]]*=/ { print "metrics_listen = \"127.0.0.1:" mport "\"   # Prometheus /metrics"; next }
        { print }
    ' "$TEMPLATE" >"$CONFIG.tmp"
    mv "$CONFIG.tmp" "$CONFIG"
    # The shard map: written once (slot moves rewrite it, so it is never overwritten);
    # a new one only when the number of shards changed (the cluster was recreated).
    local shards map=$SHARDGATE_HOME/shardmap.toml
    shards=$(grep -c '^\[\[databases\.shards\]\]' <<<"$blocks")
    if [[ ! -f $map ]] || ! grep -qx "shards = $shards" "$map"; then
        "$BIN" shardmap init --shards "$shards" --out "$map" >&2 || die "cannot write $map"
    fi
    "$BIN" check-config "$CONFIG" >&2 || die "shardgate check-config rejected $CONFIG"
}

env_lines() {
    echo "DATABASE_URL=postgres://app:app@127.0.0.1:$PORT/app"
    echo "ADMIN_URL=postgres://admin:admin@127.0.0.1:$PORT/shardgate"
    echo "METRICS_URL=http://127.0.0.1:$METRICS_PORT/metrics"
    "$CLUSTER" env
}

# Polls `SELECT 1` through shardgate until it answers, PID dies or the deadline passes.
wait_ready() { # PID
    local pid=$1 psql deadline=$(( SECONDS + START_TIMEOUT ))
    psql="$("$CLUSTER" bindir)/psql"
    until [[ $(PGCONNECT_TIMEOUT=2 "$psql" "postgres://app:app@127.0.0.1:$PORT/app" -XAtqc 'SELECT 1' 2>/dev/null) == 1 ]]; do
        kill -0 "$pid" 2>/dev/null || { log "shardgate exited before it answered"; return 1; }
        if (( SECONDS >= deadline )); then
            log "shardgate did not answer SELECT 1 on port $PORT within ${START_TIMEOUT}s"
            return 1
        fi
        sleep 0.1
    done
}

stop_pid() { # PID: SIGTERM (graceful), then SIGKILL after a deadline
    local pid=$1 deadline=$(( SECONDS + 30 ))
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if (( SECONDS >= deadline )); then
            log "shardgate (pid $pid) ignored SIGTERM for 30s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
}

start() {
    local detach=$1 do_build=$2 pid
    if pid=$(running_pid); then
        log "shardgate is already running (pid $pid); '$0 stop' stops it"
        [[ $detach == 1 ]] || exit 1
        env_lines
        return 0
    fi
    [[ $do_build == 1 ]] && build
    [[ -x $BIN ]] || die "$BIN not found; build it with: cargo build --release -p shardgate"
    "$CLUSTER" up >&2
    port_in_use "$PORT" && die "port $PORT is in use; set SHARDGATE_PORT"
    port_in_use "$METRICS_PORT" && die "port $METRICS_PORT is in use; set SHARDGATE_METRICS_PORT"
    write_config

    if [[ $detach == 1 ]]; then
        # setsid: the detached proxy leaves this terminal's process group (no Ctrl-C).
        setsid "$BIN" --config "$CONFIG" </dev/null >>"$LOG_FILE" 2>&1 &
        pid=$!
        echo "$pid" >"$PID_FILE"
        if ! wait_ready "$pid"; then
            log "last lines of $LOG_FILE:"
            tail -n 30 "$LOG_FILE" >&2 || true
            stop_pid "$pid"
            rm -f "$PID_FILE"
            die "shardgate did not start (the cluster is still up; '$0 stop' stops it)"
        fi
        env_lines | tee "$ENV_FILE"
        log "shardgate runs in the background (pid $pid, log $LOG_FILE); '$0 stop' stops it"
        return 0
    fi

    "$BIN" --config "$CONFIG" &
    pid=$!
    # Ctrl-C, SIGTERM, or shardgate exiting on its own: stop shardgate, then the cluster.
    # shellcheck disable=SC2064  # expand $pid now
    trap "trap - INT TERM; stop_pid $pid; '$CLUSTER' down; exit 130" INT TERM
    if ! wait_ready "$pid"; then
        stop_pid "$pid"
        "$CLUSTER" down
        die "shardgate did not start"
    fi
    env_lines | tee "$ENV_FILE"
    log "shardgate is ready; Ctrl-C stops it and the cluster"
    local status=0
    wait "$pid" || status=$?
    trap - INT TERM
    log "shardgate exited with status $status; stopping the cluster"
    "$CLUSTER" down
    exit "$status"
}

stop() {
    local purge=$1 pid
    if pid=$(running_pid); then
        log "stopping shardgate (pid $pid)"
        stop_pid "$pid"
    fi
    rm -f "$PID_FILE"
    if [[ $purge == 1 ]]; then
        rm -f "$CONFIG" "$CONFIG.tmp" "$LOG_FILE" "$ENV_FILE"
        "$CLUSTER" down --purge
    else
        "$CLUSTER" down
    fi
}

status() {
    local pid
    if pid=$(running_pid); then
        echo "shardgate running pid=$pid listen=127.0.0.1:$PORT"
    else
        echo "shardgate stopped"
    fi
    "$CLUSTER" status
}

usage() { sed -n '5,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

detach=0 do_build=1
case ${1:-} in
    stop)
        case ${2:-} in
            "") stop 0 ;;
            --purge) stop 1 ;;
            *) usage ;;
        esac
        ;;
    status) status ;;
    "" | --*)
        for arg in "$@"; do
            case $arg in
                --detach) detach=1 ;;
                --no-build) do_build=0 ;;
                *) usage ;;
            esac
        done
        start "$detach" "$do_build"
        ;;
    *) usage ;;
esac
