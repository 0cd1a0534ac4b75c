#!/usr/bin/env bash
# Runs every check of the project: system packages, rustfmt, release build, clippy,
# a shared PostgreSQL test cluster, then `cargo test --profile suite --workspace`
# (the release optimisations with faster links; see Cargo.toml).
#
# Usage: tests/run.sh [CARGO-TEST-ARGS...]     e.g. tests/run.sh -p shardgate-e2e -- --nocapture
#
# Works on a fresh Debian 12 machine as root with only Rust installed: missing system
# packages (PostgreSQL 15, openssl, a C compiler) are installed with apt-get.
#
# The shared test cluster (2 shards x 2 replicas, ports 25432-25437 by default) lives
# in a temporary directory and is always torn down at the end. The tests see:
#   SHARDGATE_TEST_PG_PORT    first port of the shared cluster (default 25432)
#   SHARDGATE_TEST_SHARDS     its shards (2)
#   SHARDGATE_TEST_REPLICAS   its replicas per shard (2)
#   SHARDGATE_TEST_HOME       its SHARDGATE_HOME (for `cluster.sh status|env|psql|stop|start`)
#   SHARDGATE_TEST_SCRATCH    a directory for clusters the tests start themselves, each
#                             in its own subdirectory used as SHARDGATE_HOME; whatever
#                             runs there at the end is stopped and deleted
#   SHARDGATE_BIN             the binary under test (default <repo>/target/suite/shardgate;
#                             e.g. target/pgo/shardgate to test the profile-guided build)
#   SHARDGATE_CLUSTER_SH      <repo>/deploy/local/cluster.sh
#   SHARDGATE_TEST_SHARD<i>_PRIMARY_URL, SHARDGATE_TEST_SHARD<i>_REPLICA<j>_URL
#
# Other knobs: SHARDGATE_SKIP_LINT=1 skips rustfmt and clippy.
# Exit status: the tests' status if they failed, else 1 if any other stage failed, else 0.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO_ROOT"
CLUSTER_SH=$REPO_ROOT/deploy/local/cluster.sh

# --- stages and the summary --------------------------------------------------------------

STAGE="" STAGE_START=$SECONDS
RESULTS=()
FAILED_STAGES=0
TEST_STATUS=0

stage() {
    STAGE=$1
    STAGE_START=$SECONDS
    printf '\n==> %s\n' "$STAGE" >&2
}
passed() { RESULTS+=("ok       $STAGE ($(( SECONDS - STAGE_START ))s)"); }
failed() {
    RESULTS+=("FAILED   $STAGE ($(( SECONDS - STAGE_START ))s)${1:+: $1}")
    FAILED_STAGES=$(( FAILED_STAGES + 1 ))
    printf '==> FAILED: %s%s\n' "$STAGE" "${1:+: $1}" >&2
}
skipped() {
    RESULTS+=("skipped  $STAGE: $1")
    printf '==> skipped: %s: %s\n' "$STAGE" "$1" >&2
}

summary() {
    printf '\n==> summary (%ss in all)\n' "$SECONDS" >&2
    local line
    for line in "${RESULTS[@]}"; do
        printf '    %s\n' "$line" >&2
    done
}

# Stops here after a stage without which the rest cannot run.
finish() {
    teardown
    summary
    if (( TEST_STATUS != 0 )); then
        exit "$TEST_STATUS"
    fi
    (( FAILED_STAGES == 0 )) || exit 1
    exit 0
}

# --- the shared test cluster ----------------------------------------------------------------

TEST_ROOT=""
TORN_DOWN=0

teardown() {
    (( TORN_DOWN == 0 )) || return 0
    TORN_DOWN=1
    [[ -n $TEST_ROOT && -d $TEST_ROOT ]] || return 0
    local layout home
    # Clusters the tests started themselves under the scratch directory, then the shared one.
    while IFS= read -r layout; do
        home=$(dirname "$layout")
        SHARDGATE_HOME=$home "$CLUSTER_SH" down --purge >&2 || echo "warning: could not stop the cluster in $home" >&2
    done < <(find "$TEST_ROOT/scratch" -maxdepth 3 -name cluster.layout 2>/dev/null)
    SHARDGATE_HOME=$TEST_ROOT/cluster "$CLUSTER_SH" down --purge >&2 || echo "warning: could not stop the test cluster" >&2
    rm -rf "$TEST_ROOT"
}

# shellcheck disable=SC2317  # called by the EXIT trap
on_exit() {
    local status=$?
    if (( TORN_DOWN == 0 )); then
        # Interrupted (signal or an unexpected error) before finish().
        teardown
        printf '==> stopped during: %s (status %s)\n' "$STAGE" "$status" >&2
        summary
    fi
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

dump_server_logs() {
    local f
    for f in "$SHARDGATE_TEST_HOME"/pg/log/*.log; do
        [[ -f $f ]] || continue
        printf -- '--- last lines of %s\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

# --- 1. system packages -------------------------------------------------------------------

stage "system packages"
command -v cargo >/dev/null || { failed "cargo not found: install Rust (rustup)"; finish; }
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
if (( ${#missing[@]} > 0 )); then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; }; then
            failed "apt-get install ${missing[*]}"
            finish
        fi
    else
        failed "missing packages: ${missing[*]} (install them, or run as root with apt-get)"
        finish
    fi
fi
# PostgreSQL (postgresql-15, postgresql-contrib) is installed by cluster.sh when missing.
"$CLUSTER_SH" install || { failed "PostgreSQL 15 could not be installed"; finish; }
# Prometheus and promtool (Debian package `prometheus`) for tests/tests/deploy_kit.rs,
# which skips its Prometheus checks with a note when they are missing.
if ! { command -v prometheus && command -v promtool; } >/dev/null && [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >&2 \
        || echo "warning: could not install prometheus: the deploy kit tests will skip their Prometheus checks" >&2
fi
# The real client drivers the driver checks run (tests/drivers): Python, Java, Node.js.
if ! "$REPO_ROOT/tests/drivers/install.sh"; then
    failed "tests/drivers/install.sh: the driver checks will fail"
else
    passed
fi

# --- 2. rustfmt --------------------------------------------------------------------------------

# Makes `cargo <tool>` available, adding the rustup component if needed.
have_cargo_tool() { # SUBCOMMAND COMPONENT
    cargo "$1" --version >/dev/null 2>&1 && return 0
    command -v rustup >/dev/null || return 1
    echo "adding the rustup component $2" >&2
    rustup component add "$2" >&2 || return 1
    cargo "$1" --version >/dev/null 2>&1
}

stage "rustfmt (cargo fmt --all -- --check)"
if [[ ${SHARDGATE_SKIP_LINT:-} == 1 ]]; then
    skipped "SHARDGATE_SKIP_LINT=1"
elif ! have_cargo_tool fmt rustfmt; then
    skipped "rustfmt is not installed and could not be added"
elif cargo fmt --all -- --check; then
    passed
else
    failed "run 'cargo fmt --all'"
fi

# --- 3. build -------------------------------------------------------------------------------------

stage "build (cargo build --profile suite --workspace --all-targets)"
if cargo build --profile suite --workspace --all-targets; then
    passed
else
    failed
    finish
fi

# --- 4. clippy -------------------------------------------------------------------------------------

stage "clippy (cargo clippy --profile suite --workspace --all-targets -- -D warnings)"
if [[ ${SHARDGATE_SKIP_LINT:-} == 1 ]]; then
    skipped "SHARDGATE_SKIP_LINT=1"
elif ! have_cargo_tool clippy clippy; then
    skipped "clippy is not installed and could not be added"
elif cargo clippy --profile suite --workspace --all-targets -- -D warnings; then
    passed
else
    failed
fi

# --- 5. the shared test cluster -------------------------------------------------------------

stage "test cluster (deploy/local/cluster.sh up)"
TEST_ROOT=$(mktemp -d /tmp/shardgate-test.XXXXXX)
chmod 755 "$TEST_ROOT" # the OS user postgres must reach the data directories
mkdir -p "$TEST_ROOT/scratch"
chmod 755 "$TEST_ROOT/scratch"
export SHARDGATE_TEST_PG_PORT=${SHARDGATE_TEST_PG_PORT:-25432}
export SHARDGATE_TEST_SHARDS=2
export SHARDGATE_TEST_REPLICAS=2
export SHARDGATE_TEST_HOME=$TEST_ROOT/cluster
export SHARDGATE_TEST_SCRATCH=$TEST_ROOT/scratch
export SHARDGATE_BIN=${SHARDGATE_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/suite/shardgate}
export SHARDGATE_CLUSTER_SH=$CLUSTER_SH
cluster_env() {
    SHARDGATE_HOME=$SHARDGATE_TEST_HOME SHARDGATE_PG_PORT=$SHARDGATE_TEST_PG_PORT \
        SHARDGATE_SHARDS=$SHARDGATE_TEST_SHARDS SHARDGATE_REPLICAS=$SHARDGATE_TEST_REPLICAS \
        "$CLUSTER_SH" "$@"
}
if cluster_env up >&2 && urls=$(cluster_env env); then
    while IFS='=' read -r key value; do
        export "SHARDGATE_TEST_$key=$value"
    done <<<"$urls"
    passed
else
    failed
    finish
fi

# --- 6. tests -----------------------------------------------------------------------------------------

stage "tests (cargo test --profile suite --workspace $*)"
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
if cargo test --profile suite --workspace "$@"; then
    passed
else
    TEST_STATUS=$?
    failed "exit status $TEST_STATUS"
    dump_server_logs
fi

finish
