#!/usr/bin/env bash
# Installs what the driver checks (tests/drivers, run by the e2e and sharding tests)
# need, when it is missing: asyncpg, psycopg 3 and psycopg2 for Debian's python3, the
# PostgreSQL JDBC driver and a JDK (the check is a single-file Java program), Node.js,
# and node-postgres (npm ci into tests/drivers/node/node_modules, from package-lock.json).
# Debian packages need root and apt-get; npm needs the npm registry.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

missing=()
/usr/bin/python3 -c 'import asyncpg' 2>/dev/null || missing+=(python3-asyncpg)
/usr/bin/python3 -c 'import psycopg' 2>/dev/null || missing+=(python3-psycopg)
/usr/bin/python3 -c 'import psycopg2' 2>/dev/null || missing+=(python3-psycopg2)
[[ -f /usr/share/java/postgresql.jar ]] || missing+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || missing+=(default-jdk-headless)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if (( ${#missing[@]} > 0 )); then
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "drivers: missing ${missing[*]} (install them, or run as root with apt-get)" >&2
        exit 1
    fi
    echo "drivers: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# node-postgres at the version package-lock.json pins; again only when that changed.
node=$HERE/node
if ! cmp -s "$node/package-lock.json" "$node/node_modules/.package-lock.json.installed" 2>/dev/null; then
    echo "drivers: npm ci in $node" >&2
    (cd "$node" && npm ci --no-audit --no-fund --loglevel=error >&2)
    cp "$node/package-lock.json" "$node/node_modules/.package-lock.json.installed"
fi
