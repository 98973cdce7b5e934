"""Quote rules of docs/architecture.md §5, pure: no Kafka, no SQL. Each function judges one event against
the batch and quotes as they stand and says what they become, or why the event is refused.

Funding. The capital earmarked for a batch is the pledged amount of every *active* capital
pledge whose `earmark_batch_id` is the batch, in the quote's currency. A withdrawn pledge
counts for nothing, not even its disbursed part: a withdrawal says the partner no longer
stands behind the batch, and an auditor must never see more funding than is promised. No
currency conversion: a pledge in another currency than the quote does not fund it (the
programme has no agreed FX source, and a silent conversion would hide a shortfall).

Pledge decisions and procurement events travel on different topics, so an award can be
judged before a pledge decision that would fund it has arrived; it is then refused with
FUNDING_SHORTFALL (recorded, flagged), and the programme office sends the award again.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal

import pydantic
from pydantic import TypeAdapter

from shared.contract import (
    GPU_MODELS,
    KNOWN_CURRENCIES,
    BatchRequested,
    EndUser,
    Money,
    Party,
    QuoteAwarded,
    QuoteSubmitted,
    QuoteWithdrawn,
    ReasonCode,
)
from shared.contract.decisions import RuleBroken
from shared.contract.facts import AwardFacts, BatchFacts, Funding, PledgeFacts, QuoteFacts, QuoteStatus, anomaly

# Money arithmetic never rounds silently: sums and products are computed at this precision
# and a result that would need more digits is refused rather than rounded.
MONEY_PRECISION = 60


def _exact(compute: Callable[[], Decimal]) -> Decimal | None:
    """Run `compute()` in a money context; None if the result could not be held exactly."""
    with decimal.localcontext() as ctx:
        ctx.prec = MONEY_PRECISION
        ctx.clear_flags()
        try:
            result: Decimal = compute()
        except decimal.DecimalException:  # overflow of an absurd exponent: not a crash, a refusal
            return None
        return None if ctx.flags[decimal.Inexact] else result


def plain(amount: Decimal) -> Decimal:
    """`1E+3` as `1000`, so amounts in facts read as decimal strings people expect; absurd
    exponents stay in scientific form rather than expand to a megabyte of zeros."""
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and 0 < exponent <= MONEY_PRECISION:
        return Decimal(format(amount, "f"))
    return amount


def _iso(value: date | datetime) -> str:
    return value.isoformat()


def _utc(value: datetime) -> datetime:
    # A time without an offset is read as UTC, so naive and aware times can be compared.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def expired(valid_until: date | datetime, at: datetime) -> bool:
    """A quote is valid up to and including `valid_until`; a bare date covers that whole UTC day."""
    if isinstance(valid_until, datetime):
        return _utc(valid_until) < _utc(at)
    return valid_until < _utc(at).date()


# --- state --------------------------------------------------------------------------------
# Batches and quotes are stored as JSON written and read by pydantic (BATCH_STATE, QUOTE_STATE).


@pydantic.dataclasses.dataclass(frozen=True)
class Batch:
    batch_id: str
    program_id: str
    model: str
    quantity: int
    site_id: str
    needed_by: str
    status: str = "open"  # open | awarded
    awarded_quote_id: str | None = None
    awarded_at: str | None = None

    def facts(self, quotes_open: int) -> BatchFacts:
        return BatchFacts(
            batch_id=self.batch_id,
            program_id=self.program_id,
            model=self.model,
            quantity=self.quantity,
            site_id=self.site_id,
            needed_by=self.needed_by,
            status="awarded" if self.status == "awarded" else "open",
            quotes_open=quotes_open,
        )


@pydantic.dataclasses.dataclass(frozen=True)
class Quote:
    quote_id: str
    batch_id: str
    vendor_id: str
    model: str
    quantity: int
    unit_price: Money
    valid_until: date | datetime
    lead_time_days: int
    origin_country: str
    route: tuple[str, ...]
    consignee: Party
    end_user: EndUser
    status: QuoteStatus = "open"

    @property
    def total_price(self) -> Money:
        # Checked exact when the quote was submitted, so never None here.
        total = _exact(lambda: self.unit_price.amount * self.quantity)
        assert total is not None
        return Money(amount=plain(total), currency=self.unit_price.currency)

    def facts(self) -> QuoteFacts:
        """The quote as the ledger sees it on quote decisions."""
        return QuoteFacts(
            quote_id=self.quote_id,
            batch_id=self.batch_id,
            vendor_id=self.vendor_id,
            unit_price=self.unit_price,
            quantity=self.quantity,
            status=self.status,
        )


# The stored form of each; JSON, so a bare date stays a date and a time stays a time.
BATCH_STATE: TypeAdapter[Batch] = TypeAdapter(Batch)
QUOTE_STATE: TypeAdapter[Quote] = TypeAdapter(Quote)


@dataclass(frozen=True)
class Earmark:
    """What the quotes service keeps of a pledge (from the pledges service's decisions)."""

    pledge_id: str
    partner_id: str
    version: int
    kind: str
    status: str
    batch_id: str | None
    capital: Money | None

    @property
    def funds(self) -> bool:
        return self.status == "active" and self.kind == "capital" and self.capital is not None

    @classmethod
    def from_pledge(cls, p: PledgeFacts) -> Earmark:
        """From the pledges service's fact about a pledge."""
        return cls(
            pledge_id=p.pledge_id,
            partner_id=p.partner_id,
            version=p.version,
            kind=p.kind,
            status=p.status,
            batch_id=p.earmark_batch_id,
            capital=p.capital,
        )


def track_pledge(existing: Earmark | None, incoming: Earmark) -> Earmark | None:
    """The earmark to keep, or None to ignore a stale or repeated pledge snapshot: pledge
    decisions of different pledges interleave and may be replayed, versions decide."""
    if existing is not None and incoming.version <= existing.version:
        return None
    return incoming


def open_quotes(quotes: Iterable[Quote]) -> int:
    return sum(1 for q in quotes if q.status == "open")


# --- rules --------------------------------------------------------------------------------


def request_batch(existing: Batch | None, e: BatchRequested) -> Batch:
    if existing is not None:
        raise RuleBroken(ReasonCode.DUPLICATE_BATCH, f"batch {e.batch_id!r} already exists")
    if e.model not in GPU_MODELS:
        raise RuleBroken(ReasonCode.UNKNOWN_MODEL, f"GPU model {e.model!r} is not in the catalogue")
    if e.quantity <= 0:
        raise RuleBroken(ReasonCode.AMOUNT_NOT_POSITIVE, f"quantity {e.quantity} must be positive")
    return Batch(
        batch_id=e.batch_id,
        program_id=e.program_id,
        model=e.model,
        quantity=e.quantity,
        site_id=e.site_id,
        needed_by=_iso(e.needed_by),
    )


def submit_quote(batch: Batch | None, existing: Quote | None, e: QuoteSubmitted) -> Quote:
    if batch is None:
        raise RuleBroken(ReasonCode.UNKNOWN_BATCH, f"no batch {e.batch_id!r}")
    if batch.status != "open":
        raise RuleBroken(ReasonCode.QUOTE_NOT_OPEN, f"batch {batch.batch_id!r} is already awarded")
    if existing is not None:
        raise RuleBroken(ReasonCode.DUPLICATE_QUOTE, f"quote {e.quote_id!r} already exists")
    if e.model != batch.model:
        raise RuleBroken(ReasonCode.QUOTE_MISMATCH, f"quote is for {e.model}, the batch requests {batch.model}")
    if e.quantity <= 0 or e.quantity > batch.quantity:
        raise RuleBroken(
            ReasonCode.QUOTE_MISMATCH, f"quantity {e.quantity} is not between 1 and the {batch.quantity} requested"
        )
    if e.unit_price.amount <= 0:
        raise RuleBroken(ReasonCode.AMOUNT_NOT_POSITIVE, f"unit price {e.unit_price.amount} must be positive")
    if e.unit_price.currency not in KNOWN_CURRENCIES:
        raise RuleBroken(ReasonCode.CURRENCY_UNKNOWN, f"currency {e.unit_price.currency} is not a known ISO 4217 code")
    if e.lead_time_days < 0:
        raise RuleBroken(ReasonCode.SCHEMA_INVALID, f"lead_time_days {e.lead_time_days} must not be negative")
    if _exact(lambda: e.unit_price.amount * e.quantity) is None:
        # Refused now so that the award can never meet a total it cannot state exactly.
        raise RuleBroken(ReasonCode.SCHEMA_INVALID, f"unit price {e.unit_price.amount} has too many digits")
    return Quote(
        quote_id=e.quote_id,
        batch_id=e.batch_id,
        vendor_id=e.vendor_id,
        model=e.model,
        quantity=e.quantity,
        unit_price=Money(amount=plain(e.unit_price.amount), currency=e.unit_price.currency),
        valid_until=e.valid_until,
        lead_time_days=e.lead_time_days,
        origin_country=e.origin_country,
        route=tuple(e.route),
        consignee=e.consignee,
        end_user=e.end_user,
    )


def withdraw_quote(quote: Quote | None, e: QuoteWithdrawn) -> Quote:
    if quote is None or quote.batch_id != e.batch_id:
        raise RuleBroken(ReasonCode.UNKNOWN_QUOTE, f"no quote {e.quote_id!r} for batch {e.batch_id!r}")
    if quote.vendor_id != e.vendor_id:
        raise RuleBroken(ReasonCode.NOT_AUTHORIZED, f"quote {e.quote_id!r} belongs to {quote.vendor_id!r}")
    if quote.status != "open":
        raise RuleBroken(ReasonCode.QUOTE_NOT_OPEN, f"quote {e.quote_id!r} is {quote.status}")
    return replace(quote, status="withdrawn")


def funding(batch_id: str, required: Money, earmarks: Iterable[Earmark]) -> Funding:
    """The capital earmarked for a batch against what an award requires (see the module doc)."""
    counted = sorted(
        (m.pledge_id, m.capital.amount)
        for m in earmarks
        if m.funds and m.batch_id == batch_id and m.capital is not None and m.capital.currency == required.currency
    )
    amounts = [amount for _, amount in counted]
    earmarked = _exact(lambda: sum(amounts, Decimal(0)))
    if earmarked is None:
        # Beyond the money precision (absurd pledges): round down, never state more than is there.
        with decimal.localcontext() as ctx:
            ctx.prec, ctx.rounding = MONEY_PRECISION, decimal.ROUND_FLOOR
            ctx.traps[decimal.Overflow] = False
            earmarked = sum(amounts, Decimal(0))
    shortfall = Decimal(0)
    if earmarked < required.amount:
        # Both bounded by the required amount here; round up, never state less missing than is.
        with decimal.localcontext() as ctx:
            ctx.prec, ctx.rounding = MONEY_PRECISION, decimal.ROUND_CEILING
            shortfall = required.amount - earmarked
    return Funding(
        currency=required.currency,
        required=str(plain(required.amount)),
        earmarked=str(plain(earmarked)),
        shortfall=str(plain(shortfall)),
        pledges=[pledge_id for pledge_id, _ in counted],
    )


@dataclass(frozen=True)
class Award:
    batch: Batch
    quote: Quote
    not_awarded: tuple[Quote, ...]
    facts: AwardFacts


def award(
    batch: Batch | None,
    quote: Quote | None,
    batch_quotes: Sequence[Quote],
    earmarks: Iterable[Earmark],
    e: QuoteAwarded,
) -> Award:
    if batch is None:
        raise RuleBroken(ReasonCode.UNKNOWN_BATCH, f"no batch {e.batch_id!r}")
    if batch.status == "awarded":
        raise RuleBroken(
            ReasonCode.ALREADY_AWARDED, f"batch {batch.batch_id!r} was already awarded to {batch.awarded_quote_id!r}"
        )
    if quote is None or quote.batch_id != batch.batch_id:
        raise RuleBroken(ReasonCode.UNKNOWN_QUOTE, f"no quote {e.quote_id!r} for batch {batch.batch_id!r}")
    if quote.status != "open":
        raise RuleBroken(ReasonCode.QUOTE_NOT_OPEN, f"quote {quote.quote_id!r} is {quote.status}")
    if expired(quote.valid_until, e.awarded_at):
        raise RuleBroken(
            ReasonCode.QUOTE_NOT_OPEN,
            f"quote expired: valid until {_iso(quote.valid_until)}, awarded at {e.awarded_at.isoformat()}",
        )
    total = quote.total_price
    fund = funding(batch.batch_id, total, earmarks)
    if Decimal(fund.shortfall) > 0:
        message = (
            f"award of {total.amount} {total.currency} exceeds the {fund.earmarked} {total.currency} "
            f"earmarked for batch {batch.batch_id!r}"
        )
        raise RuleBroken(
            ReasonCode.FUNDING_SHORTFALL,
            message,
            facts={"funding": fund.model_dump(mode="json")},
            anomalies=[
                anomaly(
                    "FUNDING_SHORTFALL",
                    message,
                    batch.batch_id,
                    quote_id=quote.quote_id,
                    currency=fund.currency,
                    required=fund.required,
                    earmarked=fund.earmarked,
                    shortfall=fund.shortfall,
                )
            ],
        )
    awarded_at = e.awarded_at.isoformat()
    won = replace(quote, status="awarded")
    lost = tuple(
        replace(q, status="not_awarded") for q in batch_quotes if q.status == "open" and q.quote_id != quote.quote_id
    )
    facts = AwardFacts(
        batch_id=batch.batch_id,
        quote_id=quote.quote_id,
        vendor_id=quote.vendor_id,
        program_id=batch.program_id,
        site_id=batch.site_id,
        model=quote.model,
        quantity=quote.quantity,
        unit_price=quote.unit_price,
        total_price=total,
        origin_country=quote.origin_country,
        route=list(quote.route),
        consignee=quote.consignee,
        end_user=quote.end_user,
        awarded_at=awarded_at,
        lead_time_days=quote.lead_time_days,
        funding=fund,
    )
    return Award(
        batch=replace(batch, status="awarded", awarded_quote_id=quote.quote_id, awarded_at=awarded_at),
        quote=won,
        not_awarded=lost,
        facts=facts,
    )
