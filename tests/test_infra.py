"""The infrastructure fixtures give a real Kafka 4.x and a real PostgreSQL, and crash tests can
kill -9 and restart the local ones without losing data."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError

from tests.infra import LocalKafka, LocalPostgres, create_database


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def api_versions(bootstrap: str) -> dict[int, tuple[int, int]]:
    """Raw ApiVersions v0: {api_key: (min_version, max_version)} as the broker states them."""
    host, port = bootstrap.rsplit(":", 1)
    client = b"gputrace-test"
    body = struct.pack(">hhih", 18, 0, 1, len(client)) + client
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">i", data[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, "broker closed the connection"
            data += chunk
    _, _, count = struct.unpack(">ihi", data[4:14])
    return {k: (lo, hi) for k, lo, hi in struct.iter_unpack(">hhh", data[14 : 14 + 6 * count])}


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    """Every record of the topic from the beginning, without a consumer group (no rebalance wait)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        out: list[tuple[bytes, bytes]] = []
        async with asyncio.timeout(30):
            while len(out) < expected:
                batch = await consumer.getmany(timeout_ms=500)
                out += [(r.key, r.value) for rs in batch.values() for r in rs]
        return out
    finally:
        await consumer.stop()


async def test_kafka_is_real_kafka_4(kafka_bootstrap: str) -> None:
    versions = api_versions(kafka_bootstrap)
    # Kafka 4.0 dropped Fetch v0-v3 (KIP-896): a 3.x broker still serves Fetch v0.
    assert versions[1][0] >= 4, versions[1]
    topic = f"infra-test-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0
    assert sorted(p["partition"] for p in described["partitions"]) == [0, 1, 2]
    records = [(f"batch-{i}".encode(), f"event-{i}".encode()) for i in range(10)]
    await produce(kafka_bootstrap, topic, records)
    assert sorted(await read_all(kafka_bootstrap, topic, expected=10)) == sorted(records)


async def test_kafka_does_not_auto_create_topics(kafka_bootstrap: str) -> None:
    topic = f"infra-unknown-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=1500)
    await producer.start()
    try:
        with pytest.raises((KafkaTimeoutError, UnknownTopicOrPartitionError)):
            await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topic not in await admin.list_topics()
    finally:
        await admin.close()


def test_postgres_is_real_postgres(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    with psycopg.connect(_libpq(postgres_url)) as conn:
        version = conn.execute("select version()").fetchone()
        assert version is not None and "PostgreSQL" in version[0]
    name = f"infra_test_{uuid.uuid4().hex[:8]}"
    url = create_database(postgres_url, name)
    assert create_database(postgres_url, name) == url  # idempotent
    with psycopg.connect(_libpq(url)) as conn:
        assert conn.execute("select current_database()").fetchone() == (name,)
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
        conn.execute(f'drop database "{name}"')


# The crash tests use private instances, so they can't disturb the session's shared servers.


async def test_local_kafka_survives_kill_9(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path / "kafka").start()
    try:
        before = kafka.bootstrap
        await create_topic(before, "crash", partitions=2)
        await produce(before, "crash", [(b"k1", b"v1"), (b"k2", b"v2")])
        kafka.kill()
        assert not kafka.running
        kafka.restart()
        assert kafka.bootstrap == before
        await produce(before, "crash", [(b"k3", b"v3")])
        got = await read_all(before, "crash", expected=3)
        assert sorted(got) == [(b"k1", b"v1"), (b"k2", b"v2"), (b"k3", b"v3")]
    finally:
        kafka.stop()
    assert not kafka.running


def test_local_postgres_survives_kill_9() -> None:
    directory = Path(tempfile.mkdtemp(prefix="gputrace-pg-test-"))
    pg = LocalPostgres(directory).start()
    try:
        before = pg.url
        url = pg.create_database("crash")
        with psycopg.connect(_libpq(url)) as conn:
            conn.execute("create table t (x int)")
            conn.execute("insert into t values (1), (2)")
        held = psycopg.connect(_libpq(url))  # an open session: its backend must die too
        pg.kill()
        assert not pg.running
        held.close()
        pg.restart()
        assert pg.url == before
        with psycopg.connect(_libpq(url)) as conn:
            assert conn.execute("select count(*) from t").fetchone() == (2,)
    finally:
        pg.stop()
        shutil.rmtree(directory, ignore_errors=True)
