#!/usr/bin/env bash
# tests/bench/pgbench.sh: throughput and memory benchmark.
#
# Compares direct Postgres, PgBouncer (Debian package) and shardgate:
#   * throughput: every (scenario, target) pair once per round, targets in a
#     balanced order (rounds in pairs: an order, then the same backwards); reports median TPS, ratio to direct, each
#     proxy's CPU-µs per transaction (utime+stime from /proc) and failed tx;
#   * memory: RSS of PgBouncer and shardgate holding 1,000 and 10,000 idle
#     authenticated (SCRAM-SHA-256) clients.
#
# SHARDS=N (N >= 2) is the sharded mode: direct Postgres (full dataset) vs
# shardgate over N shards holding pgbench_accounts sharded by aid (the rest
# on shard 0); select-only runs with the extended and the simple protocol,
# after a correctness check through shardgate. See "sharded mode" below.
#
# Everything runs on 127.0.0.1 in a private temp dir; Postgres comes from
# deploy/local/cluster.sh (a small initdb/pg_ctl fallback is used if that
# script is absent). Not part of tests/run.sh. See tests/bench/README.md.
#
# Adding a scenario: call add_scenario in define_scenarios (id, title,
# pgbench arguments, targets). Adding a target: give it a start_<name>
# function that sets TARGET_PORT/TARGET_PID and list it in ALL_TARGETS.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=SCRIPTDIR/pgbouncer_conf.sh
source "$HERE/pgbouncer_conf.sh"

usage() {
    cat <<'EOF'
Usage: tests/bench/pgbench.sh [options]

Options (each also settable by the environment variable in brackets):
  --rounds N          rounds of the interleaved throughput run; even keeps the
                      target order balanced [ROUNDS=4]
  --duration S        seconds per pgbench run [DURATION=10]
  --scale N           pgbench -i scale factor [SCALE=10]
  --pool-size N       server connections per pool, both proxies [POOL_SIZE=20]
  --clients LIST      client counts for the throughput scenarios [CLIENTS=16,64]
  --threads N         pgbench -j for throughput runs [THREADS=2]
  --idle-clients LIST idle client counts for the memory run [IDLE_CLIENTS=1000,10000]
  --only LIST         targets to run [ONLY=direct,pgbouncer,shardgate]
  --scenarios LIST    scenarios to run, by id prefix (select-only, tpcb-like,
                      select-only-c16, ...) [SCENARIOS=all]
  --shards N          N >= 2: sharded mode, direct vs shardgate over N shards,
                      select-only with -M extended and -M simple; skips the
                      memory run unless SKIP_MEMORY=0 [SHARDS=1]
  --skip-memory       skip the memory run [SKIP_MEMORY=1]
  --skip-throughput   skip the throughput run [SKIP_THROUGHPUT=1]
  --out FILE          also write the markdown report to FILE [OUT]
  -h, --help          this text

Other environment: PG_PORT (25432), PGBOUNCER_PORT (26432),
SHARDGATE_PORT (27432; sharded mode: the shards are PG_PORT+1..PG_PORT+N),
SHARDGATE_PGO (1: the PGO build of deploy/pgo/build.sh, target/pgo/shardgate;
0: the plain target/release/shardgate; default 1), SHARDGATE_BIN (default: that
build's binary, brought up to date first unless SHARDGATE_BUILD=0),
PREPARE_UNNAMED=1 (adds target sg_prep: shardgate with prepare_unnamed = true, on
SHARDGATE_PORT+REPLICAS+1), SHARDGATE_LOG (RUST_LOG for shardgate, default warn), KEEP_TMP=1 (keep the
temp dir with every pgbench log and the proxies' configs and logs).
EOF
}

ROUNDS=${ROUNDS:-4}
DURATION=${DURATION:-10}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-20}
CLIENTS=${CLIENTS:-16,64}
THREADS=${THREADS:-2}
IDLE_CLIENTS=${IDLE_CLIENTS:-1000,10000}
SHARDS=${SHARDS:-1}
ONLY=${ONLY:-}
SCENARIOS=${SCENARIOS:-}
SKIP_MEMORY=${SKIP_MEMORY:-}
SKIP_THROUGHPUT=${SKIP_THROUGHPUT:-0}
OUT=${OUT:-}
# Below the kernel's ephemeral range (32768-60999 by default): a listen port in
# that range can be taken by the TIME_WAIT leftovers of the 10,000 clients.
PG_PORT=${PG_PORT:-25432}
PGBOUNCER_PORT=${PGBOUNCER_PORT:-26432}
SHARDGATE_PORT=${SHARDGATE_PORT:-27432}
# REPLICAS=N (default 0): the cluster gets N streaming replicas and the run adds targets
# sg_r1..sg_rN: shardgate with the primary and 1..N replicas (reads go to replicas; the
# read/write split is on), on ports SHARDGATE_PORT+1..N.
REPLICAS=${REPLICAS:-0}
# PREPARE_UNNAMED=1 (default 0; not with SHARDS): adds target sg_prep, shardgate with
# `prepare_unnamed = true` (repeated unnamed statements are prepared on the server), on
# the port after the sg_rN ones, SHARDGATE_PORT+REPLICAS+1.
PREPARE_UNNAMED=${PREPARE_UNNAMED:-0}
# SHARDGATE_PGO=1 (default): the release build with profile-guided optimisation, the
# one deploy/ ships (deploy/pgo/build.sh); 0: the plain `cargo build --release`.
SHARDGATE_PGO=${SHARDGATE_PGO:-1}
if [[ $SHARDGATE_PGO == 1 ]]; then
    DEFAULT_SHARDGATE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/pgo/shardgate
    SHARDGATE_BUILD_KIND="PGO build"
else
    DEFAULT_SHARDGATE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/shardgate
    SHARDGATE_BUILD_KIND="plain release build"
fi
SHARDGATE_BIN=${SHARDGATE_BIN:-$DEFAULT_SHARDGATE_BIN}
[[ $SHARDGATE_BIN == "$DEFAULT_SHARDGATE_BIN" ]] || SHARDGATE_BUILD_KIND="given in SHARDGATE_BIN"
SHARDGATE_BUILD=${SHARDGATE_BUILD:-1}
SHARDGATE_LOG=${SHARDGATE_LOG:-warn}
KEEP_TMP=${KEEP_TMP:-0}

while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --scale) SCALE=$2; shift ;;
        --pool-size) POOL_SIZE=$2; shift ;;
        --clients) CLIENTS=$2; shift ;;
        --threads) THREADS=$2; shift ;;
        --idle-clients) IDLE_CLIENTS=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --shards) SHARDS=$2; shift ;;
        --skip-memory) SKIP_MEMORY=1 ;;
        --skip-throughput) SKIP_THROUGHPUT=1 ;;
        --out) OUT=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

for v in ROUNDS DURATION SCALE POOL_SIZE THREADS PG_PORT PGBOUNCER_PORT SHARDGATE_PORT SHARDS REPLICAS PREPARE_UNNAMED; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a number, got '${!v}'" >&2; exit 2; }
done
((SHARDS >= 1)) || { echo "SHARDS must be at least 1" >&2; exit 2; }
if ((SHARDS > 1)); then
    ((REPLICAS == 0)) || { echo "SHARDS and REPLICAS cannot be combined" >&2; exit 2; }
    ((PREPARE_UNNAMED == 0)) || { echo "SHARDS and PREPARE_UNNAMED cannot be combined" >&2; exit 2; }
    ((SHARDS <= 64)) || { echo "SHARDS must be at most 64" >&2; exit 2; }
    ((SCALE < 20000)) || { echo "sharded mode needs SCALE < 20000 (aid integer)" >&2; exit 2; }
    if [[ ,$ONLY, == *,pgbouncer,* ]]; then
        echo "note: the sharded mode has no pgbouncer target; ignoring it in ONLY" >&2
    fi
    ONLY=${ONLY:-direct,shardgate}
    ONLY=${ONLY//pgbouncer/}
    SKIP_MEMORY=${SKIP_MEMORY:-1}
fi
ONLY=${ONLY:-direct,pgbouncer,shardgate}
SKIP_MEMORY=${SKIP_MEMORY:-0}
CLIENTS=${CLIENTS//,/ }
IDLE_CLIENTS=${IDLE_CLIENTS//,/ }
ONLY=" ${ONLY//,/ } "
for c in $CLIENTS $IDLE_CLIENTS; do
    [[ $c =~ ^[0-9]+$ ]] || { echo "client counts must be numbers, got '$c'" >&2; exit 2; }
done

export PGPASSWORD=app PGUSER=app PGDATABASE=app PGHOST=127.0.0.1 PGSSLMODE=disable
export PGCONNECT_TIMEOUT=30

# ---------------------------------------------------------------------------
# helpers

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
selected() { [[ $ONLY == *" $1 "* ]]; }
now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }

# Runs "$@" as $RUN_USER (postgres when we are root: neither Postgres nor
# PgBouncer runs as root). setpriv execs, so "$!" of a background
# "${RUN_AS[@]}" cmd & is the PID of cmd itself.
run_as_prefix() { # user -> RUN_AS array
    RUN_AS=()
    if [[ $(id -u) -eq 0 && $1 != root ]]; then
        RUN_AS=(setpriv "--reuid=$1" "--regid=$1" --init-groups --)
    fi
}
as_run_user() {
    local RUN_AS
    run_as_prefix "$RUN_USER"
    "${RUN_AS[@]}" "$@"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Established TCP connections whose local port is $1 (the server side of a
# proxy's clients). /proc/net/tcp: local address is field 2 (hex port after
# the colon), state is field 4 (01 = ESTABLISHED). Only IPv4: we use 127.0.0.1.
established() {
    awk -v p=":$(printf '%04X' "$1")" 'substr($2, length($2) - 4) == p && $4 == "01" { n++ }
        END { print n + 0 }' /proc/net/tcp
}

# utime+stime of a whole process (all threads), in clock ticks. Fields 14 and
# 15 of /proc/PID/stat; the comm field (2) may hold spaces, so cut after ')'.
cpu_ticks() {
    local s
    s=$(<"/proc/$1/stat") || return 1
    s=${s##*) }
    awk '{ print $12 + $13 }' <<<"$s"
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# Stops a process we started, by PID: SIGTERM, then SIGKILL after a deadline.
stop_pid() {
    local pid=$1 deadline
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(($(now_ms) + 15000))
    while alive "$pid" && (($(now_ms) < deadline)); do sleep 0.05; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}

# Runs "$@" in the background and waits for it, so that a signal reaches our
# traps at once (bash defers traps while a foreground command runs) and
# cleanup can stop it by PID.
run_waited() {
    local rc=0
    "$@" &
    BG_PID=$!
    wait "$BG_PID" || rc=$?
    BG_PID=
    return "$rc"
}

wait_port() { # port deadline_s pid
    local deadline=$(($(now_ms) + $2 * 1000))
    while (($(now_ms) < deadline)); do
        port_open "$1" && return 0
        [[ -n ${3:-} ]] && ! alive "$3" && return 1
        sleep 0.05
    done
    return 1
}

pg_bindir() {
    local d
    if d=$(pg_config --bindir 2>/dev/null) && [[ -x $d/initdb ]]; then echo "$d"; return; fi
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    [[ -x $d/initdb ]] && { echo "$d"; return; }
    d=$(dirname "$(command -v initdb)") && echo "$d"
}

psql_direct() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -At "$@"; }

median() { # numbers on stdin, NA ignored; prints NA if none
    { grep -v '^NA$' || true; } | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "NA"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ---------------------------------------------------------------------------
# setup: temp dir, limits, packages

WORK=$(mktemp -d /tmp/shardgate-bench.XXXXXX)
chmod 755 "$WORK"
cd "$WORK"
RUN_USER=$(id -un)
if [[ $(id -u) -eq 0 ]]; then
    getent passwd postgres >/dev/null || die "running as root needs a 'postgres' OS user (install postgresql)"
    RUN_USER=postgres
fi

declare -A TARGET_PORT=() TARGET_PID=() TARGET_NOTE=()
CLUSTER_MODE=
BG_PID=

# Our own stdout/stderr, for cleanup: a trap may fire inside a redirected call.
exec {OUT_FD}>&1 {ERR_FD}>&2

cleanup() {
    local rc=$? t pidfile pid deadline
    trap - EXIT INT TERM
    exec 1>&"$OUT_FD" 2>&"$ERR_FD"
    stop_pid "$BG_PID"
    for t in "${!TARGET_PID[@]}"; do stop_pid "${TARGET_PID[$t]}"; done
    if [[ $CLUSTER_MODE == cluster.sh ]]; then
        if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
            cluster_sh down >/dev/null 2>&1 || log "cluster.sh down failed"
        else
            cluster_sh down --purge >/dev/null 2>&1 || log "cluster.sh down failed"
        fi
    fi
    # Whatever postmaster is still running under our home: fast shutdown by PID.
    if [[ -d $WORK/cluster ]]; then
        while IFS= read -r pidfile; do
            pid=$(head -n1 "$pidfile" 2>/dev/null) || continue
            if ! [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == postgres ]]; then
                continue
            fi
            kill -INT "$pid" 2>/dev/null || true
            deadline=$(($(now_ms) + 30000))
            while alive "$pid" && (($(now_ms) < deadline)); do sleep 0.1; done
        done < <(find -L "$WORK/cluster" -name postmaster.pid 2>/dev/null)
    fi
    if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
        log "temp dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Enough descriptors for 10,000 idle clients (pgbench and the proxies inherit).
ulimit -Hn 65536 2>/dev/null || true
HARD_NOFILE=$(ulimit -Hn)
if [[ $HARD_NOFILE == unlimited ]] || ((HARD_NOFILE >= 65536)); then
    ulimit -Sn 65536
else
    ulimit -Sn "$HARD_NOFILE"
fi
NOFILE=$(ulimit -Sn)

if ! command -v pgbench >/dev/null || ! command -v psql >/dev/null; then
    # A fresh machine: cluster.sh knows how to install PostgreSQL.
    if [[ -f $REPO/deploy/local/cluster.sh ]]; then
        bash "$REPO/deploy/local/cluster.sh" install >&2
    fi
    d=$(pg_bindir) && PATH=$d:$PATH
fi
for tool in pgbench psql setpriv awk getconf; do
    command -v "$tool" >/dev/null || die "missing $tool"
done

PGBOUNCER=
if selected pgbouncer; then
    PGBOUNCER=$(command -v pgbouncer || true)
    [[ -z $PGBOUNCER && -x /usr/sbin/pgbouncer ]] && PGBOUNCER=/usr/sbin/pgbouncer
    if [[ -z $PGBOUNCER ]]; then
        [[ $(id -u) -eq 0 ]] || die "pgbouncer is not installed (apt-get install pgbouncer)"
        log "installing pgbouncer (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq pgbouncer >&2
        PGBOUNCER=/usr/sbin/pgbouncer
    fi
fi

# ---------------------------------------------------------------------------
# Postgres

MAX_CLIENTS=0
for c in $CLIENTS; do ((c > MAX_CLIENTS)) && MAX_CLIENTS=$c; done
# direct clients + both proxies' pools (they keep idle server connections
# while the other targets run) + psql and headroom.
NEED_CONNECTIONS=$((MAX_CLIENTS + 2 * POOL_SIZE + 20))
((NEED_CONNECTIONS < 100)) && NEED_CONNECTIONS=100

# Sharded mode: cluster.sh's shard 0 is the direct server (full dataset) and
# its shards 1..N are shardgate's shards 0..N-1 (see shard_port).
CLUSTER_SERVERS=1
((SHARDS > 1)) && CLUSTER_SERVERS=$((SHARDS + 1))

cluster_sh() {
    SHARDGATE_HOME=$WORK/cluster SHARDGATE_PG_PORT=$PG_PORT SHARDGATE_SHARDS=$CLUSTER_SERVERS \
        SHARDGATE_REPLICAS=$REPLICAS bash "$REPO/deploy/local/cluster.sh" "$@"
}

# Minimal stand-in used only when deploy/local/cluster.sh is absent: same
# contract (database app, user app/app, scram over TCP, 127.0.0.1 only).
fallback_cluster_up() {
    local bindir data=$WORK/cluster/pg$PG_PORT sock=$WORK/cluster/sock
    bindir=$(pg_bindir) || die "initdb not found"
    mkdir -p "$WORK/cluster" "$sock"
    [[ $(id -u) -eq 0 ]] && chown -R "$RUN_USER" "$WORK/cluster"
    as_run_user "$bindir/initdb" -D "$data" -U postgres -E UTF8 --no-sync \
        --auth-local=trust --auth-host=scram-sha-256 >"$WORK/cluster/initdb.log" 2>&1 ||
        { cat "$WORK/cluster/initdb.log" >&2; die "initdb failed"; }
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$sock'
max_connections = $NEED_CONNECTIONS
password_encryption = 'scram-sha-256'
EOF
    as_run_user "$bindir/pg_ctl" -D "$data" -l "$WORK/cluster/postgres.log" -w -t 60 start >/dev/null ||
        { cat "$WORK/cluster/postgres.log" >&2; die "postgres did not start"; }
    as_run_user "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$PG_PORT" -U postgres -d postgres \
        -c "CREATE ROLE app LOGIN PASSWORD 'app'" -c "CREATE DATABASE app OWNER app" >/dev/null
}

# Raises max_connections of the (cluster.sh) server if it is too low:
# ALTER SYSTEM over the unix socket, then pg_ctl restart with the same options.
ensure_max_connections() {
    local cur pidfile data sock bindir owner
    cur=$(psql_direct -c 'SHOW max_connections')
    ((cur >= NEED_CONNECTIONS)) && return 0
    log "raising max_connections $cur -> $NEED_CONNECTIONS"
    pidfile=$(find -L "$WORK/cluster" -name postmaster.pid -exec awk -v p="$PG_PORT" \
        'FNR == 4 && $1 == p { print FILENAME }' {} + | head -n1)
    [[ -n $pidfile ]] || die "no postmaster.pid for port $PG_PORT under $WORK/cluster"
    data=$(dirname "$pidfile")
    sock=$(sed -n 5p "$pidfile")
    owner=$(stat -c %U "$data")
    bindir=$(dirname "$(head -n1 "$data/postmaster.opts" | awk '{ print $1 }')")
    [[ -x $bindir/pg_ctl ]] || bindir=$(pg_bindir)
    if ! RUN_USER=$owner as_run_user "$bindir/psql" -X -q -h "$sock" -p "$PG_PORT" -U postgres -d postgres \
        -c "ALTER SYSTEM SET max_connections = $NEED_CONNECTIONS" >/dev/null 2>&1; then
        echo "max_connections = $NEED_CONNECTIONS" >>"$data/postgresql.auto.conf"
    fi
    RUN_USER=$owner as_run_user "$bindir/pg_ctl" -D "$data" -w -t 120 -m fast restart >/dev/null
    cur=$(psql_direct -c 'SHOW max_connections')
    ((cur >= NEED_CONNECTIONS)) || die "max_connections is still $cur (need $NEED_CONNECTIONS)"
}

start_postgres() {
    local p
    for ((p = PG_PORT; p < PG_PORT + CLUSTER_SERVERS; p++)); do
        port_open "$p" && die "port $p is already in use (set PG_PORT)"
    done
    if [[ -f $REPO/deploy/local/cluster.sh ]]; then
        if ((SHARDS > 1)); then
            log "starting Postgres with deploy/local/cluster.sh: direct on port $PG_PORT, shards on $((PG_PORT + 1))-$((PG_PORT + SHARDS))"
        else
            log "starting Postgres with deploy/local/cluster.sh on port $PG_PORT"
        fi
        CLUSTER_MODE=cluster.sh
        cluster_sh up >"$WORK/cluster-up.log" 2>&1 ||
            { cat "$WORK/cluster-up.log" >&2; die "cluster.sh up failed"; }
    else
        ((SHARDS == 1)) || die "the sharded mode needs deploy/local/cluster.sh"
        log "deploy/local/cluster.sh not found: using the initdb/pg_ctl fallback on port $PG_PORT"
        CLUSTER_MODE=fallback
        fallback_cluster_up
    fi
    local deadline=$(($(now_ms) + 60000))
    until psql_direct -c 'SELECT 1' >/dev/null 2>&1; do
        (($(now_ms) < deadline)) || die "cannot log in to 127.0.0.1:$PG_PORT as app"
        sleep 0.1
    done
    ensure_max_connections
    PG_VERSION=$(psql_direct -c 'SHOW server_version')
    TARGET_PORT[direct]=$PG_PORT
}

# ---------------------------------------------------------------------------
# targets: each start_<name> sets TARGET_PORT[name], TARGET_PID[name]

if ((SHARDS > 1)); then
    ALL_TARGETS=(direct shardgate)
    MEM_TARGETS=(shardgate)
else
    ALL_TARGETS=(direct pgbouncer shardgate)
    MEM_TARGETS=(pgbouncer shardgate)
fi

start_direct() { TARGET_PORT[direct]=$PG_PORT; }

start_pgbouncer() {
    local dir=$WORK/pgbouncer pid
    write_pgbouncer_conf "$dir" "$PG_PORT" "$PGBOUNCER_PORT" "$POOL_SIZE"
    [[ $(id -u) -eq 0 ]] && chown -R "$RUN_USER" "$dir"
    # Our own process and ini; the Debian package's service is never used.
    run_as_prefix "$RUN_USER"
    "${RUN_AS[@]}" "$PGBOUNCER" "$dir/pgbouncer.ini" >>"$dir/stderr.log" 2>&1 &
    pid=$!
    TARGET_PID[pgbouncer]=$pid
    TARGET_PORT[pgbouncer]=$PGBOUNCER_PORT
    wait_port "$PGBOUNCER_PORT" 30 "$pid" ||
        { tail -n 20 "$dir/pgbouncer.log" "$dir/stderr.log" >&2; die "pgbouncer did not start"; }
}

# The default binary is (re)built first (cargo is a no-op when it is up to date; the
# PGO build reruns its training, about 8 minutes), so a stale build is never measured
# by accident. If the build fails, an existing binary is used with a warning.
ensure_shardgate_bin() {
    if [[ $SHARDGATE_BUILD == 1 && $SHARDGATE_BIN == "$DEFAULT_SHARDGATE_BIN" ]] &&
        command -v cargo >/dev/null; then
        local build=(cargo build --release -p shardgate --manifest-path "$REPO/Cargo.toml")
        [[ $SHARDGATE_PGO == 1 ]] && build=("$REPO/deploy/pgo/build.sh" --out "$SHARDGATE_BIN")
        log "building shardgate (${build[*]})"
        if ! run_waited "${build[@]}" >"$WORK/cargo-build.log" 2>&1; then
            tail -n 30 "$WORK/cargo-build.log" >&2
            if [[ -x $SHARDGATE_BIN ]]; then
                log "warning: the build failed; using the existing (older) $SHARDGATE_BIN"
                SHARDGATE_STALE=" (stale: the build failed)"
            else
                TARGET_NOTE[shardgate]="the build failed"
                return 1
            fi
        fi
    fi
    [[ -x $SHARDGATE_BIN ]] || { TARGET_NOTE[shardgate]="binary missing ($SHARDGATE_BIN)"; return 1; }
}

git_rev() {
    local rev
    rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) || { echo '?'; return; }
    if [[ -n $(git -C "$REPO" status --porcelain -- proxy config router shardmap Cargo.toml Cargo.lock 2>/dev/null) ]]; then
        rev+="+uncommitted changes"
    fi
    echo "$rev"
}

shard_toml() { # hosts (quoted, for TOML) -> one [[databases.shards]] entry
    printf '[[databases.shards]]\nhosts = [%s]\n' "$1"
}

# Sharded mode: sharded_db_toml (below) lists the sharded table and the shards.
start_shardgate() {
    if ((SHARDS > 1)); then
        start_shardgate_with shardgate "$SHARDGATE_PORT" "$(sharded_db_toml)"
    else
        start_shardgate_with shardgate "$SHARDGATE_PORT" "$(shard_toml "\"127.0.0.1:$PG_PORT\"")"
    fi
}

replica_hosts() { # N -> "127.0.0.1:primary", "127.0.0.1:replica1", ... (quoted, for TOML)
    local list="\"127.0.0.1:$PG_PORT\"" j
    for ((j = 1; j <= $1; j++)); do list+=", \"127.0.0.1:$((PG_PORT + j))\""; done
    echo "$list"
}
SG_PREP_PORT=$((SHARDGATE_PORT + REPLICAS + 1))
start_sg_prep() {
    start_shardgate_with sg_prep "$SG_PREP_PORT" "$(shard_toml "\"127.0.0.1:$PG_PORT\"")" \
        "prepare_unnamed = true"
}
# sg_rN: the primary and N replicas.
for ((r = 1; r <= REPLICAS; r++)); do
    eval "start_sg_r$r() { start_shardgate_with sg_r$r \$((SHARDGATE_PORT + $r)) \"\$(shard_toml \"\$(replica_hosts $r)\")\"; }"
done

start_shardgate_with() { # target port database-toml (what follows name = "app") [general-lines]
    local t=$1 port=$2 db_toml=$3 dir=$WORK/$1 pid
    mkdir -p "$dir"
    cat >"$dir/shardgate.toml" <<EOF
[general]
listen = "127.0.0.1:$port"
pool_mode = "transaction"
pool_size = $POOL_SIZE
checkout_timeout = "30s"
client_login_timeout = "60s"
${4:-}

[[users]]
name = "app"
password = "app"
auth = "scram-sha-256"

[[databases]]
name = "app"
$db_toml
EOF
    if ! "$SHARDGATE_BIN" check-config "$dir/shardgate.toml" >"$dir/check-config.log" 2>&1; then
        cat "$dir/shardgate.toml" "$dir/check-config.log" >&2
        mark_down "$t" "config rejected by shardgate check-config: $(head -c 200 "$dir/check-config.log" | tr '\n' ' ')"
        return 1
    fi
    RUST_LOG=$SHARDGATE_LOG "$SHARDGATE_BIN" --config "$dir/shardgate.toml" >>"$dir/shardgate.log" 2>&1 &
    pid=$!
    TARGET_PID[$t]=$pid
    TARGET_PORT[$t]=$port
    if ! wait_port "$port" 30 "$pid"; then
        tail -n 20 "$dir/shardgate.log" >&2
        mark_down "$t" "did not start (see log above)"
        return 1
    fi
}

stop_target() {
    local t=$1
    [[ -n ${TARGET_PID[$t]:-} ]] || return 0
    stop_pid "${TARGET_PID[$t]}"
    unset "TARGET_PID[$t]"
}

mark_down() { # target note: stopped and left out of the remaining runs
    stop_target "$1"
    unset "TARGET_PORT[$1]"
    TARGET_NOTE[$1]=$2
}

# Starts a target and checks that app can log in and see the pgbench tables.
start_target() {
    local t=$1
    if port_open "$2"; then
        mark_down "$t" "port $2 is already in use"
        return 1
    fi
    "start_$t" || return 1
    if ! psql -X -At -h 127.0.0.1 -p "${TARGET_PORT[$t]}" -c 'SELECT count(*) FROM pgbench_branches' \
        >"$WORK/check-$t.log" 2>&1; then
        cat "$WORK/check-$t.log" >&2
        mark_down "$t" "login or query through it failed"
        return 1
    fi
}

# ---------------------------------------------------------------------------
# sharded mode (SHARDS=N >= 2): pgbench_accounts sharded by aid over N shards
#
# The direct server (cluster.sh shard 0, PG_PORT) keeps the full dataset and is
# the baseline. shardgate's shard k is cluster.sh shard k+1 (port PG_PORT+1+k).
# The shards get the direct server's rows by COPY, each shard only the rows
# whose slot it owns under shardgate's default map (no shard_map file): every
# shard one contiguous run of the 4096 slots, in shard order, SLOTS/N each (the
# first SLOTS%N shards one more). pgbench_branches and pgbench_tellers live on
# shard 0 (tables not listed as sharded go there), pgbench_history too (empty);
# the other shards have pgbench_accounts only.

SLOTS=4096
SAMPLE_AIDS=()  # keyed-select probes, three per shard (set by load_shards)
SHARD_ROWS=     # "shard 0: n rows (slots lo-hi), ..." for the report
SHARDED_CHECK=  # outcome of check_sharded, for the report

# The slot of an aid as shardgate computes it (Postgres's hash partitioning
# hash of the key as bigint; modulus SLOTS).
slot_sql() { echo "((hashint8extended($1::bigint, 8816678312871386365) % $SLOTS) + $SLOTS + 2275) % $SLOTS"; }

shard_port() { echo $((PG_PORT + 1 + $1)); }

shard_range() { # shard -> "lo hi", its slots under the default map
    local k=$1 q=$((SLOTS / SHARDS)) r=$((SLOTS % SHARDS)) lo n
    lo=$((k * q + (k < r ? k : r)))
    n=$((q + (k < r ? 1 : 0)))
    echo "$lo $((lo + n - 1))"
}

psql_shard() { # shard psql-args...
    local k=$1
    shift
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(shard_port "$k")" -At "$@"
}

sharded_db_toml() {
    local k
    printf '[[databases.sharded_tables]]\nname = "pgbench_accounts"\ncolumn = "aid"\ntype = "integer"\n'
    for ((k = 0; k < SHARDS; k++)); do
        shard_toml "\"127.0.0.1:$(shard_port "$k")\""
    done
}

# Needs pgbench -i done on the direct server.
load_shards() {
    local k lo hi aids t
    for ((k = 0; k < SHARDS; k++)); do
        read -r lo hi < <(shard_range "$k")
        log "shard $k (port $(shard_port "$k"), slots $lo-$hi): loading its pgbench_accounts rows"
        # pgbench's own tables (drop + create), empty; keys after the load.
        run_waited pgbench -i -q -I dt -s "$SCALE" -h 127.0.0.1 -p "$(shard_port "$k")" app \
            >>"$WORK/pgbench-init-shards.log" 2>&1 ||
            { cat "$WORK/pgbench-init-shards.log" >&2; die "pgbench -i -I dt failed on shard $k"; }
        psql_direct -c "COPY (SELECT * FROM pgbench_accounts WHERE $(slot_sql aid) BETWEEN $lo AND $hi) TO STDOUT" |
            psql_shard "$k" -c 'COPY pgbench_accounts FROM STDIN'
        if ((k == 0)); then
            for t in pgbench_branches pgbench_tellers; do
                psql_direct -c "COPY $t TO STDOUT" | psql_shard 0 -c "COPY $t FROM STDIN"
            done
            psql_shard 0 -c 'ALTER TABLE pgbench_branches ADD PRIMARY KEY (bid)' \
                -c 'ALTER TABLE pgbench_tellers ADD PRIMARY KEY (tid)'
        else
            psql_shard "$k" -c 'DROP TABLE pgbench_branches, pgbench_tellers, pgbench_history'
        fi
        psql_shard "$k" -c 'ALTER TABLE pgbench_accounts ADD PRIMARY KEY (aid)'
        # Probes: the lowest, the middle and the highest aid of the shard.
        mapfile -t aids < <(psql_shard "$k" -c "SELECT min(aid) FROM pgbench_accounts
            UNION ALL (SELECT aid FROM pgbench_accounts ORDER BY aid
                OFFSET (SELECT count(*) / 2 FROM pgbench_accounts) LIMIT 1)
            UNION ALL SELECT max(aid) FROM pgbench_accounts")
        if ((${#aids[@]} != 3)) || [[ -z ${aids[0]} ]]; then
            die "shard $k got no pgbench_accounts rows"
        fi
        SAMPLE_AIDS+=("${aids[@]}")
    done
    # Probes get a balance of their own (-aid; pgbench starts every one at 0),
    # on the direct server and the shards alike, so that a keyed select that
    # returns some other row shows.
    aids=$(IFS=,; echo "${SAMPLE_AIDS[*]}")
    psql_direct -c "UPDATE pgbench_accounts SET abalance = -aid WHERE aid IN ($aids)" \
        -c 'VACUUM ANALYZE pgbench_accounts'
    for ((k = 0; k < SHARDS; k++)); do
        psql_shard "$k" -c "UPDATE pgbench_accounts SET abalance = -aid WHERE aid IN ($aids)"
        if ((k == 0)); then
            psql_shard 0 -c 'VACUUM ANALYZE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history'
        else
            psql_shard "$k" -c 'VACUUM ANALYZE pgbench_accounts'
        fi
    done
}

# Checks on the servers themselves: every shard holds only rows of its own
# slots, the shards together hold all 100000*SCALE rows, shard 0 has the
# whole pgbench_branches/pgbench_tellers and the others none.
verify_shards() {
    local k lo hi n bad total=0 want=$((100000 * SCALE)) line
    for ((k = 0; k < SHARDS; k++)); do
        read -r lo hi < <(shard_range "$k")
        IFS='|' read -r n bad < <(psql_shard "$k" -c "SELECT count(*),
            count(*) FILTER (WHERE NOT ($(slot_sql aid) BETWEEN $lo AND $hi)) FROM pgbench_accounts")
        ((bad == 0)) || die "shard $k holds $bad pgbench_accounts rows of other shards' slots"
        total=$((total + n))
        SHARD_ROWS+="${SHARD_ROWS:+, }shard $k: $n rows (slots $lo-$hi)"
        if ((k == 0)); then
            line=$(psql_shard 0 -c 'SELECT (SELECT count(*) FROM pgbench_branches) || $$ $$ ||
                (SELECT count(*) FROM pgbench_tellers)')
            [[ $line == "$SCALE $((10 * SCALE))" ]] ||
                die "shard 0 has '$line' pgbench_branches/pgbench_tellers rows, want '$SCALE $((10 * SCALE))'"
        else
            line=$(psql_shard "$k" -c "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pgbench%'")
            [[ $line == 1 ]] || die "shard $k has $line pgbench tables, want pgbench_accounts only"
        fi
    done
    ((total == want)) || die "the shards hold $total pgbench_accounts rows, want $want"
    n=$(psql_direct -c 'SELECT count(*) FROM pgbench_accounts')
    ((n == want)) || die "the direct server holds $n pgbench_accounts rows, want $want"
    log "row placement verified: $SHARD_ROWS"
}

# The shard of every probe as shardgate's own code computes it (the default
# map = what `shardgate shardmap init` writes) must be the shard that holds
# it; checks the slot SQL and shard_range against the binary.
crosscheck_slots() {
    local k got
    if ! "$SHARDGATE_BIN" shardmap init --shards "$SHARDS" --slots "$SLOTS" --out "$WORK/shardmap.toml" \
        >"$WORK/shardmap.log" 2>&1; then
        log "note: shardgate shardmap init failed, slot cross-check skipped: $(head -n1 "$WORK/shardmap.log")"
        return 0
    fi
    for ((k = 0; k < ${#SAMPLE_AIDS[@]}; k++)); do
        got=$("$SHARDGATE_BIN" shardmap slot "${SAMPLE_AIDS[$k]}" --type int4 --map "$WORK/shardmap.toml" 2>&1) || true
        [[ $got == *" shard $((k / 3))" ]] ||
            die "shardgate shardmap slot ${SAMPLE_AIDS[$k]} says '$got', but the row was placed on shard $((k / 3))"
    done
    log "slot cross-check: shardgate's shard map puts all ${#SAMPLE_AIDS[@]} probes on the shards that hold them"
}

# Keyed selects of the probes, printed one balance a line (pgbench's debug()
# output): the same statement as pgbench -S, in protocol $2.
probe_balances() { # port mode
    local logf=$WORK/probe-$1-$2.log aid
    for aid in "${SAMPLE_AIDS[@]}"; do
        printf '\\set aid %s\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid \\gset\n\\set b debug(:abalance)\n' "$aid"
    done >"$WORK/probe.sql"
    pgbench -n -t 1 -c 1 -M "$2" -h 127.0.0.1 -p "$1" -f "$WORK/probe.sql" app >"$logf" 2>&1 ||
        { sed 's/^/    /' "$logf" >&2; return 1; }
    sed -n 's/^debug(script=[0-9]*,command=[0-9]*): int \(-\{0,1\}[0-9]*\)$/\1/p' "$logf"
}

# Before timing: through shardgate, count(*) over all shards and the probes'
# balances (simple and extended protocol) must equal the direct server's.
check_sharded() {
    local port=${TARGET_PORT[shardgate]:-} want=$((100000 * SCALE)) n expect got m aid
    [[ -n $port ]] || return 0
    log "correctness check through shardgate"
    expect=$(probe_balances "$PG_PORT" extended) || die "probe script failed on the direct server"
    [[ $expect == "$(for aid in "${SAMPLE_AIDS[@]}"; do echo "-$aid"; done)" ]] ||
        die "probe script: unexpected balances on the direct server: $(echo "$expect" | tr '\n' ' ')"
    n=$(psql -X -At -h 127.0.0.1 -p "$port" -c 'SELECT count(*) FROM pgbench_accounts' 2>&1) || true
    [[ $n == "$want" ]] || SHARDED_CHECK="SELECT count(*) FROM pgbench_accounts returned '$n', want $want"
    for m in simple extended; do
        if ! got=$(probe_balances "$port" "$m"); then
            got="keyed selects ($m protocol) failed (pgbench log above)"
        elif [[ $got != "$expect" ]]; then
            got="keyed selects ($m protocol) of aid ${SAMPLE_AIDS[*]} returned abalance $(echo "$got" | tr '\n' ' ')want $(echo "$expect" | tr '\n' ' ')"
        else
            continue
        fi
        SHARDED_CHECK+="${SHARDED_CHECK:+; }$got"
    done
    if [[ -n $SHARDED_CHECK ]]; then
        SHARDED_CHECK="failed: $SHARDED_CHECK"
        log "ERROR: shardgate correctness check $SHARDED_CHECK"
        mark_down shardgate "correctness check $SHARDED_CHECK"
        return 1
    fi
    SHARDED_CHECK="passed: count(*) = $want; keyed selects of ${#SAMPLE_AIDS[@]} aids (3 per shard), simple and extended protocol, match the direct server"
    log "correctness check $SHARDED_CHECK"
}

# ---------------------------------------------------------------------------
# scenarios: id -> title, pgbench arguments, targets

SCEN_IDS=()
declare -A SCEN_TITLE=() SCEN_ARGS=() SCEN_TARGETS=()

add_scenario() { # id title "pgbench args" ["targets"]
    if [[ -n $SCENARIOS ]]; then
        local p wanted=0
        for p in ${SCENARIOS//,/ }; do [[ $1 == "$p"* ]] && wanted=1; done
        ((wanted)) || return 0
    fi
    SCEN_IDS+=("$1")
    SCEN_TITLE[$1]=$2
    SCEN_ARGS[$1]=$3
    SCEN_TARGETS[$1]=${4:-${ALL_TARGETS[*]}}
}

define_scenarios() {
    local c m
    if ((SHARDS > 1)); then
        # Keyed reads only: tpcb-like writes pgbench_accounts (sharded) and the
        # shard-0 tables in one transaction, a cross-shard write.
        for m in extended simple; do
            for c in $CLIENTS; do
                add_scenario "select-only-$m-c$c" \
                    "select-only (-S), $m protocol, $c clients, $SHARDS shards" \
                    "-S -M $m -c $c -j $THREADS"
            done
        done
        return
    fi
    for c in $CLIENTS; do
        add_scenario "select-only-c$c" "select-only (-S), extended protocol, $c clients" \
            "-S -M extended -c $c -j $THREADS"
    done
    for c in $CLIENTS; do
        add_scenario "tpcb-like-c$c" "tpcb-like, extended protocol, $c clients" \
            "-M extended -c $c -j $THREADS"
    done
}

# Before every run, on the direct server: what pgbench's own vacuum step does
# (we pass -n so pgbench never vacuums through a proxy).
prepare_run() {
    psql_direct -c 'VACUUM pgbench_branches' -c 'VACUUM pgbench_tellers' \
        -c 'TRUNCATE pgbench_history' >/dev/null
}

RAW=$WORK/raw.tsv # scenario round target tps tx failed latency_ms cpu_us_per_tx

run_one() { # scenario round target
    local s=$1 r=$2 t=$3 port pid logf clients c0 c1 deadline rc=0 tps tx failed lat cpu=NA
    port=${TARGET_PORT[$t]}
    pid=${TARGET_PID[$t]:-}
    logf=$WORK/runs/$s.$r.$t.log
    mkdir -p "$WORK/runs"
    prepare_run
    clients=$(awk '{ for (i = 1; i < NF; i++) if ($i == "-c") print $(i + 1) }' <<<"${SCEN_ARGS[$s]}")
    # shellcheck disable=SC2086 # the scenario's arguments are words
    pgbench -n -h 127.0.0.1 -p "$port" -T "$DURATION" ${SCEN_ARGS[$s]} app >"$logf" 2>&1 &
    BG_PID=$!
    if [[ -n $pid ]]; then
        # Start counting the proxy's CPU once all clients are connected, so
        # the SCRAM logins are not charged to the transactions.
        deadline=$(($(now_ms) + 60000))
        while alive "$BG_PID" && (($(established "$port") < clients)) && (($(now_ms) < deadline)); do
            sleep 0.02
        done
        c0=$(cpu_ticks "$pid")
    fi
    wait "$BG_PID" || rc=$?
    BG_PID=
    [[ -n $pid ]] && c1=$(cpu_ticks "$pid")
    tps=$(awk '/^tps = / && /(without|excluding)/ { print $3 }' "$logf")
    tx=$(awk -F': ' '/^number of transactions actually processed/ { split($2, a, "/"); print a[1] }' "$logf")
    failed=$(awk '/^number of failed transactions/ { print $5 }' "$logf")
    lat=$(awk '/^latency average/ { print $4 }' "$logf")
    [[ -n $tps && -n $tx && $rc -eq 0 ]] || {
        log "pgbench failed (rc=$rc) for $s/$t, log $logf:"
        tail -n 5 "$logf" >&2
        [[ -n $tps ]] || tps=NA
        [[ -n $tx ]] || tx=NA
    }
    [[ -n $failed ]] || failed=0
    [[ -n $lat ]] || lat=NA
    if [[ -n $pid && $tx != NA && $tx -gt 0 ]]; then
        cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$tx" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$r" "$t" "$tps" "$tx" "$failed" "$lat" "$cpu" >>"$RAW"
    log "  $t: tps=$tps tx=$tx failed=$failed latency=${lat}ms cpu_us_per_tx=$cpu"
}

run_throughput() {
    local r s t i n order
    : >"$RAW"
    for ((r = 1; r <= ROUNDS; r++)); do
        for s in "${SCEN_IDS[@]}"; do
            # Targets of this scenario that are up, in a balanced order: rounds come
            # in pairs, the second of a pair runs the first's order backwards, and each
            # pair starts one place further on. A plain rotation would run one proxy
            # right after the other in two rounds of three (with three targets), and a
            # run right after another load tends to be the slower one; with pairs,
            # every target goes before every other in half the rounds (even ROUNDS).
            order=()
            for t in ${SCEN_TARGETS[$s]}; do
                [[ -n ${TARGET_PORT[$t]:-} ]] && order+=("$t")
            done
            n=${#order[@]}
            ((n > 0)) || continue
            log "round $r/$ROUNDS: $s (pgbench ${SCEN_ARGS[$s]} -T $DURATION)"
            for ((i = 0; i < n; i++)); do
                if ((r % 2 == 1)); then
                    run_one "$s" "$r" "${order[$(((i + (r - 1) / 2) % n))]}"
                else
                    run_one "$s" "$r" "${order[$(((n - 1 - i + (r - 1) / 2) % n))]}"
                fi
            done
        done
    done
}

# ---------------------------------------------------------------------------
# memory: RSS of a fresh proxy before and while N idle authenticated clients
# are connected (pgbench clients that only run "\sleep").

# Waits (up to 60 s) until process $1 stays near idle for 1 s: at most one
# clock tick of CPU in each of five 0.2 s intervals (a login storm uses ~all).
wait_quiet() {
    local prev c quiet=0 deadline=$(($(now_ms) + 60000))
    prev=$(cpu_ticks "$1")
    while ((quiet < 5)) && (($(now_ms) < deadline)); do
        sleep 0.2
        c=$(cpu_ticks "$1")
        if ((c - prev <= 1)); then quiet=$((quiet + 1)); else quiet=0; fi
        prev=$c
    done
}

MEM=$WORK/mem.tsv # target clients rss_before_kib rss_after_kib note

measure_idle() { # target clients
    local t=$1 n=$2 pid port before after deadline c note=
    stop_target "$t"
    "start_$t" || { printf '%s\t%s\tNA\tNA\tstart failed\n' "$t" "$n" >>"$MEM"; return; }
    pid=${TARGET_PID[$t]}
    port=${TARGET_PORT[$t]}
    # One real query first, so the pool and the server parameters exist.
    psql -X -At -h 127.0.0.1 -p "$port" -c 'SELECT 1' >/dev/null
    deadline=$(($(now_ms) + 10000))
    while (($(established "$port") > 0)) && (($(now_ms) < deadline)); do sleep 0.05; done
    before=$(rss_kib "$pid")
    log "memory: $t with $n idle clients (RSS before: ${before} KiB)"
    pgbench -n -h 127.0.0.1 -p "$port" -c "$n" -j 2 -T 3600 -f "$WORK/idle.sql" app \
        >"$WORK/idle-$t-$n.log" 2>&1 &
    BG_PID=$!
    # Wait until all N are connected and the proxy is quiet (the last logins
    # are done). Counting sockets while they churn is approximate, so count
    # again once quiet.
    deadline=$(($(now_ms) + 900000))
    while alive "$BG_PID" && (($(now_ms) < deadline)); do
        if (($(established "$port") >= n)); then
            wait_quiet "$pid"
            (($(established "$port") >= n)) && break
        fi
        sleep 0.2
    done
    c=$(established "$port")
    if ((c < n)); then
        note="only $c of $n connected"
        log "memory: $note"
        tail -n 5 "$WORK/idle-$t-$n.log" >&2
    fi
    after=$(rss_kib "$pid")
    alive "$BG_PID" || note="${note:+$note; }pgbench exited early"
    stop_pid "$BG_PID"
    BG_PID=
    log "memory: $t with $n idle clients: RSS ${after} KiB"
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$n" "$before" "$after" "$note" >>"$MEM"
    stop_target "$t"
    # Let the closed connections drain before the next measurement.
    deadline=$(($(now_ms) + 30000))
    while (($(established "$port") > 0)) && (($(now_ms) < deadline)); do sleep 0.1; done
}

run_memory() {
    local n t
    : >"$MEM"
    printf '\\sleep 3600 s\n' >"$WORK/idle.sql"
    for n in $IDLE_CLIENTS; do
        if ((n + 100 > NOFILE)); then
            log "memory: skipping $n clients: ulimit -n is $NOFILE"
            continue
        fi
        for t in "${MEM_TARGETS[@]}"; do
            selected "$t" || continue
            if [[ -n ${TARGET_NOTE[$t]:-} ]]; then
                printf '%s\t%s\tNA\tNA\t%s\n' "$t" "$n" "${TARGET_NOTE[$t]}" >>"$MEM"
                continue
            fi
            measure_idle "$t" "$n"
        done
    done
}

# ---------------------------------------------------------------------------
# report

report() {
    local s t tps med_direct med cpu failed ratio
    if ((SHARDS > 1)); then
        echo "# shardgate benchmark, sharded: direct Postgres vs shardgate over $SHARDS shards"
    else
        echo "# shardgate benchmark: direct Postgres vs PgBouncer vs shardgate"
    fi
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host: $(nproc) CPUs, $(uname -r); load average at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- Postgres $PG_VERSION ($CLUSTER_MODE, 127.0.0.1:$PG_PORT), $(pgbench --version)"
    echo "- PgBouncer: ${PGBOUNCER_VERSION:-not run}; shardgate: ${SHARDGATE_VERSION:-not run}"
    if ((SHARDS > 1)); then
        echo "- sharded: direct = one server with the full dataset; shardgate over $SHARDS shards (127.0.0.1:$((PG_PORT + 1))-$((PG_PORT + SHARDS)), one server each, no replicas), pgbench_accounts sharded by aid (integer), the other pgbench tables on shard 0; $SHARD_ROWS"
        echo "- correctness check through shardgate: ${SHARDED_CHECK:-not run}"
    fi
    echo "- rounds $ROUNDS × ${DURATION}s per run, scale $SCALE, pool size $POOL_SIZE (transaction pooling, SCRAM-SHA-256), pgbench -j $THREADS, ulimit -n $NOFILE"
    for t in "${ALL_TARGETS[@]}"; do
        [[ -n ${TARGET_NOTE[$t]:-} ]] && echo "- $t skipped: ${TARGET_NOTE[$t]}"
    done
    echo "- TPS excludes connection time; CPU-µs/tx = proxy utime+stime (all threads) during the run / transactions; medians over rounds"
    echo
    if [[ -s ${RAW:-} ]]; then
        for s in "${SCEN_IDS[@]}"; do
            echo "## ${SCEN_TITLE[$s]}"
            echo
            echo "\`pgbench -n ${SCEN_ARGS[$s]} -T $DURATION\`"
            echo
            echo "| target | TPS (median) | ratio to direct | CPU-µs/tx | failed tx |"
            echo "|---|---:|---:|---:|---:|"
            med_direct=$(awk -F'\t' -v s="$s" '$1 == s && $3 == "direct" { print $4 }' "$RAW" | median)
            for t in ${SCEN_TARGETS[$s]}; do
                if ! grep -q -P "^\Q$s\E\t[0-9]+\t$t\t" "$RAW"; then
                    echo "| $t | skipped | | | |"
                    continue
                fi
                med=$(awk -F'\t' -v s="$s" -v t="$t" '$1 == s && $3 == t { print $4 }' "$RAW" | median)
                cpu=$(awk -F'\t' -v s="$s" -v t="$t" '$1 == s && $3 == t { print $8 }' "$RAW" | median)
                [[ $cpu != NA ]] && cpu=$(printf '%.1f' "$cpu")
                failed=$(awk -F'\t' -v s="$s" -v t="$t" '$1 == s && $3 == t { n += $6; if ($4 == "NA") bad++ }
                    END { printf "%d%s", n, bad ? " (" bad " run(s) failed)" : "" }' "$RAW")
                ratio=NA
                if [[ $med != NA && $med_direct != NA ]]; then
                    ratio=$(awk -v a="$med" -v b="$med_direct" 'BEGIN { printf "%.2f", a / b }')
                fi
                [[ $med != NA ]] && med=$(printf '%.0f' "$med")
                [[ $t == direct ]] && cpu=–
                echo "| $t | $med | $ratio | $cpu | $failed |"
            done
            echo
        done
        echo "### Raw results per round"
        echo
        echo "| scenario | round | target | TPS | transactions | failed | latency avg (ms) | CPU-µs/tx |"
        echo "|---|---:|---|---:|---:|---:|---:|---:|"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8 }' "$RAW"
        echo
    fi
    if [[ -s ${MEM:-} ]]; then
        echo "## Memory: idle authenticated clients (SCRAM-SHA-256)"
        echo
        echo "RSS (VmRSS) of a freshly started proxy after one query, then with N idle clients connected."
        echo
        echo "| proxy | idle clients | RSS before (KiB) | RSS with clients (KiB) | per client (bytes) | note |"
        echo "|---|---:|---:|---:|---:|---|"
        awk -F'\t' '{
            per = ($3 == "NA" || $4 == "NA") ? "NA" : sprintf("%.0f", ($4 - $3) * 1024 / $2)
            printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, per, $5 }' "$MEM"
        echo
    fi
}

# ---------------------------------------------------------------------------
# main

CLK_TCK=$(getconf CLK_TCK)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
read -r EPH_LO EPH_HI </proc/sys/net/ipv4/ip_local_port_range
for p in "$PG_PORT" "$PGBOUNCER_PORT" "$SHARDGATE_PORT"; do
    if ((p >= EPH_LO && p <= EPH_HI)); then
        log "warning: port $p is inside the ephemeral port range $EPH_LO-$EPH_HI; a bind may fail after the idle-client runs"
    fi
done
log "work dir $WORK, ulimit -n $NOFILE, targets:${ONLY% }"
start_postgres

log "pgbench -i -s $SCALE on the direct server"
run_waited pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" app >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
if ((SHARDS > 1)); then
    load_shards
    verify_shards
fi

if selected pgbouncer; then
    PGBOUNCER_VERSION=$("$PGBOUNCER" --version 2>&1 | head -n1)
    start_target pgbouncer "$PGBOUNCER_PORT" || die "pgbouncer: ${TARGET_NOTE[pgbouncer]}"
fi
if selected shardgate; then
    if ensure_shardgate_bin; then
        SHARDGATE_VERSION="$SHARDGATE_BIN ($SHARDGATE_BUILD_KIND, git $(git_rev))${SHARDGATE_STALE:-}"
        ((SHARDS > 1)) && crosscheck_slots
        start_target shardgate "$SHARDGATE_PORT" || log "shardgate skipped: ${TARGET_NOTE[shardgate]}"
        ((SHARDS > 1)) && { check_sharded || true; }
    else
        log "shardgate skipped: ${TARGET_NOTE[shardgate]}"
    fi
fi
for ((r = 1; r <= REPLICAS; r++)); do
    ALL_TARGETS+=("sg_r$r")
    ONLY+="sg_r$r "
    if [[ -n ${TARGET_PORT[shardgate]:-} ]]; then
        start_target "sg_r$r" $((SHARDGATE_PORT + r)) || log "sg_r$r skipped: ${TARGET_NOTE[sg_r$r]:-}"
    fi
done
if ((PREPARE_UNNAMED)); then
    ALL_TARGETS+=(sg_prep)
    ONLY+="sg_prep "
    if [[ -n ${TARGET_PORT[shardgate]:-} ]]; then
        start_target sg_prep "$SG_PREP_PORT" || log "sg_prep skipped: ${TARGET_NOTE[sg_prep]:-}"
    fi
fi
selected direct || unset 'TARGET_PORT[direct]'
for t in "${ALL_TARGETS[@]}"; do
    selected "$t" || TARGET_NOTE[$t]="not selected (ONLY)"
done

define_scenarios
((${#SCEN_IDS[@]})) || die "no scenario matches SCENARIOS=$SCENARIOS"
if [[ $SKIP_THROUGHPUT != 1 ]]; then
    run_throughput
else
    RAW=
fi
if [[ $SKIP_MEMORY != 1 ]]; then
    run_memory
else
    MEM=
fi

if [[ -n $OUT ]]; then
    report | tee "$OUT"
else
    report
fi
