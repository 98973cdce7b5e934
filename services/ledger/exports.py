"""Standard exports of a batch, built from its ledger entries: an OCDS 1.1 release package for the
procurement (request, quotes, award, delivery) and an EPCIS 2.0 document for its serials.

Each release and each EPCIS event names the ledger index it comes from, so an auditor can check
it against the log with an inclusion proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

OCDS_PREFIX = "ocds-gputrace"
EPCIS_CONTEXT = "https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld"
GPUTRACE_NS = "https://gputrace.example/ns/epcis/"
# The OCDS extensions the releases use: `bids` is not in the 1.1 core schema.
OCDS_EXTENSIONS = [
    "https://raw.githubusercontent.com/open-contracting-extensions/ocds_bid_extension/v1.1.5/extension.json"
]


def _number(amount: str) -> float | int:
    d = Decimal(amount)
    return int(d) if d == d.to_integral_value() else float(d)


def _value(money: dict[str, str] | None) -> dict[str, Any] | None:
    return {"amount": _number(money["amount"]), "currency": money["currency"]} if money else None


def _date_time(value: str) -> str:
    return f"{value}T23:59:59Z" if len(value) == 10 else value


def _accepted(entries: Iterable[dict[str, Any]], *types: str) -> list[dict[str, Any]]:
    wanted = {f"gputrace.{t}" for t in types}
    return [e for e in entries if e["status"] == "accepted" and e["event_type"] in wanted]


def ocds_package(batch_id: str, entries: list[dict[str, Any]], publisher: str) -> dict[str, Any]:
    """entries: the batch's decisions (ledger entry JSON plus `leaf_index`), in ledger order."""
    ocid = f"{OCDS_PREFIX}-{batch_id}"
    releases: list[dict[str, Any]] = []
    parties: dict[str, dict[str, Any]] = {}

    def party(pid: str | None, role: str) -> dict[str, str] | None:
        if not pid:
            return None
        p = parties.setdefault(pid, {"id": pid, "name": pid, "roles": []})
        if role not in p["roles"]:
            p["roles"].append(role)
        return {"id": pid, "name": pid}

    def release(entry: dict[str, Any], tag: str, **body: Any) -> None:
        releases.append(
            {
                "ocid": ocid,
                "id": f"{ocid}-{entry['leaf_index']}",
                "date": entry["decided_at"],
                "tag": [tag],
                "initiationType": "tender",
                "language": "en",
                "parties": [dict(p, roles=list(p["roles"])) for p in parties.values()],
                "gputrace:leafIndex": entry["leaf_index"],
                **body,
            }
        )

    bids: list[dict[str, Any]] = []
    for e in _accepted(entries, "batch.requested.v1"):
        d = e["event"]["data"]
        buyer = party(e.get("party_id"), "buyer")
        release(
            e,
            "tender",
            buyer=buyer,
            tender={
                "id": batch_id,
                "title": f"{d['quantity']} × {d['model']} for {d['site_id']}",
                "status": "active",
                # Only the programme's registered vendors may quote (OCDS: "only qualified suppliers").
                "procurementMethod": "selective",
                "procurementMethodDetails": "Quotes from registered vendors",
                "items": [
                    {
                        "id": "1",
                        "description": f"GPU {d['model']}",
                        "quantity": d["quantity"],
                        "classification": {"scheme": "gputrace-gpu-catalogue", "id": d["model"]},
                    }
                ],
                # When the GPUs are needed: the contract's period, not the bidding window. OCDS
                # dates are date-times; a plain date means the end of that day.
                "contractPeriod": {"endDate": _date_time(d["needed_by"])},
            },
        )
    for e in _accepted(entries, "quote.submitted.v1"):
        d = e["event"]["data"]
        bids.append(
            {
                "id": d["quote_id"],
                "date": e["decided_at"],
                "status": "valid",
                "tenderers": [party(d["vendor_id"], "tenderer")],
                "value": _value(
                    {
                        "amount": str(Decimal(d["unit_price"]["amount"]) * d["quantity"]),
                        "currency": d["unit_price"]["currency"],
                    }
                ),
            }
        )
    for e in _accepted(entries, "quote.awarded.v1"):
        award = e["facts"]["award"]
        supplier = party(award["vendor_id"], "supplier")
        release(
            e,
            "award",
            # Red-flag tools (e.g. OCDS Cardinal's single-bidder R018) read the count from here.
            tender={"id": batch_id, "numberOfTenderers": len({t["id"] for b in bids for t in b["tenderers"]})},
            bids={"details": bids},
            awards=[
                {
                    "id": f"{batch_id}-award",
                    "title": f"Award of quote {award['quote_id']}",
                    "status": "active",
                    "date": award["awarded_at"],
                    "value": _value(award["total_price"]),
                    "suppliers": [supplier],
                    "items": [
                        {
                            "id": "1",
                            "description": f"GPU {award['model']}",
                            "quantity": award["quantity"],
                            "unit": {"name": "GPU", "value": _value(award["unit_price"])},
                        }
                    ],
                }
            ],
        )
    deliveries = _accepted(
        entries, "batch.accepted.v1", "batch.installed.v1", "shipment.received.v1", "shipment.dispatched.v1"
    )
    if deliveries:
        last = deliveries[-1]
        counts = last["facts"].get("delivery", {})
        release(
            last,
            "implementation",
            contracts=[
                {
                    "id": f"{batch_id}-contract",
                    "awardID": f"{batch_id}-award",
                    "status": "active",
                    "implementation": {
                        "milestones": [
                            {
                                "id": str(x["leaf_index"]),
                                "title": x["event_type"].removeprefix("gputrace."),
                                "status": "met",
                                "dateMet": x["decided_at"],
                            }
                            for x in deliveries
                        ],
                    },
                    "gputrace:delivery": counts,
                }
            ],
        )
    return {
        "uri": f"urn:gputrace:ocds:{batch_id}",
        "version": "1.1",
        "publishedDate": datetime.now(UTC).isoformat(),
        "publisher": {"name": publisher},
        "extensions": OCDS_EXTENSIONS,
        "releases": releases,
    }


# EPCIS business steps and dispositions from the GS1 Core Business Vocabulary (CBV 2.0).
_STEPS = {
    "gputrace.shipment.dispatched.v1": "shipping",
    "gputrace.shipment.cleared.v1": "inspecting",
    "gputrace.shipment.received.v1": "receiving",
    "gputrace.batch.installed.v1": "installing",
    "gputrace.batch.accepted.v1": "accepting",
}


def epcis_document(batch_id: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    shipments: dict[str, list[str]] = {}  # a customs clearance names the shipment, not its serials
    for e in entries:
        step = _STEPS.get(e["event_type"])
        if step is None or e["status"] != "accepted":
            continue
        d = e["event"]["data"]
        base = {
            "type": "ObjectEvent",
            "eventTime": _time(d),
            "eventTimeZoneOffset": "+00:00",
            "action": "OBSERVE",
            "bizStep": step,
            "gputrace:batchId": batch_id,
            "gputrace:leafIndex": e["leaf_index"],
            "gputrace:decisionId": e["decision_id"],
        }
        site = d.get("site_id")
        if site:
            base["bizLocation"] = {"id": f"urn:gputrace:site:{site}"}
        if e["event_type"] == "gputrace.shipment.dispatched.v1":
            shipments[d["shipment_id"]] = d["serials"]
        for serials, disposition, extra in _groups(e["event_type"], d, shipments):
            if serials:
                event = {
                    **base,
                    "epcList": [f"urn:gputrace:serial:{s}" for s in serials],
                    "disposition": disposition,
                    **extra,
                }
                events.append({"eventID": event_hash(event), **event})
    return {
        "@context": [EPCIS_CONTEXT, {"gputrace": GPUTRACE_NS}],
        "type": "EPCISDocument",
        "schemaVersion": "2.0",
        "creationDate": datetime.now(UTC).isoformat(),
        "epcisBody": {"eventList": events},
    }


def _time(data: dict[str, Any]) -> str:
    for key in ("dispatched_at", "cleared_at", "received_at", "installed_at", "accepted_at"):
        if key in data:
            return data[key]
    raise KeyError("event has no time")


def _groups(
    event_type: str, d: dict[str, Any], shipments: dict[str, list[str]]
) -> list[tuple[list[str], str, dict[str, Any]]]:
    if event_type == "gputrace.shipment.dispatched.v1":
        return [
            (d["serials"], "in_transit", {"gputrace:shipmentId": d["shipment_id"], "gputrace:carrier": d["carrier"]})
        ]
    if event_type == "gputrace.shipment.cleared.v1":
        return [
            (
                shipments.get(d["shipment_id"], []),
                "in_transit",
                {"gputrace:declarationNumber": d["declaration_number"], "gputrace:shipmentId": d["shipment_id"]},
            )
        ]
    if event_type == "gputrace.shipment.received.v1":
        damaged = set(d.get("damaged_serials", []))
        good = [s for s in d["received_serials"] if s not in damaged]
        return [(good, "in_progress", {}), (sorted(damaged), "damaged", {})]
    if event_type == "gputrace.batch.installed.v1":
        return [
            ([p["serial"]], "active", {"gputrace:rack": p["rack"], "gputrace:slot": p["slot"]}) for p in d["placements"]
        ]
    if event_type == "gputrace.batch.accepted.v1":
        return [
            (d["passed_serials"], "conformant", {"gputrace:reportUri": d["report_uri"]}),
            (d.get("failed_serials", []), "non_conformant", {"gputrace:reportUri": d["report_uri"]}),
        ]
    return []


# The GS1 event hash (CBV 2.0 §8.9, "ni:///sha-256;…?ver=CBV2.0"): a canonical pre-hash string of
# the event's fields in a fixed order, then the user extensions sorted, hashed with SHA-256.
# Written for the fields epcis_document emits; tests/test_exports_tools.py checks it against
# epcis-event-hash-generator (the reference implementation) on every event. That generator is
# not used here: it expands the whole document as JSON-LD (seconds for thousands of serials)
# and keeps its state in module globals.
CBV = "https://ref.gs1.org/cbv/"
_ORDER = ("eventTime", "eventTimeZoneOffset", "epcList", "action", "bizStep", "disposition", "bizLocation")
_VOCABULARY = {"bizStep": "BizStep-", "disposition": "Disp-"}
_NUMBER_START = frozenset("0123456789+-.iInN")  # what float() accepts first: digits, sign, inf, nan


def event_hash(event: dict[str, Any]) -> str:
    """The event's id per the GS1 event-hash algorithm, for an event built by epcis_document."""
    parts = [f"eventType={event['type']}"]
    for key in _ORDER:
        value = event.get(key)
        if value is None:
            continue
        if key == "eventTime":
            parts.append(f"eventTime={_hash_time(value)}")
        elif key == "epcList":
            # Our serial URNs: never numbers nor GS1 keys, so stripping is all their canonical form needs.
            parts.append("epcList" + "".join(sorted(["epc=" + v.strip() for v in value])))
        elif key == "bizLocation":
            parts.append(f"bizLocationid={_hash_value(value['id'])}")
        elif key in _VOCABULARY and ":" not in value:  # a bare CBV term stands for its web URI
            parts.append(f"{key}={CBV}{_VOCABULARY[key]}{value}")
        else:
            parts.append(f"{key}={_hash_value(value)}")
    extensions = sorted(
        f"{{{GPUTRACE_NS}}}{k.removeprefix('gputrace:')}={_hash_value(v)}"
        for k, v in event.items()
        if k.startswith("gputrace:")
    )
    pre_hash = "".join(parts) + "".join(extensions)
    return f"ni:///sha-256;{hashlib.sha256(pre_hash.encode()).hexdigest()}?ver=CBV2.0"


@lru_cache(maxsize=1024)  # one entry's events share its time
def _hash_time(value: str) -> str:
    """UTC at millisecond precision with a Z, as the algorithm asks; microseconds rounded the way
    the reference implementation rounds them (Python's round, half to even)."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    t = t.replace(microsecond=0) + timedelta(microseconds=round(t.microsecond, -3))
    return t.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


def _hash_value(value: Any) -> str:
    """A value's canonical text: numbers without leading zeros, a plus sign or a trailing .0.
    Like the reference implementation, any text that reads as a number counts as one."""
    text = str(value).strip()
    if not text or text[0] not in _NUMBER_START:  # serial URNs, ids: skip float()'s exception
        return text
    try:
        number = float(text)
        return str(int(number) if int(number) == number else number)
    except (ValueError, OverflowError):
        return text
