"""A decision record given up (its handler failed MAX_TRIES times) and then delivered again, as
after an offset commit lost to a rebalance between replicas, is a duplicate: neither decided
again nor dead-lettered twice (which used to fail the batch for ever on the position's key)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from sqlalchemy import select
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract import DLQ_TOPIC, decisions_topic, service_source
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import DECISION_TYPE, Decision
from shared.contract.parties import PartyRegistry, load_private_key
from shared.runtime.consumer import MAX_TRIES, BatchProcessor, Emitter, RetryBatch
from shared.runtime.db import OutboxMessage, create_tables, make_engine, session_factory, utcnow
from tools.devkeys import generate_dev_registry

TOPIC = decisions_topic("pledges")


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_dev_registry(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[Any]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    await create_tables(engine, [])
    yield session_factory(engine)
    await engine.dispose()


async def test_a_given_up_decision_delivered_again_is_a_duplicate(keys: Path, sessions: Any) -> None:
    calls: list[str] = []

    async def failing(session: AsyncSession, event: CloudEvent, decision: Decision, _: Emitter) -> None:
        calls.append(decision.decision_id)
        raise ValueError("a projection bug")

    decision = Decision(
        decision_id="d-poison",
        service="pledges",
        decided_at=utcnow(),
        status="accepted",
        message="poison",
        event_type="gputrace.pledge.committed.v1",
    )
    event = CloudEvent(
        id=decision.decision_id,
        source=service_source("pledges"),
        type=DECISION_TYPE,
        data=decision.model_dump(mode="json"),
    ).signed(load_private_key(keys / "pledges.key"))
    key, value, headers = event.as_record()
    batch = [ConsumerRecord(TOPIC, 1, 0, 0, 0, key, value, None, 0, len(value), headers)]
    ledger = BatchProcessor(
        "ledger",
        sessions,
        registry=PartyRegistry.load(keys / "registry.json"),
        internal_handler=failing,
        internal_topics=[TOPIC],
    )
    for _ in range(MAX_TRIES - 1):
        with pytest.raises(RetryBatch):
            await ledger.process(batch)
    await ledger.process(batch)  # given up: dead-lettered
    tried = len(calls)
    await ledger.process(batch)  # delivered again: nothing to do, and no error
    assert len(calls) == tried
    async with sessions() as session:
        topics = (await session.execute(select(OutboxMessage.topic))).scalars().all()
    assert topics.count(DLQ_TOPIC) == 1
