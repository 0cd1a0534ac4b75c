#!/usr/bin/env bash
# tests/bench/metrics_overhead.sh: what shardgate's Prometheus metrics cost in TPS.
#
# Two shardgate processes with the same configuration, except that one sets
# metrics_listen (metrics on, /metrics scraped during its runs) and the other does
# not (metrics off), in front of one Postgres started with deploy/local/cluster.sh.
# `pgbench -S -M extended -c 16` runs through each, interleaved: every round runs
# both, the order alternating from round to round, so drift of the machine hits
# both alike. Prints TPS per run, the medians, the difference in % (goal: under 3%)
# and each proxy's CPU-µs per transaction (the steadier figure on a small box).
#
# Everything on 127.0.0.1, ports 28xxx (below the ephemeral range, away from the
# tests' 25432-27432). Not part of tests/run.sh. Everything started here is
# stopped by PID at exit; the temp dir is removed unless the run failed or KEEP_TMP=1.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

usage() {
    cat <<'EOF'
Usage: tests/bench/metrics_overhead.sh [options]

Options (each also settable by the environment variable in brackets):
  --rounds N           interleaved rounds, each runs both proxies [ROUNDS=3, at least 3]
  --duration S         seconds per pgbench run [DURATION=10]
  --clients N          pgbench clients [CLIENTS=16]
  --threads N          pgbench -j [THREADS=2]
  --scale N            pgbench -i scale factor [SCALE=10]
  --pool-size N        server connections per pool, both proxies [POOL_SIZE=20]
  --scrape-interval S  seconds between /metrics scrapes during the metrics-on runs,
                       0 for none [SCRAPE_INTERVAL=1]
  --max-overhead PCT   the goal, for the verdict line [MAX_OVERHEAD=3]
  -h, --help           this text

Other environment: PG_PORT (28600), SG_OFF_PORT (28610), SG_ON_PORT (28611),
METRICS_PORT (28612), SHARDGATE_BIN (default target/release/shardgate, brought
up to date with cargo build --release -p shardgate unless SHARDGATE_BUILD=0),
SHARDGATE_LOG (log filter for shardgate, default warn), KEEP_TMP=1 (keep the
temp dir with the pgbench logs and the proxies' configs and logs).
Exit status: 0 when the runs completed (whatever the overhead), 1 otherwise.
EOF
}

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-20}
SCRAPE_INTERVAL=${SCRAPE_INTERVAL:-1}
MAX_OVERHEAD=${MAX_OVERHEAD:-3}
PG_PORT=${PG_PORT:-28600}
SG_OFF_PORT=${SG_OFF_PORT:-28610}
SG_ON_PORT=${SG_ON_PORT:-28611}
METRICS_PORT=${METRICS_PORT:-28612}
SHARDGATE_BIN=${SHARDGATE_BIN:-$REPO/target/release/shardgate}
SHARDGATE_BUILD=${SHARDGATE_BUILD:-1}
SHARDGATE_LOG=${SHARDGATE_LOG:-warn}
KEEP_TMP=${KEEP_TMP:-0}

while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --clients) CLIENTS=$2; shift ;;
        --threads) THREADS=$2; shift ;;
        --scale) SCALE=$2; shift ;;
        --pool-size) POOL_SIZE=$2; shift ;;
        --scrape-interval) SCRAPE_INTERVAL=$2; shift ;;
        --max-overhead) MAX_OVERHEAD=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

for v in ROUNDS DURATION CLIENTS THREADS SCALE POOL_SIZE PG_PORT SG_OFF_PORT SG_ON_PORT METRICS_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a number, got '${!v}'" >&2; exit 2; }
done
[[ $SCRAPE_INTERVAL =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "SCRAPE_INTERVAL must be a number of seconds" >&2; exit 2; }
[[ $MAX_OVERHEAD =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "MAX_OVERHEAD must be a number" >&2; exit 2; }
((ROUNDS >= 3)) || { echo "ROUNDS must be at least 3 (got $ROUNDS)" >&2; exit 2; }
for p in "$PG_PORT" "$SG_OFF_PORT" "$SG_ON_PORT" "$METRICS_PORT"; do
    ((p > 1024 && p < 32768)) || { echo "port $p: use ports between 1025 and 32767" >&2; exit 2; }
done
if (($(printf '%s\n' "$PG_PORT" "$SG_OFF_PORT" "$SG_ON_PORT" "$METRICS_PORT" | sort -u | wc -l) != 4)); then
    echo "PG_PORT, SG_OFF_PORT, SG_ON_PORT and METRICS_PORT must differ" >&2
    exit 2
fi

export SHARDGATE_LOG # shardgate's log filter
export PGPASSWORD=app PGUSER=app PGDATABASE=app PGHOST=127.0.0.1 PGSSLMODE=disable
export PGCONNECT_TIMEOUT=30
unset PGSERVICE PSQLRC

# ---------------------------------------------------------------------------
# helpers

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Stops a process we started, by PID: SIGTERM, then SIGKILL after a deadline.
stop_pid() {
    local pid=${1:-} deadline
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(($(now_ms) + 15000))
    while alive "$pid" && (($(now_ms) < deadline)); do sleep 0.05; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}

wait_port() { # port deadline_s [pid]
    local deadline=$(($(now_ms) + $2 * 1000))
    while (($(now_ms) < deadline)); do
        port_open "$1" && return 0
        [[ -n ${3:-} ]] && ! alive "$3" && return 1
        sleep 0.05
    done
    return 1
}

# Established TCP connections whose local port is $1 (a proxy's client side).
# /proc/net/tcp: local address is field 2 (hex port after the colon), state field 4.
established() {
    awk -v p=":$(printf '%04X' "$1")" 'substr($2, length($2) - 4) == p && $4 == "01" { n++ }
        END { print n + 0 }' /proc/net/tcp
}

# utime+stime of a whole process in clock ticks (fields 14 and 15 of /proc/PID/stat;
# the comm field may hold spaces, so cut after the last ')').
cpu_ticks() {
    local s
    s=$(<"/proc/$1/stat") || return 1
    s=${s##*) }
    awk '{ print $12 + $13 }' <<<"$s"
}

median() { # numbers on stdin, NA ignored; prints NA if none
    { grep -v '^NA$' || true; } | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "NA"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# GET /metrics over HTTP/1.0 with bash's /dev/tcp; the response on stdout.
scrape() { # port
    local fd
    exec {fd}<>"/dev/tcp/127.0.0.1/$1" || return 1
    printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$1" >&"$fd"
    timeout 5 cat <&"$fd"
    exec {fd}>&-
}

psql_direct() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -At "$@"; }

# ---------------------------------------------------------------------------
# setup

for tool in pgbench psql awk getconf; do
    command -v "$tool" >/dev/null || {
        # A fresh machine: cluster.sh knows how to install PostgreSQL.
        [[ $tool == pgbench || $tool == psql ]] && bash "$REPO/deploy/local/cluster.sh" install >&2
        command -v "$tool" >/dev/null || die "missing $tool"
    }
done

WORK=$(mktemp -d /tmp/shardgate-metrics-bench.XXXXXX)
chmod 755 "$WORK" # the OS user postgres must reach the cluster's directories
declare -A PROXY_PID=()
# pgbench and the scraper while they run (cleared after, so that a stale PID is never signalled).
BENCH_PID=
SCRAPER_PID=
CLUSTER_UP=0

cluster_sh() {
    SHARDGATE_HOME=$WORK/cluster SHARDGATE_PG_PORT=$PG_PORT SHARDGATE_SHARDS=1 \
        SHARDGATE_REPLICAS=0 bash "$REPO/deploy/local/cluster.sh" "$@"
}

exec {OUT_FD}>&1 {ERR_FD}>&2
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    exec 1>&"$OUT_FD" 2>&"$ERR_FD"
    stop_pid "$SCRAPER_PID"
    stop_pid "$BENCH_PID"
    for p in "${PROXY_PID[@]}"; do stop_pid "$p"; done
    if ((CLUSTER_UP)); then
        if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
            cluster_sh down >/dev/null 2>&1 || log "cluster.sh down failed"
        else
            cluster_sh down --purge >/dev/null 2>&1 || log "cluster.sh down failed"
        fi
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

for p in "$PG_PORT" "$SG_OFF_PORT" "$SG_ON_PORT" "$METRICS_PORT"; do
    port_open "$p" && die "port $p is already in use (see --help for the port variables)"
done

log "starting Postgres (deploy/local/cluster.sh, 1 server) on port $PG_PORT"
CLUSTER_UP=1
cluster_sh up >"$WORK/cluster-up.log" 2>&1 || { cat "$WORK/cluster-up.log" >&2; die "cluster.sh up failed"; }
deadline=$(($(now_ms) + 60000))
until psql_direct -c 'SELECT 1' >/dev/null 2>&1; do
    (($(now_ms) < deadline)) || die "cannot log in to 127.0.0.1:$PG_PORT as app"
    sleep 0.1
done
need=$((CLIENTS + 2 * POOL_SIZE + 10))
maxconn=$(psql_direct -c 'SHOW max_connections')
((maxconn >= need)) || die "max_connections is $maxconn, need $need (lower --pool-size or --clients)"
PG_VERSION=$(psql_direct -c 'SHOW server_version')

log "pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" app >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

if [[ $SHARDGATE_BUILD == 1 && $SHARDGATE_BIN == "$REPO/target/release/shardgate" ]] && command -v cargo >/dev/null; then
    log "building shardgate (cargo build --release -p shardgate)"
    cargo build --release -p shardgate --manifest-path "$REPO/Cargo.toml" >"$WORK/cargo-build.log" 2>&1 ||
        { tail -n 30 "$WORK/cargo-build.log" >&2; die "cargo build failed"; }
fi
[[ -x $SHARDGATE_BIN ]] || die "no shardgate binary at $SHARDGATE_BIN"
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
if [[ -n $(git -C "$REPO" status --porcelain -- proxy config router shardmap Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    GIT_REV+="+uncommitted changes"
fi

# start_proxy NAME PORT [METRICS_PORT]: same config for both, metrics_listen only if given.
start_proxy() {
    local name=$1 port=$2 mport=${3:-} dir=$WORK/$1 pid
    mkdir -p "$dir"
    {
        echo '[general]'
        echo "listen = \"127.0.0.1:$port\""
        [[ -n $mport ]] && echo "metrics_listen = \"127.0.0.1:$mport\""
        cat <<EOF
pool_mode = "transaction"
pool_size = $POOL_SIZE
checkout_timeout = "30s"
client_login_timeout = "60s"

[[users]]
name = "app"
password = "app"
auth = "scram-sha-256"

[[databases]]
name = "app"
[[databases.shards]]
hosts = ["127.0.0.1:$PG_PORT"]
EOF
    } >"$dir/shardgate.toml"
    NO_COLOR=1 "$SHARDGATE_BIN" --config "$dir/shardgate.toml" >>"$dir/shardgate.log" 2>&1 &
    pid=$!
    PROXY_PID[$name]=$pid
    wait_port "$port" 30 "$pid" || { tail -n 20 "$dir/shardgate.log" >&2; die "shardgate ($name) did not start"; }
    if [[ -n $mport ]]; then
        wait_port "$mport" 30 "$pid" || { tail -n 20 "$dir/shardgate.log" >&2; die "shardgate ($name): no metrics port"; }
    fi
    psql -X -At -h 127.0.0.1 -p "$port" -c 'SELECT count(*) FROM pgbench_branches' >"$dir/check.log" 2>&1 ||
        { cat "$dir/check.log" >&2; die "shardgate ($name): query through it failed"; }
}

start_proxy off "$SG_OFF_PORT"
start_proxy on "$SG_ON_PORT" "$METRICS_PORT"
scrape "$METRICS_PORT" >"$WORK/metrics-first.txt" || die "GET /metrics failed"
grep -q '^HTTP/1\.[01] 200' "$WORK/metrics-first.txt" || { head -n 5 "$WORK/metrics-first.txt" >&2; die "GET /metrics: not 200"; }
grep -q '^shardgate_' "$WORK/metrics-first.txt" || die "GET /metrics: no shardgate_ series"
log "metrics on: 127.0.0.1:$METRICS_PORT/metrics serves $(grep -c '^shardgate_' "$WORK/metrics-first.txt") shardgate_ samples"

# ---------------------------------------------------------------------------
# runs

RAW=$WORK/raw.tsv # round variant tps transactions failed cpu_us_per_tx scrapes
: >"$RAW"
CLK_TCK=$(getconf CLK_TCK)

run_one() { # round variant
    local r=$1 v=$2 port pid logf rc=0 c0 c1 tps tx failed cpu=NA deadline scrapes=0
    port=$SG_OFF_PORT
    [[ $v == on ]] && port=$SG_ON_PORT
    pid=${PROXY_PID[$v]}
    logf=$WORK/run.$r.$v.log
    pgbench -n -h 127.0.0.1 -p "$port" -S -M extended -c "$CLIENTS" -j "$THREADS" -T "$DURATION" app \
        >"$logf" 2>&1 &
    BENCH_PID=$!
    if [[ $v == on && $SCRAPE_INTERVAL != 0 ]]; then
        # A scraper like Prometheus's (paced by the interval, not a synchronisation).
        (
            n=0
            while :; do
                scrape "$METRICS_PORT" >/dev/null 2>&1 && n=$((n + 1)) && echo "$n" >"$WORK/scrapes.$r"
                sleep "$SCRAPE_INTERVAL"
            done
        ) &
        SCRAPER_PID=$!
    fi
    # Count the proxy's CPU from the moment every client is connected (SCRAM logins
    # are not charged to the transactions).
    deadline=$(($(now_ms) + 60000))
    while alive "$BENCH_PID" && (($(established "$port") < CLIENTS)) && (($(now_ms) < deadline)); do
        sleep 0.02
    done
    c0=$(cpu_ticks "$pid")
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=
    c1=$(cpu_ticks "$pid")
    if [[ -n $SCRAPER_PID ]]; then
        stop_pid "$SCRAPER_PID"
        SCRAPER_PID=
        scrapes=$(cat "$WORK/scrapes.$r" 2>/dev/null || echo 0)
    fi
    tps=$(awk '/^tps = / && /(without|excluding)/ { print $3 }' "$logf")
    tx=$(awk -F': ' '/^number of transactions actually processed/ { split($2, a, "/"); print a[1] }' "$logf")
    failed=$(awk '/^number of failed transactions/ { print $5 }' "$logf")
    if [[ -z $tps || -z $tx || $rc -ne 0 ]]; then
        tail -n 5 "$logf" >&2
        die "pgbench through shardgate (metrics $v) failed (rc=$rc), log $logf"
    fi
    [[ -n $failed ]] || failed=0
    if ((tx > 0)); then
        cpu=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$tx" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$v" "$tps" "$tx" "$failed" "$cpu" "$scrapes" >>"$RAW"
    log "  metrics $v: tps=$tps tx=$tx failed=$failed cpu_us_per_tx=$cpu$([[ $v == on ]] && echo " scrapes=$scrapes")"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS (pgbench -S -M extended -c $CLIENTS -j $THREADS -T $DURATION)"
    if ((r % 2)); then
        run_one "$r" off
        run_one "$r" on
    else
        run_one "$r" on
        run_one "$r" off
    fi
done

# ---------------------------------------------------------------------------
# report

col() { # variant column-number -> values, one a line
    awk -F'\t' -v v="$1" -v c="$2" '$2 == v { print $c }' "$RAW"
}
TPS_OFF=$(col off 3 | median)
TPS_ON=$(col on 3 | median)
CPU_OFF=$(col off 6 | median)
CPU_ON=$(col on 6 | median)
DIFF=$(awk -v on="$TPS_ON" -v off="$TPS_OFF" 'BEGIN { printf "%+.2f", (on / off - 1) * 100 }')
# Paired per round as well: each round's on/off ratio, then the median of those.
PAIRED=$(awk -F'\t' '{ t[$1, $2] = $3; if ($1 > n) n = $1 }
    END { for (r = 1; r <= n; r++) if (t[r, "off"] > 0) printf "%.4f\n", (t[r, "on"] / t[r, "off"] - 1) * 100 }' "$RAW" | median)
PAIRED=$(printf '%+.2f' "$PAIRED")
FAILED=$(awk -F'\t' '{ n += $5 } END { print n + 0 }' "$RAW")
COST=$(awk -v d="$DIFF" 'BEGIN { printf "%.2f", (d < 0 ? -d : 0) }')

echo
echo "# shardgate metrics overhead: metrics_listen set vs unset"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, $(uname -r); load average at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- Postgres $PG_VERSION (127.0.0.1:$PG_PORT, scale $SCALE), $(pgbench --version)"
echo "- shardgate $SHARDGATE_BIN (git $GIT_REV); pool size $POOL_SIZE, transaction pooling, SCRAM-SHA-256"
echo "- pgbench -n -S -M extended -c $CLIENTS -j $THREADS -T $DURATION, $ROUNDS interleaved rounds (order alternating)"
if [[ $SCRAPE_INTERVAL != 0 ]]; then
    echo "- metrics on: /metrics scraped every ${SCRAPE_INTERVAL}s during its runs"
else
    echo "- metrics on: not scraped during its runs"
fi
echo
echo "| round | metrics | TPS | transactions | failed | CPU-µs/tx | scrapes |"
echo "|---:|---|---:|---:|---:|---:|---:|"
awk -F'\t' '{ printf "| %s | %s | %.0f | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, ($2 == "on" ? $7 : "–") }' "$RAW"
echo
echo "| metrics | TPS (median) | CPU-µs/tx (median) |"
echo "|---|---:|---:|"
printf '| off | %.0f | %s |\n' "$TPS_OFF" "$CPU_OFF"
printf '| on | %.0f | %s |\n' "$TPS_ON" "$CPU_ON"
echo
echo "TPS with metrics on vs off: $DIFF% (medians); per-round paired median: $PAIRED%; failed transactions: $FAILED"
if awk -v c="$COST" -v m="$MAX_OVERHEAD" 'BEGIN { exit !(c < m) }'; then
    echo "verdict: metrics cost ${COST}% TPS, under the ${MAX_OVERHEAD}% goal"
else
    echo "verdict: metrics cost ${COST}% TPS, NOT under the ${MAX_OVERHEAD}% goal (noise? compare the rounds; run more rounds)"
fi
