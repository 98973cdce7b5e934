"""A frozen lock holder does not keep its lock (real PostgreSQL).

The outbox relay's lock (one publisher per service) and the ledger's leader lock (one appender)
are session advisory locks. A killed holder frees them at once; a frozen one (SIGSTOP, a hung
event loop) kept them for ever, so its service's outbound records, or every append, waited for
it. PostgreSQL now ends a lock session that stays silent (shared.runtime.db.end_session_when_silent),
and a standby takes the lock.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text

from shared.runtime import db
from shared.runtime.db import make_engine, session_factory
from shared.runtime.outbox import OutboxRelay

SILENT_SECONDS = 1.0


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    name = f"locks_{uuid.uuid4().hex[:8]}"
    admin = postgres_url.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_url.rsplit("/", 1)[0] + "/" + name


def _try_lock(url: str, key: int) -> bool:
    """A standby's attempt, from a connection of its own (another process would do the same)."""
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        return bool(got and got[0])


async def test_a_frozen_relay_leader_loses_its_lock_to_a_standby(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "LOCK_SESSION_IDLE_SECONDS", SILENT_SECONDS)
    engine = make_engine(database)
    relay = OutboxRelay("pledges", engine, session_factory(engine), "127.0.0.1:9")
    try:
        async with engine.connect() as conn:
            await relay._acquire(conn)  # the relay's own way of taking its lock
            assert not _try_lock(database, relay._lock_id), "the leader holds the lock"
            time.sleep(SILENT_SECONDS * 3)  # noqa: ASYNC251 - frozen on purpose: the whole loop stops
            assert _try_lock(database, relay._lock_id), "a standby takes the lock of a frozen leader"
            # The leader, woken up, finds its session gone: it fails its round and contends again.
            with pytest.raises(Exception, match=r"(?i)terminat|closed|idle"):
                async with conn.begin():
                    await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


async def test_a_live_holder_keeps_its_lock(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder that touches its connection within the limit keeps the lock however long it leads."""
    monkeypatch.setattr(db, "LOCK_SESSION_IDLE_SECONDS", SILENT_SECONDS)
    engine = make_engine(database)
    relay = OutboxRelay("quotes", engine, session_factory(engine), "127.0.0.1:9")
    try:
        async with engine.connect() as conn:
            await relay._acquire(conn)
            for _ in range(6):
                await asyncio.sleep(SILENT_SECONDS / 3)
                async with conn.begin():
                    await conn.execute(text("SELECT 1"))  # the relay's sweep, every poll
            assert not _try_lock(database, relay._lock_id)
    finally:
        await engine.dispose()
