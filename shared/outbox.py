"""Transactional outbox: enqueue in the caller's transaction, publish later with an idempotent producer.

The relay publishes rows in id order and deletes them only after Kafka acknowledged them
(acks=all). A crash between the two publishes a row again; consumers drop the copy by its
ce_source + ce_id, so the effect is exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.cloudevents import CloudEvent
from shared.db import OutboxMessage, ProcessedMessage, is_postgres, utcnow
from shared.observability import OUTBOX_BACKLOG, OUTBOX_PUBLISHED

log = logging.getLogger(__name__)

RELAY_BATCH = 1000


_PENDING = "gputrace.pending"


class Pending:
    """The outbox and processed-message rows of one transaction, written in one bulk INSERT
    each just before it commits, instead of a round trip per record."""

    def __init__(self) -> None:
        self.outbox: list[dict[str, Any]] = []
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
        del self.processed[mark[1] :]

    async def write(self, session: AsyncSession) -> None:
        # In list order, so outbox ids (and the relay's publishing order) follow decision order.
        if self.outbox:
            await session.execute(insert(OutboxMessage), self.outbox)
        if self.processed:
            await session.execute(insert(ProcessedMessage), self.processed)
        self.outbox, self.processed = [], []


def pending_of(session: AsyncSession) -> Pending:
    pending = session.info.get(_PENDING)
    if pending is None:
        raise RuntimeError("no pending rows on this session: use the BatchProcessor's transaction")
    return pending


def enqueue(session: AsyncSession, topic: str, event: CloudEvent) -> None:
    key, value, headers = event.as_record()
    pending_of(session).outbox.append(
        {
            "topic": topic,
            "key": key,
            "value": value,
            "headers": json.dumps([[k, v.decode()] for k, v in headers]),
            "created_at": utcnow(),
        }
    )


class OutboxRelay:
    """Publishes the outbox of one service database. One relay publishes at a time (per service),
    guarded by a PostgreSQL advisory lock, so per-key order survives scaling out."""

    def __init__(
        self,
        service: str,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        bootstrap_servers: str,
        poll_seconds: float = 0.5,
    ) -> None:
        self.service = service
        self._engine = engine
        self._sessions = sessions
        self._bootstrap = bootstrap_servers
        self._poll = poll_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        # Stable per service so every replica contends for the same lock.
        self._lock_id = int.from_bytes(service.encode()[:8].ljust(8, b"\0"), "big") & 0x7FFF_FFFF_FFFF_FFFF
        # Told after every round, with its exception if it failed (shared.health: readiness).
        self.on_round: Callable[[BaseException | None], None] = lambda error: None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            client_id=f"gputrace-{self.service}-outbox",
        )
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-outbox-relay")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._producer:
            await self._producer.stop()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                published = await self.publish_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Kafka or the database is away: keep the rows, try again after a pause.
                log.exception("outbox relay failed; retrying")
                self.on_round(exc)
                await asyncio.sleep(1.0)
                continue
            self.on_round(None)
            if published >= RELAY_BATCH:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
            except TimeoutError:
                pass
            self._wake.clear()

    async def publish_pending(self) -> int:
        assert self._producer is not None
        async with self._sessions() as session, session.begin():
            if is_postgres(self._engine):
                got = await session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": self._lock_id})
                if not got.scalar():
                    return 0
            rows = (
                (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id).limit(RELAY_BATCH)))
                .scalars()
                .all()
            )
            if not rows:
                OUTBOX_BACKLOG.labels(self.service).set(0)
                return 0
            # send() appends to the producer's buffer in call order; awaiting the futures after
            # all sends lets one batch fly while keeping the order within each partition.
            futures = [
                await self._producer.send(
                    row.topic,
                    value=row.value,
                    key=row.key,
                    headers=[(k, v.encode()) for k, v in json.loads(row.headers)],
                )
                for row in rows
            ]
            await asyncio.gather(*futures)
            # By id list, not a range: a row with a lower id may commit after this select.
            await session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_([r.id for r in rows])))
            OUTBOX_PUBLISHED.labels(self.service).inc(len(rows))
            OUTBOX_BACKLOG.labels(self.service).set(0 if len(rows) < RELAY_BATCH else len(rows))
            return len(rows)
