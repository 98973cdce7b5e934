"""Two replicas never both apply conflicting events to one aggregate (real PostgreSQL).

Two BatchProcessors of the pledges service, as two replicas would run them, decide at the same
moment one disbursement each on the same pledge; together they exceed it. Each transaction is
held just after it has read the pledge until the other has read it too (or 2 s have passed).
The rows a batch reads are locked FOR UPDATE (shared.runtime.aggregates.lock_rows_read), so the
second replica's read waits for the first to commit and sees the pledge as it left it: exactly one
disbursement is accepted, the other is refused on the new total. Without the lock both read the
same old pledge, both are accepted and one disbursement is lost.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import ConsumerRecord
from sqlalchemy import select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.pledges.main import HANDLERS, PledgeRow, prefetch
from shared.contract import OUTCOMES_TOPIC, PLEDGES_TOPIC, event_type
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Verdict
from shared.contract.parties import PartyRegistry
from shared.runtime import aggregates
from shared.runtime.consumer import BatchProcessor, Inbound
from shared.runtime.db import OutboxMessage, create_tables, make_engine, session_factory
from tests.partner import PartnerClient
from tools.devkeys import generate_dev_registry

HOLD_SECONDS = 2.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_dev_registry(directory)
    return directory


@pytest.fixture
async def sessions(postgres_url: str) -> AsyncIterator[Any]:
    name = f"replicas_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(postgres_url.rsplit("/", 1)[0] + "/" + name)
    await create_tables(engine, [PledgeRow.__table__])  # type: ignore[list-item]
    yield session_factory(engine)
    await engine.dispose()


def record(keys: Path, offset: int, short_type: str, data: dict[str, Any]) -> ConsumerRecord:
    key, value, headers, _ = PartnerClient("unused", keys).record("kdb", short_type, data)
    return ConsumerRecord(PLEDGES_TOPIC, 0, offset, 0, 0, key, value, None, len(key), len(value), headers)


class Rendezvous:
    """Each replica, once it has read the pledge, waits for the other to have read it too."""

    def __init__(self) -> None:
        self.read = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def after_read(self, me: str) -> None:
        self.read[me].set()
        other = self.read["b" if me == "a" else "a"]
        try:
            await asyncio.wait_for(other.wait(), HOLD_SECONDS)
        except TimeoutError:
            pass  # the other is blocked on this one's lock: go on and commit


def replica(keys: Path, sessions: Any, me: str, meet: Rendezvous, where: str) -> BatchProcessor:
    """The pledges service's processor; `where` the pledge is read: its prefetch, or the handler's get."""

    async def held_prefetch(session: AsyncSession, events: Sequence[CloudEvent]) -> None:
        await prefetch(session, events)
        await meet.after_read(me)

    def held(handler: Any) -> Any:
        async def handle(session: AsyncSession, inbound: Inbound) -> Verdict:
            await aggregates.get(session, PledgeRow, inbound.aggregate_id)  # session.get: no prefetch
            await meet.after_read(me)
            return await handler(session, inbound)

        return handle

    return BatchProcessor(
        "pledges",
        sessions,
        registry=PartyRegistry.load(keys / "registry.json"),
        partner_handlers=HANDLERS if where == "prefetch" else {t: held(h) for t, h in HANDLERS.items()},
        prefetch=held_prefetch if where == "prefetch" else None,
    )


@pytest.mark.parametrize("where", ["prefetch", "get"])
async def test_two_replicas_disbursing_on_one_pledge_at_once_apply_exactly_one(
    keys: Path, sessions: Any, where: str
) -> None:
    pledge_id = f"P-{uuid.uuid4().hex[:8]}"
    committed = {
        "pledge_id": pledge_id,
        "partner_id": "kdb",
        "program_id": "replicas",
        "kind": "capital",
        "capital": {"amount": "100", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }
    meet = Rendezvous()
    a, b = replica(keys, sessions, "a", meet, where), replica(keys, sessions, "b", meet, where)
    await BatchProcessor("pledges", sessions, PartyRegistry.load(keys / "registry.json"), HANDLERS).process(
        [record(keys, 0, "pledge.committed.v1", committed)]
    )

    def disbursed(offset: int, reference: str) -> ConsumerRecord:
        amount = {"amount": "60", "currency": "KRW"}
        data = {"pledge_id": pledge_id, "partner_id": "kdb", "amount": amount, "reference": reference}
        return record(keys, offset, "pledge.disbursed.v1", data)

    await asyncio.gather(a.process([disbursed(1, "wire-a")]), b.process([disbursed(2, "wire-b")]))

    async with sessions() as session:
        rows = (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars().all()
        state = json.loads((await session.get(PledgeRow, pledge_id)).state)  # type: ignore[union-attr]
    docs = [json.loads(r.value) for r in rows if r.topic == OUTCOMES_TOPIC]
    disbursements = [d for d in docs if d["event_type"] == event_type("pledge.disbursed.v1")]
    verdicts = sorted((d["status"], d["reason_code"]) for d in disbursements)
    assert verdicts == [("accepted", None), ("rejected", "DISBURSEMENT_EXCEEDS_PLEDGE")], disbursements
    # The refused one was decided on the pledge as the accepted one left it (60 already disbursed).
    refused = next(d for d in disbursements if d["status"] == "rejected")
    assert "total to 120" in refused["message"], refused["message"]
    assert state["disbursed"] == {"amount": "60", "currency": "KRW"}
