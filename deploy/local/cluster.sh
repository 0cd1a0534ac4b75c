#!/usr/bin/env bash
# Local PostgreSQL cluster for shardgate: N shards, each a primary with R streaming
# replicas, all on 127.0.0.1. Used by deploy/local/run.sh and by the test harness.
#
# Usage: cluster.sh COMMAND
#   up                 create (first time) and start every server; wait until every
#                      replica streams and has replayed the primary's schema;
#                      prints `status` on stdout (progress goes to stderr)
#   down [--purge]     stop every server (pg_ctl stop -m fast); --purge also deletes
#                      the data
#   purge              same as `down --purge`
#   status             one line per server: shard, role, port, running|stopped
#   env                KEY=value lines: SHARD<i>_PRIMARY_URL, SHARD<i>_REPLICA<j>_URL
#   install            install PostgreSQL 15 with apt-get if it is missing
#   start NAME         start one server (NAME like shard0-primary, shard1-replica2)
#   stop NAME [MODE]   stop one server; MODE is smart, fast (default) or immediate
#   promote NAME       promote a replica (pg_ctl promote, waits until done)
#   psql NAME [ARGS]   psql as superuser `postgres` over the unix socket
#   datadir NAME       print the data directory of a server
#   socket-dir         print the unix socket directory of every server
#   bindir             print the PostgreSQL bin directory in use
#
# Environment:
#   SHARDGATE_HOME          state directory (default <repo>/.shardgate)
#   SHARDGATE_PG_PORT       first port (default 15432)
#   SHARDGATE_SHARDS        number of shards (default 2)
#   SHARDGATE_REPLICAS      replicas per shard (default 1)
#   SHARDGATE_PG_BINDIR     PostgreSQL bin directory (default: found, installed if missing)
#   SHARDGATE_PG_TIMEOUT    seconds to wait for a server or a replica (default 60)
#
# Ports: shard i primary = PG_PORT + i*(REPLICAS+1); its replica j (1-based) = primary + j.
# The layout of a cluster is remembered in $SHARDGATE_HOME/cluster.layout, so later
# commands need not repeat the environment. SHARDGATE_SHARDS may grow between `up`s
# (new shards are added); the first port and the replica count may not change.
#
# Every server: database `app` owned by user `app` (password `app`, scram-sha-256 over
# TCP); superuser `postgres` with trust over the unix socket only; role `replicator`
# (password `replicator`) for streaming replication. When run as root, PostgreSQL runs
# as the OS user `postgres`.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
SCHEMA_SQL=$SCRIPT_DIR/schema.sql

# Connection variables from the caller's environment must not redirect our psql calls.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGPASSFILE PGSERVICE \
    PGSERVICEFILE PGOPTIONS PGDATA PGSSLMODE PGTARGETSESSIONATTRS PGAPPNAME

TIMEOUT=${SHARDGATE_PG_TIMEOUT:-60}

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# --- where things live ---------------------------------------------------------------

SHARDGATE_HOME=$(realpath -m "${SHARDGATE_HOME:-$REPO_ROOT/.shardgate}")
LAYOUT_FILE=$SHARDGATE_HOME/cluster.layout
LOCK_FILE=$SHARDGATE_HOME/.cluster.lock
PG_LINK=$SHARDGATE_HOME/pg

path_hash() { printf '%s' "$1" | cksum | cut -d' ' -f1; }

# The directory that holds the data directories, logs and (usually) sockets. It is
# $SHARDGATE_HOME/pg, or, when the OS user postgres cannot reach $SHARDGATE_HOME
# (e.g. it is under /root), a directory under /var/tmp that $SHARDGATE_HOME/pg links to.
pg_root() {
    if [[ -L $PG_LINK ]]; then
        readlink -f "$PG_LINK"
    else
        printf '%s\n' "$PG_LINK"
    fi
}

# A unix socket path (dir + "/.s.PGSQL.NNNNN") must fit in 107 bytes; long state
# directories get a short socket directory under /tmp instead.
socket_dir() {
    local root
    root=$(pg_root)
    if (( ${#root} <= 80 )); then
        printf '%s/sock\n' "$root"
    else
        printf '/tmp/shardgate-sock-%s\n' "$(path_hash "$SHARDGATE_HOME")"
    fi
}

# --- running PostgreSQL commands -------------------------------------------------------

if [[ $EUID -eq 0 ]]; then
    # PostgreSQL refuses to run as root: run it as the OS user postgres. cd / first so
    # that an unreadable current directory (e.g. /root) does not upset the tools.
    as_pg() { (cd / && runuser -u postgres -- "$@"); }
else
    as_pg() { "$@"; }
fi

BINDIR=""

pg_major() { "$1/pg_config" --version 2>/dev/null | sed -n 's/^PostgreSQL \([0-9]*\).*/\1/p'; }

find_bindir() {
    local d major
    if [[ -n ${SHARDGATE_PG_BINDIR:-} ]]; then
        [[ -x $SHARDGATE_PG_BINDIR/postgres ]] || die "SHARDGATE_PG_BINDIR=$SHARDGATE_PG_BINDIR has no postgres binary"
        printf '%s\n' "$SHARDGATE_PG_BINDIR"
        return 0
    fi
    for d in /usr/lib/postgresql/15/bin "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
        [[ -n $d && -x $d/postgres && -x $d/pg_basebackup && -x $d/psql ]] || continue
        major=$(pg_major "$d")
        if [[ -n $major ]] && (( major >= 13 )); then
            [[ $major == 15 ]] || log "warning: using PostgreSQL $major from $d (the project targets 15)"
            printf '%s\n' "$d"
            return 0
        fi
    done
    return 1
}

install_postgres() {
    [[ $EUID -eq 0 ]] || die "PostgreSQL 15 is not installed; install it (Debian: apt-get install postgresql-15) or set SHARDGATE_PG_BINDIR"
    command -v apt-get >/dev/null || die "PostgreSQL 15 is not installed and apt-get is not available; set SHARDGATE_PG_BINDIR"
    log "installing PostgreSQL 15 with apt-get (this takes a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq postgresql-common >&2 || die "apt-get install postgresql-common failed"
    # This project runs its own servers: do not create and start Debian's "main" cluster.
    local conf=/etc/postgresql-common/createcluster.conf
    if [[ -f $conf ]] && ! grep -q '^create_main_cluster' "$conf"; then
        echo 'create_main_cluster = false' >>"$conf"
    fi
    if ! apt-get install -y -qq postgresql-15 postgresql-client-15 postgresql-contrib >&2; then
        log "postgresql-15 is not available here; installing the distribution's default PostgreSQL"
        apt-get install -y -qq postgresql postgresql-client postgresql-contrib >&2 || die "apt-get install postgresql failed"
    fi
}

ensure_bindir() {
    [[ -n $BINDIR ]] && return 0
    if ! BINDIR=$(find_bindir); then
        install_postgres
        BINDIR=$(find_bindir) || die "PostgreSQL binaries still not found after installing"
    fi
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root needs the OS user 'postgres' (it comes with the postgresql-common package)"
    fi
}

# --- layout ----------------------------------------------------------------------------

STORED_PORT="" STORED_SHARDS="" STORED_REPLICAS=""
if [[ -f $LAYOUT_FILE ]]; then
    while IFS='=' read -r key value; do
        case $key in
            PG_PORT) STORED_PORT=$value ;;
            SHARDS) STORED_SHARDS=$value ;;
            REPLICAS) STORED_REPLICAS=$value ;;
        esac
    done <"$LAYOUT_FILE"
fi
PG_PORT=${SHARDGATE_PG_PORT:-${STORED_PORT:-15432}}
SHARDS=${SHARDGATE_SHARDS:-${STORED_SHARDS:-2}}
REPLICAS=${SHARDGATE_REPLICAS:-${STORED_REPLICAS:-1}}
if ! { is_uint "$PG_PORT" && (( PG_PORT >= 1024 && PG_PORT < 65536 )); }; then
    die "SHARDGATE_PG_PORT must be a port number >= 1024, not '$PG_PORT'"
fi
if ! { is_uint "$SHARDS" && (( SHARDS >= 1 )); }; then
    die "SHARDGATE_SHARDS must be at least 1, not '$SHARDS'"
fi
is_uint "$REPLICAS" || die "SHARDGATE_REPLICAS must be a number, not '$REPLICAS'"
(( PG_PORT + SHARDS * (REPLICAS + 1) <= 65536 )) || die "ports past 65535: lower SHARDGATE_PG_PORT"

check_layout_matches() {
    if [[ -n $STORED_PORT && $STORED_PORT != "$PG_PORT" ]] || [[ -n $STORED_REPLICAS && $STORED_REPLICAS != "$REPLICAS" ]]; then
        die "the cluster in $SHARDGATE_HOME has SHARDGATE_PG_PORT=$STORED_PORT SHARDGATE_REPLICAS=$STORED_REPLICAS; use those or run '$0 purge' first"
    fi
}

primary_port() { echo $(( PG_PORT + $1 * (REPLICAS + 1) )); }
server_name() { if (( $2 == 0 )); then echo "shard$1-primary"; else echo "shard$1-replica$2"; fi; }

# NAME -> "shard replica port" (replica 0 = primary)
parse_name() {
    local name=$1
    [[ $name =~ ^shard([0-9]+)-(primary|replica([0-9]+))$ ]] || die "bad server name '$name' (want shardI-primary or shardI-replicaJ)"
    local i=${BASH_REMATCH[1]} j=${BASH_REMATCH[3]:-0}
    (( i < SHARDS && j <= REPLICAS )) || die "no server $name in this cluster ($SHARDS shards x $REPLICAS replicas)"
    echo "$i $j $(( $(primary_port "$i") + j ))"
}

# --- one server --------------------------------------------------------------------------

data_dir() { printf '%s/%s\n' "$(pg_root)" "$1"; }
log_file() { printf '%s/log/%s.log\n' "$(pg_root)" "$1"; }
ready_marker() { printf '%s/%s.ready\n' "$(pg_root)" "$1"; }

is_running() { # DATADIR
    [[ -f $1/PG_VERSION ]] || return 1
    as_pg "$BINDIR/pg_ctl" -D "$1" status >/dev/null 2>&1
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Writes stdin to FILE, owned by the user PostgreSQL runs as.
write_pg_file() { as_pg tee "$1" >/dev/null; }

# The settings of one server; rewritten on every start so that changes here apply.
write_server_conf() { # NAME PORT DATADIR
    write_pg_file "$3/shardgate.conf" <<EOF
# Written by deploy/local/cluster.sh on every start; edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$(socket_dir)'
cluster_name = '$1'
max_connections = 300
max_prepared_transactions = 20
shared_buffers = 32MB
password_encryption = scram-sha-256
# logical: later slot moves can use logical replication.
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
wal_keep_size = 512MB
wal_log_hints = on
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
# A throwaway dev/test cluster: fsync=off makes it fast and only risks data on an OS
# crash. synchronous_commit stays on, so a commit still waits for its WAL write.
fsync = off
synchronous_commit = on
lc_messages = 'C'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
}

write_hba() { # DATADIR
    write_pg_file "$1/pg_hba.conf" <<'EOF'
# Written by deploy/local/cluster.sh.
# TYPE  DATABASE     USER   ADDRESS        METHOD
local   all          all                   trust
local   replication  all                   trust
host    all          all    127.0.0.1/32   scram-sha-256
host    replication  all    127.0.0.1/32   scram-sha-256
EOF
}

start_server() { # NAME PORT
    local name=$1 port=$2 dir
    dir=$(data_dir "$name")
    [[ -f $dir/PG_VERSION ]] || die "$name has no data directory ($dir); run '$0 up'"
    is_running "$dir" && return 0
    port_in_use "$port" && die "port $port (for $name) is in use by another process"
    write_server_conf "$name" "$port" "$dir"
    # 9>&-: the postmaster must not inherit (and so hold) our lock file.
    if ! as_pg "$BINDIR/pg_ctl" -D "$dir" -l "$(log_file "$name")" -w -t "$TIMEOUT" -s start >/dev/null 9>&-; then
        log "$name did not start; last lines of $(log_file "$name"):"
        tail -n 20 "$(log_file "$name")" >&2 || true
        die "could not start $name on port $port"
    fi
}

stop_server() { # NAME [MODE]
    local name=$1 mode=${2:-fast} dir
    dir=$(data_dir "$name")
    is_running "$dir" || return 0
    as_pg "$BINDIR/pg_ctl" -D "$dir" -m "$mode" -w -t "$TIMEOUT" -s stop >/dev/null || die "could not stop $name"
}

su_psql() { # PORT PSQL-ARGS...
    local port=$1
    shift
    as_pg "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$(socket_dir)" -p "$port" -U postgres "$@"
}

su_query() { # PORT DB SQL  -> unaligned tuples on stdout
    su_psql "$1" -d "$2" -At -c "$3"
}

init_primary() { # NAME
    local name=$1 dir
    dir=$(data_dir "$name")
    log "initdb $name"
    as_pg rm -rf "$dir"
    as_pg "$BINDIR/initdb" -D "$dir" -U postgres -E UTF8 --locale=C --no-sync \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null || die "initdb $name failed"
    printf "\n# shardgate local cluster settings\ninclude 'shardgate.conf'\n" | as_pg tee -a "$dir/postgresql.conf" >/dev/null
    write_hba "$dir"
}

# Roles, database and demo schema; idempotent, so it runs on every `up`.
bootstrap_primary() { # PORT
    {
        cat <<'EOF'
SET client_min_messages = warning;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN
        CREATE ROLE app LOGIN PASSWORD 'app';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'replicator') THEN
        CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'replicator';
    END IF;
END
$$;
SELECT 'CREATE DATABASE app OWNER app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'app')
\gexec
\connect app
SET client_min_messages = warning;
-- PG15 no longer lets everyone create in schema public: give it to app.
ALTER SCHEMA public OWNER TO app;
SET ROLE app;
EOF
        cat "$SCHEMA_SQL"
    } | su_psql "$1" -d postgres -f - >/dev/null || die "bootstrap of the primary on port $1 failed"
}

create_replica() { # NAME PRIMARY-PORT
    local name=$1 pport=$2 dir
    dir=$(data_dir "$name")
    log "pg_basebackup $name"
    as_pg rm -rf "$dir"
    as_pg "$BINDIR/pg_basebackup" -D "$dir" -R -X stream -c fast --no-sync \
        -d "host=127.0.0.1 port=$pport user=replicator password=replicator" \
        || die "pg_basebackup for $name from port $pport failed"
}

# True once the replica streams from its primary and has replayed up to LSN.
replica_caught_up() { # PORT LSN
    local out
    out=$(su_query "$1" postgres "SELECT pg_is_in_recovery()
        AND EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')
        AND pg_last_wal_replay_lsn() >= '$2'::pg_lsn" 2>/dev/null) || return 1
    [[ $out == t ]]
}

wait_until() { # SECONDS WHAT COMMAND...
    local deadline=$(( SECONDS + $1 )) what=$2
    shift 2
    until "$@"; do
        if (( SECONDS >= deadline )); then
            log "timed out waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

# --- the whole cluster -----------------------------------------------------------------

take_lock() {
    mkdir -p "$SHARDGATE_HOME"
    exec 9>"$LOCK_FILE"
    flock -w 600 9 || die "another cluster.sh holds $LOCK_FILE"
}

prepare_dirs() {
    mkdir -p "$SHARDGATE_HOME"
    if [[ ! -e $PG_LINK ]]; then
        local root=$PG_LINK
        if [[ $EUID -eq 0 ]]; then
            chmod o+x "$SHARDGATE_HOME" 2>/dev/null || true
            if ! runuser -u postgres -- test -x "$SHARDGATE_HOME" 2>/dev/null; then
                root=/var/tmp/shardgate-pg-$(path_hash "$SHARDGATE_HOME")
                log "the OS user postgres cannot reach $SHARDGATE_HOME; keeping the data in $root"
                ln -s "$root" "$PG_LINK"
            fi
        fi
        mkdir -p "$root"
        [[ $EUID -eq 0 ]] && chown postgres: "$root"
    fi
    local root sock
    root=$(pg_root)
    sock=$(socket_dir)
    as_pg mkdir -p "$root" "$root/log" "$sock"
    chmod 755 "$root" "$sock" 2>/dev/null || true
}

cmd_up() {
    ensure_bindir
    take_lock
    check_layout_matches
    prepare_dirs
    local i j name port pport lsn
    local -a replicas=()
    for (( i = 0; i < SHARDS; i++ )); do
        name=$(server_name "$i" 0)
        pport=$(primary_port "$i")
        if [[ ! -f $(ready_marker "$name") ]]; then
            init_primary "$name"
            start_server "$name" "$pport"
            bootstrap_primary "$pport"
            touch "$(ready_marker "$name")"
        else
            start_server "$name" "$pport"
            # After a failover this server may have rejoined as a standby: leave it be.
            [[ $(su_query "$pport" postgres 'SELECT pg_is_in_recovery()') == f ]] && bootstrap_primary "$pport"
        fi
        lsn=$(su_query "$pport" postgres 'SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END')
        for (( j = 1; j <= REPLICAS; j++ )); do
            name=$(server_name "$i" "$j")
            port=$(( pport + j ))
            if [[ ! -f $(ready_marker "$name") ]]; then
                create_replica "$name" "$pport"
                touch "$(ready_marker "$name")"
            fi
            start_server "$name" "$port"
            replicas+=("$name:$port:$lsn")
        done
    done
    printf 'PG_PORT=%s\nSHARDS=%s\nREPLICAS=%s\n' "$PG_PORT" \
        "$(( SHARDS > ${STORED_SHARDS:-0} ? SHARDS : STORED_SHARDS ))" "$REPLICAS" >"$LAYOUT_FILE"
    local entry
    for entry in "${replicas[@]}"; do
        IFS=: read -r name port lsn <<<"$entry"
        if [[ $(su_query "$port" postgres 'SELECT pg_is_in_recovery()') == f ]]; then
            log "warning: $name has been promoted (it is no replica any more); not waiting for it"
            continue
        fi
        wait_until "$TIMEOUT" "$name (port $port) to stream and replay up to $lsn" \
            replica_caught_up "$port" "$lsn" || die "replica $name is not streaming; see $(log_file "$name")"
    done
    cmd_status
}

# Every server that has a data directory, replicas first.
existing_servers() {
    local root d
    root=$(pg_root)
    [[ -d $root ]] || return 0
    for d in "$root"/shard*-replica* "$root"/shard*-primary; do
        [[ -f $d/PG_VERSION ]] && basename "$d"
    done
    return 0
}

cmd_down() {
    local purge=${1:-}
    [[ -e $PG_LINK ]] || { [[ -n $purge ]] && purge_files; return 0; }
    ensure_bindir
    take_lock
    local name pids=() failed=0 pid
    # Stop every server at once; each pg_ctl waits for its own server.
    while read -r name; do
        [[ -n $name ]] || continue
        stop_server "$name" fast &
        pids+=("$!")
    done < <(existing_servers)
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    (( failed == 0 )) || die "some servers did not stop"
    [[ -n $purge ]] && purge_files
    return 0
}

purge_files() {
    local root sock
    root=$(pg_root)
    sock=$(socket_dir)
    case $root in
        "$PG_LINK" | /var/tmp/shardgate-pg-*) rm -rf "$root" ;;
        *) die "refusing to delete unexpected directory $root" ;;
    esac
    [[ -L $PG_LINK ]] && rm -f "$PG_LINK"
    [[ $sock == /tmp/shardgate-sock-* ]] && rm -rf "$sock"
    rm -f "$LAYOUT_FILE" "$LOCK_FILE"
    rmdir "$SHARDGATE_HOME" 2>/dev/null || true
}

cmd_status() {
    local i j name port state
    [[ -e $PG_LINK ]] && ensure_bindir
    for (( i = 0; i < SHARDS; i++ )); do
        for (( j = 0; j <= REPLICAS; j++ )); do
            name=$(server_name "$i" "$j")
            port=$(( $(primary_port "$i") + j ))
            state=stopped
            [[ -e $PG_LINK ]] && is_running "$(data_dir "$name")" && state=running
            printf 'shard%-3s %-9s %-6s %s\n' "$i" "$( (( j == 0 )) && echo primary || echo "replica$j")" "$port" "$state"
        done
    done
}

cmd_env() {
    local i j port
    for (( i = 0; i < SHARDS; i++ )); do
        port=$(primary_port "$i")
        printf 'SHARD%s_PRIMARY_URL=postgres://app:app@127.0.0.1:%s/app\n' "$i" "$port"
        for (( j = 1; j <= REPLICAS; j++ )); do
            printf 'SHARD%s_REPLICA%s_URL=postgres://app:app@127.0.0.1:%s/app\n' "$i" "$j" "$(( port + j ))"
        done
    done
}

usage() { sed -n '3,/^set -euo pipefail/{/^set /d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2; }

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
    up) cmd_up ;;
    down)
        case ${1:-} in
            "") cmd_down ;;
            --purge) cmd_down purge ;;
            *) usage ;;
        esac
        ;;
    purge) cmd_down purge ;;
    status) cmd_status ;;
    env) cmd_env ;;
    install) ensure_bindir ;;
    start)
        [[ $# -eq 1 ]] || usage
        info=$(parse_name "$1")
        port=${info##* }
        ensure_bindir
        take_lock
        start_server "$1" "$port"
        ;;
    stop)
        [[ $# -ge 1 && $# -le 2 ]] || usage
        parse_name "$1" >/dev/null
        ensure_bindir
        stop_server "$1" "${2:-fast}"
        ;;
    promote)
        [[ $# -eq 1 ]] || usage
        parse_name "$1" >/dev/null
        ensure_bindir
        as_pg "$BINDIR/pg_ctl" -D "$(data_dir "$1")" -w -t "$TIMEOUT" -s promote >/dev/null
        ;;
    psql)
        [[ $# -ge 1 ]] || usage
        info=$(parse_name "$1")
        port=${info##* }
        shift
        ensure_bindir
        su_psql "$port" "$@"
        ;;
    datadir)
        [[ $# -eq 1 ]] || usage
        parse_name "$1" >/dev/null
        data_dir "$1"
        ;;
    socket-dir) socket_dir ;;
    bindir)
        ensure_bindir
        printf '%s\n' "$BINDIR"
        ;;
    *) usage ;;
esac
