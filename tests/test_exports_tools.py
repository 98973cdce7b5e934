"""The ledger's exports read by the tools their users have, not only by our own tests: a batch's
whole life published over real Kafka, then its OCDS release package validated against the OCDS
1.1.5 release-package schema (with the bids extension it declares), compiled by `ocdsmerge` and
by `ocdskit compile`, and its EPCIS 2.0 document's event ids recomputed by GS1's reference
`epcis-event-hash-generator`.

tests/data/ocds holds the published OCDS 1.1.5 schemas and the bids extension's schema patch,
so nothing is fetched at test time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import json_merge_patch
import ocdsmerge
import pytest
from epcis_event_hash_generator.hash_generator import calculate_hashes_from_pre_hashes, derive_prehashes_from_events
from epcis_event_hash_generator.json_to_py import event_list_from_epcis_document_json
from jsonschema import Draft4Validator, FormatChecker
from ocdskit.util import detect_format
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from services.ledger.exports import epcis_document
from tests.partner import PartnerClient, TopicWatcher
from tests.test_batch_lifecycle_e2e import Programme, batch_view, uid

OCDS = Path(__file__).parent / "data" / "ocds"
# The generator loads its bundled JSON-LD context with an importlib.resources call Python deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning")


def release_schema() -> dict[str, Any]:
    """OCDS 1.1.5's release schema patched with the bids extension, as ocdsextensionregistry would."""
    core = json.loads((OCDS / "release-schema.json").read_text())
    return json_merge_patch.merge(core, json.loads((OCDS / "bid-extension-release-schema.json").read_text()))


@pytest.fixture(scope="module")
async def exports(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, database_urls: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One programme's batch through every step: two bids, two shipments, one unit damaged in
    transit, one failing acceptance; returns its (OCDS package, EPCIS document) from the API."""
    g = Programme(partner, outcomes, quantity=4, db=database_urls)
    await g.fund()
    await g.request()
    winner = await g.submit("nvidia-partner-kr", "50000000")
    await g.submit("supermicro-apac", "52000000")
    await g.award(winner)
    await batch_view(api, g.batch, lambda d: d["status"] == "cleared")
    await g.deliveries_see("cleared")
    s1, s2 = uid("S"), uid("S")
    first, second = g.serials(0, 3), g.serials(3, 4)
    await g.dispatch(s1, first)
    await g.dispatch(s2, second)
    await g.clear(s1)
    await g.receive(s1, first, damaged=[first[0]])
    await g.receive(s2, second)
    good = first[1:] + second
    site = "haenam-site"
    placements = [{"serial": s, "rack": "R01", "slot": str(i)} for i, s in enumerate(good)]
    await g.expect(
        await partner.publish(
            site,
            "batch.installed.v1",
            {"batch_id": g.batch, "site_id": "haenam-1", "placements": placements, "installed_at": "2025-07-10T00:00Z"},
        )
    )
    await g.expect(
        await partner.publish(
            site,
            "batch.accepted.v1",
            {
                "batch_id": g.batch,
                "passed_serials": good[:-1],
                "failed_serials": good[-1:],
                "accepted_at": "2025-07-20T09:30:00.123456+09:00",
                "report_uri": "https://example.invalid/acceptance/1.pdf",
            },
        )
    )
    await batch_view(api, g.batch, lambda d: d["status"] == "accepted")
    ocds = (await api.get(f"/v1/batches/{g.batch}/ocds")).raise_for_status().json()
    epcis = (await api.get(f"/v1/batches/{g.batch}/epcis")).raise_for_status().json()
    return ocds, epcis


def assert_event_ids_agree_with_generator(epcis: dict[str, Any]) -> None:
    """Every EPCIS event's eventID is the one GS1's reference generator computes for it."""
    events = epcis["epcisBody"]["eventList"]
    # The generator skips (and logs) an event it cannot read, so the counts must match too.
    prehashes = derive_prehashes_from_events(event_list_from_epcis_document_json(json.loads(json.dumps(epcis))))
    assert len(prehashes) == len(events)
    expected = calculate_hashes_from_pre_hashes(prehashes)
    for event, want, prehash in zip(events, expected, prehashes, strict=True):
        assert event["eventID"] == want, prehash
    assert len({e["eventID"] for e in events}) == len(events)


def ocds_errors(package: dict[str, Any]) -> list[str]:
    """The package's errors against the OCDS 1.1.5 release-package schema, formats included."""
    release = release_schema()
    registry = Registry().with_resource(release["id"], Resource.from_contents(release, default_specification=DRAFT4))
    schema = json.loads((OCDS / "release-package-schema.json").read_text())
    validator = Draft4Validator(schema, registry=registry, format_checker=FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(package)]


def compile_releases(packages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One compiled release per ocid, by ocdsmerge; its warnings (duplicate ids, inconsistent
    types) count as failures."""
    merger = ocdsmerge.Merger(schema=release_schema())
    by_ocid: dict[str, list[dict[str, Any]]] = {}
    for package in packages:
        for r in package["releases"]:
            by_ocid.setdefault(r["ocid"], []).append(r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {ocid: merger.create_compiled_release(releases) for ocid, releases in by_ocid.items()}


def ocdskit_compile(packages: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """`ocdskit compile --package --versioned` on the packages: the record package it prints."""
    schema = tmp_path / "release-schema.json"
    schema.write_text(json.dumps(release_schema()))
    done = subprocess.run(
        [sys.executable, "-m", "ocdskit", "compile", "--schema", str(schema), "--package", "--versioned"],
        input="\n".join(json.dumps(p) for p in packages),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return json.loads(done.stdout)


def test_epcis_event_ids_agree_with_the_gs1_reference_generator(exports: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert len(exports[1]["epcisBody"]["eventList"]) >= 8, "every step of the batch is an event"
    assert_event_ids_agree_with_generator(exports[1])


def test_ocds_package_is_valid_against_the_release_package_schema(
    exports: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    assert ocds_errors(exports[0]) == []
    assert [r["tag"] for r in exports[0]["releases"]] == [["tender"], ["award"], ["implementation"]]


def test_ocdsmerge_compiles_every_ocid(exports: tuple[dict[str, Any], dict[str, Any]]) -> None:
    compiled_releases = compile_releases([exports[0]])
    assert list(compiled_releases) == [exports[0]["releases"][0]["ocid"]]
    compiled = compiled_releases[exports[0]["releases"][0]["ocid"]]
    assert compiled["tag"] == ["compiled"]
    assert compiled["awards"][0]["suppliers"] == [{"id": "nvidia-partner-kr", "name": "nvidia-partner-kr"}]
    assert len(compiled["bids"]["details"]) == 2
    tender = compiled["tender"]
    assert (tender["procurementMethod"], tender["numberOfTenderers"]) == ("selective", 2), "what red-flag tools read"
    roles = {p["id"]: p["roles"] for p in compiled["parties"]}
    assert roles["nvidia-partner-kr"] == ["tenderer", "supplier"] and roles["supermicro-apac"] == ["tenderer"]
    milestones = compiled["contracts"][0]["implementation"]["milestones"]
    assert [m["title"] for m in milestones][-1] == "batch.accepted.v1"
    # The compiled release is itself a valid OCDS release.
    assert list(Draft4Validator(release_schema(), format_checker=FormatChecker()).iter_errors(compiled)) == []


def test_ocdskit_reads_and_compiles_the_package(exports: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    # What `ocdskit detect-format` prints, without paying for a second interpreter start.
    (tmp_path / "package.json").write_text(json.dumps(exports[0]))
    assert detect_format(str(tmp_path / "package.json"))[0] == "release package"
    records = ocdskit_compile([exports[0]], tmp_path)["records"]
    assert [r["ocid"] for r in records] == [exports[0]["releases"][0]["ocid"]]
    assert records[0]["compiledRelease"]["awards"][0]["value"] == {"amount": 200000000, "currency": "KRW"}
    assert len(records[0]["releases"]) == 3 and len(records[0]["versionedRelease"]["awards"]) == 1


def test_event_ids_agree_on_values_the_algorithm_canonicalises() -> None:
    """Without the stack: times in other zones and with microseconds, numeric-looking texts
    (leading zeros, signs), a GS1-vocabulary step: the generator and our ids still agree."""
    batch = "B-edge"

    def entry(i: int, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        event = {"data": {"batch_id": batch, **data}}
        return {
            "leaf_index": i,
            "event_type": f"gputrace.{kind}",
            "status": "accepted",
            "decision_id": f"0{i}",
            "event": event,
        }

    serials = ["SN-2", "SN-1", "0042"]
    shipment = {
        "shipment_id": "+7",
        "carrier": "007",
        "serials": serials,
        "dispatched_at": "2025-07-01T09:00:00.5+09:00",
    }
    received = {"received_serials": serials, "damaged_serials": ["0042"], "received_at": "2025-07-05T00:00:00.123556Z"}
    placements = [{"serial": "SN-1", "rack": "R 01", "slot": "01"}, {"serial": "SN-2", "rack": "1e3", "slot": "2.50"}]
    entries = [
        entry(1, "shipment.dispatched.v1", shipment),
        entry(
            2,
            "shipment.cleared.v1",
            {"shipment_id": "+7", "declaration_number": "00123", "cleared_at": "2025-07-03T00:00:00+00:00"},
        ),
        entry(3, "shipment.received.v1", {"shipment_id": "+7", "site_id": "h-1", **received}),
        entry(
            4,
            "batch.installed.v1",
            {"site_id": "h-1", "placements": placements, "installed_at": "2025-07-10T01:02:03Z"},
        ),
        entry(
            5,
            "batch.accepted.v1",
            {
                "passed_serials": ["SN-1"],
                "failed_serials": ["SN-2"],
                "accepted_at": "2025-07-20T00:00:00-05:00",
                "report_uri": "https://example.invalid/r?a=1",
            },
        ),
    ]
    doc = epcis_document(batch, entries)
    assert len(doc["epcisBody"]["eventList"]) == 8
    assert_event_ids_agree_with_generator(doc)
