"""The batch view: one GPU batch from request to acceptance, folded from every service's decisions.

Facts are snapshots (shared/contract/facts.py), so folding them is overwriting the part each service owns;
a stale snapshot never wins over a newer one because each part is replaced only by a decision
with a later ledger index.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, get_args

from sqlalchemy import Column, Index, Select, Text, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract.decisions import Decision
from shared.runtime import aggregates

# The pipeline, in order; a batch's status is the furthest stage its facts show. A Literal, so the
# API's `status` filter is an enum in the OpenAPI document and anything else is refused there.
Stage = Literal[
    "requested",
    "quoted",
    "awarded",
    "export_pending",
    "license_required",
    "export_denied",
    "license_denied",
    "cleared",
    "in_transit",
    "received",
    "installed",
    "accepted",
]
STAGES: tuple[Stage, ...] = get_args(Stage)


class BatchView(SQLModel, table=True):
    __tablename__ = "view_batches"
    # A filtered page is read in batch_id order straight from an index, never sorted from a scan.
    __table_args__ = (
        Index("ix_view_batches_status_batch", "status", "batch_id"),
        Index("ix_view_batches_program_batch", "program_id", "batch_id"),
    )

    batch_id: str = Field(primary_key=True, max_length=200)
    program_id: str | None = Field(default=None, index=True, max_length=200)
    model: str | None = Field(default=None, index=True, max_length=50)
    vendor_id: str | None = Field(default=None, index=True, max_length=200)
    status: str = Field(default="requested", index=True, max_length=30)
    anomalies: int = 0
    last_leaf_index: int = 0
    state: str = Field(default="{}", sa_column=Column(Text, nullable=False))


class BatchParty(SQLModel, table=True):
    """Which parties a batch concerns (for the partner role: it reads only its own batches)."""

    __tablename__ = "view_batch_parties"
    # The partner filter reads by party (the primary key starts with the batch).
    __table_args__ = (Index("ix_view_batch_parties_party", "party_id", "batch_id"),)

    batch_id: str = Field(primary_key=True, max_length=200)
    party_id: str = Field(primary_key=True, max_length=200)


class AnomalyView(SQLModel, table=True):
    __tablename__ = "view_anomalies"

    id: int | None = Field(default=None, primary_key=True)
    leaf_index: int = Field(index=True)
    batch_id: str | None = Field(default=None, index=True, max_length=200)
    code: str = Field(index=True, max_length=60)
    severity: str = Field(max_length=20)
    message: str = Field(sa_column=Column(Text, nullable=False))
    service: str = Field(max_length=40)
    party_id: str | None = Field(default=None, max_length=200)
    decision_id: str = Field(max_length=64)
    decided_at: datetime
    details: str = Field(default="{}", sa_column=Column(Text, nullable=False))


class BatchStep(SQLModel, table=True):
    """One line of a batch's timeline per decision on it: the few fields the API shows, so a batch
    view never parses its ledger entries (a dispatch of 1,000 serials is ~40 kB of JSON)."""

    __tablename__ = "view_batch_steps"
    __table_args__ = (Index("ix_view_batch_steps_batch", "batch_id", "leaf_index"),)

    leaf_index: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    batch_id: str = Field(max_length=200)
    step: str = Field(sa_column=Column(Text, nullable=False))


BATCH_TABLES = [BatchView.__table__, BatchParty.__table__, AnomalyView.__table__, BatchStep.__table__]

# A running total's key: (scope, program_id, party_id, metric, unit); "" where it does not apply.
TotalKey = tuple[str, str, str, str, str]
Deltas = list[tuple[TotalKey, Decimal | int]]
DELIVERY_COUNTS = ("awarded", "dispatched", "received", "damaged", "installed", "accepted", "failed")


def step_of(decision: Decision, leaf_index: int) -> dict[str, Any]:
    """The timeline line of a decision (what GET /v1/batches/{id} shows of it)."""
    shown = {"decided_at", "service", "event_type", "status", "reason_code", "message", "party_id", "anomalies"}
    # As the entry's JSON has them (dates as pydantic writes them), without dumping the whole entry.
    return {
        "leaf_index": leaf_index,
        **decision.model_dump(mode="json", include=shown),
        "event_id": (decision.event or {}).get("id"),
    }


def delivery_counts(state: dict[str, Any]) -> dict[str, int]:
    """The GPU counts a batch contributes to the programme's running totals."""
    delivery = state.get("delivery") or {}
    counts = {k: int(delivery.get(k) or 0) for k in DELIVERY_COUNTS if k != "awarded"}
    counts["awarded"] = int((state.get("award") or {}).get("quantity") or 0)
    return counts


async def project_batch(session: AsyncSession, decision: Decision, leaf_index: int) -> Deltas:
    """Folds the decision into its batch's view; returns the running totals it changes."""
    deltas: Deltas = []
    view = await aggregates.get(session, BatchView, decision.batch_id) if decision.batch_id else None
    for a in decision.anomalies:
        program = view.program_id if view is not None and view.program_id else ""
        deltas.append((("anomalies", program, "", a["code"][:60], ""), 1))
        session.add(
            AnomalyView(
                leaf_index=leaf_index,
                batch_id=a.get("batch_id") or decision.batch_id,
                code=a["code"],
                severity=a.get("severity", "high"),
                message=a["message"],
                service=decision.service,
                party_id=decision.party_id,
                decision_id=decision.decision_id,
                decided_at=decision.decided_at,
                details=json.dumps({k: v for k, v in a.items() if k not in ("code", "severity", "message")}),
            )
        )
    if not decision.batch_id or decision.service == "pledges":
        return deltas  # pledges earmarked for a batch are joined in at read time, from the pledge view
    if decision.status != "accepted":
        # A rejection is in the log (a fact) and its anomalies above are listed for auditors, but
        # it creates no batch and links no party: its batch id and party are only what a
        # partner claimed (kakao rejected NOT_AUTHORIZED on B-1 must not read B-1).
        if view is not None and decision.anomalies:
            view.anomalies += len(decision.anomalies)
            session.add(view)
        return deltas
    before: tuple[str, str] | None = None
    if view is None:
        view = BatchView(batch_id=decision.batch_id)
    else:
        before = (view.program_id or "", view.status)
    state = json.loads(view.state)
    old_counts = delivery_counts(state)
    _fold(state, decision, leaf_index)
    view.anomalies += len(decision.anomalies)
    view.last_leaf_index = leaf_index
    batch = state.get("batch") or {}
    award = state.get("award") or {}
    view.program_id = batch.get("program_id") or award.get("program_id") or view.program_id
    view.model = batch.get("model") or award.get("model") or view.model
    view.vendor_id = award.get("vendor_id") or view.vendor_id
    view.status = status_of(state)
    view.state = json.dumps(state)
    session.add(view)
    after = (view.program_id or "", view.status)
    if before != after:
        if before is not None:
            deltas.append((("batches", before[0], "", before[1], ""), -1))
        deltas.append((("batches", after[0], "", after[1], ""), 1))
    new_counts = delivery_counts(state)
    for k in DELIVERY_COUNTS:
        if before is not None and before[0] != after[0]:
            # The batch learnt its programme: its GPUs move with it.
            deltas.append((("gpus", before[0], "", k, ""), -old_counts[k]))
            deltas.append((("gpus", after[0], "", k, ""), new_counts[k]))
        elif new_counts[k] != old_counts[k]:
            deltas.append((("gpus", after[0], "", k, ""), new_counts[k] - old_counts[k]))
    # Accepted implies the event's signature verified, so decision.party_id is authenticated here.
    for party in filter(None, {decision.party_id, award.get("vendor_id")}):
        if await aggregates.get(session, BatchParty, (decision.batch_id, party)) is None:
            session.add(BatchParty(batch_id=decision.batch_id, party_id=party))
    return deltas


def _fold(state: dict[str, Any], d: Decision, leaf_index: int) -> None:
    for part in ("batch", "award", "export", "delivery"):
        if part in d.facts:
            state[part] = {**d.facts[part], "leaf_index": leaf_index}
    if "quote" in d.facts:
        quote = d.facts["quote"]
        state.setdefault("quotes", {})[quote["quote_id"]] = {**quote, "leaf_index": leaf_index}


def status_of(state: dict[str, Any]) -> str:
    delivery = state.get("delivery") or {}
    if delivery.get("installed") and delivery.get("accepted", 0) + delivery.get("failed", 0) >= delivery["installed"]:
        return "accepted"
    for stage, key in (("installed", "installed"), ("received", "received"), ("in_transit", "dispatched")):
        if delivery.get(key):
            return stage
    export = state.get("export")
    if export:
        return {
            "cleared": "cleared",
            "licensed": "cleared",
            "license_required": "license_required",
            "denied": "export_denied",
            "license_denied": "license_denied",
        }[export["status"]]
    if state.get("award"):
        return "export_pending"
    if state.get("quotes"):
        return "quoted"
    return "requested"


def summarize(view: Any) -> dict[str, Any]:
    """A batch's summary from its view (an ORM object or a Core row: the same attributes)."""
    state = json.loads(view.state)
    batch = state.get("batch") or {}
    award = state.get("award") or {}
    export = state.get("export") or {}
    delivery = state.get("delivery") or {}
    return {
        "batch_id": view.batch_id,
        "program_id": view.program_id,
        "status": view.status,
        "model": view.model,
        "site_id": batch.get("site_id") or award.get("site_id"),
        "requested": batch.get("quantity"),
        "vendor_id": view.vendor_id,
        "quantities": {
            "requested": batch.get("quantity"),
            "quoted": len(state.get("quotes") or {}),
            "awarded": award.get("quantity"),
            "export_cleared": export.get("cleared_quantity") if export.get("status") in ("cleared", "licensed") else 0,
            "dispatched": delivery.get("dispatched", 0),
            "in_transit": delivery.get("in_transit", 0),
            "received": delivery.get("received", 0),
            "damaged": delivery.get("damaged", 0),
            "installed": delivery.get("installed", 0),
            "accepted": delivery.get("accepted", 0),
            "failed": delivery.get("failed", 0),
        },
        "export": {
            "status": export.get("status"),
            "outcome": export.get("outcome"),
            "rule_version": export.get("rule_version"),
            "eccn": export.get("eccn"),
            "license_number": export.get("license_number"),
            # Rule version, group memberships, licence exceptions, screening snapshot and hits.
            "explanation": (export.get("decision") or {}).get("explanation"),
        }
        if export
        else None,
        "anomalies": view.anomalies,
        "last_leaf_index": view.last_leaf_index,
    }


# The API reads with SQLAlchemy Core on the tables (rows, not ORM objects): the same SQL for a
# fraction of the CPU per request. Rows have the columns as attributes, as the objects did.
BATCHES = BatchView.__table__.c  # type: ignore[attr-defined]
PARTIES = BatchParty.__table__.c  # type: ignore[attr-defined]
STEPS = BatchStep.__table__.c  # type: ignore[attr-defined]
Reader = AsyncConnection | AsyncSession


# The statements are built once per shape, their values bound at execution: building a select per
# request cost ~0.1-0.2 ms of CPU each (SQLAlchemy caches the compiled SQL, not the construct).


@functools.cache
def _batches_statement(given: frozenset[str]) -> Select[Any]:
    """The batches matching the `given` filters (bound by name), in batch_id order."""
    query = select(BatchView.__table__)  # type: ignore[call-overload]
    for name, column in (("status", BATCHES.status), ("vendor", BATCHES.vendor_id), ("model", BATCHES.model)):
        if name in given:
            query = query.where(column == bindparam(name))
    if "program_id" in given:
        query = query.where(BATCHES.program_id == bindparam("program_id"))
    if "partner" in given:
        parties = select(PARTIES.batch_id).where(PARTIES.party_id == bindparam("partner"))
        query = query.where(BATCHES.batch_id.in_(parties))
    if "after" in given:
        query = query.where(BATCHES.batch_id > bindparam("after"))
    return query.order_by(BATCHES.batch_id)


@functools.cache
def _page_statement(given: frozenset[str]) -> Select[Any]:
    return _batches_statement(given).limit(bindparam("limit")).offset(bindparam("offset"))


@functools.cache
def _count_statement(given: frozenset[str]) -> Select[Any]:
    return select(func.count()).select_from(_batches_statement(given).subquery())


def _given(after: str | None = None, **filters: str | None) -> dict[str, Any]:
    """The filters that filter: an empty one filters nothing, as before; `after` counts if given."""
    values: dict[str, Any] = {k: v for k, v in filters.items() if v}
    if after is not None:
        values["after"] = after
    return values


def batches_query(
    *,
    status: str | None = None,
    partner: str | None = None,
    vendor: str | None = None,
    model: str | None = None,
    program_id: str | None = None,
    after: str | None = None,
) -> Select[Any]:
    """The batches matching the filters, in batch_id order (the statement the API runs, with its
    values, for the plan test); `after`: only those past this batch id (keyset paging)."""
    values = _given(after, status=status, partner=partner, vendor=vendor, model=model, program_id=program_id)
    return _batches_statement(frozenset(values)).params(**values)


BATCH_BY_ID = select(BatchView.__table__).where(BATCHES.batch_id == bindparam("batch_id"))  # type: ignore[call-overload]
STEPS_OF_BATCH = select(STEPS.step).where(STEPS.batch_id == bindparam("batch_id")).order_by(STEPS.leaf_index)
PARTIES_OF_BATCH = select(PARTIES.party_id).where(PARTIES.batch_id == bindparam("batch_id"))


async def get_batch_row(conn: Reader, batch_id: str) -> Any:
    """One batch's view row (or None)."""
    return (await conn.execute(BATCH_BY_ID, {"batch_id": batch_id})).first()


async def list_batches(
    session: Reader,
    *,
    status: str | None = None,
    partner: str | None = None,
    vendor: str | None = None,
    model: str | None = None,
    program_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
    after: str | None = None,
    count: Callable[[str | None, str | None], Awaitable[int]] | None = None,
) -> tuple[int, list[Any]]:
    """A page of batches and how many match. `count(program_id, status)` answers the total from the
    running totals when only those two filters are given; otherwise the matches are counted."""
    values = _given(status=status, partner=partner, vendor=vendor, model=model, program_id=program_id)
    if count is not None and not (partner or vendor or model):
        total = await count(program_id, status)
    else:
        total = (await session.execute(_count_statement(frozenset(values)), values)).scalar_one()
    # The total counts every match; the page starts past `after`.
    if after is not None:
        values["after"] = after
    page = {**values, "limit": limit, "offset": offset}
    rows = (await session.execute(_page_statement(frozenset(values)), page)).all()
    return total, list(rows)


def steps_query(batch_id: str) -> Select[Any]:
    return STEPS_OF_BATCH.params(batch_id=batch_id)


async def batch_steps(session: Reader, batch_id: str) -> list[dict[str, Any]]:
    """The batch's timeline, in ledger order, from the small step rows (not the entries)."""
    return [json.loads(step) for (step,) in await session.execute(STEPS_OF_BATCH, {"batch_id": batch_id})]


def parties_query(batch_id: str) -> Select[Any]:
    return PARTIES_OF_BATCH.params(batch_id=batch_id)


async def batch_parties(session: Reader, batch_id: str) -> set[str]:
    rows = await session.execute(PARTIES_OF_BATCH, {"batch_id": batch_id})
    return {r for (r,) in rows}
