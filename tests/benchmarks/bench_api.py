"""`make bench-api`: the auditor API's latency at 50 concurrent clients on a large programme, beside
/healthz on the same server, and the log's proofs over HTTP at 10^6 entries (issue 11, item 4).

The ledger's tables are bulk-loaded (COPY) rather than published through Kafka: publishing a million
entries takes far longer than the measurement (the demo's own figures are in the report). The
log is real (leaf hashes, every complete subtree, the head and a signed checkpoint), so proofs
are built exactly as in production; the views are shaped like the projections' rows (states with
quotes, award, export and delivery), and the running totals are computed from them. No ANALYZE
is run after the load: the plans must not depend on the planner's statistics.

The server is the ledger's own app (services.ledger.main.create_app) under uvicorn in a separate
process, without its Kafka consumer (consume=False; nothing is ingested meanwhile). The clients are
httpx in this process: `clients` tasks each send one request after another (closed loop).

    python -m tests.benchmarks.bench_api [--log-entries 1000000] [--pledges 100000] [--batches 10000]

Results: bench/results/api.{json,md} (or --out). DATABASE_URL: an existing PostgreSQL (admin URL);
else one is started under a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import Checkpoint, sign_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
ORIGIN = "gputrace.example/ledger"
PROGRAM = "KR-AI-260K"
STAGES = ("requested", "quoted", "awarded", "cleared", "in_transit", "received", "installed", "accepted")
PARTNERS = ("msit", "samsung-electronics", "sk-group", "hyundai-motor-group", "naver-cloud")

# --- bulk load ---------------------------------------------------------------------------------


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def create_database(admin_url: str) -> str:
    name = f"gt_bench_api_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    return f"{libpq(admin_url).rpartition('/')[0]}/{name}"


def drop_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def create_tables(url: str) -> None:
    from services.ledger.log import LOG_TABLES
    from services.ledger.projections import PROJECTION_TABLES
    from shared.runtime.db import create_tables as create
    from shared.runtime.db import make_engine

    async def run() -> None:
        engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            await create(engine, [*LOG_TABLES, *PROJECTION_TABLES])  # type: ignore[list-item]
        finally:
            await engine.dispose()

    asyncio.run(run())


@dataclass
class Loaded:
    log_size: int
    leaf_hashes: list[bytes]  # a sample, for lookups by hash
    batch_ids: list[str]
    pledge_ids: list[str]
    seconds: float


def _batch_state(i: int, status: str) -> dict[str, Any]:
    units = 10_000
    money = {"amount": "66900000", "currency": "KRW"}
    quotes = {
        f"Q-{i}-{v}": {"quote_id": f"Q-{i}-{v}", "vendor_id": v, "unit_price": money, "status": "valid"}
        for v in ("nvidia-partner-kr", "dell-korea", "supermicro-apac")
    }
    state: dict[str, Any] = {
        "batch": {"batch_id": f"B-{i:06d}", "program_id": PROGRAM, "model": "GB200", "quantity": units},
        "quotes": quotes,
    }
    if STAGES.index(status) >= STAGES.index("awarded"):
        # Every field an award's facts carry (the API's response model checks them all).
        total = {"amount": str(66_900_000 * units), "currency": "KRW"}
        state["award"] = {
            "batch_id": f"B-{i:06d}",
            "quote_id": f"Q-{i}-nvidia-partner-kr",
            "vendor_id": "nvidia-partner-kr",
            "program_id": PROGRAM,
            "site_id": "KR-NCC-01",
            "model": "GB200",
            "quantity": units,
            "unit_price": money,
            "total_price": total,
            "origin_country": "US",
            "route": ["US", "KR"],
            "consignee": {"name": "National AI Computing Centre", "country": "KR", "address": "Sejong"},
            "end_user": {
                "name": "National AI Computing Centre",
                "country": "KR",
                "address": None,
                "headquarters_country": "KR",
            },
            "awarded_at": "2025-11-10T09:00:00+09:00",
            "lead_time_days": 60,
            "funding": {
                "currency": "KRW",
                "required": total["amount"],
                "earmarked": total["amount"],
                "shortfall": "0",
                "pledges": [],
            },
            "leaf_index": i,
        }
    if STAGES.index(status) >= STAGES.index("cleared"):
        state["export"] = {"status": "cleared", "outcome": "cleared", "rule_version": "post-rescission-2025-05#1"}
    if STAGES.index(status) >= STAGES.index("in_transit"):
        state["delivery"] = {"dispatched": units, "received": units, "installed": units, "accepted": units}
    return state


def load(url: str, log_size: int, pledges: int, batches: int, key: Ed25519PrivateKey) -> Loaded:
    """The log (entries, nodes, head, checkpoint) and the views, by COPY; then the running totals."""
    started = time.monotonic()
    frontier = merkle.Frontier()
    sample: list[bytes] = []
    now = datetime.now(UTC)
    # Two connections: one COPY at a time per connection, and entries and nodes are written together.
    with psycopg.connect(url) as conn, psycopg.connect(url) as conn2, conn.cursor() as cur, conn2.cursor() as cur2:
        cols = "leaf_index, decision_id, entry, leaf_hash, service, event_type, status, batch_id, party_id, appended_at"
        with (
            cur.copy(f"COPY log_entries ({cols}) FROM STDIN") as entries,
            cur2.copy("COPY log_nodes (level, idx, hash) FROM STDIN") as nodes,
        ):
            for i in range(log_size):
                batch = f"B-{i % max(batches, 1):06d}"
                body = json.dumps(
                    {"decision_id": f"d{i}", "batch_id": batch, "service": "deliveries", "status": "accepted"},
                    separators=(",", ":"),
                    sort_keys=True,
                ).encode()
                leaf = merkle.leaf_hash(body)
                if i % 997 == 0:
                    sample.append(leaf)
                for level, idx, h in frontier.append(leaf):
                    nodes.write_row((level, idx, h))
                entries.write_row(
                    (i, f"d{i}", body.decode(), leaf, "deliveries", "gputrace.x.v1", "accepted", batch, "msit", now)
                )
        root = frontier.root()
        note = sign_checkpoint(Checkpoint(origin=ORIGIN, size=log_size, root_hash=root), ORIGIN, key)
        cur.execute("INSERT INTO log_head (id, size) VALUES (1, %s)", (log_size,))
        cur.execute(
            "INSERT INTO log_checkpoints (size, root_hash, note, signed_at) VALUES (%s, %s, %s, %s)",
            (log_size, root, note, now),
        )
        batch_ids = [f"B-{i:06d}" for i in range(batches)]
        with cur.copy(
            "COPY view_batches (batch_id, program_id, model, vendor_id, status, anomalies, last_leaf_index, state) "
            "FROM STDIN"
        ) as copy:
            for i, b in enumerate(batch_ids):
                status = STAGES[i % len(STAGES)]
                state = _batch_state(i, status)
                vendor = "nvidia-partner-kr" if "award" in state else None
                copy.write_row((b, PROGRAM, "GB200", vendor, status, 0, i, json.dumps(state)))
        with cur.copy("COPY view_batch_parties (batch_id, party_id) FROM STDIN") as copy:
            for i, b in enumerate(batch_ids):
                copy.write_row((b, PARTNERS[i % len(PARTNERS)]))
        with cur.copy("COPY view_batch_steps (leaf_index, batch_id, step) FROM STDIN") as copy:
            # A timeline of a dozen decisions per batch (request, quotes, award, export, deliveries).
            for leaf in range(min(log_size, batches * 12)):
                b = batch_ids[leaf % batches]
                step = {
                    "leaf_index": leaf,
                    "decided_at": now.isoformat(),
                    "service": "deliveries",
                    "event_type": "gputrace.shipment.dispatched.v1",
                    "status": "accepted",
                    "reason_code": None,
                    "message": "1000 serials dispatched",
                    "party_id": "korea-logistics",
                    "event_id": str(uuid.UUID(int=leaf)),
                    "anomalies": [],
                }
                copy.write_row((leaf, b, json.dumps(step)))
        pledge_ids = [f"PL-{i:07d}" for i in range(pledges)]
        with cur.copy(
            "COPY view_pledges (pledge_id, partner_id, program_id, earmark_batch_id, version, state, leaf_index) "
            "FROM STDIN"
        ) as copy:
            for i, p in enumerate(pledge_ids):
                partner = PARTNERS[i % len(PARTNERS)]
                batch = batch_ids[i % batches] if batches else None
                facts = {
                    "pledge_id": p,
                    "partner_id": partner,
                    "program_id": PROGRAM,
                    "kind": "gpus" if i % 2 else "capital",
                    "capital": None if i % 2 else {"amount": "720000000000", "currency": "KRW"},
                    "gpus": {"model": "GB200", "quantity": 100} if i % 2 else None,
                    "capacity": None,
                    "earmark_batch_id": None if i % 2 else batch,
                    "committed_at": "2025-11-03T09:00:00+09:00",
                    "due_by": "2026-12-31",
                    "status": "withdrawn" if i % 50 == 0 else "active",
                    "disbursed": None,
                    "version": 1,
                }
                copy.write_row((p, partner, PROGRAM, facts["earmark_batch_id"], 1, json.dumps(facts), i))
        with cur.copy(
            "COPY view_anomalies (leaf_index, batch_id, code, severity, message, service, party_id, decision_id, "
            "decided_at, details) FROM STDIN"
        ) as copy:
            for i in range(batches):
                code = "DAMAGED_IN_TRANSIT" if i % 2 else "ACCEPTANCE_FAILED"
                copy.write_row((i, batch_ids[i], code, "high", "m", "deliveries", "msit", f"d{i}", now, "{}"))
        conn2.commit()
        conn.commit()
    _fill_totals(url)
    return Loaded(log_size, sample, batch_ids, pledge_ids, time.monotonic() - started)


def loaded_from(url: str) -> Loaded:
    """What `load` returns, read back from a database it filled earlier (--database)."""
    with psycopg.connect(url) as conn:
        size = conn.execute("SELECT size FROM log_head WHERE id = 1").fetchone()[0]  # type: ignore[index]
        hashes = [bytes(h) for (h,) in conn.execute("SELECT leaf_hash FROM log_entries WHERE leaf_index % 997 = 0")]
        batches = [b for (b,) in conn.execute("SELECT batch_id FROM view_batches ORDER BY batch_id")]
        pledges = [p for (p,) in conn.execute("SELECT pledge_id FROM view_pledges ORDER BY pledge_id")]
    return Loaded(size, hashes, batches, pledges, 0.0)


def _fill_totals(url: str) -> None:
    """The running totals from the loaded views (as the ledger's start-up backfill does)."""
    from services.ledger.projections import backfill
    from shared.runtime.db import make_engine, session_factory

    async def run() -> None:
        engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            async with session_factory(engine)() as session, session.begin():
                await backfill(session)
        finally:
            await engine.dispose()

    asyncio.run(run())


# --- the server ----------------------------------------------------------------------------------


def bench_app() -> Any:
    """The ledger app without Kafka (env: its settings); uvicorn's factory, once per worker."""
    from services.ledger.main import create_app
    from shared.runtime.settings import Settings

    app = create_app(Settings(), consume=False)
    service = app.state.service

    async def start() -> None:  # tables exist; no topics, no outbox relay: nothing is published
        return None

    async def stop() -> None:
        await service.engine.dispose()

    service.start_dependencies = start
    service.stop_dependencies = stop
    return app


def serve() -> None:
    """`python -m tests.benchmarks.bench_api serve`: bench_app under uvicorn, BENCH_WORKERS processes."""
    import uvicorn

    from shared.runtime.settings import Settings

    uvicorn.run(
        "tests.benchmarks.bench_api:bench_app",
        factory=True,
        workers=int(os.environ.get("BENCH_WORKERS", "1")),
        host="127.0.0.1",
        port=Settings().http_port,
        # INFO for uvicorn's own lines (no access log): ledger_server counts "Application startup
        # complete", one per worker.
        log_level="info",
        access_log=False,
    )


@contextmanager
def ledger_server(
    url: str, work: Path, pool: int, workers: int = 1
) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    from services.ledger.auth import write_dev_tokens
    from shared.contract.parties import write_private_key
    from tools.devkeys import DEV_PARTIES, generate_dev_registry
    from tools.devstack import free_port

    keys = work / "keys"
    generate_dev_registry(keys)
    if not (keys / "ledger.key").exists():
        write_private_key(keys / "ledger.key", Ed25519PrivateKey.generate())
    tokens = write_dev_tokens(keys / "tokens.json", [p for p, _, _ in DEV_PARTIES])
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "PARTY_REGISTRY": str(keys / "registry.json"),
        "LEDGER_SIGNING_KEY": str(keys / "ledger.key"),
        "API_TOKENS": str(keys / "tokens.json"),
        "VAR_DIR": str(work / "var"),
        "HTTP_PORT": str(port),
        "API_DB_POOL_SIZE": str(pool),
        "LOG_LEVEL": "WARNING",
        "BENCH_WORKERS": str(workers),
    }
    log = (work / "ledger.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.bench_api", "serve"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            # Every worker started: a worker's start-up DDL (the log's guards) takes exclusive locks
            # that deadlock with another worker's reads, so nothing is measured before the last.
            started = (work / "ledger.log").read_text(errors="replace").count("Application startup complete")
            try:
                if started >= workers and httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the ledger did not start: {(work / 'ledger.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield base, tokens["auditor"], proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# --- measuring -----------------------------------------------------------------------------------


def stats(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "rps": round(len(latencies) / seconds, 1) if seconds else None,
    }


async def measure(
    client: httpx.AsyncClient, path: Callable[[random.Random], str], requests: int, clients: int, warmup: int
) -> dict[str, Any]:
    latencies, errors, statuses, seconds = await _measure(client, path, requests, clients, warmup, 0)
    result = stats(latencies, errors, seconds)
    if errors:
        result["statuses"] = statuses
    return result


async def _measure(
    client: httpx.AsyncClient,
    path: Callable[[random.Random], str],
    requests: int,
    clients: int,
    warmup: int,
    seed: int,
) -> tuple[list[float], int, dict[int, int], float]:
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    queue = iter(range(warmup + requests))

    async def worker(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        for n in queue:
            url = path(rng)
            t0 = time.perf_counter()
            try:
                r = await client.get(url)
                code = r.status_code
            except httpx.HTTPError:
                code = 0
            elapsed = time.perf_counter() - t0
            if n < warmup:
                continue
            statuses[code] = statuses.get(code, 0) + 1
            if code != 200:
                errors += 1
            latencies.append(elapsed)

    started = time.perf_counter()
    await asyncio.gather(*(worker(seed * 1000 + i) for i in range(clients)))
    return latencies, errors, statuses, time.perf_counter() - started


def measure_stdlib(
    base: str, token: str, path: Callable[[random.Random], str], requests: int, warmup: int
) -> dict[str, Any]:
    """One client, one request after another, with the standard library's HTTP/1.1 client on one
    kept-alive connection: httpx costs its caller ~1 ms a request on this machine (its own /healthz
    p50 was 1.55 ms against 0.37 ms here), which is the client's time, not the server's."""
    host, _, port = base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(0)
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    try:
        for n in range(warmup + requests):
            url = path(rng)
            t0 = time.perf_counter()
            try:
                conn.request("GET", url, headers=headers)
                response = conn.getresponse()
                response.read()
                code = response.status
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects on the next request
                code = 0
            elapsed = time.perf_counter() - t0
            if n >= warmup:
                latencies.append(elapsed)
                errors += code != 200
    finally:
        conn.close()
    return stats(latencies, errors, time.perf_counter() - started)


def _client_process(
    base: str, token: str, loaded: Loaded, name: str, requests: int, clients: int, warmup: int, seed: int
) -> tuple[list[float], int, dict[int, int], float]:
    """One client process's share of an endpoint's requests (its own event loop and connections)."""

    async def run() -> tuple[list[float], int, dict[int, int], float]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:
            return await _measure(client, endpoints(loaded)[name], requests, clients, warmup, seed)

    return asyncio.run(run())


def measure_in_processes(
    pool: ProcessPoolExecutor, base: str, token: str, loaded: Loaded, name: str, opts: argparse.Namespace
) -> dict[str, Any]:
    """`opts.clients` concurrent clients spread over `opts.client_procs` processes: one Python
    process cannot drive 50 clients fast enough to load the server (httpx costs ~1 ms a request)."""
    procs = opts.client_procs
    per = [opts.clients // procs + (i < opts.clients % procs) for i in range(procs)]
    share = [opts.requests // procs + (i < opts.requests % procs) for i in range(procs)]
    futures = [
        pool.submit(_client_process, base, token, loaded, name, share[i], per[i], opts.warmup // procs, i)
        for i in range(procs)
        if per[i]
    ]
    latencies: list[float] = []
    errors, statuses, seconds = 0, {}, 0.0
    for f in futures:
        lat, err, st, sec = f.result()
        latencies += lat
        errors += err
        seconds = max(seconds, sec)
        for code, n in st.items():
            statuses[code] = statuses.get(code, 0) + n
    result = stats(latencies, errors, seconds)
    if errors:
        result["statuses"] = statuses
    return result


async def _measure_scheduled(
    client: httpx.AsyncClient,
    path: Callable[[random.Random], str],
    total: int,
    warmup: int,
    rate: float,
    clients: int,
    mine: list[int],
    start_wall: float,
) -> tuple[list[float], int, dict[int, int], float]:
    """Load on a fixed schedule (open loop): request n of the endpoint's `total` is due at
    start + n / rate, and belongs to client n % clients; each of `mine` (this process's clients)
    sends its requests one after another, each at its due time or as soon as its previous answer
    came if that was late. Latency runs from the DUE time, so a stall delays every request due
    during it and shows in the figures (a closed loop would just send fewer)."""
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    # time.time() is shared by the client processes; perf_counter is this process's own.
    start = time.perf_counter() + (start_wall - time.time())

    async def one_client(g: int) -> None:
        nonlocal errors
        rng = random.Random(g)
        for n in range(g, total, clients):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                code = (await client.get(path(rng))).status_code
            except httpx.HTTPError:
                code = 0
            if n < warmup:
                continue
            latencies.append(time.perf_counter() - due)
            statuses[code] = statuses.get(code, 0) + 1
            errors += code != 200

    await asyncio.gather(*(one_client(g) for g in mine))
    return latencies, errors, statuses, time.perf_counter() - start


def _scheduled_process(
    base: str, token: str, loaded: Loaded, name: str, opts: argparse.Namespace, mine: list[int], start_wall: float
) -> tuple[list[float], int, dict[int, int], float]:
    async def run() -> tuple[list[float], int, dict[int, int], float]:
        limits = httpx.Limits(max_connections=len(mine), max_keepalive_connections=len(mine))
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:
            # One connection per client opened before the schedule starts, as long-lived clients hold.
            await asyncio.gather(*(client.get("/healthz") for _ in mine))
            total = opts.warmup + opts.requests
            return await _measure_scheduled(
                client, endpoints(loaded)[name], total, opts.warmup, opts.rate, opts.clients, mine, start_wall
            )

    return asyncio.run(run())


def measure_scheduled(
    pool: ProcessPoolExecutor, base: str, token: str, loaded: Loaded, name: str, opts: argparse.Namespace
) -> dict[str, Any]:
    """`opts.clients` clients on a fixed schedule, `opts.rate` requests/s in total, spread over the
    client processes; all start at the same wall-clock instant."""
    procs = min(opts.client_procs, opts.clients)
    start_wall = time.time() + 0.5  # time for the (running) processes to connect
    futures = [
        pool.submit(
            _scheduled_process, base, token, loaded, name, opts, list(range(i, opts.clients, procs)), start_wall
        )
        for i in range(procs)
    ]
    latencies: list[float] = []
    errors, statuses, seconds = 0, {}, 0.0
    for f in futures:
        lat, err, st, sec = f.result()
        latencies += lat
        errors += err
        seconds = max(seconds, sec)
        for code, n in st.items():
            statuses[code] = statuses.get(code, 0) + n
    result = stats(latencies, errors, seconds)
    result["rps"] = round((opts.requests + opts.warmup) / seconds, 1) if seconds else None  # warm-up included
    if errors:
        result["statuses"] = statuses
    return result


def endpoints(loaded: Loaded) -> dict[str, Callable[[random.Random], str]]:
    n = loaded.log_size
    batches, pledges, hashes = loaded.batch_ids, loaded.pledge_ids, loaded.leaf_hashes

    def by_hash(rng: random.Random) -> str:
        h = base64.b64encode(rng.choice(hashes)).decode()
        return f"/v1/log/proof/inclusion?leaf_hash={httpx.QueryParams({'x': h})['x'].replace('+', '%2B')}"

    return {
        "/healthz": lambda rng: "/healthz",
        "/v1/program": lambda rng: "/v1/program",
        "/v1/program?program_id": lambda rng: f"/v1/program?program_id={PROGRAM}",
        "/v1/batches (page)": lambda rng: f"/v1/batches?limit=50&offset={rng.randrange(max(len(batches) - 50, 1))}",
        "/v1/batches?status": lambda rng: f"/v1/batches?status={rng.choice(STAGES)}&limit=50",
        "/v1/batches?partner": lambda rng: f"/v1/batches?partner={rng.choice(PARTNERS)}&limit=50",
        "/v1/batches/{id}": lambda rng: f"/v1/batches/{rng.choice(batches)}",
        "/v1/pledges/{id}": lambda rng: f"/v1/pledges/{rng.choice(pledges)}",
        "/v1/anomalies": lambda rng: "/v1/anomalies?limit=200",
        "/v1/log/checkpoint": lambda rng: "/v1/log/checkpoint",
        "/v1/log/entries (100)": lambda rng: f"/v1/log/entries?start={(s := rng.randrange(n - 100))}&end={s + 100}",
        "inclusion proof (index)": lambda rng: f"/v1/log/proof/inclusion?leaf_index={rng.randrange(n)}&tree_size={n}",
        "inclusion proof (hash)": by_hash,
        "consistency proof": lambda rng: f"/v1/log/proof/consistency?first={rng.randrange(1, n)}&second={n}",
    }


PROOFS = ("inclusion proof (index)", "inclusion proof (hash)", "consistency proof")


def server_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the server and its worker processes so far: what a request
    costs the server, which the machine's load does not inflate as it does latency."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


async def run_clients(
    base: str, token: str, loaded: Loaded, opts: argparse.Namespace, server_pid: int | None = None
) -> dict[str, Any]:
    paths = endpoints(loaded)
    if opts.only:
        paths = {k: v for k, v in paths.items() if opts.only in k or k == "/healthz"}
    limits = httpx.Limits(max_connections=opts.clients, max_keepalive_connections=opts.clients)
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {"concurrent": {}, "scheduled": {}, "sequential": {}, "sequential_stdlib": {}}
    with ProcessPoolExecutor(opts.client_procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name in paths:
            cpu = server_cpu_seconds(server_pid) if server_pid else 0.0
            out["concurrent"][name] = measure_in_processes(pool, base, token, loaded, name, opts)
            if server_pid:
                # Warm-up requests included: the server cannot tell them apart.
                served = opts.requests + (opts.warmup // opts.client_procs) * opts.client_procs
                cpu_ms = (server_cpu_seconds(server_pid) - cpu) * 1000 / served
                out["concurrent"][name]["server_cpu_ms"] = round(cpu_ms, 3)
            print(f"  {opts.clients} clients  {name:<28} {out['concurrent'][name]}", flush=True)
        if opts.rate:
            for name in paths:
                cpu = server_cpu_seconds(server_pid) if server_pid else 0.0
                out["scheduled"][name] = measure_scheduled(pool, base, token, loaded, name, opts)
                if server_pid:
                    # Warm-up requests and one /healthz per client (its connection) included.
                    served = opts.requests + opts.warmup + opts.clients
                    cpu_ms = (server_cpu_seconds(server_pid) - cpu) * 1000 / served
                    out["scheduled"][name]["server_cpu_ms"] = round(cpu_ms, 3)
                print(f"  {opts.rate:g} req/s    {name:<28} {out['scheduled'][name]}", flush=True)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:
        # Proofs also one at a time: their own latency, without 49 other requests queued ahead.
        for name in ("/healthz", *(p for p in PROOFS if p in paths)):
            out["sequential"][name] = await measure(client, paths[name], opts.requests, 1, opts.warmup)
            print(f"  1 client    {name:<28} {out['sequential'][name]}", flush=True)
    for name in ("/healthz", *(p for p in PROOFS if p in paths)):
        out["sequential_stdlib"][name] = await asyncio.to_thread(
            measure_stdlib, base, token, paths[name], opts.requests, opts.warmup
        )
        print(f"  1 client (http.client)  {name:<28} {out['sequential_stdlib'][name]}", flush=True)
    return out


# --- report --------------------------------------------------------------------------------------


def _table(results: dict[str, Any], cpu: bool) -> list[str]:
    health = results.get("/healthz", {}).get("p99_ms")
    lines = [
        "| endpoint | p50 ms | p95 ms | p99 ms | p99 / healthz p99 | errors | req/s |"
        + (" server CPU ms/req |" if cpu else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else ""),
    ]
    for name, r in results.items():
        ratio = f"{r['p99_ms'] / health:.2f}" if health else ""
        lines.append(
            f"| {name} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {ratio} | {r['errors']} | {r['rps']} |"
            + (f" {r.get('server_cpu_ms', '')} |" if cpu else "")
        )
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def write_results(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "api.json").write_text(json.dumps(report, indent=2) + "\n")
    results = report["results"]
    conc, seq = results["concurrent"], results["sequential"]
    sched, stdlib = results.get("scheduled", {}), results.get("sequential_stdlib", {})
    seconds = report["load_seconds"]
    loaded_how = f"bulk-loaded in {seconds:.0f} s" if seconds else "bulk-loaded by an earlier --keep run"
    clients, rate = report["clients"], report.get("rate")
    lines = [
        f"# Auditor API at {clients} concurrent clients ({report['started']})",
        "",
        f"Ledger: {report['log_entries']:,} log entries, {report['pledges']:,} pledges, {report['batches']:,} "
        f"batches ({loaded_how}; no ANALYZE). Server: the ledger app, {report.get('workers', 1)} uvicorn "
        f"process(es), API pool {report['api_pool']} each; clients: httpx in {report['client_procs']} processes, "
        f"{report['requests']} requests per endpoint "
        f"after {report['warmup']} warm-up. Machine: {report['machine']}, load average {report['load_average']} "
        "(shared with other jobs).",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    if sched:
        lines += [
            f"## {clients} clients on a fixed schedule, {rate:g} requests/s in total",
            "",
            f"Each client sends every {clients / rate:g} s (staggered), whatever the answers; latency is counted from "
            "each request's scheduled send time, so a stall delays every request due during it and shows here. "
            "The target is judged on this run.",
            "",
            *_table(sched, cpu=True),
            "",
        ]
    lines += [
        f"## {clients} clients in a closed loop (saturation)",
        "",
        f"Each client sends its next request as soon as its previous one is answered, as fast as the server "
        f"goes: req/s is the server's maximum throughput, and latency is {clients} requests queued in turn "
        "(Little's law), /healthz's included.",
        "",
        *_table(conc, cpu=True),
        "",
        f"## Proofs over HTTP at {report['log_entries']:,} entries, one client (sequential)",
        "",
        "| request | httpx p50 ms | httpx p95 ms | httpx p99 ms | http.client p50 ms | http.client p95 ms "
        "| http.client p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in seq.items():
        b = stdlib.get(name, {})
        lines.append(
            f"| {name} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {b.get('p50_ms', '')} | {b.get('p95_ms', '')} "
            f"| {b.get('p99_ms', '')} | {r['errors'] + b.get('errors', 0)} |"
        )
    lines += [
        "",
        "httpx costs its caller about 1 ms a request here (see /healthz in both columns); http.client is the "
        "standard library's HTTP/1.1 client on one kept-alive connection.",
        "",
    ]
    worst_sched = max((r["p99_ms"] for n, r in sched.items() if n != "/healthz"), default=None)
    worst_conc = max((r["p99_ms"] for n, r in conc.items() if n != "/healthz"), default=0)
    errors = sum(r["errors"] for part in (conc, sched) for r in part.values())
    proofs = max((seq[n]["p99_ms"] for n in PROOFS if n in seq), default=0)
    proofs_stdlib = max((stdlib[n]["p99_ms"] for n in PROOFS if n in stdlib), default=None)
    targets = []
    if worst_sched is not None:
        targets.append(
            f"API p99 < 100 ms at {clients} clients, judged on the fixed schedule ({rate:g} req/s in total): worst "
            f"{worst_sched} ms ({_verdict(worst_sched < 100)})"
        )
    targets.append(
        f"closed loop at {clients} clients (saturation, not the target's load): worst p99 {worst_conc} ms, "
        f"/healthz's {conc.get('/healthz', {}).get('p99_ms')} ms"
    )
    targets.append(f"0 errors: {errors} ({_verdict(not errors)})")
    if proofs_stdlib is not None:
        targets.append(
            f"proofs p99 < 5 ms over HTTP (one client): worst {proofs_stdlib} ms with http.client "
            f"({_verdict(proofs_stdlib < 5)}), {proofs} ms with httpx ({_verdict(proofs < 5)})"
        )
    else:
        targets.append(f"proofs p99 < 5 ms (one client, httpx): worst {proofs} ms ({_verdict(proofs < 5)})")
    lines += ["Targets: " + "; ".join(targets) + ".", ""]
    (out / "api.md").write_text("\n".join(lines))


def measure_server(url: str, work: Path, loaded: Loaded, opts: argparse.Namespace) -> dict[str, Any]:
    with ledger_server(url, work, opts.api_pool, opts.workers) as (base, token, server):
        spy = None
        if opts.py_spy:
            # Where the server's time goes, sampled over the whole run (collapsed stacks).
            spy_bin = str(Path(sys.executable).parent / "py-spy")
            spy_args = ["record", "--pid", str(server.pid), "--subprocesses", "--format", "raw", "--rate", "200"]
            spy = subprocess.Popen(
                [spy_bin, *spy_args, "-o", str(opts.py_spy)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        try:
            return asyncio.run(run_clients(base, token, loaded, opts, server.pid))
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)


def load_and_measure(work: Path, opts: argparse.Namespace) -> tuple[Loaded, dict[str, Any]]:
    from shared.contract.parties import write_private_key
    from tests.infra import LocalPostgres

    admin = os.environ.get("DATABASE_URL")
    pg = None
    if not admin:
        # Its own temp dir, not under `work`: as root the cluster runs as postgres, which cannot enter it.
        pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="gputrace-bench-api-pg-"))).start()
        admin = pg.url
    try:
        url = create_database(admin)
        try:
            create_tables(url)
            key = Ed25519PrivateKey.generate()
            (work / "keys").mkdir(parents=True, exist_ok=True)
            write_private_key(work / "keys" / "ledger.key", key)
            sizes = f"{opts.log_entries:,} entries, {opts.pledges:,} pledges, {opts.batches:,} batches"
            print(f"loading {sizes}", flush=True)
            loaded = load(url, opts.log_entries, opts.pledges, opts.batches, key)
            print(f"loaded in {loaded.seconds:.1f} s", flush=True)
            return loaded, measure_server(url, work, loaded, opts)
        finally:
            if opts.keep:
                print(f"kept: --database {url}", flush=True)
            else:
                drop_database(admin, url)
    finally:
        if pg is not None and not opts.keep:
            pg.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-entries", type=int, default=1_000_000)
    ap.add_argument("--pledges", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--client-procs", type=int, default=4, help="processes the clients are spread over")
    ap.add_argument("--requests", type=int, default=2000, help="per endpoint, after the warm-up")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--api-pool", type=int, default=20, help="per worker")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes serving the ledger")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the database")
    ap.add_argument("--database", help="a database an earlier --keep run loaded (libpq URL): measure only")
    ap.add_argument("--py-spy", type=Path, help="profile the server with py-spy into this file (collapsed stacks)")
    ap.add_argument("--only", help="measure only the endpoints whose name contains this")
    ap.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="the fixed-schedule run's requests/s in total over --clients (0: skip it); 100 is about a "
        "quarter of /healthz's closed-loop maximum here, and below every endpoint's",
    )
    opts = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gputrace-bench-api-"))
    if opts.database:
        loaded = loaded_from(opts.database)
        print(f"measuring an existing ledger of {loaded.log_size:,} entries", flush=True)
        results = measure_server(opts.database, work, loaded, opts)
    else:
        loaded, results = load_and_measure(work, opts)
    report = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m tests.benchmarks.bench_api " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "log_entries": loaded.log_size,
        "pledges": len(loaded.pledge_ids),
        "batches": len(loaded.batch_ids),
        "clients": opts.clients,
        "rate": opts.rate,
        "requests": opts.requests,
        "warmup": opts.warmup,
        "api_pool": opts.api_pool,
        "workers": opts.workers,
        "client_procs": opts.client_procs,
        "load_average": os.getloadavg(),
        "load_seconds": loaded.seconds,
        "results": results,
    }
    write_results(report, opts.out)
    print((opts.out / "api.md").read_text())
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    else:
        main()
