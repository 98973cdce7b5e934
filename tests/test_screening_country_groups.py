"""Dated country-group membership (country_groups.yaml, Supp. No. 1 to part 740): a shipment is
judged by the groups as they stood on its decision date. The real changes in the shipped data
(Nicaragua joined D:5 on 2024-03-15, 89 FR 18780; Cyprus left it on 2024-05-30, 89 FR 40369) are
judged on both sides of their dates; a staged copy of the data exercises a later change too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from services.export_controls.domain import RuleBook, RulesetDataError, lifecycle, load_rulebook
from services.export_controls.domain._data import DATA_DIR
from tests.test_export_lifecycle import award

SWITCH = "2025-09-01"


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> RuleBook:
    data = tmp_path_factory.mktemp("data") / "data"
    shutil.copytree(DATA_DIR, data)
    path = data / "country_groups.yaml"
    groups = yaml.safe_load(path.read_text())
    d5 = groups["groups"]["D:5"]["countries"]
    assert "MX" not in d5 and "ZW" in d5
    d5.remove("ZW")
    d5 += [{"country": "MX", "from": SWITCH}, {"country": "ZW", "to": SWITCH}]  # staged: MX joins, ZW leaves
    path.write_text(yaml.safe_dump(groups, allow_unicode=True))
    return load_rulebook(data)


def decide(book: RuleBook, hq: str, day: str) -> lifecycle.Opened:
    # A Korean consignee whose end user is headquartered in `hq`, shipped on `day`.
    return lifecycle.open_case(
        award(country="KR", consignee="Naver Cloud Corp.", hq=hq, awarded_at=f"{day}T00:00:00+00:00"), book, {}
    )


@pytest.mark.parametrize(
    ("hq", "day", "in_d5", "outcome"),
    [
        ("MX", "2025-08-31", False, "cleared"),  # the day before it joins
        ("MX", SWITCH, True, "license_required"),  # member from that day
        ("ZW", "2025-08-31", True, "license_required"),  # still a member
        ("ZW", SWITCH, False, "cleared"),  # left that day
    ],
)
def test_group_membership_is_read_on_the_decision_date(
    book: RuleBook, hq: str, day: str, in_d5: bool, outcome: str
) -> None:
    opened = decide(book, hq, day)
    ev = opened.evaluation
    assert ("D:5" in ev.end_user_headquarters.groups) is in_d5
    assert ("D:5" in ev.explanation.group_memberships[hq]) is in_d5
    assert ev.outcome == outcome, ev.reasoning


@pytest.fixture(scope="module")
def shipped() -> RuleBook:
    return load_rulebook()


@pytest.mark.parametrize(
    ("hq", "day", "in_d5", "outcome"),
    [
        # 89 FR 18780: Nicaragua added to D:5, effective 2024-03-15 (rule set acr-2023 in force).
        ("NI", "2024-03-14", False, "cleared"),
        ("NI", "2024-03-15", True, "license_required"),
        # 89 FR 40369: Cyprus no longer in D:5, effective 2024-05-30.
        ("CY", "2024-05-29", True, "license_required"),
        ("CY", "2024-05-30", False, "cleared"),
    ],
)
def test_real_d5_changes_are_read_on_the_decision_date(
    shipped: RuleBook, hq: str, day: str, in_d5: bool, outcome: str
) -> None:
    ev = decide(shipped, hq, day).evaluation
    assert ev.ruleset.id == "acr-2023"
    assert ("D:5" in ev.explanation.group_memberships[hq]) is in_d5
    assert ev.outcome == outcome, ev.reasoning


def test_a_dated_membership_must_end_after_it_starts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    path = data / "country_groups.yaml"
    groups = yaml.safe_load(path.read_text())
    groups["groups"]["D:5"]["countries"].append({"country": "MX", "from": SWITCH, "to": "2025-01-01"})
    path.write_text(yaml.safe_dump(groups, allow_unicode=True))
    with pytest.raises(RulesetDataError, match=r"country_groups\.yaml"):
        load_rulebook(data)
