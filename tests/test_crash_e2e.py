"""design.md §7: kill -9 a service, the broker or PostgreSQL mid-stream, restart it, and the ledger
still holds every accepted event exactly once and verifies.

Counted against what the publishing partner had acknowledged: a partner whose send fails during
an outage sends the same event (same ce_id) again, as a real integration would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from shared.checkpoint import make_vkey
from shared.devstack import Stack
from shared.parties import load_private_key
from shared.settings import Settings
from tests.infra import LocalKafka, LocalPostgres
from tests.partner import PartnerClient, TopicWatcher

pytestmark = pytest.mark.asyncio(loop_scope="session")

EVENTS = 300


def capital(pledge_id: str, program: str) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": "kdb",
        "program_id": program,
        "kind": "capital",
        "capital": {"amount": "7", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


async def publish_through(
    partner: PartnerClient, records: list[Any], crash_at: int, crash: Callable[[], Awaitable[None]]
) -> None:
    """Publish every record, retrying a failed send (same record, same ce_id) until acknowledged;
    run `crash` after `crash_at` records were acknowledged."""
    for i, (key, value, headers) in enumerate(records):
        if i == crash_at:
            await crash()
        while True:
            try:
                await asyncio.wait_for(partner.send_raw("partner.pledges.v1", key, value, headers), timeout=30)
                break
            except Exception:  # the broker is away: an integrator retries the same event
                await asyncio.sleep(1)


def ledger_counts(url: str, pledges: list[str]) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT aggregate_id, count(*) FROM log_entries WHERE aggregate_id = ANY(%s) GROUP BY aggregate_id",
            (pledges,),
        ).fetchall()
    return dict(rows)


async def wait_ledger(url: str, pledges: list[str], timeout: float = 180) -> dict[str, int]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            counts = ledger_counts(url, pledges)
        except psycopg.OperationalError:
            counts = {}
        if len(counts) == len(pledges) or asyncio.get_running_loop().time() > deadline:
            return counts
        await asyncio.sleep(0.5)


def audit_verify(stack: Stack, tokens: dict[str, str], keys_dir: Path, state: Path) -> subprocess.CompletedProcess[str]:
    origin = Settings().ledger_origin
    vkey = make_vkey(origin, load_private_key(keys_dir / "ledger.key").public_key())
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.audit",
            "--url",
            stack.api_url,
            "--token",
            tokens["auditor"],
            "--state",
            str(state),
            "--key",
            vkey,
            "verify",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


async def run_crash(
    crash: Callable[[], Awaitable[None]],
    partner: PartnerClient,
    outcomes: TopicWatcher,
    stack: Stack,
    database_urls: dict[str, str],
    tokens: dict[str, str],
    keys_dir: Path,
    tmp_path: Path,
) -> None:
    program = f"crash-{uuid.uuid4().hex[:8]}"
    pledges = [f"{program}-{i}" for i in range(EVENTS)]
    records = [partner.record("kdb", "pledge.committed.v1", capital(p, program)) for p in pledges]
    await publish_through(partner, [r[:3] for r in records], EVENTS // 3, crash)
    event_ids = [r[3] for r in records]
    await outcomes.outcomes(*event_ids, timeout=180)
    for e in event_ids:
        decisions = {o["decision_id"] for o in outcomes.by_event[e]}
        assert len(decisions) == 1, f"event {e} got {len(decisions)} decisions"
        assert outcomes.by_event[e][0]["status"] == "accepted", outcomes.by_event[e]
    counts = await wait_ledger(database_urls["ledger"], pledges)
    assert len(counts) == EVENTS, f"{EVENTS - len(counts)} accepted events missing from the ledger"
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    done = audit_verify(stack, tokens, keys_dir, tmp_path / "audit.json")
    assert done.returncode == 0, done.stdout + done.stderr


Crash = Callable[[], Awaitable[None]]


@pytest.fixture
def crash_mid_stream(
    partner: PartnerClient,
    outcomes: TopicWatcher,
    stack: Stack,
    database_urls: dict[str, str],
    tokens: dict[str, str],
    keys_dir: Path,
    tmp_path: Path,
) -> Callable[[Crash], Awaitable[None]]:
    async def run(crash: Crash) -> None:
        await run_crash(crash, partner, outcomes, stack, database_urls, tokens, keys_dir, tmp_path)

    return run


async def test_a_service_killed_mid_stream(stack: Stack, crash_mid_stream: Callable[[Crash], Awaitable[None]]) -> None:
    async def crash() -> None:
        # The ledger this time (the pledges service has its own kill test): its appends are batched.
        stack.processes["ledger"].kill()
        await asyncio.sleep(1)
        stack.processes["ledger"].start()

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
    outcomes: TopicWatcher,
    crash_mid_stream: Callable[[Crash], Awaitable[None]],
) -> None:
    if local_postgres is None:
        pytest.skip("the database server is not ours to kill (external PostgreSQL)")

    async def crash() -> None:
        # Let the services get into the stream first, so the kill lands mid-transaction.
        await outcomes.wait(lambda: len(outcomes.by_event) > 0, timeout=30)
        local_postgres.kill()
        await asyncio.sleep(3)
        await asyncio.to_thread(local_postgres.start)

    await crash_mid_stream(crash)
