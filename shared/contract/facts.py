"""What services tell each other: the `facts` carried by accepted decisions on canonical topics.

A decision's facts are a snapshot (the pledge, the award, the export case, the delivery state
of a batch) rather than a delta, so a consumer that sees them twice or late still converges.
Each producer writes these models; each consumer reads them with the same models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shared.contract import Capacity, EndUser, GpuCount, Money, Party

PLEDGE = "pledge"
BATCH = "batch"
QUOTE = "quote"
AWARD = "award"
EXPORT = "export"
DELIVERY = "delivery"

# Internal decision types (not sent by partners; taken by a service on its own).
EXPORT_DECIDED = "gputrace.export.decided.v1"


class Facts(BaseModel):
    model_config = ConfigDict(extra="allow")


class PledgeFacts(Facts):
    """A pledge as the pledges service holds it after the decision (every version, whole).

    Written by the pledges service, read by quotes (the capital earmarked per batch) and by the
    ledger (programme totals); `version` orders them. Amounts are decimal strings in JSON."""

    pledge_id: str
    partner_id: str
    program_id: str
    kind: Literal["capital", "gpus", "capacity"]
    capital: Money | None = None
    gpus: GpuCount | None = None
    capacity: Capacity | None = None
    earmark_batch_id: str | None = None
    committed_at: str
    due_by: str
    status: Literal["active", "withdrawn"]
    # Capital pledges only, in the pledge's currency; money disbursed stays counted after a withdrawal.
    disbursed: Money | None = None
    version: int


class BatchFacts(Facts):
    """A batch request as the quotes service holds it."""

    batch_id: str
    program_id: str
    model: str
    quantity: int
    site_id: str
    needed_by: str
    status: Literal["open", "awarded"]
    quotes_open: int = 0


QuoteStatus = Literal["open", "withdrawn", "awarded", "not_awarded"]


class QuoteFacts(Facts):
    """A vendor's quote as the ledger sees it on quote decisions."""

    quote_id: str
    batch_id: str
    vendor_id: str
    unit_price: Money
    quantity: int
    status: QuoteStatus


class Funding(Facts):
    currency: str
    required: str
    earmarked: str
    shortfall: str
    pledges: list[str]


class AwardFacts(Facts):
    """An accepted award: what export controls and deliveries need to know."""

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
    # The vendor's lead time: award date + lead time is the planned shipment date.
    lead_time_days: int = 0
    funding: Funding


ExportStatus = Literal["cleared", "license_required", "licensed", "denied", "license_denied"]
CLEARED_STATUSES = ("cleared", "licensed")


class ExportFacts(Facts):
    """The export case of a batch. `decision` is the full evaluation (rule version, inputs, reasoning)."""

    batch_id: str
    status: ExportStatus
    outcome: Literal["cleared", "license_required", "denied"]
    rule_version: str
    eccn: str | None = None
    cleared_quantity: int = 0
    license_number: str | None = None
    decision: dict[str, Any] = {}


class DeliveryFacts(Facts):
    """Serial counts of a batch at each EPCIS-style step."""

    batch_id: str
    awarded_quantity: int
    dispatched: int
    in_transit: int
    received: int
    damaged: int
    installed: int
    accepted: int
    failed: int
    shipments: int


def anomaly(code: str, message: str, batch_id: str | None, severity: str = "high", **extra: Any) -> dict[str, Any]:
    """An anomaly auditors must see (listed at /v1/anomalies)."""
    return {"code": code, "severity": severity, "message": message, "batch_id": batch_id, **extra}
