"""Throughput of gputrace against raw aiokafka and raw PostgreSQL, measured in the same run.

    .venv/bin/python -m tests.benchmarks.bench_pipeline --events 5000

Uses KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL when set, else starts the local Kafka and PostgreSQL.
Reports events per second and ratios (gputrace ÷ raw), never pass/fail: speed belongs here, not
in timed tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console
from rich.table import Table

from shared.runtime.topics import ensure_topics
from tests.infra import kafka_and_postgres
from tests.partner import PartnerClient
from tests.stack import start_stack

console = Console()


def pledge(i: int, run: str) -> dict[str, Any]:
    return {
        "pledge_id": f"BENCH-{run}-{i}",
        "partner_id": "kdb",
        "program_id": f"bench-{run}",
        "kind": "capital",
        "capital": {"amount": "1000", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    t0 = time.perf_counter()
    futures = [await producer.send(topic, value, key=key, headers=headers) for key, value, headers in records]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    await producer.stop()
    return elapsed


async def raw_kafka(bootstrap: str, records: list[Any]) -> dict[str, float]:
    """Baseline: the same records through a bare topic, produced then consumed with commits."""
    topic = f"bench-raw-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 3, 1)])
    await admin.close()
    produce_s = await produce(bootstrap, topic, records)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    t0, seen = time.perf_counter(), 0
    while seen < len(records):
        batch = await consumer.getmany(timeout_ms=1000, max_records=500)
        for recs in batch.values():
            for rec in recs:
                json.loads(rec.value)
            seen += sum(len(r) for r in batch.values())
        if batch:
            await consumer.commit()
    consume_s = time.perf_counter() - t0
    await consumer.stop()
    return {"produce_s": produce_s, "consume_s": consume_s}


def raw_postgres(admin_url: str, n: int) -> float:
    """Baseline: what the pledges service writes per event (state row, processed row, two outbox
    rows), as plain INSERTs, 500 events per transaction."""
    url = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_state, bench_seen, bench_outbox")
        conn.execute("CREATE TABLE bench_state (id text primary key, state text)")
        conn.execute("CREATE TABLE bench_seen (source text, id text, primary key (source, id))")
        conn.execute("CREATE TABLE bench_outbox (id bigserial primary key, topic text, value bytea)")
    t0 = time.perf_counter()
    with psycopg.connect(url) as conn:
        for start in range(0, n, 500):
            with conn.transaction(), conn.cursor() as cur:
                ids = [str(i) for i in range(start, min(n, start + 500))]
                cur.executemany("INSERT INTO bench_state VALUES (%s, %s)", [(i, "{}") for i in ids])
                cur.executemany("INSERT INTO bench_seen VALUES ('s', %s)", [(i,) for i in ids])
                cur.executemany(
                    "INSERT INTO bench_outbox (topic, value) VALUES ('t', %s)",
                    [(b"x" * 600,) for _ in ids for _ in (0, 1)],
                )
    return time.perf_counter() - t0


def count_entries(url: str, program: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM log_entries WHERE aggregate_id LIKE %s", (f"BENCH-{program}-%",)
        ).fetchone()
    return int(row[0]) if row else 0


async def gputrace_pipeline(bootstrap: str, keys: Path, db_urls: dict[str, str], n: int, run: str) -> dict[str, float]:
    """The same pledges through the pledges service to the ledger: publish, then time until every
    outcome is out and every decision is in the ledger's Merkle log."""
    async with PartnerClient(bootstrap, keys) as client:
        records = [client.record("kdb", "pledge.committed.v1", pledge(i, run))[:3] for i in range(n)]
    consumer = AIOKafkaConsumer(
        "gputrace.outcomes.v1",
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        isolation_level="read_committed",  # as the contract asks of partners
    )
    await consumer.start()
    await consumer.seek_to_end()
    t0 = time.perf_counter()
    await produce(bootstrap, "partner.pledges.v1", records)
    seen = 0
    while seen < n:
        batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
        for recs in batch.values():
            seen += sum(1 for r in recs if json.loads(r.value)["event_type"] == "gputrace.pledge.committed.v1")
    outcomes_s = time.perf_counter() - t0
    await consumer.stop()
    while count_entries(db_urls["ledger"], run) < n:  # noqa: ASYNC110 - polling another process's database
        await asyncio.sleep(0.2)
    ledger_s = time.perf_counter() - t0
    return {"outcomes_s": outcomes_s, "ledger_s": ledger_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    n, run = args.events, uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix="gputrace-bench-"))
    work.chmod(0o755)
    try:
        with kafka_and_postgres(work) as (bootstrap, admin_url, _, _):
            asyncio.run(ensure_topics(bootstrap))
            stack, _ = start_stack(bootstrap, admin_url, work / "stack")
            try:
                keys = work / "stack" / "keys"

                async def records() -> list[Any]:
                    async with PartnerClient(bootstrap, keys) as client:
                        return [
                            client.record("kdb", "pledge.committed.v1", pledge(i, "raw" + run))[:3] for i in range(n)
                        ]

                recs = asyncio.run(records())
                raw = asyncio.run(raw_kafka(bootstrap, recs))
                pg_s = raw_postgres(stack.database_urls["ledger"], n)
                ours = asyncio.run(gputrace_pipeline(bootstrap, keys, stack.database_urls, n, run))
            finally:
                stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = {
        "raw aiokafka produce": n / raw["produce_s"],
        "raw aiokafka consume+commit": n / raw["consume_s"],
        "raw PostgreSQL inserts (4 rows/event)": n / pg_s,
        "gputrace publish → outcome": n / ours["outcomes_s"],
        "gputrace publish → ledger entry": n / ours["ledger_s"],
    }
    table = Table(title=f"{n} signed pledge events, one run")
    table.add_column("path")
    table.add_column("events/s", justify="right")
    for k, v in rate.items():
        table.add_row(k, f"{v:,.0f}")
    console.print(table)
    ratios = {
        "outcome ÷ raw consume": rate["gputrace publish → outcome"] / rate["raw aiokafka consume+commit"],
        "outcome ÷ raw PostgreSQL": rate["gputrace publish → outcome"] / rate["raw PostgreSQL inserts (4 rows/event)"],
        "ledger ÷ raw consume": rate["gputrace publish → ledger entry"] / rate["raw aiokafka consume+commit"],
    }
    for k, v in ratios.items():
        console.print(f"{k}: {v:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"events": n, "rates": rate, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
