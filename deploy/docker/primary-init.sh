#!/usr/bin/env bash
# Runs once, when the primary's data directory is created (docker-entrypoint-initdb.d):
# the application user and database, the replication role, and the demo schema.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
CREATE ROLE app LOGIN PASSWORD 'app';
CREATE DATABASE app OWNER app;
CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'replicator';
SQL

# The demo schema, owned by app.
PGPASSWORD=app psql -v ON_ERROR_STOP=1 --host /var/run/postgresql --username app --dbname app \
    -f /schema.sql

# Streaming replication from the compose network (the image's default pg_hba.conf has no
# `replication` line for remote hosts).
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
