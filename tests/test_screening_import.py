"""`gputrace screening import`: the Consolidated Screening List in its published JSON and CSV
formats becomes an immutable, content-hashed, active snapshot, and decisions record its hash so
they can be re-derived."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.export_controls.domain import RuleBook, RulesetDataError, Screener, lifecycle, load_rulebook
from services.export_controls.domain.csl import list_name, parse_csl
from services.export_controls.domain.snapshots import active_hash, import_csl, load_active, load_snapshot
from tests.test_export_lifecycle import award
from tools.cli import app

CSL = Path(__file__).resolve().parent.parent / "services/export_controls/data/csl"


def test_json_and_csv_fixtures_read_the_same_records() -> None:
    from_json, json_date = parse_csl((CSL / "consolidated.json").read_bytes())
    from_csv, csv_date = parse_csl((CSL / "consolidated.csv").read_bytes())
    assert len(from_json) == 28 and json_date == date(2025, 6, 1) and csv_date is None
    assert [e.model_dump() for e in from_json] == [e.model_dump() for e in from_csv]
    huawei = from_json[0]
    assert (huawei.list, huawei.start_date, huawei.federal_register_notice, huawei.country) == (
        "Entity List",
        date(2019, 5, 16),
        "84 FR 22961",
        "CN",
    )
    assert huawei.aliases == ["Huawei", "华为技术有限公司"] and huawei.addresses[0].endswith("Shenzhen, CN")
    assert {e.list for e in from_json} == {
        "Entity List",
        "Military End-User List",
        "Specially Designated Nationals List",
    }


def test_source_names_map_to_the_rule_sets_list_names() -> None:
    assert list_name("Entity List (EL) - Bureau of Industry and Security") == "Entity List"
    assert list_name("Military End User (MEU) List - Bureau of Industry and Security") == "Military End-User List"
    assert list_name("Unverified List (UVL) - Bureau of Industry and Security") == "Unverified List"


@pytest.mark.parametrize(
    "raw",
    [b'{"results": [{"source": "Entity List (EL)"}]}', b"source,name\nEntity List (EL),\n", b"a,b\n1,2\n", b"{"],
)
def test_a_malformed_file_is_refused(raw: bytes) -> None:
    with pytest.raises(RulesetDataError):
        parse_csl(raw)


def test_import_stores_an_immutable_content_hashed_active_snapshot(tmp_path: Path) -> None:
    raw = (CSL / "consolidated.json").read_bytes()
    snap = import_csl(raw, tmp_path, source_file="consolidated.json")
    assert active_hash(tmp_path) == snap.sha256 and len(snap.entries) == 28
    assert snap.snapshot_date == date(2025, 6, 1)
    again = import_csl(raw, tmp_path, source_file="consolidated.json")
    assert again.sha256 == snap.sha256  # same content, same snapshot
    assert load_active(tmp_path) == snap
    # The CSV has no date of its own: it must be given, and makes a different snapshot.
    with pytest.raises(RulesetDataError, match="names no date"):
        import_csl((CSL / "consolidated.csv").read_bytes(), tmp_path, source_file="consolidated.csv")
    csv_snap = import_csl(
        (CSL / "consolidated.csv").read_bytes(), tmp_path, source_file="c.csv", source_date=date(2025, 6, 2)
    )
    assert csv_snap.sha256 != snap.sha256 and active_hash(tmp_path) == csv_snap.sha256
    assert load_snapshot(tmp_path, snap.sha256) == snap  # the older one is still there, unchanged
    stored = tmp_path / "screening" / f"{snap.sha256}.json"
    stored.write_bytes(stored.read_bytes().replace(b"Huawei", b"Hua-wei"))
    with pytest.raises(RulesetDataError, match="does not match its hash"):
        load_snapshot(tmp_path, snap.sha256)


def test_the_cli_imports_and_lists(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["screening", "import", str(CSL / "consolidated.json"), "--var-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    row = json.loads(out.output)
    assert row["entries"] == 28 and row["source_date"] == "2025-06-01" and row["active"]
    listed = runner.invoke(app, ["screening", "list", "--var-dir", str(tmp_path)])
    assert json.loads(listed.output.splitlines()[0])["sha256"] == row["sha256"]
    bad = runner.invoke(app, ["screening", "import", str(CSL / "consolidated.csv"), "--var-dir", str(tmp_path)])
    assert bad.exit_code == 1


def test_the_active_snapshot_screens_and_decisions_can_be_re_derived(tmp_path: Path) -> None:
    snap = import_csl((CSL / "consolidated.json").read_bytes(), tmp_path, source_file="consolidated.json")
    book = load_rulebook(var_dir=tmp_path)
    assert book.screener.list.sha256 == snap.sha256
    # Biren (listed 2023-10-17 in the fixture) as a Korean consignee in 2025: denied by screening.
    listed = award(
        country="KR", consignee="Beijing Biren Technology Development Co., Ltd.", awarded_at="2025-06-01T00:00:00+00:00"
    )
    opened = lifecycle.open_case(listed, book, {})
    assert opened.evaluation.outcome == "denied"
    assert opened.evaluation.screening.sha256 == snap.sha256
    ex = opened.evaluation.explanation
    assert ex.screening_snapshot == snap.sha256 and ex.rule_version == opened.evaluation.ruleset.version
    assert [h.entry_id for h in ex.screening_hits] == ["fixture-019", "fixture-019"]
    assert ex.screening_hits[0].federal_register_notice == "88 FR 71991"
    # Re-derive from the record alone: its rule version and its snapshot hash.
    record = opened.case.decision
    # (only that version offered, so it is selected by date as it was, not pinned)
    replay_book = RuleBook(
        tuple(rs for rs in book.rulesets if rs.version == record["ruleset"]["version"]),
        book.catalogue,
        Screener(load_snapshot(tmp_path, record["screening"]["sha256"])),
    )
    replayed = lifecycle.open_case(listed, replay_book, {})
    assert replayed.case.decision == record
    assert replayed.evaluation.outcome == "denied"


def test_a_bad_active_snapshot_stops_the_start_up(tmp_path: Path) -> None:
    snap = import_csl((CSL / "consolidated.json").read_bytes(), tmp_path, source_file="consolidated.json")
    (tmp_path / "screening" / f"{snap.sha256}.json").write_text("{}")
    with pytest.raises(RulesetDataError):
        load_rulebook(var_dir=tmp_path)


def test_the_service_follows_a_new_import_without_a_restart(tmp_path: Path) -> None:
    from services.export_controls.domain.snapshots import ActiveScreening

    book = load_rulebook(var_dir=tmp_path)  # nothing imported yet: the shipped list
    shipped = book.shipped_screener
    assert shipped is not None and book.screener is shipped
    active = ActiveScreening(tmp_path, shipped, book.screener)
    assert active.current() is shipped
    first = import_csl((CSL / "consolidated.json").read_bytes(), tmp_path, source_file="consolidated.json")
    assert active.current().list.sha256 == first.sha256
    same = active.current()
    assert active.current() is same  # pointer unchanged: the loaded snapshot is reused
    second = import_csl(
        (CSL / "consolidated.csv").read_bytes(), tmp_path, source_file="c.csv", source_date=date(2025, 6, 2)
    )
    assert active.current().list.sha256 == second.sha256 != first.sha256
    # A pointer naming a snapshot that does not verify: refused, never used.
    stored = tmp_path / "screening" / f"{first.sha256}.json"
    stored.write_bytes(stored.read_bytes().replace(b"Huawei", b"Hua-wei"))
    (tmp_path / "screening" / "ACTIVE").write_text(f"{first.sha256}\n")
    with pytest.raises(RulesetDataError, match="does not match its hash"):
        active.current()
    (tmp_path / "screening" / "ACTIVE").unlink()
    assert active.current() is shipped


def _readme_rows() -> dict[str, tuple[str, str]]:
    """The fixture README's table of checked records: record id → (start_date, FR notice)."""
    import re

    rows: dict[str, tuple[str, str]] = {}
    for line in (CSL / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        ids = re.search(r"\(fixture-(\d+)(?:…(\d+)|, (\d+))?\)", cells[0]) if len(cells) == 4 else None
        if ids is None:
            continue
        first = int(ids.group(1))
        last = int(ids.group(2) or ids.group(3) or first)
        numbers = range(first, last + 1) if ids.group(2) else {first, last}
        start = re.search(r"\d{4}-\d{2}-\d{2}", cells[1])
        notice = re.search(r"\d+ FR \d+", cells[2])
        assert start and notice, line
        rows.update({f"fixture-{n:03d}": (start.group(), notice.group()) for n in numbers})
    return rows


def test_every_fixture_record_is_checked_or_labelled_synthetic() -> None:
    # The fixture holds only records whose date and notice the README cites a source for, and
    # synthetic ones that say so in their name, id and remarks.
    records = json.loads((CSL / "consolidated.json").read_text())["results"]
    checked = _readme_rows()
    for r in records:
        if r["id"].startswith("synthetic-"):
            assert r["name"].startswith("Example") and "SYNTHETIC" in r["remarks"], r["id"]
        else:
            assert checked.get(r["id"]) == (r["start_date"], r["federal_register_notice"]), r["id"]
    assert len(checked) == len([r for r in records if not r["id"].startswith("synthetic-")]) == 25
