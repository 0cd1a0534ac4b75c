#!/usr/bin/env bash
# User-space instructions per transaction of each proxy, counted by valgrind's callgrind.
#
# A deterministic measure of the proxy's own work: pgbench.sh's CPU-µs per transaction
# include the kernel (about 85 % of it on loopback) and move by ±5 % between runs; this
# count moves by well under 1 %, so it shows a 2 % change in user-space work that an
# interleaved CPU run cannot. It says nothing about the kernel or about atomics (cheap in
# instructions, dear in cycles): confirm a gain with pgbench.sh. Not part of tests/run.sh.
#
# Usage: tests/bench/instructions.sh [PGBENCH-ARGS...]     (default: -S -M extended)
# Environment:
#   TARGETS         "shardgate pgbouncer" (default) or a subset
#   SHARDS          1 (default); 2 or more shards pgbench_accounts by aid (keyed routing;
#                   every shard holds every row, which routing does not mind)
#   PG_PORT         first Postgres port (default 28432); SHARDGATE_PORT (28532),
#                   PGBOUNCER_PORT (28632)
#   SHARDGATE_BIN   the binary to measure (default: target/release/shardgate, built first)
#   KEEP_TMP=1      keep the work folder (callgrind output, for callgrind_annotate)
#
# Method: the proxy runs under callgrind. After a warm-up, 4 pgbench clients run 250 and
# then 1,250 transactions each; the counters are zeroed before and dumped after each run,
# and the difference of the two dumps over the 4,000 extra transactions cancels logins.
# Valgrind runs the proxy ~50x slower, so its event loop wakes for nearly every message:
# per-wake-up costs weigh more here than at full speed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=SCRIPTDIR/pgbouncer_conf.sh
source "$REPO/tests/bench/pgbouncer_conf.sh"
TARGETS=${TARGETS:-shardgate pgbouncer}
SHARDS=${SHARDS:-1}
PG_PORT=${PG_PORT:-28432}
SHARDGATE_PORT=${SHARDGATE_PORT:-28532}
PGBOUNCER_PORT=${PGBOUNCER_PORT:-28632}
PGBENCH_ARGS=("$@")
((${#PGBENCH_ARGS[@]})) || PGBENCH_ARGS=(-S -M extended)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
for tool in valgrind callgrind_control pgbench psql; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install valgrind postgresql-client)"
done

WORK=$(mktemp -d /tmp/shardgate-instr.XXXXXX)
chmod 755 "$WORK"
# Postgres and PgBouncer refuse to run as root.
AS=()
[[ $(id -u) -eq 0 ]] && AS=(runuser -u postgres --)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    SHARDGATE_HOME=$WORK/cluster bash "$REPO/deploy/local/cluster.sh" down >/dev/null 2>&1 || true
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

if [[ -z ${SHARDGATE_BIN:-} ]]; then
    log "building shardgate (release)"
    cargo build --release -q -p shardgate --manifest-path "$REPO/Cargo.toml"
    SHARDGATE_BIN=$REPO/target/release/shardgate
fi

log "starting $SHARDS Postgres server(s) from port $PG_PORT"
SHARDGATE_HOME=$WORK/cluster SHARDGATE_PG_PORT=$PG_PORT SHARDGATE_SHARDS=$SHARDS SHARDGATE_REPLICAS=0 \
    bash "$REPO/deploy/local/cluster.sh" up >"$WORK/cluster.log" 2>&1 || { cat "$WORK/cluster.log" >&2; die "cluster.sh up failed"; }
export PGPASSWORD=app
for ((k = 0; k < SHARDS; k++)); do
    pgbench -i -q -s 1 -h 127.0.0.1 -p $((PG_PORT + k)) -U app app >>"$WORK/init.log" 2>&1 ||
        { cat "$WORK/init.log" >&2; die "pgbench -i failed"; }
done

# waits until a proxy answers; the pid of the process to measure is in $1's file
wait_answers() { # port
    local i
    for ((i = 0; i < 200; i++)); do
        psql -X -At -h 127.0.0.1 -p "$1" -U app -c 'SELECT 1' app >/dev/null 2>&1 && return 0
        sleep 0.3
    done
    return 1
}

# prints instructions per transaction of the callgrind process $2 serving port $1; CTL is
# how to run callgrind_control (as the user the process runs as)
CTL=()
measure() { # port pid out-prefix
    local port=$1 pid=$2 out=$3 t a b
    pgbench -n -h 127.0.0.1 -p "$port" -U app -c 4 -j 1 -t 300 "${PGBENCH_ARGS[@]}" app >/dev/null 2>&1 ||
        die "warm-up pgbench failed on port $port"
    for t in 250 1250; do
        "${CTL[@]}" callgrind_control -z "$pid" >/dev/null 2>&1
        pgbench -n -h 127.0.0.1 -p "$port" -U app -c 4 -j 1 -t "$t" "${PGBENCH_ARGS[@]}" app >"$WORK/pgbench.log" 2>&1 ||
            { cat "$WORK/pgbench.log" >&2; die "pgbench failed on port $port"; }
        grep -q "number of failed transactions: 0 " "$WORK/pgbench.log" || die "failed transactions on port $port"
        "${CTL[@]}" callgrind_control -d "$pid" >/dev/null 2>&1
    done
    a=$(awk '/^summary:/ {print $2}' "$out.$pid.1")
    b=$(awk '/^summary:/ {print $2}' "$out.$pid.2")
    echo $(((b - a) / 4000))
}

declare -A RESULT
for target in $TARGETS; do
    case $target in
    shardgate)
        {
            printf '[general]\nlisten = "127.0.0.1:%s"\npool_size = 20\n\n' "$SHARDGATE_PORT"
            printf '[[users]]\nname = "app"\npassword = "app"\n\n[[databases]]\nname = "app"\n'
            if ((SHARDS > 1)); then
                printf '[[databases.sharded_tables]]\nname = "pgbench_accounts"\ncolumn = "aid"\ntype = "integer"\n'
            fi
            for ((k = 0; k < SHARDS; k++)); do
                printf '[[databases.shards]]\nhosts = ["127.0.0.1:%s"]\n' $((PG_PORT + k))
            done
        } >"$WORK/shardgate.toml"
        "$SHARDGATE_BIN" check-config "$WORK/shardgate.toml" >/dev/null
        RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/sg.out.%p" \
            "$SHARDGATE_BIN" --config "$WORK/shardgate.toml" >"$WORK/shardgate.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_answers "$SHARDGATE_PORT" || { cat "$WORK/shardgate.log" >&2; die "shardgate did not answer"; }
        CTL=()
        RESULT[shardgate]=$(measure "$SHARDGATE_PORT" "$pid" "$WORK/sg.out")
        kill "$pid"
        ;;
    pgbouncer)
        ((SHARDS == 1)) || { log "pgbouncer: skipped (no sharding)"; continue; }
        pgb=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
        [[ -x $pgb ]] || { log "pgbouncer: not installed, skipped"; continue; }
        write_pgbouncer_conf "$WORK/pgbouncer" "$PG_PORT" "$PGBOUNCER_PORT" 20
        [[ ${#AS[@]} -gt 0 ]] && chown -R postgres "$WORK/pgbouncer" && chmod 777 "$WORK"
        "${AS[@]}" valgrind --tool=callgrind --callgrind-out-file="$WORK/pgb.out.%p" \
            "$pgb" "$WORK/pgbouncer/pgbouncer.ini" >"$WORK/pgbouncer.log" 2>&1 &
        PIDS+=("$!")
        wait_answers "$PGBOUNCER_PORT" || { cat "$WORK/pgbouncer.log" >&2; die "pgbouncer did not answer"; }
        # The valgrind process itself (runuser, when root, is its parent).
        pid=$(pgrep -f "pgb.out" | while read -r p; do
            [[ $(cat /proc/"$p"/comm 2>/dev/null) != runuser ]] && echo "$p"
        done | head -1)
        [[ -n $pid ]] || die "cannot find pgbouncer's process"
        PIDS+=("$pid")
        CTL=("${AS[@]}")
        RESULT[pgbouncer]=$(measure "$PGBOUNCER_PORT" "$pid" "$WORK/pgb.out")
        kill "$pid"
        ;;
    *) die "unknown target $target" ;;
    esac
done

echo "user-space instructions per transaction (callgrind), pgbench ${PGBENCH_ARGS[*]}, $SHARDS shard(s)"
for target in $TARGETS; do
    [[ -n ${RESULT[$target]:-} ]] && printf '  %-10s %s\n' "$target" "${RESULT[$target]}"
done
