"""The export_controls service: an export decision for every award, and the licence that settles it.

On each accepted award (from the quotes service's decisions) it opens the batch's export case:
the chip classified and the shipment evaluated against the rule-set version in force on the
planned shipment date, the whole evaluation recorded and emitted as its own decision.
`license.granted` / `license.denied` from the licensing authority move a `license_required`
case on. Every rule is in domain/ (lifecycle.py); the handlers here load, call a rule, save.

The export-control data is loaded and checked when the service starts: a broken or missing
rule-set file stops the start-up with a message naming it (a configuration fault, never a
partner's rejection in the ledger).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace

from sqlalchemy import Column, Text, select
from sqlmodel import Field, SQLModel, col
from sqlmodel.ext.asyncio.session import AsyncSession

from services.export_controls.domain import Case, ExportControlError, RuleBook, lifecycle, load_rulebook
from services.export_controls.domain.snapshots import ActiveScreening
from shared.contract import LICENSING_TOPIC, LicenseDenied, LicenseGranted, decisions_topic, event_type
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Accepted, Decision, RuleBroken, Verdict
from shared.contract.facts import AWARD, EXPORT, EXPORT_DECIDED, AwardFacts, anomaly
from shared.runtime.consumer import Emitter, Inbound
from shared.runtime.service import Service, run_service
from shared.runtime.settings import Settings

SERVICE = "export_controls"
log = logging.getLogger(__name__)


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


# --- persistence --------------------------------------------------------------------------


async def _case(session: AsyncSession, batch_id: str) -> Case | None:
    row = await session.get(ExportCase, batch_id)
    if row is None:
        return None
    return Case.model_validate({**row.model_dump(), "decision": json.loads(row.decision)})


async def _save_case(session: AsyncSession, case: Case) -> None:
    values = case.model_dump(exclude={"decision"})
    row = await session.get(ExportCase, case.batch_id)
    if row is None:
        row = ExportCase(**values, decision=json.dumps(case.decision))
    else:
        row.sqlmodel_update(values)
    session.add(row)


async def _quota_used(session: AsyncSession, keys: list[str]) -> dict[str, int]:
    """Only the totals this decision may read (its destination's and consignee's)."""
    if not keys:
        return {}
    rows = await session.execute(select(QuotaUsage).where(col(QuotaUsage.key).in_(keys)))
    return {q.key: q.used_tpp for q in rows.scalars()}


async def _count_quota(session: AsyncSession, due: tuple[str, int] | None) -> None:
    if due is None:
        return
    key, delta = due
    row = await session.get(QuotaUsage, key) or QuotaUsage(key=key)
    row.used_tpp += delta
    session.add(row)


def _facts(case: Case) -> dict[str, object]:
    return {EXPORT: case.facts().model_dump(mode="json")}


# --- handlers -----------------------------------------------------------------------------


class ExportControls:
    def __init__(self, settings: Settings) -> None:
        # Every data file loaded and checked now: a fault stops the start-up (see main()).
        self.book = load_rulebook(settings.export_data_dir, settings.export_ruleset, var_dir=settings.var_dir)
        # A later `gputrace screening import` takes effect without a restart (checked per award).
        self.screening = ActiveScreening(
            settings.var_dir, self.book.shipped_screener or self.book.screener, self.book.screener
        )

    def _current_book(self) -> RuleBook:
        screener = self.screening.current()
        if screener is not self.book.screener:
            log.info("screening snapshot now %s", screener.list.sha256)
            self.book = replace(self.book, screener=screener)
        return self.book

    async def on_decision(self, session: AsyncSession, event: CloudEvent, decision: Decision, emit: Emitter) -> None:
        """React to accepted awards; every other decision of the quotes service is not ours."""
        if decision.status != "accepted" or AWARD not in decision.facts:
            return
        award = AwardFacts.model_validate(decision.facts[AWARD])
        if await session.get(ExportCase, award.batch_id) is not None:
            return  # one award per batch: a second look at the same award changes nothing
        book = self._current_book()  # one snapshot for the whole decision, recorded in it
        try:
            used = await _quota_used(session, lifecycle.quotas_read(award, book))
            opened = lifecycle.open_case(award, book, used)
        except RuleBroken as broken:
            verdict: Verdict = broken.rejected()
        else:
            await _save_case(session, opened.case)
            await _count_quota(session, opened.case.quota_due("decision"))
            verdict = Accepted(message=opened.message, facts=_facts(opened.case), anomalies=opened.anomalies)
        emit.decide(EXPORT_DECIDED, verdict, aggregate_id=award.batch_id, batch_id=award.batch_id)

    async def on_license_granted(self, session: AsyncSession, inbound: Inbound) -> Verdict:
        data = inbound.data
        assert isinstance(data, LicenseGranted)
        try:
            case = lifecycle.grant_licence(await _case(session, data.batch_id), data)
        except RuleBroken as broken:
            return broken.rejected()
        await _save_case(session, case)
        await _count_quota(session, case.quota_due("license_granted"))
        return Accepted(
            message=f"licence {data.license_number} clears {case.cleared_quantity} of {case.awarded_quantity} units",
            facts=_facts(case),
        )

    async def on_license_denied(self, session: AsyncSession, inbound: Inbound) -> Verdict:
        data = inbound.data
        assert isinstance(data, LicenseDenied)
        try:
            case = lifecycle.deny_licence(await _case(session, data.batch_id), data)
        except RuleBroken as broken:
            return broken.rejected()
        await _save_case(session, case)
        return Accepted(
            message=f"licence denied for batch {data.batch_id}: {data.reason}",
            facts=_facts(case),
            anomalies=[anomaly("LICENSE_DENIED", f"licence denied: {data.reason}", data.batch_id, severity="medium")],
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


def _build_or_refuse() -> Service:
    try:
        return build()
    except ExportControlError as exc:
        # A configuration fault: say which file and why, and exit non-zero before any event is read.
        sys.exit(f"export_controls refuses to start: the export-control data is invalid: {exc}")


def main() -> None:
    run_service(_build_or_refuse)


if __name__ == "__main__":
    main()
