"""Read models the ledger keeps beside its log, updated in the same transaction as each append.

They are derived data: every number here can be recomputed from the log's entries.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.batches import BATCH_TABLES, BatchParty, BatchView, project_batch
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Decision
from shared.contract.facts import PLEDGE, PledgeFacts
from shared.runtime import aggregates


class PledgeView(SQLModel, table=True):
    __tablename__ = "view_pledges"

    pledge_id: str = Field(primary_key=True, max_length=200)
    partner_id: str = Field(index=True, max_length=200)
    program_id: str = Field(index=True, max_length=200)
    earmark_batch_id: str | None = Field(default=None, index=True, max_length=500)
    version: int
    state: str
    leaf_index: int = Field(description="The ledger entry of the latest decision on this pledge")


PROJECTION_TABLES = [PledgeView.__table__, *BATCH_TABLES]


async def project(session: AsyncSession, decision: Decision, leaf_index: int) -> None:
    await project_batch(session, decision, leaf_index)
    if decision.status == "accepted" and decision.service == "pledges" and PLEDGE in decision.facts:
        pledge = PledgeFacts.model_validate(decision.facts[PLEDGE])
        await _project_pledge(session, pledge, leaf_index)
        batch = pledge.earmark_batch_id
        if batch and await aggregates.get(session, BatchParty, (batch, pledge.partner_id)) is None:
            session.add(BatchParty(batch_id=batch, party_id=pledge.partner_id))


async def _project_pledge(session: AsyncSession, pledge: PledgeFacts, leaf_index: int) -> None:
    view = await aggregates.get(session, PledgeView, pledge.pledge_id)
    # The view keeps the fact's JSON as it is in the ledger entry.
    state = json.dumps(pledge.model_dump(mode="json"))
    if view is None:
        session.add(
            PledgeView(
                pledge_id=pledge.pledge_id,
                partner_id=pledge.partner_id,
                program_id=pledge.program_id,
                earmark_batch_id=pledge.earmark_batch_id,
                version=pledge.version,
                state=state,
                leaf_index=leaf_index,
            )
        )
    elif pledge.version > view.version:
        # Versions, not arrival order, decide: the view never goes back in time.
        view.version = pledge.version
        view.earmark_batch_id = pledge.earmark_batch_id
        view.state = state
        view.leaf_index = leaf_index
        session.add(view)


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
    await aggregates.load(session, PledgeView, aggregates.strings(pledges))
    await aggregates.load(session, BatchView, aggregates.strings(batches))
    await aggregates.load_where(session, BatchParty, "batch_id", aggregates.strings(batches))


def _add(totals: dict[str, Decimal], money: dict[str, str] | None) -> None:
    if money:
        totals[money["currency"]] += Decimal(money["amount"])


async def program_summary(session: AsyncSession, target_gpus: int, program_id: str | None = None) -> dict[str, Any]:
    """Pledged capital, in-kind GPUs, capacity and disbursements, overall and by partner."""
    query = select(PledgeView)
    if program_id is not None:
        query = query.where(PledgeView.program_id == program_id)
    rows = (await session.execute(query)).scalars().all()
    overall = _Totals()
    by_partner: dict[str, _Totals] = defaultdict(_Totals)
    for row in rows:
        p = json.loads(row.state)
        for t in (overall, by_partner[p["partner_id"]]):
            t.add(p)
    return {
        "program_id": program_id,
        "target_gpus": target_gpus,
        **overall.as_dict(),
        "progress": {
            "gpus_pledged": overall.gpu_total,
            "fraction_of_target": round(overall.gpu_total / target_gpus, 4) if target_gpus else None,
        },
        "by_partner": {k: v.as_dict() for k, v in sorted(by_partner.items())},
    }


class _Totals:
    def __init__(self) -> None:
        self.capital: dict[str, Decimal] = defaultdict(Decimal)
        self.disbursed: dict[str, Decimal] = defaultdict(Decimal)
        self.gpus: dict[str, int] = defaultdict(int)
        self.gpu_hours = 0
        self.pledges = 0
        self.withdrawn = 0

    @property
    def gpu_total(self) -> int:
        return sum(self.gpus.values())

    def add(self, p: dict[str, Any]) -> None:
        # Money already disbursed counts even if the rest of the pledge was withdrawn.
        _add(self.disbursed, p.get("disbursed"))
        if p["status"] == "withdrawn":
            self.withdrawn += 1
            return
        self.pledges += 1
        _add(self.capital, p.get("capital"))
        if p.get("gpus"):
            self.gpus[p["gpus"]["model"]] += int(p["gpus"]["quantity"])
        if p.get("capacity"):
            self.gpu_hours += int(p["capacity"]["gpu_hours"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "pledges": self.pledges,
            "withdrawn": self.withdrawn,
            "capital": {c: str(a) for c, a in sorted(self.capital.items())},
            "disbursed": {c: str(a) for c, a in sorted(self.disbursed.items())},
            "gpus": dict(sorted(self.gpus.items())),
            "gpus_total": self.gpu_total,
            "capacity_gpu_hours": self.gpu_hours,
        }


async def batch_money(session: AsyncSession, batch_id: str, state: dict[str, Any]) -> dict[str, Any]:
    """Pledged (earmarked for this batch), disbursed of those, and awarded."""
    rows = (await session.execute(select(PledgeView).where(PledgeView.earmark_batch_id == batch_id))).scalars()
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
