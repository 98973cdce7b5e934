"""What tracing costs per event: the same pipeline with tracing silent and recording, in one run.

    .venv/bin/python -m tests.benchmarks.bench_tracing --events 2000 --rounds 2

A pledges service and a ledger run in this process (each on its own PostgreSQL database) and
decide/append EVENTS signed pledges, published as fast as possible; the CPU time of this process
(every thread: both services, the partner's producer, the span exporter's thread) is read from
the first send to the last ledger entry, spans flushed. Modes alternate, ROUNDS times each:

- silent: no provider (OTEL_EXPORTER_OTLP_ENDPOINT unset);
- otlp: the SDK with its batch processor and OTLP/HTTP exporter, sending to a local sink (a
  separate process answering 200, so its CPU is not counted).

The signatures are made before the clock starts. Figures, never pass/fail; uses
KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL when set, else starts the local Kafka and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.ledger.auth import write_dev_tokens
from services.ledger.main import create_app
from shared.contract import DECIDING_SERVICES, PLEDGES_TOPIC, decisions_topic
from shared.contract.parties import write_private_key
from shared.runtime import tracing
from shared.runtime.settings import Settings
from tests.infra import kafka_and_postgres
from tests.inprocess import build, capital, group_of, start_group_at_end
from tests.partner import PartnerClient
from tools.devkeys import DEV_PARTIES

# A collector stand-in: takes every OTLP/HTTP export and answers 200, nothing else.
SINK = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/x-protobuf")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def database(admin_url: str, label: str) -> str:
    name = f"bench_tr_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def entries(url: str) -> int:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM log_entries").fetchone()[0])  # type: ignore[index]
        except psycopg.errors.UndefinedTable:
            return 0


def provider_for(mode: str, sink: str) -> Any:
    if mode == "silent":
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "gputrace-bench"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{sink}/v1/traces")))
    return provider


async def one_run(mode: str, events: int, bootstrap: str, admin_url: str, work: Path, sink: str) -> float:
    """CPU µs per event of this process for one run of `events` pledges through pledges and ledger."""
    provider = provider_for(mode, sink)
    tracing.install(provider)
    run = work / uuid.uuid4().hex[:8]
    keys = run / "keys"
    keys.mkdir(parents=True)
    write_private_key(keys / "ledger.key", Ed25519PrivateKey.generate())
    pledges = build(bootstrap, run, database_url=database(admin_url, "p"), outbox_poll_seconds=0.2)
    write_dev_tokens(keys / "tokens.json", [p for p, _, _ in DEV_PARTIES])
    prefix = f"bench-tr-{uuid.uuid4().hex[:8]}"
    ledger_db = database(admin_url, "l")
    ledger = create_app(
        Settings(
            kafka_bootstrap_servers=bootstrap,
            database_url=ledger_db,
            party_registry=keys / "registry.json",
            ledger_signing_key=keys / "ledger.key",
            api_tokens=keys / "tokens.json",
            var_dir=run / "ledger-var",
            consumer_group_prefix=prefix,
            outbox_poll_seconds=0.2,
        )
    )
    await start_group_at_end(bootstrap, group_of(pledges), PLEDGES_TOPIC)
    for service in DECIDING_SERVICES:
        await start_group_at_end(bootstrap, f"{prefix}-ledger", decisions_topic(service))
    await pledges.start_dependencies()
    await pledges.broker.start()
    try:
        async with ledger.router.lifespan_context(ledger), PartnerClient(bootstrap, keys) as partner:
            program = f"bench-{uuid.uuid4().hex[:8]}"
            # Signed before the clock starts: the partner's work is not the pipeline's.
            records = [
                partner.record("kdb", "pledge.committed.v1", capital(f"{program}-{i}", program)) for i in range(events)
            ]
            await asyncio.sleep(3)  # both consumer groups settle
            cpu, wall = time.process_time(), time.monotonic()
            for key, value, headers, _ in records:
                await partner._producer.send(PLEDGES_TOPIC, value, key=key, headers=headers)  # type: ignore[union-attr]
            await partner._producer.flush()  # type: ignore[union-attr]
            while await asyncio.to_thread(entries, ledger_db) < events:  # noqa: ASYNC110 (another database)
                await asyncio.sleep(0.2)
            if provider is not None:
                await asyncio.to_thread(provider.force_flush)  # the spans' export is part of the cost
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    finally:
        await pledges.broker.stop()
        await pledges.stop_dependencies()
        tracing.install(None)
        if provider is not None:
            provider.shutdown()
    print(
        f"  {mode:6s} {events} events: {cpu / events * 1e6:7.0f} µs CPU/event, {events / wall:6.0f} events/s",
        flush=True,
    )
    return cpu / events * 1e6


async def bench(
    bootstrap: str, admin_url: str, work: Path, events: int, rounds: int, sink: str
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"silent": [], "otlp": []}
    for _ in range(rounds):
        for mode in results:
            results[mode].append(await one_run(mode, events, bootstrap, admin_url, work, sink))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000, help="events per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gputrace-bench-tracing-"))
    work.chmod(0o755)
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    try:
        with kafka_and_postgres(work) as (bootstrap, admin_url, *_):
            runs = bench(bootstrap, admin_url, work / "runs", args.events, args.rounds, f"http://127.0.0.1:{port}")
            results = asyncio.run(runs)
    finally:
        sink.terminate()
        sink.wait()
        shutil.rmtree(work, ignore_errors=True)
    silent, otlp = statistics.median(results["silent"]), statistics.median(results["otlp"])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"median CPU µs per event (pledges + ledger + partner producer, one process), load average {load}:")
    print(f"  silent {silent:.0f}, otlp {otlp:.0f}: tracing adds {otlp - silent:.0f} µs/event ({otlp / silent:.2f}x)")


if __name__ == "__main__":
    main()
