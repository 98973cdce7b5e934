"""The pledges service: partners' commitments of capital, GPUs and capacity (docs/architecture.md §5).

Reads `partner.pledges.v1`; every decision goes to its canonical topic and each partner's
outcome to `gputrace.outcomes.v1`, through the shared mechanism.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from sqlalchemy import select
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from services.pledges import domain
from shared.contract import PLEDGES_TOPIC, event_type
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Accepted, Verdict
from shared.contract.facts import PLEDGE
from shared.runtime import aggregates
from shared.runtime.consumer import Inbound
from shared.runtime.service import Service, run_service

SERVICE = "pledges"


class PledgeRow(SQLModel, table=True):
    __tablename__ = "pledges"

    pledge_id: str = Field(primary_key=True, max_length=200)
    partner_id: str = Field(index=True, max_length=200)
    state: str = Field(description="JSON snapshot of the pledge (domain.Pledge.snapshot)")


# The pledge rows as a table (SQLAlchemy Core): a batch writes them in one upsert, not an ORM
# object and a flush per pledge.
PLEDGES = PledgeRow.__table__  # type: ignore[attr-defined]
# The batch's pledge states by id (shared.runtime.aggregates.known): JSON text, None for no row.
_STATES = "pledges.states"


async def _state(session: AsyncSession, pledge_id: str) -> str | None:
    states = aggregates.known(session, _STATES)
    if states is not None and pledge_id in states:
        return states[pledge_id]
    state = await session.scalar(select(PLEDGES.c.state).where(PLEDGES.c.pledge_id == pledge_id))
    if states is not None:
        states[pledge_id] = state
    return state


def _handler(rule: Callable[[domain.Pledge | None, object], domain.Pledge], verb: str):  # type: ignore[no-untyped-def]
    async def handle(session: AsyncSession, inbound: Inbound) -> Verdict:
        pledge_id = inbound.aggregate_id
        stored = await _state(session, pledge_id)
        current = domain.Pledge.from_snapshot(stored) if stored else None
        try:
            pledge = rule(current, inbound.data)
        except domain.RuleBroken as broken:
            return broken.rejected()
        # Stored and published as the same typed fact: the snapshot is PledgeFacts' JSON
        # (tests/test_pledge_snapshot.py holds them equal), so it is not validated a second time.
        facts = pledge.snapshot()
        state = json.dumps(facts)
        states = aggregates.known(session, _STATES)
        if states is not None:
            states[pledge_id] = state  # a later record of the batch sees it before it is written
        row = {"pledge_id": pledge.pledge_id, "partner_id": pledge.partner_id, "state": state}
        await aggregates.upsert(session, PLEDGES, row, keys=("pledge_id",), update=("state",))
        return Accepted(message=f"pledge {pledge_id} {verb}", facts={PLEDGE: facts})

    return handle


async def prefetch(session: AsyncSession, events: Sequence[CloudEvent]) -> None:
    """The batch's pledge states in one query (every pledge event names its pledge_id)."""
    states = aggregates.known(session, _STATES)
    if states is None:
        return
    wanted = [i for i in dict.fromkeys(aggregates.strings(e.data.get("pledge_id") for e in events)) if i not in states]
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        among = aggregates.among(session, PLEDGES.c.pledge_id, chunk)
        query = select(PLEDGES.c.pledge_id, PLEDGES.c.state).where(among)
        rows = await session.execute(query)
        states.update({pledge_id: state for pledge_id, state in rows})
        for pledge_id in chunk:
            states.setdefault(pledge_id, None)


HANDLERS = {
    event_type("pledge.committed.v1"): _handler(domain.commit, "committed"),  # type: ignore[arg-type]
    event_type("pledge.amended.v1"): _handler(domain.amend, "amended"),  # type: ignore[arg-type]
    event_type("pledge.withdrawn.v1"): _handler(domain.withdraw, "withdrawn"),  # type: ignore[arg-type]
    event_type("pledge.disbursed.v1"): _handler(domain.disburse, "disbursement recorded"),  # type: ignore[arg-type]
}


def build() -> Service:
    return Service(
        SERVICE,
        tables=[PledgeRow.__table__],  # type: ignore[list-item]
        topics=[PLEDGES_TOPIC],
        partner_handlers=HANDLERS,
        prefetch=prefetch,
    )


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()
