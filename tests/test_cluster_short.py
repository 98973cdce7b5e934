"""Three brokers, the short version (the full run with two replicas of every service is
`make chaos-cluster`, tests/cluster.py): `kafka.sh cluster` starts three secured KRaft nodes,
`ensure_topics` gives every topic three copies with min.insync.replicas=2, and killing the broker
that leads a partition under acks=all loses and refuses nothing: every record sent before and
after the kill is acknowledged and read back exactly once while that broker is still down."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.contract import PLEDGES_TOPIC, TOPIC_PARTITIONS
from shared.runtime.topics import INTERNAL_TOPICS, ensure_topics
from tests.infra import LocalKafkaCluster

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

TOPICS = {**TOPIC_PARTITIONS, **INTERNAL_TOPICS}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    cluster = LocalKafkaCluster(tmp_path_factory.mktemp("kafka-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def partitions(bootstrap: str, topics: list[str]) -> dict[TopicPartition, dict[str, list[int] | int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {TopicPartition(t["topic"], p["partition"]): p for t in described for p in t["partitions"]}


async def min_insync(bootstrap: str, topics: list[str]) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    finally:
        await admin.close()
    return {
        res[3]: value
        for response in responses
        for res in response.resources
        for name, value, *_ in res[4]
        if name == "min.insync.replicas"
    }


async def send(producer: AIOKafkaProducer, ids: range) -> None:
    """Every record acknowledged by acks=all (the producer retries through a leader change)."""
    futures = [await producer.send(PLEDGES_TOPIC, str(i).encode(), key=str(i).encode()) for i in ids]
    await asyncio.wait_for(asyncio.gather(*futures), 120)


async def read_all(bootstrap: str, expected: int) -> Counter[bytes]:
    consumer = AIOKafkaConsumer(
        PLEDGES_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    seen: Counter[bytes] = Counter()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while sum(seen.values()) < expected and loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                seen.update(r.value for r in records if r.value is not None)
        await asyncio.sleep(1)  # and any copy behind them
        for records in (await consumer.getmany(timeout_ms=500)).values():
            seen.update(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return seen


async def test_three_brokers_three_copies_and_a_dead_leader_loses_nothing(cluster: LocalKafkaCluster) -> None:
    assert len(cluster.bootstrap.split(",")) == 3, cluster.bootstrap
    await ensure_topics(cluster.bootstrap)
    layout = await partitions(cluster.bootstrap, list(TOPICS))
    assert len(layout) == sum(TOPICS.values())
    for tp, p in layout.items():
        assert sorted(p["replicas"]) == [1, 2, 3], (tp, p)  # type: ignore[arg-type]
    assert set((await min_insync(cluster.bootstrap, list(TOPICS))).values()) == {"2"}

    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        await send(producer, range(0, 300))
        leader = int(layout[TopicPartition(PLEDGES_TOPIC, 0)]["leader"])  # type: ignore[arg-type]
        victim = cluster.node(leader)
        await asyncio.to_thread(victim.kill)
        await send(producer, range(300, 600))
    finally:
        await producer.stop()
    # Read back while the leader is still down: the two others hold every acknowledged record.
    seen = await read_all(cluster.bootstrap, 600)
    assert set(seen) == {str(i).encode() for i in range(600)}, f"lost {600 - len(seen)}"
    assert max(seen.values()) == 1, f"duplicated {sum(seen.values()) - len(seen)}"

    await asyncio.to_thread(victim.start)
    # Back in every partition's in-sync set once it has caught up.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        isr = {tp: sorted(p["isr"]) for tp, p in (await partitions(cluster.bootstrap, [PLEDGES_TOPIC])).items()}  # type: ignore[arg-type]
        if all(v == [1, 2, 3] for v in isr.values()) or loop.time() > deadline:
            break
        await asyncio.sleep(1)
    assert all(v == [1, 2, 3] for v in isr.values()), isr
