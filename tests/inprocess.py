"""One pledges service inside the test process, on the session's real Kafka, for tests that must
reach into it: inject a database outage mid-batch, read its readiness.

Its consumer group starts at the current end of `partner.pledges.v1`, so it sees only the test's
own events. Its outbox relay is not started: its decisions would otherwise reach the session's
ledger under the real service's name.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.pledges.main import HANDLERS, SERVICE, PledgeRow, prefetch
from shared.contract import PLEDGES_TOPIC
from shared.contract.decisions import Verdict
from shared.runtime.consumer import Inbound
from shared.runtime.db import ProcessedMessage
from shared.runtime.migrations import prepare_schema
from shared.runtime.service import Service
from shared.runtime.settings import Settings
from shared.runtime.topics import ensure_topics
from tests.partner import PartnerClient
from tools.devkeys import generate_dev_registry

Handler = Callable[[AsyncSession, Inbound], Awaitable[Verdict]]


def capital(pledge_id: str, program: str) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": "kdb",
        "program_id": program,
        "kind": "capital",
        "capital": {"amount": "7", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    parts = consumer.partitions_for_topic(topic) or set()
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    assert parts, f"no partitions for {topic}"
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def start_group_at_end(bootstrap: str, group: str, topic: str = PLEDGES_TOPIC) -> None:
    """Commit the topic's end offsets for `group`, so it skips whatever earlier tests published."""
    await ensure_topics(bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic)
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.commit({tp: ends[tp] for tp in tps})
    finally:
        await consumer.stop()


async def wait_group_done(bootstrap: str, group: str, timeout: float, topic: str = PLEDGES_TOPIC) -> None:
    """Until `group` has committed the end of every partition of `topic`."""
    async with asyncio.timeout(timeout):
        while await group_lag(bootstrap, group, topic):  # noqa: ASYNC110 (polling the broker, no local event)
            await asyncio.sleep(0.5)


async def group_lag(bootstrap: str, group: str, topic: str = PLEDGES_TOPIC) -> int:
    """End offsets minus `group`'s committed offsets, summed over the topic's partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic)
        ends = await consumer.end_offsets(tps)
        return sum([ends[tp] - (await consumer.committed(tp) or 0) for tp in tps])
    finally:
        await consumer.stop()


def build(bootstrap: str, workdir: Path, wrap: Callable[[Handler], Handler] = lambda h: h, **settings: Any) -> Service:
    keys = workdir / "keys"
    generate_dev_registry(keys)
    config = Settings(
        kafka_bootstrap_servers=bootstrap,
        var_dir=workdir / "var",  # an embedded SQLite database of its own
        party_registry=keys / "registry.json",
        consumer_group_prefix=f"inproc-{uuid.uuid4().hex[:8]}",
        **settings,
    )
    return Service(
        SERVICE,
        tables=[PledgeRow.__table__],  # type: ignore[list-item]
        topics=[PLEDGES_TOPIC],
        partner_handlers={t: wrap(h) for t, h in HANDLERS.items()},
        prefetch=prefetch,
        settings=config,
    )


def group_of(service: Service) -> str:
    return f"{service.settings.consumer_group_prefix}-{service.name}"


@asynccontextmanager
async def consuming(service: Service) -> AsyncIterator[Service]:
    """The service's schema and subscriber (call `start_group_at_end` first); stopped on exit."""
    # As the service's own start-up makes it: from its migrations (an empty SQLite file: created).
    await prepare_schema(service.engine, service.name)
    await service.broker.start()
    try:
        yield service
    finally:
        await service.broker.stop()
        await service.engine.dispose()


async def processed(service: Service) -> int:
    """Records this service decided (its idempotency rows), each counted once."""
    async with service.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(ProcessedMessage))).scalar_one())


async def publish_pledges(bootstrap: str, keys: Path, count: int) -> list[str]:
    """`count` pledges with distinct keys, so they spread over every partition of the topic."""
    program = f"inproc-{uuid.uuid4().hex[:8]}"
    async with PartnerClient(bootstrap, keys) as partner:
        ids = [f"{program}-{i}" for i in range(count)]
        return [await partner.publish("kdb", "pledge.committed.v1", capital(p, program)) for p in ids]
