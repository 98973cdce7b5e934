"""The outbox relay through real Kafka and PostgreSQL: exactly once to read_committed readers, across
a crash between Kafka's commit and the DELETE and against a zombie relay; rows that can never be
sent are parked, counted and listed, and never hold back the rows behind them.

Each test has its own database, topic, service prefix (so its own transactional id) and relays
built directly; topics are counted in raw records, never in distinct ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from shared.contract import MAX_RECORD_BYTES, TOPIC_PARTITIONS
from shared.runtime.db import OutboxMessage, ParkedOutboxMessage, create_tables, make_engine, session_factory
from shared.runtime.outbox import OutboxRelay
from shared.runtime.topics import ensure_topics
from tests.partner import TopicWatcher
from tools.cli import app

pytestmark = pytest.mark.asyncio(loop_scope="session")

OUTBOX = OutboxMessage.__table__  # type: ignore[attr-defined]
PARKED = ParkedOutboxMessage.__table__  # type: ignore[attr-defined]


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    name = f"outbox_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = postgres_url.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(url)
    await create_tables(engine, [])
    yield engine, url
    await engine.dispose()


@pytest.fixture
async def topic(kafka_bootstrap: str) -> str:
    """A fresh one-partition topic (one order to check), plus the project's topics (the relay's
    progress topic among them)."""
    await ensure_topics(kafka_bootstrap)
    return await make_topic(kafka_bootstrap, MAX_RECORD_BYTES)


async def make_topic(bootstrap: str, max_bytes: int) -> str:
    name = f"outbox-test-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs={"max.message.bytes": str(max_bytes)})])
    finally:
        await admin.close()
    return name


def relay_for(engine: AsyncEngine, bootstrap: str, prefix: str, service: str = "pledges") -> OutboxRelay:
    return OutboxRelay(service, engine, session_factory(engine), bootstrap, poll_seconds=0.05, group_prefix=prefix)


async def enqueue(engine: AsyncEngine, topic: str, values: list[bytes]) -> list[dict[str, Any]]:
    """Outbox rows as a service's transaction writes them; returns them with their ids."""
    rows = [{"topic": topic, "key": b"k", "value": v, "headers": '[["ce_id", "x"]]'} for v in values]
    async with engine.begin() as conn:
        result = await conn.execute(insert(OUTBOX).returning(OUTBOX), rows)
        return [dict(r._mapping) for r in result.all()]


async def outbox_size(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(OUTBOX)) or 0)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def drained(engine: AsyncEngine) -> None:
    async def empty() -> bool:
        return await outbox_size(engine) == 0

    await until(empty)


async def read_topic(bootstrap: str, topic: str, isolation: str = "read_committed") -> list[bytes]:
    """Every raw record of the topic's one partition, up to its end as this isolation level sees it
    (the last stable offset for read_committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, isolation_level=isolation
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                values.extend(r.value for r in records)
        return values
    finally:
        await consumer.stop()


async def test_a_crash_between_kafka_commit_and_delete_publishes_nothing_twice(
    kafka_bootstrap: str, database: tuple[AsyncEngine, str], topic: str
) -> None:
    engine, _ = database
    prefix = f"t{uuid.uuid4().hex[:6]}"
    rows = await enqueue(engine, topic, [f"row-{i}".encode() for i in range(5)])
    first = relay_for(engine, kafka_bootstrap, prefix)
    await first.start()
    await drained(engine)
    await first.stop()
    # The crash: Kafka committed the round, the DELETE did not; the rows are back, ids and all.
    async with engine.begin() as conn:
        await conn.execute(insert(OUTBOX), rows)
    second = relay_for(engine, kafka_bootstrap, prefix)
    await second.start()
    await drained(engine)
    later = await enqueue(engine, topic, [b"row-5", b"row-6"])
    await drained(engine)
    await second.stop()

    published = await read_topic(kafka_bootstrap, topic)
    assert published == [r["value"] for r in rows + later]  # once each, in order


async def test_the_crash_test_sees_a_second_copy(
    kafka_bootstrap: str, database: tuple[AsyncEngine, str], topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same crash with the relay's progress read switched off publishes the rows again: the
    check above counts raw records and would see it."""
    engine, _ = database
    prefix = f"t{uuid.uuid4().hex[:6]}"

    async def forget(self: OutboxRelay, conn: object) -> int:
        return 0

    monkeypatch.setattr(OutboxRelay, "_reconcile", forget)
    rows = await enqueue(engine, topic, [b"a", b"b"])
    first = relay_for(engine, kafka_bootstrap, prefix)
    await first.start()
    await drained(engine)
    await first.stop()
    async with engine.begin() as conn:
        await conn.execute(insert(OUTBOX), rows)
    second = relay_for(engine, kafka_bootstrap, prefix)
    await second.start()
    await drained(engine)
    await second.stop()
    assert await read_topic(kafka_bootstrap, topic) == [b"a", b"b", b"a", b"b"]


async def test_rows_that_reuse_published_ids_are_not_taken_for_published_ones(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """SQLite (the embedded default) gives a new row the highest id + 1, so once the outbox is empty
    the ids of published rows come back. The progress's digest keeps a new leader from deleting
    such new rows unsent."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'svc.db'}")
    await create_tables(engine, [])
    prefix = f"t{uuid.uuid4().hex[:6]}"
    first = relay_for(engine, kafka_bootstrap, prefix)
    old = await enqueue(engine, topic, [b"old-1", b"old-2"])
    await first.start()
    await drained(engine)
    await first.stop()
    new = await enqueue(engine, topic, [b"new-1", b"new-2"])
    assert [r["id"] for r in new] == [r["id"] for r in old]  # the premise: ids reused
    second = relay_for(engine, kafka_bootstrap, prefix)
    await second.start()
    await drained(engine)
    await second.stop()
    await engine.dispose()
    assert await read_topic(kafka_bootstrap, topic) == [b"old-1", b"old-2", b"new-1", b"new-2"]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_an_oversized_row_is_parked_and_the_rows_behind_it_flow(
    kafka_bootstrap: str, database: tuple[AsyncEngine, str], topic: str
) -> None:
    engine, url = database
    parked_before = metric("gputrace_outbox_parked_total", service="pledges", reason="MessageSizeTooLargeError")
    rows = await enqueue(engine, topic, [b"before", b"x" * (2 * 1024 * 1024), b"bad headers", b"after"])
    async with engine.begin() as conn:  # a row no service would write, but a row all the same
        await conn.execute(OUTBOX.update().where(OUTBOX.c.id == rows[2]["id"]).values(headers='{"ce_id": 1}'))
    relay = relay_for(engine, kafka_bootstrap, f"t{uuid.uuid4().hex[:6]}")
    await relay.start()
    await drained(engine)
    await relay.stop()

    assert await read_topic(kafka_bootstrap, topic) == [b"before", b"after"]
    async with engine.connect() as conn:
        parked = (await conn.execute(select(PARKED).order_by(PARKED.c.id))).all()
    assert [(p.outbox_id, len(p.value)) for p in parked] == [(rows[1]["id"], 2 * 1024 * 1024), (rows[2]["id"], 11)]
    assert parked[0].reason.startswith("MessageSizeTooLargeError") and parked[1].reason.startswith("ValueError")
    assert metric("gputrace_outbox_parked_total", service="pledges", reason="MessageSizeTooLargeError") == (
        parked_before + 1
    )

    # What ops sees (the CLI runs its own event loop: off this one).
    out = await asyncio.to_thread(
        CliRunner().invoke, app, ["ops", "parked", "--service", "pledges", "--database-url", url, "--json"]
    )
    assert out.exit_code == 0, out.output
    assert f'"outbox_id": {rows[1]["id"]}' in out.output and "MessageSizeTooLargeError" in out.output
    table = await asyncio.to_thread(
        CliRunner().invoke, app, ["ops", "parked", "--service", "pledges", "--database-url", url]
    )
    assert table.exit_code == 0 and "2 parked row(s)" in table.output, table.output


async def test_a_record_the_broker_refuses_is_parked_alone(
    kafka_bootstrap: str, database: tuple[AsyncEngine, str], topic: str
) -> None:
    """A record this process lets through but the broker refuses (a topic with a smaller
    max.message.bytes) aborts its round; the round's rows go again one by one, and only the refused
    one is parked."""
    engine, _ = database
    small = await make_topic(kafka_bootstrap, 2000)
    rows = [
        {"topic": small, "key": b"k", "value": b"first", "headers": "[]"},
        {"topic": small, "key": b"k", "value": b"y" * 5000, "headers": "[]"},
        {"topic": small, "key": b"k", "value": b"third", "headers": "[]"},
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(OUTBOX), rows)
    relay = relay_for(engine, kafka_bootstrap, f"t{uuid.uuid4().hex[:6]}")
    await relay.start()
    await drained(engine)
    await enqueue(engine, small, [b"fourth"])  # and the relay goes on with a new producer
    await drained(engine)
    await relay.stop()

    assert await read_topic(kafka_bootstrap, small) == [b"first", b"third", b"fourth"]
    async with engine.connect() as conn:
        parked = (await conn.execute(select(PARKED))).all()
    assert [len(p.value) for p in parked] == [5000]
    assert "MessageSizeTooLarge" in parked[0].reason


async def test_two_relays_of_one_service_publish_each_row_once(
    kafka_bootstrap: str, database: tuple[AsyncEngine, str], topic: str
) -> None:
    engine, _ = database
    prefix = f"t{uuid.uuid4().hex[:6]}"
    relays = [relay_for(engine, kafka_bootstrap, prefix) for _ in range(2)]
    for relay in relays:
        await relay.start()
    values = [f"v{i}".encode() for i in range(200)]
    for start in range(0, len(values), 20):  # committed over time, as a service would
        await enqueue(engine, topic, values[start : start + 20])
        for relay in relays:
            relay.wake()
        await asyncio.sleep(0.02)
    await drained(engine)
    assert sorted(r.leading for r in relays) == [False, True]
    for relay in relays:
        await relay.stop()
    assert await read_topic(kafka_bootstrap, topic) == values


async def test_a_zombie_relay_is_fenced_and_its_records_are_never_read(
    kafka_bootstrap: str, database: tuple[AsyncEngine, str], topic: str
) -> None:
    """A relay that lost its database connection (and so its lock) in the middle of a round, its
    records sent but not committed, while a new relay takes over: the new producer fences the old
    one, whose commit then fails; read_committed readers (ours, and partners as the contract asks)
    see each row once, where a read_uncommitted reader sees the zombie's aborted copies too."""
    engine, url = database
    prefix = f"t{uuid.uuid4().hex[:6]}"
    zombie = relay_for(engine, kafka_bootstrap, prefix)
    in_commit, release = asyncio.Event(), asyncio.Event()
    make_producer = zombie._producer

    def stalling_producer() -> AIOKafkaProducer:
        producer = make_producer()
        commit = producer.commit_transaction

        async def stalled_commit() -> None:
            in_commit.set()
            await release.wait()
            await commit()

        producer.commit_transaction = stalled_commit  # type: ignore[method-assign]
        return producer

    zombie._producer = stalling_producer  # type: ignore[method-assign]
    watcher = await TopicWatcher(kafka_bootstrap, topic).start()
    await zombie.start()
    rows = await enqueue(engine, topic, [b"one", b"two", b"three"])
    zombie.wake()
    await asyncio.wait_for(in_commit.wait(), 30)
    # The zombie's database connection dies (its advisory lock with it); it keeps running.
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    successor = relay_for(engine, kafka_bootstrap, prefix)
    await successor.start()
    await drained(engine)
    release.set()  # the zombie's commit goes out now, fenced

    async def zombie_stands_by() -> bool:
        return not zombie.leading and successor.leading

    await asyncio.sleep(1.5)  # its failed round, the pause after it, its attempt to lead again
    await until(zombie_stands_by)
    await zombie.stop()
    await successor.stop()

    values = [r["value"] for r in rows]
    assert await read_topic(kafka_bootstrap, topic) == values
    assert await read_topic(kafka_bootstrap, topic, "read_uncommitted") == values + values
    await watcher.wait(lambda: len(watcher.records) >= 3)
    await asyncio.sleep(0.5)
    await watcher.stop()
    assert [r.value for r in watcher.records] == values


async def test_topics_accept_every_record_the_relay_lets_through(kafka_bootstrap: str) -> None:
    """max.message.bytes of every topic is the relay producer's max_request_size, also on a topic
    that existed before (its other overrides kept)."""
    await ensure_topics(kafka_bootstrap)
    old = f"outbox-test-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(old, 1, 1, topic_configs={"segment.ms": "3600000"})])
        declared = {old: {"max.message.bytes": str(MAX_RECORD_BYTES)}}
        await ensure_topics(kafka_bootstrap, {old: 1}, configs=declared)
        names = [*TOPIC_PARTITIONS, old]
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in names])
        configs = {res[3]: {e[0]: e[1] for e in res[4]} for response in responses for res in response.resources}
    finally:
        await admin.close()
    assert {t: configs[t]["max.message.bytes"] for t in names} == {t: str(MAX_RECORD_BYTES) for t in names}
    assert configs[old]["segment.ms"] == "3600000"
    producer = relay_for(make_engine("sqlite+aiosqlite://"), kafka_bootstrap, "t")._producer()
    assert producer._max_request_size == MAX_RECORD_BYTES


async def test_an_aborted_transaction_is_invisible_to_our_readers(kafka_bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"t-{uuid.uuid4().hex}")
    await producer.start()
    try:
        await producer.begin_transaction()
        for v in (b"aborted-1", b"aborted-2"):
            await producer.send_and_wait(topic, v)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed")
    finally:
        await producer.stop()
    watcher = await TopicWatcher(kafka_bootstrap, topic).start()
    await watcher.wait(lambda: len(watcher.records) >= 1)
    await asyncio.sleep(0.5)
    await watcher.stop()
    assert [r.value for r in watcher.records] == [b"committed"]
    assert await read_topic(kafka_bootstrap, topic, "read_uncommitted") == [b"aborted-1", b"aborted-2", b"committed"]
