#!/usr/bin/env bash
# A throwaway PostgreSQL cluster without Docker (Debian's packages).
#
#   postgres.sh start [--port P] [--dir D]   prints a SQLAlchemy URL on stdout
#   postgres.sh stop  [--dir D]
#   postgres.sh status [--dir D]             exit 0 and print the URL if running
#
# A dir remembers its port (pg.env), so `start` on an existing dir restarts the same cluster.
# Everything but the URL goes to stderr, so `url=$(postgres.sh start)` works.
set -euo pipefail

DEFAULT_DIR="${TMPDIR:-/tmp}/gputrace-postgres"
log() { echo "postgres.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

find_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/pg_ctl" ]] && { echo "$d"; return 0; }
    done
    return 1
}

ensure_installed() {
    if ! BIN="$(find_bin)"; then
        [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed (apt-get install postgresql)"
        log "installing PostgreSQL from Debian"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        BIN="$(find_bin)" || die "postgresql installed but pg_ctl not found"
    fi
}

# initdb refuses to run as root: run the cluster as an unprivileged user.
as_owner() {
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

parse() {
    DIR="$DEFAULT_DIR"; PORT=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dir) DIR="$2"; shift 2 ;;
            --port) PORT="$2"; shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
}

url() { echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"; }

cmd_start() {
    parse "$@"
    ensure_installed
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd)"
    if [[ -f "$DIR/pg.env" ]]; then
        # shellcheck disable=SC1091
        source "$DIR/pg.env"
    fi
    PORT="${PORT:-$(free_port)}"
    echo "PORT=$PORT" > "$DIR/pg.env"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
        chown postgres "$DIR"
        chmod 755 "$DIR"
    fi
    if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
        log "initdb in $DIR/data"
        as_owner "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    fi
    if as_owner "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
        log "already running"
    else
        # Sockets in the cluster dir, TCP on loopback only; durable settings kept (fsync on).
        as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 \
            -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >&2
    fi
    "$BIN/pg_isready" -h 127.0.0.1 -p "$PORT" -t 30 >&2 || die "PostgreSQL did not answer on $PORT"
    url
}

cmd_stop() {
    parse "$@"
    BIN="$(find_bin)" || exit 0
    [[ -d "$DIR/data" ]] || exit 0
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
}

cmd_status() {
    parse "$@"
    BIN="$(find_bin)" || exit 1
    [[ -f "$DIR/pg.env" ]] || exit 1
    # shellcheck disable=SC1091
    source "$DIR/pg.env"
    as_owner "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1 || exit 1
    url
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) echo "usage: $0 {start|stop|status} [--port P] [--dir D]" >&2; exit 2 ;;
esac
