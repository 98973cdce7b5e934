"""One ledger appender active at a time; the other instances stand by, serving reads, and take over
within seconds when it dies.

Leadership is a PostgreSQL session advisory lock held on a connection of its own: the lock lives
exactly as long as that connection, so a leader that is killed (SIGKILL, a lost machine) frees it
as soon as its backend notices the closed socket. The active instance runs the Kafka consumer (it
joins the ledger's consumer group); a standby asks for the lock every `poll_seconds` and starts
its consumer once it holds it. A leader whose lock connection fails (a database restart) stops
consuming and contends again; a frozen one (SIGSTOP) pings no more and PostgreSQL ends its silent
session (shared.runtime.db.end_session_when_silent), so a standby takes over then too.

Leadership keeps the work in one place; it is not what keeps the log right. Should two instances
consume for a moment (a leader that has not yet noticed its lost connection), appends are still
serialised by the writer lock (services.ledger.log.WRITER_LOCK) and each decision is appended once
(its idempotency key, its unique decision_id). SQLite has one process: always active.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.ledger.log import WRITER_LOCK
from shared.runtime.db import end_session_when_silent, is_postgres

log = logging.getLogger(__name__)

# Another key than the writer lock's: the writer lock is per transaction, this one per process.
LEADER_LOCK = WRITER_LOCK + 1
# How often a standby asks for the lock and the leader checks its lock connection: the fail-over
# time is about this plus the consumer group's rebalance (the dead member's session timeout).
POLL_SECONDS = 1.0
# A lock connection that does not answer a trivial query in this time is taken as lost.
CHECK_TIMEOUT_SECONDS = 10.0

Transition = Callable[[], Awaitable[None]]


class Leadership:
    def __init__(self, engine: AsyncEngine, poll_seconds: float = POLL_SECONDS) -> None:
        self._engine = engine
        self._poll = poll_seconds
        self.role = "standby"

    async def run(self, on_active: Transition, on_standby: Transition) -> None:
        """Contend for leadership for ever: `on_active` once the lock is held, `on_standby` when
        it is lost. Cancelled at shutdown (the caller then stops consuming if active)."""
        if not is_postgres(self._engine):
            self.role = "active"
            await on_active()
            return
        while True:
            try:
                async with self._engine.connect() as conn:
                    try:
                        # A frozen leader (SIGSTOP, a hung VM) stops pinging: PostgreSQL ends its
                        # silent session after LOCK_SESSION_IDLE_SECONDS, freeing the lock.
                        await end_session_when_silent(conn)
                        await self._acquire(conn)
                        self.role = "active"
                        log.warning("ledger appender active: this instance holds the leader lock and consumes")
                        await on_active()
                        await self._hold(conn)
                    finally:
                        # Closing the connection (not returning it to a pool) frees the session lock.
                        await conn.invalidate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("ledger leadership: %s: %s", type(exc).__name__, exc)
            if self.role == "active":
                self.role = "standby"
                log.warning("ledger appender standing by: the leader lock was lost")
                try:
                    await on_standby()
                except Exception as exc:  # the loop must go on: contending again is the way back
                    log.error("ledger leadership: stopping the consumer failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self._poll)

    async def _acquire(self, conn: AsyncConnection) -> None:
        told = False
        while True:
            async with conn.begin():
                if await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK}):
                    return
            if not told:
                log.warning("ledger appender standing by: another instance holds the leader lock")
                told = True
            await asyncio.sleep(self._poll)

    async def _hold(self, conn: AsyncConnection) -> None:
        """Return (raise) only when the lock's connection fails: the lock is gone with it."""
        while True:
            await asyncio.sleep(self._poll)
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS), conn.begin():
                await conn.execute(text("SELECT 1"))
