"""Transactional outbox, published exactly once with Kafka transactions.

A service writes its outgoing records into its `outbox` table in the same database transaction as
its state change (`enqueue`); the relay publishes them:

- One relay leads per service database: it holds a PostgreSQL session advisory lock while it
  leads (SQLite: one process). Its transactional producer (transactional.id
  `<prefix>-<service>-outbox`) fences every older producer of that id, so a zombie relay, cut off
  from the database but still running, can publish nothing more.
- A round publishes up to RELAY_BATCH rows in ONE Kafka transaction, and commits in that same
  transaction the relay's progress: the ids of those rows and a digest of their contents, as the
  offset metadata of the group `<prefix>-<service>-outbox`. Then it deletes the rows.
- A crash between Kafka's commit and the DELETE leaves published rows in the table. A new leader,
  after fencing the old producer, reads the committed progress and deletes those rows unsent.
  A crash before the commit aborts the transaction: its records are never seen by readers.

So every row reaches a consumer reading with isolation.level=read_committed exactly once.

Published from memory: while the relay leads, the rows a batch writes are claimed by it before
the batch commits and handed to it right after (`Pending.write`): it publishes them as above
(same transaction, same progress, then the DELETE) without reading them back. The table stays
the crash backup: rows the relay did not claim (it was not leading yet, another replica wrote
them) or lost (a failure drops every claim) are swept from the table as before. A relay claims
nothing until a sweep has found the table empty, so rows left by a crash go out before newer ones.

The outbox heals itself: a row that can never be sent (larger than MAX_RECORD_BYTES, refused by
the broker as invalid, malformed) is moved to `outbox_parked` with its reason, counted in
gputrace_outbox_parked_total and listed by `gputrace ops parked`; the rows behind it go on.
Outages (broker, database) are retried without end and never park a row.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedForMessageFormatError,
)
from aiokafka.structs import OffsetAndMetadata
from sqlalchemy import BigInteger, Row, all_, any_, bindparam, delete, insert, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract import MAX_RECORD_BYTES
from shared.contract.cloudevents import CloudEvent
from shared.runtime.aggregates import insert_many
from shared.runtime.db import (
    OutboxMessage,
    ParkedOutboxMessage,
    ProcessedMessage,
    end_session_when_silent,
    is_postgres,
    utcnow,
)
from shared.runtime.observability import OUTBOX_BACKLOG, OUTBOX_PARKED, OUTBOX_PUBLISHED
from shared.runtime.topics import RELAY_PROGRESS_TOPIC
from shared.runtime.tracing import PublishSpans

log = logging.getLogger(__name__)

RELAY_BATCH = 1000
# A round's values at most, so that its transaction ends well within TRANSACTION_TIMEOUT_MS.
RELAY_BYTES = 16 * 1024 * 1024
# A transaction left open by a relay killed mid-round holds back read_committed readers of its
# partitions until the service restarts (its new producer aborts it) or until this timeout.
TRANSACTION_TIMEOUT_MS = 20_000
# The progress is offset metadata, which the broker caps (offset.metadata.max.bytes, 4096).
PROGRESS_CHARS = 3500
PROGRESS_PARTITION = TopicPartition(RELAY_PROGRESS_TOPIC, 0)

# The broker's refusals of a record itself, not of its health: the same record would be refused
# again, so it is parked. Every other error (connection, timeout, leader moved, ...) is an outage.
RECORD_REFUSED: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    UnsupportedForMessageFormatError,
)

OUTBOX = OutboxMessage.__table__  # type: ignore[attr-defined]
PROCESSED = ProcessedMessage.__table__  # type: ignore[attr-defined]
PARKED = ParkedOutboxMessage.__table__  # type: ignore[attr-defined]


_PENDING = "gputrace.pending"


@dataclass(frozen=True)
class OutRow:
    """An outbox row as its transaction wrote it: what the relay publishes from memory."""

    id: int
    topic: str
    key: bytes | None
    value: bytes
    headers: str
    created_at: datetime
    header_list: list[tuple[str, bytes]]


# The relay of each engine, so that a transaction's rows can be handed to it (Pending.write).
_RELAYS: weakref.WeakKeyDictionary[AsyncEngine, OutboxRelay] = weakref.WeakKeyDictionary()


class Pending:
    """The outbox and processed-message rows of one transaction, written in one bulk INSERT
    each just before it commits, instead of a round trip per record."""

    def __init__(self) -> None:
        self.outbox: list[dict[str, Any]] = []
        # The outbox rows' headers as Kafka takes them, so the relay need not decode them again.
        self.header_lists: list[list[tuple[str, bytes]]] = []
        self.processed: list[dict[str, Any]] = []

    @classmethod
    def attach(cls, session: AsyncSession) -> Pending:
        pending = session.info[_PENDING] = cls()
        return pending

    def mark(self) -> tuple[int, int]:
        return len(self.outbox), len(self.processed)

    def reset(self, mark: tuple[int, int]) -> None:
        """Forget what a record rolled back to its savepoint had added."""
        del self.outbox[mark[0] :]
        del self.header_lists[mark[0] :]
        del self.processed[mark[1] :]

    async def write(self, session: AsyncSession) -> None:
        # In list order, so outbox ids (and the relay's publishing order) follow decision order.
        if self.outbox:
            relay = _RELAYS.get(session.bind) if isinstance(session.bind, AsyncEngine) else None
            if relay is not None and relay.accepting:
                ids = await insert_many(session, OUTBOX, self.outbox, returning="id")
                rows = [
                    OutRow(i, r["topic"], r["key"], r["value"], r["headers"], r["created_at"], h)
                    for i, r, h in zip(ids, self.outbox, self.header_lists, strict=True)
                ]
                relay.claim(session, rows)
            else:
                await insert_many(session, OUTBOX, self.outbox)
                if relay is not None:
                    relay.claim(session, [])
        if self.processed:
            await insert_many(session, PROCESSED, self.processed)
        self.outbox, self.header_lists, self.processed = [], [], []


def pending_of(session: AsyncSession) -> Pending:
    pending = session.info.get(_PENDING)
    if pending is None:
        raise RuntimeError("no pending rows on this session: use the BatchProcessor's transaction")
    return pending


def enqueue(session: AsyncSession, topic: str, event: CloudEvent) -> None:
    key, value, headers = event.as_record()
    pending = pending_of(session)
    pending.header_lists.append(headers)
    pending.outbox.append(
        {
            "topic": topic,
            "key": key,
            "value": value,
            "headers": json.dumps([[k, v.decode()] for k, v in headers]),
            "created_at": utcnow(),
        }
    )


@dataclass(frozen=True)
class Progress:
    """What the relay's last committed transaction published: outbox ids and a digest of the rows.

    The digest tells those rows from later ones that reuse their ids (SQLite reuses the highest id
    once its row is gone), so only rows that really were published are ever deleted unsent."""

    ids: tuple[int, ...]
    digest: str

    @classmethod
    def of(cls, rows: Sequence[Row[Any]]) -> Progress:
        return cls(tuple(r.id for r in rows), _digest(rows))

    def encode(self) -> str:
        return f"v1:{self.digest}:{_ranges(self.ids)}"

    @classmethod
    def decode(cls, text: str | None) -> Progress | None:
        if not text or not text.startswith("v1:"):
            return None
        _, digest, ranges = text.split(":", 2)
        ids: list[int] = []
        for part in filter(None, ranges.split(",")):
            first, _, last = part.partition("-")
            ids.extend(range(int(first), int(last or first) + 1))
        return cls(tuple(ids), digest)


def _ranges(ids: Sequence[int]) -> str:
    """1,2,3,5,7,8 -> "1-3,5,7-8": a round's ids are mostly consecutive."""
    parts: list[str] = []
    start = prev = None
    for i in ids:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def _digest(rows: Sequence[Row[Any]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        for part in (str(r.id).encode(), r.topic.encode(), r.key or b"", r.value, r.headers.encode()):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return h.hexdigest()[:32]


def _fit(rows: Sequence[Row[Any]]) -> list[Row[Any]]:
    """The longest head of `rows` whose progress fits in offset metadata and whose values fit in
    RELAY_BYTES (always at least one row). The progress's length is kept as it grows: ids extend
    the last range or open a new one."""
    fitted: list[Row[Any]] = []
    size = chars = last = 0
    start = prev = None
    for row in rows:
        size += len(row.value)
        extends = prev is not None and row.id == prev + 1
        grown = len(f"{start}-{row.id},") if extends else len(f"{row.id},")
        total = chars - last + grown if extends else chars + grown
        if fitted and (size > RELAY_BYTES or total > PROGRESS_CHARS):
            break
        fitted.append(row)
        chars, last = total, grown
        if not extends:
            start = row.id
        prev = row.id
    return fitted


def _among(engine: AsyncEngine, ids: list[int]) -> Any:
    """`id IN ids`; on PostgreSQL `id = ANY(array)`: one parameter, so one statement text that
    SQLAlchemy and psycopg cache, where an IN list of a round's thousand ids is a new statement
    (compiled and parsed afresh) every time."""
    if is_postgres(engine):
        return OUTBOX.c.id == any_(bindparam("ids", ids, type_=ARRAY(BigInteger)))
    return OUTBOX.c.id.in_(ids)


def _not_among(engine: AsyncEngine, ids: list[int]) -> Any:
    if is_postgres(engine):
        return OUTBOX.c.id != all_(bindparam("claimed", ids, type_=ARRAY(BigInteger)))
    return OUTBOX.c.id.not_in(ids)


def _headers_of(row: Any) -> list[tuple[str, bytes]]:
    return row.header_list if isinstance(row, OutRow) else _headers(row.headers)


def _headers(stored: str) -> list[tuple[str, bytes]]:
    """The stored [[name, value], ...] as Kafka headers; ValueError if they are not that."""
    pairs = json.loads(stored)
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in pairs
    ):
        raise ValueError(f"headers are not a list of [name, value] strings: {stored[:200]!r}")
    return [(k, v.encode()) for k, v in pairs]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


class _ProducerSpoiled(Exception):
    """The broker refused a record inside a transaction: aiokafka's producer cannot go on after
    that (its sequence numbers are off), so the leader starts a new one and carries on."""


class OutboxRelay:
    """Publishes the outbox of one service database, exactly once (see the module's docstring)."""

    def __init__(
        self,
        service: str,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        bootstrap_servers: str,
        poll_seconds: float = 0.5,
        *,
        group_prefix: str = "gputrace",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.service = service
        self._engine = engine
        self._sessions = sessions
        self._bootstrap = bootstrap_servers
        # The service's Kafka identity (Settings.kafka_client_options): its principal may use the
        # transactional id and progress group below (tools/kafka_access.py).
        self._client_options = client_options or {}
        self._poll = poll_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One id per service (and per deployment sharing a broker): the fencing unit. It also
        # names the group whose offset metadata carries the progress.
        self.transactional_id = f"{group_prefix}-{service}-outbox"
        # Stable per service so every replica contends for the same lock.
        self._lock_id = int.from_bytes(service.encode()[:8].ljust(8, b"\0"), "big") & 0x7FFF_FFFF_FFFF_FFFF
        # After a refused round, its rows go one per transaction, to find the one the broker refuses.
        self._one_by_one_until = 0
        self.leading = False
        # Told after every round, with its exception if it failed (shared.runtime.health: readiness).
        self.on_round: Callable[[BaseException | None], None] = lambda error: None
        # The memory path (module docstring). Claims are valid for one epoch: a failure ends it,
        # drops every claim and leaves those rows to the sweep.
        self.accepting = False
        self._epoch = 0
        self._claimed: set[int] = set()
        self._ready: list[OutRow] = []
        # Writing transactions not yet ended, and commits whose rows were left to the table: a
        # sweep that found the table empty may start accepting only if neither moved meanwhile.
        self._inflight = 0
        self._unclaimed_commits = 0
        self._next_sweep = 0.0
        self.published_from_memory = 0
        _RELAYS[engine] = self

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-outbox-relay")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def wake(self) -> None:
        self._wake.set()

    def claim(self, session: AsyncSession, rows: list[OutRow]) -> None:
        """Inside a writing transaction, before it commits: these rows (none when the relay is not
        accepting) are published from memory once it commits; if it does not, they never existed."""
        epoch, ids = self._epoch, [r.id for r in rows]
        if rows:
            self._claimed.update(ids)
        self._inflight += 1
        sync = session.sync_session
        root = sync.get_transaction()
        state = {"committed": False, "ended": False}

        def committed(session: Any) -> None:
            # SQLAlchemy calls after_commit for a SAVEPOINT's release too: only the root's commit counts.
            if not session.in_nested_transaction():
                state["committed"] = True

        def ended(_: Any, transaction: Any) -> None:
            if transaction is not root or state["ended"]:
                return
            state["ended"] = True
            self._inflight -= 1
            if not rows:
                self._unclaimed_commits += state["committed"]
            elif epoch != self._epoch:
                pass  # claims dropped meanwhile: the sweep publishes these rows
            elif state["committed"]:
                self._ready.extend(rows)
                self._wake.set()
            else:
                self._claimed.difference_update(ids)

        sa_event.listen(sync, "after_commit", committed)
        sa_event.listen(sync, "after_transaction_end", ended)

    def _stop_accepting(self) -> None:
        """A new producer or a failure: claims are dropped, their rows are swept from the table."""
        self.accepting = False
        self._epoch += 1
        self._claimed.clear()
        self._ready.clear()

    async def _idle(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self._lead()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Kafka or the database is away (or this relay was fenced): the rows stay in the
                # table; lead again after a pause, fencing and reconciling first.
                log.exception("outbox relay failed; retrying")
                self.on_round(exc)
                await asyncio.sleep(1.0)

    async def _lead(self) -> None:
        async with self._engine.connect() as conn:
            try:
                await self._acquire(conn)
                self.leading = True
                while True:
                    self._stop_accepting()
                    producer = self._producer()
                    await producer.start()  # init_transactions: fences and settles older producers
                    try:
                        await self._reconcile(conn)
                        await self._rounds(conn, producer)
                    except _ProducerSpoiled:
                        continue
                    finally:
                        await producer.stop()
            finally:
                self._stop_accepting()
                self.leading = False
                # Closing the connection (not returning it to the pool) releases the session lock.
                await conn.invalidate()

    async def _acquire(self, conn: AsyncConnection) -> None:
        """Wait until this relay holds the service's lock (PostgreSQL; SQLite has one process)."""
        if not is_postgres(self._engine):
            return
        # A frozen leader must not hold the lock (and its service's outbound records) for ever.
        await end_session_when_silent(conn)
        while True:
            async with conn.begin():
                got = await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._lock_id})
            if got:
                return
            self.on_round(None)  # a standby is as ready as the leader
            await self._idle()

    def _producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            transactional_id=self.transactional_id,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            acks="all",
            linger_ms=5,
            max_request_size=MAX_RECORD_BYTES,
            client_id=f"gputrace-{self.service}-outbox",
            **self._client_options,
        )

    async def _rounds(self, conn: AsyncConnection, producer: AIOKafkaProducer) -> None:
        # Rows handed over from memory first; the table is swept on every wake-up until the relay
        # accepts, then every poll interval (rows of other replicas, of crashes).
        self._next_sweep = 0.0
        while True:
            if self._ready:
                await self._memory_round(conn, producer)
                self.on_round(None)
                continue
            if not self.accepting or time.monotonic() >= self._next_sweep:
                handled = await self._round(conn, producer)
                self._next_sweep = time.monotonic() + self._poll
                self.on_round(None)
                if handled >= RELAY_BATCH:
                    continue
            await self._idle()

    async def _memory_round(self, conn: AsyncConnection, producer: AIOKafkaProducer) -> None:
        """Publish rows handed over by committed transactions, then delete them: no read back."""
        rows = _fit(self._ready[:RELAY_BATCH])
        del self._ready[: len(rows)]
        try:
            sent, parked = await self._publish(producer, rows)
        except RECORD_REFUSED as exc:
            # The claims are dropped, so the sweep takes these rows from the table.
            await self._refused(conn, rows, exc)
        await self._settle(conn, sent, parked)
        self._claimed.difference_update(r.id for r in rows)
        self.published_from_memory += len(sent)
        OUTBOX_BACKLOG.labels(self.service).set(len(self._ready))

    async def _reconcile(self, conn: AsyncConnection) -> int:
        """Delete the rows the last committed transaction published, if they are still here (a crash
        came between Kafka's commit and the DELETE). Runs after the producer fenced its elders, so
        that progress is final. Returns how many rows it deleted."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap, client_id=f"gputrace-{self.service}-outbox", **self._client_options
        )
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.transactional_id, partitions=[PROGRESS_PARTITION])
        finally:
            await admin.close()
        committed = offsets.get(PROGRESS_PARTITION)
        progress = Progress.decode(committed.metadata if committed else None)
        if progress is None:
            return 0
        async with conn.begin():
            rows = (await conn.execute(select(OUTBOX).where(OUTBOX.c.id.in_(progress.ids)).order_by(OUTBOX.c.id))).all()
            if not rows:
                return 0
            if len(rows) != len(progress.ids) or _digest(rows) != progress.digest:
                # The DELETE had committed; these are newer rows that reuse the ids.
                return 0
            await conn.execute(delete(OUTBOX).where(OUTBOX.c.id.in_(progress.ids)))
        log.warning(
            "%d outbox row(s) were published before a crash but not deleted: deleted now, not sent again",
            len(rows),
            extra={"service": self.service, "outbox_ids": _ranges(progress.ids)},
        )
        return len(rows)

    async def _round(self, conn: AsyncConnection, producer: AIOKafkaProducer) -> int:
        """Publish the oldest rows in one transaction with the progress, then delete them (and park
        those that can never be sent). Returns how many rows left the outbox."""
        limit = RELAY_BATCH if not self._one_by_one_until else 1
        unclaimed_commits = self._unclaimed_commits
        query = select(OUTBOX).order_by(OUTBOX.c.id).limit(limit)
        if self._claimed:
            # Rows on their way from memory are not the sweep's.
            query = query.where(_not_among(self._engine, list(self._claimed)))
        async with conn.begin():
            rows = (await conn.execute(query)).all()
        if rows and self._claimed:
            # A transaction may have claimed its rows and committed while the query was on its way
            # (built before the claim, run after the commit): those are the memory path's to send,
            # or they would go out twice. A claim always precedes its commit, so checking now is enough.
            rows = [r for r in rows if r.id not in self._claimed]
            if not rows:
                return 0
        if not rows:
            self._one_by_one_until = 0
            OUTBOX_BACKLOG.labels(self.service).set(0)
            if not self.accepting and self._inflight == 0 and unclaimed_commits == self._unclaimed_commits:
                # Nothing left behind, nothing being written: rows from now on come from memory.
                self.accepting = True
            return 0
        if rows[0].id > self._one_by_one_until:
            self._one_by_one_until = 0
        rows = _fit(rows)
        try:
            sent, parked = await self._publish(producer, rows)
        except RECORD_REFUSED as exc:
            await self._refused(conn, rows, exc)
        await self._settle(conn, sent, parked)
        OUTBOX_BACKLOG.labels(self.service).set(0 if len(rows) < RELAY_BATCH else len(rows))
        return len(rows)

    async def _refused(self, conn: AsyncConnection, rows: Sequence[Row[Any]], exc: BaseException) -> NoReturn:
        """The broker refused a record and the transaction was aborted: nothing of it is visible.
        Alone, the row is the culprit (parked); in a group, find it by sending the group's rows one
        per transaction."""
        if len(rows) == 1:
            await self._settle(conn, [], [(rows[0], _reason(exc))])
        else:
            log.warning("the broker refused a record of this round (%s); sending its rows one by one", exc)
            self._one_by_one_until = rows[-1].id
        raise _ProducerSpoiled from exc

    async def _publish(
        self, producer: AIOKafkaProducer, rows: Sequence[Row[Any]]
    ) -> tuple[list[Row[Any]], list[tuple[Row[Any], str]]]:
        sent: list[Row[Any]] = []
        parked: list[tuple[Row[Any], str]] = []
        # Each record goes out with the trace context stored with its row (the span that decided);
        # while tracing records, the transaction has a span of its own, linked to those contexts.
        spans = PublishSpans(self.service)
        async with spans.transaction(), producer.transaction():
            futures = []
            for row in rows:
                try:
                    # send() appends to the producer's buffer in call order; awaiting the futures
                    # after all sends lets one batch fly while keeping the order within a partition.
                    futures.append(
                        await producer.send(
                            row.topic, value=row.value, key=row.key, headers=spans.headers(row.topic, _headers_of(row))
                        )
                    )
                except (MessageSizeTooLargeError, ValueError, TypeError) as exc:
                    # Refused before it left this process (too large, malformed): the transaction
                    # is unharmed, the row is parked.
                    parked.append((row, _reason(exc)))
                    continue
                sent.append(row)
            if sent:
                progress = OffsetAndMetadata(sent[-1].id, Progress.of(sent).encode())
                await producer.send_offsets_to_transaction({PROGRESS_PARTITION: progress}, self.transactional_id)
                # One by one, not asyncio.gather: gather hangs a callback on each of a round's thousand
                # futures (~10% of the pledges service's CPU); most are done by the time they are awaited.
                # The first failure is raised as with gather, inside the transaction, which then aborts.
                for future in futures:
                    await future
        return sent, parked

    async def _settle(self, conn: AsyncConnection, sent: list[Row[Any]], parked: list[tuple[Row[Any], str]]) -> None:
        ids = [r.id for r in sent] + [r.id for r, _ in parked]
        async with conn.begin():
            if parked:
                await conn.execute(
                    insert(PARKED),
                    [
                        {
                            "outbox_id": r.id,
                            "topic": r.topic,
                            "key": r.key,
                            "value": r.value,
                            "headers": r.headers,
                            "created_at": r.created_at,
                            "reason": reason,
                            "parked_at": utcnow(),
                        }
                        for r, reason in parked
                    ],
                )
            # By id list, not a range: a row with a lower id may commit after the select.
            await conn.execute(delete(OUTBOX).where(_among(self._engine, ids)))
        OUTBOX_PUBLISHED.labels(self.service).inc(len(sent))
        for row, reason in parked:
            OUTBOX_PARKED.labels(self.service, reason.split(":", 1)[0]).inc()
            log.error(
                "outbox row %s can never be sent: parked (gputrace ops parked)",
                row.id,
                extra={"service": self.service, "topic": row.topic, "bytes": len(row.value), "reason": reason},
            )


@dataclass(frozen=True)
class ParkedRow:
    id: int
    outbox_id: int
    topic: str
    key: str
    size: int
    reason: str
    created_at: str
    parked_at: str


async def list_parked(engine: AsyncEngine, limit: int = 100) -> list[ParkedRow]:
    """The parked rows of one service database, oldest first (for `gputrace ops parked`)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(PARKED).order_by(PARKED.c.id).limit(limit))).all()
    return [
        ParkedRow(
            id=r.id,
            outbox_id=r.outbox_id,
            topic=r.topic,
            key=(r.key or b"").decode("utf-8", "replace"),
            size=len(r.value),
            reason=r.reason,
            created_at=r.created_at.isoformat(),
            parked_at=r.parked_at.isoformat(),
        )
        for r in rows
    ]
