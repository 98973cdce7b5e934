"""The pledge rules of docs/architecture.md §5, on the pure domain (services/pledges/domain.py: no Kafka, no SQL).

Each refusal test starts from an event that would be accepted and breaks exactly one thing, so
removing the rule makes the test fail; the acceptance tests pin the boundaries (a disbursement
of exactly the remainder, an amendment down to exactly what was disbursed).
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from services.pledges import domain
from services.pledges.domain import Pledge, RuleBroken
from shared.contract import PledgeAmended, PledgeCommitted, PledgeDisbursed, PledgeWithdrawn, ReasonCode

OWNER = "nhn-cloud"
OTHER = "kakao"
PLEDGE_ID = "P-1"

TERMS: dict[str, dict[str, Any]] = {
    "capital": {"capital": {"amount": "1000", "currency": "KRW"}},
    "gpus": {"gpus": {"model": "B200", "quantity": 100}},
    "capacity": {"capacity": {"gpu_hours": 50000}},
}


# --- events ---------------------------------------------------------------------------------


def committed(kind: str = "capital", **changes: Any) -> PledgeCommitted:
    data: dict[str, Any] = {
        "pledge_id": PLEDGE_ID,
        "partner_id": OWNER,
        "program_id": "kr-ai-10k",
        "kind": kind,
        **TERMS[kind],
        "earmark_batch_id": "B-1",
        "committed_at": "2025-03-01T09:00:00Z",
        "due_by": "2025-12-31",
    }
    return PledgeCommitted.model_validate({**data, **changes})


def amended(**changes: Any) -> PledgeAmended:
    data: dict[str, Any] = {"pledge_id": PLEDGE_ID, "partner_id": OWNER, "reason": "second tranche"}
    return PledgeAmended.model_validate({**data, **changes})


def withdrawn(**changes: Any) -> PledgeWithdrawn:
    data: dict[str, Any] = {"pledge_id": PLEDGE_ID, "partner_id": OWNER, "reason": "budget cut"}
    return PledgeWithdrawn.model_validate({**data, **changes})


def disbursed(amount: str, currency: str = "KRW", **changes: Any) -> PledgeDisbursed:
    data: dict[str, Any] = {
        "pledge_id": PLEDGE_ID,
        "partner_id": OWNER,
        "amount": {"amount": amount, "currency": currency},
        "reference": "TR-1",
    }
    return PledgeDisbursed.model_validate({**data, **changes})


def money(amount: str, currency: str = "KRW") -> dict[str, str]:
    return {"amount": amount, "currency": currency}


# --- pledges as they stand --------------------------------------------------------------------


def pledge(kind: str = "capital") -> Pledge:
    """A fresh pledge of 1000 KRW (or 100 B200, or 50,000 GPU-hours), committed by its owner."""
    return domain.commit(None, committed(kind))


def partly_disbursed(amount: str = "600") -> Pledge:
    return domain.disburse(pledge(), disbursed(amount))


def refused(code: ReasonCode, call: Any, *args: Any) -> RuleBroken:
    with pytest.raises(RuleBroken) as caught:
        call(*args)
    assert caught.value.code == code, caught.value.message
    assert caught.value.message
    return caught.value


# --- commit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["capital", "gpus", "capacity"])
def test_a_pledge_of_each_kind_is_committed_active_at_version_1(kind: str) -> None:
    p = pledge(kind)
    assert (p.pledge_id, p.partner_id, p.kind, p.status, p.version) == (PLEDGE_ID, OWNER, kind, "active", 1)
    assert p.disbursed == 0
    assert p.earmark_batch_id == "B-1"
    held = {"capital": p.capital, "gpus": p.gpus, "capacity": p.capacity}
    assert [k for k, v in held.items() if v is not None] == [kind]


def test_a_pledge_id_is_committed_once() -> None:
    refused(ReasonCode.DUPLICATE_PLEDGE, domain.commit, pledge(), committed(capital=money("5")))


@pytest.mark.parametrize("kind", ["capital", "gpus", "capacity"])
def test_a_pledge_needs_the_field_of_its_kind(kind: str) -> None:
    event = committed(kind, **{kind: None})
    refused(ReasonCode.SCHEMA_INVALID, domain.commit, None, event)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("capital", "gpus"), ("capital", "capacity"), ("gpus", "capital"), ("capacity", "gpus")],
)
def test_a_pledge_carries_no_field_of_another_kind(kind: str, extra: str) -> None:
    event = committed(kind, **TERMS[extra])
    refused(ReasonCode.SCHEMA_INVALID, domain.commit, None, event)


@pytest.mark.parametrize("amount", ["0", "-1", "-0.000001"])
def test_pledged_capital_is_positive(amount: str) -> None:
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.commit, None, committed(capital=money(amount)))


def test_the_smallest_positive_capital_is_accepted() -> None:
    assert domain.commit(None, committed(capital=money("0.000001"))).capital is not None


@pytest.mark.parametrize("quantity", [0, -5])
def test_pledged_gpus_are_positive(quantity: int) -> None:
    event = committed("gpus", gpus={"model": "B200", "quantity": quantity})
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.commit, None, event)


@pytest.mark.parametrize("hours", [0, -1])
def test_pledged_capacity_is_positive(hours: int) -> None:
    event = committed("capacity", capacity={"gpu_hours": hours})
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.commit, None, event)


@pytest.mark.parametrize("currency", ["XYZ", "KRX"])
def test_pledged_capital_is_in_a_known_currency(currency: str) -> None:
    refused(ReasonCode.CURRENCY_UNKNOWN, domain.commit, None, committed(capital=money("1000", currency)))


@pytest.mark.parametrize("model", ["B300", "b200", "H100"])
def test_pledged_gpus_are_of_a_catalogued_model(model: str) -> None:
    event = committed("gpus", gpus={"model": model, "quantity": 10})
    refused(ReasonCode.UNKNOWN_MODEL, domain.commit, None, event)


@pytest.mark.parametrize("model", ["A100-SXM", "H100-SXM", "H200-SXM", "H20", "L40S", "B200", "GB200"])
def test_every_catalogued_model_may_be_pledged(model: str) -> None:
    p = domain.commit(None, committed("gpus", gpus={"model": model, "quantity": 1}))
    assert p.gpus is not None and p.gpus.model == model


# --- who may touch a pledge ---------------------------------------------------------------------


def test_amending_an_unknown_pledge_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_PLEDGE, domain.amend, None, amended(due_by="2026-06-30"))


def test_withdrawing_an_unknown_pledge_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_PLEDGE, domain.withdraw, None, withdrawn())


def test_disbursing_an_unknown_pledge_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_PLEDGE, domain.disburse, None, disbursed("1"))


def test_only_the_owner_amends() -> None:
    refused(ReasonCode.NOT_AUTHORIZED, domain.amend, pledge(), amended(partner_id=OTHER, capital=money("1")))


def test_only_the_owner_withdraws() -> None:
    refused(ReasonCode.NOT_AUTHORIZED, domain.withdraw, pledge(), withdrawn(partner_id=OTHER))


def test_only_the_owner_disburses() -> None:
    refused(ReasonCode.NOT_AUTHORIZED, domain.disburse, pledge(), disbursed("1", partner_id=OTHER))


def test_a_withdrawn_pledge_is_not_amended() -> None:
    gone = domain.withdraw(pledge(), withdrawn())
    refused(ReasonCode.PLEDGE_WITHDRAWN, domain.amend, gone, amended(capital=money("2000")))


def test_a_withdrawn_pledge_is_not_withdrawn_again() -> None:
    gone = domain.withdraw(pledge(), withdrawn())
    refused(ReasonCode.PLEDGE_WITHDRAWN, domain.withdraw, gone, withdrawn())


def test_a_withdrawn_pledge_is_not_disbursed() -> None:
    gone = domain.withdraw(pledge(), withdrawn())
    refused(ReasonCode.PLEDGE_WITHDRAWN, domain.disburse, gone, disbursed("1"))


# --- amend --------------------------------------------------------------------------------------


def test_an_amendment_changes_what_it_names_and_keeps_the_rest() -> None:
    before = partly_disbursed("600")
    after = domain.amend(before, amended(capital=money("1500")))
    assert after.capital is not None and after.capital.amount == Decimal("1500")
    assert (after.due_by, after.earmark_batch_id, after.disbursed) == (before.due_by, "B-1", Decimal("600"))
    moved = domain.amend(after, amended(earmark_batch_id="B-2", due_by="2026-06-30"))
    assert (moved.earmark_batch_id, moved.due_by) == ("B-2", "2026-06-30")
    assert moved.capital == after.capital


def test_an_amendment_may_not_bring_a_field_of_another_kind() -> None:
    refused(ReasonCode.SCHEMA_INVALID, domain.amend, pledge(), amended(**TERMS["gpus"]))


def test_an_amended_capital_is_positive() -> None:
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.amend, pledge(), amended(capital=money("0")))


def test_an_amended_capital_is_in_a_known_currency() -> None:
    refused(ReasonCode.CURRENCY_UNKNOWN, domain.amend, pledge(), amended(capital=money("2000", "XYZ")))


def test_an_amendment_keeps_the_pledge_currency() -> None:
    refused(ReasonCode.CURRENCY_MISMATCH, domain.amend, pledge(), amended(capital=money("2000", "USD")))


def test_an_amended_gpu_pledge_is_positive_and_catalogued() -> None:
    gpus = pledge("gpus")
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.amend, gpus, amended(gpus={"model": "B200", "quantity": 0}))
    refused(ReasonCode.UNKNOWN_MODEL, domain.amend, gpus, amended(gpus={"model": "B300", "quantity": 10}))
    grown = domain.amend(gpus, amended(gpus={"model": "GB200", "quantity": 120}))
    assert grown.gpus is not None and (grown.gpus.model, grown.gpus.quantity) == ("GB200", 120)


def test_an_amended_capacity_is_positive() -> None:
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.amend, pledge("capacity"), amended(capacity={"gpu_hours": 0}))


def test_an_amendment_may_not_go_below_what_was_disbursed() -> None:
    below = amended(capital=money("599.99"))
    refused(ReasonCode.AMENDMENT_BELOW_DISBURSED, domain.amend, partly_disbursed("600"), below)


def test_an_amendment_down_to_exactly_what_was_disbursed_is_accepted() -> None:
    after = domain.amend(partly_disbursed("600"), amended(capital=money("600")))
    assert after.capital is not None and after.capital.amount == after.disbursed == Decimal("600")


# --- withdraw -----------------------------------------------------------------------------------


def test_a_withdrawal_marks_the_pledge_withdrawn_and_keeps_its_record() -> None:
    before = partly_disbursed("250")
    gone = domain.withdraw(before, withdrawn())
    assert gone.status == "withdrawn"
    assert (gone.capital, gone.disbursed) == (before.capital, Decimal("250"))


# --- disburse -----------------------------------------------------------------------------------


def test_only_capital_is_disbursed() -> None:
    refused(ReasonCode.SCHEMA_INVALID, domain.disburse, pledge("gpus"), disbursed("1"))


@pytest.mark.parametrize("amount", ["0", "-100"])
def test_a_disbursement_is_positive(amount: str) -> None:
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.disburse, pledge(), disbursed(amount))


def test_a_disbursement_is_in_a_known_currency() -> None:
    refused(ReasonCode.CURRENCY_UNKNOWN, domain.disburse, pledge(), disbursed("100", "XYZ"))


def test_a_disbursement_is_in_the_pledge_currency() -> None:
    refused(ReasonCode.CURRENCY_MISMATCH, domain.disburse, pledge(), disbursed("100", "USD"))


def test_a_single_disbursement_may_not_exceed_the_pledge() -> None:
    refused(ReasonCode.DISBURSEMENT_EXCEEDS_PLEDGE, domain.disburse, pledge(), disbursed("1000.000001"))


def test_disbursements_add_up_and_may_not_exceed_the_pledge_together() -> None:
    p = partly_disbursed("600")
    assert p.disbursed == Decimal("600")
    refused(ReasonCode.DISBURSEMENT_EXCEEDS_PLEDGE, domain.disburse, p, disbursed("400.01"))


def test_disbursing_exactly_the_remainder_is_accepted() -> None:
    p = domain.disburse(partly_disbursed("600"), disbursed("400"))
    assert p.capital is not None and p.disbursed == p.capital.amount == Decimal("1000")
    refused(ReasonCode.DISBURSEMENT_EXCEEDS_PLEDGE, domain.disburse, p, disbursed("0.000001"))


def test_the_limit_follows_an_amended_pledge() -> None:
    p = domain.amend(partly_disbursed("600"), amended(capital=money("700")))
    refused(ReasonCode.DISBURSEMENT_EXCEEDS_PLEDGE, domain.disburse, p, disbursed("100.01"))
    assert domain.disburse(p, disbursed("100")).disbursed == Decimal("700")


# --- versions -----------------------------------------------------------------------------------


def test_every_accepted_change_increments_the_version_by_one() -> None:
    p = pledge()
    assert p.version == 1
    p = domain.amend(p, amended(due_by="2026-06-30"))
    assert p.version == 2
    p = domain.disburse(p, disbursed("100"))
    assert p.version == 3
    p = domain.amend(p, amended(capital=money("1200")))
    assert p.version == 4
    p = domain.withdraw(p, withdrawn())
    assert p.version == 5


def test_a_version_increments_from_where_the_pledge_stands() -> None:
    # Versions are what other services order pledge snapshots by: never reset, never skipped.
    p = replace(pledge(), version=41)
    assert domain.amend(p, amended(due_by="2026-01-31")).version == 42
    assert domain.disburse(p, disbursed("1")).version == 42
    assert domain.withdraw(p, withdrawn()).version == 42


# --- snapshots ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["capital", "gpus", "capacity"])
def test_a_snapshot_reads_back_as_the_same_pledge(kind: str) -> None:
    p = pledge(kind)
    if kind == "capital":
        p = domain.disburse(p, disbursed("123.45"))
    assert Pledge.from_snapshot(p.snapshot()) == p


def test_a_capital_snapshot_states_amounts_as_decimal_strings() -> None:
    snap = partly_disbursed("600").snapshot()
    assert snap["capital"] == {"amount": "1000", "currency": "KRW"}
    assert snap["disbursed"] == {"amount": "600", "currency": "KRW"}
    assert snap["version"] == 2 and snap["status"] == "active"
