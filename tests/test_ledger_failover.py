"""Ledger fail-over: two `python -m services.ledger` processes on real Kafka and PostgreSQL.

One appends (it holds the leader lock, services.ledger.leadership); the other stands by, serving
reads. The active one is SIGKILLed while decisions keep coming: the standby takes over and
appends within FAILOVER_LIMIT seconds, every decision is in the log exactly once, and the
auditor's `gputrace audit verify` passes. The fail-over time is printed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.ledger.leadership import LEADER_LOCK, Leadership
from shared.contract import decisions_topic, service_source
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import DECISION_TYPE, Decision
from shared.contract.parties import load_private_key
from shared.runtime import db
from shared.runtime.db import make_engine, utcnow
from shared.runtime.topics import ensure_topics
from tests.chaos import audit_verify
from tests.stack import auditor_headers, create_databases, make_keys, secure_kafka_access
from tools.devstack import ServiceProcess, Stack, free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Generous for a loaded 2-core machine; the measured time is printed (about the consumer group's
# session timeout: the dead member must leave the group before its partitions move).
FAILOVER_LIMIT = 60.0
TOPIC = decisions_topic("pledges")


def decision_record(key: Ed25519PrivateKey, tag: str, n: int) -> tuple[str, bytes | None, bytes, list]:
    decision = Decision(
        decision_id=f"{tag}-{n:04d}",
        service="pledges",
        decided_at=utcnow(),
        status="rejected",
        reason_code="UNKNOWN_PLEDGE",
        message=f"fail-over decision {n}",
        event_type="gputrace.pledge.amended.v1",
        aggregate_id=f"P-{tag}-{n % 7}",
    )
    event = CloudEvent(
        id=decision.decision_id,
        source=service_source("pledges"),
        type=DECISION_TYPE,
        subject=decision.aggregate_id,
        data=decision.model_dump(mode="json"),
    ).signed(key)
    k, value, headers = event.as_record()
    return decision.decision_id, k, value, headers


def role(port: int) -> str | None:
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    return answer.json().get("role") if answer.status_code in (200, 503) else None


async def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.2)


async def test_the_standby_ledger_takes_over_when_the_active_one_is_killed(
    kafka_bootstrap: str, postgres_url: str, tmp_path: Path
) -> None:
    run_id = uuid.uuid4().hex[:8]
    keys = tmp_path / "keys"
    tokens = make_keys(keys)
    await ensure_topics(kafka_bootstrap)
    secured = await asyncio.to_thread(secure_kafka_access, kafka_bootstrap, keys / "registry.json", f"fo-{run_id}")
    db_url = create_databases(postgres_url, run_id, ("ledger",))["ledger"]
    stack = Stack(
        base_env={
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "PARTY_REGISTRY": str(keys / "registry.json"),
            "VAR_DIR": str(tmp_path / "var"),
            "CONSUMER_GROUP_PREFIX": f"fo-{run_id}",
            "LEDGER_SIGNING_KEY": str(keys / "ledger.key"),
            "API_TOKENS": str(keys / "tokens.json"),
            "LOG_JSON": "true",
        },
        log_dir=tmp_path / "logs",
        database_urls={"ledger": db_url},
        kafka_principals=secured,
    )
    ports = [free_port(), free_port()]
    ledgers = [
        ServiceProcess(
            "ledger", {**stack.env_for("ledger"), "HTTP_PORT": str(port)}, tmp_path / "logs" / f"ledger-{i}.log"
        )
        for i, port in enumerate(ports)
    ]
    libpq = db_url.replace("postgresql+psycopg://", "postgresql://")

    def log_ids() -> list[str]:
        with psycopg.connect(libpq) as conn:
            return [r[0] for r in conn.execute("SELECT decision_id FROM log_entries ORDER BY leaf_index")]

    signer = load_private_key(keys / "pledges.key")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    try:
        # One after the other: the first creates the schema, the second finds it.
        ledgers[0].start()
        await wait_for(lambda: role(ports[0]) == "active", 120, "the first ledger active")
        ledgers[1].start()
        await wait_for(lambda: role(ports[1]) == "standby", 120, "the second ledger standing by")
        assert role(ports[0]) == "active"

        await producer.start()
        sent: list[str] = []

        async def publish(count: int) -> None:
            for _ in range(count):
                decision_id, k, value, headers = decision_record(signer, f"fo-{run_id}", len(sent))
                await producer.send_and_wait(TOPIC, value, key=k, headers=headers)
                sent.append(decision_id)

        await publish(40)
        await wait_for(lambda: len(log_ids()) == 40, 60, "the active ledger appending")
        # One appender: the second never became active while the first lived.
        assert role(ports[1]) == "standby" and "appender active" not in ledgers[1].log_path.read_text()
        # The standby serves reads all along.
        async with httpx.AsyncClient(headers=auditor_headers(tokens), timeout=10) as api:
            answer = await api.get(f"http://127.0.0.1:{ports[1]}/v1/log/checkpoint")
            assert answer.status_code == 200 and "\n40\n" in answer.text, answer.text

        ledgers[0].kill()  # SIGKILL: no shutdown, its lock connection just drops
        killed = time.monotonic()
        await publish(40)
        await wait_for(lambda: len(log_ids()) > 40, FAILOVER_LIMIT, "the standby appending after the kill")
        failover = time.monotonic() - killed
        await wait_for(lambda: len(log_ids()) == 80, 60, "every decision appended")
        assert role(ports[1]) == "active"
        print(f"\nledger fail-over: the standby appended {failover:.1f} s after the active one was SIGKILLed")

        ids = log_ids()
        assert len(ids) == len(set(ids)) == 80, "a decision appended twice"
        assert sorted(ids) == sorted(sent), "a decision missing from the log"
        api_url = f"http://127.0.0.1:{ports[1]}"
        done = await asyncio.to_thread(audit_verify, api_url, tokens["auditor"], keys, tmp_path / "audit.json")
        assert done.returncode == 0, done.stdout + done.stderr
    except BaseException:
        for i, p in enumerate(ledgers):
            print(f"--- ledger-{i} ---\n{p.log_path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        await producer.stop()
        for p in ledgers:
            p.stop()


async def test_a_leader_whose_lock_connection_dies_stands_by_and_contends_again(postgres_url: str) -> None:
    """A database restart or a dropped connection frees the lock: the leader stops consuming at
    once (another instance may take the lock) and, the lock free again, becomes active again."""
    engine = make_engine(postgres_url, 1)
    leadership = Leadership(engine, poll_seconds=0.2)
    seen: list[str] = []

    async def active() -> None:
        seen.append("active")

    async def standby() -> None:
        seen.append("standby")

    task = asyncio.create_task(leadership.run(active, standby))
    libpq = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        await wait_for(lambda: seen == ["active"], 20, "leading")
        with psycopg.connect(libpq, autocommit=True) as conn:
            # The lock's holder, as an operator (or a failing network) would end it.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                (LEADER_LOCK & 0xFFFFFFFF,),
            )
        await wait_for(lambda: seen == ["active", "standby", "active"], 30, "standing by, then leading again")
        assert leadership.role == "active"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.dispose()


async def test_a_frozen_leader_loses_the_lock_to_the_standby(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader that stops pinging (SIGSTOP: here, a ping interval longer than the test) has its
    silent lock session ended by PostgreSQL, and the standby becomes active."""
    monkeypatch.setattr(db, "LOCK_SESSION_IDLE_SECONDS", 2.0)
    engines = [make_engine(postgres_url, 1), make_engine(postgres_url, 1)]
    frozen, standby = Leadership(engines[0], poll_seconds=600), Leadership(engines[1], poll_seconds=0.2)
    seen: list[str] = []

    async def note(what: str) -> None:
        seen.append(what)

    first = asyncio.create_task(frozen.run(lambda: note("frozen active"), lambda: note("frozen standby")))
    try:
        await wait_for(lambda: seen == ["frozen active"], 20, "the first leading")
        second = asyncio.create_task(standby.run(lambda: note("standby active"), lambda: note("standby standby")))
        try:
            await wait_for(lambda: "standby active" in seen, 30, "the standby taking over from the frozen leader")
        finally:
            second.cancel()
            await asyncio.gather(second, return_exceptions=True)
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        for engine in engines:
            await engine.dispose()
