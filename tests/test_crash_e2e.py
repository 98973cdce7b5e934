"""Kill -9 two services at once, the broker or PostgreSQL mid-stream, restart it, and count what
came out record by record: every event exactly one outcome record, every decision exactly one
record on its decision topic and one entry in the ledger, and the ledger verifies.

Counted raw (tests.chaos.RawTally, a read_committed reader from the beginning of the topics): a
second copy of an outcome is a second record here, even with the same decision id, so a
re-decided or re-published event shows. The workload mixes event types, accepted and rejected
events, several events per aggregate, an exact redelivery, and rejections right after state
changes in one polled batch (the consumer's safe-mode replay); a partner whose send fails during
an outage sends the same event (same ce_id) again, as a real integration would.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.chaos import (
    Lag,
    Publisher,
    RawTally,
    audit_verify,
    count,
    replay_decided,
    safe_mode_replays,
    wait_ledger,
    workload,
)
from tests.conftest import E2E
from tests.infra import LocalKafka, LocalPostgres
from tests.partner import PartnerClient
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

EVENTS = 330  # about 27 pledge+batch groups of 11–14 events
Crash = Callable[[], Awaitable[None]]


async def run_crash(
    crash: Crash,
    kafka_bootstrap: str,
    stack: Stack,
    database_urls: dict[str, str],
    tokens: dict[str, str],
    keys_dir: Path,
    tmp_path: Path,
) -> None:
    tag = f"crash-{uuid.uuid4().hex[:8]}"
    groups = workload(PartnerClient(kafka_bootstrap, keys_dir), tag, EVENTS)
    records = [s for g in groups for s in g]
    replays = safe_mode_replays(stack)
    prefix = stack.base_env["CONSUMER_GROUP_PREFIX"]
    async with (
        RawTally(kafka_bootstrap, tag) as tally,
        Publisher(kafka_bootstrap) as pub,
        Lag(kafka_bootstrap, prefix) as lag,
    ):
        third = len(groups) // 3
        for i, group in enumerate(groups):
            if i == third:
                # Mid-stream: once the services have decided some of what was sent, so the
                # crash lands between decided work and work still to do.
                first = {s.event_id for g in groups[:third] for s in g}
                await tally.wait(lambda first=first: sum(e in tally.outcomes for e in first) >= len(first) // 2, 60)
                await crash()
            # A group's records go out together, so a polled batch holds several steps of one
            # pledge: a rejection after its changes sends that batch to safe mode.
            await pub.send_all(group)
        ids = {s.event_id for s in records}
        settled = await tally.settle(ids, timeout=180)
        # Then a partner replays part of what it sent, long after it was decided.
        lags = await replay_decided(pub, lag, records, timeout=60)
        ledger = await _wait_ledger(database_urls["ledger"], tally, timeout=120)
        # Statuses are checked where the order of sends is known: not for events sent again.
        counts = count(tally, records, ledger, check_status=ids - pub.resent)
    assert settled and counts.lost == 0, f"{counts.lost} of {counts.events} events got no outcome"
    assert not any(lags.values()), f"consumer groups stuck (records left to read): {lags}"
    assert counts.outcome_copies == 0, (
        f"{counts.outcome_copies} outcome records beyond one per event "
        f"({counts.outcome_copies_differing} of them not identical to the first, decided_at included)"
    )
    assert counts.decision_copies == 0, f"{counts.decision_copies} decision records beyond one per decision"
    assert counts.outcomes_without_decision == 0
    assert not counts.wrong_status, counts.wrong_status[:5]
    assert counts.ledger_missing == 0, f"{counts.ledger_missing} of {counts.decisions} decisions not in the ledger"
    assert counts.ledger_extra == 0 and counts.ledger_duplicates == 0, counts
    assert safe_mode_replays(stack) > replays, "the workload never made a batch replay record by record"
    done = audit_verify(stack.api_url, tokens["auditor"], keys_dir, tmp_path / "audit.json")
    assert done.returncode == 0, done.stdout + done.stderr


async def _wait_ledger(url: str, tally: RawTally, timeout: float) -> Counter[str]:
    """tests.chaos.wait_ledger, also for the embedded default (the ledger's SQLite file)."""
    if not url.startswith("sqlite"):
        return await wait_ledger(url, tally, timeout)
    path = url.split(":///", 1)[1]
    sql = (
        "SELECT decision_id, count(*) FROM log_entries WHERE aggregate_id LIKE ? OR batch_id LIKE ? "
        "GROUP BY decision_id"
    )

    def read() -> Counter[str]:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            return Counter(dict(conn.execute(sql, (tally.tag + "%", tally.tag + "%")).fetchall()))

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await asyncio.to_thread(read)
        if all(d in got for d in tally.decisions) or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.5)


@pytest.fixture
def crash_mid_stream(e2e: E2E, tmp_path: Path) -> Callable[[Crash], Awaitable[None]]:
    """On the session's stack (PostgreSQL), or on SQLite where a test parametrises `backend`."""

    async def run(crash: Crash) -> None:
        await run_crash(crash, e2e.kafka_bootstrap, e2e.stack, e2e.database_urls, e2e.tokens, e2e.keys_dir, tmp_path)

    return run


# SQLite once found identical outcome and decision copies here: a relay's sweep, waiting for the
# write lock, sent rows a batch claimed and committed meanwhile (tests/test_outbox_sqlite.py).
@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_two_services_killed_at_once_mid_stream(
    e2e: E2E, crash_mid_stream: Callable[[Crash], Awaitable[None]]
) -> None:
    stack = e2e.stack

    async def crash() -> None:
        # The service that decides (its outbox publishes outcomes) and the ledger, together.
        for name in ("pledges", "ledger"):
            stack.processes[name].kill()
        await asyncio.sleep(1)
        for name in ("pledges", "ledger"):
            stack.processes[name].start()

    await crash_mid_stream(crash)
    await asyncio.to_thread(stack.wait_ready, 60)


async def test_the_broker_killed_mid_stream(
    local_kafka: LocalKafka | None, crash_mid_stream: Callable[[Crash], Awaitable[None]]
) -> None:
    if local_kafka is None:
        pytest.skip("the broker is not ours to kill (external Kafka)")

    async def crash() -> None:
        local_kafka.kill()
        await asyncio.sleep(2)
        await asyncio.to_thread(local_kafka.start)

    await crash_mid_stream(crash)


async def test_postgres_killed_mid_stream(
    local_postgres: LocalPostgres | None,
    crash_mid_stream: Callable[[Crash], Awaitable[None]],
    stack: Stack,
    tokens: dict[str, str],
) -> None:
    if local_postgres is None:
        pytest.skip("the database server is not ours to kill (external PostgreSQL)")

    async def crash() -> None:
        # Auditors were reading when the database died: the API's pool holds connections that
        # the restart kills, and the audit after it must still be answered (not a 500).
        headers = {"Authorization": f"Bearer {tokens['auditor']}"}
        async with httpx.AsyncClient(base_url=stack.api_url, headers=headers, timeout=30) as client:
            answers = await asyncio.gather(*(client.get("/v1/log/checkpoint") for _ in range(20)))
        assert all(a.status_code == 200 for a in answers)
        local_postgres.kill()
        await asyncio.sleep(3)
        await asyncio.to_thread(local_postgres.start)

    await crash_mid_stream(crash)
