"""The partner contract of docs/partner-contract.md §2–§4: topics, event types, roles and the data of each type.

Pydantic models here are the schema a partner's `data` must satisfy; domain rules (amounts
positive, quantities within an award, ...) live in the services, so that a rule broken gives
its own reason code rather than a generic schema error.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_serializer

# --- topics -------------------------------------------------------------------------------

PLEDGES_TOPIC = "partner.pledges.v1"
PROCUREMENT_TOPIC = "partner.procurement.v1"
LICENSING_TOPIC = "partner.licensing.v1"
LOGISTICS_TOPIC = "partner.logistics.v1"
OUTCOMES_TOPIC = "gputrace.outcomes.v1"
DLQ_TOPIC = "gputrace.dlq.v1"


def decisions_topic(service: str) -> str:
    """The canonical topic on which a service publishes every decision it takes."""
    return f"gputrace.{service.replace('_', '-')}.decisions.v1"


# The one list of the system's services: the four that decide, then the ledger that records.
DECIDING_SERVICES = ("pledges", "quotes", "export_controls", "deliveries")
LEDGER = "ledger"
SERVICES = (*DECIDING_SERVICES, LEDGER)
DECISION_TOPICS = frozenset(decisions_topic(s) for s in DECIDING_SERVICES)
# Who may write each decisions topic: a record there counts only if this service signed it.
DECISION_TOPIC_OWNERS: dict[str, str] = {decisions_topic(s): s for s in DECIDING_SERVICES}

# Partition counts are declared here and created by the project (auto-creation is off).
TOPIC_PARTITIONS: dict[str, int] = {
    PLEDGES_TOPIC: 3,
    PROCUREMENT_TOPIC: 3,
    LICENSING_TOPIC: 3,
    LOGISTICS_TOPIC: 3,
    OUTCOMES_TOPIC: 3,
    DLQ_TOPIC: 1,
    **{decisions_topic(s): 3 for s in DECIDING_SERVICES},
}

# Partner events and decisions are the record a service (or a new ledger) rebuilds from: kept
# forever. Outcomes are receipts partners read as they come: kept 30 days.
RETAIN_FOREVER = {"retention.ms": "-1"}
# The largest record batch a topic accepts (max.message.bytes) and the largest record the outbox
# relay's producer sends (max_request_size): the same number, so a record the producer lets
# through is never refused by the broker for its size (a larger one is parked, shared.runtime.outbox).
MAX_RECORD_BYTES = 1_048_576
_SIZE = {"max.message.bytes": str(MAX_RECORD_BYTES)}
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    **{t: {**RETAIN_FOREVER, **_SIZE} for t in TOPIC_PARTITIONS if t != OUTCOMES_TOPIC},
    OUTCOMES_TOPIC: {"retention.ms": str(30 * 24 * 3600 * 1000), **_SIZE},
}

TYPE_PREFIX = "gputrace."


class Role(StrEnum):
    PARTNER = "partner"
    PROGRAM_OFFICE = "program-office"
    VENDOR = "vendor"
    LICENSING_AUTHORITY = "licensing-authority"
    LOGISTICS = "logistics"
    SITE = "site"
    # A gputrace service: signs its decisions with its own key; never sends partner events.
    SERVICE = "service"


class ReasonCode(StrEnum):
    """Stable reason codes of a rejection; partners may switch on them."""

    SCHEMA_INVALID = "SCHEMA_INVALID"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    WRONG_TOPIC = "WRONG_TOPIC"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    UNKNOWN_PARTY = "UNKNOWN_PARTY"
    NOT_AUTHORIZED = "NOT_AUTHORIZED"
    SUBJECT_MISMATCH = "SUBJECT_MISMATCH"
    KEY_MISMATCH = "KEY_MISMATCH"
    UNKNOWN_PLEDGE = "UNKNOWN_PLEDGE"
    DUPLICATE_PLEDGE = "DUPLICATE_PLEDGE"
    PLEDGE_WITHDRAWN = "PLEDGE_WITHDRAWN"
    AMOUNT_NOT_POSITIVE = "AMOUNT_NOT_POSITIVE"
    CURRENCY_UNKNOWN = "CURRENCY_UNKNOWN"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    DISBURSEMENT_EXCEEDS_PLEDGE = "DISBURSEMENT_EXCEEDS_PLEDGE"
    AMENDMENT_BELOW_DISBURSED = "AMENDMENT_BELOW_DISBURSED"
    UNKNOWN_BATCH = "UNKNOWN_BATCH"
    DUPLICATE_BATCH = "DUPLICATE_BATCH"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    QUOTE_MISMATCH = "QUOTE_MISMATCH"
    QUOTE_NOT_OPEN = "QUOTE_NOT_OPEN"
    UNKNOWN_QUOTE = "UNKNOWN_QUOTE"
    DUPLICATE_QUOTE = "DUPLICATE_QUOTE"
    ALREADY_AWARDED = "ALREADY_AWARDED"
    FUNDING_SHORTFALL = "FUNDING_SHORTFALL"
    EXPORT_NOT_CLEARED = "EXPORT_NOT_CLEARED"
    EXPORT_DENIED = "EXPORT_DENIED"
    LICENSE_NOT_REQUIRED = "LICENSE_NOT_REQUIRED"
    QUANTITY_EXCEEDS_AWARD = "QUANTITY_EXCEEDS_AWARD"
    QUANTITY_EXCEEDS_LICENSE = "QUANTITY_EXCEEDS_LICENSE"
    UNKNOWN_SHIPMENT = "UNKNOWN_SHIPMENT"
    DUPLICATE_SHIPMENT = "DUPLICATE_SHIPMENT"
    SERIAL_UNKNOWN = "SERIAL_UNKNOWN"
    SERIAL_DUPLICATE = "SERIAL_DUPLICATE"
    SERIAL_NOT_RECEIVED = "SERIAL_NOT_RECEIVED"
    SERIAL_DAMAGED = "SERIAL_DAMAGED"
    SERIAL_NOT_INSTALLED = "SERIAL_NOT_INSTALLED"
    OUT_OF_ORDER = "OUT_OF_ORDER"
    INTERNAL_ERROR = "INTERNAL_ERROR"


# --- limits -------------------------------------------------------------------------------
# What a record may carry and still be an event (docs/partner-contract.md §2, "Limits"). They keep
# every event storable (bounded columns), signable and hashable (RFC 8785 takes only I-JSON:
# integers within ±(2^53 − 1), finite numbers, valid Unicode) and parseable without exhausting
# the parser.

# Identity: an event is answered by (ce_source, ce_id). Beyond these the record is dead-lettered,
# for an outcome could not name it faithfully.
MAX_ID_CHARS = 200
# Checked on readable events, before the signature: beyond these, SCHEMA_INVALID.
MAX_TYPE_CHARS = 100  # ce_type
MAX_SUBJECT_CHARS = 200  # ce_subject, and the record key (UTF-8 bytes)
MAX_ATTRIBUTE_CHARS = 1000  # any other attribute: ce_time, ce_signature, extensions, content-type
MAX_DEPTH = 32  # nesting of `data` (the object itself is level 1)
MAX_STRING_CHARS = 10_000  # any string in `data`, member names included
MAX_SAFE_INTEGER = 2**53 - 1  # |n| for any integer in `data` (I-JSON, RFC 7493)
# Dates and times in `data` and `ce_time` must fall in these years (a typo like 9999 is caught).
EARLIEST_YEAR = 2020
LATEST_YEAR = 2100


def fit(text: str, limit: int) -> str:
    """A sender-controlled string made safe for a bounded text column (or a log): returned as is
    when it fits and is plain text; else cleaned (U+0000 and lone surrogates replaced, which
    PostgreSQL and UTF-8 refuse) and cut to `limit` characters ending in `#` and 16 hex digits of
    the original's SHA-256, so distinct inputs stay distinct (idempotency keys stay keys)."""
    clean = text.replace("\x00", "\ufffd")
    if not clean.isascii():
        clean = clean.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if clean == text and len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{clean[: max(0, limit - 17)]}#{digest}"


# --- value types --------------------------------------------------------------------------

# ISO 4217 codes a programme in Korea deals in; an unknown one is a domain rejection, not a
# schema error, so the check lives in the pledges/quotes rules.
KNOWN_CURRENCIES = frozenset({"KRW", "USD", "EUR", "JPY", "GBP", "TWD", "CNY", "SGD", "CHF"})

GPU_MODELS = ("A100-SXM", "H100-SXM", "H200-SXM", "H20", "L40S", "B200", "GB200")


def _upper_alpha2(v: str) -> str:
    if len(v) != 2 or not v.isalpha() or not v.isupper():
        raise ValueError("must be an ISO 3166-1 alpha-2 code, e.g. KR")
    return v


Country = Annotated[str, AfterValidator(_upper_alpha2)]


def _plausible(v: date) -> date:
    # datetime is a date: one check for both.
    if not EARLIEST_YEAR <= v.year <= LATEST_YEAR:
        raise ValueError(f"must fall between the years {EARLIEST_YEAR} and {LATEST_YEAR}")
    return v


Moment = Annotated[datetime, AfterValidator(_plausible)]
Day = Annotated[date, AfterValidator(_plausible)]
NonEmpty = Annotated[str, Field(min_length=1, max_length=200)]


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Money(Contract):
    # Bounded so that no amount is silently rounded or overflows a column; sign checked by the rules.
    amount: Annotated[Decimal, Field(max_digits=30, decimal_places=6, allow_inf_nan=False)]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]

    @field_serializer("amount")
    def _plain(self, amount: Decimal) -> str:
        return format(amount, "f")  # "1000", never "1E+3"


class Party(Contract):
    name: NonEmpty
    country: Country
    # Street address as the partner has it (one line): screened against the listed addresses, so a
    # party at a listed party's address goes to a human even under another name. Optional.
    address: Annotated[str, Field(min_length=1, max_length=500)] | None = None


class EndUser(Party):
    headquarters_country: Country


class GpuCount(Contract):
    model: NonEmpty
    quantity: int


class Capacity(Contract):
    gpu_hours: int


# --- pledges ------------------------------------------------------------------------------


class PledgeCommitted(Contract):
    pledge_id: NonEmpty
    partner_id: NonEmpty
    program_id: NonEmpty
    kind: Literal["capital", "gpus", "capacity"]
    capital: Money | None = None
    gpus: GpuCount | None = None
    capacity: Capacity | None = None
    earmark_batch_id: NonEmpty | None = None
    committed_at: Moment
    due_by: Day | Moment


class PledgeAmended(Contract):
    pledge_id: NonEmpty
    partner_id: NonEmpty
    capital: Money | None = None
    gpus: GpuCount | None = None
    capacity: Capacity | None = None
    earmark_batch_id: NonEmpty | None = None
    due_by: Day | Moment | None = None
    reason: NonEmpty


class PledgeWithdrawn(Contract):
    pledge_id: NonEmpty
    partner_id: NonEmpty
    reason: NonEmpty


class PledgeDisbursed(Contract):
    pledge_id: NonEmpty
    partner_id: NonEmpty
    amount: Money
    reference: NonEmpty


# --- procurement --------------------------------------------------------------------------


class BatchRequested(Contract):
    batch_id: NonEmpty
    program_id: NonEmpty
    model: NonEmpty
    quantity: int
    site_id: NonEmpty
    needed_by: Day | Moment


class QuoteSubmitted(Contract):
    quote_id: NonEmpty
    batch_id: NonEmpty
    vendor_id: NonEmpty
    model: NonEmpty
    quantity: int
    unit_price: Money
    valid_until: Day | Moment
    lead_time_days: int
    origin_country: Country
    route: list[Country]
    consignee: Party
    end_user: EndUser


class QuoteWithdrawn(Contract):
    quote_id: NonEmpty
    batch_id: NonEmpty
    vendor_id: NonEmpty
    reason: NonEmpty


class QuoteAwarded(Contract):
    batch_id: NonEmpty
    quote_id: NonEmpty
    awarded_at: Moment


# --- licensing ----------------------------------------------------------------------------


class LicenseGranted(Contract):
    batch_id: NonEmpty
    license_number: NonEmpty
    quantity: int
    valid_until: Day | Moment


class LicenseDenied(Contract):
    batch_id: NonEmpty
    reason: NonEmpty


# --- logistics ----------------------------------------------------------------------------

Serial = Annotated[str, Field(min_length=1, max_length=100)]


class ShipmentDispatched(Contract):
    shipment_id: NonEmpty
    batch_id: NonEmpty
    carrier: NonEmpty
    serials: list[Serial] = Field(min_length=1)
    origin_country: Country
    route: list[Country]
    dispatched_at: Moment


class ShipmentCleared(Contract):
    shipment_id: NonEmpty
    batch_id: NonEmpty
    declaration_number: NonEmpty
    cleared_at: Moment


class ShipmentReceived(Contract):
    shipment_id: NonEmpty
    batch_id: NonEmpty
    site_id: NonEmpty
    received_serials: list[Serial]
    damaged_serials: list[Serial] = []
    received_at: Moment


class Placement(Contract):
    serial: Serial
    rack: NonEmpty
    slot: NonEmpty


class BatchInstalled(Contract):
    batch_id: NonEmpty
    site_id: NonEmpty
    placements: list[Placement] = Field(min_length=1)
    installed_at: Moment


class BatchAccepted(Contract):
    batch_id: NonEmpty
    passed_serials: list[Serial]
    failed_serials: list[Serial] = []
    accepted_at: Moment
    report_uri: NonEmpty


class EventSpec(BaseModel):
    """What the contract says of one event type: where it travels, who may send it, its data."""

    type: str
    topic: str
    roles: frozenset[Role]
    data: type[Contract]
    # The data field that names the aggregate (the record key and ce_subject).
    aggregate_field: str
    # The data field that must equal the sending party, when the event speaks for a party.
    self_field: str | None = None


def _spec(
    name: str, topic: str, role: Role, data: type[Contract], aggregate: str, self_field: str | None = None
) -> EventSpec:
    return EventSpec(
        type=f"{TYPE_PREFIX}{name}",
        topic=topic,
        roles=frozenset({role}),
        data=data,
        aggregate_field=aggregate,
        self_field=self_field,
    )


EVENTS: dict[str, EventSpec] = {
    s.type: s
    for s in (
        _spec("pledge.committed.v1", PLEDGES_TOPIC, Role.PARTNER, PledgeCommitted, "pledge_id", "partner_id"),
        _spec("pledge.amended.v1", PLEDGES_TOPIC, Role.PARTNER, PledgeAmended, "pledge_id", "partner_id"),
        _spec("pledge.withdrawn.v1", PLEDGES_TOPIC, Role.PARTNER, PledgeWithdrawn, "pledge_id", "partner_id"),
        _spec("pledge.disbursed.v1", PLEDGES_TOPIC, Role.PARTNER, PledgeDisbursed, "pledge_id", "partner_id"),
        _spec("batch.requested.v1", PROCUREMENT_TOPIC, Role.PROGRAM_OFFICE, BatchRequested, "batch_id"),
        _spec("quote.submitted.v1", PROCUREMENT_TOPIC, Role.VENDOR, QuoteSubmitted, "batch_id", "vendor_id"),
        _spec("quote.withdrawn.v1", PROCUREMENT_TOPIC, Role.VENDOR, QuoteWithdrawn, "batch_id", "vendor_id"),
        _spec("quote.awarded.v1", PROCUREMENT_TOPIC, Role.PROGRAM_OFFICE, QuoteAwarded, "batch_id"),
        _spec("license.granted.v1", LICENSING_TOPIC, Role.LICENSING_AUTHORITY, LicenseGranted, "batch_id"),
        _spec("license.denied.v1", LICENSING_TOPIC, Role.LICENSING_AUTHORITY, LicenseDenied, "batch_id"),
        _spec("shipment.dispatched.v1", LOGISTICS_TOPIC, Role.LOGISTICS, ShipmentDispatched, "batch_id"),
        _spec("shipment.cleared.v1", LOGISTICS_TOPIC, Role.LOGISTICS, ShipmentCleared, "batch_id"),
        _spec("shipment.received.v1", LOGISTICS_TOPIC, Role.SITE, ShipmentReceived, "batch_id"),
        _spec("batch.installed.v1", LOGISTICS_TOPIC, Role.SITE, BatchInstalled, "batch_id"),
        _spec("batch.accepted.v1", LOGISTICS_TOPIC, Role.SITE, BatchAccepted, "batch_id"),
    )
}


def event_type(name: str) -> str:
    """`pledge.committed.v1` → `gputrace.pledge.committed.v1`."""
    return f"{TYPE_PREFIX}{name}"


PARTY_SOURCE_PREFIX = "urn:gputrace:party:"
SERVICE_SOURCE_PREFIX = "urn:gputrace:service:"


def party_source(party_id: str) -> str:
    return f"{PARTY_SOURCE_PREFIX}{party_id}"


def service_source(service: str) -> str:
    return f"{SERVICE_SOURCE_PREFIX}{service}"
