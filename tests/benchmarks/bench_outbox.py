"""Throughput of the outbox relay alone: N rows waiting in a service's outbox (a backlog, as after
an outage), timed until a read_committed reader has every record and the table is empty.

    .venv/bin/python -m tests.benchmarks.bench_outbox --rows 20000

Uses KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL when set, else starts the local Kafka and PostgreSQL.
`--relay FILE.py` times another implementation of OutboxRelay, e.g. an earlier one:
`git show <rev>:shared/runtime/outbox.py > /tmp/outbox_old.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import func, insert, select

from shared.runtime.db import OutboxMessage, create_tables, make_engine, session_factory
from shared.runtime.topics import ensure_topics
from tests.infra import kafka_and_postgres

OUTBOX = OutboxMessage.__table__  # type: ignore[attr-defined]


def relay_module(path: str | None) -> ModuleType:
    if not path:
        return importlib.import_module("shared.runtime.outbox")
    spec = importlib.util.spec_from_file_location("outbox_under_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def bench(bootstrap: str, admin_url: str, rows: int, value_bytes: int, module: ModuleType) -> dict[str, float]:
    await ensure_topics(bootstrap)
    name = f"bench_outbox_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(admin_url.rsplit("/", 1)[0] + "/" + name)
    await create_tables(engine, [])
    topic = f"bench-outbox-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 3, 1)])
    await admin.close()
    headers = '[["ce_id", "x"], ["ce_source", "urn:gputrace:service:pledges"]]'
    async with engine.begin() as conn:
        for start in range(0, rows, 5000):
            await conn.execute(
                insert(OUTBOX),
                [
                    {"topic": topic, "key": f"party-{i % 50}".encode(), "value": b"v" * value_bytes, "headers": headers}
                    for i in range(start, min(rows, start + 5000))
                ],
            )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(3)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    kwargs = {"group_prefix": f"bench{uuid.uuid4().hex[:6]}"}
    if "group_prefix" not in inspect.signature(module.OutboxRelay).parameters:
        kwargs = {}
    relay = module.OutboxRelay("pledges", engine, session_factory(engine), bootstrap, 0.05, **kwargs)
    t0 = time.perf_counter()
    await relay.start()
    seen = 0
    while seen < rows:
        batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
        seen += sum(len(r) for r in batch.values())
    read_s = time.perf_counter() - t0
    while True:
        async with engine.connect() as conn:
            if not await conn.scalar(select(func.count()).select_from(OUTBOX)):
                break
        await asyncio.sleep(0.05)
    drained_s = time.perf_counter() - t0
    await relay.stop()
    await consumer.stop()
    await engine.dispose()
    return {"read_s": read_s, "drained_s": drained_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--value-bytes", type=int, default=600)
    parser.add_argument("--relay", help="a .py file with another OutboxRelay to time")
    args = parser.parse_args()
    module = relay_module(args.relay)
    work = Path(tempfile.mkdtemp(prefix="gputrace-bench-outbox-"))
    work.chmod(0o755)
    try:
        with kafka_and_postgres(work) as (bootstrap, admin_url, _, _):
            result = asyncio.run(bench(bootstrap, admin_url, args.rows, args.value_bytes, module))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.rows} rows of {args.value_bytes} B ({args.relay or 'shared.runtime.outbox'}): "
        f"read by a read_committed consumer in {result['read_s']:.2f} s = {args.rows / result['read_s']:,.0f} rows/s; "
        f"outbox empty after {result['drained_s']:.2f} s = {args.rows / result['drained_s']:,.0f} rows/s"
    )


if __name__ == "__main__":
    main()
