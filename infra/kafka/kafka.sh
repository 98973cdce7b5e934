#!/usr/bin/env bash
# Local Apache Kafka 4.x (KRaft, combined broker+controller nodes) without Docker: one node, or a
# cluster of three.
#
#   kafka.sh fetch                       jars -> ${GPUTRACE_CACHE:-~/.cache/gputrace}/kafka-<v>/libs
#   kafka.sh start [--port P] [--dir D] [--credentials C]
#                                        prints the bootstrap address 127.0.0.1:P on stdout
#   kafka.sh stop  [--dir D]             SIGTERM, wait, SIGKILL if needed
#   kafka.sh status [--dir D]            exit 0 and print the address if running, else exit 1
#   kafka.sh cluster start|stop|status [--dir D] [--credentials C] [--nodes N]
#                                        N (default 3) combined nodes in D/node1..N, on free local
#                                        ports; prints the bootstrap list 127.0.0.1:P1,...,127.0.0.1:PN
#
# Cluster: every node is a voter of one static controller quorum (controller.quorum.voters) and a
# broker; internal topics (offsets, transactions) get replication factor min(N, 3) and
# min.insync.replicas 2 from 3 nodes up, as do topics created without explicit settings. Each node
# dir is an ordinary single-node dir that remembers its node id and the quorum (kafka.env), so
# `kafka.sh start --dir D/node2` restarts one node after it was killed. Secured clusters share the
# broker's own password across nodes (inter-broker and controller connections authenticate as it).
#
# A dir remembers its ports (kafka.env): `start` on an existing dir restarts the same broker, same
# data, same ports (the controller's endpoint is written into the KRaft bootstrap checkpoint, so it
# must not move); `--port` may move the client port. Everything but the address goes to stderr, so
# `$(kafka.sh start)` is usable.
#
# `start` refuses a port another process listens on (naming it), and says `ready` only once the
# answer on the port comes from the java process it started: never from someone else's broker.
#
# Secured (--credentials C, or KAFKA_CREDENTIALS_DIR): clients authenticate with SASL/SCRAM-SHA-512
# on a SASL_PLAINTEXT listener (production adds TLS: SASL_SSL) and are authorized by ACL (KRaft's
# StandardAuthorizer, deny when no ACL matches). C holds one <principal>.password per principal
# (`gputrace keys init`); each becomes a SCRAM user when the storage is formatted, `admin` (required)
# is a super user. The broker's own principal `broker` (super user) has its password in D, never in C.
# Its controller listener stays on 127.0.0.1, authenticated with SASL/PLAIN as `broker` (KRaft
# cannot read SCRAM users before its metadata log is up). ACLs are not made here: `gputrace kafka acls`.
# A dir keeps the mode it was first started in.
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
    DIR="${DIR_DEFAULT:-$DEFAULT_DIR}"
    CREDENTIALS="${KAFKA_CREDENTIALS_DIR:-}"
    NO_WAIT=0
    NODES=3
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) PORT="$2"; shift 2 ;;
            --dir) DIR="$2"; shift 2 ;;
            --credentials) CREDENTIALS="$2"; shift 2 ;;
            # Internal (cluster start): launch and return; a quorum's nodes answer only once most are up.
            --no-wait) NO_WAIT=1; shift ;;
            --nodes) NODES="$2"; shift 2 ;;
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

# Secured mode: a password for the broker's own principal (kept in the data dir, 0600) and the
# SCRAM users to create at format time, from the credentials dir.
secure_setup() {
    [[ -f "$CREDENTIALS/admin.password" ]] || die "no $CREDENTIALS/admin.password (run: gputrace keys init)"
    # A cluster's nodes get the same one from `cluster start`, before their first start.
    if [[ ! -s "$DIR/broker.password" ]]; then
        (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$DIR/broker.password")
    fi
    BROKER_PASSWORD="$(cat "$DIR/broker.password")"
    SCRAM_ARGS=(--add-scram "SCRAM-SHA-512=[name=broker,password=$BROKER_PASSWORD]")
    local file name
    for file in "$CREDENTIALS"/*.password; do
        name="$(basename "$file" .password)"
        [[ "$name" == broker ]] && die "$file: 'broker' is the broker's own principal"
        # Passwords are url-safe base64 (no ',' ']' '"' that would end the argument or the JAAS string).
        [[ "$(cat "$file")" =~ ^[A-Za-z0-9_-]+$ ]] || die "$file: password must be url-safe base64"
        SCRAM_ARGS+=(--add-scram "SCRAM-SHA-512=[name=$name,password=$(cat "$file")]")
    done
}

write_config() {
    # Written on every start from kafka.env, so config changes here reach existing dirs too.
    # 0600: in secured mode it holds the broker's password.
    (umask 077 && : >"$DIR/server.properties")
    if [[ "$SECURE" == 1 ]]; then
        cat >"$DIR/server.properties" <<EOF
listeners=SASL_PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=SASL_PLAINTEXT://127.0.0.1:$PORT
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
inter.broker.listener.name=SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$BROKER_PASSWORD";
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="$BROKER_PASSWORD" user_broker="$BROKER_PASSWORD";
# Nothing is allowed unless an ACL says so; the broker itself and the ops admin are super users.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:broker;User:admin
EOF
    else
        cat >"$DIR/server.properties" <<EOF
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
EOF
    fi
    # A cluster's quorum is static (every node a voter, known from the start); a lone node's is its own.
    local quorum="controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT"
    [[ -z "$QUORUM_VOTERS" ]] || quorum="controller.quorum.voters=$QUORUM_VOTERS"
    # Three copies of everything from three nodes up, of which two must have a write (acks=all) before
    # it counts: one node may die without losing or refusing anything.
    local min_isr=1
    ((REPLICAS < 3)) || min_isr=2
    cat >>"$DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=$NODE_ID
controller.listener.names=CONTROLLER
$quorum
log.dirs=$DIR/data
# Topics are created on purpose by the services; a typo must fail, not invent a topic.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$REPLICAS
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$REPLICAS
transaction.state.log.replication.factor=$REPLICAS
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.replication.factor=$REPLICAS
share.coordinator.state.topic.min.isr=$min_isr
# Never elect a replica that missed acknowledged writes (the default, said out loud).
unclean.leader.election.enable=false
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
        # A cluster node launched with --no-wait answers once its quorum is up: wait for that.
        ((NO_WAIT)) || wait_ready "$pid" "$KAFKA_PORT"
        echo "127.0.0.1:$KAFKA_PORT"
        return 0
    fi
    cmd_fetch
    # A lone node: node 1, its own quorum, one copy. A cluster node's kafka.env says otherwise.
    NODE_ID=1 QUORUM_VOTERS="" KAFKA_CLUSTER_ID="" REPLICAS=1
    if [[ -f "$DIR/kafka.env" ]]; then
        # shellcheck disable=SC1091
        source "$DIR/kafka.env"
        # The client listener may move (the broker re-registers it on start); the controller's may not.
        [[ -z "$PORT" || "$PORT" == "$KAFKA_PORT" ]] || log "moving the broker's client port from $KAFKA_PORT to $PORT"
        PORT="${PORT:-$KAFKA_PORT}"
        # Its users were made at format time: a dir does not change mode.
        SECURE="${KAFKA_SECURE:-0}"
        if [[ "$SECURE" == 1 && -z "$CREDENTIALS" ]]; then
            die "$DIR was started secured: give --credentials (or KAFKA_CREDENTIALS_DIR)"
        fi
        if [[ "$SECURE" == 0 && -n "$CREDENTIALS" ]]; then
            die "$DIR was started without credentials (PLAINTEXT); use a new --dir for a secured broker"
        fi
    else
        [[ -n "$PORT" ]] || PORT="$(free_port)"
        CONTROLLER_PORT="$(free_port)"
        while [[ "$CONTROLLER_PORT" == "$PORT" ]]; do CONTROLLER_PORT="$(free_port)"; done
        SECURE=0
        [[ -z "$CREDENTIALS" ]] || SECURE=1
    fi
    require_free "$PORT" "Kafka"
    require_free "$CONTROLLER_PORT" "Kafka's controller"
    write_env
    mkdir -p "$DIR/logs"
    SCRAM_ARGS=()
    if [[ "$SECURE" == 1 ]]; then
        secure_setup
    else
        log "no --credentials: PLAINTEXT, no authentication, no ACLs (development only)"
    fi
    write_config
    java_cmd
    if [[ ! -f "$DIR/data/meta.properties" ]]; then
        local cluster_id="${KAFKA_CLUSTER_ID:-$(new_cluster_id)}"
        # A static quorum (a cluster's) is formatted as is; a lone node is its own standalone quorum.
        local quorum_args=(--standalone)
        [[ -z "$QUORUM_VOTERS" ]] || quorum_args=()
        log "formatting KRaft storage in $DIR/data (cluster $cluster_id, node $NODE_ID)"
        java "${JAVA_ARGS[@]}" kafka.tools.StorageTool format "${quorum_args[@]}" "${SCRAM_ARGS[@]}" \
            -t "$cluster_id" -c "$DIR/server.properties" >"$DIR/logs/format.out" 2>&1 \
            || { cat "$DIR/logs/format.out" >&2; die "StorageTool format failed"; }
    fi
    # setsid + nohup: the broker outlives this script and the caller's terminal/process group;
    # `stop` (or the test fixture) ends it explicitly.
    setsid nohup java "${JAVA_ARGS[@]}" kafka.Kafka "$DIR/server.properties" \
        >"$DIR/logs/kafka.out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    if ((NO_WAIT)); then
        log "launched node $NODE_ID (pid $pid, data in $DIR)"
        return 0
    fi
    wait_ready "$pid" "$PORT"
    echo "127.0.0.1:$PORT"
}

# Kafka's Uuid text form: 16 random bytes, url-safe base64, unpadded. Kafka itself never hands out
# one starting with '-' (it would read as a CLI flag), so neither do we.
new_cluster_id() {
    local cluster_id="-"
    while [[ "$cluster_id" == -* ]]; do
        cluster_id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
    done
    echo "$cluster_id"
}

write_env() {
    printf 'KAFKA_PORT=%s\nCONTROLLER_PORT=%s\nKAFKA_SECURE=%s\nNODE_ID=%s\nQUORUM_VOTERS=%s\nKAFKA_CLUSTER_ID=%s\nREPLICAS=%s\n' \
        "$PORT" "$CONTROLLER_PORT" "$SECURE" "$NODE_ID" "$QUORUM_VOTERS" "$KAFKA_CLUSTER_ID" "$REPLICAS" >"$DIR/kafka.env"
}

# Returns once the broker answers on its port, and the answer comes from pid $1 (ours, not just anyone's).
wait_ready() {
    local pid="$1" port="$2"
    local deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-180}))
    until probe "$port" && owns_port "$pid" "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$DIR/logs/kafka.out" "$DIR/logs/server.log" >&2 2>/dev/null || true
            rm -f "$PIDFILE"
            # Taken between our check and the bind? Then say by whom.
            "$PY" "$PORTS_PY" check "$port" Kafka >&2 || true
            die "broker exited during start-up (logs in $DIR/logs)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "$DIR/logs/server.log" >&2 2>/dev/null || true
            die "broker not ready after ${KAFKA_START_TIMEOUT:-180}s (pid $pid, logs in $DIR/logs)"
        fi
        sleep 0.1
    done
    log "ready (pid $pid, data in $DIR)"
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

# --- a cluster: N single-node dirs that know each other ---------------------------------------

cluster_nodes() { seq 1 "$NODES"; }

cmd_cluster_start() {
    DIR_DEFAULT="$DEFAULT_DIR-cluster" parse_args "$@"
    local node_args=() i
    [[ -z "$CREDENTIALS" ]] || node_args=(--credentials "$CREDENTIALS")
    if [[ -f "$DIR/cluster.env" ]]; then
        # shellcheck disable=SC1091
        source "$DIR/cluster.env"  # NODES: a cluster keeps its size
    else
        ((NODES >= 1)) || die "--nodes must be at least 1"
        cmd_fetch
        # Every port now, all distinct: each node's kafka.env names the whole quorum before any starts.
        local ports=() port voters="" cluster_id
        while ((${#ports[@]} < 2 * NODES)); do
            port="$(free_port)"
            [[ " ${ports[*]} " == *" $port "* ]] || ports+=("$port")
        done
        for i in $(cluster_nodes); do
            voters+="${voters:+,}$i@127.0.0.1:${ports[2 * i - 1]}"
        done
        cluster_id="$(new_cluster_id)"
        local secure=0 replicas=$((NODES < 3 ? NODES : 3)) password=""
        if [[ -n "$CREDENTIALS" ]]; then
            secure=1
            password="$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')"
        fi
        for i in $(cluster_nodes); do
            mkdir -p "$DIR/node$i"
            (
                umask 077
                DIR="$DIR/node$i" PORT="${ports[2 * i - 2]}" CONTROLLER_PORT="${ports[2 * i - 1]}" SECURE=$secure
                NODE_ID=$i QUORUM_VOTERS="$voters" KAFKA_CLUSTER_ID="$cluster_id" REPLICAS=$replicas
                write_env
                [[ -z "$password" ]] || echo -n "$password" >"$DIR/broker.password"
            )
        done
        printf 'NODES=%s\n' "$NODES" >"$DIR/cluster.env"
        log "cluster $cluster_id: $NODES nodes in $DIR, quorum $voters"
    fi
    # Launch all (formatting in parallel: each format is a JVM start), then wait for each: a node
    # answers only once a majority of the quorum is up.
    local launches=()
    for i in $(cluster_nodes); do
        bash "$0" start --dir "$DIR/node$i" "${node_args[@]}" --no-wait >/dev/null &
        launches+=($!)
    done
    for i in "${launches[@]}"; do
        wait "$i" || die "a node failed to launch (above)"
    done
    local bootstrap=""
    for i in $(cluster_nodes); do
        bootstrap+="${bootstrap:+,}$(bash "$0" start --dir "$DIR/node$i" "${node_args[@]}")"
    done
    log "cluster ready: $bootstrap"
    echo "$bootstrap"
}

cmd_cluster_stop() {
    DIR_DEFAULT="$DEFAULT_DIR-cluster" parse_args "$@"
    [[ -f "$DIR/cluster.env" ]] || { log "no cluster in $DIR"; return 0; }
    # shellcheck disable=SC1091
    source "$DIR/cluster.env"
    # All at once: stopped one by one, the last nodes would wait on a quorum that is gone.
    local i
    for i in $(cluster_nodes); do
        bash "$0" stop --dir "$DIR/node$i" &
    done
    wait
}

cmd_cluster_status() {
    DIR_DEFAULT="$DEFAULT_DIR-cluster" parse_args "$@"
    [[ -f "$DIR/cluster.env" ]] || { log "no cluster in $DIR"; return 1; }
    # shellcheck disable=SC1091
    source "$DIR/cluster.env"
    local i bootstrap="" down=0 address
    for i in $(cluster_nodes); do
        if address="$(bash "$0" status --dir "$DIR/node$i" 2>/dev/null)"; then
            bootstrap+="${bootstrap:+,}$address"
        else
            log "node $i not running"
            down=1
        fi
    done
    echo "$bootstrap"
    return "$down"
}

cmd_cluster() {
    case "${1:-}" in
        start) shift; cmd_cluster_start "$@" ;;
        stop) shift; cmd_cluster_stop "$@" ;;
        status) shift; cmd_cluster_status "$@" ;;
        *) echo "usage: $0 cluster {start|stop|status} [--dir D] [--credentials C] [--nodes N]" >&2; exit 2 ;;
    esac
}

case "${1:-}" in
    fetch) shift; cmd_fetch "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    cluster) shift; cmd_cluster "$@" ;;
    *) echo "usage: $0 {fetch|start [--port P] [--dir D] [--credentials C]|stop [--dir D]|status [--dir D]|cluster {start|stop|status} [--dir D] [--credentials C] [--nodes N]}" >&2; exit 2 ;;
esac
