"""The one delivery mechanism every service uses.

A polled batch of records is handled in ONE database transaction; each record in its own
savepoint, so a record that breaks a rule or trips a bug is rolled back alone and the rest of
the batch goes on. In that transaction go the state change, the processed-message row
(idempotent consumer) and the outgoing records (transactional outbox). The Kafka offsets are
committed by FastStream's ack only after the transaction commits (AckPolicy.NACK_ON_ERROR):
if the database is away, the batch is nacked (the consumer seeks back) and retried.

Nothing blocks a partition: reading a record never raises (an unreadable one is dead-lettered
with its bytes and the reason; one beyond the contract's limits is rejected SCHEMA_INVALID). A
batch that fails for any reason but the database or broker being away is replayed record by
record; a record whose handler still fails after MAX_TRIES deliveries (counted in the database,
so across redeliveries and restarts) is dead-lettered and, if it is a partner event, answered
INTERNAL_ERROR. So every readable partner event gets exactly one decision and one outcome.
Outages (database, broker) are retried without limit and never dead-lettered.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from aiokafka import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError
from sqlalchemy import delete, select, tuple_
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract import (
    DECISION_TOPIC_OWNERS,
    DLQ_TOPIC,
    EVENTS,
    MAX_SUBJECT_CHARS,
    OUTCOMES_TOPIC,
    Contract,
    EventSpec,
    ReasonCode,
    decisions_topic,
    fit,
    service_source,
)
from shared.contract.cloudevents import (
    CloudEvent,
    Received,
    UnreadableRecord,
    now_rfc3339,
    printable,
    read_record,
)
from shared.contract.decisions import (
    DECISION_TYPE,
    DLQ_TYPE,
    OUTCOME_TYPE,
    DeadLetter,
    Decision,
    Outcome,
    Rejected,
    Verdict,
    decision_id,
)
from shared.contract.parties import PartyRegistry, RegisteredParty
from shared.runtime.aggregates import AggregateCache, deferred_writes, driver_cursor, lock_rows_read, write_deferred
from shared.runtime.db import DeliveryFailure, ProcessedMessage, utcnow
from shared.runtime.observability import (
    DEAD_LETTERS,
    DECISIONS,
    DUPLICATES,
    EVENTS_CONSUMED,
    FORGED_DECISIONS,
    event_type_label,
)
from shared.runtime.outbox import Pending, enqueue, pending_of
from shared.runtime.tracing import annotate, outgoing, record_span
from shared.runtime.tracing import tracer as current_tracer

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

    def __init__(
        self,
        service: str,
        session: AsyncSession,
        trigger: CloudEvent,
        trace: dict[str, str],
        key: Ed25519PrivateKey | None = None,
    ) -> None:
        self._service = service
        self._session = session
        self._trigger = trigger
        self._trace = trace
        self._key = key
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
        publish_decision(self._session, decision, trace=self._trace, trusted_type=True, key=self._key)
        self.emitted.append(decision)
        return decision


InternalHandler = Callable[[AsyncSession, CloudEvent, Decision, Emitter], Awaitable[None]]
BatchHook = Callable[[AsyncSession], Awaitable[None]]
# Loads, in a query or two, the rows the batch's handlers will read (shared.runtime.aggregates.load):
# given the batch's new events, before the first is decided. Only an optimisation: a key it
# misses is read by the handler's own `aggregates.get`.
Prefetch = Callable[[AsyncSession, Sequence[CloudEvent]], Awaitable[None]]


def publish_decision(
    session: AsyncSession,
    decision: Decision,
    trace: dict[str, str] | None = None,
    trusted_type: bool = False,
    key: Ed25519PrivateKey | None = None,
) -> None:
    """Enqueue a decision on the service's decisions topic, signed with the service's key exactly
    like a partner event (docs/partner-contract.md §2–§4). Unsigned (no key) it is a record every
    reader dead-letters: only a service's own key makes its decision count."""
    # trusted_type: the service chose the type (Emitter); otherwise it is the partner's ce_type.
    label = decision.event_type if trusted_type else event_type_label(decision.event_type)
    DECISIONS.labels(decision.service, label, decision.status, decision.reason_code or "").inc()
    event = CloudEvent(
        id=decision.decision_id,
        source=service_source(decision.service),
        type=DECISION_TYPE,
        subject=decision.aggregate_id,
        time=decision.decided_at.isoformat(),
        data=decision.model_dump(mode="json"),
        trace=dict(trace or {}),
    )
    enqueue(session, decisions_topic(decision.service), event.signed(key) if key is not None else event)


# The member a ledger entry adds to the signed decision for its envelope (services.ledger.appender);
# a decision may not carry it itself, or the entry would be ambiguous.
ENVELOPE_FIELD = "envelope"


def forgery(event: CloudEvent, topic: str, registry: PartyRegistry | None) -> tuple[str, str] | None:
    """Why a record on a decisions topic does not count as its owner's decision, or None: (a label
    of FORGERY_REASONS, the message). Counted only if the owner's registered key signed it."""
    owner = DECISION_TOPIC_OWNERS.get(topic)
    if owner is None:
        return "not_a_decisions_topic", f"{topic} is not a decisions topic of any service"
    if event.source != service_source(owner):
        return "wrong_source", f"ce_source {fit(event.source, 200)!r} is not {service_source(owner)!r}"
    if not event.signature:
        return "unsigned", "missing ce_signature"
    key = registry.service(owner) if registry is not None else None
    if key is None:
        return "unknown_service", f"the party registry has no key for the {owner} service"
    if not event.verify(key.public_key):
        return "bad_signature", f"signature does not verify with the {owner} service's key"
    if event.type != DECISION_TYPE:
        return "wrong_type", f"ce_type {fit(event.type, 200)!r} is not {DECISION_TYPE}"
    if event.data.get("service") != owner:
        return "wrong_service", f"data.service {fit(str(event.data.get('service')), 200)!r} is not {owner!r}"
    if ENVELOPE_FIELD in event.data:
        return "reserved_field", f"data.{ENVELOPE_FIELD} is reserved for the ledger"
    return None


FORGERY_REASONS = (
    "not_a_decisions_topic",
    "wrong_source",
    "unsigned",
    "unknown_service",
    "bad_signature",
    "wrong_type",
    "wrong_service",
    "reserved_field",
)


# Deliveries of a record whose handler fails before it is given up (dead letter, INTERNAL_ERROR).
MAX_TRIES = 3
# processed_messages.source / event_id are VARCHAR(300): idempotency keys are fitted to them.
_KEY_CHARS = 300
# What a dead letter keeps of a record, so that the letter always fits in a Kafka record (1 MiB):
# the value whole up to this size, else its head (with its SHA-256 and length, always given).
LETTER_VALUE_BYTES = 128 * 1024
LETTER_KEY_BYTES = 1024
LETTER_HEADERS = 32
LETTER_HEADER_BYTES = 1024
# A decision embeds the partner's event; beyond this its data is summarised (SHA-256), so the
# decision record stays well under Kafka's 1 MiB and always reaches the ledger.
_EMBED_LIMIT = 512 * 1024


class RetryBatch(Exception):
    """A record's handler failed and has tries left: the batch is nacked and delivered again."""


class _RecordFailed(Exception):
    """Raised out of a safe-mode run: this record failed and is to be tried again."""

    def __init__(self, item: _Item, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.item = item
        self.error = error


def _is_infrastructure(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    # psycopg's own errors too: the bulk writes go straight through it (aggregates.driver_cursor).
    return isinstance(
        exc,
        sa_exc.OperationalError
        | sa_exc.InterfaceError
        | psycopg.OperationalError
        | psycopg.InterfaceError
        | ConnectionError
        | OSError,
    )


class _Rollback(Exception):
    """Raised inside a savepoint to undo a rejected event's partial changes."""

    def __init__(self, verdict: Rejected) -> None:
        self.verdict = verdict


@dataclass
class _Item:
    """One polled record, read and authenticated before the transaction starts (CPU only)."""

    record: ConsumerRecord
    key: tuple[str, str]  # the idempotency key: (ce_source, ce_id), or the Kafka position
    event: CloudEvent | None = None
    received: Received | None = None
    unreadable: str | None = None
    party: RegisteredParty | None = None
    authentic: bool = False
    # Why the record key is not the event's aggregate id (KEY_MISMATCH), or None.
    misplaced: str | None = None

    @property
    def position(self) -> str:
        return f"{self.record.topic}/{self.record.partition}@{self.record.offset}"


class NeedsSafeMode(Exception):
    """The fast path cannot decide this batch cleanly; it is replayed record by record."""


class _Watch:
    """Notices a handler's changes reaching the session: a rejected event must leave none."""

    def __init__(self, session: AsyncSession) -> None:
        self.active = False
        self.changed = False
        self._session = session
        self._deferred = 0
        sa_event.listen(session.sync_session, "before_flush", self._before_flush)

    def _before_flush(self, session: Any, *_: Any) -> None:
        if self.active and _domain_changes(session):
            self.changed = True

    def __enter__(self) -> _Watch:
        self.active, self.changed = True, False
        self._deferred = deferred_writes(self._session)
        return self

    def __exit__(self, *_: object) -> None:
        self.active = False
        # Upserts the handler deferred to the batch's end (shared.runtime.aggregates) are changes too.
        if deferred_writes(self._session) != self._deferred:
            self.changed = True


def _domain_changes(session: Any) -> bool:
    return bool(session.new or session.dirty or session.deleted)


class BatchProcessor:
    """Turns polled records into decisions, for one service. Pure of Kafka client state: the
    subscriber feeds it records and acks once `process` has returned.

    Fast path: the whole batch in one transaction, one query for the idempotency keys, one
    prefetch of the rows the handlers read (shared.runtime.aggregates), no savepoints, and the handlers'
    changes flushed once at the end. If a handler fails or rejects an event after changing
    state, or the database refuses a write, the transaction is rolled back and the batch
    replayed in safe mode: a savepoint per record, so the failing record alone is rolled back
    (and dead-lettered) and the rest are decided as before.
    """

    def __init__(
        self,
        service: str,
        sessions: Callable[[], AsyncSession],
        registry: PartyRegistry | None = None,
        partner_handlers: dict[str, PartnerHandler] | None = None,
        internal_handler: InternalHandler | None = None,
        internal_topics: Sequence[str] = (),
        after_batch: BatchHook | None = None,
        prefetch: Prefetch | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        before_batch: BatchHook | None = None,
    ) -> None:
        self.service = service
        # Signs every decision this service publishes (shared.runtime.service loads and checks it).
        self._signing_key = signing_key
        self._internal_topics = frozenset(internal_topics)
        self._sessions = sessions
        self._registry = registry
        self._partner_handlers = partner_handlers or {}
        self._internal_handler = internal_handler
        self._after_batch = after_batch
        # Runs in the batch's transaction before its first record, outside every record's
        # savepoint: what it takes (the ledger's writer lock) a record's rollback cannot release.
        self._before_batch = before_batch
        self._prefetch = prefetch
        # Decisions of the batch's last run by status, for its one INFO line (per event: DEBUG).
        self._tally: dict[str, int] = {}

    def _summarise(self, items: list[_Item], started: float, mode: str) -> None:
        log.info(
            "batch of %d records decided (%s) in %.1f ms: %s",
            len(items),
            mode,
            (time.perf_counter() - started) * 1000,
            ", ".join(f"{n} {status}" for status, n in sorted(self._tally.items())) or "no decisions",
            extra={
                "service": self.service,
                "records": len(items),
                "decisions": dict(self._tally),
                # So an operator can still find an event's batch at INFO (its own line is DEBUG).
                "event_ids": [i.event.id for i in items if i.event is not None],
            },
        )

    async def process(self, records: Sequence[ConsumerRecord]) -> None:
        """Decide a polled batch. Raises only for an outage (retry it) or RetryBatch (a record
        failed and has tries left); the subscriber then nacks, and the batch comes again."""
        started = time.perf_counter()
        items = [self._read(record) for record in records]
        # Counted per topic per batch: a labelled counter costs a lookup and a lock per inc().
        for topic, n in Counter(record.topic for record in records).items():
            EVENTS_CONSUMED.labels(self.service, topic).inc(n)
        try:
            await self._run(items, safe=False)
            self._summarise(items, started, "one transaction")
            return
        except NeedsSafeMode as why:
            log.warning("batch of %d replayed record by record: %s", len(items), why)
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            # A batch-level write or hook refused (e.g. the ledger's bulk append): the same replay.
            log.warning("batch of %d failed (%s); replayed record by record", len(items), _describe(exc))
        try:
            await self._run(items, safe=True)
            self._summarise(items, started, "record by record")
            return
        except _RecordFailed as failed:
            await self._retry_later(failed.item, failed.error)
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            # Not any one record's handler: a batch-level write or hook. One transaction per
            # record finds the record it comes from.
            log.warning("batch of %d failed (%s: %s); one record per transaction", len(items), type(exc).__name__, exc)
        for item in items:
            try:
                await self._run([item], safe=True)
            except _RecordFailed as failed:
                await self._retry_later(failed.item, failed.error)
            except Exception as exc:
                if _is_infrastructure(exc):
                    raise
                tries = await self._count_failure(item, exc)
                if tries < MAX_TRIES:
                    raise RetryBatch(f"{item.position} failed ({tries} of {MAX_TRIES} tries)") from exc
                await self._run([item], safe=True, give_up=(exc, tries))

    async def _retry_later(self, item: _Item, error: BaseException) -> None:
        tries = await self._count_failure(item, error)
        raise RetryBatch(f"{item.position} failed ({tries} of {MAX_TRIES} tries)") from error

    async def _count_failure(self, item: _Item, error: BaseException) -> int:
        """Count one failed try of a record, in its own transaction (the batch's was rolled back)."""
        extra = {"event_id": item.key[1], "source": item.key[0]}
        log.error("handler failed on %s", item.position, exc_info=error, extra=extra)
        async with self._sessions() as session, session.begin():
            row = await session.get(DeliveryFailure, item.position)
            if row is None:
                row = DeliveryFailure(position=item.position, attempts=0)
            row.attempts += 1
            row.error = _describe(error)
            row.updated_at = utcnow()
            session.add(row)
            return row.attempts

    def _read(self, record: ConsumerRecord) -> _Item:
        try:
            return self._read_event(record)
        except Exception as exc:  # a fault of ours in reading must not stop the partition either
            log.exception("reading %s/%s@%s failed", record.topic, record.partition, record.offset)
            return _Item(record, _kafka_key(record), unreadable=f"unreadable: {_describe(exc)}")

    def _read_event(self, record: ConsumerRecord) -> _Item:
        internal = record.topic in self._internal_topics
        try:
            got = read_record(record.value, record.headers, record.key, limits=not internal)
        except UnreadableRecord as exc:
            return _Item(record, _kafka_key(record), unreadable=str(exc))
        ev = got.event
        if internal:
            if got.problem is not None:
                return _Item(record, _kafka_key(record), unreadable=got.problem)
            # A decision counts only if the service owning the topic signed it: anyone else who
            # can write the topic gets a dead letter, never an entry, a fact or a follow-up.
            forged = forgery(ev, record.topic, self._registry)
            if forged is not None:
                label, why = forged
                FORGED_DECISIONS.labels(self.service, record.topic, label).inc()
                owner = DECISION_TOPIC_OWNERS.get(record.topic, "its owner")
                # Keyed by position: a forgery never claims (or shadows) a genuine decision's id.
                return _Item(
                    record, _kafka_key(record), unreadable=f"decision on {record.topic} not signed by {owner}: {why}"
                )
            return _Item(record, _key(ev.source, ev.id), event=ev, received=got)
        party = self._registry.by_source(ev.source) if self._registry else None
        # An event beyond the limits is not signature-checked: RFC 8785 cannot even serialise it.
        authentic = got.problem is None and party is not None and ev.verify(party.public_key)
        # The key places the record (partition, so replica) but is not signed: a misplaced copy
        # of a genuine event is refused (KEY_MISMATCH) and, like an unauthenticated record, keyed
        # for idempotency by a digest of its bytes, so it never shadows the real event.
        misplaced = _misplaced(record, ev)
        key = _key(ev.source, ev.id if authentic and misplaced is None else f"{ev.id}#{_digest(record)}")
        return _Item(record, key, event=ev, received=got, party=party, authentic=authentic, misplaced=misplaced)

    async def _run(self, items: list[_Item], safe: bool, give_up: tuple[BaseException, int] | None = None) -> None:
        self._tally = {}
        async with self._sessions() as session, session.begin():
            pending = Pending.attach(session)
            # The rows the batch reads stay as read until it commits (another replica waits).
            lock_rows_read(session)
            seen = await _already_processed(session, [i.key for i in items])
            # Failed tries so far, read only when something already went wrong (safe mode).
            failures = await _failures(session, [i.position for i in items]) if safe else {}
            fresh = []
            for item in items:
                if item.key in seen:
                    DUPLICATES.labels(self.service).inc()
                    continue
                seen.add(item.key)
                fresh.append(item)
            if self._before_batch and fresh:
                await self._before_batch(session)
            if not safe:
                await self._prepare(session, fresh)
            watch = _Watch(session)
            tracer = current_tracer()  # None while tracing is silent: no span at all
            for item in fresh:
                internal = item.record.topic in self._internal_topics
                # What the record's handling enqueues carries this span's context (tracing.outgoing).
                with record_span(tracer, self.service, item.record, item.event, internal):
                    if give_up is not None:
                        self._give_up(session, item, *give_up)
                    else:
                        await self._one(session, item, watch, safe, failures.get(item.position, 0))
            if failures:
                # Decided (or given up) at last: the count has done its job.
                await session.execute(delete(DeliveryFailure).where(col(DeliveryFailure.position).in_(list(failures))))
            if not safe:
                # The fast path defers the handlers' writes to here: a row the database refuses
                # sends the batch to safe mode, where each record's savepoint flushes its own.
                await _flush_or_safe_mode(session)
            await pending.write(session)
            if self._after_batch:
                await self._after_batch(session)

    async def _prepare(self, session: AsyncSession, items: list[_Item]) -> None:
        """Fast path only: the batch's aggregate cache, filled by the service's prefetch."""
        AggregateCache.attach(session)
        if self._prefetch is None:
            return
        try:
            await self._prefetch(session, [i.event for i in items if i.event is not None])
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            raise NeedsSafeMode(f"prefetch failed: {type(exc).__name__}: {exc}") from exc

    async def _one(self, session: AsyncSession, item: _Item, watch: _Watch, safe: bool, failed: int = 0) -> None:
        if item.unreadable is not None:
            self._dead_letter(session, item.record, item.unreadable)
            return
        assert item.event is not None
        pending = pending_of(session)
        mark = pending.mark()
        try:
            if safe:
                async with session.begin_nested():
                    await self._decide(session, item, watch, safe)
            else:
                await self._decide(session, item, watch, safe)
        except NeedsSafeMode:
            raise
        except Exception as exc:
            if _is_infrastructure(exc):
                raise
            if not safe:
                raise NeedsSafeMode(_describe(exc)) from exc
            pending.reset(mark)
            if failed + 1 < MAX_TRIES:
                raise _RecordFailed(item, exc) from exc
            log.error("handler failed on %s; giving up", item.position, exc_info=exc)
            self._give_up(session, item, exc, failed + 1)

    def _give_up(self, session: AsyncSession, item: _Item, error: BaseException, tries: int) -> None:
        """A record whose handler keeps failing: its bytes and the exception to the DLQ; a partner
        event also gets its one decision (rejected, INTERNAL_ERROR) and outcome."""
        self._dead_letter(session, item.record, f"handler failed {tries} times: {_describe(error)}")
        if item.event is not None and item.record.topic not in self._internal_topics:
            verdict = Rejected(
                reason_code=ReasonCode.INTERNAL_ERROR,
                message=f"the {self.service} service failed to decide this event ({type(error).__name__}); "
                "it is dead-lettered for the operators: send it again with a new ce_id once they say so",
            )
            self._record(session, item, verdict, None, summarise=True)
        elif item.key != _kafka_key(item.record):
            # A decision given up: its own key marked too, so a redelivery (an offset commit lost
            # to a rebalance) is a duplicate, not a second give-up re-marking the position.
            _mark(session, item.key, None)

    async def _decide(self, session: AsyncSession, item: _Item, watch: _Watch, safe: bool) -> None:
        # Routed by topic, never by the claimed source: only services write decision topics.
        if item.record.topic in self._internal_topics:
            await self._internal(session, item)
        else:
            await self._partner(session, item, watch, safe)

    async def _call(
        self, session: AsyncSession, watch: _Watch, safe: bool, handler: PartnerHandler, inbound: Inbound
    ) -> Verdict:
        """Run a domain handler; a rejection leaves no change behind."""
        if not safe:
            with watch:
                verdict = await handler(session, inbound)
            # Earlier records' changes are still pending here (writes are deferred to the end of
            # the batch), so a rejection after any change in the batch replays it in safe mode.
            if isinstance(verdict, Rejected) and (watch.changed or _domain_changes(session)):
                raise NeedsSafeMode(f"{inbound.spec.type} was rejected after changing state")
            return verdict
        try:
            async with session.begin_nested():
                verdict = await handler(session, inbound)
                if isinstance(verdict, Rejected):
                    raise _Rollback(verdict)
        except _Rollback as rb:
            return rb.verdict
        return verdict

    # --- partner events -------------------------------------------------------------------

    async def _partner(self, session: AsyncSession, item: _Item, watch: _Watch, safe: bool) -> None:
        record, event, party = item.record, item.event, item.party
        assert event is not None
        verdict, inbound = self._admit(record, event, party, item.authentic, item.received, item.misplaced)
        if inbound is not None:
            handler = self._partner_handlers.get(inbound.spec.type)
            if handler is None:
                verdict = Rejected(
                    reason_code=ReasonCode.WRONG_TOPIC,
                    message=f"{event.type} is not handled by the {self.service} service",
                )
            else:
                verdict = await self._call(session, watch, safe, handler, inbound)
        assert verdict is not None
        self._record(session, item, verdict, inbound)

    def _record(
        self, session: AsyncSession, item: _Item, verdict: Verdict, inbound: Inbound | None, summarise: bool = False
    ) -> None:
        """The event's one decision (to the ledger) and one outcome (to the partner), and its mark."""
        event, party = item.event, item.party
        assert event is not None
        spec = EVENTS.get(event.type)
        aggregate = inbound.aggregate_id if inbound else _guess(event, spec)
        decision = Decision(
            decision_id=decision_id(self.service, *item.key),
            service=self.service,
            decided_at=utcnow(),
            status=verdict.status,
            reason_code=getattr(verdict, "reason_code", None),
            message=fit(verdict.message, 2000),
            event_type=fit(event.type, MAX_SUBJECT_CHARS),
            aggregate_id=fit(aggregate, MAX_SUBJECT_CHARS) if aggregate is not None else None,
            batch_id=_batch_of(event),
            party_id=party.id if party else None,
            event=_event_record(item, summarise),
            facts=verdict.facts,
            anomalies=verdict.anomalies,
        )
        trace = outgoing(event.trace)
        annotate(decision)
        publish_decision(session, decision, trace=trace, key=self._signing_key)
        outcome = Outcome(
            event_id=event.id,
            event_source=event.source,
            event_type=decision.event_type,
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
        _mark(session, item.key, decision.decision_id)
        self._tally[decision.status] = self._tally.get(decision.status, 0) + 1
        if not log.isEnabledFor(logging.DEBUG):
            return  # one INFO line per batch instead (_summarise); building this one costs too
        log.debug(
            "decided %s %s",
            decision.event_type,
            decision.status,
            extra={
                "event_id": event.id,
                "party": decision.party_id,
                "batch_id": decision.batch_id,
                "reason": decision.reason_code,
                "traceparent": trace.get("traceparent"),
            },
        )

    def _admit(
        self,
        record: ConsumerRecord,
        event: CloudEvent,
        party: RegisteredParty | None,
        authentic: bool,
        received: Received | None = None,
        misplaced: str | None = None,
    ) -> tuple[Verdict | None, Inbound | None]:
        """The checks every partner event passes before any domain rule (docs/partner-contract.md)."""
        if received is not None and received.problem is not None:
            # First: beyond the limits, nothing else about the event can be trusted or even signed.
            return Rejected(reason_code=ReasonCode.SCHEMA_INVALID, message=received.problem), None
        if party is None:
            return Rejected(
                reason_code=ReasonCode.UNKNOWN_PARTY, message=f"no registered party {fit(event.source, 200)!r}"
            ), None
        if not authentic:
            why = "missing ce_signature" if not event.signature else "signature does not verify with the party's key"
            return Rejected(reason_code=ReasonCode.SIGNATURE_INVALID, message=why), None
        spec = EVENTS.get(event.type)
        if spec is None:
            return Rejected(
                reason_code=ReasonCode.UNKNOWN_TYPE, message=f"unknown event type {fit(event.type, 200)!r}"
            ), None
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
        if misplaced is not None:
            # Another partition than the aggregate's: two replicas could decide its events at once.
            return Rejected(reason_code=ReasonCode.KEY_MISMATCH, message=misplaced), None
        return None, Inbound(event=event, party=party, spec=spec, data=data)

    # --- decisions of other services ------------------------------------------------------

    async def _internal(self, session: AsyncSession, item: _Item) -> None:
        event = item.event
        assert event is not None
        if self._internal_handler is None:
            raise RuntimeError(f"{self.service} reads {event.type} from a decision topic but has no internal handler")
        try:
            decision = Decision.model_validate(event.data)
        except ValidationError as exc:
            # Not a decision at all: no retry will make it one.
            self._dead_letter(session, item.record, f"not a decision: {_short_errors(exc)}")
            return
        emitter = Emitter(self.service, session, event, outgoing(event.trace), key=self._signing_key)
        await self._internal_handler(session, event, decision, emitter)
        _mark(session, item.key, None)

    # --- records that are not events ------------------------------------------------------

    def _dead_letter(self, session: AsyncSession, record: ConsumerRecord, reason: str) -> None:
        where, offset = _kafka_key(record)
        DEAD_LETTERS.labels(self.service, record.topic).inc()
        letter = dead_letter(record, reason, self.service)
        enqueue(
            session,
            DLQ_TOPIC,
            CloudEvent(
                id=decision_id(self.service, where, offset),
                source=service_source(self.service),
                type=DLQ_TYPE,
                subject=where.removeprefix("kafka:"),
                time=now_rfc3339(),
                data=letter.model_dump(mode="json"),
            ),
        )
        # Keyed by position: the same bad record redelivered is not dead-lettered twice.
        _mark(session, (where, offset), None)
        log.warning("dead-lettered %s@%s: %s", where, offset, letter.reason)


async def _flush_or_safe_mode(session: AsyncSession) -> None:
    try:
        await session.flush()
        # The handlers' deferred upserts (shared.runtime.aggregates.upsert): one statement per table.
        await write_deferred(session)
    except Exception as exc:
        if _is_infrastructure(exc):
            raise
        raise NeedsSafeMode(f"writing the batch failed: {type(exc).__name__}: {exc}") from exc


def dead_letter(record: ConsumerRecord, reason: str, service: str) -> DeadLetter:
    """The DLQ letter of a record: always small enough for one Kafka record (heads of long
    bytes, with the value's SHA-256 and length), and always serialisable (header names that are
    not UTF-8 shown as \\xNN)."""
    value = record.value
    headers = list(record.headers)
    truncated = (value is not None and len(value) > LETTER_VALUE_BYTES) or len(headers) > LETTER_HEADERS
    truncated = truncated or (record.key is not None and len(record.key) > LETTER_KEY_BYTES)
    truncated = truncated or any(len(v or b"") > LETTER_HEADER_BYTES for _, v in headers[:LETTER_HEADERS])
    return DeadLetter(
        reason=fit(reason, 4000),
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key_b64=_b64(record.key[:LETTER_KEY_BYTES]) if record.key is not None else None,
        value_b64=_b64(value[:LETTER_VALUE_BYTES]) if value is not None else None,
        value_length=len(value) if value is not None else None,
        value_sha256=hashlib.sha256(value).hexdigest() if value is not None else None,
        headers=[
            (fit(printable(k if isinstance(k, str) else str(k)), 200), _b64((v or b"")[:LETTER_HEADER_BYTES]))
            for k, v in headers[:LETTER_HEADERS]
        ],
        header_count=len(headers),
        truncated=truncated,
        service=service,
        failed_at=utcnow(),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _describe(error: BaseException) -> str:
    return fit(f"{type(error).__name__}: {error}", 2000)


def _key(source: str, event_id: str) -> tuple[str, str]:
    return fit(source, _KEY_CHARS), fit(event_id, _KEY_CHARS)


def _event_record(item: _Item, summarise: bool) -> dict[str, Any]:
    """The event as its decision records it: the signed structured form, so an auditor can check
    the partner's signature; a summary (attributes, SHA-256 of the value) when the data cannot or
    should not be embedded (beyond the limits, too large, or the reason a handler failed)."""
    event, received = item.event, item.received
    assert event is not None
    if received is not None and (summarise or received.problem is not None or _too_large(event, received)):
        return received.summary()
    return {**event.structured(), **({"signature": event.signature} if event.signature else {})}


def _too_large(event: CloudEvent, received: Received) -> bool:
    # Re-serialised, JSON may grow (escapes) up to 6x: measured only when that could matter.
    if received.value_length * 6 <= _EMBED_LIMIT:
        return False
    return len(json.dumps(event.data, ensure_ascii=False).encode()) > _EMBED_LIMIT


async def _failures(session: AsyncSession, positions: list[str]) -> dict[str, int]:
    rows = await session.execute(
        select(DeliveryFailure.position, DeliveryFailure.attempts).where(col(DeliveryFailure.position).in_(positions))
    )
    return {position: attempts for position, attempts in rows}


def _kafka_key(record: ConsumerRecord) -> tuple[str, str]:
    return f"kafka:{record.topic}/{record.partition}", str(record.offset)


_SEEN_SQL = (
    f"SELECT source, event_id FROM {ProcessedMessage.__tablename__} "
    "WHERE (source, event_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
)


async def _already_processed(session: AsyncSession, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """One query for the whole batch (in chunks): which of these were decided before."""
    found: set[tuple[str, str]] = set()
    unique = sorted(set(keys))
    cursor = await driver_cursor(session)
    if cursor is not None:
        # PostgreSQL: two array parameters, so one statement text whatever the batch's size (an
        # IN list of 500 pairs is a new statement to compile and parse every batch).
        async with cursor:
            await cursor.execute(_SEEN_SQL, ([s for s, _ in unique], [e for _, e in unique]))
            found.update((source, event_id) for source, event_id in await cursor.fetchall())
        return found
    for start in range(0, len(unique), 500):
        chunk = unique[start : start + 500]
        rows = await session.execute(
            select(ProcessedMessage.source, ProcessedMessage.event_id).where(
                tuple_(col(ProcessedMessage.source), col(ProcessedMessage.event_id)).in_(chunk)
            )
        )
        found.update((source, event_id) for source, event_id in rows)
    return found


def _mark(session: AsyncSession, key: tuple[str, str], decision: str | None) -> None:
    pending_of(session).processed.append(
        {"source": key[0], "event_id": key[1], "decision_id": decision, "processed_at": utcnow()}
    )


def _digest(record: ConsumerRecord) -> str:
    h = hashlib.sha256(record.value or b"")
    for k, v in record.headers:
        h.update(str(k).encode("utf-8", "surrogatepass") + b"\0" + (v or b"") + b"\0")
    return h.hexdigest()[:16]


def _misplaced(record: ConsumerRecord, event: CloudEvent) -> str | None:
    """Why the record key is not the aggregate id named in the event's data (the contract's key,
    docs/partner-contract.md §2), or None; None too when the type or the id is unknown or not a
    string (UNKNOWN_TYPE or SCHEMA_INVALID decide those)."""
    spec = EVENTS.get(event.type)
    aggregate = event.data.get(spec.aggregate_field) if spec else None
    if spec is None or not isinstance(aggregate, str) or record.key == aggregate.encode():
        return None
    key = "missing" if record.key is None else repr(fit(printable(record.key.decode("utf-8", "replace")), 200))
    return f"the record key ({key}) is not the {spec.aggregate_field} {fit(aggregate, 200)!r}"


def _guess(event: CloudEvent, spec: EventSpec | None) -> str | None:
    if spec and isinstance(event.data.get(spec.aggregate_field), str):
        return event.data[spec.aggregate_field]
    return event.subject


def _batch_of(event: CloudEvent) -> str | None:
    value = event.data.get("batch_id") or event.data.get("earmark_batch_id")
    return fit(value, MAX_SUBJECT_CHARS) if isinstance(value, str) else None


def _short_errors(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'data'}: {e['msg']}" for e in exc.errors()[:5]]
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


async def retry_pause(started: float, minimum: float = 1.0) -> None:
    """Back off before a nacked batch is redelivered, so an outage is not a hot loop."""
    await asyncio.sleep(max(0.0, minimum - (time.monotonic() - started)))
