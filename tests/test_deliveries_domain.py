"""The delivery rules of docs/architecture.md §5, one test per rule, on the pure domain (no Kafka, no SQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.deliveries import domain
from services.deliveries.domain import Batch, RuleBroken, SerialInfo, Shipment
from shared.contract import (
    BatchAccepted,
    BatchInstalled,
    ReasonCode,
    ShipmentCleared,
    ShipmentDispatched,
    ShipmentReceived,
)
from shared.contract.facts import AwardFacts, DeliveryFacts, ExportFacts

B = "B-2025-NHN-01"
T0 = datetime(2025, 9, 1, tzinfo=UTC)


def batch(**kw: Any) -> Batch:
    values: dict[str, Any] = {
        "batch_id": B,
        "awarded_quantity": 10,
        "export_status": "cleared",
        "cleared_quantity": 10,
        "export_decided_at": T0,
    }
    return Batch(**{**values, **kw})


def dispatched(serials: list[str], shipment_id: str = "S1", batch_id: str = B) -> ShipmentDispatched:
    return ShipmentDispatched(
        shipment_id=shipment_id,
        batch_id=batch_id,
        carrier="Korean Air Cargo",
        serials=serials,
        origin_country="TW",
        route=["TW", "KR"],
        dispatched_at=T0,
    )


def shipment(serials: int = 3, status: str = "dispatched", batch_id: str = B) -> Shipment:
    return Shipment(
        shipment_id="S1",
        batch_id=batch_id,
        carrier="Korean Air Cargo",
        origin_country="TW",
        route=("TW", "KR"),
        dispatched_at=T0.isoformat(),
        serials=serials,
        status=status,
    )


def received(ok: list[str], damaged: list[str] | None = None, batch_id: str = B) -> ShipmentReceived:
    return ShipmentReceived(
        shipment_id="S1",
        batch_id=batch_id,
        site_id="haenam",
        received_serials=ok,
        damaged_serials=damaged or [],
        received_at=T0,
    )


def installed(*serials: str) -> BatchInstalled:
    return BatchInstalled(
        batch_id=B,
        site_id="haenam",
        placements=[{"serial": s, "rack": "R1", "slot": str(i)} for i, s in enumerate(serials)],  # type: ignore[misc]
        installed_at=T0,
    )


def acceptance(passed: list[str], failed: list[str] | None = None) -> BatchAccepted:
    return BatchAccepted(
        batch_id=B, passed_serials=passed, failed_serials=failed or [], accepted_at=T0, report_uri="s3://r/1"
    )


def at(state: str, batch_id: str = B) -> SerialInfo:
    return SerialInfo(batch_id, state)


def broken(code: ReasonCode, call: Any, *args: Any) -> RuleBroken:
    with pytest.raises(RuleBroken) as err:
        call(*args)
    assert err.value.code == code, err.value.message
    return err.value


IN_TRANSIT = batch(dispatched=3, in_transit=3, shipments=1)
DISPATCHED_SERIALS = frozenset({"A", "B", "C"})


# --- award and export case ----------------------------------------------------------------


def award(quantity: int) -> AwardFacts:
    money = {"amount": "1", "currency": "USD"}
    return AwardFacts.model_validate(
        {
            "batch_id": B,
            "quote_id": "Q1",
            "vendor_id": "v",
            "program_id": "p",
            "site_id": "haenam",
            "model": "B200",
            "quantity": quantity,
            "unit_price": money,
            "total_price": money,
            "origin_country": "TW",
            "route": ["TW", "KR"],
            "consignee": {"name": "c", "country": "KR"},
            "end_user": {"name": "e", "country": "KR", "headquarters_country": "KR"},
            "awarded_at": T0.isoformat(),
            "funding": {"currency": "KRW", "required": "1", "earmarked": "1", "shortfall": "0", "pledges": []},
        }
    )


def export(status: str, quantity: int = 0) -> ExportFacts:
    outcome = {"licensed": "license_required", "license_denied": "license_required"}.get(status, status)
    return ExportFacts.model_validate(
        {"batch_id": B, "status": status, "outcome": outcome, "rule_version": "r", "cleared_quantity": quantity}
    )


def test_award_sets_the_awarded_quantity_of_a_batch_first_seen_through_its_export_case() -> None:
    seen = domain.record_export(None, export("license_required"), T0)
    assert domain.record_award(seen, award(7656)).awarded_quantity == 7656


def test_export_case_moves_forward_to_the_licence() -> None:
    case = domain.record_export(None, export("license_required"), T0)
    case = domain.record_export(case, export("licensed", 500), T0 + timedelta(days=1))
    assert (case.export_status, case.cleared_quantity) == ("licensed", 500)


def test_export_case_never_goes_back_to_license_required() -> None:
    case = domain.record_export(None, export("licensed", 500), T0)
    # Even a later-stamped (say, replayed) evaluation does not undo the licence.
    assert domain.record_export(case, export("license_required"), T0 + timedelta(days=1)).export_status == "licensed"


def test_export_case_keeps_the_latest_of_equal_rank() -> None:
    case = domain.record_export(None, export("license_denied"), T0 + timedelta(days=2))
    assert domain.record_export(case, export("licensed", 5), T0 + timedelta(days=1)).export_status == "license_denied"


# --- dispatched ---------------------------------------------------------------------------


def test_dispatch_of_an_unknown_batch_is_refused_and_flagged() -> None:
    err = broken(ReasonCode.UNKNOWN_BATCH, domain.dispatch, None, False, {}, dispatched(["A"]))
    # Shipped for a batch nobody awarded: shipped without export clearance, which auditors must see.
    assert [a["code"] for a in err.anomalies] == ["EXPORT_VIOLATION"]


def test_dispatch_of_a_batch_with_an_export_case_but_no_award() -> None:
    broken(ReasonCode.UNKNOWN_BATCH, domain.dispatch, batch(awarded_quantity=None), False, {}, dispatched(["A"]))


@pytest.mark.parametrize("status", [None, "license_required"])
def test_dispatch_before_export_clearance_is_refused_and_flagged(status: str | None) -> None:
    err = broken(
        ReasonCode.EXPORT_NOT_CLEARED, domain.dispatch, batch(export_status=status), False, {}, dispatched(["A", "B"])
    )
    [flag] = err.anomalies
    assert flag["code"] == "EXPORT_VIOLATION" and flag["severity"] == "high"
    assert flag["batch_id"] == B and flag["shipment_id"] == "S1" and flag["export_status"] == (status or "none")
    assert "2 units" in flag["message"]


@pytest.mark.parametrize("status", ["denied", "license_denied"])
def test_dispatch_of_a_denied_batch(status: str) -> None:
    err = broken(ReasonCode.EXPORT_DENIED, domain.dispatch, batch(export_status=status), False, {}, dispatched(["A"]))
    assert [a["code"] for a in err.anomalies] == ["EXPORT_VIOLATION"]


def test_dispatch_reusing_a_shipment_id() -> None:
    broken(ReasonCode.DUPLICATE_SHIPMENT, domain.dispatch, batch(), True, {}, dispatched(["A"]))


def test_dispatch_repeating_a_serial() -> None:
    err = broken(ReasonCode.SERIAL_DUPLICATE, domain.dispatch, batch(), False, {}, dispatched(["A", "X9", "X9"]))
    assert "X9" in err.message


def test_dispatch_of_a_serial_known_elsewhere_in_the_programme() -> None:
    known = {"X9": at("installed", batch_id="B-other")}
    err = broken(ReasonCode.SERIAL_DUPLICATE, domain.dispatch, batch(), False, known, dispatched(["A", "X9"]))
    assert "X9" in err.message


def test_dispatch_beyond_the_award_counts_what_was_dispatched_before() -> None:
    err = broken(
        ReasonCode.QUANTITY_EXCEEDS_AWARD, domain.dispatch, batch(dispatched=9), False, {}, dispatched(["A", "B"])
    )
    assert "10 awarded" in err.message


def test_dispatch_beyond_the_licence() -> None:
    licensed = batch(export_status="licensed", cleared_quantity=2)
    broken(ReasonCode.QUANTITY_EXCEEDS_LICENSE, domain.dispatch, licensed, False, {}, dispatched(["A", "B", "C"]))


def test_dispatch_counts_serials_in_transit() -> None:
    done = domain.dispatch(batch(), False, {}, dispatched(["A", "B", "C"]))
    assert (done.batch.dispatched, done.batch.in_transit, done.batch.shipments) == (3, 3, 1)
    assert done.shipment.facts()["serials"] == 3 and done.shipment.status == "dispatched"


def test_cleared_case_without_a_quantity_covers_the_award() -> None:
    done = domain.dispatch(batch(cleared_quantity=0), False, {}, dispatched(["A"]))
    assert done.batch.dispatched == 1


# --- cleared (customs) --------------------------------------------------------------------


def cleared(batch_id: str = B) -> ShipmentCleared:
    return ShipmentCleared(shipment_id="S1", batch_id=batch_id, declaration_number="KR-CUS-1", cleared_at=T0)


def test_customs_clearance_of_an_unknown_shipment() -> None:
    broken(ReasonCode.UNKNOWN_SHIPMENT, domain.clear, None, cleared())


def test_customs_clearance_of_another_batch_shipment() -> None:
    broken(ReasonCode.UNKNOWN_SHIPMENT, domain.clear, shipment(batch_id="B-other"), cleared())


def test_customs_clearance_after_receipt() -> None:
    broken(ReasonCode.OUT_OF_ORDER, domain.clear, shipment(status="received"), cleared())


def test_customs_clearance_records_the_declaration() -> None:
    s = domain.clear(shipment(), cleared())
    assert (s.status, s.declarations) == ("cleared", ("KR-CUS-1",))


# --- received -----------------------------------------------------------------------------


def test_receipt_of_an_unknown_shipment() -> None:
    broken(ReasonCode.UNKNOWN_SHIPMENT, domain.receive, IN_TRANSIT, None, frozenset(), received(["A"]))


def test_receipt_of_a_serial_not_dispatched_in_that_shipment() -> None:
    err = broken(
        ReasonCode.SERIAL_UNKNOWN, domain.receive, IN_TRANSIT, shipment(), DISPATCHED_SERIALS, received(["A", "Z"])
    )
    assert "Z" in err.message


def test_damaged_serial_must_be_among_the_received() -> None:
    err = broken(
        ReasonCode.SERIAL_UNKNOWN,
        domain.receive,
        IN_TRANSIT,
        shipment(),
        DISPATCHED_SERIALS,
        received(["A", "B"], damaged=["C"]),
    )
    assert "C" in err.message


def test_receipt_repeating_a_serial() -> None:
    broken(
        ReasonCode.SERIAL_DUPLICATE, domain.receive, IN_TRANSIT, shipment(), DISPATCHED_SERIALS, received(["A", "A"])
    )


def test_second_receipt_of_a_shipment() -> None:
    broken(
        ReasonCode.OUT_OF_ORDER,
        domain.receive,
        IN_TRANSIT,
        shipment(status="received"),
        DISPATCHED_SERIALS,
        received([]),
    )


def test_damaged_units_are_accepted_and_flagged() -> None:
    done = domain.receive(IN_TRANSIT, shipment(), DISPATCHED_SERIALS, received(["A", "B", "C"], damaged=["B"]))
    assert (done.intact, done.damaged) == ({"A", "C"}, {"B"})
    assert (done.batch.received, done.batch.damaged, done.batch.in_transit) == (3, 1, 0)
    [flag] = done.anomalies
    assert (flag["code"], flag["severity"], flag["serials"]) == ("DAMAGED_IN_TRANSIT", "medium", ["B"])


def test_units_a_shipment_arrived_without_leave_transit_as_missing() -> None:
    done = domain.receive(IN_TRANSIT, shipment(), DISPATCHED_SERIALS, received(["A", "B"]))
    assert (done.batch.in_transit, done.batch.missing, done.missing) == (0, 1, {"C"})
    assert [a["code"] for a in done.anomalies] == ["MISSING_IN_TRANSIT"]
    assert done.shipment.status == "received"


# --- installed ----------------------------------------------------------------------------


def test_installation_in_an_unknown_batch() -> None:
    broken(ReasonCode.UNKNOWN_BATCH, domain.install, None, {"A": at("received")}, installed("A"))


@pytest.mark.parametrize(
    "known",
    [{}, {"A": at("dispatched")}, {"A": at("missing")}, {"A": at("received", batch_id="B-other")}],
    ids=["unknown", "in-transit", "missing", "other-batch"],
)
def test_installation_of_a_serial_never_received_in_this_batch(known: dict[str, SerialInfo]) -> None:
    broken(ReasonCode.SERIAL_NOT_RECEIVED, domain.install, batch(), known, installed("A"))


def test_installation_of_a_damaged_serial() -> None:
    broken(ReasonCode.SERIAL_DAMAGED, domain.install, batch(), {"A": at("damaged")}, installed("A"))


def test_installation_of_a_serial_already_installed() -> None:
    broken(ReasonCode.SERIAL_DUPLICATE, domain.install, batch(), {"A": at("installed")}, installed("A"))


def test_installation_repeating_a_serial() -> None:
    broken(ReasonCode.SERIAL_DUPLICATE, domain.install, batch(), {"A": at("received")}, installed("A", "A"))


def test_installation_counts() -> None:
    known = {"A": at("received"), "B": at("received")}
    assert domain.install(batch(received=2), known, installed("A", "B")).batch.installed == 2


# --- accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "known",
    [{}, {"A": at("received")}, {"A": at("installed", batch_id="B-other")}],
    ids=["unknown", "received", "other-batch"],
)
def test_acceptance_of_a_serial_not_installed_in_this_batch(known: dict[str, SerialInfo]) -> None:
    broken(ReasonCode.SERIAL_NOT_INSTALLED, domain.accept, batch(), known, acceptance(["A"]))


def test_acceptance_naming_a_serial_both_passed_and_failed() -> None:
    broken(ReasonCode.SERIAL_DUPLICATE, domain.accept, batch(), {"A": at("installed")}, acceptance(["A"], ["A"]))


@pytest.mark.parametrize("state", ["accepted", "failed"])
def test_acceptance_of_a_serial_already_decided(state: str) -> None:
    broken(ReasonCode.SERIAL_DUPLICATE, domain.accept, batch(), {"A": at(state)}, acceptance(["A"]))


def test_acceptance_naming_no_serial() -> None:
    broken(ReasonCode.SCHEMA_INVALID, domain.accept, batch(), {}, acceptance([]))


def test_failed_units_are_recorded_and_flagged() -> None:
    known = {"A": at("installed"), "B": at("installed")}
    done = domain.accept(batch(installed=2), known, acceptance(["A"], ["B"]))
    assert (done.batch.accepted, done.batch.failed) == (1, 1)
    [flag] = done.anomalies
    assert (flag["code"], flag["severity"], flag["serials"]) == ("ACCEPTANCE_FAILED", "medium", ["B"])


# --- facts --------------------------------------------------------------------------------


def test_facts_are_a_delivery_facts_snapshot() -> None:
    facts = batch(dispatched=3, in_transit=1, received=2, damaged=1, shipments=1).facts()
    assert DeliveryFacts.model_validate(facts).in_transit == 1
    assert set(facts) == {*DeliveryFacts.model_fields, "missing"}
