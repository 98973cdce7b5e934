"""Chaos run: a mixed, signed workload under load while services, the broker and PostgreSQL are
SIGKILLed on a seeded schedule; then count what came out, record by record.

    .venv/bin/python -m tests.chaos --events 20000 --seed 1      (make chaos EVENTS=20000 SEED=1)

Starts its own Kafka, PostgreSQL and services (KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are used
when set, but then the broker / database server are not ours to kill and are left alone).

Prints, per fault, what was killed, when, and how many seconds until the victims made progress
again; at the end: lost (acknowledged events with no outcome), duplicated (raw outcome and decision
records beyond one each), stalled (consumer groups with records left to read after a grace
period), ledger entries against decisions, and the auditor's `verify`. A JSON summary too; the
exit status is non-zero when anything is off.

The pieces (workload, raw tally, lag, ledger check, audit, the run itself with its fault
injector) are also what the crash tests, the short chaos test in `make test` and the cluster run
(tests/cluster.py: three brokers, two replicas of every service) use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.contract import (
    DECIDING_SERVICES,
    DLQ_TOPIC,
    LICENSING_TOPIC,
    LOGISTICS_TOPIC,
    OUTCOMES_TOPIC,
    PLEDGES_TOPIC,
    PROCUREMENT_TOPIC,
    TOPIC_PARTITIONS,
    decisions_topic,
)
from shared.contract.parties import load_private_key
from shared.runtime.settings import Settings
from tests.infra import LocalKafka, LocalPostgres, kafka_and_postgres
from tests.partner import PartnerClient, topic_for
from tools.devstack import Stack

DECISION_TOPICS = [decisions_topic(s) for s in DECIDING_SERVICES]
# What each service's consumer group reads (services/<name>/main.py), to measure its lag.
GROUP_TOPICS: dict[str, list[str]] = {
    "pledges": [PLEDGES_TOPIC],
    "quotes": [PROCUREMENT_TOPIC, decisions_topic("pledges")],
    "export_controls": [LICENSING_TOPIC, decisions_topic("quotes")],
    "deliveries": [LOGISTICS_TOPIC, decisions_topic("quotes"), decisions_topic("export_controls")],
    "ledger": DECISION_TOPICS,
}
ALL_SERVICES = tuple(GROUP_TOPICS)


# --- the workload ---------------------------------------------------------------------------


@dataclass
class Sent:
    """One record the partner side publishes, and what its outcome must be (None: depends on
    timing across topics, e.g. an award judged before or after the funding pledge's decision)."""

    event_id: str
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    expect: tuple[str, str | None] | None


ACCEPTED: tuple[str, None] = ("accepted", None)


def rejected(code: str) -> tuple[str, str]:
    return ("rejected", code)


def group_events(client: PartnerClient, tag: str, g: int) -> list[Sent]:
    """One pledge and one batch: accepted and rejected steps, several events per aggregate, an
    exact redelivery, and a rejection right after state changes on the same key (which, in one
    polled batch, makes the consumer replay the batch record by record: safe mode)."""
    pledge, batch, quote = f"{tag}-P{g}", f"{tag}-B{g}", f"{tag}-Q{g}"
    program, n = f"{tag}-prog", 0
    out: list[Sent] = []

    def add(party: str, short: str, data: dict[str, Any], expect: tuple[str, str | None] | None) -> Sent:
        nonlocal n
        n += 1
        key, value, headers, event_id = client.record(party, short, data, event_id=f"{tag}-{g}-{n}")
        sent = Sent(event_id, topic_for(short), key, value, headers, expect)
        out.append(sent)
        return sent

    def money(amount: str) -> dict[str, str]:
        return {"amount": amount, "currency": "KRW"}

    commit = {
        "pledge_id": pledge,
        "partner_id": "kdb",
        "program_id": program,
        "kind": "capital",
        "capital": money("1000000000"),
        "earmark_batch_id": batch,
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }
    add("kdb", "pledge.committed.v1", commit, ACCEPTED)
    disburse = {"pledge_id": pledge, "partner_id": "kdb", "amount": money("300"), "reference": "T-1"}
    first_disbursal = add("kdb", "pledge.disbursed.v1", disburse, ACCEPTED)
    add(
        "kdb",
        "pledge.disbursed.v1",
        {**disburse, "amount": money("5000000000"), "reference": "T-2"},
        rejected("DISBURSEMENT_EXCEEDS_PLEDGE"),
    )
    add("kdb", "pledge.committed.v1", commit, rejected("DUPLICATE_PLEDGE"))
    amend = {"pledge_id": pledge, "partner_id": "kdb", "capital": money("2000000000"), "reason": "tranche 2"}
    add("kdb", "pledge.amended.v1", amend, ACCEPTED)
    if g % 2 == 1:  # the same record again, as a producer retry or a replay would send it
        out.append(first_disbursal)
    add(
        "kdb",
        "pledge.committed.v1",
        {"pledge_id": f"{pledge}-bad", "partner_id": "kdb", "kind": "capital"},
        rejected("SCHEMA_INVALID"),
    )
    add("nipa", "batch.requested.v1", _request(batch, program), ACCEPTED)
    add("nvidia-partner-kr", "quote.submitted.v1", _quote(batch, quote), ACCEPTED)
    # Funded only if quotes has seen the pledge's decision by then (another topic): either way.
    add("nipa", "quote.awarded.v1", {"batch_id": batch, "quote_id": quote, "awarded_at": "2025-06-02T10:00:00Z"}, None)
    add("nipa", "batch.requested.v1", _request(batch, program), rejected("DUPLICATE_BATCH"))
    if g % 3 == 0:
        add("kdb", "pledge.withdrawn.v1", {"pledge_id": pledge, "partner_id": "kdb", "reason": "exit"}, ACCEPTED)
        add("kdb", "pledge.amended.v1", {**amend, "reason": "too late"}, rejected("PLEDGE_WITHDRAWN"))
    return out


def _request(batch: str, program: str) -> dict[str, Any]:
    return {
        "batch_id": batch,
        "program_id": program,
        "model": "B200",
        "quantity": 8,
        "site_id": "haenam-1",
        "needed_by": "2025-12-31",
    }


def _quote(batch: str, quote: str) -> dict[str, Any]:
    return {
        "quote_id": quote,
        "batch_id": batch,
        "vendor_id": "nvidia-partner-kr",
        "model": "B200",
        "quantity": 8,
        "unit_price": {"amount": "50000000", "currency": "KRW"},
        "valid_until": "2025-09-30",
        "lead_time_days": 60,
        "origin_country": "US",
        "route": ["JP"],
        "consignee": {"name": "National AI Computing Center", "country": "KR"},
        "end_user": {"name": "Haenam Cloud Operations", "country": "KR", "headquarters_country": "KR"},
    }


REPLAY_DISTANCE = 60  # groups, i.e. about 700 records


def workload(client: PartnerClient, tag: str, events: int) -> list[list[Sent]]:
    """Groups of events (one pledge + one batch each) adding up to about `events` records."""
    groups: list[list[Sent]] = []
    total = 0
    while total < events:
        g = len(groups)
        groups.append(group_events(client, tag, g))
        if g >= REPLAY_DISTANCE and g % 4 == 0:
            # An exact replay of an older group's first record, long after it was decided (so
            # likely in another polled batch): the idempotent consumer must drop it.
            groups[-1].append(groups[g - REPLAY_DISTANCE][0])
        total += len(groups[-1])
    return groups


def interleave(groups: list[list[Sent]], width: int = 20) -> list[Sent]:
    """Mix `width` groups at a time, keeping each group's own order (per-key order matters)."""
    out: list[Sent] = []
    for start in range(0, len(groups), width):
        lanes = [list(g) for g in groups[start : start + width]]
        while any(lanes):
            for lane in lanes:
                if lane:
                    out.append(lane.pop(0))
    return out


# --- publishing -----------------------------------------------------------------------------


class Publisher:
    """An integrator's producer: idempotent, acks=all; a send that fails (broker away) is sent
    again, the same record with the same ce_id, until acknowledged."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
        self.acked: set[str] = set()
        self.resent: set[str] = set()
        self._retry: list[Sent] = []

    async def __aenter__(self) -> Publisher:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def send(self, sent: Sent) -> asyncio.Future[Any] | None:
        try:
            future = await self._producer.send(sent.topic, sent.value, key=sent.key, headers=sent.headers)
        except Exception:
            self._failed(sent)
            return None
        future.add_done_callback(lambda f, s=sent: self._done(f, s))
        return future

    def _done(self, future: asyncio.Future[Any], sent: Sent) -> None:
        if future.cancelled() or future.exception() is not None:
            self._failed(sent)
        else:
            self.acked.add(sent.event_id)

    def _failed(self, sent: Sent) -> None:
        self.resent.add(sent.event_id)
        self._retry.append(sent)

    async def send_all(self, records: list[Sent], timeout: float = 180) -> None:
        """Send in order and wait until every record is acknowledged (resending failures)."""
        pending = records
        deadline = time.monotonic() + timeout
        while pending:
            futures = [f for s in pending if (f := await self.send(s)) is not None]
            await asyncio.gather(*futures, return_exceptions=True)
            pending, self._retry = self._retry, []
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} records never acknowledged")
                await asyncio.sleep(1)

    async def schedule(self, records: list[Sent], rate: float) -> float:
        """Publish at `rate` records/s on a fixed schedule (a slow broker does not slow the
        schedule down: records due meanwhile go out as soon as it answers). Returns seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, sent in enumerate(records):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.send(sent)
        elapsed = loop.time() - start
        await self.drain()
        return elapsed

    async def drain(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        await self._producer.flush()
        while self._retry:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._retry)} records never acknowledged")
            pending, self._retry = self._retry, []
            for sent in pending:
                await self.send(sent)
            await self._producer.flush()
            await asyncio.sleep(0.5)


async def replay_decided(
    pub: Publisher, lag: Lag, records: list[Sent], every: int = 5, quiet: float = 3.0, timeout: float = 120
) -> dict[str, int]:
    """Send again, byte for byte, every `every`-th record already decided (a partner replaying
    its log, or a producer retry long after): no new outcome, no new decision may follow. Waits
    until every consumer group has read them, then `quiet` seconds for anything they publish.
    Returns the groups' lag: a group stuck on a replay is not at 0."""
    await pub.send_all(records[::every])
    lags = await lag.wait_zero(timeout)
    await asyncio.sleep(quiet)
    return lags


# --- reading what came out, raw ---------------------------------------------------------------


class RawTally:
    """Every record on the outcome and decision topics (and the DLQ) that belongs to a run,
    counted raw: a copy of a record is a second record here, not a repeated id. Reads with
    isolation_level=read_committed, as every consumer of a transactional outbox must."""

    def __init__(self, bootstrap: str, tag: str) -> None:
        self.tag = tag
        self._consumer = AIOKafkaConsumer(
            OUTCOMES_TOPIC,
            DLQ_TOPIC,
            *DECISION_TOPICS,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self.outcomes: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.decisions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.letters: list[dict[str, Any]] = []
        self.last_outcome_at = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawTally:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500, max_records=2000)
            except Exception as exc:  # the broker restarting: keep reading, never stop counting
                print(f"  tally: {type(exc).__name__}: {exc}", file=sys.stderr)
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for rec in records:
                    self._add(rec.topic, rec.value)

    def _add(self, topic: str, value: bytes | None) -> None:
        try:
            doc = json.loads(value or b"")
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if topic == OUTCOMES_TOPIC:
            if str(doc.get("event_id", "")).startswith(self.tag):
                self.outcomes[doc["event_id"]].append(doc)
                self.last_outcome_at = time.monotonic()
        elif topic == DLQ_TOPIC:
            self.letters.append(doc)
        elif any(str(doc.get(k) or "").startswith(self.tag) for k in ("aggregate_id", "batch_id")):
            self.decisions[doc["decision_id"]].append(doc)

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.25)
        return True

    async def settle(self, event_ids: Iterable[str], timeout: float, quiet: float = 3.0) -> bool:
        """Wait for an outcome of every event, then `quiet` more seconds for any late copy."""
        wanted = set(event_ids)
        deadline = time.monotonic() + timeout
        done = False
        while not done and time.monotonic() < deadline:
            done = await self.wait(lambda: all(e in self.outcomes for e in wanted), min(30.0, timeout))
            if not done:
                have = sum(1 for e in wanted if e in self.outcomes)
                print(f"  waiting for outcomes: {have} of {len(wanted)}", file=sys.stderr)
        await asyncio.sleep(quiet)
        return done


@dataclass
class Counts:
    """The figures of one run, counted raw."""

    events: int = 0
    lost: int = 0  # acknowledged events without any outcome record
    outcome_copies: int = 0  # outcome records beyond one per event
    outcome_copies_differing: int = 0  # of those, copies not identical to the first (decided_at included)
    decisions: int = 0  # distinct decision ids of the run on the decision topics
    decision_copies: int = 0  # decision records beyond one per decision id
    outcomes_without_decision: int = 0
    ledger_entries: int = 0
    ledger_missing: int = 0  # decisions that are not in the ledger
    ledger_extra: int = 0  # ledger entries of the run that were never on a decision topic
    ledger_duplicates: int = 0  # ledger entries beyond one per decision id
    wrong_status: list[str] = field(default_factory=list)

    @property
    def duplicated(self) -> int:
        return self.outcome_copies + self.decision_copies

    def clean(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.outcomes_without_decision
            or self.ledger_missing
            or self.ledger_extra
            or self.ledger_duplicates
            or self.wrong_status
        )


def count(tally: RawTally, sent: list[Sent], ledger: Counter[str], check_status: set[str] | None = None) -> Counts:
    """The figures, from the raw tally and the ledger's entries (decision id → number of rows).
    `check_status`: the events whose expected status is deterministic in this run."""
    by_id = {s.event_id: s for s in sent}
    c = Counts(events=len(by_id))
    for event_id, s in by_id.items():
        docs = tally.outcomes.get(event_id, [])
        if not docs:
            c.lost += 1
            continue
        c.outcome_copies += len(docs) - 1
        c.outcome_copies_differing += sum(1 for d in docs[1:] if d != docs[0])
        if docs[0]["decision_id"] not in tally.decisions:
            c.outcomes_without_decision += 1
        if s.expect and (check_status is None or event_id in check_status):
            got = (docs[0]["status"], docs[0].get("reason_code"))
            if got != s.expect:
                c.wrong_status.append(f"{event_id}: expected {s.expect}, got {got}: {docs[0]['message'][:200]}")
    c.decisions = len(tally.decisions)
    c.decision_copies = sum(len(v) - 1 for v in tally.decisions.values())
    c.ledger_entries = sum(ledger.values())
    c.ledger_missing = sum(1 for d in tally.decisions if d not in ledger)
    c.ledger_extra = sum(1 for d in ledger if d not in tally.decisions)
    c.ledger_duplicates = sum(n - 1 for n in ledger.values())
    return c


def ledger_entries(url: str, tag: str) -> Counter[str]:
    """The ledger's own rows for the run's aggregates: decision id → how many rows hold it."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT decision_id, count(*) FROM log_entries WHERE aggregate_id LIKE %s OR batch_id LIKE %s "
            "GROUP BY decision_id",
            (tag + "%", tag + "%"),
        ).fetchall()
    return Counter({d: n for d, n in rows})


async def wait_ledger(url: str, tally: RawTally, timeout: float) -> Counter[str]:
    """The ledger's rows once it holds every decision of the tally (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await asyncio.to_thread(ledger_entries, url, tally.tag)
        except psycopg.OperationalError:
            got = Counter()
        if all(d in got for d in tally.decisions) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.5)


# --- consumer lag ---------------------------------------------------------------------------


class Lag:
    """Records a consumer group has still to read. The end is the last stable offset (what a
    read_committed reader can reach); the transaction markers of a transactional outbox take
    offsets too, so a gap with no readable record in it is not lag."""

    def __init__(self, bootstrap: str, group_prefix: str) -> None:
        self._bootstrap = bootstrap
        self._prefix = group_prefix
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        self._probe = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            request_timeout_ms=5000,
        )
        self._reading = asyncio.Lock()

    async def __aenter__(self) -> Lag:
        await self._admin.start()
        await self._probe.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._probe.stop()
        await self._admin.close()

    def group(self, service: str) -> str:
        return f"{self._prefix}-{service}"

    async def committed(self, service: str) -> dict[TopicPartition, int]:
        offsets = await self._admin.list_consumer_group_offsets(self.group(service))
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    async def of(self, service: str) -> int:
        """Readable records between the group's committed offsets and the topics' ends."""
        return sum((await self.pending(service)).values())

    async def pending(self, service: str) -> dict[TopicPartition, int]:
        """The same, per partition of the group's topics."""
        partitions = [TopicPartition(t, p) for t in GROUP_TOPICS[service] for p in range(TOPIC_PARTITIONS[t])]
        ends = await self._probe.end_offsets(partitions)
        committed = await self.committed(service)
        lag = dict.fromkeys(partitions, 0)
        for tp in partitions:
            start = committed.get(tp, 0)
            if ends[tp] > start:
                lag[tp] = await self._readable(tp, start, ends[tp])
        return lag

    async def _readable(self, tp: TopicPartition, start: int, end: int, timeout: float = 10) -> int:
        # One probe for every caller (fault watchers run beside the final wait): one read at a time.
        async with self._reading:
            self._probe.assign([tp])
            self._probe.seek(tp, start)
            n = 0
            deadline = time.monotonic() + timeout
            # An empty fetch is not the end (a slow broker answers nothing within the poll): read on
            # until the position passes `end` (transaction markers and aborted records are skipped).
            while await self._probe.position(tp) < end and time.monotonic() < deadline:
                got = await self._probe.getmany(tp, timeout_ms=1000, max_records=500)
                records = got.get(tp, [])
                n += sum(1 for r in records if r.offset < end)
                if records and records[-1].offset >= end - 1:
                    break
            return n

    async def all(self, services: Iterable[str] = ALL_SERVICES) -> dict[str, int]:
        return {s: await self.of(s) for s in services}

    async def wait_zero(self, timeout: float, services: Iterable[str] = ALL_SERVICES) -> dict[str, int]:
        """Lag per group once all are at 0, or as it stands after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                lags = await self.all(services)
            except Exception as exc:  # the broker restarting: ask again
                lags = {s: -1 for s in services}
                print(f"  lag unknown ({type(exc).__name__})", file=sys.stderr)
            if not any(lags.values()) or time.monotonic() > deadline:
                return lags
            await asyncio.sleep(1)


# --- the auditor ----------------------------------------------------------------------------


def verifier_key(keys_dir: Path) -> str:
    """The ledger's verifier key, as an auditor gets it out of band."""
    try:
        from gputrace_verifier.checkpoint import make_vkey
    except ImportError:  # before the verifier became its own package
        from shared.checkpoint import make_vkey  # type: ignore[no-redef]
    return make_vkey(Settings().ledger_origin, load_private_key(keys_dir / "ledger.key").public_key())


def audit_verify(api_url: str, token: str, keys_dir: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """`gputrace audit verify`, the command an auditor runs, as a separate process; it also checks
    that every entry is signed by the service that decided it (the registry's service keys)."""
    gputrace = Path(sys.executable).parent / "gputrace"
    vkey = verifier_key(keys_dir)
    keys = ["--key", vkey, "--service-keys", str(keys_dir / "registry.json")]
    return subprocess.run(
        [str(gputrace), "audit", "--url", api_url, "--token", token, "--state", str(state), *keys, "verify"],
        capture_output=True,
        text=True,
        timeout=300,
    )


# --- faults ---------------------------------------------------------------------------------


@dataclass
class Fault:
    victims: tuple[str, ...]  # service names, "broker" or "postgres" (tests/cluster.py: its own words)
    down_s: float
    at_s: float = 0.0  # seconds after the run started, when it was killed
    restarted_s: float = 0.0  # seconds from the kill until the victims were started again
    recovery_s: float | None = None  # seconds from the kill until every victim made progress again
    target: str = ""  # what the fault hit, when only known at the time (the leader's broker, a pid)

    @property
    def label(self) -> str:
        return "+".join(self.victims)


class Faults:
    """Kills and restarts what a fault names; measures when the victims work again. Subclasses
    (tests/cluster.py) change what is done to a victim (`take_down`, `bring_up`) and what counts as
    working again (`inject`, `watched`)."""

    def __init__(self, stack: Stack, kafka: LocalKafka | None, pg: LocalPostgres | None, lag: Lag) -> None:
        self.stack, self.kafka, self.pg, self.lag = stack, kafka, pg, lag
        self.watching: list[asyncio.Task[None]] = []
        self.down: set[str] = set()  # services we killed and have not started again yet
        self.exits: Counter[str] = Counter()  # services that exited on their own

    async def supervise(self, say: Callable[[str], None]) -> None:
        """Start again a service that exited on its own (e.g. its start-up found PostgreSQL
        down), as a process supervisor (compose's restart policy, systemd) would; count it."""
        while True:
            await asyncio.sleep(1)
            for name, proc in self.stack.processes.items():
                if name not in self.down and not proc.running:
                    self.exits[name] += 1
                    say(f"  {name} exited on its own (exit {proc.proc.returncode if proc.proc else '?'}); restarted")
                    proc.start()

    async def take_down(self, fault: Fault) -> None:
        for victim in fault.victims:
            if victim == "broker":
                assert self.kafka is not None
                await asyncio.to_thread(self.kafka.kill)
            elif victim == "postgres":
                assert self.pg is not None
                await asyncio.to_thread(self.pg.kill)
            else:
                self.down.add(victim)
                self.stack.processes[victim].kill()

    async def bring_up(self, fault: Fault) -> None:
        for victim in fault.victims:
            if victim == "broker":
                assert self.kafka is not None
                await asyncio.to_thread(self.kafka.start)
            elif victim == "postgres":
                assert self.pg is not None
                await asyncio.to_thread(self.pg.start)
            else:
                self.stack.processes[victim].start()
                self.down.discard(victim)

    def watched(self, fault: Fault) -> list[str]:
        """The consumer groups whose progress says the fault is over."""
        return [v for v in fault.victims if v in ALL_SERVICES] or list(ALL_SERVICES)

    async def inject(self, fault: Fault, started: float) -> None:
        fault.at_s = time.monotonic() - started
        t0 = time.monotonic()
        await self.take_down(fault)
        await asyncio.sleep(fault.down_s)
        await self.bring_up(fault)
        fault.restarted_s = time.monotonic() - t0
        self.watching.append(asyncio.create_task(self._recovery(fault, t0, self.watched(fault))))

    async def _recovery(self, fault: Fault, t0: float, services: list[str], timeout: float = 300) -> None:
        """Progress again: a victim's group has committed past where it stood at the restart,
        or has nothing left to read."""
        before: dict[str, int] = {}
        waiting = set(services)
        while waiting and time.monotonic() - t0 < timeout:
            for s in list(waiting):
                try:
                    total = sum((await self.lag.committed(s)).values())
                    if s not in before:
                        before[s] = total
                    elif total > before[s] or await self.lag.of(s) == 0:
                        waiting.discard(s)
                except Exception:  # broker or group coordinator not back yet
                    pass
            await asyncio.sleep(0.5)
        if not waiting:
            fault.recovery_s = round(time.monotonic() - t0, 1)


def fault_plan(rng: random.Random, kafka: bool, pg: bool) -> list[Fault]:
    """Every service killed twice, two of them at once (one of those times), the broker and
    PostgreSQL once each; in a seeded order with seeded down times."""
    pair = tuple(rng.sample(ALL_SERVICES, 2))
    singles = [s for s in ALL_SERVICES for _ in range(2)]
    for s in pair:
        singles.remove(s)
    plan = [Fault(pair, rng.uniform(1, 3))] + [Fault((s,), rng.uniform(0.5, 3)) for s in singles]
    if kafka:
        plan.append(Fault(("broker",), rng.uniform(1, 3)))
    if pg:
        plan.append(Fault(("postgres",), rng.uniform(1, 3)))
    rng.shuffle(plan)
    return plan


# --- one run --------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    events: int
    rate: float
    publish_s: float
    achieved_rate: float
    drain_s: float  # from the last record published until every event had an outcome
    faults: list[dict[str, Any]]
    counts: dict[str, Any]
    lost: int
    duplicated: int
    stalled: dict[str, int]  # groups with records left to read after the grace period
    safe_mode_replays: int
    exits: dict[str, int]  # services that exited on their own and were started again
    audit_verify: int
    audit_output: str

    def ok(self) -> bool:
        c = self.counts
        return (
            self.lost == 0
            and self.duplicated == 0
            and not self.stalled
            and c["ledger_missing"] == 0
            and c["ledger_extra"] == 0
            and c["ledger_duplicates"] == 0
            and c["outcomes_without_decision"] == 0
            and self.audit_verify == 0
            and all(f["recovery_s"] is not None for f in self.faults)
        )


def safe_mode_replays(stack: Stack) -> int:
    """How many batches the services replayed record by record (their logs say so)."""
    return sum(
        p.log_path.read_text(errors="replace").count("replayed record by record") for p in stack.processes.values()
    )


async def chaos_run(
    *,
    bootstrap: str,
    stack: Stack,
    tokens: dict[str, str],
    keys_dir: Path,
    workdir: Path,
    kafka: LocalKafka | None,
    pg: LocalPostgres | None,
    events: int,
    seed: int,
    rate: float,
    plan: list[Fault] | None = None,
    faults: Callable[[Lag], Faults] | None = None,
    fault_span: float = 1.0,
    settle_timeout: float = 600,
    grace: float = 120,
    say: Callable[[str], None] = print,
) -> Report:
    """The workload published on a fixed schedule while `plan` is injected (by `faults(lag)`, default
    Faults: kill and restart) over the first `fault_span` of the publishing window, then everything
    counted; see the module's docstring."""
    rng = random.Random(seed)
    tag = f"cx{seed}-{uuid.uuid4().hex[:6]}"
    client = PartnerClient(bootstrap, keys_dir)
    records = interleave(workload(client, tag, events))
    plan = plan if plan is not None else fault_plan(rng, kafka is not None, pg is not None)
    window = len(records) / rate
    say(f"chaos: {len(records)} records at {rate:g}/s (~{window:.0f} s), {len(plan)} faults, seed {seed}, run {tag}")
    replays_before = safe_mode_replays(stack)
    prefix = stack.base_env["CONSUMER_GROUP_PREFIX"]
    async with RawTally(bootstrap, tag) as tally, Publisher(bootstrap) as pub, Lag(bootstrap, prefix) as lag:
        injector = faults(lag) if faults else Faults(stack, kafka, pg, lag)
        supervisor = asyncio.create_task(injector.supervise(say))
        started = time.monotonic()

        async def run_faults() -> None:
            # Spread over the publishing window; each waits for the previous restart to finish.
            for i, fault in enumerate(plan):
                due = started + window * fault_span * (i + rng.uniform(0.3, 0.9)) / len(plan)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await injector.inject(fault, started)
                hit = f" ({fault.target})" if fault.target else ""
                say(
                    f"  t={fault.at_s:6.1f}s  killed {fault.label:<26} down {fault.down_s:.1f}s, "
                    f"restarted after {fault.restarted_s:.1f}s{hit}"
                )

        fault_task = asyncio.create_task(run_faults())
        publish_s = await pub.schedule(records, rate)
        published_at = time.monotonic()
        say(f"published {len(records)} records in {publish_s:.1f} s ({len(records) / publish_s:.0f}/s)")
        await fault_task
        sent_ids = {s.event_id for s in records}
        await tally.settle(sent_ids, settle_timeout)
        drain_s = time.monotonic() - published_at
        await replay_decided(pub, lag, records, every=50)
        lags = await lag.wait_zero(grace)
        ledger = await wait_ledger(stack.database_urls["ledger"], tally, grace)
        # Recovery of the last faults is measured in the background: give it the grace period.
        await tally.wait(lambda: all(f.recovery_s is not None for f in plan), grace)
        counts = count(tally, records, ledger, check_status=set())
        counts.lost = sum(1 for e in pub.acked if e not in tally.outcomes)
        supervisor.cancel()
    done = await asyncio.to_thread(audit_verify, stack.api_url, tokens["auditor"], keys_dir, workdir / "audit.json")
    for fault in plan:
        rec = "never" if fault.recovery_s is None else f"{fault.recovery_s:.1f}s"
        say(f"  fault {fault.label:<26} at t={fault.at_s:6.1f}s: progress again after {rec}")
    return Report(
        seed=seed,
        events=len(sent_ids),
        rate=rate,
        publish_s=round(publish_s, 1),
        achieved_rate=round(len(records) / publish_s, 1),
        drain_s=round(drain_s, 1),
        faults=[{**asdict(f), "label": f.label} for f in plan],
        counts=asdict(counts),
        lost=counts.lost + len(sent_ids - pub.acked),
        duplicated=counts.duplicated,
        stalled={g: n for g, n in lags.items() if n},
        safe_mode_replays=safe_mode_replays(stack) - replays_before,
        exits=dict(injector.exits),
        audit_verify=done.returncode,
        audit_output=(done.stdout + done.stderr)[-2000:],
    )


def print_summary(report: Report, say: Callable[[str], None] = print) -> None:
    c = report.counts
    say(
        f"events {report.events}  lost {report.lost}  duplicated {report.duplicated} "
        f"(outcome copies {c['outcome_copies']}, decision copies {c['decision_copies']})  "
        f"stalled {report.stalled or 0}"
    )
    say(
        f"decisions {c['decisions']}  ledger entries {c['ledger_entries']} "
        f"(missing {c['ledger_missing']}, extra {c['ledger_extra']}, duplicates {c['ledger_duplicates']})  "
        f"safe-mode replays {report.safe_mode_replays}  exits on their own {report.exits or 0}  "
        f"drain {report.drain_s}s  "
        f"audit verify exit {report.audit_verify}"
    )
    say("OK" if report.ok() else "NOT OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=120.0, help="records per second the partners publish")
    parser.add_argument("--json", type=Path, help="write the summary here too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gputrace-chaos-"))
    work.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    with contextlib.ExitStack() as infra:
        bootstrap, admin_url, kafka, pg = infra.enter_context(kafka_and_postgres(work))
        from tests.stack import start_stack

        stack, tokens = start_stack(bootstrap, admin_url, work / "stack")
        infra.callback(stack.stop)  # before the broker and PostgreSQL stop (callbacks run last-in first)
        report = asyncio.run(
            chaos_run(
                bootstrap=bootstrap,
                stack=stack,
                tokens=tokens,
                keys_dir=work / "stack" / "keys",
                workdir=work,
                kafka=kafka,
                pg=pg,
                events=args.events,
                seed=args.seed,
                rate=args.rate,
            )
        )
    print_summary(report)
    summary = json.dumps(asdict(report), indent=1)
    print(summary)
    if args.json:
        args.json.write_text(summary)
    if report.ok():
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work / 'stack' / 'logs'}", file=sys.stderr)
    sys.exit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
