"""The deliveries service: every GPU serial from dispatch to acceptance at the site (docs/architecture.md §5).

Reads `partner.logistics.v1` (shipments, receipts, installation, acceptance) and the decisions of
quotes (awards: how many units a batch may ship) and export controls (the export case: whether,
and how many, it may ship). Rules live in `domain`; this module loads what an event names, in
set-based queries, and stores what the rules say changed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, update
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.deliveries import domain
from shared.contract import (
    LOGISTICS_TOPIC,
    BatchAccepted,
    BatchInstalled,
    Contract,
    ReasonCode,
    ShipmentCleared,
    ShipmentDispatched,
    ShipmentReceived,
    decisions_topic,
    event_type,
)
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Accepted, Decision, Rejected, Verdict
from shared.contract.facts import AWARD, DELIVERY, EXPORT, AwardFacts, ExportFacts
from shared.runtime.consumer import Emitter, Inbound
from shared.runtime.service import Service, run_service

SERVICE = "deliveries"

# Bound of an IN list: well under SQLite's and PostgreSQL's parameter limits, and few round
# trips even for the 7,656 serials of the largest batch.
CHUNK = 1000

# Table names carry the service's name: every service's SQLModel tables share one metadata, and
# quotes has batches of its own.


class BatchRow(SQLModel, table=True):
    __tablename__ = "delivery_batches"

    batch_id: str = Field(primary_key=True, max_length=200)
    awarded_quantity: int | None = None
    export_status: str | None = Field(default=None, max_length=32)
    cleared_quantity: int = 0
    # UTC, fixed-width ISO 8601: portable across SQLite and PostgreSQL, and ordered as text.
    export_decided_at: str | None = Field(default=None, max_length=40)
    dispatched: int = 0
    in_transit: int = 0
    missing: int = 0
    received: int = 0
    damaged: int = 0
    installed: int = 0
    accepted: int = 0
    failed: int = 0
    shipments: int = 0


class ShipmentRow(SQLModel, table=True):
    __tablename__ = "delivery_shipments"

    shipment_id: str = Field(primary_key=True, max_length=200)
    batch_id: str = Field(index=True, max_length=200)
    carrier: str = Field(max_length=200)
    status: str = Field(max_length=16, description="dispatched, cleared or received")
    serials: int = Field(description="how many serials it left with")
    origin_country: str = Field(max_length=2)
    route: str = Field(default="[]", description="JSON list of countries")
    dispatched_at: str = Field(max_length=40)
    declarations: str = Field(default="[]", description="JSON list of customs declaration numbers")
    received: int = 0
    damaged: int = 0
    missing: int = 0


class SerialRow(SQLModel, table=True):
    __tablename__ = "delivery_serials"

    # The primary key makes a serial unique across the programme, even between batches decided
    # concurrently on different partitions.
    serial: str = Field(primary_key=True, max_length=100)
    batch_id: str = Field(index=True, max_length=200)
    shipment_id: str = Field(index=True, max_length=200)
    state: str = Field(max_length=16)
    rack: str | None = Field(default=None, max_length=200)
    slot: str | None = Field(default=None, max_length=200)


TABLES = [BatchRow.__table__, ShipmentRow.__table__, SerialRow.__table__]

T = TypeVar("T")


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


# --- loading and storing ------------------------------------------------------------------


async def _load_batch(session: AsyncSession, batch_id: str) -> domain.Batch | None:
    row = await session.get(BatchRow, batch_id)
    if row is None:
        return None
    values = row.model_dump()
    at = values.pop("export_decided_at")
    return domain.Batch(**values, export_decided_at=datetime.fromisoformat(at) if at else None)


async def _save_batch(session: AsyncSession, batch: domain.Batch) -> None:
    values = {
        **{f: getattr(batch, f) for f in BatchRow.model_fields if f != "export_decided_at"},
        "export_decided_at": _utc(batch.export_decided_at) if batch.export_decided_at else None,
    }
    row = await session.get(BatchRow, batch.batch_id)
    if row is None:
        session.add(BatchRow(**values))
    else:
        row.sqlmodel_update(values)
        session.add(row)


def _shipment(row: ShipmentRow) -> domain.Shipment:
    return domain.Shipment(
        shipment_id=row.shipment_id,
        batch_id=row.batch_id,
        carrier=row.carrier,
        origin_country=row.origin_country,
        route=tuple(json.loads(row.route)),
        dispatched_at=row.dispatched_at,
        serials=row.serials,
        status=row.status,
        declarations=tuple(json.loads(row.declarations)),
        received=row.received,
        damaged=row.damaged,
        missing=row.missing,
    )


def _shipment_values(s: domain.Shipment) -> dict[str, Any]:
    return {
        "shipment_id": s.shipment_id,
        "batch_id": s.batch_id,
        "carrier": s.carrier,
        "status": s.status,
        "serials": s.serials,
        "origin_country": s.origin_country,
        "route": json.dumps(list(s.route)),
        "dispatched_at": s.dispatched_at,
        "declarations": json.dumps(list(s.declarations)),
        "received": s.received,
        "damaged": s.damaged,
        "missing": s.missing,
    }


async def _load_shipment(session: AsyncSession, shipment_id: str) -> domain.Shipment | None:
    row = await session.get(ShipmentRow, shipment_id)
    return _shipment(row) if row else None


async def _save_shipment(session: AsyncSession, shipment: domain.Shipment) -> None:
    row = await session.get(ShipmentRow, shipment.shipment_id)
    assert row is not None, "a shipment is created by a plain INSERT at dispatch"
    row.sqlmodel_update(_shipment_values(shipment))
    session.add(row)


async def _known(session: AsyncSession, serials: Iterable[str]) -> dict[str, domain.SerialInfo]:
    """What the programme holds of these serials, in IN-list chunks rather than a query each."""
    known: dict[str, domain.SerialInfo] = {}
    for chunk in _chunks(sorted(set(serials))):
        rows = await session.exec(
            select(SerialRow.serial, SerialRow.batch_id, SerialRow.state).where(col(SerialRow.serial).in_(chunk))
        )
        known.update((serial, domain.SerialInfo(batch_id, state)) for serial, batch_id, state in rows)
    return known


async def _set_state(session: AsyncSession, serials: Iterable[str], state: str) -> None:
    for chunk in _chunks(sorted(serials)):
        await session.exec(update(SerialRow).where(col(SerialRow.serial).in_(chunk)).values(state=state))


# --- verdicts -----------------------------------------------------------------------------


def _accepted(
    message: str,
    batch: domain.Batch,
    shipment: domain.Shipment | None = None,
    anomalies: list[dict[str, Any]] | None = None,
) -> Accepted:
    facts: dict[str, Any] = {DELIVERY: batch.facts()}
    if shipment is not None:
        facts["shipment"] = shipment.facts()
    return Accepted(message=message, facts=facts, anomalies=anomalies or [])


D = TypeVar("D", bound=Contract)


def _handler(kind: type[D], step: Callable[[AsyncSession, D], Awaitable[Verdict]]):  # type: ignore[no-untyped-def]
    """A partner handler: the event's data as its contract type, rule breaches as rejections."""

    async def handle(session: AsyncSession, inbound: Inbound) -> Verdict:
        assert isinstance(inbound.data, kind), f"{inbound.spec.type} carries {type(inbound.data).__name__}"
        try:
            return await step(session, inbound.data)
        except domain.RuleBroken as broken:
            return broken.rejected()

    return handle


# --- partner events -----------------------------------------------------------------------


async def on_dispatched(session: AsyncSession, e: ShipmentDispatched) -> Verdict:
    batch = await _load_batch(session, e.batch_id)
    exists = await session.get(ShipmentRow, e.shipment_id) is not None
    known = await _known(session, e.serials)
    done = domain.dispatch(batch, exists, known, e)
    try:
        # Plain INSERTs, so a serial or shipment id taken meanwhile by another batch (another
        # partition, another consumer) fails here, inside the savepoint, and becomes a rejection.
        await session.exec(insert(ShipmentRow).values(**_shipment_values(done.shipment)))
        for chunk in _chunks(e.serials):
            await session.exec(
                insert(SerialRow),
                params=[
                    {"serial": s, "batch_id": e.batch_id, "shipment_id": e.shipment_id, "state": domain.DISPATCHED}
                    for s in chunk
                ],
            )
    except sa_exc.IntegrityError:
        return Rejected(
            reason_code=ReasonCode.SERIAL_DUPLICATE,
            message=f"shipment {e.shipment_id!r} or one of its serials was registered concurrently by another batch",
        )
    await _save_batch(session, done.batch)
    return _accepted(
        f"shipment {e.shipment_id} dispatched: {len(e.serials)} units of batch {e.batch_id}", done.batch, done.shipment
    )


async def on_cleared(session: AsyncSession, e: ShipmentCleared) -> Verdict:
    shipment = domain.clear(await _load_shipment(session, e.shipment_id), e)
    # A shipment exists only once its batch's dispatch was accepted, so the batch is there.
    batch = domain.known_batch(await _load_batch(session, e.batch_id), e.batch_id)
    await _save_shipment(session, shipment)
    return _accepted(f"shipment {e.shipment_id} cleared customs ({e.declaration_number})", batch, shipment)


async def on_received(session: AsyncSession, e: ShipmentReceived) -> Verdict:
    shipment = await _load_shipment(session, e.shipment_id)
    dispatched: frozenset[str] = frozenset()
    if shipment is not None and shipment.batch_id == e.batch_id:
        rows = await session.exec(select(SerialRow.serial).where(SerialRow.shipment_id == e.shipment_id))
        dispatched = frozenset(rows)
    done = domain.receive(await _load_batch(session, e.batch_id), shipment, dispatched, e)
    await _set_state(session, done.intact, domain.RECEIVED)
    await _set_state(session, done.damaged, domain.DAMAGED)
    await _set_state(session, done.missing, domain.MISSING)
    await _save_shipment(session, done.shipment)
    await _save_batch(session, done.batch)
    return _accepted(
        f"shipment {e.shipment_id} received: {len(done.intact)} intact, {len(done.damaged)} damaged, "
        f"{len(done.missing)} missing",
        done.batch,
        done.shipment,
        done.anomalies,
    )


async def on_installed(session: AsyncSession, e: BatchInstalled) -> Verdict:
    batch = await _load_batch(session, e.batch_id)
    known = await _known(session, (p.serial for p in e.placements))
    done = domain.install(batch, known, e)
    for chunk in _chunks(e.placements):
        # Bulk UPDATE by primary key: one executemany per chunk, each row its own rack and slot.
        await session.exec(
            update(SerialRow),
            params=[{"serial": p.serial, "state": domain.INSTALLED, "rack": p.rack, "slot": p.slot} for p in chunk],
        )
    await _save_batch(session, done.batch)
    return _accepted(f"{len(e.placements)} units of batch {e.batch_id} installed at {e.site_id}", done.batch)


async def on_accepted(session: AsyncSession, e: BatchAccepted) -> Verdict:
    batch = await _load_batch(session, e.batch_id)
    known = await _known(session, [*e.passed_serials, *e.failed_serials])
    done = domain.accept(batch, known, e)
    await _set_state(session, e.passed_serials, domain.ACCEPTED)
    await _set_state(session, e.failed_serials, domain.FAILED)
    await _save_batch(session, done.batch)
    return _accepted(
        f"batch {e.batch_id}: {len(e.passed_serials)} units accepted, {len(e.failed_serials)} failed",
        done.batch,
        anomalies=done.anomalies,
    )


HANDLERS = {
    event_type("shipment.dispatched.v1"): _handler(ShipmentDispatched, on_dispatched),
    event_type("shipment.cleared.v1"): _handler(ShipmentCleared, on_cleared),
    event_type("shipment.received.v1"): _handler(ShipmentReceived, on_received),
    event_type("batch.installed.v1"): _handler(BatchInstalled, on_installed),
    event_type("batch.accepted.v1"): _handler(BatchAccepted, on_accepted),
}


# --- decisions of quotes and export controls ----------------------------------------------


async def on_decision(session: AsyncSession, event: CloudEvent, decision: Decision, emitter: Emitter) -> None:
    """Keep what a batch may ship. Read by facts, not event type: an export case moves on
    decisions of several types (export.decided, license.granted, license.denied)."""
    if decision.status != "accepted":
        return
    if award := decision.facts.get(AWARD):
        facts = AwardFacts.model_validate(award)
        await _save_batch(session, domain.record_award(await _load_batch(session, facts.batch_id), facts))
    if export := decision.facts.get(EXPORT):
        case = ExportFacts.model_validate(export)
        batch = await _load_batch(session, case.batch_id)
        await _save_batch(session, domain.record_export(batch, case, decision.decided_at))


def build() -> Service:
    return Service(
        SERVICE,
        tables=TABLES,  # type: ignore[arg-type]
        topics=[LOGISTICS_TOPIC, decisions_topic("quotes"), decisions_topic("export_controls")],
        partner_handlers=HANDLERS,
        internal_handler=on_decision,
    )


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()
