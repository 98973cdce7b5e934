"""The fast path's per-batch prefetch and deferred writes decide exactly as one record at a time.

In process, against the session's PostgreSQL: records fed straight into a BatchProcessor.
"""

from __future__ import annotations

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

from services.pledges.main import HANDLERS, PLEDGES, PledgeRow, prefetch
from shared.contract import DLQ_TOPIC, OUTCOMES_TOPIC, PLEDGES_TOPIC, ReasonCode, event_type
from shared.contract.decisions import Accepted, Rejected, Verdict
from shared.contract.parties import PartyRegistry
from shared.runtime import aggregates
from shared.runtime.consumer import MAX_TRIES, BatchProcessor, Inbound, RetryBatch
from shared.runtime.db import OutboxMessage, create_tables, make_engine, session_factory
from tests.partner import PartnerClient
from tools.devkeys import generate_dev_registry


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_dev_registry(directory)
    return directory


@pytest.fixture
async def sessions(postgres_url: str) -> AsyncIterator[Any]:
    name = f"fast_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(postgres_url.rsplit("/", 1)[0] + "/" + name)
    await create_tables(engine, [PledgeRow.__table__])  # type: ignore[list-item]
    yield session_factory(engine)
    await engine.dispose()


def pledge(pledge_id: str, partner: str = "kdb", amount: str = "1000") -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": partner,
        "program_id": "fast-path",
        "kind": "capital",
        "capital": {"amount": amount, "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


def records(keys: Path, events: Sequence[tuple[str, str, dict[str, Any]]]) -> list[ConsumerRecord]:
    client = PartnerClient("unused", keys)
    out = []
    for offset, (party, short_type, data) in enumerate(events):
        key, value, headers, _ = client.record(party, short_type, data)
        out.append(ConsumerRecord(PLEDGES_TOPIC, 0, offset, 0, 0, key, value, None, len(key), len(value), headers))
    return out


async def outcomes(sessions: Any) -> list[tuple[str, str | None, str]]:
    async with sessions() as session:
        rows = (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars().all()
    docs = [json.loads(r.value) for r in rows if r.topic == OUTCOMES_TOPIC]
    return [(d["status"], d["reason_code"], d["message"]) for d in docs]


async def states(sessions: Any) -> dict[str, dict[str, Any]]:
    async with sessions() as session:
        rows = (await session.execute(select(PledgeRow))).scalars().all()
    return {r.pledge_id: json.loads(r.state) for r in rows}


def processor(sessions: Any, keys: Path, handlers: dict[str, Any] = HANDLERS) -> BatchProcessor:
    registry = PartyRegistry.load(keys / "registry.json")
    return BatchProcessor("pledges", sessions, registry=registry, partner_handlers=handlers, prefetch=prefetch)


def amend(pledge_id: str, amount: str) -> dict[str, Any]:
    capital = {"amount": amount, "currency": "KRW"}
    return {"pledge_id": pledge_id, "partner_id": "kdb", "capital": capital, "reason": "resized"}


def withdraw(pledge_id: str, partner: str = "kdb") -> dict[str, Any]:
    return {"pledge_id": pledge_id, "partner_id": partner, "reason": "cancelled"}


def disburse(pledge_id: str, partner: str = "kdb") -> dict[str, Any]:
    capital = {"amount": "10", "currency": "KRW"}
    return {"pledge_id": pledge_id, "partner_id": partner, "amount": capital, "reference": "wire-1"}


ALL_ACCEPTED = [
    ("kdb", "pledge.committed.v1", pledge("{p1}")),
    ("kdb", "pledge.amended.v1", amend("{p1}", "5000")),
    ("kdb", "pledge.disbursed.v1", disburse("{p1}")),
    ("kdb", "pledge.committed.v1", pledge("{p2}")),
    ("kdb", "pledge.withdrawn.v1", withdraw("{p2}")),
]
SOME_REJECTED = [
    *ALL_ACCEPTED,
    ("kdb", "pledge.committed.v1", pledge("{p1}")),
    ("kt-cloud", "pledge.withdrawn.v1", withdraw("{p1}", "kt-cloud")),
    ("kdb", "pledge.disbursed.v1", disburse("{p2}")),
]


def _with_ids(events: list[tuple[str, str, dict[str, Any]]], **ids: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (p, t, json.loads(json.dumps(d).replace("{p1}", ids["p1"]).replace("{p2}", ids["p2"]))) for p, t, d in events
    ]


@pytest.mark.parametrize(
    ("events", "safe_mode", "expected"),
    [
        (ALL_ACCEPTED, False, ["accepted"] * 5),
        # Pledges' rejections come before any write, and its writes are deferred upserts (no ORM
        # object left dirty): the batch stays on the fast path.
        (SOME_REJECTED, False, ["accepted"] * 5 + ["DUPLICATE_PLEDGE", "NOT_AUTHORIZED", "PLEDGE_WITHDRAWN"]),
    ],
    ids=["fast-path", "rejections-on-the-fast-path"],
)
async def test_one_batch_decides_as_one_record_at_a_time(
    keys: Path,
    sessions: Any,
    caplog: pytest.LogCaptureFixture,
    events: list[tuple[str, str, dict[str, Any]]],
    safe_mode: bool,
    expected: list[str],
) -> None:
    """Later records of a batch see the pledge an earlier one created or changed, though it is
    not written yet; the outcomes and the rows are those of one record per transaction."""
    p1, p2 = f"P-{uuid.uuid4().hex[:6]}", f"P-{uuid.uuid4().hex[:6]}"
    events = _with_ids(events, p1=p1, p2=p2)
    with caplog.at_level("WARNING", logger="shared.runtime.consumer"):
        await processor(sessions, keys).process(records(keys, events))
    assert any("record by record" in r.message for r in caplog.records) is safe_mode
    together = (await outcomes(sessions), await states(sessions))

    async with sessions() as session, session.begin():
        await session.execute(PledgeRow.__table__.delete())  # type: ignore[attr-defined]
        await session.execute(OutboxMessage.__table__.delete())  # type: ignore[attr-defined]
    one_by_one = processor(sessions, keys)
    for record in records(keys, events):
        await one_by_one.process([record])
    alone = (await outcomes(sessions), await states(sessions))

    assert [reason or status for status, reason, _ in together[0]] == expected
    assert together == alone
    assert (together[1][p1]["version"], together[1][p2]["status"]) == (3, "withdrawn")


async def test_a_row_the_database_refuses_fails_only_its_record(keys: Path, sessions: Any) -> None:
    """Writes are deferred to the end of the batch; a refused one still fails only the record
    that made it (safe mode): retried, then dead-lettered and answered INTERNAL_ERROR, and the
    others are decided and written."""

    async def broken(session: AsyncSession, inbound: Inbound) -> Verdict:
        # A NOT NULL column left empty: nothing fails until the row is written.
        session.add(PledgeRow(pledge_id=inbound.aggregate_id, partner_id=inbound.party.id, state=None))  # type: ignore[arg-type]
        return Accepted()

    handlers = {**HANDLERS, event_type("pledge.disbursed.v1"): broken}
    good, bad = f"P-{uuid.uuid4().hex[:6]}", f"P-{uuid.uuid4().hex[:6]}"
    batch = records(
        keys,
        [
            ("kdb", "pledge.committed.v1", pledge(good)),
            ("kdb", "pledge.disbursed.v1", disburse(bad)),
        ],
    )
    for _ in range(MAX_TRIES - 1):  # each delivery but the last is rolled back and nacked
        with pytest.raises(RetryBatch):
            await processor(sessions, keys, handlers).process(batch)
        assert await outcomes(sessions) == []
    await processor(sessions, keys, handlers).process(batch)
    async with sessions() as session:
        topics = [r.topic for r in (await session.execute(select(OutboxMessage))).scalars()]
    assert topics.count(DLQ_TOPIC) == 1
    assert [o[:2] for o in await outcomes(sessions)] == [("accepted", None), ("rejected", "INTERNAL_ERROR")]
    assert set(await states(sessions)) == {good}


async def test_a_rejection_after_a_deferred_write_replays_the_batch(keys: Path, sessions: Any) -> None:
    """A handler that defers an upsert (shared.runtime.aggregates.upsert) and then rejects its
    event sends the batch to safe mode, where the record's savepoint undoes the write: a rejected
    event leaves no change behind, and the batch's other records are decided as before."""

    async def upsert_then_reject(session: AsyncSession, inbound: Inbound) -> Verdict:
        row = {"pledge_id": inbound.aggregate_id, "partner_id": "kdb", "state": "{}"}
        await aggregates.upsert(session, PLEDGES, row, keys=("pledge_id",), update=("state",))
        return Rejected(reason_code=ReasonCode.PLEDGE_WITHDRAWN, message="changed its mind")

    handlers = {**HANDLERS, event_type("pledge.withdrawn.v1"): upsert_then_reject}
    good, bad = f"P-{uuid.uuid4().hex[:6]}", f"P-{uuid.uuid4().hex[:6]}"
    batch = records(keys, [("kdb", "pledge.committed.v1", pledge(good)), ("kdb", "pledge.withdrawn.v1", withdraw(bad))])
    await processor(sessions, keys, handlers).process(batch)
    assert [o[:2] for o in await outcomes(sessions)] == [("accepted", None), ("rejected", "PLEDGE_WITHDRAWN")]
    assert set(await states(sessions)) == {good}
