"""The one delivery mechanism every service uses.

A polled batch of records is handled in ONE database transaction; each record in its own
savepoint, so a record that breaks a rule or trips a bug is rolled back alone and the rest of
the batch goes on. In that transaction go the state change, the processed-message row
(idempotent consumer) and the outgoing records (transactional outbox). The Kafka offsets are
committed by FastStream's ack only after the transaction commits (AckPolicy.NACK_ON_ERROR):
if the database is away, the batch is nacked (the consumer seeks back) and retried.

Nothing blocks a partition: unreadable records and records whose handler fails go to the DLQ
with their bytes and reason; every readable partner event gets exactly one outcome.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.cloudevents import CloudEvent, UnreadableRecord, child_trace, from_record, now_rfc3339
from shared.contract import (
    DLQ_TOPIC,
    EVENTS,
    OUTCOMES_TOPIC,
    Contract,
    EventSpec,
    ReasonCode,
    decisions_topic,
    service_source,
)
from shared.db import ProcessedMessage, utcnow
from shared.decisions import (
    DECISION_TYPE,
    DLQ_TYPE,
    OUTCOME_TYPE,
    Accepted,
    DeadLetter,
    Decision,
    Outcome,
    Rejected,
    Verdict,
    decision_id,
)
from shared.observability import DEAD_LETTERS, DECISIONS, DUPLICATES, EVENTS_CONSUMED
from shared.outbox import enqueue
from shared.parties import PartyRegistry, RegisteredParty

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    """An authenticated, authorised, schema-valid partner event, ready for the domain."""

    event: CloudEvent
    party: RegisteredParty
    spec: EventSpec
    data: Contract

    @property
    def aggregate_id(self) -> str:
        return str(getattr(self.data, self.spec.aggregate_field))


PartnerHandler = Callable[[AsyncSession, Inbound], Awaitable[Verdict]]


class Emitter:
    """Lets a handler record decisions a service takes on its own (not in answer to a partner)."""

    def __init__(self, service: str, session: AsyncSession, trigger: CloudEvent, trace: dict[str, str]) -> None:
        self._service = service
        self._session = session
        self._trigger = trigger
        self._trace = trace
        self.emitted: list[Decision] = []

    def decide(
        self,
        event_type: str,
        verdict: Verdict,
        *,
        aggregate_id: str,
        batch_id: str | None,
        trigger: dict[str, Any] | None = None,
        salt: str = "",
    ) -> Decision:
        decision = Decision(
            decision_id=decision_id(self._service, self._trigger.source, self._trigger.id, event_type + salt),
            service=self._service,
            decided_at=utcnow(),
            status=verdict.status,
            reason_code=getattr(verdict, "reason_code", None),
            message=verdict.message,
            event_type=event_type,
            aggregate_id=aggregate_id,
            batch_id=batch_id,
            trigger=trigger or {"source": self._trigger.source, "id": self._trigger.id, "type": self._trigger.type},
            facts=verdict.facts,
            anomalies=verdict.anomalies,
        )
        publish_decision(self._session, decision, trace=self._trace)
        self.emitted.append(decision)
        return decision


InternalHandler = Callable[[AsyncSession, CloudEvent, Decision, Emitter], Awaitable[None]]
BatchHook = Callable[[AsyncSession], Awaitable[None]]


def publish_decision(session: AsyncSession, decision: Decision, trace: dict[str, str] | None = None) -> None:
    DECISIONS.labels(decision.service, decision.event_type, decision.status, decision.reason_code or "").inc()
    enqueue(
        session,
        decisions_topic(decision.service),
        CloudEvent(
            id=decision.decision_id,
            source=service_source(decision.service),
            type=DECISION_TYPE,
            subject=decision.aggregate_id,
            time=decision.decided_at.isoformat(),
            data=decision.model_dump(mode="json"),
            trace=dict(trace or {}),
        ),
    )


class InfrastructureError(Exception):
    """The database or broker is unavailable: retry the whole batch, never dead-letter it."""


def _is_infrastructure(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | ConnectionError | OSError)


class _Rollback(Exception):
    """Raised inside a savepoint to undo a rejected event's partial changes."""

    def __init__(self, verdict: Rejected) -> None:
        self.verdict = verdict


class BatchProcessor:
    """Turns polled records into decisions, for one service. Pure of Kafka client state: the
    subscriber feeds it records and acks once `process` has returned."""

    def __init__(
        self,
        service: str,
        sessions: Callable[[], AsyncSession],
        registry: PartyRegistry | None = None,
        partner_handlers: dict[str, PartnerHandler] | None = None,
        internal_handler: InternalHandler | None = None,
        internal_topics: Sequence[str] = (),
        after_batch: BatchHook | None = None,
    ) -> None:
        self.service = service
        self._internal_topics = frozenset(internal_topics)
        self._sessions = sessions
        self._registry = registry
        self._partner_handlers = partner_handlers or {}
        self._internal_handler = internal_handler
        self._after_batch = after_batch

    async def process(self, records: Sequence[ConsumerRecord]) -> None:
        async with self._sessions() as session, session.begin():
            for record in records:
                EVENTS_CONSUMED.labels(self.service, record.topic).inc()
                await self._one(session, record)
            if self._after_batch:
                await self._after_batch(session)

    async def _one(self, session: AsyncSession, record: ConsumerRecord) -> None:
        try:
            event = from_record(record.value, record.headers)
        except UnreadableRecord as exc:
            await self._dead_letter(session, record, str(exc))
            return
        try:
            async with session.begin_nested():
                # Routed by topic, never by the claimed source: only services write decision topics.
                if record.topic in self._internal_topics:
                    await self._internal(session, event)
                else:
                    await self._partner(session, record, event)
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            log.exception("handler failed", extra={"event_id": event.id, "source": event.source})
            await self._dead_letter(session, record, f"handler failed: {type(exc).__name__}: {exc}")

    # --- partner events -------------------------------------------------------------------

    async def _partner(self, session: AsyncSession, record: ConsumerRecord, event: CloudEvent) -> None:
        party = self._registry.by_source(event.source) if self._registry else None
        authentic = party is not None and event.verify(party.public_key)
        # An unauthenticated record must not claim the id of a genuine one: its dedupe key
        # includes a digest of its bytes, so a forgery never shadows the real event.
        dedupe_id = event.id if authentic else f"{event.id}#{_digest(record)}"
        if await self._seen(session, event.source, dedupe_id):
            return
        verdict, inbound = self._admit(record, event, party, authentic)
        if inbound is not None:
            handler = self._partner_handlers.get(inbound.spec.type)
            if handler is None:
                verdict = Rejected(
                    reason_code=ReasonCode.WRONG_TOPIC,
                    message=f"{event.type} is not handled by the {self.service} service",
                )
            else:
                try:
                    async with session.begin_nested():
                        verdict = await handler(session, inbound)
                        if isinstance(verdict, Rejected):
                            raise _Rollback(verdict)
                except _Rollback as rb:
                    verdict = rb.verdict
        assert verdict is not None
        spec = EVENTS.get(event.type)
        aggregate = inbound.aggregate_id if inbound else _guess(event, spec)
        decision = Decision(
            decision_id=decision_id(self.service, event.source, dedupe_id),
            service=self.service,
            decided_at=utcnow(),
            status=verdict.status,
            reason_code=getattr(verdict, "reason_code", None),
            message=verdict.message,
            event_type=event.type,
            aggregate_id=aggregate,
            batch_id=_batch_of(event),
            party_id=party.id if party else None,
            event={**event.structured(), **({"signature": event.signature} if event.signature else {})},
            facts=verdict.facts,
            anomalies=verdict.anomalies,
        )
        trace = child_trace(event.trace)
        publish_decision(session, decision, trace=trace)
        outcome = Outcome(
            event_id=event.id,
            event_source=event.source,
            event_type=event.type,
            status=decision.status,
            reason_code=decision.reason_code,
            message=decision.message,
            decision_id=decision.decision_id,
            service=self.service,
            decided_at=decision.decided_at,
        )
        enqueue(
            session,
            OUTCOMES_TOPIC,
            CloudEvent(
                id=decision.decision_id,
                source=service_source(self.service),
                type=OUTCOME_TYPE,
                # Keyed by the sending party, so each party reads its outcomes in order.
                subject=party.id if party else event.source,
                time=now_rfc3339(),
                data=outcome.model_dump(mode="json"),
                trace=trace,
            ),
        )
        await self._mark(session, event.source, dedupe_id, decision.decision_id)
        log.info(
            "decided %s %s",
            event.type,
            decision.status,
            extra={
                "event_id": event.id,
                "party": decision.party_id,
                "batch_id": decision.batch_id,
                "reason": decision.reason_code,
                "traceparent": trace["traceparent"],
            },
        )

    def _admit(
        self, record: ConsumerRecord, event: CloudEvent, party: RegisteredParty | None, authentic: bool
    ) -> tuple[Verdict | None, Inbound | None]:
        """The checks every partner event passes before any domain rule (design.md §4)."""
        if party is None:
            return Rejected(reason_code=ReasonCode.UNKNOWN_PARTY, message=f"no registered party {event.source!r}"), None
        if not authentic:
            why = "missing ce_signature" if not event.signature else "signature does not verify with the party's key"
            return Rejected(reason_code=ReasonCode.SIGNATURE_INVALID, message=why), None
        spec = EVENTS.get(event.type)
        if spec is None:
            return Rejected(reason_code=ReasonCode.UNKNOWN_TYPE, message=f"unknown event type {event.type!r}"), None
        if spec.topic != record.topic:
            return Rejected(
                reason_code=ReasonCode.WRONG_TOPIC, message=f"{event.type} belongs on {spec.topic}, not {record.topic}"
            ), None
        if not spec.roles & party.roles:
            roles = ", ".join(sorted(spec.roles))
            return Rejected(
                reason_code=ReasonCode.NOT_AUTHORIZED, message=f"{party.id} may not send {event.type} (needs {roles})"
            ), None
        try:
            data = spec.data.model_validate(event.data)
        except ValidationError as exc:
            return Rejected(reason_code=ReasonCode.SCHEMA_INVALID, message=_short_errors(exc)), None
        if spec.self_field and getattr(data, spec.self_field) != party.id:
            return Rejected(
                reason_code=ReasonCode.NOT_AUTHORIZED,
                message=f"{spec.self_field} {getattr(data, spec.self_field)!r} is not the sender {party.id!r}",
            ), None
        aggregate = str(getattr(data, spec.aggregate_field))
        if event.subject is not None and event.subject != aggregate:
            return Rejected(
                reason_code=ReasonCode.SUBJECT_MISMATCH,
                message=f"ce_subject {event.subject!r} is not the {spec.aggregate_field} {aggregate!r}",
            ), None
        return None, Inbound(event=event, party=party, spec=spec, data=data)

    # --- decisions of other services ------------------------------------------------------

    async def _internal(self, session: AsyncSession, event: CloudEvent) -> None:
        if self._internal_handler is None:
            raise RuntimeError(f"{self.service} reads {event.type} from a decision topic but has no internal handler")
        if await self._seen(session, event.source, event.id):
            return
        decision = Decision.model_validate(event.data)
        emitter = Emitter(self.service, session, event, child_trace(event.trace))
        await self._internal_handler(session, event, decision, emitter)
        await self._mark(session, event.source, event.id, None)

    # --- shared steps ---------------------------------------------------------------------

    async def _seen(self, session: AsyncSession, source: str, event_id: str) -> bool:
        if await session.get(ProcessedMessage, (source, event_id)) is not None:
            DUPLICATES.labels(self.service).inc()
            return True
        return False

    async def _mark(self, session: AsyncSession, source: str, event_id: str, decision: str | None) -> None:
        session.add(ProcessedMessage(source=source, event_id=event_id, decision_id=decision))
        await session.flush()

    async def _dead_letter(self, session: AsyncSession, record: ConsumerRecord, reason: str) -> None:
        where = f"{record.topic}/{record.partition}"
        if await self._seen(session, f"kafka:{where}", str(record.offset)):
            return
        DEAD_LETTERS.labels(self.service, record.topic).inc()
        letter = DeadLetter(
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key_b64=base64.b64encode(record.key).decode() if record.key is not None else None,
            value_b64=base64.b64encode(record.value).decode() if record.value is not None else None,
            headers=[(k, base64.b64encode(v or b"").decode()) for k, v in record.headers],
            service=self.service,
            failed_at=utcnow(),
        )
        enqueue(
            session,
            DLQ_TOPIC,
            CloudEvent(
                id=decision_id(self.service, f"kafka:{where}", str(record.offset)),
                source=service_source(self.service),
                type=DLQ_TYPE,
                subject=where,
                time=now_rfc3339(),
                data=letter.model_dump(mode="json"),
            ),
        )
        await self._mark(session, f"kafka:{where}", str(record.offset), None)
        log.warning("dead-lettered %s@%s: %s", where, record.offset, reason)


def _digest(record: ConsumerRecord) -> str:
    h = hashlib.sha256(record.value or b"")
    for k, v in record.headers:
        h.update(k.encode() + b"\0" + (v or b"") + b"\0")
    return h.hexdigest()[:16]


def _guess(event: CloudEvent, spec: EventSpec | None) -> str | None:
    if spec and isinstance(event.data.get(spec.aggregate_field), str):
        return event.data[spec.aggregate_field]
    return event.subject


def _batch_of(event: CloudEvent) -> str | None:
    value = event.data.get("batch_id") or event.data.get("earmark_batch_id")
    return value if isinstance(value, str) else None


def _short_errors(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'data'}: {e['msg']}" for e in exc.errors()[:5]]
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


async def retry_pause(started: float, minimum: float = 1.0) -> None:
    """Back off before a nacked batch is redelivered, so an outage is not a hot loop."""
    await asyncio.sleep(max(0.0, minimum - (time.monotonic() - started)))


def accepted(message: str = "accepted", **facts: Any) -> Accepted:
    return Accepted(message=message, facts=facts)


def rejected(code: ReasonCode, message: str, **facts: Any) -> Rejected:
    return Rejected(reason_code=code, message=message, facts=facts)
