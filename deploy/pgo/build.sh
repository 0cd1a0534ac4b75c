#!/usr/bin/env bash
# Builds the shardgate release binary with profile-guided optimisation (PGO).
#
# Usage: deploy/pgo/build.sh [--out FILE]
#        deploy/pgo/build.sh --check BIN   only step 2, against BIN, one second per run:
#                                          checks that the training workload still runs
#                                          (the end-to-end suite does this)
#
# 1. an instrumented release build (`-Cprofile-generate`, its own target directory);
# 2. a training run: a throwaway local cluster (deploy/local/cluster.sh, three servers,
#    no replicas) with the instrumented shardgate in front of it, serving a pooled
#    database (pgbench's built-in scripts with the simple, extended and prepared
#    protocols) and a database sharded over two servers (COPY, keyed reads and writes,
#    fan-out with merges); see `train` below;
# 3. `llvm-profdata merge` (rustup's llvm-tools component, added when missing);
# 4. the optimised release build (`-Cprofile-use`), copied to FILE
#    (default <target>/pgo/shardgate).
#
# Why: the proxy's own work per transaction is a few thousand instructions spread over
# tokio's scheduler, the protocol bookkeeping and the routing. Laid out by a profile
# (hot paths inlined and straight, cold ones out of the way), it costs about a fifth
# less user CPU per pgbench transaction than the plain release build
# (tests/bench/README.md). The training exercises what every OLTP workload runs
# (pooling, both protocols, statement tracking, keyed routing); it is not the benchmark.
#
# Environment: CARGO_TARGET_DIR (default <repo>/target), SHARDGATE_PGO_PORT (first port
# of the training cluster and shardgate, default 29432; uses PORT..PORT+2 and PORT+10),
# RUSTFLAGS (kept; the PGO flags are added). Takes about 8 minutes on 2 cores.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$HERE/../.." && pwd -P)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
OUT=$TARGET/pgo/shardgate
CHECK_BIN=
PORT=${SHARDGATE_PGO_PORT:-29432}
SG_PORT=$((PORT + 10))

log() { printf 'pgo: %s\n' "$*" >&2; }
die() { printf 'pgo: error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --out) OUT=$(realpath -m "${2:?--out needs a file}"); shift ;;
        --check) CHECK_BIN=$(realpath -m "${2:?--check needs a binary}"); shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

WORK=$(mktemp -d /tmp/shardgate-pgo.XXXXXX)
chmod 755 "$WORK" # the OS user postgres must reach the cluster's directory
SG_PID=
cluster() { SHARDGATE_HOME=$WORK/cluster SHARDGATE_PG_PORT=$PORT SHARDGATE_SHARDS=3 \
    SHARDGATE_REPLICAS=0 "$REPO/deploy/local/cluster.sh" "$@"; }
cleanup() {
    [[ -n $CHILD ]] && kill "$CHILD" 2>/dev/null
    [[ -n $SG_PID ]] && kill "$SG_PID" 2>/dev/null
    [[ -d $WORK/cluster ]] && cluster down --purge >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
# A signal ends the script through its EXIT trap, so the cluster never outlives it.
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command so that a signal interrupts the wait at once (bash defers traps until a
# foreground command ends; `wait` returns early).
CHILD=
waited() {
    local rc=0
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=
    return "$rc"
}

# --- the tools, and 1. instrumented build --------------------------------------------------

build() { # TARGET-DIR EXTRA-RUSTFLAGS
    RUSTFLAGS="${RUSTFLAGS:-} $2" CARGO_TARGET_DIR=$1 \
        waited cargo build --release --locked -p shardgate --manifest-path "$REPO/Cargo.toml" >&2
}

if [[ -n $CHECK_BIN ]]; then
    [[ -x $CHECK_BIN ]] || die "--check: $CHECK_BIN is not an executable"
    PROFILES=$WORK/profiles
    INSTRUMENTED=$CHECK_BIN
    SECS=1
else
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup)"
    sysroot=$(rustc --print sysroot)
    host=$(rustc -vV | sed -n 's/^host: //p')
    PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
    if [[ ! -x $PROFDATA ]]; then
        log "adding rustup's llvm-tools component (for llvm-profdata)"
        rustup component add llvm-tools >&2 ||
            die "could not add llvm-tools: run 'rustup component add llvm-tools'"
    fi
    [[ -x $PROFDATA ]] || die "$PROFDATA not found after adding llvm-tools"

    # A fixed profile directory keeps RUSTFLAGS, and so this build, the same from run to run.
    PROFILES=$TARGET/pgo-instrumented/profiles
    log "instrumented build ($TARGET/pgo-instrumented)"
    mkdir -p "$PROFILES"
    build "$TARGET/pgo-instrumented" "-Cprofile-generate=$PROFILES"
    INSTRUMENTED=$TARGET/pgo-instrumented/release/shardgate
    SECS=3
fi

# --- 2. training -------------------------------------------------------------------------------

log "training cluster on 127.0.0.1:$PORT-$((PORT + 2))"
waited cluster up >/dev/null
pgbin=$(cluster bindir)
# Build scripts are instrumented too; only shardgate's own profiles are merged.
rm -f "$PROFILES"/*.profraw

cat >"$WORK/shardgate.toml" <<EOF
[general]
listen = "127.0.0.1:$SG_PORT"
pool_size = 8
checkout_timeout = "30s"

[[users]]
name = "app"
password = "app"

[[databases]]
name = "pooled"
server_database = "app"
[[databases.shards]]
hosts = ["127.0.0.1:$PORT"]

[[databases]]
name = "sharded"
server_database = "app"
two_phase_commit = true
[[databases.sharded_tables]]
name = "users"
column = "id"
type = "bigint"
[[databases.sharded_tables]]
name = "posts"
column = "user_id"
type = "bigint"
[[databases.shards]]
hosts = ["127.0.0.1:$((PORT + 1))"]
[[databases.shards]]
hosts = ["127.0.0.1:$((PORT + 2))"]
EOF

export PGPASSWORD=app
PGBENCH=$pgbin/pgbench PSQL=$pgbin/psql
LLVM_PROFILE_FILE="$PROFILES/shardgate-%p-%m.profraw" RUST_LOG=warn \
    "$INSTRUMENTED" --config "$WORK/shardgate.toml" >"$WORK/shardgate.log" 2>&1 &
SG_PID=$!
for try in $(seq 100); do
    "$PSQL" -X -At -h 127.0.0.1 -p "$SG_PORT" -U app -c 'select 1' pooled >/dev/null 2>&1 && break
    kill -0 "$SG_PID" 2>/dev/null || { cat "$WORK/shardgate.log" >&2; die "shardgate exited"; }
    ((try < 100)) || { cat "$WORK/shardgate.log" >&2; die "shardgate did not answer on port $SG_PORT"; }
    sleep 0.1
done

bench() { # DATABASE PGBENCH-ARGS...: a short run that must not fail
    local db=$1 out
    shift
    out=$("$PGBENCH" -n -h 127.0.0.1 -p "$SG_PORT" -U app -j 2 "$@" "$db" 2>&1) ||
        { printf '%s\n' "$out" >&2; die "pgbench $* failed"; }
    grep -q '^number of failed transactions: 0 ' <<<"$out" ||
        { printf '%s\n' "$out" >&2; die "pgbench $* had failed transactions"; }
    log "  $db pgbench $*: $(sed -n 's/^tps = \([0-9]*\).*/\1 tps/p' <<<"$out")"
}

train() {
    log "training: pooled database"
    "$PGBENCH" -i -q -s 2 -h 127.0.0.1 -p "$PORT" -U app app >/dev/null 2>&1 || die "pgbench -i failed"
    for mode in extended simple prepared; do
        bench pooled -c 16 -T "$SECS" -S -M "$mode"
        bench pooled -c 8 -T "$SECS" -M "$mode"
    done
    bench pooled -c 48 -T "$SECS" -S -M extended

    log "training: sharded database"
    seq 1 20000 | awk '{ printf "%d\tuser %d\n", $1, $1 }' |
        "$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SG_PORT" -U app sharded \
            -c '\copy users (id, name) from stdin' || die "COPY into users failed"
    cat >"$WORK/keyed.sql" <<'EOF'
\set id random(1, 20000)
SELECT name FROM users WHERE id = :id;
UPDATE users SET name = 'user ' || :id WHERE id = :id;
INSERT INTO posts (id, user_id, body) VALUES (:id, :id, 'post') ON CONFLICT DO NOTHING;
SELECT count(*) FROM posts WHERE user_id = :id;
EOF
    cat >"$WORK/fanout.sql" <<'EOF'
SELECT count(*), max(id) FROM users;
SELECT id, name FROM users ORDER BY id DESC LIMIT 5;
EOF
    for mode in extended simple prepared; do
        bench sharded -c 16 -T "$SECS" -M "$mode" -f "$WORK/keyed.sql"
    done
    bench sharded -c 4 -T "$SECS" -M extended -f "$WORK/fanout.sql"
}
train

kill -TERM "$SG_PID"
for _ in $(seq 100); do kill -0 "$SG_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$SG_PID" 2>/dev/null && die "shardgate did not stop on SIGTERM"
SG_PID=
cluster down --purge >/dev/null 2>&1
if [[ -n $CHECK_BIN ]]; then
    log "check passed: the training workload runs against $CHECK_BIN"
    exit 0
fi

# --- 3. merge ---------------------------------------------------------------------------------

shopt -s nullglob
profiles=("$PROFILES"/shardgate-*.profraw)
((${#profiles[@]})) || die "the training wrote no profile"
"$PROFDATA" merge -o "$WORK/shardgate.profdata" "${profiles[@]}"

# --- 4. optimised build -----------------------------------------------------------------------

# The profile's path is new on every run, so cargo rebuilds with the new profile (it
# tracks RUSTFLAGS, not the file's contents).
log "optimised build ($TARGET/pgo)"
build "$TARGET/pgo" "-Cprofile-use=$WORK/shardgate.profdata"
mkdir -p "$(dirname "$OUT")"
install -m 0755 "$TARGET/pgo/release/shardgate" "$OUT"
log "done: $OUT"
echo "$OUT"
