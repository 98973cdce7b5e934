"""What the ledger's HTTP API answers: one pydantic model per response body, so docs/openapi.json
states every field and a partner generating a client from it gets types, not blobs.

The models mirror the JSON the routes have always sent, key for key and in the same order: a key
that is always sent is a required field (nullable where it may be null), never a field with a
default, and an undeclared key is an error (Strict), so validating a route's dict adds no key and
drops none: the JSON stays what the route built. Free-form mappings remain only where the data is
free-form by nature (an anomaly's code-specific details, the export service's full evaluation) and
inside the extension points the two standard formats define.

Amounts are decimal strings, as in the event contract (never floats: no rounding on the way).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from services.ledger.batches import Stage

T = TypeVar("T")


class Strict(BaseModel):
    """Our own shapes: a key the model does not declare is an error (500, and a failing test), never
    silently dropped, so a route's JSON cannot lose a key to its model; the schema says
    `additionalProperties: false`, so a client may rely on the fields it was generated with."""

    model_config = ConfigDict(extra="forbid")


ExportStatus = Literal["cleared", "license_required", "licensed", "denied", "license_denied"]


class Problem(Strict):
    """Every refusal of this API: 400, 401, 403, 404, 416."""

    detail: str


# --------------------------------------------------------------------------- shared parts


class Money(Strict):
    amount: str = Field(description='decimal string, e.g. "50000000" or "12.5"')
    currency: str = Field(description="ISO 4217 code")


class GpuCount(Strict):
    model: str
    quantity: int


class Capacity(Strict):
    gpu_hours: int


class Party(Strict):
    name: str
    country: str
    address: str | None


class EndUser(Party):
    headquarters_country: str


class AnomalyNote(BaseModel):
    """An anomaly as a decision recorded it; code-specific fields (shipment_id, serials, quote_id,
    required/earmarked/shortfall, rule_version, ...) follow the four every anomaly has."""

    model_config = ConfigDict(extra="allow")

    code: str
    severity: str
    message: str
    batch_id: str | None


# --------------------------------------------------------------------------- /v1/program


class PartnerTotals(Strict):
    pledges: int = Field(description="active pledges")
    withdrawn: int
    capital: dict[str, str] = Field(description="pledged capital by currency (decimal strings)")
    disbursed: dict[str, str] = Field(description="disbursed capital by currency (decimal strings)")
    gpus: dict[str, int] = Field(description="in-kind GPUs pledged, by model")
    gpus_total: int
    capacity_gpu_hours: int


class Progress(Strict):
    gpus_pledged: int
    fraction_of_target: float | None = Field(description="null when the programme has no target")


class PipelineGpus(Strict):
    """GPUs through the delivery pipeline, summed over batches."""

    awarded: int
    dispatched: int
    received: int
    damaged: int
    installed: int
    accepted: int
    failed: int


class ProgramTotals(Strict):
    """The programme's totals (all programmes when program_id is null): overall, then by partner (a
    partner sees only its own line), batches by stage, GPUs through the pipeline, anomalies."""

    program_id: str | None
    target_gpus: int
    # The overall totals, as PartnerTotals has them.
    pledges: int = Field(description="active pledges")
    withdrawn: int
    capital: dict[str, str] = Field(description="pledged capital by currency (decimal strings)")
    disbursed: dict[str, str] = Field(description="disbursed capital by currency (decimal strings)")
    gpus: dict[str, int] = Field(description="in-kind GPUs pledged, by model")
    gpus_total: int
    capacity_gpu_hours: int
    progress: Progress
    by_partner: dict[str, PartnerTotals]
    batches_by_stage: dict[Stage, int] = Field(description="non-zero stages only, in pipeline order")
    batches_total: int
    pipeline_gpus: PipelineGpus
    anomalies_by_code: dict[str, int]


# --------------------------------------------------------------------------- /v1/pledges/{id}


class Pledge(Strict):
    """A pledge as the ledger knows it: its latest version, and the ledger entry that recorded it."""

    pledge_id: str
    partner_id: str
    program_id: str
    kind: Literal["capital", "gpus", "capacity"]
    capital: Money | None
    gpus: GpuCount | None
    capacity: Capacity | None
    earmark_batch_id: str | None
    committed_at: str
    due_by: str
    status: Literal["active", "withdrawn"]
    disbursed: Money | None = Field(description="capital pledges only; stays counted after a withdrawal")
    version: int
    leaf_index: int = Field(description="the ledger entry of the latest decision on this pledge")


# --------------------------------------------------------------------------- /v1/batches


class Quantities(Strict):
    requested: int | None
    quoted: int = Field(description="quotes received")
    awarded: int | None
    export_cleared: int | None
    dispatched: int
    in_transit: int
    received: int
    damaged: int
    installed: int
    accepted: int
    failed: int


class ScreeningHit(Strict):
    role: str
    entry_id: str
    entry_name: str
    list: str
    score: float
    start_date: str | None
    federal_register_notice: str | None


class Explanation(Strict):
    """What the export decision relied on: enough to re-derive it."""

    rule_version: str
    ruleset_sha256: str
    decision_date: str
    group_memberships: dict[str, list[str]] = Field(description="country -> its groups on the decision date")
    licence_exceptions: list[str]
    screening_snapshot: str = Field(description="sha256 of the screening list snapshot")
    screening_source_date: str
    screening_hits: list[ScreeningHit]
    screening_reviews: list[ScreeningHit] = Field(description="near misses sent to a human")


class ExportSummary(Strict):
    status: ExportStatus | None
    outcome: Literal["cleared", "license_required", "denied"] | None
    rule_version: str | None
    eccn: str | None
    license_number: str | None
    explanation: Explanation | None


class BatchSummary(Strict):
    batch_id: str
    program_id: str | None
    status: Stage
    model: str | None
    site_id: str | None
    requested: int | None
    vendor_id: str | None
    quantities: Quantities
    export: ExportSummary | None = Field(description="null until the export service decided")
    anomalies: int
    last_leaf_index: int


class Page(Strict, Generic[T]):
    """A page of a longer list: `total` matches, `items` from `offset`, at most `limit`."""

    total: int
    limit: int
    offset: int
    items: list[T]


class BatchesPage(Page[BatchSummary]):
    pass


class BatchMoney(Strict):
    earmarked: dict[str, str] = Field(description="active capital pledges earmarked for the batch, by currency")
    disbursed: dict[str, str] = Field(description="disbursed of those pledges, by currency")
    awarded: Money | None
    unit_price: Money | None
    pledges: list[str] = Field(description="ids of the pledges earmarked for the batch")


class Funding(Strict):
    currency: str
    required: str
    earmarked: str
    shortfall: str
    pledges: list[str]


class Award(Strict):
    batch_id: str
    quote_id: str
    vendor_id: str
    program_id: str
    site_id: str
    model: str
    quantity: int
    unit_price: Money
    total_price: Money
    origin_country: str
    route: list[str]
    consignee: Party
    end_user: EndUser
    awarded_at: str
    lead_time_days: int
    funding: Funding
    leaf_index: int


class TimelineEntry(Strict):
    """One decision on the batch, in ledger order."""

    leaf_index: int
    service: str
    decided_at: datetime
    status: Literal["accepted", "rejected"]
    reason_code: str | None
    message: str
    event_type: str
    party_id: str | None
    anomalies: list[AnomalyNote]
    event_id: str | None = Field(description="the partner event decided on; null for a service's own decision")


class BatchDetail(BatchSummary):
    money: BatchMoney
    export_decision: dict[str, Any] | None = Field(
        description="the export service's full evaluation as recorded (rule version, inputs, screening, reasoning)"
    )
    award: Award | None
    timeline: list[TimelineEntry]


# --------------------------------------------------------------------------- /v1/anomalies


class Anomaly(Strict):
    leaf_index: int
    batch_id: str | None
    code: str
    severity: str
    message: str
    service: str
    party_id: str | None
    decided_at: datetime
    details: dict[str, Any] = Field(description="code-specific details (shipment_id, serials, quote_id, ...)")


class AnomalyList(Strict):
    """Anomalies in ledger order, from `offset`, at most `limit`."""

    items: list[Anomaly]


# --------------------------------------------------------------------------- /v1/log


class CheckpointJSON(Strict):
    """`format=json`: the signed note with its parts, for clients that would rather not parse it."""

    size: int
    root_hash: str = Field(description="standard base64")
    note: str = Field(description="the signed note, as served with format=note")
    signed_at: datetime


class PublicKey(Strict):
    origin: str
    key_name: str
    vkey: str = Field(description="C2SP signed-note verifier key: name+hash+base64(0x01 || key)")
    public_key: str = Field(description="standard base64 of the raw 32-byte Ed25519 public key")


class Entry(Strict):
    leaf_index: int
    entry: str = Field(description="the canonical JSON (RFC 8785) that was hashed, byte for byte")
    leaf_hash: str = Field(description="standard base64 of the RFC 9162 leaf hash the server stored")


class InclusionProof(Strict):
    leaf_index: int
    tree_size: int
    proof: list[str] = Field(description="standard base64 hashes, leaf to root")


class ConsistencyProof(Strict):
    first: int
    second: int
    proof: list[str] = Field(description="standard base64 hashes")


# --------------------------------------------------------------------------- OCDS 1.1
# Field names are the standards' own (camelCase), so the models read and write them as they are.


class OcdsOrganizationReference(BaseModel):
    id: str
    name: str


class OcdsOrganization(OcdsOrganizationReference):
    roles: list[str]


class OcdsPublisher(BaseModel):
    name: str
    scheme: str | None = None
    uid: str | None = None
    uri: str | None = None


class OcdsRelease(BaseModel):
    """An OCDS 1.1 release: the standard's top-level fields. Releases are where OCDS extensions add
    fields (the bids extension's `bids`; this ledger's `gputrace:leafIndex`), so others are allowed."""

    model_config = ConfigDict(extra="allow")

    ocid: str
    id: str
    date: str = Field(description="date-time")
    tag: list[str]
    initiationType: Literal["tender"]
    language: str | None = None
    parties: list[OcdsOrganization] = []
    buyer: OcdsOrganizationReference | None = None
    planning: dict[str, Any] | None = None
    tender: dict[str, Any] | None = Field(default=None, description="OCDS Tender")
    awards: list[dict[str, Any]] | None = Field(default=None, description="OCDS Award objects")
    contracts: list[dict[str, Any]] | None = Field(default=None, description="OCDS Contract objects")
    bids: dict[str, Any] | None = Field(default=None, description="bids extension: {details: [Bid]}")
    leaf_index: int | None = Field(
        default=None, alias="gputrace:leafIndex", description="the ledger entry the release comes from"
    )


class OcdsReleasePackage(BaseModel):
    """An OCDS 1.1 release package (release-package-schema.json's fields)."""

    uri: str
    version: Literal["1.1"]
    publishedDate: str = Field(description="date-time")
    publisher: OcdsPublisher
    extensions: list[str] = Field(description="URLs of the extensions' extension.json")
    license: str | None = None
    publicationPolicy: str | None = None
    releases: list[OcdsRelease]


# --------------------------------------------------------------------------- EPCIS 2.0


class EpcisLocation(BaseModel):
    id: str


class EpcisEvent(BaseModel):
    """An EPCIS 2.0 ObjectEvent with the fields this ledger emits. User extensions are EPCIS's
    extension point (namespaced keys, here `gputrace:*`), so others are allowed."""

    model_config = ConfigDict(extra="allow")

    eventID: str = Field(description="GS1 event hash, ni:///sha-256;...?ver=CBV2.0")
    type: Literal["ObjectEvent"]
    eventTime: str = Field(description="date-time")
    eventTimeZoneOffset: str
    action: Literal["ADD", "OBSERVE", "DELETE"]
    bizStep: str | None = Field(default=None, description="CBV business step")
    disposition: str | None = Field(default=None, description="CBV disposition")
    epcList: list[str] = []
    bizLocation: EpcisLocation | None = None


class EpcisBody(BaseModel):
    eventList: list[EpcisEvent]


class EpcisDocument(BaseModel):
    """An EPCIS 2.0 JSON-LD document (EPCISDocument)."""

    model_config = ConfigDict(populate_by_name=True)

    context: list[str | dict[str, str]] = Field(alias="@context", description="JSON-LD context")
    type: Literal["EPCISDocument"]
    schemaVersion: Literal["2.0"]
    creationDate: str = Field(description="date-time")
    epcisBody: EpcisBody
