"""Delivery rules of docs/architecture.md §5, pure: no Kafka, no SQL.

EPCIS-style steps at serial level: shipping (dispatched), customs (cleared), receiving and
inspecting (received, damaged), installing, accepting. Each function judges one event against
what the service knows and says what changes, or raises RuleBroken with its reason code.

Serial sets run to thousands per batch, so the caller loads only the serials an event names
(set-based) and hands them in as `Known`; the batch carries running counts, so facts never
need a scan of the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

from shared.contract import (
    BatchAccepted,
    BatchInstalled,
    ReasonCode,
    ShipmentCleared,
    ShipmentDispatched,
    ShipmentReceived,
)
from shared.contract.decisions import RuleBroken
from shared.contract.facts import CLEARED_STATUSES, AwardFacts, DeliveryFacts, ExportFacts, anomaly

# Serial states. `missing` is a serial its shipment arrived without: no longer in transit,
# never received; auditors see it as an anomaly.
DISPATCHED = "dispatched"
MISSING = "missing"
RECEIVED = "received"
DAMAGED = "damaged"
INSTALLED = "installed"
ACCEPTED = "accepted"
FAILED = "failed"

AT_SITE = frozenset({RECEIVED, DAMAGED, INSTALLED, ACCEPTED, FAILED})
INSTALLED_OR_LATER = frozenset({INSTALLED, ACCEPTED, FAILED})

DENIED_STATUSES = frozenset({"denied", "license_denied"})

# An export case only moves forward: license_required → licensed / license_denied; cleared and
# denied are final outcomes of the first evaluation. A later decision of a lower rank is stale.
_EXPORT_RANK = {"license_required": 0, "cleared": 1, "denied": 1, "licensed": 2, "license_denied": 2}

# How many serials a message names before it says "and N more"; messages stay readable.
_NAMED = 5


class SerialInfo(NamedTuple):
    batch_id: str
    state: str


# What the service already holds of the serials an event names (absent: never seen).
Known = Mapping[str, SerialInfo]


@dataclass(frozen=True)
class Batch:
    """A batch as deliveries sees it: the award and export case it was told of, and its counts."""

    batch_id: str
    awarded_quantity: int | None = None
    export_status: str | None = None
    cleared_quantity: int = 0
    export_decided_at: datetime | None = None
    dispatched: int = 0
    in_transit: int = 0
    missing: int = 0
    received: int = 0
    damaged: int = 0
    installed: int = 0
    accepted: int = 0
    failed: int = 0
    shipments: int = 0

    def facts(self) -> dict[str, Any]:
        """The DeliveryFacts snapshot (plus `missing`, which DeliveryFacts allows as an extra)."""
        return DeliveryFacts(
            batch_id=self.batch_id,
            awarded_quantity=self.awarded_quantity or 0,
            dispatched=self.dispatched,
            in_transit=self.in_transit,
            received=self.received,
            damaged=self.damaged,
            installed=self.installed,
            accepted=self.accepted,
            failed=self.failed,
            shipments=self.shipments,
            missing=self.missing,
        ).model_dump(mode="json")


@dataclass(frozen=True)
class Shipment:
    shipment_id: str
    batch_id: str
    carrier: str
    origin_country: str
    route: tuple[str, ...]
    dispatched_at: str
    serials: int
    status: str = DISPATCHED
    declarations: tuple[str, ...] = ()
    received: int = 0
    damaged: int = 0
    missing: int = 0

    def facts(self) -> dict[str, Any]:
        return {
            "shipment_id": self.shipment_id,
            "batch_id": self.batch_id,
            "carrier": self.carrier,
            "status": self.status,
            "origin_country": self.origin_country,
            "route": list(self.route),
            "dispatched_at": self.dispatched_at,
            "serials": self.serials,
            "declarations": list(self.declarations),
            "received": self.received,
            "damaged": self.damaged,
            "missing": self.missing,
        }


# --- what other services told us ----------------------------------------------------------


def record_award(batch: Batch | None, award: AwardFacts) -> Batch:
    """An award is a snapshot: the latest one for the batch is the one that holds."""
    return replace(batch or Batch(batch_id=award.batch_id), awarded_quantity=award.quantity)


def record_export(batch: Batch | None, export: ExportFacts, decided_at: datetime) -> Batch:
    """Keep the export case, never letting a stale or redelivered decision move it back."""
    b = batch or Batch(batch_id=export.batch_id)
    if b.export_status is not None and b.export_decided_at is not None:
        current = (_EXPORT_RANK.get(b.export_status, 0), b.export_decided_at)
        if (_EXPORT_RANK.get(export.status, 0), decided_at) <= current:
            return b
    return replace(
        b, export_status=export.status, cleared_quantity=export.cleared_quantity, export_decided_at=decided_at
    )


# --- partner events -----------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatched:
    batch: Batch
    shipment: Shipment


@dataclass(frozen=True)
class Received:
    batch: Batch
    shipment: Shipment
    intact: frozenset[str]
    damaged: frozenset[str]
    missing: frozenset[str]
    anomalies: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Installed:
    batch: Batch


@dataclass(frozen=True)
class Acceptance:
    batch: Batch
    anomalies: list[dict[str, Any]] = field(default_factory=list)


def _named(serials: Iterable[str]) -> str:
    items = sorted(serials)
    more = f" and {len(items) - _NAMED} more" if len(items) > _NAMED else ""
    return ", ".join(items[:_NAMED]) + more


def _outside(serials: Iterable[str], known: Known, batch_id: str, states: frozenset[str]) -> list[str]:
    """The serials that are not of this batch in one of these states (unknown ones included)."""
    return [
        s for s in serials if (info := known.get(s)) is None or info.batch_id != batch_id or info.state not in states
    ]


def _units(n: int) -> str:
    return f"{n:,} unit" if n == 1 else f"{n:,} units"


def _no_repeats(serials: Iterable[str], where: str) -> None:
    repeated = [s for s, n in Counter(serials).items() if n > 1]
    if repeated:
        raise RuleBroken(ReasonCode.SERIAL_DUPLICATE, f"serial(s) {_named(repeated)} repeated in {where}")


def known_batch(batch: Batch | None, batch_id: str) -> Batch:
    """The batch, which must have been awarded: nothing is delivered for a batch nobody bought."""
    if batch is None or batch.awarded_quantity is None:
        raise RuleBroken(ReasonCode.UNKNOWN_BATCH, f"no awarded batch {batch_id!r}")
    return batch


def _cleared_limit(batch: Batch, awarded: int) -> int:
    # A `cleared` case that carries no quantity covers the award it was evaluated on; a licence
    # covers exactly the quantity it names.
    if batch.export_status == "cleared" and batch.cleared_quantity <= 0:
        return awarded
    return batch.cleared_quantity


def dispatch(batch: Batch | None, shipment_exists: bool, known: Known, e: ShipmentDispatched) -> Dispatched:
    """`known` holds those of the event's serials the programme has already seen, in any batch."""
    n = len(e.serials)
    if batch is None or batch.awarded_quantity is None:
        # Goods shipped for a batch nobody awarded were shipped without export clearance too.
        violation = anomaly(
            "EXPORT_VIOLATION",
            f"dispatch of {_units(n)} for batch {e.batch_id!r}, which has no award and no export clearance",
            e.batch_id,
            shipment_id=e.shipment_id,
            export_status="none",
        )
        raise RuleBroken(ReasonCode.UNKNOWN_BATCH, f"no awarded batch {e.batch_id!r}", anomalies=[violation])
    b = batch
    if b.export_status not in CLEARED_STATUSES:
        status = b.export_status or "none"
        code = ReasonCode.EXPORT_DENIED if status in DENIED_STATUSES else ReasonCode.EXPORT_NOT_CLEARED
        violation = anomaly(
            "EXPORT_VIOLATION",
            f"dispatch of {_units(n)} before export clearance (export status: {status})",
            e.batch_id,
            shipment_id=e.shipment_id,
            export_status=status,
        )
        raise RuleBroken(code, f"batch {e.batch_id!r} is not export-cleared (status: {status})", anomalies=[violation])
    if shipment_exists:
        raise RuleBroken(ReasonCode.DUPLICATE_SHIPMENT, f"shipment {e.shipment_id!r} was already dispatched")
    _no_repeats(e.serials, f"shipment {e.shipment_id!r}")
    if known:
        raise RuleBroken(ReasonCode.SERIAL_DUPLICATE, f"serial(s) {_named(known)} already known in the programme")
    awarded = b.awarded_quantity or 0
    if b.dispatched + n > awarded:
        raise RuleBroken(
            ReasonCode.QUANTITY_EXCEEDS_AWARD,
            f"{b.dispatched} dispatched + {n} would exceed the {awarded} awarded for batch {e.batch_id!r}",
        )
    limit = _cleared_limit(b, awarded)
    if b.dispatched + n > limit:
        raise RuleBroken(
            ReasonCode.QUANTITY_EXCEEDS_LICENSE,
            f"{b.dispatched} dispatched + {n} would exceed the {limit} cleared for export ({b.export_status})",
        )
    shipment = Shipment(
        shipment_id=e.shipment_id,
        batch_id=e.batch_id,
        carrier=e.carrier,
        origin_country=e.origin_country,
        route=tuple(e.route),
        dispatched_at=e.dispatched_at.isoformat(),
        serials=n,
    )
    counts = replace(b, dispatched=b.dispatched + n, in_transit=b.in_transit + n, shipments=b.shipments + 1)
    return Dispatched(batch=counts, shipment=shipment)


def _shipment_of(shipment: Shipment | None, shipment_id: str, batch_id: str) -> Shipment:
    if shipment is None or shipment.batch_id != batch_id:
        raise RuleBroken(ReasonCode.UNKNOWN_SHIPMENT, f"no shipment {shipment_id!r} in batch {batch_id!r}")
    if shipment.status == RECEIVED:
        raise RuleBroken(ReasonCode.OUT_OF_ORDER, f"shipment {shipment_id!r} was already received")
    return shipment


def clear(shipment: Shipment | None, e: ShipmentCleared) -> Shipment:
    """Customs clearance; a shipment on a multi-country route may clear more than once."""
    s = _shipment_of(shipment, e.shipment_id, e.batch_id)
    return replace(s, status="cleared", declarations=(*s.declarations, e.declaration_number))


def receive(
    batch: Batch | None, shipment: Shipment | None, dispatched: frozenset[str], e: ShipmentReceived
) -> Received:
    """`dispatched` is the set of serials the shipment left with."""
    s = _shipment_of(shipment, e.shipment_id, e.batch_id)
    batch = known_batch(batch, e.batch_id)
    _no_repeats(e.received_serials, "received_serials")
    _no_repeats(e.damaged_serials, "damaged_serials")
    received, damaged = frozenset(e.received_serials), frozenset(e.damaged_serials)
    if stray := received - dispatched:
        raise RuleBroken(
            ReasonCode.SERIAL_UNKNOWN, f"serial(s) {_named(stray)} were not dispatched in shipment {e.shipment_id!r}"
        )
    if stray := damaged - received:
        raise RuleBroken(
            ReasonCode.SERIAL_UNKNOWN,
            f"damaged serial(s) {_named(stray)} are not among the received serials (a damaged unit is one received)",
        )
    missing = dispatched - received
    anomalies = []
    if damaged:
        anomalies.append(
            anomaly(
                "DAMAGED_IN_TRANSIT",
                f"{_units(len(damaged))} of shipment {e.shipment_id} received damaged",
                e.batch_id,
                severity="medium",
                shipment_id=e.shipment_id,
                serials=sorted(damaged),
            )
        )
    if missing:
        anomalies.append(
            anomaly(
                "MISSING_IN_TRANSIT",
                f"{_units(len(missing))} dispatched in shipment {e.shipment_id} did not arrive",
                e.batch_id,
                shipment_id=e.shipment_id,
                serials=sorted(missing),
            )
        )
    counts = replace(
        batch,
        in_transit=batch.in_transit - len(dispatched),
        received=batch.received + len(received),
        damaged=batch.damaged + len(damaged),
        missing=batch.missing + len(missing),
    )
    arrived = replace(s, status=RECEIVED, received=len(received), damaged=len(damaged), missing=len(missing))
    return Received(counts, arrived, received - damaged, damaged, missing, anomalies)


def install(batch: Batch | None, known: Known, e: BatchInstalled) -> Installed:
    b = known_batch(batch, e.batch_id)
    serials = [p.serial for p in e.placements]
    _no_repeats(serials, "placements")
    if not_here := _outside(serials, known, e.batch_id, AT_SITE):
        raise RuleBroken(
            ReasonCode.SERIAL_NOT_RECEIVED, f"serial(s) {_named(not_here)} were never received for batch {e.batch_id!r}"
        )
    if damaged := [s for s in serials if known[s].state == DAMAGED]:
        raise RuleBroken(ReasonCode.SERIAL_DAMAGED, f"serial(s) {_named(damaged)} were received damaged")
    if again := [s for s in serials if known[s].state in INSTALLED_OR_LATER]:
        raise RuleBroken(ReasonCode.SERIAL_DUPLICATE, f"serial(s) {_named(again)} are already installed")
    return Installed(replace(b, installed=b.installed + len(serials)))


def accept(batch: Batch | None, known: Known, e: BatchAccepted) -> Acceptance:
    b = known_batch(batch, e.batch_id)
    passed, failed = e.passed_serials, e.failed_serials
    if not passed and not failed:
        raise RuleBroken(ReasonCode.SCHEMA_INVALID, "an acceptance must name at least one passed or failed serial")
    _no_repeats([*passed, *failed], "passed_serials and failed_serials")
    serials = [*passed, *failed]
    if not_installed := _outside(serials, known, e.batch_id, INSTALLED_OR_LATER):
        raise RuleBroken(
            ReasonCode.SERIAL_NOT_INSTALLED,
            f"serial(s) {_named(not_installed)} are not installed in batch {e.batch_id!r}",
        )
    if decided := [s for s in serials if known[s].state in (ACCEPTED, FAILED)]:
        raise RuleBroken(ReasonCode.SERIAL_DUPLICATE, f"serial(s) {_named(decided)} were already accepted or failed")
    anomalies = []
    if failed:
        anomalies.append(
            anomaly(
                "ACCEPTANCE_FAILED",
                f"{_units(len(failed))} of batch {e.batch_id} failed acceptance",
                e.batch_id,
                severity="medium",
                serials=sorted(failed),
                report_uri=e.report_uri,
            )
        )
    return Acceptance(replace(b, accepted=b.accepted + len(passed), failed=b.failed + len(failed)), anomalies)
