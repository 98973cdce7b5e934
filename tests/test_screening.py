"""Restricted-party screening at the regulation's grain (services/export_controls/domain/screening.py):
as-of-date listing, hits that cite list, entry, listing date and notice, legal forms across
Latin, Hangul and Han, and near misses that go to a human (SCREENING_REVIEW)."""

from __future__ import annotations

from datetime import date

import pytest

from services.export_controls.domain import (
    RuleBook,
    Screener,
    ScreeningList,
    default_screener,
    lifecycle,
    load_rulebook,
)
from services.export_controls.domain.screening import ScreeningEntry
from shared.contract.facts import AwardFacts

BOOK = load_rulebook()
BASE = default_screener().list

# Two fictional parties with dates: one listed mid-2025, one delisted at the start of 2025.
DATED = ScreeningList(
    snapshot_date=date(2025, 12, 1),
    source="test",
    matching=BASE.matching,
    entries=[
        ScreeningEntry(
            id="EL-LATE",
            name="Example Latecomer Compute Co., Ltd.",
            country="CN",
            list="Entity List",
            reason="test",
            start_date=date(2025, 6, 10),
            federal_register_notice="90 FR 99999",
            addresses=["88 Example Road, Nanshan District, Shenzhen, CN"],
        ),
        ScreeningEntry(
            id="EL-GONE",
            name="Example Removed Systems GmbH",
            country="DE",
            list="Entity List",
            reason="test",
            start_date=date(2020, 1, 1),
            end_date=date(2025, 1, 1),
            federal_register_notice="85 FR 11111",
        ),
    ],
)


@pytest.mark.parametrize(
    ("name", "on", "hit"),
    [
        ("Example Latecomer Compute", date(2025, 6, 9), False),  # the day before its listing
        ("Example Latecomer Compute", date(2025, 6, 10), True),  # listed that day
        ("Example Removed Systems", date(2024, 12, 31), True),  # still listed
        ("Example Removed Systems", date(2025, 1, 1), False),  # delisted that day
    ],
)
def test_a_party_is_a_hit_only_while_listed(name: str, on: date, hit: bool) -> None:
    p = Screener(DATED).screen(name, "consignee", on=on)
    assert p.hit is hit and p.screened_on == on
    if not hit:
        assert p.matched_entry is None  # the unlisted entry is not even a near miss that day


def test_a_hit_cites_list_entry_listing_date_and_notice() -> None:
    p = Screener(DATED).screen("Example Latecomer Compute", "end_user", on=date(2025, 7, 1))
    e = p.matched_entry
    assert e is not None and (e.list, e.id, e.start_date, e.federal_register_notice) == (
        "Entity List",
        "EL-LATE",
        date(2025, 6, 10),
        "90 FR 99999",
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Example Tata Compute Pvt. Ltd.", "Example Tata Compute Private Limited"),
        ("Example Tata Compute Pvt Ltd", "EXAMPLE TATA COMPUTE"),
        ("Example Rhein Chips GmbH", "Example Rhein Chips GmbH & Co. KG"),
        ("Example Andes Datos S.A.", "Example Andes Datos SA"),
        ("Example Andes Datos S.A. de C.V.", "Example Andes Datos"),
        ("삼성전자 주식회사", "삼성전자"),
        ("(주)삼성전자", "삼성전자"),
        ("㈜삼성전자", "주식회사 삼성전자"),
        ("삼성전자주식회사", "삼성전자"),
        ("华为技术有限公司", "华为技术"),
        ("中芯国际集成电路制造股份有限公司", "中芯国际集成电路制造有限公司"),
        ("華為技術有限公司", "華為技術"),
    ],
)
def test_legal_forms_fold_across_scripts(a: str, b: str) -> None:
    s = default_screener()
    assert s.normalise(a) == s.normalise(b) != ""


def test_names_keep_legal_words_that_are_part_of_the_name() -> None:
    s = default_screener()
    assert s.normalise("Company of Heroes Co.") == "company of heroes"  # only trailing forms go
    assert s.normalise("주식회사") == "주식회사"  # a bare legal form is not emptied


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("华为技术有限公司", "EL-HUAWEI"),  # the listed Chinese alias
        ("中芯国际集成电路制造股份有限公司", "EL-SMIC"),  # another legal form of the listed alias
    ],
)
def test_han_names_hit_the_listed_aliases(name: str, entry: str) -> None:
    p = default_screener().screen(name, "consignee", on=date(2025, 6, 1))
    assert p.hit and p.matched_entry is not None and p.matched_entry.id == entry


def test_a_near_miss_is_recorded_for_review_not_cleared_silently() -> None:
    p = default_screener().screen("Semiconductor Manufacturing Intl Corp", "end_user", on=date(2025, 6, 1))
    assert not p.hit and p.review and p.review_threshold == 80 and 80 <= p.best_score < 88
    far = default_screener().screen("Naver Cloud Corp.", "end_user", on=date(2025, 6, 1))
    assert not far.hit and not far.review


def test_an_address_match_alone_goes_to_review() -> None:
    s = Screener(DATED)
    p = s.screen(
        "Example Unrelated Trading",
        "consignee",
        on=date(2025, 7, 1),
        address="88 Example Rd., Nanshan District, Shenzhen, CN",
    )
    assert not p.hit and p.review and p.method == "address"
    assert p.matched_entry is not None and p.matched_entry.id == "EL-LATE"


def test_a_near_miss_raises_a_screening_review_anomaly() -> None:
    from tests.test_export_lifecycle import award

    near = award(
        country="KR", consignee="Semiconductor Manufacturing Intl Corp", awarded_at="2025-06-01T00:00:00+00:00"
    )
    opened = lifecycle.open_case(near, BOOK, {})
    review = [a for a in opened.anomalies if a["code"] == "SCREENING_REVIEW"]
    assert len(review) == 2  # consignee and end user are the same party here
    assert review[0]["entry_id"] == "EL-SMIC" and review[0]["screening_snapshot"] == BOOK.screener.list.sha256
    assert any("near miss for review" in s for s in opened.evaluation.reasoning)
    clean = lifecycle.open_case(
        award(country="KR", consignee="Naver Cloud Corp.", awarded_at="2025-06-01T00:00:00+00:00"), BOOK, {}
    )
    assert not [a for a in clean.anomalies if a["code"] == "SCREENING_REVIEW"]


@pytest.mark.parametrize(("day", "outcome"), [("2025-06-09", "cleared"), ("2025-06-10", "denied")])
def test_a_decision_screens_as_of_its_own_date(day: str, outcome: str) -> None:
    from tests.test_export_lifecycle import award

    book = RuleBook(BOOK.rulesets, BOOK.catalogue, Screener(DATED))
    party = award(country="KR", consignee="Example Latecomer Compute Co., Ltd.", awarded_at=f"{day}T00:00:00+00:00")
    opened = lifecycle.open_case(party, book, {})
    assert opened.evaluation.outcome == outcome, opened.evaluation.reasoning
    if outcome == "denied":
        assert any("listed 2025-06-10, 90 FR 99999" in s for s in opened.evaluation.reasoning)


# --- addresses in decisions (the award's parties carry an optional address) ----------------------

LOTUS_ADDRESS = "Unit 1801, 18/F, Example Harbour Tower, 1 Example Road, Kwun Tong, Kowloon"


def _hk_award(consignee: str, address: str | None) -> AwardFacts:
    """A Hong Kong consignee (the end user the same party), with or without a street address."""
    from tests.test_export_lifecycle import award

    base = award(country="HK", consignee=consignee, awarded_at="2025-06-02T00:00:00+00:00")
    party = {"name": consignee, "country": "HK", **({"address": address} if address else {})}
    return base.model_copy(
        update={
            "consignee": base.consignee.model_validate(party),
            "end_user": base.end_user.model_validate({**party, "headquarters_country": "HK"}),
        }
    )


@pytest.fixture(scope="module")
def csl_book(tmp_path_factory: pytest.TempPathFactory) -> RuleBook:
    from pathlib import Path

    from services.export_controls.domain.snapshots import import_csl

    var = tmp_path_factory.mktemp("var")
    csl = Path(__file__).resolve().parent.parent / "services/export_controls/data/csl/consolidated.json"
    import_csl(csl.read_bytes(), var, source_file="consolidated.json")
    return load_rulebook(var_dir=var)


def test_a_party_at_a_listed_address_is_a_review_in_the_decision(csl_book: RuleBook) -> None:
    # Another name at synthetic-001's listed address: not a hit (a name decides that), but not a
    # silent clear either — the decision carries the address match and a SCREENING_REVIEW anomaly.
    opened = lifecycle.open_case(_hk_award("Harbour Light Logistics Ltd.", LOTUS_ADDRESS), csl_book, {})
    consignee = opened.evaluation.screening.parties[0]
    assert consignee.method == "address" and consignee.review and not consignee.hit
    assert consignee.matched_entry is not None and consignee.matched_entry.id == "synthetic-001"
    review = [a for a in opened.anomalies if a["code"] == "SCREENING_REVIEW"]
    assert [a["entry_id"] for a in review] == ["synthetic-001", "synthetic-001"]
    assert any("address for review" in s for s in opened.evaluation.reasoning)
    assert not opened.evaluation.explanation.screening_hits
    # The same party without an address: nothing to review.
    bare = lifecycle.open_case(_hk_award("Harbour Light Logistics Ltd.", None), csl_book, {})
    assert not [a for a in bare.anomalies if a["code"] == "SCREENING_REVIEW"]


def test_the_listed_name_at_its_address_is_a_hit(csl_book: RuleBook) -> None:
    opened = lifecycle.open_case(
        _hk_award("Example Lotus Compute Trading Co., Limited", LOTUS_ADDRESS),
        csl_book,
        {},
    )
    assert opened.evaluation.outcome == "denied"
    assert [h.entry_id for h in opened.evaluation.explanation.screening_hits] == ["synthetic-001"] * 2


def test_the_contract_carries_the_address_from_quote_to_award() -> None:
    from shared.contract import QuoteSubmitted
    from tests.test_export_lifecycle import award

    party = {"name": "Harbour Light Logistics Ltd.", "country": "HK", "address": LOTUS_ADDRESS}
    q = QuoteSubmitted.model_validate(
        {
            "quote_id": "Q-1",
            "batch_id": "B-1",
            "vendor_id": "v",
            "model": "B200",
            "quantity": 1,
            "unit_price": {"amount": "1", "currency": "USD"},
            "valid_until": "2025-09-30",
            "lead_time_days": 0,
            "origin_country": "US",
            "route": [],
            "consignee": party,
            "end_user": {**party, "headquarters_country": "HK"},
        }
    )
    assert q.consignee.address == LOTUS_ADDRESS and q.end_user.address == LOTUS_ADDRESS
    facts = AwardFacts.model_validate(
        {**award().model_dump(mode="json"), "consignee": q.consignee.model_dump(mode="json")}
    )
    assert lifecycle.export_request(facts).consignee.screening_address() == f"{LOTUS_ADDRESS}, HK"
