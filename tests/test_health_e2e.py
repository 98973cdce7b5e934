"""/healthz is liveness (the process answers), /readyz is readiness (the service does its job):
503 with the reasons when the broker is away, when records wait and no batch completes, or when
the outbox relay completes no round; 200 again once that is over."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract.decisions import Verdict
from shared.runtime.consumer import Inbound
from shared.runtime.health import Readiness
from tests import inprocess
from tests.infra import LocalKafka
from tools.devstack import Stack

session_loop = pytest.mark.asyncio(loop_scope="session")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_readiness_rules() -> None:
    clock = Clock()
    ready = Readiness(stall_seconds=10, relay_seconds=10, clock=clock)
    clock.now += 3600
    ready.note_relay_ok()
    # Idle for an hour with nothing waiting is not a stall; records arriving now get their grace.
    assert ready.stalled(lag=0) is None
    assert ready.stalled(lag=5) is None
    clock.now += 11
    assert "no progress for 11s with 5 record(s) waiting" in (ready.stalled(lag=5) or "")
    ready.note_batch_done()
    assert ready.stalled(lag=5) is None
    # A batch that keeps failing is a stall even when the lag reads 0 between redeliveries.
    ready.note_batch_failed(ConnectionError("database away"))
    clock.now += 11
    assert "last batch failed: ConnectionError: database away" in (ready.stalled(lag=0) or "")
    # So is a batch that never returns.
    ready.note_batch_done()
    ready.note_batch_started()
    clock.now += 11
    assert "still being handled" in (ready.stalled(lag=0) or "")
    ready.note_batch_done()
    assert ready.stalled(lag=0) is None
    # The relay: failing, or not completing a round, for longer than its limit.
    ready.note_relay_ok()
    ready.note_relay_failed(ConnectionError("broker away"))
    clock.now += 5
    assert ready.relay_stuck() is None
    ready.note_relay_failed(ConnectionError("broker away"))
    clock.now += 6
    assert "2 failure(s), last: ConnectionError: broker away" in (ready.relay_stuck() or "")
    ready.note_relay_round(None)
    assert ready.relay_stuck() is None


class Outage:
    def __init__(self) -> None:
        self.away = False

    def wrap(self, handler: inprocess.Handler) -> inprocess.Handler:
        async def handle(session: AsyncSession, inbound: Inbound) -> Verdict:
            if self.away:
                raise ConnectionError("database went away (injected)")
            return await handler(session, inbound)

        return handle


async def until_status(client: httpx.AsyncClient, path: str, status: int, timeout: float = 30) -> httpx.Response:
    async with asyncio.timeout(timeout):
        while (answer := await client.get(path)).status_code != status:  # noqa: ASYNC110 (polling HTTP)
            await asyncio.sleep(0.3)
    return answer


@session_loop
async def test_a_consumer_that_cannot_progress_is_not_ready(kafka_bootstrap: str, tmp_path: Path) -> None:
    outage = Outage()
    service = inprocess.build(
        kafka_bootstrap, tmp_path, wrap=outage.wrap, readiness_stall_seconds=1.5, readiness_relay_seconds=3600
    )
    group = inprocess.group_of(service)
    await inprocess.start_group_at_end(kafka_bootstrap, group)
    async with inprocess.consuming(service):
        transport = httpx.ASGITransport(app=service.http_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            assert (await until_status(client, "/readyz", 200)).json()["status"] == "ready"
            outage.away = True
            await inprocess.publish_pledges(kafka_bootstrap, tmp_path / "keys", 5)
            answer = await until_status(client, "/readyz", 503)
            [why] = answer.json()["reasons"]
            assert "no progress" in why and "database went away" in why, why
            assert (await client.get("/healthz")).status_code == 200
            outage.away = False
            await until_status(client, "/readyz", 200)
        await inprocess.wait_group_done(kafka_bootstrap, group, timeout=60)
        assert await inprocess.processed(service) == 5


@session_loop
async def test_readyz_follows_the_broker(local_kafka: LocalKafka | None, stack: Stack) -> None:
    if local_kafka is None:
        pytest.skip("the broker is not ours to stop (external Kafka)")
    await asyncio.to_thread(stack.wait_ready, 60)
    async with httpx.AsyncClient(timeout=10) as client:
        local_kafka.kill()
        try:
            for name in stack.processes:
                answer = await until_status(client, stack.ready_url(name), 503)
                assert any("broker unreachable" in r for r in answer.json()["reasons"]), answer.text
                assert (await client.get(stack.health_url(name))).status_code == 200
        finally:
            await asyncio.to_thread(local_kafka.start)
    await asyncio.to_thread(stack.wait_ready, 90)
