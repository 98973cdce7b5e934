"""The pledges service stores and publishes `Pledge.snapshot()` as the pledge's facts without
validating it as PledgeFacts a second time (services/pledges/main.py): that is only right while
the snapshot IS PledgeFacts' JSON, byte for byte, for every pledge the rules can produce."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.pledges import domain
from shared.contract import GPU_MODELS, PledgeAmended, PledgeCommitted, PledgeDisbursed, PledgeWithdrawn
from shared.contract.facts import PledgeFacts

amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1e12"), places=2).map(str)
currencies = st.sampled_from(["KRW", "USD", "EUR"])
terms = st.one_of(
    st.builds(lambda a, c: ("capital", {"capital": {"amount": a, "currency": c}}), amounts, currencies),
    st.builds(
        lambda m, q: ("gpus", {"gpus": {"model": m, "quantity": q}}),
        st.sampled_from(sorted(GPU_MODELS)),
        st.integers(1, 100_000),
    ),
    st.builds(lambda h: ("capacity", {"capacity": {"gpu_hours": h}}), st.integers(1, 10**9)),
)
ids = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=20)


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value)


def _as_facts(pledge: domain.Pledge) -> str:
    return _json(PledgeFacts.model_validate(pledge.snapshot()).model_dump(mode="json"))


@settings(max_examples=150, deadline=None)
@given(
    term=terms,
    pledge_id=ids,
    earmark=st.one_of(st.none(), ids),
    steps=st.lists(st.sampled_from(["amend", "disburse", "withdraw"]), max_size=4),
)
def test_a_pledge_snapshot_is_its_facts_json(
    term: tuple[str, dict[str, Any]], pledge_id: str, earmark: str | None, steps: list[str]
) -> None:
    kind, fields = term
    base = {"pledge_id": pledge_id, "partner_id": "kdb"}
    pledge = domain.commit(
        None,
        PledgeCommitted.model_validate(
            {
                **base,
                "program_id": "p",
                "kind": kind,
                **fields,
                "earmark_batch_id": earmark,
                "committed_at": "2025-03-01T09:00:00Z",
                "due_by": "2025-12-31",
            }
        ),
    )
    assert _json(pledge.snapshot()) == _as_facts(pledge)
    for step in steps:
        try:
            if step == "amend":
                pledge = domain.amend(pledge, PledgeAmended.model_validate({**base, **fields, "reason": "r"}))
            elif step == "disburse" and pledge.capital is not None:
                money = {"amount": "0.01", "currency": pledge.capital.currency}
                pledge = domain.disburse(
                    pledge, PledgeDisbursed.model_validate({**base, "amount": money, "reference": "r"})
                )
            elif step == "withdraw":
                pledge = domain.withdraw(pledge, PledgeWithdrawn.model_validate({**base, "reason": "r"}))
        except domain.RuleBroken:
            continue
        assert _json(pledge.snapshot()) == _as_facts(pledge)
        # And it reads back as the same pledge (the stored state is the snapshot's JSON).
        assert domain.Pledge.from_snapshot(_json(pledge.snapshot())) == pledge
