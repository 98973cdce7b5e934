"""Creates the project's topics with the partition counts it declares (auto-creation is off)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from shared.contract import TOPIC_CONFIGS, TOPIC_PARTITIONS

log = logging.getLogger(__name__)


async def ensure_topics(
    bootstrap_servers: str, topics: dict[str, int] | None = None, replication: int = 1, wait_seconds: float = 60
) -> list[str]:
    """Create the missing topics; returns the names created. Waits for the broker to answer."""
    wanted = topics or TOPIC_PARTITIONS
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="gputrace-topics")
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
        missing = [
            NewTopic(t, n, replication, topic_configs=TOPIC_CONFIGS.get(t, {}))
            for t, n in wanted.items()
            if t not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another service created it first
        return [t.name for t in missing]
    finally:
        await admin.close()
