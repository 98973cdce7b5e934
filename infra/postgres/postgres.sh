#!/usr/bin/env bash
# Local throwaway PostgreSQL cluster without Docker.
#
#   postgres.sh start [--port P] [--dir D]   prints postgresql+psycopg://postgres@127.0.0.1:P/postgres
#   postgres.sh stop [--dir D]               fast shutdown (pg_ctl -m fast), waits
#   postgres.sh status [--dir D]             exit 0 and print the URL if running, else exit 1
#   postgres.sh createdb NAME [--dir D]      creates NAME if missing, prints its URL
#   postgres.sh ledger-roles NAME [--dir D]  the ledger's owner and run-time roles for database NAME
#                                            (docs/ops.md); prints the run-time role's URL
#
# D holds the cluster in D/data and its log in D/postgres.log. `start` on an existing D restarts
# the same cluster on the same port (after a kill -9 PostgreSQL runs crash recovery itself).
# Only the URL goes to stdout, so `$(postgres.sh start)` is usable.
#
# Runs as root too: initdb/postgres refuse root, so as root the server runs as the `postgres`
# user (created if missing) and D is chown'ed to it; D's parents must let that user through
# (e.g. /tmp/x is fine, a 0700 home directory is not).
set -euo pipefail

DEFAULT_DIR="${TMPDIR:-/tmp}/gputrace-postgres"

log() { echo "postgres.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

PY="$(command -v /usr/bin/python3 || command -v python3 || true)"

free_port() {
    [[ -n "$PY" ]] || die "python3 is needed to pick a free port"
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

find_bindir() {
    local d
    # Debian keeps server binaries out of PATH, one directory per major version; take the newest.
    d="$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)"
    if [[ -n "$d" && -x "$d/initdb" ]]; then
        echo "$d"
    elif command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(command -v initdb)"
    else
        return 1
    fi
}

ensure_postgres() {
    if BINDIR="$(find_bindir)"; then return 0; fi
    [[ $EUID -eq 0 ]] || die "PostgreSQL server binaries not found (apt-get install postgresql)"
    log "installing PostgreSQL from Debian"
    # Debian's package would create and start a 'main' cluster on 5432; we only want binaries.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/gputrace.conf
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BINDIR="$(find_bindir)" || die "PostgreSQL installed but initdb not found"
}

# Run a command as the cluster's owner: ourselves, unless we are root.
as_owner() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

parse_args() {
    PORT=""
    DIR="$DEFAULT_DIR"
    ARGS=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) PORT="$2"; shift 2 ;;
            --dir) DIR="$2"; shift 2 ;;
            -*) die "unknown option: $1" ;;
            *) ARGS+=("$1"); shift ;;
        esac
    done
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd)"
    PGDATA="$DIR/data"
}

configured_port() {
    sed -n 's/^port = \([0-9]*\).*/\1/p' "$PGDATA/postgresql.auto.conf" 2>/dev/null | tail -n1
}

url() { echo "postgresql+psycopg://postgres@127.0.0.1:$1/${2:-postgres}"; }

is_running() {
    [[ -f "$PGDATA/postmaster.pid" ]] || return 1
    local pid
    pid="$(head -n1 "$PGDATA/postmaster.pid")"
    # After a kill -9 the pid file stays behind; make sure the pid is still a postgres.
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && grep -q postgres "/proc/$pid/cmdline" 2>/dev/null
}

cmd_start() {
    parse_args "$@"
    ensure_postgres
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        chown postgres: "$DIR"
        as_owner test -w "$DIR" || die "user postgres cannot write $DIR (a parent directory is closed to it?)"
    fi
    if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
        [[ -n "$PORT" ]] || PORT="$(free_port)"
        log "initdb in $PGDATA"
        # Trust on loopback only: a disposable dev/test cluster, reachable from this machine alone.
        # --no-sync: skip initdb's final fsync of ~1000 files (seconds); an OS crash in that moment
        # costs a throwaway cluster. The server itself keeps fsync on.
        as_owner "$BINDIR/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync \
            >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
        # postgresql.auto.conf wins over postgresql.conf and is where the port is remembered.
        as_owner tee -a "$PGDATA/postgresql.auto.conf" >/dev/null <<EOF
port = $PORT
listen_addresses = '127.0.0.1'
# TCP only: no socket in /var/run/postgresql, which may not exist or belong to another cluster.
unix_socket_directories = ''
max_connections = 200
EOF
    else
        local existing
        existing="$(configured_port)"
        [[ -z "$PORT" || "$PORT" == "$existing" ]] || die "$DIR belongs to a cluster on port $existing"
        PORT="$existing"
    fi
    if is_running; then
        log "already running"
        url "$PORT"
        return 0
    fi
    as_owner "$BINDIR/pg_ctl" -D "$PGDATA" -l "$DIR/postgres.log" -w -t 120 start >&2 \
        || { tail -n 30 "$DIR/postgres.log" >&2; die "pg_ctl start failed"; }
    local i
    for ((i = 0; i < 100; i++)); do
        "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres && break
        sleep 0.1
    done
    "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres || die "server started but pg_isready does not answer"
    log "ready (data in $PGDATA)"
    url "$PORT"
}

cmd_stop() {
    parse_args "$@"
    if ! is_running; then
        log "not running"
        return 0
    fi
    ensure_postgres
    as_owner "$BINDIR/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >&2 \
        || as_owner "$BINDIR/pg_ctl" -D "$PGDATA" -m immediate -w stop >&2
}

cmd_status() {
    parse_args "$@"
    if is_running; then
        url "$(configured_port)"
    else
        log "not running"
        return 1
    fi
}

cmd_createdb() {
    parse_args "$@"
    [[ ${#ARGS[@]} -eq 1 ]] || die "usage: createdb NAME [--dir D]"
    local name="${ARGS[0]}" port
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "database name must be a plain identifier: $name"
    is_running || die "not running in $DIR"
    ensure_postgres
    port="$(configured_port)"
    if [[ -z "$("$BINDIR/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
        "select 1 from pg_database where datname = '$name'")" ]]; then
        "$BINDIR/createdb" -h 127.0.0.1 -p "$port" -U postgres "$name"
    fi
    url "$port" "$name"
}

# The owner creates the tables and the append-only triggers; the run-time role may read and write
# rows but, not owning the tables, cannot drop or disable the triggers (docs/ops.md).
cmd_ledger_roles() {
    parse_args "$@"
    [[ ${#ARGS[@]} -eq 1 ]] || die "usage: ledger-roles NAME [--dir D]"
    local name="${ARGS[0]}" port
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "database name must be a plain identifier: $name"
    is_running || die "not running in $DIR"
    ensure_postgres
    port="$(configured_port)"
    "$BINDIR/psql" -v ON_ERROR_STOP=1 -q -h 127.0.0.1 -p "$port" -U postgres -d "$name" >&2 <<SQL
DO \$\$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gputrace_ledger_owner') THEN
        CREATE ROLE gputrace_ledger_owner LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gputrace_ledger_app') THEN
        CREATE ROLE gputrace_ledger_app LOGIN;
    END IF;
END \$\$;
ALTER DATABASE "$name" OWNER TO gputrace_ledger_owner;
ALTER SCHEMA public OWNER TO gputrace_ledger_owner;
GRANT CONNECT ON DATABASE "$name" TO gputrace_ledger_app;
GRANT USAGE ON SCHEMA public TO gputrace_ledger_app;
ALTER DEFAULT PRIVILEGES FOR ROLE gputrace_ledger_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO gputrace_ledger_app;
ALTER DEFAULT PRIVILEGES FOR ROLE gputrace_ledger_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO gputrace_ledger_app;
SQL
    echo "postgresql+psycopg://gputrace_ledger_app@127.0.0.1:$port/$name"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    createdb) shift; cmd_createdb "$@" ;;
    ledger-roles) shift; cmd_ledger_roles "$@" ;;
    *) echo "usage: $0 {start [--port P] [--dir D]|stop [--dir D]|status [--dir D]|createdb NAME [--dir D]|ledger-roles NAME [--dir D]}" >&2; exit 2 ;;
esac
