"""Read models the ledger keeps beside its log, updated in the same transaction as each append.

They are derived data: every number here can be recomputed from the log's entries.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, Select, Text, bindparam, func, insert, literal, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel import Field, SQLModel, col
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.batches import (
    BATCH_TABLES,
    STAGES,
    AnomalyView,
    BatchParty,
    BatchStep,
    BatchView,
    Deltas,
    TotalKey,
    delivery_counts,
    project_batch,
    step_of,
)
from services.ledger.log import LogEntry
from shared.contract import fit
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Decision
from shared.contract.facts import PLEDGE, PledgeFacts
from shared.runtime import aggregates
from shared.runtime.db import session_factory

log = logging.getLogger(__name__)


class PledgeView(SQLModel, table=True):
    __tablename__ = "view_pledges"

    pledge_id: str = Field(primary_key=True, max_length=200)
    partner_id: str = Field(index=True, max_length=200)
    program_id: str = Field(index=True, max_length=200)
    earmark_batch_id: str | None = Field(default=None, index=True, max_length=500)
    version: int
    state: str
    leaf_index: int = Field(description="The ledger entry of the latest decision on this pledge")


class RunningTotal(SQLModel, table=True):
    """The programme's totals, kept as each decision is appended, so reading them costs a handful
    of indexed rows whatever the log's size. Scopes: `pledges` (by partner: pledges, withdrawn,
    capital and disbursed by currency, gpus by model, gpu_hours), `batches` (by stage), `gpus`
    (awarded, dispatched, received, ... summed over batches), `anomalies` (by code)."""

    __tablename__ = "view_totals"

    scope: str = Field(primary_key=True, max_length=20)
    program_id: str = Field(primary_key=True, max_length=200, description='"" when not known')
    party_id: str = Field(primary_key=True, max_length=200, description='"" for programme-wide totals')
    metric: str = Field(primary_key=True, max_length=60)
    unit: str = Field(primary_key=True, max_length=60, description='currency or GPU model; "" for counts')
    # Exact decimal text: money sums must not pass through a float (SQLite has no exact NUMERIC).
    value: str = Field(default="0", sa_column=Column(Text, nullable=False))


PROJECTION_TABLES = [PledgeView.__table__, RunningTotal.__table__, *BATCH_TABLES]

_WRITES = "gputrace.ledger.projection_writes"


@dataclass
class _BatchWrites:
    """What a batch of decisions adds to the running totals and the timelines, written in one
    statement per table by `flush` (at the end of the consumer's transaction)."""

    totals: dict[TotalKey, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    steps: list[dict[str, Any]] = field(default_factory=list)


def _writes(session: AsyncSession) -> _BatchWrites:
    writes = session.info.get(_WRITES)
    if writes is None:
        writes = session.info[_WRITES] = _BatchWrites()
    return writes


async def project(session: AsyncSession, decision: Decision, leaf_index: int) -> None:
    deltas = await project_batch(session, decision, leaf_index)
    if decision.status == "accepted" and decision.service == "pledges" and PLEDGE in decision.facts:
        pledge = PledgeFacts.model_validate(decision.facts[PLEDGE])
        deltas += await _project_pledge(session, pledge, leaf_index)
        batch = pledge.earmark_batch_id
        if batch and await aggregates.get(session, BatchParty, (batch, pledge.partner_id)) is None:
            session.add(BatchParty(batch_id=batch, party_id=pledge.partner_id))
    # Kept only once every part above succeeded, like the log entry the appender adds next.
    writes = _writes(session)
    for key, amount in deltas:
        writes.totals[key] += amount
    if decision.batch_id:
        writes.steps.append(
            {
                "leaf_index": leaf_index,
                "batch_id": fit(decision.batch_id, 200),
                "step": json.dumps(step_of(decision, leaf_index)),
            }
        )


def pledge_totals(p: dict[str, Any]) -> Deltas:
    """What one pledge (its facts as JSON) adds to its partner's totals."""
    scope = ("pledges", p["program_id"][:200], p["partner_id"][:200])
    out: Deltas = []
    # Money already disbursed counts even if the rest of the pledge was withdrawn.
    if p.get("disbursed"):
        out.append(((*scope, "disbursed", p["disbursed"]["currency"]), Decimal(p["disbursed"]["amount"])))
    if p["status"] == "withdrawn":
        out.append(((*scope, "withdrawn", ""), 1))
        return out
    out.append(((*scope, "pledges", ""), 1))
    if p.get("capital"):
        out.append(((*scope, "capital", p["capital"]["currency"]), Decimal(p["capital"]["amount"])))
    if p.get("gpus"):
        out.append(((*scope, "gpus", p["gpus"]["model"][:60]), int(p["gpus"]["quantity"])))
    if p.get("capacity"):
        out.append(((*scope, "gpu_hours", ""), int(p["capacity"]["gpu_hours"])))
    return out


# The pledge views as a table: a batch writes them with one upsert (shared.runtime.aggregates),
# not an ORM object and flush per decision; the batch reads (version, state) from a plain dict.
_PLEDGE_VIEWS = PledgeView.__table__  # type: ignore[attr-defined]
_VIEWS = "ledger.pledge_views"
_VIEW_UPDATES = ("earmark_batch_id", "version", "state", "leaf_index")


async def _pledge_view(session: AsyncSession, pledge_id: str) -> tuple[int, str] | None:
    """(version, state) of a pledge's view, from the batch's dict when the prefetch has it."""
    views = aggregates.known(session, _VIEWS)
    if views is not None and pledge_id in views:
        return views[pledge_id]
    t = _PLEDGE_VIEWS.c
    row = (await session.execute(select(t.version, t.state).where(t.pledge_id == pledge_id))).first()
    view = (row.version, row.state) if row is not None else None
    if views is not None:
        views[pledge_id] = view
    return view


async def _project_pledge(session: AsyncSession, pledge: PledgeFacts, leaf_index: int) -> Deltas:
    view = await _pledge_view(session, pledge.pledge_id)
    if view is not None and pledge.version <= view[0]:
        return []  # versions, not arrival order, decide: the view never goes back in time
    # The view keeps the fact's JSON as it is in the ledger entry.
    doc = pledge.model_dump(mode="json")
    state = json.dumps(doc)
    row = {
        "pledge_id": pledge.pledge_id,
        "partner_id": pledge.partner_id,
        "program_id": pledge.program_id,
        "earmark_batch_id": pledge.earmark_batch_id,
        "version": pledge.version,
        "state": state,
        "leaf_index": leaf_index,
    }
    await aggregates.upsert(session, _PLEDGE_VIEWS, row, keys=("pledge_id",), update=_VIEW_UPDATES)
    views = aggregates.known(session, _VIEWS)
    if views is not None:
        views[pledge.pledge_id] = (pledge.version, state)  # a later decision of the batch sees it
    if view is None:
        return pledge_totals(doc)
    return [*pledge_totals(doc), *((k, -v) for k, v in pledge_totals(json.loads(view[1])))]


async def flush(session: AsyncSession) -> None:
    """Write the batch's timeline steps (one INSERT) and totals (one read, one upsert). The ledger
    has one writer at a time (the log's lock), so reading then writing a total is safe."""
    writes: _BatchWrites | None = session.info.pop(_WRITES, None)
    if writes is None:
        return
    if writes.steps:
        await session.execute(insert(BatchStep), writes.steps)
    changed = {k: v for k, v in writes.totals.items() if v}
    if changed:
        await add_totals(session, changed)


_KEY = (RunningTotal.scope, RunningTotal.program_id, RunningTotal.party_id, RunningTotal.metric, RunningTotal.unit)


async def add_totals(session: AsyncSession, deltas: dict[TotalKey, Decimal]) -> None:
    keys = sorted(deltas)
    current: dict[TotalKey, Decimal] = {}
    for start in range(0, len(keys), 200):
        chunk = keys[start : start + 200]
        rows = await session.execute(select(*_KEY, RunningTotal.value).where(tuple_(*_KEY).in_(chunk)))
        current.update({tuple(r[:5]): Decimal(r[5]) for r in rows})  # type: ignore[misc]
    values = [
        dict(
            zip(("scope", "program_id", "party_id", "metric", "unit"), k, strict=True),
            value=_text(current.get(k, Decimal(0)) + d),
        )
        for k, d in deltas.items()
    ]
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    upsert = (pg_insert if dialect == "postgresql" else sqlite_insert)(RunningTotal)
    stmt = upsert.on_conflict_do_update(index_elements=[c.key for c in _KEY], set_={"value": upsert.excluded.value})
    await session.execute(stmt, values)


def _text(d: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 180000000000, 1.5."""
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "") else text


async def prefetch(session: AsyncSession, events: Sequence[CloudEvent]) -> None:
    """The views a batch of decisions will update, in three queries: the pledge views of
    accepted pledge decisions, the batch views of the others, and every party row of those
    batches (so a party not yet recorded is known to be missing)."""
    pledges: list[Any] = []
    batches: list[Any] = []
    for event in events:
        decision = event.data
        facts = decision.get("facts")
        pledge = facts.get(PLEDGE) if isinstance(facts, dict) else None
        if decision.get("service") != "pledges":
            batches.append(decision.get("batch_id"))
        elif isinstance(pledge, dict):
            pledges.append(pledge.get("pledge_id"))
            batches.append(pledge.get("earmark_batch_id"))
    views = aggregates.known(session, _VIEWS)
    wanted = [p for p in dict.fromkeys(aggregates.strings(pledges)) if views is not None and p not in views]
    t = _PLEDGE_VIEWS.c
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        query = select(t.pledge_id, t.version, t.state).where(aggregates.among(session, t.pledge_id, chunk))
        rows = await session.execute(query)
        views.update({r.pledge_id: (r.version, r.state) for r in rows})  # type: ignore[union-attr]
        for pledge_id in chunk:
            views.setdefault(pledge_id, None)  # type: ignore[union-attr]
    await aggregates.load(session, BatchView, aggregates.strings(batches))
    await aggregates.load_where(session, BatchParty, "batch_id", aggregates.strings(batches))


# The API's reads select the tables' columns (Core rows, not ORM objects): less CPU per request.
TOTALS = RunningTotal.__table__.c  # type: ignore[attr-defined]
PLEDGES = PledgeView.__table__.c  # type: ignore[attr-defined]
Reader = AsyncConnection | AsyncSession


# The read statements are built once, their values bound at execution: building a select per request
# cost ~0.1-0.2 ms of CPU each (SQLAlchemy caches the compiled SQL, not the construct). The *_query
# builders give the same statement with values, for the plan test.
@functools.cache
def _totals_statement(scopes: tuple[str, ...], by_program: bool, by_metric: bool = False) -> Select[Any]:
    # One bound value per scope (not an expanding IN): the set is fixed per statement.
    query = select(RunningTotal.__table__).where(TOTALS.scope.in_([literal(s) for s in scopes]))  # type: ignore[call-overload]
    if by_program:
        query = query.where(TOTALS.program_id == bindparam("program_id"))
    if by_metric:
        query = query.where(TOTALS.metric == bindparam("metric"))
    return query


def totals_query(scopes: Sequence[str], program_id: str | None = None) -> Select[Any]:
    statement = _totals_statement(tuple(scopes), program_id is not None)
    return statement.params(program_id=program_id) if program_id is not None else statement


async def program_summary(session: Reader, target_gpus: int, program_id: str | None = None) -> dict[str, Any]:
    """Pledged capital, in-kind GPUs, capacity and disbursements, overall and by partner; batches by
    stage, GPUs through the pipeline and anomalies by code. From the running totals: a few dozen
    indexed rows, whatever the size of the programme."""
    statement = _totals_statement(("pledges", "batches", "gpus", "anomalies"), program_id is not None)
    rows = (await session.execute(statement, {"program_id": program_id})).all()
    overall = _Totals()
    by_partner: dict[str, _Totals] = defaultdict(_Totals)
    stages: dict[str, int] = defaultdict(int)
    gpus: dict[str, int] = defaultdict(int)
    anomalies: dict[str, int] = defaultdict(int)
    for row in rows:
        value = Decimal(row.value)
        if row.scope == "pledges":
            for t in (overall, by_partner[row.party_id]):
                t.add(row.metric, row.unit, value)
        elif row.scope == "batches":
            stages[row.metric] += int(value)
        elif row.scope == "gpus":
            gpus[row.metric] += int(value)
        else:
            anomalies[row.metric] += int(value)
    return {
        "program_id": program_id,
        "target_gpus": target_gpus,
        **overall.as_dict(),
        "progress": {
            "gpus_pledged": overall.gpu_total,
            "fraction_of_target": round(overall.gpu_total / target_gpus, 4) if target_gpus else None,
        },
        "by_partner": {k: v.as_dict() for k, v in sorted(by_partner.items()) if not v.empty()},
        "batches_by_stage": {s: stages[s] for s in STAGES if stages.get(s)},
        "batches_total": sum(stages.values()),
        "pipeline_gpus": {
            k: gpus.get(k, 0)
            for k in ("awarded", "dispatched", "received", "damaged", "installed", "accepted", "failed")
        },
        "anomalies_by_code": {k: v for k, v in sorted(anomalies.items()) if v},
    }


async def batch_count(session: Reader, program_id: str | None, status: str | None) -> int:
    """How many batches, from the running totals (the count GET /v1/batches reports)."""
    statement = _totals_statement(("batches",), program_id is not None, status is not None)
    rows = (await session.execute(statement, {"program_id": program_id, "metric": status})).all()
    return sum(int(Decimal(r.value)) for r in rows)


class _Totals:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str], Decimal] = defaultdict(Decimal)

    def add(self, metric: str, unit: str, value: Decimal) -> None:
        self.values[(metric, unit)] += value

    def _by_unit(self, metric: str) -> dict[str, Decimal]:
        return {u: v for (m, u), v in sorted(self.values.items()) if m == metric and v}

    @property
    def gpu_total(self) -> int:
        return int(sum(self._by_unit("gpus").values()))

    def empty(self) -> bool:
        return not any(self.values.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "pledges": int(self.values[("pledges", "")]),
            "withdrawn": int(self.values[("withdrawn", "")]),
            "capital": {c: _text(a) for c, a in self._by_unit("capital").items()},
            "disbursed": {c: _text(a) for c, a in self._by_unit("disbursed").items()},
            "gpus": {m: int(n) for m, n in self._by_unit("gpus").items()},
            "gpus_total": self.gpu_total,
            "capacity_gpu_hours": int(self.values[("gpu_hours", "")]),
        }


EARMARKED = select(PLEDGES.state).where(PLEDGES.earmark_batch_id == bindparam("batch_id"))
PLEDGE_BY_ID = select(PLEDGES.partner_id, PLEDGES.state, PLEDGES.leaf_index).where(
    PLEDGES.pledge_id == bindparam("pledge_id")
)


def earmarked_query(batch_id: str) -> Select[Any]:
    return EARMARKED.params(batch_id=batch_id)


def pledge_query(pledge_id: str) -> Select[Any]:
    return PLEDGE_BY_ID.params(pledge_id=pledge_id)


async def batch_money(session: Reader, batch_id: str, state: dict[str, Any]) -> dict[str, Any]:
    """Pledged (earmarked for this batch), disbursed of those, and awarded."""
    rows = (await session.execute(EARMARKED, {"batch_id": batch_id})).all()
    earmarked: dict[str, Any] = {}
    disbursed: dict[str, Any] = {}
    pledges = []
    for row in rows:
        p = json.loads(row.state)
        pledges.append(p["pledge_id"])
        if p["status"] == "active" and p.get("capital"):
            c = p["capital"]
            earmarked[c["currency"]] = str(Decimal(earmarked.get(c["currency"], "0")) + Decimal(c["amount"]))
        if p.get("disbursed"):
            m = p["disbursed"]
            disbursed[m["currency"]] = str(Decimal(disbursed.get(m["currency"], "0")) + Decimal(m["amount"]))
    award = state.get("award") or {}
    return {
        "earmarked": earmarked,
        "disbursed": disbursed,
        "awarded": award.get("total_price"),
        "unit_price": award.get("unit_price"),
        "pledges": sorted(pledges),
    }


ANALYSED_TABLES = (
    "log_entries",
    "log_nodes",
    "view_batch_steps",
    "view_pledges",
    "view_batches",
    "view_batch_parties",
    "view_anomalies",
)


class Statistics:
    """Refreshes the planner's statistics (ANALYZE) when the log has grown by a fifth (and at least
    1,000 entries) since the last time: bulk appends outrun autovacuum, and a planner that still
    thinks a table is empty picks plans that walk it. Geometric, so O(log n) times in all."""

    GROWTH = 1.2
    MIN_NEW = 1000

    def __init__(self) -> None:
        self.analysed_at: int | None = None
        self.runs = 0

    async def refresh(self, session: AsyncSession, size: int) -> bool:
        if session.bind is None or session.bind.dialect.name != "postgresql":
            return False
        if self.analysed_at is None:
            # After a restart: what the statistics say now (-1 or 0 when never analysed).
            estimate = await session.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'log_entries'"))
            self.analysed_at = max(int(estimate or 0), 0)
        if size < self.analysed_at * self.GROWTH + self.MIN_NEW:
            return False
        # Inside the batch's transaction: ANALYZE takes no lock that blocks readers or writers.
        await session.execute(text(f"ANALYZE {', '.join(ANALYSED_TABLES)}"))
        self.analysed_at = size
        self.runs += 1
        return True


def recompute_totals(
    pledges: Sequence[PledgeView], batches: Sequence[BatchView], anomalies: Sequence[AnomalyView]
) -> dict[TotalKey, Decimal]:
    """The running totals from scratch, from the views (to check them, or to fill them once for a
    ledger kept before they existed). An anomaly counts under its batch's programme."""
    totals: dict[TotalKey, Decimal] = defaultdict(Decimal)
    programs = {}
    for b in batches:
        state = json.loads(b.state)
        program = b.program_id or ""
        programs[b.batch_id] = program
        totals[("batches", program, "", b.status, "")] += 1
        for k, n in delivery_counts(state).items():
            totals[("gpus", program, "", k, "")] += n
    for p in pledges:
        for key, amount in pledge_totals(json.loads(p.state)):
            totals[key] += amount
    for a in anomalies:
        totals[("anomalies", programs.get(a.batch_id or "", ""), "", a.code[:60], "")] += 1
    return {k: v for k, v in totals.items() if v}


async def stored_totals(session: AsyncSession) -> dict[TotalKey, Decimal]:
    rows = (await session.execute(select(RunningTotal))).scalars()
    return {(r.scope, r.program_id, r.party_id, r.metric, r.unit): Decimal(r.value) for r in rows if Decimal(r.value)}


async def backfill(session: AsyncSession) -> None:
    """Fill the running totals and timeline steps of a ledger kept before they existed (once, at
    start-up; they are then kept by each append). Reads the views and entries a chunk at a time."""
    if await session.scalar(select(func.count()).select_from(RunningTotal)) == 0:
        pledges = (await session.execute(select(PledgeView))).scalars().all()
        batches = (await session.execute(select(BatchView))).scalars().all()
        anomalies = (await session.execute(select(AnomalyView))).scalars().all()
        totals = recompute_totals(pledges, batches, anomalies)
        if totals:
            await add_totals(session, totals)
    if await session.scalar(select(BatchStep.leaf_index).limit(1)) is None:
        after = -1
        while True:
            rows = (
                await session.execute(
                    select(LogEntry.leaf_index, LogEntry.batch_id, LogEntry.entry)
                    .where(col(LogEntry.batch_id).is_not(None), col(LogEntry.leaf_index) > after)
                    .order_by(col(LogEntry.leaf_index))
                    .limit(1000)
                )
            ).all()
            if not rows:
                break
            steps = []
            for index, batch_id, entry in rows:
                step = step_of(Decision.model_validate_json(entry), index)
                steps.append({"leaf_index": index, "batch_id": batch_id, "step": json.dumps(step)})
            await session.execute(insert(BatchStep), steps)
            after = rows[-1][0]


async def backfill_projections(engine: AsyncEngine) -> None:
    """`gputrace migrate --service ledger`: the running totals and timeline steps of a ledger kept
    before they existed (its indexes come from the migrations)."""
    async with session_factory(engine)() as session, session.begin():
        await backfill(session)
