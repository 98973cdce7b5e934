#!/usr/bin/env bash
# Local single-node Apache Kafka 4.x (KRaft, combined broker+controller) without Docker.
#
#   kafka.sh fetch                       jars -> ${GPUTRACE_CACHE:-~/.cache/gputrace}/kafka-<v>/libs
#   kafka.sh start [--port P] [--dir D]  prints the bootstrap address 127.0.0.1:P on stdout
#   kafka.sh stop  [--dir D]             SIGTERM, wait, SIGKILL if needed
#   kafka.sh status [--dir D]            exit 0 and print the address if running, else exit 1
#
# A dir remembers its ports (kafka.env): `start` on an existing dir restarts the same broker, same
# data, same ports (the controller's endpoint is written into the KRaft bootstrap checkpoint, so it
# must not move); `--port` may move the client port. Everything but the address goes to stderr, so
# `$(kafka.sh start)` is usable.
#
# `start` refuses a port another process listens on (naming it), and says `ready` only once the
# answer on the port comes from the java process it started: never from someone else's broker.
#
# Env: KAFKA_VERSION (default below), GPUTRACE_CACHE, KAFKA_HEAP_OPTS, KAFKA_JVM_OPTS,
#      KAFKA_START_TIMEOUT (seconds, default 180: a loaded 2-core box can take over 90 s to start it).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
CACHE_ROOT="${GPUTRACE_CACHE:-$HOME/.cache/gputrace}"
KAFKA_HOME="$CACHE_ROOT/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
DEFAULT_DIR="${TMPDIR:-/tmp}/gputrace-kafka"

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Prefer the system python: a pyenv shim may point at an interpreter that is not there in CI.
PY="$(command -v /usr/bin/python3 || command -v python3 || true)"
# Who holds a port (standard library only, so the system python runs it).
PORTS_PY="$HERE/../../tools/ports.py"

# Fails naming the process that listens on port $1 (for $2), if any.
require_free() {
    local why
    if ! why="$("$PY" "$PORTS_PY" check "$1" "$2")"; then
        die "$why; stop it or choose another port"
    fi
}

# True when pid $1 itself listens on port $2.
owns_port() { "$PY" "$PORTS_PY" owns "$1" "$2"; }

free_port() {
    [[ -n "$PY" ]] || die "python3 is needed to pick a free port"
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ensure_java() {
    if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
        [[ $EUID -eq 0 ]] || die "java and mvn are required (apt-get install default-jdk-headless maven)"
        log "installing a JDK and Maven from Debian"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jdk-headless maven >&2
    fi
}

# The stamp ties a complete libs/ to the exact pom it came from, so a cached run skips Maven
# entirely (Maven's own start-up alone costs seconds).
stamp_value() { echo "$KAFKA_VERSION $(sha256sum "$HERE/pom.xml" | cut -d' ' -f1)"; }

cmd_fetch() {
    if [[ -f "$KAFKA_HOME/.complete" && "$(cat "$KAFKA_HOME/.complete")" == "$(stamp_value)" ]]; then
        return 0
    fi
    ensure_java
    mkdir -p "$KAFKA_HOME"
    # Several test processes may fetch at once: one does the work, the others wait for it.
    exec 9>"$KAFKA_HOME/.lock"
    flock 9
    if [[ -f "$KAFKA_HOME/.complete" && "$(cat "$KAFKA_HOME/.complete")" == "$(stamp_value)" ]]; then
        exec 9>&-
        return 0
    fi
    log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
    local tmp="$KAFKA_HOME/libs.tmp"
    rm -rf "$tmp"
    # -f with an absolute pom; run from / so no stray project in the cwd is picked up.
    # Maven's output goes to a log, shown only on failure.
    if ! (cd / && mvn -B -q -Dstyle.color=never -f "$HERE/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp") >"$KAFKA_HOME/fetch.log" 2>&1; then
        tail -n 40 "$KAFKA_HOME/fetch.log" >&2
        die "mvn dependency:copy-dependencies failed (full log: $KAFKA_HOME/fetch.log)"
    fi
    [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "kafka_2.13-$KAFKA_VERSION.jar missing after fetch"
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    stamp_value >"$KAFKA_HOME/.complete"
    exec 9>&-
}

parse_args() {
    PORT=""
    DIR="$DEFAULT_DIR"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) PORT="$2"; shift 2 ;;
            --dir) DIR="$2"; shift 2 ;;
            *) die "unknown argument: $1" ;;
        esac
    done
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd)"
    PIDFILE="$DIR/kafka.pid"
}

running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    # Guard against a recycled pid after a reboot or kill -9: it must be our java.
    grep -q 'kafka.Kafka' "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

# Answers only once the broker's data-plane listener processes requests: Kafka enables request
# processing at the end of broker start-up, after it is unfenced, so a reply means "usable".
# Raw ApiVersions v0 over a socket: stdlib only, no JVM, no client library.
probe() {
    "$PY" - "$1" <<'EOF'
import socket, struct, sys
port = int(sys.argv[1])
client = b"gputrace-probe"
body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
try:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.settimeout(2.0)
        s.sendall(struct.pack(">i", len(body)) + body)
        head = b""
        while len(head) < 8:
            chunk = s.recv(8 - len(head))
            if not chunk:
                sys.exit(1)
            head += chunk
except OSError:
    sys.exit(1)
sys.exit(0 if struct.unpack(">ii", head)[1] == 7 else 1)
EOF
}

write_config() {
    # Written on every start from kafka.env, so config changes here reach existing dirs too.
    cat >"$DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
log.dirs=$DIR/data
# Topics are created on purpose by the services; a typo must fail, not invent a topic.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions than the default 50: creating them is most of a first group join.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
# Tests start consumers at once; the default 3 s delay only slows the first rebalance.
group.initial.rebalance.delay.ms=0
# After a kill -9 the restarted broker can't register until its old session expires (default 9 s):
# a short session makes crash-and-restart tests quick. Heartbeats are in-process, so cheap.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=500
log.segment.bytes=16777216
log.retention.hours=24
num.network.threads=2
num.io.threads=4
EOF
    cat >"$DIR/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn">
  <Appenders>
    <RollingFile name="server" fileName="$DIR/logs/server.log" filePattern="$DIR/logs/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <SizeBasedTriggeringPolicy size="50MB"/>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.controller" level="INFO"/>
  </Loggers>
</Configuration>
EOF
}

java_cmd() {
    # Small heap: this box also runs PostgreSQL and the services. SerialGC: fewer threads, less
    # memory and a quicker start than G1 on 2 cores, and pauses are tiny at this heap size.
    # TieredStopAtLevel=1 (C1 only): start-up costs ~4 s of CPU instead of ~7 s (C2 compiling), which
    # is what a 2-core box running everything else waits on; a dev/test broker is never the
    # bottleneck next to Python clients. For a long benchmark run, KAFKA_JVM_OPTS=-XX:+UseSerialGC.
    # shellcheck disable=SC2206  # deliberate word splitting of user-supplied option strings
    JAVA_ARGS=(${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m} ${KAFKA_JVM_OPTS:--XX:+UseSerialGC -XX:TieredStopAtLevel=1}
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
        -Dlog4j2.configurationFile="$DIR/log4j2.xml" -Dkafka.logs.dir="$DIR/logs"
        -cp "$LIBS/*")
}

cmd_start() {
    parse_args "$@"
    local pid
    if pid="$(running_pid)"; then
        # shellcheck disable=SC1091
        source "$DIR/kafka.env"
        [[ -z "$PORT" || "$PORT" == "$KAFKA_PORT" ]] || die "already running in $DIR on port $KAFKA_PORT"
        log "already running (pid $pid)"
        echo "127.0.0.1:$KAFKA_PORT"
        return 0
    fi
    cmd_fetch
    if [[ -f "$DIR/kafka.env" ]]; then
        # shellcheck disable=SC1091
        source "$DIR/kafka.env"
        # The client listener may move (the broker re-registers it on start); the controller's may not.
        [[ -z "$PORT" || "$PORT" == "$KAFKA_PORT" ]] || log "moving the broker's client port from $KAFKA_PORT to $PORT"
        PORT="${PORT:-$KAFKA_PORT}"
    else
        [[ -n "$PORT" ]] || PORT="$(free_port)"
        CONTROLLER_PORT="$(free_port)"
        while [[ "$CONTROLLER_PORT" == "$PORT" ]]; do CONTROLLER_PORT="$(free_port)"; done
    fi
    require_free "$PORT" "Kafka"
    require_free "$CONTROLLER_PORT" "Kafka's controller"
    printf 'KAFKA_PORT=%s\nCONTROLLER_PORT=%s\n' "$PORT" "$CONTROLLER_PORT" >"$DIR/kafka.env"
    mkdir -p "$DIR/logs"
    write_config
    java_cmd
    if [[ ! -f "$DIR/data/meta.properties" ]]; then
        # Kafka's Uuid text form: 16 random bytes, url-safe base64, unpadded. Kafka itself never
        # hands out one starting with '-' (it would read as a CLI flag), so neither do we.
        local cluster_id="-"
        while [[ "$cluster_id" == -* ]]; do
            cluster_id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
        done
        log "formatting KRaft storage in $DIR/data (cluster $cluster_id)"
        java "${JAVA_ARGS[@]}" kafka.tools.StorageTool format --standalone \
            -t "$cluster_id" -c "$DIR/server.properties" >"$DIR/logs/format.out" 2>&1 \
            || { cat "$DIR/logs/format.out" >&2; die "StorageTool format failed"; }
    fi
    # setsid + nohup: the broker outlives this script and the caller's terminal/process group;
    # `stop` (or the test fixture) ends it explicitly.
    setsid nohup java "${JAVA_ARGS[@]}" kafka.Kafka "$DIR/server.properties" \
        >"$DIR/logs/kafka.out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-180}))
    # Ours answering, not just anyone: the port must be held by the java we started.
    until probe "$PORT" && owns_port "$pid" "$PORT"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$DIR/logs/kafka.out" "$DIR/logs/server.log" >&2 2>/dev/null || true
            rm -f "$PIDFILE"
            # Taken between our check and the bind? Then say by whom.
            "$PY" "$PORTS_PY" check "$PORT" Kafka >&2 || true
            die "broker exited during start-up (logs in $DIR/logs)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "$DIR/logs/server.log" >&2 2>/dev/null || true
            die "broker not ready after ${KAFKA_START_TIMEOUT:-180}s (pid $pid, logs in $DIR/logs)"
        fi
        sleep 0.1
    done
    log "ready (pid $pid, data in $DIR)"
    echo "127.0.0.1:$PORT"
}

cmd_stop() {
    parse_args "$@"
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        log "not running"
        return 0
    fi
    kill -TERM "$pid"
    # Controlled shutdown of a lone combined node takes a few seconds; past 30 s something hangs.
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still alive after 30s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$PIDFILE"
    log "stopped"
}

cmd_status() {
    parse_args "$@"
    local pid
    if pid="$(running_pid)"; then
        # shellcheck disable=SC1091
        source "$DIR/kafka.env"
        log "running (pid $pid)"
        echo "127.0.0.1:$KAFKA_PORT"
    else
        log "not running"
        return 1
    fi
}

case "${1:-}" in
    fetch) shift; cmd_fetch "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) echo "usage: $0 {fetch|start [--port P] [--dir D]|stop [--dir D]|status [--dir D]}" >&2; exit 2 ;;
esac
