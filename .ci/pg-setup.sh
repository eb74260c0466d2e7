#!/usr/bin/env bash
# A throwaway PostgreSQL for the store tests (tests/test_store.py), on 127.0.0.1 only.
#
#   eval "$(.ci/pg-setup.sh)"      # then: python -m pytest -q tests/test_store.py
#
# Installs PostgreSQL when its binaries are missing, initialises a cluster in a temporary folder as
# the `postgres` OS user (PostgreSQL refuses to run as root), trust authentication, starts it on
# AGENTRT_PG_PORT (default 5433), creates the role `agentrt` and the database `agentrt_test`, and
# prints the export line for AGENTRT_TEST_POSTGRES_URL on stdout (everything else goes to stderr).
# Running it again while that server is up reuses it. Stop it with the command it prints.
set -euo pipefail

PORT="${AGENTRT_PG_PORT:-5433}"
ROLE=agentrt
DB=agentrt_test
say() { echo "pg-setup: $*" >&2; }

find_bin() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then echo "$dir"; return; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; fi
}

BIN="$(find_bin)"
if [[ -z "$BIN" ]]; then
    say "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y postgresql >&2 || { apt-get update >&2 && apt-get install -y postgresql >&2; }
    BIN="$(find_bin)"
fi
[[ -n "$BIN" ]] || { say "no initdb found after installing postgresql"; exit 1; }

# Run a PostgreSQL binary as the postgres user when we are root, as ourselves otherwise.
as_pg() {
    if [[ "$(id -u)" == 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}
SUPER="$([[ "$(id -u)" == 0 ]] && echo postgres || id -un)"
psql_do() { as_pg "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$SUPER" -d postgres -v ON_ERROR_STOP=1 -qtAc "$1"; }

if as_pg "$BIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q; then
    say "a server is already listening on 127.0.0.1:$PORT; reusing it"
else
    DIR="$(mktemp -d /tmp/agentrt-pg.XXXXXX)"
    chmod 755 "$DIR"
    [[ "$(id -u)" == 0 ]] && chown postgres "$DIR"
    as_pg "$BIN/initdb" -D "$DIR/data" -U "$SUPER" --auth=trust --encoding=UTF8 --no-sync >&2
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off" start >&2
    say "started in $DIR; stop it with: $( [[ "$(id -u)" == 0 ]] && echo "runuser -u postgres -- ")$BIN/pg_ctl -D $DIR/data stop"
fi

if [[ "$(psql_do "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]]; then
    psql_do "CREATE ROLE $ROLE LOGIN"
fi
if [[ "$(psql_do "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]]; then
    psql_do "CREATE DATABASE $DB OWNER $ROLE"
fi
echo "export AGENTRT_TEST_POSTGRES_URL=postgresql+psycopg://$ROLE@127.0.0.1:$PORT/$DB"
