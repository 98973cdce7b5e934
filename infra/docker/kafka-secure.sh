#!/usr/bin/env bash
# The compose broker, secured like infra/kafka/kafka.sh's: SASL/SCRAM-SHA-512 on every client
# listener (SASL_PLAINTEXT inside the compose network and on 127.0.0.1; production adds TLS),
# KRaft's StandardAuthorizer denying whatever no ACL allows, `broker` and `admin` super users.
# SCRAM users are created from /keys/kafka/<principal>.password (the `keys` job) when the storage
# is formatted; ACLs and topics come from the `topics` job (`gputrace topics`, `gputrace kafka acls`).
#
# The `cluster` profile runs it three times (kafka, kafka-2, kafka-3: KAFKA_NODE_ID 1..3 and
# KAFKA_NODES=3, which the `kafka` service reads from the environment): one static quorum of three
# voters, internal topics with three copies and min.insync.replicas=2, as infra/kafka/kafka.sh cluster.
# All nodes share CLUSTER_ID and the broker's password (inter-broker and controller connections).
set -euo pipefail

DATA=/var/lib/kafka/data
CONF=/var/lib/kafka/server.properties
CREDENTIALS=/keys/kafka
HOST_PORT="${KAFKA_HOST_PORT:-9092}"
NODE_ID="${KAFKA_NODE_ID:-1}"
NODES="${KAFKA_NODES:-1}"
# Node 1 is the compose service `kafka` (what every client bootstraps from), node N is `kafka-N`.
name_of() { if [[ "$1" == 1 ]]; then echo kafka; else echo "kafka-$1"; fi; }
SELF="$(name_of "$NODE_ID")"
QUORUM="controller.quorum.bootstrap.servers=kafka:9093"
if ((NODES > 1)); then
    voters=""
    for ((i = 1; i <= NODES; i++)); do voters+="${voters:+,}$i@$(name_of "$i"):9093"; done
    QUORUM="controller.quorum.voters=$voters"
fi
REPLICAS=$((NODES < 3 ? NODES : 3))
MIN_ISR=1
((REPLICAS < 3)) || MIN_ISR=2

[[ -f "$CREDENTIALS/admin.password" ]] || { echo "no $CREDENTIALS/admin.password (the keys job writes it)" >&2; exit 1; }
mkdir -p "$DATA"
umask 077
# The broker's own password lives with its data, never in the shared keys volume. A cluster's nodes
# share one through a volume of their own (kafka-shared): the first node to get here writes it (a
# hard link is created atomically or not at all), the others copy it.
if ((NODES > 1)); then
    shared=/var/lib/kafka-shared/broker.password
    if [[ ! -s "$shared" ]]; then
        head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$shared.$NODE_ID"
        ln "$shared.$NODE_ID" "$shared" 2>/dev/null || true
        rm -f "$shared.$NODE_ID"
    fi
    cp "$shared" "$DATA/../broker.password"
fi
[[ -s "$DATA/../broker.password" ]] || head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$DATA/../broker.password"
BROKER_PASSWORD="$(cat "$DATA/../broker.password")"

cat >"$CONF" <<EOF
process.roles=broker,controller
node.id=$NODE_ID
listeners=INTERNAL://:9092,CONTROLLER://:9093,HOST://:29092
advertised.listeners=INTERNAL://$SELF:9092,HOST://127.0.0.1:$HOST_PORT
listener.security.protocol.map=INTERNAL:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT,HOST:SASL_PLAINTEXT
inter.broker.listener.name=INTERNAL
controller.listener.names=CONTROLLER
$QUORUM
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.internal.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$BROKER_PASSWORD";
listener.name.host.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="$BROKER_PASSWORD" user_broker="$BROKER_PASSWORD";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:broker;User:admin
log.dirs=$DATA
auto.create.topics.enable=false
default.replication.factor=$REPLICAS
min.insync.replicas=$MIN_ISR
offsets.topic.replication.factor=$REPLICAS
transaction.state.log.replication.factor=$REPLICAS
transaction.state.log.min.isr=$MIN_ISR
share.coordinator.state.topic.replication.factor=$REPLICAS
share.coordinator.state.topic.min.isr=$MIN_ISR
unclean.leader.election.enable=false
group.initial.rebalance.delay.ms=0
EOF

# The healthcheck's client identity (the admin), readable by this container only.
cat >/var/lib/kafka/admin.properties <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$CREDENTIALS/admin.password")";
EOF

if [[ ! -f "$DATA/meta.properties" ]]; then
    scram=(--add-scram "SCRAM-SHA-512=[name=broker,password=$BROKER_PASSWORD]")
    for file in "$CREDENTIALS"/*.password; do
        scram+=(--add-scram "SCRAM-SHA-512=[name=$(basename "$file" .password),password=$(cat "$file")]")
    done
    # A lone node is its own standalone quorum; a cluster's static quorum is formatted as is.
    standalone=(--standalone)
    ((NODES == 1)) || standalone=()
    /opt/kafka/bin/kafka-storage.sh format "${standalone[@]}" "${scram[@]}" -t "${CLUSTER_ID:?}" -c "$CONF"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$CONF"
