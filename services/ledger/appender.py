"""Turns each decision of every service into a log entry and its projections, in one transaction."""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.log import LogWriter
from services.ledger.projections import project
from shared.contract import fit
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Decision
from shared.runtime.consumer import Emitter
from shared.runtime.observability import LEDGER_SIZE

_WRITER = "gputrace.log_writer"
log = logging.getLogger(__name__)


class Appender:
    def __init__(self, origin: str, signing_key: Ed25519PrivateKey) -> None:
        self.origin = origin
        self._key = signing_key

    async def on_decision(self, session: AsyncSession, event: CloudEvent, decision: Decision, _: Emitter) -> None:
        writer = session.info.get(_WRITER)
        if writer is None:
            writer = session.info[_WRITER] = await LogWriter.open(session)
        # Projections first: if they fail, nothing was appended and the frontier has not moved.
        await project(session, decision, writer.size)
        # The index columns are bounded (log_entries); the entry itself keeps every character.
        appended = writer.append(
            decision.model_dump(mode="json"),
            service=fit(decision.service, 40),
            event_type=fit(decision.event_type, 100),
            status=fit(decision.status, 20),
            batch_id=_fit(decision.batch_id),
            aggregate_id=_fit(decision.aggregate_id),
            party_id=_fit(decision.party_id),
        )
        log.info(
            "appended %s",
            decision.event_type,
            extra={
                "leaf_index": appended.leaf_index,
                "decision_id": decision.decision_id,
                "event_id": (decision.event or {}).get("id"),
                "batch_id": decision.batch_id,
                "party": decision.party_id,
                "traceparent": event.trace.get("traceparent"),
            },
        )

    async def after_batch(self, session: AsyncSession) -> None:
        writer: LogWriter | None = session.info.pop(_WRITER, None)
        if writer is not None:
            await writer.finish(self.origin, self.origin, self._key)
            LEDGER_SIZE.set(writer.size)


def _fit(value: str | None) -> str | None:
    return fit(value, 200) if value is not None else None
