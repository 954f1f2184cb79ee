#!/usr/bin/env bash
# A local Postgres 15 cluster with pg_reverse_etl preloaded, owned by the unprivileged
# `postgres` user (Postgres refuses to run as root). Used by `make run` and `make test`.
#   scripts/cluster.sh start|stop|restart|status
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN_DIR=${RETL_RUN_DIR:-$ROOT/.run}
PGDATA_DIR=$RUN_DIR/pgdata
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PORT=${PGPORT:-28815}
PASSWORD=${PGPASSWORD:-retl-dev}
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres "$@"; fi; }

init() {
    [ -f "$PGDATA_DIR/PG_VERSION" ] && return 0
    install -d -o postgres -g postgres -m 700 "$RUN_DIR" "$PGDATA_DIR"
    local pwfile
    pwfile=$(mktemp) && echo "$PASSWORD" >"$pwfile" && chown postgres "$pwfile"
    as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --pwfile="$pwfile" \
        --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    cat >>"$PGDATA_DIR/postgresql.conf" <<CONF
# pg_reverse_etl development cluster
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$RUN_DIR'
shared_preload_libraries = 'pg_reverse_etl'
retl.database_name = 'postgres'
max_connections = 50
logging_collector = off
log_line_prefix = '%m [%p] %b '
restart_after_crash = on
CONF
}

start() {
    init
    if as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then return 0; fi
    # RETL_E2E_TOKEN: the end-to-end tests check that a user mapping's token_env is read from
    # the server's environment. It is a test value, not a secret.
    as_pg env RETL_E2E_TOKEN=token-from-the-server-environment \
        "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$RUN_DIR/postgres.log" -w -t 60 \
        -o "-c shared_buffers=$(shared_buffers)" start >/dev/null
    echo "postgres running on 127.0.0.1:$PORT (log: $RUN_DIR/postgres.log, shared_buffers $(shared_buffers))"
}

# A quarter of the machine's memory, the starting point the Postgres documentation gives for
# a dedicated server, between Debian's default of 128MB and 8GB. With 128MB a 1M-row sync's
# snapshot, outbox and model did not fit: backends wrote out dirty pages to make room, and
# plans of 10% changes took about a quarter longer (docs/BENCHMARKS.md). Set at every start,
# so an existing cluster gets it too; RETL_SHARED_BUFFERS overrides it.
shared_buffers() {
    if [ -n "${RETL_SHARED_BUFFERS:-}" ]; then echo "$RETL_SHARED_BUFFERS"; return; fi
    local kb mb
    kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mb=$((kb / 1024 / 4))
    [ "$mb" -lt 128 ] && mb=128
    [ "$mb" -gt 8192 ] && mb=8192
    echo "${mb}MB"
}

stop() {
    [ -f "$PGDATA_DIR/PG_VERSION" ] || return 0
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 60 stop >/dev/null 2>&1 || true
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status ;;
    *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
