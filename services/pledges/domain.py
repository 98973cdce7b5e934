"""Pledge rules of docs/architecture.md §5, pure: no Kafka, no SQL. Each function judges one event against
the pledge as it stands and says what the pledge becomes, or why the event is refused."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

from pydantic import TypeAdapter, field_serializer, field_validator
from pydantic.dataclasses import dataclass

from shared.contract import (
    GPU_MODELS,
    KNOWN_CURRENCIES,
    Capacity,
    GpuCount,
    Money,
    PledgeAmended,
    PledgeCommitted,
    PledgeDisbursed,
    PledgeWithdrawn,
    ReasonCode,
)
from shared.contract.decisions import RuleBroken
from shared.contract.facts import PledgeFacts


@dataclass(frozen=True)
class Pledge:
    pledge_id: str
    partner_id: str
    program_id: str
    kind: str
    capital: Money | None
    gpus: GpuCount | None
    capacity: Capacity | None
    earmark_batch_id: str | None
    committed_at: str
    due_by: str
    status: str = "active"
    disbursed: Decimal = Decimal(0)
    version: int = 1

    @field_validator("disbursed", mode="before")
    @classmethod
    def _disbursed_from_money(cls, value: Any) -> Any:
        # Published as Money in the pledge's currency (None for pledges that are not capital).
        if value is None:
            return Decimal(0)
        return value["amount"] if isinstance(value, dict) else value

    @field_serializer("disbursed")
    def _disbursed_as_money(self, disbursed: Decimal) -> Money | None:
        return Money(amount=disbursed, currency=self.capital.currency) if self.capital else None

    def snapshot(self) -> dict[str, Any]:
        """The pledge as other services and the ledger see it: the JSON of PledgeFacts."""
        return _SNAPSHOT.dump_python(self, mode="json")

    def facts(self) -> PledgeFacts:
        return PledgeFacts.model_validate(self.snapshot())

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any] | str) -> Pledge:
        """From `snapshot()` or its JSON text (as stored)."""
        if isinstance(snapshot, str):
            return _SNAPSHOT.validate_json(snapshot)
        return _SNAPSHOT.validate_python(snapshot)


# Pydantic writes and reads the snapshot, so it cannot drift from the fields.
_SNAPSHOT: TypeAdapter[Pledge] = TypeAdapter(Pledge)


def _check_money(money: Money) -> None:
    if money.currency not in KNOWN_CURRENCIES:
        raise RuleBroken(ReasonCode.CURRENCY_UNKNOWN, f"currency {money.currency} is not a known ISO 4217 code")
    if money.amount <= 0:
        raise RuleBroken(ReasonCode.AMOUNT_NOT_POSITIVE, f"amount {money.amount} must be positive")


def _check_terms(kind: str, capital: Money | None, gpus: GpuCount | None, capacity: Capacity | None) -> None:
    given = {"capital": capital, "gpus": gpus, "capacity": capacity}
    if given[kind] is None:
        raise RuleBroken(ReasonCode.SCHEMA_INVALID, f"a {kind} pledge needs its {kind} field")
    others = [k for k, v in given.items() if v is not None and k != kind]
    if others:
        raise RuleBroken(ReasonCode.SCHEMA_INVALID, f"a {kind} pledge may not carry {', '.join(others)}")
    if capital is not None:
        _check_money(capital)
    if gpus is not None:
        if gpus.model not in GPU_MODELS:
            raise RuleBroken(ReasonCode.UNKNOWN_MODEL, f"GPU model {gpus.model!r} is not in the catalogue")
        if gpus.quantity <= 0:
            raise RuleBroken(ReasonCode.AMOUNT_NOT_POSITIVE, f"GPU quantity {gpus.quantity} must be positive")
    if capacity is not None and capacity.gpu_hours <= 0:
        raise RuleBroken(ReasonCode.AMOUNT_NOT_POSITIVE, f"gpu_hours {capacity.gpu_hours} must be positive")


def _owned_and_active(pledge: Pledge | None, pledge_id: str, partner_id: str) -> Pledge:
    if pledge is None:
        raise RuleBroken(ReasonCode.UNKNOWN_PLEDGE, f"no pledge {pledge_id!r}")
    if pledge.partner_id != partner_id:
        raise RuleBroken(ReasonCode.NOT_AUTHORIZED, f"pledge {pledge_id!r} belongs to {pledge.partner_id!r}")
    if pledge.status == "withdrawn":
        raise RuleBroken(ReasonCode.PLEDGE_WITHDRAWN, f"pledge {pledge_id!r} was withdrawn")
    return pledge


def commit(existing: Pledge | None, e: PledgeCommitted) -> Pledge:
    if existing is not None:
        raise RuleBroken(ReasonCode.DUPLICATE_PLEDGE, f"pledge {e.pledge_id!r} already exists")
    _check_terms(e.kind, e.capital, e.gpus, e.capacity)
    return Pledge(
        pledge_id=e.pledge_id,
        partner_id=e.partner_id,
        program_id=e.program_id,
        kind=e.kind,
        capital=e.capital,
        gpus=e.gpus,
        capacity=e.capacity,
        earmark_batch_id=e.earmark_batch_id,
        committed_at=e.committed_at.isoformat(),
        due_by=e.due_by.isoformat(),
    )


def amend(pledge: Pledge | None, e: PledgeAmended) -> Pledge:
    p = _owned_and_active(pledge, e.pledge_id, e.partner_id)
    capital = e.capital or p.capital
    gpus = e.gpus or p.gpus
    capacity = e.capacity or p.capacity
    # A pledge holds only the field of its kind, so a field of another kind here came from the amendment.
    _check_terms(p.kind, capital, gpus, capacity)
    if e.capital is not None and p.capital is not None:
        if e.capital.currency != p.capital.currency:
            raise RuleBroken(
                ReasonCode.CURRENCY_MISMATCH, f"pledge is in {p.capital.currency}, not {e.capital.currency}"
            )
        if e.capital.amount < p.disbursed:
            raise RuleBroken(
                ReasonCode.AMENDMENT_BELOW_DISBURSED,
                f"{e.capital.amount} is below the {p.disbursed} already disbursed",
            )
    return replace(
        p,
        capital=capital,
        gpus=gpus,
        capacity=capacity,
        earmark_batch_id=e.earmark_batch_id if e.earmark_batch_id is not None else p.earmark_batch_id,
        due_by=e.due_by.isoformat() if e.due_by is not None else p.due_by,
        version=p.version + 1,
    )


def withdraw(pledge: Pledge | None, e: PledgeWithdrawn) -> Pledge:
    p = _owned_and_active(pledge, e.pledge_id, e.partner_id)
    return replace(p, status="withdrawn", version=p.version + 1)


def disburse(pledge: Pledge | None, e: PledgeDisbursed) -> Pledge:
    p = _owned_and_active(pledge, e.pledge_id, e.partner_id)
    if p.capital is None:
        raise RuleBroken(
            ReasonCode.SCHEMA_INVALID, f"pledge {p.pledge_id!r} is a {p.kind} pledge; only capital is disbursed"
        )
    _check_money(e.amount)
    if e.amount.currency != p.capital.currency:
        raise RuleBroken(ReasonCode.CURRENCY_MISMATCH, f"pledge is in {p.capital.currency}, not {e.amount.currency}")
    total = p.disbursed + e.amount.amount
    if total > p.capital.amount:
        raise RuleBroken(
            ReasonCode.DISBURSEMENT_EXCEEDS_PLEDGE,
            f"disbursing {e.amount.amount} would bring the total to {total}, above the {p.capital.amount} pledged",
        )
    return replace(p, disbursed=total, version=p.version + 1)
