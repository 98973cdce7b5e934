"""Creates the project's topics with the partition counts it declares (auto-creation is off), and
brings the declared configs (retention, max.message.bytes) to topics that already exist.

Replication: KAFKA_REPLICATION_FACTOR, or 3 copies on a cluster of three brokers or more (else one per
broker), with min.insync.replicas=2 from three copies: an acks=all write is on two brokers before it
is acknowledged, so one broker may die without losing or refusing anything."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from shared.contract import MAX_RECORD_BYTES, TOPIC_CONFIGS, TOPIC_PARTITIONS
from shared.runtime.settings import Settings

log = logging.getLogger(__name__)

# Internal, never written: the outbox relays commit their progress as offsets of this topic's one
# partition inside their Kafka transactions (shared.runtime.outbox). The broker accepts offsets only for an
# existing topic; a topic of its own keeps that bookkeeping out of every real topic's lag.
RELAY_PROGRESS_TOPIC = "gputrace.relay-progress.v1"
INTERNAL_TOPICS: dict[str, int] = {RELAY_PROGRESS_TOPIC: 1}
_INTERNAL_CONFIGS: dict[str, dict[str, str]] = {RELAY_PROGRESS_TOPIC: {"max.message.bytes": str(MAX_RECORD_BYTES)}}

# DescribeConfigs' source of a value set on the topic itself (not a broker default).
_DYNAMIC_TOPIC_CONFIG = 1


async def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int] | None = None,
    replication: int | None = None,
    wait_seconds: float = 60,
    configs: dict[str, dict[str, str]] | None = None,
    client_options: dict[str, Any] | None = None,
) -> list[str]:
    """Create the missing topics and align the configs of existing ones; returns the names created.
    Waits for the broker to answer. `replication` None: the setting, else derived from the brokers."""
    wanted = topics or {**TOPIC_PARTITIONS, **INTERNAL_TOPICS}
    configs = configs or {**TOPIC_CONFIGS, **_INTERNAL_CONFIGS}
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        # Creating topics is the admin's right (shared.runtime.kafka_auth), not a service's.
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap_servers, client_id="gputrace-topics", **(client_options or {})
        )
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            await admin.close()
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.info("waiting for Kafka at %s", bootstrap_servers)
            await asyncio.sleep(1)
    try:
        existing = set(await admin.list_topics())
        if replication is None:
            brokers = len((await admin.describe_cluster())["brokers"])
            replication = Settings().kafka_replication_factor or min(3, brokers)
        # Only on topics created here: an existing topic with fewer copies would refuse every write.
        durable = {"min.insync.replicas": "2"} if replication >= 3 else {}
        missing = [
            NewTopic(t, n, replication, topic_configs={**configs.get(t, {}), **durable})
            for t, n in wanted.items()
            if t not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another service created it first
        await _align_configs(admin, {t: configs[t] for t in wanted if t in existing and configs.get(t)})
        return [t.name for t in missing]
    finally:
        await admin.close()


async def _align_configs(admin: AIOKafkaAdminClient, declared: dict[str, dict[str, str]]) -> None:
    """Topics created before a config was declared (e.g. max.message.bytes) get it now. AlterConfigs
    replaces a topic's whole set of overrides, so the overrides already there are sent along."""
    if not declared:
        return
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in declared])
    changes = []
    for response in responses:
        for _code, _msg, _type, topic, entries in response.resources:
            # Entries: name, value, read_only, source (v1+), sensitive, synonyms...
            overrides = {e[0]: e[1] for e in entries if e[3] == _DYNAMIC_TOPIC_CONFIG and e[1] is not None}
            merged = {**overrides, **declared[topic]}
            if merged != overrides:
                log.info("topic %s: setting %s", topic, {k: v for k, v in merged.items() if overrides.get(k) != v})
                changes.append(ConfigResource(ConfigResourceType.TOPIC, topic, configs=merged))
    if changes:
        for response in await admin.alter_configs(changes):
            for code, message, _type, topic in response.resources:
                if code:  # not fatal: the topic still works, with the broker's default
                    log.warning("could not set the configs of topic %s: error %s %s", topic, code, message)
