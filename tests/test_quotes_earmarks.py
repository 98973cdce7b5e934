"""Quotes keeps pledge earmarks with one upsert per batch (fast path) and through the ORM in safe
mode; later decisions of one batch see earlier ones, and versions decide. SQLite in memory: this
is the service's persistence code alone (the same statements run on PostgreSQL in the e2e tests)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.quotes.main import TABLES, EarmarkRow, _earmarks_for, flush_earmarks, on_decision
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Decision
from shared.contract.facts import PLEDGE
from shared.runtime.aggregates import AggregateCache
from shared.runtime.db import create_tables, make_engine, session_factory


def decision(pledge_id: str, version: int, batch: str | None, amount: str = "100") -> Decision:
    facts: dict[str, Any] = {
        "pledge_id": pledge_id, "partner_id": "kdb", "program_id": "p", "kind": "capital",
        "capital": {"amount": amount, "currency": "KRW"}, "earmark_batch_id": batch,
        "committed_at": "2025-03-01T00:00:00Z", "due_by": "2025-12-31", "status": "active", "version": version,
    }  # fmt: skip
    return Decision(
        decision_id=f"d-{pledge_id}-{version}",
        service="pledges",
        decided_at=datetime.now(UTC),
        status="accepted",
        message="ok",
        event_type="gputrace.pledge.committed.v1",
        facts={PLEDGE: facts},
    )


EVENT = CloudEvent(id="e", source="urn:gputrace:service:pledges", type="t", data={})


async def engine() -> AsyncEngine:
    e = make_engine("sqlite+aiosqlite://")
    await create_tables(e, TABLES)  # type: ignore[arg-type]
    return e


async def rows(e: AsyncEngine) -> dict[str, tuple[int, str | None, str | None]]:
    async with session_factory(e)() as session:
        found = (await session.execute(select(EarmarkRow))).scalars().all()
        return {r.pledge_id: (r.version, r.earmark_batch_id, r.amount) for r in found}


async def test_one_upsert_per_batch_seen_by_later_decisions_of_the_batch() -> None:
    e = await engine()
    async with session_factory(e)() as session, session.begin():
        AggregateCache.attach(session)  # the fast path
        await on_decision(session, EVENT, decision("P1", 1, "B1"), None)  # type: ignore[arg-type]
        await on_decision(session, EVENT, decision("P2", 1, "B1", "50"), None)  # type: ignore[arg-type]
        assert {m.pledge_id for m in await _earmarks_for(session, "B1")} == {"P1", "P2"}
        await on_decision(session, EVENT, decision("P1", 2, "B2"), None)  # type: ignore[arg-type]
        await on_decision(session, EVENT, decision("P1", 1, "B1"), None)  # type: ignore[arg-type] - stale
        assert {m.pledge_id for m in await _earmarks_for(session, "B1")} == {"P2"}
        assert not session.new  # nothing through the ORM
        await flush_earmarks(session)
    assert await rows(e) == {"P1": (2, "B2", "100"), "P2": (1, "B1", "50")}

    async with session_factory(e)() as session, session.begin():  # the next batch: an update
        AggregateCache.attach(session)
        await on_decision(session, EVENT, decision("P2", 3, None, "70"), None)  # type: ignore[arg-type]
        await flush_earmarks(session)
    assert await rows(e) == {"P1": (2, "B2", "100"), "P2": (3, None, "70")}
    await e.dispose()


async def test_safe_mode_writes_through_the_orm() -> None:
    e = await engine()
    async with session_factory(e)() as session, session.begin():
        await on_decision(session, EVENT, decision("P1", 1, "B1"), None)  # type: ignore[arg-type]
        assert session.new  # a savepoint can undo it
        await flush_earmarks(session)  # nothing buffered
    assert await rows(e) == {"P1": (1, "B1", "100")}
    await e.dispose()
