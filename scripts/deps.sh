#!/usr/bin/env bash
# Installs what building and testing pg_reverse_etl needs, skipping what is already there:
# Debian's Postgres 15 server and headers, libclang (bindgen), sudo (to run Postgres as the
# `postgres` user), postgres_exporter (the metrics test), cargo-pgrx at the pinned version,
# and `cargo pgrx init` against Debian's pg_config.
set -euo pipefail

PGRX_VERSION=${PGRX_VERSION:?set by the Makefile}
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
APT_PACKAGES="postgresql-15 postgresql-server-dev-15 libclang-dev sudo curl"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    # The server package upgrade must not happen under a running cluster of ours.
    "$(dirname "$0")/cluster.sh" stop || true
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
# The real postgres_exporter, which the metrics test runs with contrib/postgres_exporter.
if ! dpkg-query -W -f='${Status}' prometheus-postgres-exporter 2>/dev/null | grep -q "install ok installed"; then
    echo "installing: prometheus-postgres-exporter"
    [ -n "$missing" ] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-postgres-exporter >/dev/null
fi

if [ "$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx $PGRX_VERSION" ]; then
    echo "installing cargo-pgrx $PGRX_VERSION"
    # Debug build without default features: its only job here is building against the
    # local pg_config (~2.5 min instead of ~12).
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --debug --no-default-features
fi

# `cargo pgrx init` rewrites its config every time, which forces a full pgrx rebuild.
if ! grep -qs "pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG"
fi
