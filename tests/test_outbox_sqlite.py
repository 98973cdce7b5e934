"""The outbox published from memory on SQLite, the embedded default (shared.runtime.outbox).

SQLite has one writer at a time: a relay's sweep opens its transaction with BEGIN IMMEDIATE and so
waits while a batch's transaction writes. Rows that batch claims and commits meanwhile are the
memory path's; the sweep, whose query was built before the claim, must not send them too (it did:
kill -9 mid-stream in tests/test_crash_e2e.py found whole batches of outcomes and decisions twice,
identical copies). And a batch is handed to the relay only when it really commits: SQLAlchemy
calls after_commit for a SAVEPOINT's release as well, which counted as the batch's commit. Real
Kafka, a real SQLite file; records counted raw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.contract.cloudevents import CloudEvent
from shared.runtime.db import create_tables, make_engine, session_factory
from shared.runtime.outbox import Pending, enqueue
from tests.test_outbox_e2e import drained, read_topic, until
from tests.test_outbox_memory import accepting, fresh_topic, relay_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'service.db'}")
    await create_tables(engine, [])
    yield engine
    await engine.dispose()


async def test_a_sweep_waiting_for_the_write_lock_leaves_rows_claimed_meanwhile_to_memory(
    engine: AsyncEngine, kafka_bootstrap: str
) -> None:
    topic = await fresh_topic(kafka_bootstrap)
    relay = relay_for(engine, kafka_bootstrap)  # sweeps every 50 ms while it accepts
    values = [f"v{i}" for i in range(20)]
    await relay.start()
    try:
        await accepting(relay)
        async with session_factory(engine)() as session, session.begin():
            # BEGIN IMMEDIATE: this batch holds the write lock from here to its commit.
            await session.execute(text("SELECT 1"))
            # Long enough for the relay's next sweep to build its query (nothing claimed yet) and
            # wait on the lock; it reads the table once this transaction has committed.
            await asyncio.sleep(0.5)
            pending = Pending.attach(session)
            for v in values:
                enqueue(session, topic, CloudEvent(id=v, source="urn:test", type="t", data={"v": v}, subject="k"))
            await pending.write(session)  # claimed by the relay: handed to it at the commit

        async def settled() -> bool:
            return not relay._ready and not relay._claimed

        await drained(engine)
        await until(settled)
        await asyncio.sleep(0.3)  # a sweep after the memory round would find nothing: the rows are gone
    finally:
        await relay.stop()
    assert await read_topic(kafka_bootstrap, topic) == [f'{{"v":"{v}"}}'.encode() for v in values]
    assert relay.published_from_memory == len(values)


async def test_a_savepoint_released_after_the_claim_does_not_hand_over_a_batch_that_rolls_back(
    engine: AsyncEngine, kafka_bootstrap: str
) -> None:
    topic = await fresh_topic(kafka_bootstrap)
    relay = relay_for(engine, kafka_bootstrap)
    await relay.start()
    try:
        await accepting(relay)
        async with session_factory(engine)() as session, session.begin():
            pending = Pending.attach(session)
            enqueue(session, topic, CloudEvent(id="never", source="urn:test", type="t", data={"v": "never"}))
            await pending.write(session)  # claimed
            # A savepoint after the claim (a hook's), released: SQLAlchemy calls after_commit for it too.
            async with session.begin_nested():
                await session.execute(text("SELECT 1"))
            await session.rollback()  # the batch itself never commits
        async with session_factory(engine)() as session, session.begin():
            pending = Pending.attach(session)
            enqueue(session, topic, CloudEvent(id="after", source="urn:test", type="t", data={"v": "after"}))
            await pending.write(session)

        async def settled() -> bool:
            return not relay._ready and not relay._claimed and relay.published_from_memory >= 1

        await drained(engine)
        await until(settled)
    finally:
        await relay.stop()
    assert await read_topic(kafka_bootstrap, topic) == [b'{"v":"after"}']
