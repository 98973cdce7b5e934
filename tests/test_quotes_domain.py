"""The quote rules of docs/architecture.md §5, one test per rule, on the pure domain (no Kafka, no SQL).

Each refusal test starts from an event that would be accepted and breaks exactly one thing,
so removing the rule makes the test fail.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from services.quotes import domain
from shared.contract import BatchRequested, Money, QuoteAwarded, QuoteSubmitted, QuoteWithdrawn, ReasonCode
from shared.contract.facts import AwardFacts, BatchFacts, Funding, PledgeFacts

AWARDED_AT = "2025-06-01T09:00:00Z"


def batch_event(**changes: Any) -> BatchRequested:
    data = {
        "batch_id": "B-1",
        "program_id": "kr-ai-10k",
        "model": "B200",
        "quantity": 100,
        "site_id": "haenam",
        "needed_by": "2025-09-30",
    }
    return BatchRequested.model_validate({**data, **changes})


def quote_event(**changes: Any) -> QuoteSubmitted:
    data = {
        "quote_id": "Q-1",
        "batch_id": "B-1",
        "vendor_id": "vendor-a",
        "model": "B200",
        "quantity": 100,
        "unit_price": {"amount": "40000.00", "currency": "USD"},
        "valid_until": "2025-07-01T00:00:00Z",
        "lead_time_days": 60,
        "origin_country": "TW",
        "route": ["TW", "KR"],
        "consignee": {"name": "National AI Computing Center", "country": "KR"},
        "end_user": {"name": "National AI Computing Center", "country": "KR", "headquarters_country": "KR"},
    }
    return QuoteSubmitted.model_validate({**data, **changes})


def withdraw_event(**changes: Any) -> QuoteWithdrawn:
    data = {"quote_id": "Q-1", "batch_id": "B-1", "vendor_id": "vendor-a", "reason": "price changed"}
    return QuoteWithdrawn.model_validate({**data, **changes})


def award_event(**changes: Any) -> QuoteAwarded:
    return QuoteAwarded.model_validate({"batch_id": "B-1", "quote_id": "Q-1", "awarded_at": AWARDED_AT, **changes})


def pledge(pledge_id: str = "P-1", amount: str = "4000000", **changes: Any) -> PledgeFacts:
    """A pledge as the pledges service publishes it (PledgeFacts, from its JSON)."""
    snap: dict[str, Any] = {
        "pledge_id": pledge_id,
        "partner_id": "kdb",
        "program_id": "kr-ai-10k",
        "kind": "capital",
        "capital": {"amount": amount, "currency": "USD"},
        "gpus": None,
        "capacity": None,
        "earmark_batch_id": "B-1",
        "committed_at": "2025-03-01T00:00:00+00:00",
        "due_by": "2025-12-31",
        "status": "active",
        "disbursed": {"amount": "0", "currency": "USD"},
        "version": 1,
    }
    return PledgeFacts.model_validate({**snap, **changes})


def earmark(**kw: Any) -> domain.Earmark:
    return domain.Earmark.from_pledge(pledge(**kw))


def open_batch() -> domain.Batch:
    return domain.request_batch(None, batch_event())


def quote(**changes: Any) -> domain.Quote:
    return domain.submit_quote(open_batch(), None, quote_event(**changes))


def refused(code: ReasonCode, rule: Any, *args: Any) -> domain.RuleBroken:
    with pytest.raises(domain.RuleBroken) as caught:
        rule(*args)
    assert caught.value.code == code, caught.value.message
    return caught.value


# --- batch.requested ----------------------------------------------------------------------


def test_batch_request_is_accepted_as_an_open_batch() -> None:
    batch = open_batch()
    assert batch.status == "open"
    assert batch.needed_by == "2025-09-30"
    facts = batch.facts(quotes_open=0)
    assert isinstance(facts, BatchFacts)
    assert facts.model_dump(mode="json")["status"] == "open"


def test_duplicate_batch_is_refused() -> None:
    refused(ReasonCode.DUPLICATE_BATCH, domain.request_batch, open_batch(), batch_event())


def test_batch_of_unknown_model_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_MODEL, domain.request_batch, None, batch_event(model="RTX-4090"))


@pytest.mark.parametrize("quantity", [0, -5])
def test_batch_quantity_must_be_positive(quantity: int) -> None:
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.request_batch, None, batch_event(quantity=quantity))


# --- quote.submitted ----------------------------------------------------------------------


def test_matching_quote_is_accepted_with_money_as_strings() -> None:
    q = quote(unit_price={"amount": "4E+4", "currency": "USD"})
    assert q.status == "open"
    assert q.facts().model_dump(mode="json") == {
        "quote_id": "Q-1",
        "batch_id": "B-1",
        "vendor_id": "vendor-a",
        "unit_price": {"amount": "40000", "currency": "USD"},
        "quantity": 100,
        "status": "open",
    }


def test_quote_for_unknown_batch_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_BATCH, domain.submit_quote, None, None, quote_event())


def test_quote_for_awarded_batch_is_refused() -> None:
    awarded = replace(open_batch(), status="awarded", awarded_quote_id="Q-0")
    refused(ReasonCode.QUOTE_NOT_OPEN, domain.submit_quote, awarded, None, quote_event())


def test_duplicate_quote_is_refused() -> None:
    refused(ReasonCode.DUPLICATE_QUOTE, domain.submit_quote, open_batch(), quote(), quote_event())


def test_quote_for_another_model_is_refused() -> None:
    refused(ReasonCode.QUOTE_MISMATCH, domain.submit_quote, open_batch(), None, quote_event(model="H200-SXM"))


def test_quote_above_requested_quantity_is_refused() -> None:
    refused(ReasonCode.QUOTE_MISMATCH, domain.submit_quote, open_batch(), None, quote_event(quantity=101))


@pytest.mark.parametrize("quantity", [0, -1])
def test_quote_quantity_must_be_positive(quantity: int) -> None:
    refused(ReasonCode.QUOTE_MISMATCH, domain.submit_quote, open_batch(), None, quote_event(quantity=quantity))


@pytest.mark.parametrize("amount", ["0", "-0", "-1.50"])
def test_quote_unit_price_must_be_positive(amount: str) -> None:
    event = quote_event(unit_price={"amount": amount, "currency": "USD"})
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, domain.submit_quote, open_batch(), None, event)


def test_quote_in_unknown_currency_is_refused() -> None:
    event = quote_event(unit_price={"amount": "40000", "currency": "XYZ"})
    refused(ReasonCode.CURRENCY_UNKNOWN, domain.submit_quote, open_batch(), None, event)


def test_quote_lead_time_must_not_be_negative() -> None:
    refused(ReasonCode.SCHEMA_INVALID, domain.submit_quote, open_batch(), None, quote_event(lead_time_days=-1))


def test_a_price_with_more_digits_than_money_holds_is_refused_by_the_contract() -> None:
    # The contract bounds money (30 digits, 6 decimals), so no total is ever rounded; the
    # mechanism turns the validation error into a SCHEMA_INVALID rejection.
    digits = "1." + "3" * domain.MONEY_PRECISION
    with pytest.raises(ValidationError):
        quote_event(unit_price={"amount": digits, "currency": "USD"}, quantity=7)


# --- quote.withdrawn ----------------------------------------------------------------------


def test_open_quote_is_withdrawn_by_its_vendor() -> None:
    assert domain.withdraw_quote(quote(), withdraw_event()).status == "withdrawn"


def test_withdrawing_unknown_quote_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_QUOTE, domain.withdraw_quote, None, withdraw_event())


def test_withdrawing_a_quote_under_another_batch_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_QUOTE, domain.withdraw_quote, quote(), withdraw_event(batch_id="B-2"))


def test_only_the_quoting_vendor_withdraws() -> None:
    refused(ReasonCode.NOT_AUTHORIZED, domain.withdraw_quote, quote(), withdraw_event(vendor_id="vendor-b"))


@pytest.mark.parametrize("status", ["withdrawn", "awarded", "not_awarded"])
def test_only_open_quotes_are_withdrawn(status: str) -> None:
    refused(ReasonCode.QUOTE_NOT_OPEN, domain.withdraw_quote, replace(quote(), status=status), withdraw_event())


# --- quote.awarded ------------------------------------------------------------------------


def test_funded_award_awards_batch_and_quote_and_closes_the_others() -> None:
    winner, other = quote(), quote(quote_id="Q-2", vendor_id="vendor-b")
    withdrawn = replace(quote(quote_id="Q-3"), status="withdrawn")
    result = domain.award(open_batch(), winner, [winner, other, withdrawn], [earmark()], award_event())
    assert result.batch.status == "awarded" and result.batch.awarded_quote_id == "Q-1"
    assert result.quote.status == "awarded"
    # Only open quotes are closed; a withdrawn one stays withdrawn.
    assert [(q.quote_id, q.status) for q in result.not_awarded] == [("Q-2", "not_awarded")]
    facts = result.facts
    assert isinstance(facts, AwardFacts)
    dumped = facts.model_dump(mode="json")
    assert dumped["total_price"] == {"amount": "4000000.00", "currency": "USD"}
    assert dumped["unit_price"] == {"amount": "40000.00", "currency": "USD"}
    assert dumped["funding"] == {
        "currency": "USD",
        "required": "4000000.00",
        "earmarked": "4000000",
        "shortfall": "0",
        "pledges": ["P-1"],
    }
    assert dumped["awarded_at"] == "2025-06-01T09:00:00+00:00"
    assert (dumped["origin_country"], dumped["route"], dumped["site_id"]) == ("TW", ["TW", "KR"], "haenam")


def test_award_for_unknown_batch_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_BATCH, domain.award, None, quote(), [quote()], [earmark()], award_event())


def test_second_award_of_a_batch_is_refused() -> None:
    awarded = replace(open_batch(), status="awarded", awarded_quote_id="Q-2")
    refused(ReasonCode.ALREADY_AWARDED, domain.award, awarded, quote(), [quote()], [earmark()], award_event())


def test_award_of_unknown_quote_is_refused() -> None:
    refused(ReasonCode.UNKNOWN_QUOTE, domain.award, open_batch(), None, [], [earmark()], award_event())


def test_award_of_a_quote_of_another_batch_is_refused() -> None:
    foreign = replace(quote(), batch_id="B-2")
    refused(ReasonCode.UNKNOWN_QUOTE, domain.award, open_batch(), foreign, [], [earmark()], award_event())


def test_award_of_withdrawn_quote_is_refused() -> None:
    q = replace(quote(), status="withdrawn")
    refused(ReasonCode.QUOTE_NOT_OPEN, domain.award, open_batch(), q, [q], [earmark()], award_event())


def test_award_after_quote_expired_is_refused() -> None:
    q = quote(valid_until="2025-06-01T08:59:59Z")
    broken = refused(ReasonCode.QUOTE_NOT_OPEN, domain.award, open_batch(), q, [q], [earmark()], award_event())
    assert "expired" in broken.message


def test_quote_valid_until_a_date_covers_that_whole_day() -> None:
    q = quote(valid_until="2025-06-01")
    domain.award(open_batch(), q, [q], [earmark()], award_event(awarded_at="2025-06-01T23:59:59Z"))
    refused(
        ReasonCode.QUOTE_NOT_OPEN,
        domain.award,
        open_batch(),
        q,
        [q],
        [earmark()],
        award_event(awarded_at="2025-06-02T00:00:00Z"),
    )


def test_expiry_compares_times_without_offset_as_utc() -> None:
    assert domain.expired(datetime(2025, 6, 1, 9, 0, tzinfo=UTC), datetime(2025, 6, 1, 9, 0, 1))
    assert not domain.expired(date(2025, 6, 1), datetime(2025, 6, 1, 23, 0))


def test_underfunded_award_is_refused_with_funding_facts_and_an_anomaly() -> None:
    q = quote()
    broken = refused(
        ReasonCode.FUNDING_SHORTFALL,
        domain.award,
        open_batch(),
        q,
        [q],
        [earmark(amount="3000000"), earmark(pledge_id="P-2", amount="500000.50")],
        award_event(),
    )
    funding = Funding.model_validate(broken.facts["funding"])
    assert (funding.required, funding.earmarked, funding.shortfall) == ("4000000.00", "3500000.50", "499999.50")
    assert funding.pledges == ["P-1", "P-2"]
    [flag] = broken.anomalies
    assert flag["code"] == "FUNDING_SHORTFALL" and flag["batch_id"] == "B-1"
    assert (flag["required"], flag["earmarked"]) == ("4000000.00", "3500000.50")


@pytest.mark.parametrize(
    "unfunding",
    [
        {"status": "withdrawn"},
        {"earmark_batch_id": "B-2"},
        {"earmark_batch_id": None},
        {"capital": {"amount": "4000000", "currency": "EUR"}},
        {"kind": "gpus", "capital": None, "gpus": {"model": "B200", "quantity": 100}},
    ],
    ids=["withdrawn", "other-batch", "no-earmark", "other-currency", "not-capital"],
)
def test_only_active_capital_earmarked_for_the_batch_in_the_quote_currency_funds_it(unfunding: dict[str, Any]) -> None:
    q = quote()
    counted = domain.award(open_batch(), q, [q], [earmark()], award_event())
    assert counted.facts.funding.pledges == ["P-1"]
    not_counted = domain.Earmark.from_pledge(pledge(**unfunding))
    refused(ReasonCode.FUNDING_SHORTFALL, domain.award, open_batch(), q, [q], [not_counted], award_event())


def test_refused_award_changes_nothing() -> None:
    batch, q = open_batch(), quote()
    refused(ReasonCode.FUNDING_SHORTFALL, domain.award, batch, q, [q], [], award_event())
    assert batch.status == "open" and q.status == "open"  # frozen state, nothing to roll back


# --- earmarks -----------------------------------------------------------------------------


def test_newer_pledge_version_replaces_the_earmark() -> None:
    old = earmark()
    new = domain.Earmark.from_pledge(pledge(version=2, status="withdrawn"))
    assert domain.track_pledge(old, new) == new
    assert domain.track_pledge(None, old) == old


@pytest.mark.parametrize("version", [1, 0])
def test_stale_or_repeated_pledge_version_is_ignored(version: int) -> None:
    current = earmark(version=1)
    assert domain.track_pledge(current, domain.Earmark.from_pledge(pledge(version=version, status="withdrawn"))) is None


def test_earmarked_sum_is_exact() -> None:
    # Floats would make 0.1 + 0.2 != 0.3; decimals must not.
    marks = [earmark(pledge_id="a", amount="0.1"), earmark(pledge_id="b", amount="0.2")]
    funding = domain.funding("B-1", Money(amount=Decimal("0.3"), currency="USD"), marks)
    assert (funding.earmarked, funding.shortfall) == ("0.3", "0")


def test_a_price_beyond_what_money_holds_is_refused_by_the_contract() -> None:
    with pytest.raises(ValidationError):
        quote_event(unit_price={"amount": "9E+999999", "currency": "USD"}, quantity=100)


def test_a_pledge_fact_keeps_the_json_the_ledger_holds() -> None:
    # Pledge facts are in the ledger for good: the model reads them and writes them back unchanged.
    snap = pledge().model_dump(mode="json")
    assert snap == PledgeFacts.model_validate_json(json.dumps(snap)).model_dump(mode="json")
    assert list(snap) == [
        "pledge_id",
        "partner_id",
        "program_id",
        "kind",
        "capital",
        "gpus",
        "capacity",
        "earmark_batch_id",
        "committed_at",
        "due_by",
        "status",
        "disbursed",
        "version",
    ]
    assert (snap["capital"], snap["disbursed"]) == (
        {"amount": "4000000", "currency": "USD"},
        {"amount": "0", "currency": "USD"},
    )


# --- stored state -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "valid_until",
    [date(2025, 7, 1), datetime(2025, 7, 1, tzinfo=UTC), datetime(2025, 7, 1, 12, 30)],
    ids=["date", "midnight-utc", "naive-time"],
)
def test_a_stored_quote_reads_back_the_same(valid_until: date | datetime) -> None:
    # A bare date covers its whole day and a time does not (see expired()): the stored form must
    # keep which one it was, and the route stays a tuple.
    q = replace(quote(), valid_until=valid_until)
    back = domain.QUOTE_STATE.validate_json(domain.QUOTE_STATE.dump_json(q))
    assert back == q and type(back.valid_until) is type(valid_until)


def test_a_quote_stored_before_pydantic_wrote_it_still_reads() -> None:
    # The rows written by the hand-made snapshot: isoformat times, lists, plain dicts.
    center = {"name": "National AI Computing Center", "country": "KR"}
    row = {
        "quote_id": "Q-1",
        "batch_id": "B-1",
        "vendor_id": "vendor-a",
        "model": "B200",
        "quantity": 100,
        "unit_price": {"amount": "40000.00", "currency": "USD"},
        "valid_until": "2025-07-01T00:00:00+00:00",
        "lead_time_days": 60,
        "origin_country": "TW",
        "route": ["TW", "KR"],
        "consignee": center,
        "end_user": {**center, "headquarters_country": "KR"},
        "status": "open",
    }
    q = domain.QUOTE_STATE.validate_json(json.dumps(row))
    assert q.valid_until == datetime(2025, 7, 1, tzinfo=UTC) and q.route == ("TW", "KR")
    assert q.total_price == Money(amount=Decimal("4000000"), currency="USD")


def test_a_stored_batch_reads_back_the_same() -> None:
    batch = replace(open_batch(), status="awarded", awarded_quote_id="Q-1", awarded_at=AWARDED_AT)
    assert domain.BATCH_STATE.validate_json(domain.BATCH_STATE.dump_json(batch)) == batch
