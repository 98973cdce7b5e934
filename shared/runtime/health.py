"""Liveness and readiness of a service process.

`/healthz` (liveness) answers while the process runs: restarting it would not help otherwise.
`/readyz` (readiness) answers 200 only while the service does its job, and 503 with the reasons
when the broker does not answer, when records wait but no batch completed for
`READINESS_STALL_SECONDS`, or when the outbox relay completed no round for
`READINESS_RELAY_SECONDS`.

A service of which one instance is active at a time (the ledger's appender) says which it is:
`role` is `active` or `standby` in the report. A standby consumes nothing, so it is ready as long
as it can take over (its relay and, when it becomes active, the consumer checks as usual).

The consumer loop feeds `Readiness` through a FastStream middleware (every polled batch starts,
ends or fails there), the outbox relay after each round; the broker and the lag are probed when
`/readyz` is asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiokafka.errors import KafkaError
from faststream import BaseMiddleware
from faststream.kafka import KafkaBroker


@dataclass(frozen=True)
class Report:
    ready: bool
    reasons: list[str] = field(default_factory=list)
    lag: int | None = None
    # "active" or "standby" for a service with one active instance at a time, else None.
    role: str | None = None

    def as_json(self, service: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": "ready" if self.ready else "not ready",
            "service": service,
            "reasons": self.reasons,
            "lag": self.lag,
        }
        if self.role is not None:
            doc["role"] = self.role
        return doc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class Readiness:
    """What a service knows about its own progress; `check` turns it into a verdict."""

    def __init__(
        self,
        *,
        stall_seconds: float,
        relay_seconds: float,
        probe_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_seconds = stall_seconds
        self.relay_seconds = relay_seconds
        self.probe_timeout = probe_timeout
        self._clock = clock
        now = clock()
        # Start-up counts as progress, so a backlog found at start is given its full grace period.
        self._progress = now
        self._waiting_since: float | None = None
        self._in_flight_since: float | None = None
        self._batch_error: str | None = None
        self._relay_ok = now
        self._relay_error: str | None = None
        self._relay_failures = 0
        # Set by a service with one active instance at a time (note_role).
        self.role: str | None = None
        self._role_broker: KafkaBroker | None = None

    def note_role(self, role: str, broker: KafkaBroker | None = None) -> None:
        """This instance became `active` (consuming with `broker`) or `standby` (consuming nothing)."""
        self.role = role
        self._role_broker = broker if role == "active" else None
        # Taking over counts as progress: the backlog it finds gets its full grace period.
        self._progress = self._clock()
        self._waiting_since = self._in_flight_since = None
        self._batch_error = None

    # --- fed by the consumer loop and the relay ---------------------------------------------

    def note_batch_started(self) -> None:
        self._in_flight_since = self._clock()

    def note_batch_done(self) -> None:
        self._progress = self._clock()
        self._in_flight_since = self._waiting_since = None
        self._batch_error = None

    def note_batch_failed(self, exc: BaseException) -> None:
        # A failed batch is redelivered: work is waiting even if the lag looks empty meanwhile.
        self._in_flight_since = None
        self._batch_error = _describe(exc)
        if self._waiting_since is None:
            self._waiting_since = self._clock()

    def note_relay_ok(self) -> None:
        self._relay_ok = self._clock()
        self._relay_error, self._relay_failures = None, 0

    def note_relay_failed(self, exc: BaseException) -> None:
        self._relay_error = _describe(exc)
        self._relay_failures += 1

    def note_relay_round(self, error: BaseException | None) -> None:
        """The relay's hook: called after every round, with the exception if it failed."""
        if error is None:
            self.note_relay_ok()
        else:
            self.note_relay_failed(error)

    def middleware(self) -> type[BaseMiddleware]:
        """A FastStream broker middleware that reports every consumed batch to this object."""
        readiness = self

        class _Watch(BaseMiddleware):
            async def on_receive(self) -> None:
                readiness.note_batch_started()

            async def after_processed(
                self,
                exc_type: type[BaseException] | None = None,
                exc_val: BaseException | None = None,
                exc_tb: TracebackType | None = None,
            ) -> bool | None:
                if exc_val is None:
                    readiness.note_batch_done()
                else:
                    readiness.note_batch_failed(exc_val)
                return False

        return _Watch

    # --- the verdict ---------------------------------------------------------------------------

    def stalled(self, lag: int | None) -> str | None:
        """Why the consumer is stuck, or None: work waits (lag, a failed or hanging batch) and no
        batch completed for `stall_seconds` since it began to wait."""
        now = self._clock()
        in_flight = self._in_flight_since is not None
        if not (lag or self._batch_error or in_flight):
            self._waiting_since = None
            return None
        if self._waiting_since is None:
            self._waiting_since = self._in_flight_since if in_flight else now
        assert self._waiting_since is not None
        idle = now - max(self._waiting_since, self._progress)
        if idle <= self.stall_seconds:
            return None
        why = f"consumer made no progress for {idle:.0f}s"
        if lag:
            why += f" with {lag} record(s) waiting"
        if self._batch_error:
            why += f"; last batch failed: {self._batch_error}"
        elif in_flight:
            why += "; a batch is still being handled"
        return why

    def relay_stuck(self) -> str | None:
        idle = self._clock() - self._relay_ok
        if idle <= self.relay_seconds:
            return None
        why = f"outbox relay completed no round for {idle:.0f}s"
        if self._relay_error:
            why += f" ({self._relay_failures} failure(s), last: {self._relay_error})"
        return why

    async def check(self, broker: KafkaBroker | None) -> Report:
        """The verdict; `broker` is None when this process does not consume (no broker checks)."""
        reasons: list[str] = []
        lag: int | None = None
        # Whoever runs the consumer when active started it itself: its broker comes from note_role.
        broker = broker if broker is not None else self._role_broker
        if broker is not None:
            if not await broker.ping(timeout=self.probe_timeout):
                reasons.append(f"Kafka broker unreachable (no answer in {self.probe_timeout:g}s)")
            else:
                lag = await consumer_lag(broker, self.probe_timeout)
            if why := self.stalled(lag):
                reasons.append(why)
        if why := self.relay_stuck():
            reasons.append(why)
        return Report(ready=not reasons, reasons=reasons, lag=lag, role=self.role)


async def consumer_lag(broker: KafkaBroker, timeout: float) -> int | None:
    """Records fetched by no poll yet, over the partitions this process is assigned: the last
    known high watermark minus the position. None when it cannot be known right now."""

    async def measure() -> int:
        total = 0
        for subscriber in broker.subscribers:
            consumer = getattr(subscriber, "consumer", None)
            if consumer is None:
                continue
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is not None:
                    total += max(0, high - await consumer.position(tp))
        return total

    try:
        return await asyncio.wait_for(measure(), timeout)
    except (TimeoutError, KafkaError):
        # Mid-rebalance or the broker away: the broker check and the next probe say more.
        return None
