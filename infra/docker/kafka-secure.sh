#!/usr/bin/env bash
# The compose broker, secured like infra/kafka/kafka.sh's: SASL/SCRAM-SHA-512 on every client
# listener (SASL_PLAINTEXT inside the compose network and on 127.0.0.1; production adds TLS),
# KRaft's StandardAuthorizer denying whatever no ACL allows, `broker` and `admin` super users.
# SCRAM users are created from /keys/kafka/<principal>.password (the `keys` job) when the storage
# is formatted; ACLs and topics come from the `topics` job (`gputrace topics`, `gputrace kafka acls`).
set -euo pipefail

DATA=/var/lib/kafka/data
CONF=/var/lib/kafka/server.properties
CREDENTIALS=/keys/kafka
HOST_PORT="${KAFKA_HOST_PORT:-9092}"

[[ -f "$CREDENTIALS/admin.password" ]] || { echo "no $CREDENTIALS/admin.password (the keys job writes it)" >&2; exit 1; }
mkdir -p "$DATA"
umask 077
# The broker's own password lives with its data, never in the shared keys volume.
[[ -s "$DATA/../broker.password" ]] || head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$DATA/../broker.password"
BROKER_PASSWORD="$(cat "$DATA/../broker.password")"

cat >"$CONF" <<EOF
process.roles=broker,controller
node.id=1
listeners=INTERNAL://:9092,CONTROLLER://:9093,HOST://:29092
advertised.listeners=INTERNAL://kafka:9092,HOST://127.0.0.1:$HOST_PORT
listener.security.protocol.map=INTERNAL:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT,HOST:SASL_PLAINTEXT
inter.broker.listener.name=INTERNAL
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=kafka:9093
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
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
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
    /opt/kafka/bin/kafka-storage.sh format --standalone "${scram[@]}" -t "${CLUSTER_ID:?}" -c "$CONF"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$CONF"
