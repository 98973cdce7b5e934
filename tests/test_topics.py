"""The project creates its topics itself (auto-creation is off), with the partitions and
retention it declares: partner events and decisions are kept for good, so any service or a new
ledger can rebuild from them."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.contract import DECISION_TOPICS, OUTCOMES_TOPIC, PLEDGES_TOPIC, TOPIC_PARTITIONS
from shared.runtime.topics import ensure_topics

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_topics_have_their_declared_partitions_and_retention(kafka_bootstrap: str) -> None:
    await ensure_topics(kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(TOPIC_PARTITIONS))
        partitions = {t["topic"]: len(t["partitions"]) for t in described}
        assert partitions == TOPIC_PARTITIONS
        wanted = [PLEDGES_TOPIC, OUTCOMES_TOPIC, *sorted(DECISION_TOPICS)]
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in wanted])
        retention = {
            res[3]: value
            for response in responses
            for res in response.resources
            for name, value, *_ in res[4]
            if name == "retention.ms"
        }
    finally:
        await admin.close()
    assert retention[PLEDGES_TOPIC] == "-1"
    assert all(retention[t] == "-1" for t in DECISION_TOPICS)
    assert retention[OUTCOMES_TOPIC] == str(30 * 24 * 3600 * 1000)
