"""gputrace against a fair hand-written baseline on the same Kafka and PostgreSQL, in one run.

    .venv/bin/python -m tests.benchmarks.bench_pipeline --events 4000          # make bench

Signed pledge events go through gputrace (pledges service -> decisions -> ledger's log) and
through the fair baseline (tests/benchmarks/baseline.py: the same essential work per event, two
processes), interleaved: a warm-up, then ROUNDS rounds of EVENTS events published as fast as
possible (throughput; CPU per event per process from /proc via psutil), then a load on a fixed
schedule at 25/50/75/90 % of each one's sustained maximum (end-to-end latency publish -> outcome,
measured from each event's scheduled send time, so a stall is never hidden). Raw aiokafka and
raw PostgreSQL are kept as reference figures. Every event is counted once, by its id.

Results: bench/results/pipeline.{json,md,png} (or --out). Uses KAFKA_BOOTSTRAP_SERVERS /
DATABASE_URL when set, else starts the local Kafka and PostgreSQL. Figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
import rfc8785
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.contract import OUTCOMES_TOPIC, PLEDGES_TOPIC
from shared.runtime.topics import ensure_topics
from tests.benchmarks import baseline
from tests.infra import kafka_and_postgres
from tools.devstack import Stack

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
LEVELS = (25, 50, 75, 90)
# The gputrace processes that do this work (quotes reads every pledge decision too).
GPUTRACE_CORE = ("pledges", "ledger")

Record = tuple[bytes, bytes, list[tuple[str, bytes]], str]


@dataclass
class Options:
    events: int = 4000
    warmup: int = 500
    rounds: int = 3
    level_seconds: float = 6.0
    levels: tuple[int, ...] = LEVELS
    out: Path = RESULTS
    timeout: float = 300.0
    # py-spy profiles (collapsed stacks) of every process during the rounds, written here.
    profile: Path | None = None


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def pledge(i: int, prefix: str) -> dict[str, Any]:
    return {
        "pledge_id": f"{prefix}{i}",
        "partner_id": "kdb",
        "program_id": "bench",
        "kind": "capital",
        "capital": {"amount": "1000", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


def sign_pledges(key: Ed25519PrivateKey, n: int, prefix: str) -> list[Record]:
    """Signed pledge.committed events as the partner contract has them (binary mode)."""
    out = []
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    for i in range(n):
        data = pledge(i, prefix)
        event_id = str(uuid.uuid4())
        attrs = {
            "specversion": "1.0",
            "id": event_id,
            "source": "urn:gputrace:party:kdb",
            "type": "gputrace.pledge.committed.v1",
            "time": stamp,
            "subject": data["pledge_id"],
            "datacontenttype": "application/json",
        }
        signature = base64.b64encode(key.sign(rfc8785.dumps({**attrs, "data": data}))).decode()
        headers = [(f"ce_{k}", v.encode()) for k, v in attrs.items() if k != "datacontenttype"]
        headers += [("content-type", b"application/json"), ("ce_signature", signature.encode())]
        out.append((data["pledge_id"].encode(), json.dumps(data).encode(), headers, event_id))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    p = np.percentile(np.array(values), [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


class Outcomes:
    """Reads an outcomes topic from its end and notes when each expected event's outcome arrives
    (first arrival only; later ones are counted as duplicates)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._bootstrap, self._topic = bootstrap, topic
        self.expected: set[str] = set()
        self.arrived: dict[str, float] = {}
        self.duplicates = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Made here: an aiokafka client belongs to the loop that runs it.
        self._consumer = AIOKafkaConsumer(
            self._topic, bootstrap_servers=self._bootstrap, auto_offset_reset="latest", isolation_level="read_committed"
        )
        await self._consumer.start()
        await self._consumer.seek_to_end()
        # Positions are resolved lazily; pin them now so nothing published from here is missed.
        for tp in self._consumer.assignment():
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            polled = await self._consumer.getmany(timeout_ms=200, max_records=2000)
            now = time.perf_counter()
            for records in polled.values():
                for record in records:
                    event_id = json.loads(record.value).get("event_id")
                    if event_id not in self.expected:
                        continue
                    if event_id in self.arrived:
                        self.duplicates += 1
                    else:
                        self.arrived[event_id] = now

    def expect(self, ids: list[str]) -> None:
        self.expected.update(ids)

    async def wait(self, ids: list[str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while any(i not in self.arrived for i in ids):
            if time.monotonic() > deadline:
                missing = sum(1 for i in ids if i not in self.arrived)
                raise TimeoutError(f"{missing} of {len(ids)} outcomes missing after {timeout}s")
            await asyncio.sleep(0.02)
        return max(self.arrived[i] for i in ids)


@dataclass
class System:
    name: str
    in_topic: str
    outcomes: Outcomes
    ledger_count: Callable[[str], int]
    processes: dict[str, int]  # name -> pid
    rounds: list[dict[str, Any]] = field(default_factory=list)
    levels: list[dict[str, Any]] = field(default_factory=list)
    # The Kafka broker and PostgreSQL both systems share (name -> pid; empty when external): the
    # rounds run one system at a time, so what they spend during a system's round is that system's.
    shared: dict[str, int] = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        times = {}
        for name, pid in self.processes.items():
            t = psutil.Process(pid).cpu_times()
            times[name] = t.user + t.system
        return times

    def shared_cpu(self) -> dict[str, float]:
        return {name: tree_cpu(pid) for name, pid in self.shared.items()}


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live children and the children it has reaped (PostgreSQL's
    backends come and go)."""
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


async def publish_all(producer: AIOKafkaProducer, topic: str, records: list[Record]) -> None:
    futures = [await producer.send(topic, v, key=k, headers=h) for k, v, h, _ in records]
    await asyncio.gather(*futures)


async def wait_ledger(system: System, prefix: str, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (got := await asyncio.to_thread(system.ledger_count, prefix)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{system.name}: {got} of {n} ledger entries after {timeout}s")
        await asyncio.sleep(0.05)
    if got != n:
        raise AssertionError(f"{system.name}: {got} ledger entries for {n} events")
    return time.perf_counter()


async def throughput_round(
    system: System, producer: AIOKafkaProducer, key: Ed25519PrivateKey, n: int, label: str, timeout: float
) -> dict[str, Any]:
    """N events as fast as possible: time to the last outcome and to the last ledger entry."""
    prefix = f"B{uuid.uuid4().hex[:8]}-"
    records = sign_pledges(key, n, prefix)
    ids = [r[3] for r in records]
    system.outcomes.expect(ids)
    dup0 = system.outcomes.duplicates
    cpu0, shared0 = system.cpu(), system.shared_cpu()
    t0 = time.perf_counter()
    await publish_all(producer, system.in_topic, records)
    try:
        outcome_t = await system.outcomes.wait(ids, timeout)
    except TimeoutError as exc:
        raise TimeoutError(f"{system.name} {label}: {exc}") from exc
    ledger_t = await wait_ledger(system, prefix, n, timeout)
    cpu1, shared1 = system.cpu(), system.shared_cpu()
    cpu_ms = {p: (cpu1[p] - cpu0[p]) * 1000 / n for p in cpu0}
    shared_ms = {p: (shared1[p] - shared0[p]) * 1000 / n for p in shared0}
    return {
        "label": label,
        "events": n,
        "outcomes_counted": sum(1 for i in ids if i in system.outcomes.arrived),
        "duplicates": system.outcomes.duplicates - dup0,
        "ledger_entries": n,
        "outcome_s": outcome_t - t0,
        "ledger_s": ledger_t - t0,
        "outcome_per_s": n / (outcome_t - t0),
        "end_to_end_per_s": n / (ledger_t - t0),
        "cpu_ms_per_event": cpu_ms,
        "shared_cpu_ms_per_event": shared_ms,
    }


async def latency_level(
    system: System, producer: AIOKafkaProducer, key: Ed25519PrivateKey, rate: float, seconds: float, timeout: float
) -> dict[str, Any]:
    """Events sent on a fixed schedule at `rate`; latency from each one's scheduled time."""
    n = max(5, int(rate * seconds))
    records = sign_pledges(key, n, f"L{uuid.uuid4().hex[:8]}-")
    ids = [r[3] for r in records]
    system.outcomes.expect(ids)
    futures = []
    t0 = time.perf_counter() + 0.05
    scheduled = [t0 + i / rate for i in range(n)]
    for (k, v, h, _), at in zip(records, scheduled, strict=True):
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        futures.append(await producer.send(system.in_topic, v, key=k, headers=h))
    await asyncio.gather(*futures)
    await system.outcomes.wait(ids, timeout)
    latencies = [(system.outcomes.arrived[i] - at) * 1000 for i, at in zip(ids, scheduled, strict=True)]
    return {"rate_per_s": rate, "events": n, **percentiles(latencies)}


# --- reference figures: raw aiokafka and raw PostgreSQL ---------------------------------------


async def raw_kafka(bootstrap: str, records: list[Record]) -> dict[str, float]:
    """The same records through a bare topic: produced, then consumed (JSON-parsed) with commits."""
    topic = f"bench-raw-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 3, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    t0 = time.perf_counter()
    await publish_all(producer, topic, records)
    produce_s = time.perf_counter() - t0
    await producer.stop()
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
            seen += len(recs)  # once per record, not once per partition
        if batch:
            await consumer.commit()
    consume_s = time.perf_counter() - t0
    await consumer.stop()
    if seen != len(records):
        raise AssertionError(f"raw consumer saw {seen} records of {len(records)}")
    n = len(records)
    return {"produce_per_s": n / produce_s, "consume_commit_per_s": n / consume_s}


def raw_postgres(url: str, n: int) -> dict[str, float]:
    """What the pledges side writes per event (state, processed, two outbox rows) as plain
    INSERTs, 500 events per transaction."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS raw_state, raw_seen, raw_outbox")
        conn.execute("CREATE TABLE raw_state (id text primary key, state text)")
        conn.execute("CREATE TABLE raw_seen (source text, id text, primary key (source, id))")
        conn.execute("CREATE TABLE raw_outbox (id bigserial primary key, topic text, value bytea)")
    t0 = time.perf_counter()
    with psycopg.connect(url) as conn:
        for start in range(0, n, 500):
            with conn.transaction(), conn.cursor() as cur:
                ids = [str(i) for i in range(start, min(n, start + 500))]
                cur.executemany("INSERT INTO raw_state VALUES (%s, %s)", [(i, "{}") for i in ids])
                cur.executemany("INSERT INTO raw_seen VALUES ('s', %s)", [(i,) for i in ids])
                cur.executemany(
                    "INSERT INTO raw_outbox (topic, value) VALUES ('t', %s)",
                    [(b"x" * 600,) for _ in ids for _ in (0, 1)],
                )
    return {"inserts_4_rows_per_event_per_s": n / (time.perf_counter() - t0)}


# --- the two systems --------------------------------------------------------------------------


class LedgerCount:
    """Counts a round's ledger entries (aggregate ids with the round's prefix), polled every 50 ms.
    One kept connection, and only the entries after the last finished count: a new connection and
    a scan of the whole log per poll cost the shared PostgreSQL more CPU than either system's
    appends did late in a run. Rounds are sequential, so every entry of a round comes after the
    last entry of the round before."""

    def __init__(self, url: str, table: str, position: str) -> None:
        self._url = libpq(url)
        self._conn: psycopg.Connection[Any] | None = None
        self._query = f"SELECT count(*), max({position}) FROM {table} WHERE {position} > %s AND aggregate_id LIKE %s"
        self._floor = -1
        self._prefix = ""
        self._last = -1

    def __call__(self, prefix: str) -> int:
        if self._conn is None:
            self._conn = psycopg.connect(self._url, autocommit=True)
        if prefix != self._prefix:
            self._prefix, self._floor = prefix, self._last
        row = self._conn.execute(self._query, (self._floor, f"{prefix}%")).fetchone()
        got = int(row[0]) if row else 0
        if row and row[1] is not None:
            self._last = max(self._last, int(row[1]))
        return got


def decisions_signed(registry: Path) -> bool:
    """Whether gputrace signs its decisions (its services have registry keys): the baseline then
    does the same work, signing each decision and verifying it at the ledger side."""
    doc = json.loads(registry.read_text())
    parties = doc.get("parties", []) if isinstance(doc, dict) else doc
    return any("service" in p.get("roles", []) for p in parties if isinstance(p, dict))


def start_baseline(
    bootstrap: str, admin_url: str, registry: Path, run: str, sign: bool, logs: Path
) -> tuple[System, list[subprocess.Popen[bytes]], str]:
    db = f"bench_base_{run}"
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = libpq(admin_url).rpartition("/")[0] + f"/{db}"
    baseline.prepare(url)
    topics = [f"bench-base-{run}-{t}" for t in ("in", "decisions", "outcomes")]

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        # As many partitions as gputrace's topics have (topics.py: 3).
        await admin.create_topics([NewTopic(t, 3, 1) for t in topics])
        await admin.close()

    asyncio.run(create())
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for role in ("decide", "append"):
        cmd = [sys.executable, "-m", "tests.benchmarks.baseline", role, "--bootstrap", bootstrap, "--db", url]
        cmd += ["--registry", str(registry), "--topics", ",".join(topics), "--seed", run]
        cmd += ["--sign-decisions"] if sign else []
        with (logs / f"baseline-{role}.log").open("ab") as log:
            procs[role] = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    system = System(
        "baseline",
        topics[0],
        Outcomes(bootstrap, topics[2]),
        LedgerCount(url, "base_log", "seq"),
        {f"baseline-{r}": p.pid for r, p in procs.items()},
    )
    return system, list(procs.values()), db


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


# --- the run ----------------------------------------------------------------------------------


async def interleaved(systems: list[System], step: Callable[[System], Awaitable[dict[str, Any]]], into: str) -> None:
    for system in systems:
        getattr(system, into).append(await step(system))


async def measure(bootstrap: str, systems: list[System], key: Ed25519PrivateKey, opts: Options) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    for s in systems:
        await s.outcomes.start()
    try:
        for s in systems:  # warm-up: connections, JIT-less caches, pools; not reported as a round
            await throughput_round(s, producer, key, opts.warmup, "warm-up", opts.timeout)
        spies = start_profiles(systems, opts.profile) if opts.profile else []
        for r in range(opts.rounds):
            for s in systems:
                s.rounds.append(await throughput_round(s, producer, key, opts.events, f"round {r + 1}", opts.timeout))
                print(f"  {s.name} round {r + 1}: {s.rounds[-1]['end_to_end_per_s']:,.0f} events/s", flush=True)
        stop_profiles(spies)
        for level in opts.levels:
            for s in systems:
                rate = sustained(s) * level / 100
                got = await latency_level(s, producer, key, rate, opts.level_seconds, opts.timeout)
                s.levels.append({"level_pct": level, **got})
                print(f"  {s.name} at {level}%: p50 {got['p50']:.0f} ms, p99 {got['p99']:.0f} ms", flush=True)
        # Every latency event's ledger entry too, so nothing is left in flight for the next run.
    finally:
        for s in systems:
            await s.outcomes.stop()
        await producer.stop()


def start_profiles(systems: list[System], out: Path) -> list[subprocess.Popen[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    return [
        subprocess.Popen(
            # Non-blocking: sampling must not pause the process (blocking py-spy halves its throughput).
            [str(spy), "record", "--nonblocking", "--pid", str(pid), "--format", "raw", *_spy_out(out, name)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for s in systems
        for name, pid in s.processes.items()
    ]


def _spy_out(out: Path, name: str) -> list[str]:
    return ["-o", str(out / f"{name}.txt"), "--rate", "100"]


def stop_profiles(spies: list[subprocess.Popen[bytes]]) -> None:
    for p in spies:
        p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for p in spies:
        p.wait(60)


def sustained(system: System) -> float:
    """The sustained maximum: the median end-to-end rate of the rounds (publish -> ledger entry);
    the median, so that one lucky or unlucky round on a shared machine does not set the levels."""
    return statistics.median(r["end_to_end_per_s"] for r in system.rounds)


def summarise(system: System) -> dict[str, Any]:
    cpu: dict[str, float] = {}
    for p in system.processes:
        cpu[p] = statistics.median(r["cpu_ms_per_event"][p] for r in system.rounds)
    shared = {p: statistics.median(r["shared_cpu_ms_per_event"][p] for r in system.rounds) for p in system.shared}
    rates = [r["end_to_end_per_s"] for r in system.rounds]
    return {
        "end_to_end_per_s": statistics.median(rates),
        "end_to_end_spread": [min(rates), max(rates)],
        "outcome_per_s": statistics.median(r["outcome_per_s"] for r in system.rounds),
        "cpu_ms_per_event": cpu,
        "cpu_ms_per_event_total": sum(cpu.values()),
        "shared_cpu_ms_per_event": shared,
        "cpu_ms_per_event_with_shared": sum(cpu.values()) + sum(shared.values()),
        "rounds": system.rounds,
        "latency": system.levels,
        "processes": list(system.processes),
    }


def run_bench(
    bootstrap: str, admin_url: str, stack: Stack, keys: Path, opts: Options, shared: dict[str, int] | None = None
) -> dict[str, Any]:
    """Both systems on the running stack's Kafka and PostgreSQL; returns the report (also written)."""
    run = uuid.uuid4().hex[:8]
    key = serialization.load_pem_private_key((keys / "kdb.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    asyncio.run(ensure_topics(bootstrap))
    signed = decisions_signed(keys / "registry.json")
    logs = Path(tempfile.gettempdir()) / f"gputrace-bench-{run}"
    base, procs, base_db = start_baseline(bootstrap, admin_url, keys / "registry.json", run, signed, logs)
    try:
        ours = System(
            "gputrace",
            PLEDGES_TOPIC,
            Outcomes(bootstrap, OUTCOMES_TOPIC),
            LedgerCount(stack.database_urls["ledger"], "log_entries", "leaf_index"),
            {n: p.proc.pid for n, p in stack.processes.items() if p.proc is not None},
            shared=dict(shared or {}),
        )
        base.shared = dict(shared or {})
        asyncio.run(measure(bootstrap, [ours, base], key, opts))
    finally:
        stop_processes(procs)
    refs_records = sign_pledges(key, opts.events, f"R{run}-")
    raw = asyncio.run(raw_kafka(bootstrap, refs_records))
    raw.update(raw_postgres(libpq(admin_url).rpartition("/")[0] + f"/{base_db}", opts.events))
    g, b = summarise(ours), summarise(base)
    g["cpu_ms_per_event_core"] = sum(g["cpu_ms_per_event"].get(p, 0.0) for p in GPUTRACE_CORE)
    report = {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "options": {**asdict(opts), "out": str(opts.out)},
        "decisions_signed": signed,
        "gputrace": g,
        "baseline": b,
        "raw": raw,
        "ratios": {
            "end_to_end": g["end_to_end_per_s"] / b["end_to_end_per_s"],
            "outcome": g["outcome_per_s"] / b["outcome_per_s"],
            "cpu_core": g["cpu_ms_per_event_core"] / b["cpu_ms_per_event_total"],
            "cpu_all": g["cpu_ms_per_event_total"] / b["cpu_ms_per_event_total"],
            "cpu_with_shared": g["cpu_ms_per_event_with_shared"] / b["cpu_ms_per_event_with_shared"],
        },
    }
    write_results(report, opts.out)
    return report


# --- results ----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    g, b, ratios, raw = report["gputrace"], report["baseline"], report["ratios"], report["raw"]
    opts = report["options"]
    lines = [
        f"# gputrace vs the fair baseline ({report['when'][:19]}Z)",
        "",
        f"{opts['events']} signed pledge events per round, {opts['rounds']} rounds after a warm-up of "
        f"{opts['warmup']}; latency on a fixed schedule for {opts['level_seconds']} s per level. "
        f"Decisions signed: {report['decisions_signed']}. {report['machine']['cpus']} CPUs, "
        f"load average {report['machine']['load_avg'][0]:.1f} at the end.",
        "",
        "| figure | gputrace | fair baseline | gputrace ÷ baseline |",
        "|---|---:|---:|---:|",
        f"| end to end, events/s (publish → ledger entry) | {g['end_to_end_per_s']:,.0f} "
        f"| {b['end_to_end_per_s']:,.0f} | {ratios['end_to_end']:.2f} |",
        f"| publish → outcome, events/s | {g['outcome_per_s']:,.0f} | {b['outcome_per_s']:,.0f} "
        f"| {ratios['outcome']:.2f} |",
        f"| CPU ms/event, pledges + ledger vs both baseline processes | {g['cpu_ms_per_event_core']:.2f} "
        f"| {b['cpu_ms_per_event_total']:.2f} | {ratios['cpu_core']:.2f} |",
        f"| CPU ms/event, every gputrace process | {g['cpu_ms_per_event_total']:.2f} "
        f"| {b['cpu_ms_per_event_total']:.2f} | {ratios['cpu_all']:.2f} |",
    ]
    if "cpu_with_shared" in ratios and g["shared_cpu_ms_per_event"]:
        lines.append(
            f"| CPU ms/event, every process incl. Kafka broker + PostgreSQL | {g['cpu_ms_per_event_with_shared']:.2f} "
            f"| {b['cpu_ms_per_event_with_shared']:.2f} | {ratios['cpu_with_shared']:.2f} |"
        )
    for gl, bl in zip(g["latency"], b["latency"], strict=True):
        for p in ("p50", "p95", "p99"):
            lines.append(
                f"| latency {p} at {gl['level_pct']}% of max, ms ({gl['rate_per_s']:,.0f} vs "
                f"{bl['rate_per_s']:,.0f} events/s) | {gl[p]:,.1f} | {bl[p]:,.1f} | {gl[p] / bl[p]:.2f} |"
            )
    lines += ["", "Rounds (end to end, events/s): "]
    for name, s in (("gputrace", g), ("baseline", b)):
        rounds = ", ".join(f"{r['end_to_end_per_s']:,.0f}" for r in s["rounds"])
        lines.append(f"- {name}: {rounds}")
    lines += ["", "CPU ms per event per process:", ""]
    for name, s in (("gputrace", g), ("baseline", b)):
        per = ", ".join(
            f"{p} {v:.2f}" for p, v in {**s["cpu_ms_per_event"], **s.get("shared_cpu_ms_per_event", {})}.items()
        )
        lines.append(f"- {name}: {per}")
    lines += [
        "",
        f"Reference figures (events/s): raw aiokafka produce {raw['produce_per_s']:,.0f}, raw aiokafka "
        f"consume+commit {raw['consume_commit_per_s']:,.0f}, raw PostgreSQL inserts (4 rows per event, 500 "
        f"events per transaction) {raw['inserts_4_rows_per_event_per_s']:,.0f}.",
        "",
    ]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, b = report["gputrace"], report["baseline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["raw aiokafka\nconsume+commit", "raw PostgreSQL\n4 rows/event", "fair baseline", "gputrace"]
    raw = report["raw"]
    values = [
        raw["consume_commit_per_s"],
        raw["inserts_4_rows_per_event_per_s"],
        b["end_to_end_per_s"],
        g["end_to_end_per_s"],
    ]
    left.bar(names, values, color=["#bbb", "#bbb", "#4c72b0", "#dd8452"])
    left.set_yscale("log")
    left.set_ylabel("events/s (log)")
    left.set_title("throughput, end to end")
    for x, v in enumerate(values):
        left.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    for s, colour in ((b, "#4c72b0"), (g, "#dd8452")):
        levels = [lv["level_pct"] for lv in s["latency"]]
        for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            name = "gputrace" if s is g else "baseline"
            right.plot(levels, [lv[p] for lv in s["latency"]], style, color=colour, marker="o", label=f"{name} {p}")
    right.set_xlabel("load, % of the system's own sustained maximum")
    right.set_ylabel("publish → outcome, ms")
    right.set_title("latency on a fixed schedule")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "pipeline.md").write_text(markdown(report))
    chart(report, out / "pipeline.png")


def _pid(server: Any) -> int | None:
    return getattr(server, "pid", None) if server is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=4000, help="events per round")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; medians are reported")
    parser.add_argument("--level-seconds", type=float, default=6.0, help="seconds of load per latency level")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", type=Path, help="py-spy every process during the rounds, into this directory")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a round may take (a loaded machine)")
    args = parser.parse_args()
    opts = Options(args.events, args.warmup, max(1, args.rounds), args.level_seconds, LEVELS, args.out, args.timeout)
    opts.profile = args.profile
    from tests.stack import start_stack  # the services' imports are heavy; only here

    work = Path(tempfile.mkdtemp(prefix="gputrace-bench-"))
    work.chmod(0o755)
    try:
        with kafka_and_postgres(work) as (bootstrap, admin_url, kafka, pg):
            stack, _ = start_stack(bootstrap, admin_url, work / "stack")
            # Local ones only: an external broker or database may serve others too.
            shared = {name: pid for name, pid in (("kafka", _pid(kafka)), ("postgres", _pid(pg))) if pid}
            try:
                report = run_bench(bootstrap, admin_url, stack, work / "stack" / "keys", opts, shared)
            finally:
                stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    print(f"written to {opts.out}/pipeline.{{json,md,png}}")


if __name__ == "__main__":
    main()
