"""The outbox published from memory (shared.runtime.outbox): a leading relay publishes the rows a
transaction wrote right after it commits, without reading them back; the table stays the crash
backup. Real Kafka and PostgreSQL; records counted raw, never by distinct value."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.contract.cloudevents import CloudEvent
from shared.runtime.db import create_tables, make_engine, session_factory
from shared.runtime.outbox import OutboxRelay, Pending, enqueue
from shared.runtime.topics import ensure_topics
from tests.test_outbox_e2e import drained, make_topic, outbox_size, read_topic, until

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    name = f"outbox_mem_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(postgres_url.rsplit("/", 1)[0] + "/" + name)
    await create_tables(engine, [])
    yield engine
    await engine.dispose()


async def fresh_topic(bootstrap: str) -> str:
    await ensure_topics(bootstrap)  # the relay's progress topic among them
    return await make_topic(bootstrap, 1024 * 1024)


def relay_for(engine: AsyncEngine, bootstrap: str) -> OutboxRelay:
    prefix = f"mem-{uuid.uuid4().hex[:8]}"
    return OutboxRelay("pledges", engine, session_factory(engine), bootstrap, poll_seconds=0.05, group_prefix=prefix)


async def write(engine: AsyncEngine, topic: str, values: list[str], commit: bool = True) -> None:
    """Rows as a batch's transaction writes them (the consumer's Pending, then commit)."""
    async with session_factory(engine)() as session:
        async with session.begin():
            pending = Pending.attach(session)
            for v in values:
                enqueue(session, topic, CloudEvent(id=v, source="urn:test", type="t", data={"v": v}, subject="k"))
            await pending.write(session)
            if not commit:
                await session.rollback()


async def accepting(relay: OutboxRelay) -> None:
    async def ready() -> bool:
        return relay.accepting

    await until(ready)


async def test_rows_are_published_from_memory_once_in_order(engine: AsyncEngine, kafka_bootstrap: str) -> None:
    topic = await fresh_topic(kafka_bootstrap)
    relay = relay_for(engine, kafka_bootstrap)
    await relay.start()
    try:
        await accepting(relay)
        values = [f"v{i}" for i in range(30)]
        for start in range(0, 30, 10):
            await write(engine, topic, values[start : start + 10])
        await write(engine, topic, ["never"], commit=False)  # rolled back: never sent, no claim left
        await drained(engine)
        await until(lambda: _count(kafka_bootstrap, topic, 30))
        assert relay.published_from_memory == 30
        assert not relay._claimed  # the claims of a rollback are gone too
    finally:
        await relay.stop()
    assert await read_topic(kafka_bootstrap, topic) == [f'{{"v":"{v}"}}'.encode() for v in values]


async def test_rows_handed_over_but_unpublished_at_a_crash_are_swept_once(
    engine: AsyncEngine, kafka_bootstrap: str
) -> None:
    topic = await fresh_topic(kafka_bootstrap)
    first = relay_for(engine, kafka_bootstrap)
    stuck = asyncio.Event()

    async def hang(*_: object) -> None:  # the process dies before publishing what it was handed
        stuck.set()
        await asyncio.Event().wait()

    first._memory_round = hang  # type: ignore[method-assign]
    await first.start()
    await accepting(first)
    await write(engine, topic, ["a", "b", "c"])
    await asyncio.wait_for(stuck.wait(), 10)
    await first.stop()  # its lock goes with its connection, as with a kill
    assert await outbox_size(engine) == 3

    second = relay_for(engine, kafka_bootstrap)
    await second.start()
    try:
        await drained(engine)  # the sweep, from the table
        await until(lambda: _count(kafka_bootstrap, topic, 3))
        assert second.published_from_memory == 0
    finally:
        await second.stop()
    assert await read_topic(kafka_bootstrap, topic) == [b'{"v":"a"}', b'{"v":"b"}', b'{"v":"c"}']


async def test_a_failed_round_drops_its_claims_and_the_sweep_sends_those_rows(
    engine: AsyncEngine, kafka_bootstrap: str
) -> None:
    topic = await fresh_topic(kafka_bootstrap)
    relay = relay_for(engine, kafka_bootstrap)
    real = relay._memory_round
    failures = []

    async def fail_once(*args: object) -> None:
        if not failures:
            failures.append(1)
            raise ConnectionError("broker away")  # an outage mid-round: the relay leads again
        await real(*args)  # type: ignore[arg-type]

    relay._memory_round = fail_once  # type: ignore[method-assign]
    await relay.start()
    try:
        await accepting(relay)
        await write(engine, topic, ["x", "y"])
        await drained(engine)
        await until(lambda: _count(kafka_bootstrap, topic, 2))
    finally:
        await relay.stop()
    assert failures
    assert await read_topic(kafka_bootstrap, topic) == [b'{"v":"x"}', b'{"v":"y"}']


async def _count(bootstrap: str, topic: str, n: int) -> bool:
    return len(await read_topic(bootstrap, topic)) >= n
