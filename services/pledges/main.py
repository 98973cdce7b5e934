"""The pledges service: partners' commitments of capital, GPUs and capacity (docs/architecture.md §5).

Reads `partner.pledges.v1`; every decision goes to its canonical topic and each partner's
outcome to `gputrace.outcomes.v1`, through the shared mechanism.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

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


def _handler(rule: Callable[[domain.Pledge | None, object], domain.Pledge], verb: str):  # type: ignore[no-untyped-def]
    async def handle(session: AsyncSession, inbound: Inbound) -> Verdict:
        pledge_id = inbound.aggregate_id
        row = await aggregates.get(session, PledgeRow, pledge_id)
        current = domain.Pledge.from_snapshot(json.loads(row.state)) if row else None
        try:
            pledge = rule(current, inbound.data)
        except domain.RuleBroken as broken:
            return broken.rejected()
        # Stored and published as the same typed fact (shared.contract.facts.PledgeFacts).
        facts = pledge.facts().model_dump(mode="json")
        state = json.dumps(facts)
        if row is None:
            session.add(PledgeRow(pledge_id=pledge.pledge_id, partner_id=pledge.partner_id, state=state))
        else:
            row.state = state
        return Accepted(message=f"pledge {pledge_id} {verb}", facts={PLEDGE: facts})

    return handle


async def prefetch(session: AsyncSession, events: Sequence[CloudEvent]) -> None:
    """The batch's pledges in one query (every pledge event names its pledge_id)."""
    await aggregates.load(session, PledgeRow, aggregates.strings(e.data.get("pledge_id") for e in events))


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
