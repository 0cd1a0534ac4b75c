# shellcheck shell=bash
# The PgBouncer that the benchmarks compare with: our own process and ini (the Debian
# package's service is never used), transaction pooling, SCRAM-SHA-256, user app/app.
# Sourced by pgbench.sh and instructions.sh.

# write_pgbouncer_conf DIR PG_PORT LISTEN_PORT POOL_SIZE: DIR/pgbouncer.ini and DIR/userlist.txt
write_pgbouncer_conf() {
    local dir=$1 pg_port=$2 port=$3 pool_size=$4
    mkdir -p "$dir"
    printf '"app" "app"\n' >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$pg_port dbname=app

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $pool_size
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 20000
max_db_connections = 0
logfile = $dir/pgbouncer.log
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
server_login_retry = 1
INI
}
