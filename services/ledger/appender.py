"""Turns each decision of every service into a log entry and its projections, in one transaction.

A log entry is the decision exactly as its service signed it (the record's `data`) plus its
signed envelope under `envelope` (the CloudEvents attributes and `ce_signature`), so an auditor
re-checks the service's signature on every entry (gputrace_verifier.audit): the structured event
the signature covers is the envelope without `signature`, plus `data` = the entry without
`envelope`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.log import LogWriter
from services.ledger.projections import Statistics, flush, project
from shared.contract import fit
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import Decision
from shared.runtime.consumer import ENVELOPE_FIELD, Emitter
from shared.runtime.observability import LEDGER_SIZE

_WRITER = "gputrace.log_writer"
_APPENDED = "gputrace.ledger.appended"
log = logging.getLogger(__name__)


class Appender:
    def __init__(self, origin: str, signing_key: Ed25519PrivateKey) -> None:
        self.origin = origin
        self._key = signing_key
        # Called once a batch that signed a checkpoint has committed (the witnesses are told then).
        self.on_checkpoint: Callable[[], None] | None = None
        self.statistics = Statistics()

    async def before_batch(self, session: AsyncSession) -> None:
        """The writer (its lock, the head, the frontier) before the first record, outside every
        record's savepoint: a record rolled back must not release the lock for the ones after it."""
        session.info[_WRITER] = await LogWriter.open(session)

    async def on_decision(self, session: AsyncSession, event: CloudEvent, decision: Decision, _: Emitter) -> None:
        writer: LogWriter | None = session.info.get(_WRITER)
        if writer is None:
            raise RuntimeError("no log writer: the ledger's BatchProcessor must run Appender.before_batch")
        # Projections first: if they fail, nothing was appended and the frontier has not moved.
        await project(session, decision, writer.size)
        # The index columns are bounded (log_entries); the entry itself keeps every character.
        entry = signed_entry(event)
        appended = writer.append(
            entry,
            # The entry's canonical form from the decision's, made once when its signature was checked.
            body=event.canonical_with_data(ENVELOPE_FIELD, entry[ENVELOPE_FIELD]),
            service=fit(decision.service, 40),
            event_type=fit(decision.event_type, 100),
            status=fit(decision.status, 20),
            batch_id=_fit(decision.batch_id),
            aggregate_id=_fit(decision.aggregate_id),
            party_id=_fit(decision.party_id),
        )
        # One INFO line per batch names its entries (after_batch); per entry only at DEBUG.
        named = {
            "leaf_index": appended.leaf_index,
            "decision_id": decision.decision_id,
            "event_id": (decision.event or {}).get("id"),
            "traceparent": event.trace.get("traceparent"),
        }
        # By leaf index: a record rolled back to its savepoint (safe mode) frees its index for the next.
        session.info.setdefault(_APPENDED, {})[appended.leaf_index] = named
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "appended %s",
                decision.event_type,
                extra={**named, "batch_id": decision.batch_id, "party": decision.party_id},
            )

    async def after_batch(self, session: AsyncSession) -> None:
        # The projections' per-batch writes (running totals, timeline steps): one statement each.
        await flush(session)
        writer: LogWriter | None = session.info.pop(_WRITER, None)
        if writer is not None:
            signed = await writer.finish(self.origin, self.origin, self._key)
            LEDGER_SIZE.set(writer.size)
            if signed is not None and self.on_checkpoint is not None:
                notify = self.on_checkpoint
                # After the commit, not now: before it the checkpoint is invisible to other sessions.
                event.listen(session.sync_session, "after_commit", lambda _: notify(), once=True)
            await self.statistics.refresh(session, writer.size)
            appended = session.info.pop(_APPENDED, {})
            entries = [e for i, e in sorted(appended.items()) if writer.start_size <= i < writer.size]
            if entries:
                log.info(
                    "appended %d entries (leaves %d to %d)",
                    len(entries),
                    entries[0]["leaf_index"],
                    entries[-1]["leaf_index"],
                    extra={"entries": entries},
                )


def signed_entry(event: CloudEvent) -> dict[str, Any]:
    """The log entry of a decision record the runtime authenticated (shared.runtime.consumer.forgery):
    the signed data as received, not re-serialised from the model, so the signature still verifies."""
    envelope = {**event.attributes(), "signature": event.signature}
    return {**event.data, ENVELOPE_FIELD: envelope}


def _fit(value: str | None) -> str | None:
    return fit(value, 200) if value is not None else None
