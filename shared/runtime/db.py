"""One SQLModel engine per service, and the tables of the delivery mechanism every service shares.

PostgreSQL when DATABASE_URL is given; a SQLite file otherwise (the embedded default).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, LargeBinary, Table, Text, event, exc, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession


def utcnow() -> datetime:
    return datetime.now(UTC)


class ProcessedMessage(SQLModel, table=True):
    """Idempotent consumer: one row per event already decided, written with its effects."""

    __tablename__ = "processed_messages"

    source: str = Field(primary_key=True, max_length=300)
    event_id: str = Field(primary_key=True, max_length=300)
    decision_id: str | None = Field(default=None, max_length=64)
    processed_at: datetime = Field(default_factory=utcnow)


class DeliveryFailure(SQLModel, table=True):
    """Failed tries of a record's handler, by Kafka position, committed apart from the (rolled
    back) batch: counted across redeliveries and restarts, so a poison record is given up after a
    bounded number of tries (shared.runtime.consumer.MAX_TRIES) instead of looping."""

    __tablename__ = "delivery_failures"

    position: str = Field(primary_key=True, max_length=300, description="topic/partition@offset")
    attempts: int = 0
    error: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    updated_at: datetime = Field(default_factory=utcnow)


class OutboxMessage(SQLModel, table=True):
    """Transactional outbox: records to publish, written in the same transaction as the state."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    topic: str = Field(max_length=200)
    key: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    headers: str = Field(default="[]", description="JSON list of [name, value] pairs")
    created_at: datetime = Field(default_factory=utcnow)


class ParkedOutboxMessage(SQLModel, table=True):
    """Outbox rows that can never be sent (too large, refused by the broker), moved aside with the
    reason so the rows behind them flow (shared.runtime.outbox); listed by `gputrace ops parked`."""

    __tablename__ = "outbox_parked"

    # Its own key: SQLite may reuse an outbox id once the row is gone.
    id: int | None = Field(default=None, primary_key=True)
    outbox_id: int
    topic: str = Field(max_length=200)
    key: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    headers: str = Field(default="[]", description="JSON list of [name, value] pairs")
    created_at: datetime = Field(default_factory=utcnow)
    reason: str = Field(sa_column=Column(Text, nullable=False))
    parked_at: datetime = Field(default_factory=utcnow)


MECHANISM_TABLES: list[Table] = [  # type: ignore[list-item]
    ProcessedMessage.__table__,
    OutboxMessage.__table__,
    ParkedOutboxMessage.__table__,
    DeliveryFailure.__table__,
]


def make_engine(url: str, pool_size: int = 5, reader: bool = False) -> AsyncEngine:
    """`reader`: an engine that only reads (the ledger's API): on SQLite its transactions do not
    take the write lock up front."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while the consumer writes; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            # Let SQLAlchemy, not the driver, open transactions (else SAVEPOINT misbehaves).
            dbapi_conn.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(conn) -> None:  # type: ignore[no-untyped-def]
            # Take the write lock up front: a deferred transaction that reads then writes fails
            # at once with "database is locked" if another writer committed in between.
            conn.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")

        return engine
    if reader:
        # Reads only: autocommit spares each request its BEGIN and ROLLBACK round trips (PostgreSQL's
        # READ COMMITTED gives each statement its own snapshot either way).
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            # No overflow: at 50 clients the overflow connections were opened and closed per request
            # (a PostgreSQL backend started each time); a request beyond the pool waits for one instead.
            max_overflow=0,
            pool_recycle=300,
            # LIFO: at a low request rate the same few connections serve, and the others sit idle
            # (so they are the ones pinged, below), rather than every connection in turn.
            pool_use_lifo=True,
            isolation_level="AUTOCOMMIT",
        )
        _ping_when_idle(engine)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


# A read connection is pinged (SELECT 1, one round trip) at checkout only if it sat in the pool
# longer than this, or since a dropped connection was seen (`distrust_pooled_connections`): a
# ping before every request cost ~0.23 ms of CPU and a round trip on a ~2 ms proof. A database
# restarted while a connection was idle for less than this costs at most the one request that
# meets it dead; the API retries that request once on a fresh connection (services/ledger/api.py).
READ_PING_IDLE_SECONDS = 2.0
_distrusted_before: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _ping_when_idle(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(sync_engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None:
            return  # just connected
        if time.monotonic() - since < READ_PING_IDLE_SECONDS and since > _distrusted_before.get(sync_engine, 0.0):
            return
        try:
            sync_engine.dialect.do_ping(dbapi_conn)
        except Exception as e:
            # The pool drops every connection older than now and connects afresh (up to 3 tries).
            raise exc.InvalidatePoolError(f"read connection dead at checkout: {e}") from e


def distrust_pooled_connections(engine: AsyncEngine) -> None:
    """A read connection was found dead: ping every pooled connection at its next checkout,
    however recently it was used (a database restart kills them all at once)."""
    _distrusted_before[engine.sync_engine] = time.monotonic()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def create_tables(engine: AsyncEngine, tables: Sequence[Table]) -> None:
    """Create this service's tables (and only those: each service has its own database)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: SQLModel.metadata.create_all(sync, tables=[*MECHANISM_TABLES, *tables]))


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


# A session lock (the outbox relay's, the ledger's leader lock) lives as long as its connection.
# A holder that is killed frees it at once; one that is frozen (SIGSTOP, a stalled VM, a hung
# event loop) would keep it for ever, and its service's outbound records or the ledger's appends
# would wait with it. Its holder touches the connection every poll (a second or less), so
# PostgreSQL ends a lock session silent for this long, and a standby takes the lock. A holder that wakes up finds
# its connection gone and contends again; Kafka's transactional fencing and the ledger's writer
# lock keep such a late holder from doing harm meanwhile.
LOCK_SESSION_IDLE_SECONDS = 30.0


async def end_session_when_silent(conn: AsyncConnection, seconds: float | None = None) -> None:
    """Have PostgreSQL close `conn`'s session (and free its session locks) after `seconds` idle
    (default LOCK_SESSION_IDLE_SECONDS, read at call time)."""
    if conn.dialect.name != "postgresql":
        return  # SQLite: one process, no session locks
    seconds = LOCK_SESSION_IDLE_SECONDS if seconds is None else seconds
    async with conn.begin():
        # SET (not SET LOCAL): it outlives this transaction, for the session's life.
        await conn.execute(text(f"SET idle_session_timeout = {int(seconds * 1000)}"))
