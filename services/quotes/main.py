"""The quotes service: batch requests, vendor quotes and awards against earmarked funding
(docs/architecture.md §5).

Reads `partner.procurement.v1` (partner events) and the pledges service's decisions (to know the
capital earmarked per batch); every decision goes to its canonical topic and each partner's
outcome to `gputrace.outcomes.v1`, through the shared mechanism. The rules are in domain.py;
handlers here load, call a rule, save.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.quotes import domain
from shared.contract import (
    PROCUREMENT_TOPIC,
    BatchRequested,
    Money,
    QuoteAwarded,
    QuoteSubmitted,
    QuoteWithdrawn,
    decisions_topic,
    event_type,
)
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Accepted, Decision, Verdict
from shared.contract.facts import AWARD, BATCH, PLEDGE, QUOTE, PledgeFacts
from shared.runtime import aggregates
from shared.runtime.consumer import Emitter, Inbound
from shared.runtime.service import Service, run_service

SERVICE = "quotes"

# Batch ids are at most 200 characters (contract NonEmpty); a pledge's earmark_batch_id is not
# bounded by the contract, and a longer one can name no batch, so it is stored as no earmark
# rather than failing the column.
BATCH_ID_MAX = 200


# Table names carry the service's name: every service's tables share SQLModel's one metadata
# when several services are imported in one process (tests, tools).


class BatchRow(SQLModel, table=True):
    __tablename__ = "quotes_batches"

    batch_id: str = Field(primary_key=True, max_length=200)
    program_id: str = Field(index=True, max_length=200)
    status: str = Field(max_length=20)
    state: str = Field(description="JSON of the batch (domain.BATCH_STATE)")


class QuoteRow(SQLModel, table=True):
    __tablename__ = "quotes_quotes"

    quote_id: str = Field(primary_key=True, max_length=200)
    batch_id: str = Field(index=True, max_length=200)
    vendor_id: str = Field(index=True, max_length=200)
    status: str = Field(max_length=20)
    state: str = Field(description="JSON of the quote (domain.QUOTE_STATE)")


class EarmarkRow(SQLModel, table=True):
    """The latest known version of each pledge, as far as funding batches goes."""

    __tablename__ = "quotes_earmarks"

    pledge_id: str = Field(primary_key=True, max_length=200)
    partner_id: str = Field(max_length=200)
    version: int
    kind: str = Field(max_length=20)
    status: str = Field(max_length=20)
    earmark_batch_id: str | None = Field(default=None, index=True, max_length=BATCH_ID_MAX)
    # Decimal string, never a float; None for pledges that are not capital.
    amount: str | None = None
    currency: str | None = Field(default=None, max_length=3)


TABLES = [BatchRow.__table__, QuoteRow.__table__, EarmarkRow.__table__]


# --- persistence --------------------------------------------------------------------------


async def _batch(session: AsyncSession, batch_id: str) -> domain.Batch | None:
    row = await aggregates.get(session, BatchRow, batch_id)
    return domain.BATCH_STATE.validate_json(row.state) if row else None


async def _save_batch(session: AsyncSession, batch: domain.Batch) -> None:
    row = await aggregates.get(session, BatchRow, batch.batch_id)
    state = domain.BATCH_STATE.dump_json(batch).decode()
    if row is None:
        row = BatchRow(batch_id=batch.batch_id, program_id=batch.program_id, status=batch.status, state=state)
    else:
        row.status, row.state = batch.status, state
    session.add(row)


async def _quote(session: AsyncSession, quote_id: str) -> domain.Quote | None:
    row = await aggregates.get(session, QuoteRow, quote_id)
    return domain.QUOTE_STATE.validate_json(row.state) if row else None


async def _quotes_of(session: AsyncSession, batch_id: str) -> list[domain.Quote]:
    rows = (await session.exec(select(QuoteRow).where(QuoteRow.batch_id == batch_id))).all()
    return [domain.QUOTE_STATE.validate_json(r.state) for r in rows]


async def _save_quote(session: AsyncSession, quote: domain.Quote) -> None:
    row = await aggregates.get(session, QuoteRow, quote.quote_id)
    state = domain.QUOTE_STATE.dump_json(quote).decode()
    if row is None:
        row = QuoteRow(
            quote_id=quote.quote_id,
            batch_id=quote.batch_id,
            vendor_id=quote.vendor_id,
            status=quote.status,
            state=state,
        )
    else:
        row.status, row.state = quote.status, state
    session.add(row)


def _earmark(row: EarmarkRow | dict[str, Any]) -> domain.Earmark:
    v = row if isinstance(row, dict) else {c: getattr(row, c) for c in EARMARK_COLUMNS}
    return domain.Earmark(
        pledge_id=v["pledge_id"],
        partner_id=v["partner_id"],
        version=v["version"],
        kind=v["kind"],
        status=v["status"],
        batch_id=v["earmark_batch_id"],
        capital=Money.model_validate({"amount": v["amount"], "currency": v["currency"]}) if v["amount"] else None,
    )


EARMARK_COLUMNS = [c.name for c in EarmarkRow.__table__.columns]  # type: ignore[attr-defined]
# The batch's earmark rows by pledge id, written in one upsert at its end (flush_earmarks): every
# pledge decision changes one, and an ORM object per event was most of this service's CPU.
_EARMARKS = "quotes.earmarks"


def _earmark_buffer(session: AsyncSession) -> dict[str, dict[str, Any]] | None:
    """The fast path's buffer; None in safe mode (no aggregate cache), where each record's
    savepoint must be able to undo its row, so rows go through the ORM as before."""
    if aggregates.cache_of(session) is None:
        return None
    buffer: dict[str, dict[str, Any]] = session.info.setdefault(_EARMARKS, {})
    return buffer


def _earmark_values(m: domain.Earmark) -> dict[str, Any]:
    return {
        "pledge_id": m.pledge_id,
        "partner_id": m.partner_id,
        "version": m.version,
        "kind": m.kind,
        "status": m.status,
        "earmark_batch_id": m.batch_id if m.batch_id is None or len(m.batch_id) <= BATCH_ID_MAX else None,
        "amount": str(domain.plain(m.capital.amount)) if m.capital else None,
        "currency": m.capital.currency if m.capital else None,
    }


async def _earmarks_for(session: AsyncSession, batch_id: str) -> list[domain.Earmark]:
    rows = (await session.exec(select(EarmarkRow).where(EarmarkRow.earmark_batch_id == batch_id))).all()
    found = {r.pledge_id: _earmark(r) for r in rows}
    # This batch's earmarks, not written yet, override what the table says.
    for pledge_id, values in (session.info.get(_EARMARKS) or {}).items():
        if values["earmark_batch_id"] == batch_id:
            found[pledge_id] = _earmark(values)
        else:
            found.pop(pledge_id, None)
    return list(found.values())


async def _save_earmark(session: AsyncSession, m: domain.Earmark) -> None:
    values = _earmark_values(m)
    buffer = _earmark_buffer(session)
    if buffer is not None:
        buffer[m.pledge_id] = values
        return
    row = await aggregates.get(session, EarmarkRow, m.pledge_id) or EarmarkRow(**values)
    for column, value in values.items():
        setattr(row, column, value)
    session.add(row)


async def flush_earmarks(session: AsyncSession) -> None:
    """The batch's earmarks in one INSERT ... ON CONFLICT DO UPDATE, in its transaction."""
    buffer = session.info.pop(_EARMARKS, None)
    if not buffer:
        return
    table = EarmarkRow.__table__  # type: ignore[attr-defined]
    bind = session.bind
    insert = pg_insert if bind is not None and bind.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=["pledge_id"], set_={c: stmt.excluded[c] for c in EARMARK_COLUMNS if c != "pledge_id"}
    )
    await session.execute(stmt, list(buffer.values()))


def _batch_facts(batch: domain.Batch, quotes: list[domain.Quote]) -> dict[str, Any]:
    return batch.facts(domain.open_quotes(quotes)).model_dump(mode="json")


def _replace(quotes: list[domain.Quote], *changed: domain.Quote) -> list[domain.Quote]:
    """The batch's quotes after `changed` are applied (added or replacing the same quote_id)."""
    by_id = {q.quote_id: q for q in quotes}
    by_id.update({q.quote_id: q for q in changed})
    return list(by_id.values())


# --- partner handlers ---------------------------------------------------------------------


async def on_batch_requested(session: AsyncSession, inbound: Inbound) -> Verdict:
    e = inbound.data
    assert isinstance(e, BatchRequested)
    try:
        batch = domain.request_batch(await _batch(session, e.batch_id), e)
    except domain.RuleBroken as broken:
        return broken.rejected()
    await _save_batch(session, batch)
    return Accepted(message=f"batch {batch.batch_id} requested", facts={BATCH: _batch_facts(batch, [])})


async def on_quote_submitted(session: AsyncSession, inbound: Inbound) -> Verdict:
    e = inbound.data
    assert isinstance(e, QuoteSubmitted)
    batch = await _batch(session, e.batch_id)
    try:
        quote = domain.submit_quote(batch, await _quote(session, e.quote_id), e)
    except domain.RuleBroken as broken:
        return broken.rejected()
    assert batch is not None
    quotes = _replace(await _quotes_of(session, batch.batch_id), quote)
    await _save_quote(session, quote)
    return Accepted(
        message=f"quote {quote.quote_id} submitted for batch {batch.batch_id}",
        facts={BATCH: _batch_facts(batch, quotes), QUOTE: quote.facts().model_dump(mode="json")},
    )


async def on_quote_withdrawn(session: AsyncSession, inbound: Inbound) -> Verdict:
    e = inbound.data
    assert isinstance(e, QuoteWithdrawn)
    try:
        quote = domain.withdraw_quote(await _quote(session, e.quote_id), e)
    except domain.RuleBroken as broken:
        return broken.rejected()
    batch = await _batch(session, quote.batch_id)
    assert batch is not None  # a quote is only ever stored for an existing batch
    quotes = _replace(await _quotes_of(session, batch.batch_id), quote)
    await _save_quote(session, quote)
    return Accepted(
        message=f"quote {quote.quote_id} withdrawn",
        facts={BATCH: _batch_facts(batch, quotes), QUOTE: quote.facts().model_dump(mode="json")},
    )


async def on_quote_awarded(session: AsyncSession, inbound: Inbound) -> Verdict:
    e = inbound.data
    assert isinstance(e, QuoteAwarded)
    batch = await _batch(session, e.batch_id)
    batch_quotes = await _quotes_of(session, e.batch_id) if batch else []
    try:
        result = domain.award(
            batch, await _quote(session, e.quote_id), batch_quotes, await _earmarks_for(session, e.batch_id), e
        )
    except domain.RuleBroken as broken:
        return broken.rejected()
    await _save_batch(session, result.batch)
    for quote in (result.quote, *result.not_awarded):
        await _save_quote(session, quote)
    quotes = _replace(batch_quotes, result.quote, *result.not_awarded)
    return Accepted(
        message=f"batch {result.batch.batch_id} awarded to quote {result.quote.quote_id} of {result.quote.vendor_id}",
        facts={
            AWARD: result.facts.model_dump(mode="json"),
            BATCH: _batch_facts(result.batch, quotes),
            QUOTE: result.quote.facts().model_dump(mode="json"),
            "not_awarded": [q.quote_id for q in result.not_awarded],
        },
    )


HANDLERS = {
    event_type("batch.requested.v1"): on_batch_requested,
    event_type("quote.submitted.v1"): on_quote_submitted,
    event_type("quote.withdrawn.v1"): on_quote_withdrawn,
    event_type("quote.awarded.v1"): on_quote_awarded,
}


# --- decisions of other services ----------------------------------------------------------


async def on_decision(session: AsyncSession, event: CloudEvent, decision: Decision, emitter: Emitter) -> None:
    """Keeps the earmark of each pledge from the pledges service's accepted decisions. Nothing
    here is a decision of ours, so nothing is emitted."""
    if decision.service != "pledges" or decision.status != "accepted" or PLEDGE not in decision.facts:
        return
    incoming = domain.Earmark.from_pledge(PledgeFacts.model_validate(decision.facts[PLEDGE]))
    buffered = (session.info.get(_EARMARKS) or {}).get(incoming.pledge_id)
    row = buffered or await aggregates.get(session, EarmarkRow, incoming.pledge_id)
    kept = domain.track_pledge(_earmark(row) if row else None, incoming)
    if kept is not None:
        await _save_earmark(session, kept)


async def prefetch(session: AsyncSession, events: Sequence[CloudEvent]) -> None:
    """The batch's batches, quotes and earmarks in three queries, by the ids events name."""
    batches: list[Any] = []
    quotes: list[Any] = []
    earmarks: list[Any] = []
    for event in events:
        data = event.data
        facts = data.get("facts")
        pledge = facts.get(PLEDGE) if isinstance(facts, dict) and data.get("service") == "pledges" else None
        if isinstance(pledge, dict):
            earmarks.append(pledge.get("pledge_id"))
        else:
            batches.append(data.get("batch_id"))
            quotes.append(data.get("quote_id"))
    await aggregates.load(session, BatchRow, aggregates.strings(batches))
    await aggregates.load(session, QuoteRow, aggregates.strings(quotes))
    await aggregates.load(session, EarmarkRow, aggregates.strings(earmarks))


def build() -> Service:
    return Service(
        SERVICE,
        tables=TABLES,  # type: ignore[arg-type]
        topics=[PROCUREMENT_TOPIC, decisions_topic("pledges")],
        partner_handlers=HANDLERS,
        internal_handler=on_decision,
        prefetch=prefetch,
        after_batch=flush_earmarks,
    )


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()
