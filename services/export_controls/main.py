"""The export_controls service: an export decision for every award, and the licence that settles it.

On each accepted award (from the quotes service's decisions) it classifies the chip and
evaluates the shipment against the rule-set version in force (domain/), records the whole
evaluation and emits it as its own decision. `license.granted` / `license.denied` from the
licensing authority move a `license_required` case on.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import Column, Text, select
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from services.export_controls.domain import ExportControlError, ExportDecision, ExportRequest, evaluate
from shared.cloudevents import CloudEvent
from shared.consumer import Emitter, Inbound
from shared.contract import LICENSING_TOPIC, LicenseDenied, LicenseGranted, ReasonCode, decisions_topic, event_type
from shared.decisions import Accepted, Decision, Rejected, Verdict
from shared.facts import EXPORT, EXPORT_DECIDED, AwardFacts, ExportFacts, anomaly
from shared.service import Service, run_service
from shared.settings import Settings

SERVICE = "export_controls"


class ExportCase(SQLModel, table=True):
    __tablename__ = "export_cases"

    batch_id: str = Field(primary_key=True, max_length=200)
    status: str = Field(max_length=30)
    awarded_quantity: int
    cleared_quantity: int = 0
    license_number: str | None = Field(default=None, max_length=200)
    quota_key: str | None = Field(default=None, max_length=300)
    quota_delta: int = 0
    quota_apply_on: str | None = Field(default=None, max_length=30)
    # The full evaluation: rule version, inputs, classification, screening, quotas, reasoning.
    decision: str = Field(sa_column=Column(Text, nullable=False))


class QuotaUsage(SQLModel, table=True):
    """Cumulative TPP counted against a cap (a Tier 2 country allocation, a consignee's LPP year)."""

    __tablename__ = "export_quota_usage"

    key: str = Field(primary_key=True, max_length=300)
    used_tpp: int = 0


def _facts(case: ExportCase) -> dict[str, object]:
    decision = json.loads(case.decision)
    return {
        EXPORT: ExportFacts(
            batch_id=case.batch_id,
            status=case.status,  # type: ignore[arg-type]
            outcome=decision["outcome"],
            rule_version=decision["ruleset"]["version"],
            eccn=decision["classification"].get("eccn"),
            cleared_quantity=case.cleared_quantity,
            license_number=case.license_number,
            decision=decision,
        ).model_dump(mode="json")
    }


async def _add_quota(session: AsyncSession, key: str | None, delta: int) -> None:
    if not key or not delta:
        return
    row = await session.get(QuotaUsage, key) or QuotaUsage(key=key)
    row.used_tpp += delta
    session.add(row)


class ExportControls:
    def __init__(self, settings: Settings) -> None:
        self._pinned = settings.export_ruleset

    async def on_decision(self, session: AsyncSession, event: CloudEvent, decision: Decision, emit: Emitter) -> None:
        """React to accepted awards; every other decision of the quotes service is not ours."""
        if decision.status != "accepted" or "award" not in decision.facts:
            return
        award = AwardFacts.model_validate(decision.facts["award"])
        if await session.get(ExportCase, award.batch_id) is not None:
            return  # one award per batch: a second look at the same award changes nothing
        request = ExportRequest(
            batch_id=award.batch_id,
            model=award.model,
            quantity=award.quantity,
            origin_country=award.origin_country,
            route=award.route,
            destination_country=award.consignee.country,
            consignee=award.consignee.model_dump(),
            end_user=award.end_user.model_dump(),
            # The rule set in force on the planned shipment date (award + the vendor's lead time)
            # decides; a pinned EXPORT_RULESET overrides it.
            decision_date=datetime.fromisoformat(award.awarded_at).date() + timedelta(days=award.lead_time_days),
        )
        used = {q.key: q.used_tpp for q in (await session.execute(select(QuotaUsage))).scalars()}
        try:
            result = evaluate(request, ruleset=self._pinned, quota_used=used)
        except ExportControlError as exc:
            emit.decide(
                EXPORT_DECIDED,
                Rejected(reason_code=ReasonCode.UNKNOWN_MODEL, message=f"export evaluation impossible: {exc}"),
                aggregate_id=award.batch_id,
                batch_id=award.batch_id,
            )
            return
        case = _open_case(award, result)
        if result.quota_apply_on == "decision":
            await _add_quota(session, case.quota_key, case.quota_delta)
        session.add(case)
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
        emit.decide(
            EXPORT_DECIDED,
            Accepted(
                message=f"export {result.outcome} under {result.ruleset.version}"
                + (f" (licence exception {result.licence_exception})" if result.licence_exception else ""),
                facts=_facts(case),
                anomalies=anomalies,
            ),
            aggregate_id=award.batch_id,
            batch_id=award.batch_id,
        )

    async def on_license_granted(self, session: AsyncSession, inbound: Inbound) -> Verdict:
        data = inbound.data
        assert isinstance(data, LicenseGranted)
        case = await session.get(ExportCase, data.batch_id)
        if (refused := _expect_license_required(case, data.batch_id)) is not None:
            return refused
        assert case is not None
        if data.quantity <= 0:
            return Rejected(reason_code=ReasonCode.SCHEMA_INVALID, message="licensed quantity must be positive")
        case.status = "licensed"
        case.license_number = data.license_number
        # A licence for fewer units than awarded clears only those units.
        case.cleared_quantity = min(data.quantity, case.awarded_quantity)
        if case.quota_apply_on == "license_granted":
            await _add_quota(session, case.quota_key, case.quota_delta)
        session.add(case)
        return Accepted(
            message=f"licence {data.license_number} clears {case.cleared_quantity} of {case.awarded_quantity} units",
            facts=_facts(case),
        )

    async def on_license_denied(self, session: AsyncSession, inbound: Inbound) -> Verdict:
        data = inbound.data
        assert isinstance(data, LicenseDenied)
        case = await session.get(ExportCase, data.batch_id)
        if (refused := _expect_license_required(case, data.batch_id)) is not None:
            return refused
        assert case is not None
        case.status = "license_denied"
        case.cleared_quantity = 0
        session.add(case)
        return Accepted(
            message=f"licence denied for batch {data.batch_id}: {data.reason}",
            facts=_facts(case),
            anomalies=[anomaly("LICENSE_DENIED", f"licence denied: {data.reason}", data.batch_id, severity="medium")],
        )


def _open_case(award: AwardFacts, result: ExportDecision) -> ExportCase:
    return ExportCase(
        batch_id=award.batch_id,
        status=result.outcome,
        awarded_quantity=award.quantity,
        cleared_quantity=award.quantity if result.outcome == "cleared" else 0,
        quota_key=result.quota_key,
        quota_delta=result.quota_delta,
        quota_apply_on=result.quota_apply_on,
        decision=result.model_dump_json(),
    )


def _expect_license_required(case: ExportCase | None, batch_id: str) -> Rejected | None:
    if case is None:
        return Rejected(reason_code=ReasonCode.UNKNOWN_BATCH, message=f"no export case for batch {batch_id!r}")
    if case.status == "license_required":
        return None
    if case.status in ("denied", "license_denied"):
        return Rejected(reason_code=ReasonCode.EXPORT_DENIED, message=f"batch {batch_id} export is {case.status}")
    return Rejected(
        reason_code=ReasonCode.LICENSE_NOT_REQUIRED,
        message=f"batch {batch_id} is {case.status}; no licence decision is pending",
    )


def build(settings: Settings | None = None) -> Service:
    settings = settings or Settings()
    controls = ExportControls(settings)
    return Service(
        SERVICE,
        tables=[ExportCase.__table__, QuotaUsage.__table__],  # type: ignore[list-item]
        topics=[LICENSING_TOPIC, decisions_topic("quotes")],
        partner_handlers={
            event_type("license.granted.v1"): controls.on_license_granted,
            event_type("license.denied.v1"): controls.on_license_denied,
        },
        internal_handler=controls.on_decision,
        settings=settings,
    )


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()
