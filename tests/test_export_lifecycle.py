"""The export case of a batch on the pure domain (services/export_controls/domain/lifecycle.py).

Each refusal starts from a case and event that would be accepted and breaks exactly one thing,
so removing the rule makes its test fail. The rules themselves (classification, rule sets,
screening) are covered by test_export_rules.py; here: which rule set decides, when quotas
count, which quota rows are read, and the case's state machine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from services.export_controls.domain import Case, RuleBook, RulesetDataError, lifecycle, load_rulebook
from shared.contract import LicenseDenied, LicenseGranted, ReasonCode
from shared.contract.decisions import RuleBroken
from shared.contract.facts import AwardFacts

BOOK: RuleBook = load_rulebook()
ALLOC_SG = "ai-diffusion-2025/tier2-allocation/2025-2027/SG"
LPP_MERLION = "ai-diffusion-2025/lpp/2025/SG/merlion-compute"


def award(
    *,
    country: str = "SG",
    consignee: str = "Merlion Compute Pte. Ltd.",
    hq: str | None = None,
    model: str = "B200",
    quantity: int = 1000,
    awarded_at: str = "2025-03-01T09:00:00+00:00",
    lead_time_days: int = 0,
    batch_id: str = "B-1",
) -> AwardFacts:
    """An accepted award as the quotes service publishes it (AwardFacts)."""
    money = {"amount": "1", "currency": "USD"}
    return AwardFacts.model_validate(
        {
            "batch_id": batch_id,
            "quote_id": "Q-1",
            "vendor_id": "vendor-a",
            "program_id": "kr-ai-10k",
            "site_id": "haenam-1",
            "model": model,
            "quantity": quantity,
            "unit_price": money,
            "total_price": money,
            "origin_country": "TW",
            "route": [],
            "consignee": {"name": consignee, "country": country},
            "end_user": {"name": consignee, "country": country, "headquarters_country": hq or country},
            "awarded_at": awarded_at,
            "lead_time_days": lead_time_days,
            "funding": {"currency": "USD", "required": "1", "earmarked": "1", "shortfall": "0", "pledges": []},
        }
    )


def opened(a: AwardFacts, used: Mapping[str, int] | None = None) -> lifecycle.Opened:
    return lifecycle.open_case(a, BOOK, used or {})


def refused(code: ReasonCode, rule: Any, *args: Any) -> RuleBroken:
    with pytest.raises(RuleBroken) as caught:
        rule(*args)
    assert caught.value.code == code, caught.value.message
    return caught.value


def case(status: str, **changes: Any) -> Case:
    """A case in `status`, as opened for a licence-required Tier 2 award of 1000 units."""
    base = opened(award()).case
    assert base.status == "license_required"
    return base.model_copy(update={"status": status, **changes})


def granted(quantity: int = 1000, batch_id: str = "B-1") -> LicenseGranted:
    return LicenseGranted(batch_id=batch_id, license_number="L-1", quantity=quantity, valid_until="2026-12-31")


def denied(batch_id: str = "B-1") -> LicenseDenied:
    return LicenseDenied.model_validate({"batch_id": batch_id, "reason": "end use"})


# --- which rule set decides ---------------------------------------------------------------------


def test_the_rule_set_in_force_on_the_planned_shipment_date_decides() -> None:
    # Awarded under the AI Diffusion rule, shipped after its rescission: the later rules apply.
    on_award_day = opened(award(awarded_at="2025-05-01T00:00:00+00:00"))
    shipped_later = opened(award(awarded_at="2025-05-01T00:00:00+00:00", lead_time_days=30))
    assert on_award_day.evaluation.ruleset.id == "ai-diffusion-2025"
    assert shipped_later.evaluation.ruleset.id == "post-rescission-2025-05"
    assert str(shipped_later.evaluation.inputs.decision_date) == "2025-05-31"


def test_a_shipment_date_no_rule_set_covers_is_not_cleared() -> None:
    too_early = award(awarded_at="2023-01-01T00:00:00+00:00")
    broken = refused(ReasonCode.EXPORT_NOT_CLEARED, lifecycle.open_case, too_early, BOOK, {})
    assert "2023-01-01" in broken.message
    refused(ReasonCode.EXPORT_NOT_CLEARED, lifecycle.quotas_read, too_early, BOOK)


def test_a_model_outside_the_catalogue_is_unknown() -> None:
    refused(ReasonCode.UNKNOWN_MODEL, lifecycle.open_case, award(model="RTX-4090"), BOOK, {})


def test_a_pinned_rule_set_decides_whatever_the_date() -> None:
    pinned = load_rulebook(pinned="acr-2023")
    result = lifecycle.open_case(award(), pinned, {})
    assert result.evaluation.ruleset.id == "acr-2023" and result.evaluation.ruleset.selected_by == "explicit"
    assert lifecycle.quotas_read(award(), pinned) == []  # acr-2023 has no quotas to read


def test_a_data_fault_is_an_error_never_a_rejection() -> None:
    # One that slipped past the start-up checks (a group defined in terms of itself): it must
    # propagate, so the mechanism retries the award and dead-letters it after the cap, instead
    # of writing a partner's rejection into the ledger.
    aid = next(rs for rs in BOOK.rulesets if rs.id == "ai-diffusion-2025")
    looping = {**aid.groups, "TIER3": aid.groups["TIER3"].model_copy(update={"include": ["TIER3"]})}
    broken = aid.model_copy(update={"groups": looping})
    book = RuleBook(BOOK.rulesets, BOOK.catalogue, BOOK.screener, pinned=broken)
    with pytest.raises(RulesetDataError, match="itself"):
        lifecycle.open_case(award(), book, {})


# --- when quotas count ----------------------------------------------------------------------------


def test_a_licence_exception_with_a_quota_counts_at_the_decision() -> None:
    c = opened(award(quantity=500)).case  # 500 B200 = 18,000,000 TPP, within the LPP cap
    assert (c.status, c.cleared_quantity) == ("cleared", 500)
    assert c.quota_due("decision") == (LPP_MERLION, 18_000_000)
    assert c.quota_due("license_granted") is None


def test_a_country_allocation_counts_only_when_the_licence_is_granted() -> None:
    c = opened(award()).case  # 1000 B200: beyond LPP, a Tier 2 licence against SG's allocation
    assert (c.status, c.cleared_quantity) == ("license_required", 0)
    assert c.quota_due("decision") is None
    assert lifecycle.grant_licence(c, granted()).quota_due("license_granted") == (ALLOC_SG, 36_000_000)


def test_a_cleared_case_without_exception_counts_nothing() -> None:
    c = opened(award(country="KR", consignee="Naver Cloud Corp.", awarded_at="2024-06-01T00:00:00+00:00")).case
    assert c.status == "cleared"
    assert (c.quota_due("decision"), c.quota_due("license_granted")) == (None, None)


def test_the_running_totals_read_change_the_decision() -> None:
    # The totals the service passes in are the ones the decision is taken on.
    assert opened(award(quantity=500), {LPP_MERLION: 8_900_001}).case.status == "license_required"


# --- which quota rows are read ----------------------------------------------------------------------


class Recording(Mapping[str, int]):
    """Quota totals that remember every key the evaluation asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> int:
        self.asked.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize(
    "a",
    [
        award(quantity=500),  # LPP
        award(),  # LPP examined, then the SG allocation
        award(country="MY", consignee="Johor Data Sdn Bhd"),
        award(country="KR", consignee="Naver Cloud Corp."),
        award(awarded_at="2026-02-01T00:00:00+00:00"),
    ],
    ids=["sg-lpp", "sg-allocation", "my-allocation", "kr", "sg-2026"],
)
def test_the_quota_rows_read_are_every_one_the_decision_reads(a: AwardFacts) -> None:
    used = Recording()
    lifecycle.open_case(a, BOOK, used)
    assert used.asked <= set(lifecycle.quotas_read(a, BOOK))


def test_only_the_destinations_quota_rows_are_read() -> None:
    keys = lifecycle.quotas_read(award(), BOOK)
    assert set(keys) == {LPP_MERLION, ALLOC_SG}
    assert lifecycle.quotas_read(award(country="KR", consignee="Naver Cloud Corp."), BOOK) == [
        "ai-diffusion-2025/lpp/2025/KR/naver-cloud",
        "ai-diffusion-2025/tier2-allocation/2025-2027/KR",
    ]


# --- the case's state machine ---------------------------------------------------------------------


def test_a_denied_export_opens_a_denied_case_with_an_anomaly() -> None:
    result = opened(award(country="KR", consignee="HUAWEI TECHNOLOGIES LIMITED"))
    assert (result.case.status, result.case.cleared_quantity) == ("denied", 0)
    assert [a["code"] for a in result.anomalies] == ["EXPORT_DENIED"]


def test_a_licence_clears_what_it_names() -> None:
    after = lifecycle.grant_licence(case("license_required"), granted(600))
    assert (after.status, after.license_number, after.cleared_quantity) == ("licensed", "L-1", 600)
    assert after.facts().status == "licensed" and after.facts().cleared_quantity == 600


def test_a_licence_never_clears_more_than_was_awarded() -> None:
    assert lifecycle.grant_licence(case("license_required"), granted(5000)).cleared_quantity == 1000


def test_a_licence_needs_a_positive_quantity() -> None:
    refused(ReasonCode.AMOUNT_NOT_POSITIVE, lifecycle.grant_licence, case("license_required"), granted(0))


def test_a_licence_denial_clears_nothing() -> None:
    after = lifecycle.deny_licence(case("license_required"), denied())
    assert (after.status, after.cleared_quantity) == ("license_denied", 0)


@pytest.mark.parametrize(
    "decide", [lambda c: lifecycle.grant_licence(c, granted()), lambda c: lifecycle.deny_licence(c, denied())]
)
def test_a_licence_decision_needs_a_case(decide: Any) -> None:
    refused(ReasonCode.UNKNOWN_BATCH, decide, None)


@pytest.mark.parametrize("status", ["denied", "license_denied"])
@pytest.mark.parametrize(
    "decide", [lambda c: lifecycle.grant_licence(c, granted()), lambda c: lifecycle.deny_licence(c, denied())]
)
def test_a_denied_export_takes_no_licence_decision(status: str, decide: Any) -> None:
    refused(ReasonCode.EXPORT_DENIED, decide, case(status))


@pytest.mark.parametrize("status", ["cleared", "licensed"])
@pytest.mark.parametrize(
    "decide", [lambda c: lifecycle.grant_licence(c, granted()), lambda c: lifecycle.deny_licence(c, denied())]
)
def test_a_case_with_no_pending_licence_takes_no_licence_decision(status: str, decide: Any) -> None:
    refused(ReasonCode.LICENSE_NOT_REQUIRED, decide, case(status))


def test_the_case_facts_keep_their_shape() -> None:
    # The ledger keeps these for good: the keys of ExportFacts stay what they were.
    facts = opened(award()).case.facts().model_dump(mode="json")
    assert list(facts) == [
        "batch_id",
        "status",
        "outcome",
        "rule_version",
        "eccn",
        "cleared_quantity",
        "license_number",
        "decision",
    ]
    assert (facts["outcome"], facts["rule_version"], facts["eccn"]) == (
        "license_required",
        "ai-diffusion-2025@1",
        "3A090.a",
    )
