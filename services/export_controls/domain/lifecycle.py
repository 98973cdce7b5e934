"""The export case of a batch, from its award to the licensing authority's answer.

Pure: each function takes the case as it stands and the event, and returns what the case
becomes (with the quota to count, if any) or raises RuleBroken with the reason code the
partner reads. A fault of the export-control data is never a RuleBroken: the rule book is
checked when the service starts (rulebook.py), and anything that still goes wrong propagates
as an error, so the mechanism retries and dead-letters the event instead of recording a
partner's rejection.

    (award) ─▶ cleared
            ─▶ denied
            ─▶ license_required ─ license.granted ─▶ licensed
                                ─ license.denied  ─▶ license_denied
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shared.contract import LicenseDenied, LicenseGranted, ReasonCode
from shared.contract.decisions import RuleBroken
from shared.contract.facts import AwardFacts, ExportFacts, ExportStatus, anomaly

from .errors import NoRulesetInForceError, UnknownModelError
from .evaluate import evaluate, quota_keys
from .models import ExportDecision, ExportRequest
from .rulebook import RuleBook

QuotaMoment = Literal["decision", "license_granted"]


class Case(BaseModel):
    """The export case of one batch, as the service stores it."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    status: ExportStatus
    awarded_quantity: int
    cleared_quantity: int = 0
    license_number: str | None = None
    # The TPP this export counts against a cap, and when: once authorised (see ExportDecision).
    quota_key: str | None = None
    quota_delta: int = 0
    quota_apply_on: QuotaMoment | None = None
    # The full evaluation, as recorded: rule version, inputs, classification, screening, reasoning.
    decision: dict[str, Any]

    def facts(self) -> ExportFacts:
        return ExportFacts(
            batch_id=self.batch_id,
            status=self.status,
            outcome=self.decision["outcome"],
            rule_version=self.decision["ruleset"]["version"],
            eccn=self.decision["classification"].get("eccn"),
            cleared_quantity=self.cleared_quantity,
            license_number=self.license_number,
            decision=self.decision,
        )

    def quota_due(self, moment: QuotaMoment) -> tuple[str, int] | None:
        """The running total to add to when the case reaches `moment`, if it counts then."""
        if self.quota_apply_on == moment and self.quota_key and self.quota_delta:
            return self.quota_key, self.quota_delta
        return None


@dataclass(frozen=True)
class Opened:
    case: Case
    evaluation: ExportDecision
    anomalies: list[dict[str, Any]]

    @property
    def message(self) -> str:
        e = self.evaluation
        exception = f" (licence exception {e.licence_exception})" if e.licence_exception else ""
        return f"export {e.outcome} under {e.ruleset.version}{exception}"


def shipment_date(award: AwardFacts) -> date:
    """The planned shipment date: the award date plus the vendor's lead time. The rule set in
    force on it decides, not the one in force on the day of the award."""
    return datetime.fromisoformat(award.awarded_at).date() + timedelta(days=award.lead_time_days)


def export_request(award: AwardFacts) -> ExportRequest:
    return ExportRequest(
        batch_id=award.batch_id,
        model=award.model,
        quantity=award.quantity,
        origin_country=award.origin_country,
        route=award.route,
        destination_country=award.consignee.country,
        consignee=award.consignee.model_dump(),
        end_user=award.end_user.model_dump(),
        decision_date=shipment_date(award),
    )


def _no_ruleset(award: AwardFacts, err: NoRulesetInForceError) -> RuleBroken:
    return RuleBroken(
        ReasonCode.EXPORT_NOT_CLEARED,
        f"batch {award.batch_id} cannot be cleared: {err} (planned shipment date = award "
        f"{award.awarded_at} + {award.lead_time_days} days' lead time)",
    )


def quotas_read(award: AwardFacts, book: RuleBook) -> list[str]:
    """The running totals `open_case` may read for this award (its destination's, its
    consignee's), so the service loads only those."""
    request = export_request(award)
    try:
        return quota_keys(request, book.ruleset_on(request.decision_date), book.screener)
    except NoRulesetInForceError as err:
        raise _no_ruleset(award, err) from err


def open_case(award: AwardFacts, book: RuleBook, quota_used: Mapping[str, int]) -> Opened:
    """Decide the export of an awarded batch under the rule set in force on its shipment date.

    One award per batch: the service opens a case only for a batch that has none.
    """
    request = export_request(award)
    try:
        result = evaluate(
            request,
            ruleset=book.pinned,
            rulesets=book.rulesets,
            quota_used=quota_used,
            catalogue=book.catalogue,
            screener=book.screener,
        )
    except NoRulesetInForceError as err:
        raise _no_ruleset(award, err) from err
    except UnknownModelError as err:
        # The contract's models are all checked to be in the catalogue at start-up; this is the
        # rule for a model outside the contract list, should one ever reach here.
        raise RuleBroken(ReasonCode.UNKNOWN_MODEL, str(err)) from err
    case = Case(
        batch_id=award.batch_id,
        status=result.outcome,
        awarded_quantity=award.quantity,
        cleared_quantity=award.quantity if result.outcome == "cleared" else 0,
        quota_key=result.quota_key,
        quota_delta=result.quota_delta,
        quota_apply_on=result.quota_apply_on,
        decision=result.model_dump(mode="json"),
    )
    anomalies = []
    if result.outcome == "denied":
        anomalies.append(
            anomaly(
                "EXPORT_DENIED",
                f"export of batch {award.batch_id} denied: {result.reasoning[-1]}",
                award.batch_id,
                rule_version=result.ruleset.version,
            )
        )
    for party in result.screening.parties:
        # A near miss is not a hit, but clearing it silently would hide it: a human decides.
        if party.review and party.matched_entry is not None:
            entry = party.matched_entry
            anomalies.append(
                anomaly(
                    "SCREENING_REVIEW",
                    f"batch {award.batch_id}: {party.role.replace('_', ' ')} '{party.name}' resembles "
                    f"{entry.list} entry '{entry.name}' ({entry.id}) with score {party.best_score:.1f} "
                    f"(hit at {party.threshold:g}, review from {party.review_threshold:g}, method {party.method})",
                    award.batch_id,
                    severity="medium",
                    entry_id=entry.id,
                    score=party.best_score,
                    screening_snapshot=result.screening.sha256,
                )
            )
    return Opened(case=case, evaluation=result, anomalies=anomalies)


def _awaiting_licence(case: Case | None, batch_id: str) -> Case:
    if case is None:
        raise RuleBroken(ReasonCode.UNKNOWN_BATCH, f"no export case for batch {batch_id!r}")
    if case.status in ("denied", "license_denied"):
        raise RuleBroken(ReasonCode.EXPORT_DENIED, f"batch {batch_id} export is {case.status}")
    if case.status != "license_required":
        raise RuleBroken(
            ReasonCode.LICENSE_NOT_REQUIRED, f"batch {batch_id} is {case.status}; no licence decision is pending"
        )
    return case


def grant_licence(case: Case | None, e: LicenseGranted) -> Case:
    """A licence clears the units it names, never more than were awarded."""
    pending = _awaiting_licence(case, e.batch_id)
    if e.quantity <= 0:
        raise RuleBroken(ReasonCode.AMOUNT_NOT_POSITIVE, "licensed quantity must be positive")
    return pending.model_copy(
        update={
            "status": "licensed",
            "license_number": e.license_number,
            "cleared_quantity": min(e.quantity, pending.awarded_quantity),
        }
    )


def deny_licence(case: Case | None, e: LicenseDenied) -> Case:
    # Nothing was cleared while the licence was pending, so nothing is taken back.
    return _awaiting_licence(case, e.batch_id).model_copy(update={"status": "license_denied"})
