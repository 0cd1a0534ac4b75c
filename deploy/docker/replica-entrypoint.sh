#!/usr/bin/env bash
# Entrypoint of the replica container: on first start, clone the primary with
# pg_basebackup (-R writes standby.signal and primary_conninfo), then run the image's
# usual entrypoint, which finds an initialised data directory and starts a hot standby.
set -euo pipefail

: "${PRIMARY_HOST:?}" "${REPLICATION_USER:?}" "${REPLICATION_PASSWORD:?}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready --host "$PRIMARY_HOST" --port 5432 --quiet; do
        echo "replica: waiting for the primary at $PRIMARY_HOST" >&2
        sleep 1
    done
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    gosu postgres env PGPASSWORD="$REPLICATION_PASSWORD" \
        pg_basebackup --host "$PRIMARY_HOST" --port 5432 --username "$REPLICATION_USER" \
        --pgdata "$PGDATA" --wal-method=stream --write-recovery-conf --checkpoint=fast \
        --progress
fi

exec docker-entrypoint.sh postgres "$@"
