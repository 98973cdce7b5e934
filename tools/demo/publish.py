"""Publishing the programme as partner systems would, reading each event's outcome and waiting
for the ledger: the I/O of `gputrace demo`."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from shared.contract import EVENTS, OUTCOMES_TOPIC, party_source
from shared.contract.cloudevents import CloudEvent, now_rfc3339
from shared.contract.parties import load_private_key
from shared.runtime.kafka_auth import KAFKA_ADMIN
from tools.demo.programme import (
    LICENSED,
    LICENSING,
    LOGISTICS,
    PROGRAM_OFFICE,
    SITE_PARTY,
    Phase,
    Programme,
    Send,
    Status,
    acceptance_sends,
    award_sends,
    customs_sends,
    dispatch_sends,
    forged_sends,
    install_sends,
    licence_sends,
    plan,
    pledge_change_sends,
    pledge_sends,
    quote_sends,
    receipt_sends,
    request_sends,
)
from tools.kafka_access import tool_options


class DemoFailure(Exception):
    """The running system did not do what the programme expects; the message says what."""


class Unreachable(DemoFailure):
    """Kafka or the ledger API does not answer (exit code 2, not 1)."""


# --- Kafka: publishing and reading outcomes -------------------------------------------------


class Publisher:
    """Signs each event with its party's registered key and publishes it in binary mode."""

    def __init__(self, bootstrap: str, keys_dir: Path) -> None:
        self._bootstrap = bootstrap
        self._keys_dir = keys_dir
        self._keys: dict[str, Ed25519PrivateKey] = {}
        # One producer per party, as its own Kafka principal: the broker's ACLs apply to the demo
        # exactly as to a partner's system (tools/kafka_access.py).
        self._producers: dict[str, AIOKafkaProducer] = {}

    async def _producer(self, party: str) -> AIOKafkaProducer:
        if party not in self._producers:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                client_id="gputrace-demo",
                **tool_options(party, self._keys_dir),
            )
            try:
                await producer.start()
            except KafkaError as exc:
                await producer.stop()
                raise Unreachable(f"Kafka does not answer (as {party}): {exc}") from exc
            self._producers[party] = producer
        return self._producers[party]

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(p.stop() for p in self._producers.values()))

    def key(self, party: str) -> Ed25519PrivateKey:
        if party not in self._keys:
            self._keys[party] = load_private_key(self._keys_dir / f"{party}.key")
        return self._keys[party]

    def event(self, send: Send) -> tuple[str, CloudEvent]:
        spec = EVENTS[f"gputrace.{send.short_type}"]
        event = CloudEvent(
            id=send.event_id,
            source=party_source(send.party),
            type=spec.type,
            subject=str(send.data[spec.aggregate_field]),
            time=now_rfc3339(),
            data=send.data,
        )
        return spec.topic, event.signed(self.key(send.sign_as or send.party))

    async def publish(self, sends: Iterable[Send]) -> None:
        """In order: events of one batch share a partition, so they are decided in this order."""
        pending = []
        current: AIOKafkaProducer | None = None
        for send in sends:
            producer = await self._producer(send.party)
            if producer is not current and pending:
                # Another party's producer: what came before must be on the broker first.
                await asyncio.gather(*pending)
                pending = []
            current = producer
            topic, event = self.event(send)
            key, value, headers = event.as_record()
            pending.append(await producer.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*pending)


class OutcomeWatcher:
    """Reads gputrace.outcomes.v1 from the end position taken at start, indexed by event id."""

    def __init__(self, bootstrap: str, keys_dir: Path | None = None) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            # The operator running the demo reads the outcomes as the admin (any partner may too).
            **tool_options(KAFKA_ADMIN, keys_dir),
            group_id=None,
            enable_auto_commit=False,
            client_id="gputrace-demo-outcomes",
            isolation_level="read_committed",  # outcomes come from transactional relays
        )
        self.outcomes: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OutcomeWatcher:
        try:
            await self._consumer.start()
        except KafkaError as exc:
            await self._consumer.stop()
            raise Unreachable(f"Kafka does not answer: {exc}") from exc
        if OUTCOMES_TOPIC not in await self._consumer.topics():
            await self._consumer.stop()
            raise DemoFailure(f"no topic {OUTCOMES_TOPIC} on the broker: is gputrace running (make run)?")
        # Without a group, a subscription is assigned every partition once metadata arrives.
        self._consumer.subscribe([OUTCOMES_TOPIC])
        deadline = time.monotonic() + 30
        while not self._consumer.assignment():
            if time.monotonic() > deadline:
                await self._consumer.stop()
                raise DemoFailure(f"could not read {OUTCOMES_TOPIC}: no partitions assigned in 30 s")
            await asyncio.sleep(0.05)
        tps = sorted(self._consumer.assignment())
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, before anything is published
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    self._keep(rec.value)
            if batches:
                self._changed.set()

    def _keep(self, value: bytes | None) -> None:
        try:
            doc = json.loads(value or b"")
        except ValueError:
            return
        if isinstance(doc, dict) and "event_id" in doc:
            self.outcomes.setdefault(doc["event_id"], doc)  # exactly one decision per event; keep the first

    async def changed(self, at_most: float) -> None:
        """Return when new outcomes arrived, or after `at_most` seconds (capped at one)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, min(at_most, 1.0)))
        except TimeoutError:
            pass


# --- running phases -------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    decided: list[tuple[Send, dict[str, Any]]] = field(default_factory=list)
    seconds: float = 0.0
    retried: int = 0

    def count(self, status: Status) -> int:
        return sum(1 for _, o in self.decided if o["status"] == status)

    def unexpected(self) -> list[tuple[Send, dict[str, Any]]]:
        return [
            (s, o)
            for s, o in self.decided
            if o["status"] != s.expect or (s.reason is not None and o.get("reason_code") != s.reason)
        ]


def _detail(accepted: int, rejected: int, extra: str = "") -> str:
    return f"[green]{accepted} accepted[/green]  [yellow]{rejected} rejected[/yellow]{extra}"


def serials_of(send: Send) -> int:
    """How many GPU serials an event carries (0 for events that name none)."""
    d = send.data
    if send.short_type == "shipment.received.v1":
        return len(d["received_serials"])
    if send.short_type == "batch.installed.v1":
        return len(d["placements"])
    if send.short_type == "batch.accepted.v1":
        return len(d["passed_serials"]) + len(d.get("failed_serials", []))
    return len(d.get("serials", ()))


class Runner:
    def __init__(
        self,
        publisher: Publisher,
        watcher: OutcomeWatcher,
        progress: Progress,
        timeout: float,
        overall: TaskID | None = None,
    ) -> None:
        self.publisher = publisher
        self.watcher = watcher
        self.progress = progress
        self.timeout = timeout
        self.results: list[PhaseResult] = []
        # One bar over every event of the run, with the serials decided so far.
        self.overall = overall
        self.serials = 0

    async def phase(self, phase: Phase, attempts: int = 4) -> PhaseResult:
        result = PhaseResult(phase.name)
        self.results.append(result)
        task = self.progress.add_task(phase.name, total=len(phase.sends), detail="publishing")
        started = time.monotonic()
        await self.publisher.publish(phase.sends)
        pending = {s.event_id: (s, 1) for s in phase.sends}
        deadline = started + self.timeout
        while pending:
            resend = self._collect(result, pending, phase.retry_on, attempts)
            if resend:
                result.retried += len(resend)
                await asyncio.sleep(1.0)
                await self.publisher.publish(s for s, _ in resend)
                pending.update({s.event_id: (s, n) for s, n in resend})
            serials = sum(serials_of(s) for s, _ in result.decided)
            self.progress.update(
                task,
                completed=len(result.decided),
                detail=_detail(
                    result.count("accepted"), result.count("rejected"), f"  {serials:,} serials" if serials else ""
                ),
            )
            if self.overall is not None:
                done = sum(len(r.decided) for r in self.results)
                self.progress.update(
                    self.overall, completed=done, detail=f"{self.serials + serials:,} serial movements recorded"
                )
            if pending and time.monotonic() > deadline:
                raise DemoFailure(
                    f"{phase.name}: no outcome within {self.timeout:.0f} s for {len(pending)} event(s), "
                    f"e.g. {next(iter(pending.values()))[0].short_type}; are all services running?"
                )
            if pending:
                await self.watcher.changed(deadline - time.monotonic())
        result.seconds = time.monotonic() - started
        self.serials += sum(serials_of(s) for s, _ in result.decided)
        self._check(result)
        return result

    def _collect(
        self, result: PhaseResult, pending: dict[str, tuple[Send, int]], retry_on: frozenset[str], attempts: int
    ) -> list[tuple[Send, int]]:
        resend = []
        for event_id in [e for e in pending if e in self.watcher.outcomes]:
            send, attempt = pending.pop(event_id)
            outcome = self.watcher.outcomes[event_id]
            if outcome["status"] == "rejected" and outcome.get("reason_code") in retry_on and attempt < attempts:
                resend.append((send.again(), attempt + 1))
                continue
            result.decided.append((send, outcome))
        return resend

    def _check(self, result: PhaseResult) -> None:
        wrong = result.unexpected()
        if not wrong:
            return
        lines = [f"{result.name}: {len(wrong)} event(s) not decided as expected:"]
        for send, o in wrong[:10]:
            want = send.expect + (f" {send.reason}" if send.reason else "")
            lines.append(
                f"  {send.short_type} from {send.party} (id {send.event_id}): expected {want}, got "
                f"{o['status']} {o.get('reason_code') or ''} by {o.get('service')}: {o.get('message')}"
            )
        raise DemoFailure("\n".join(lines))


# --- the ledger -----------------------------------------------------------------------------

DEAD_ENDS = frozenset({"export_denied", "license_denied"})


async def ledger_batches(api: httpx.AsyncClient, program_id: str) -> dict[str, dict[str, Any]]:
    r = await api.get("/v1/batches", params={"program_id": program_id, "limit": 500})
    r.raise_for_status()
    return {b["batch_id"]: b for b in r.json()["items"]}


async def wait_for_ledger(
    api: httpx.AsyncClient, p: Programme, want: dict[str, str], name: str, progress: Progress, within: float
) -> dict[str, dict[str, Any]]:
    """Poll GET /v1/batches until every batch shows the status wanted of it."""
    task = progress.add_task(name, total=len(want), detail="polling the ledger")
    deadline = time.monotonic() + within
    while True:
        seen = await ledger_batches(api, p.program_id)
        statuses = {b: (seen.get(b) or {}).get("status", "unknown") for b in want}
        done = sum(1 for b, s in statuses.items() if s == want[b])
        summary = ", ".join(f"{s} {n}" for s, n in sorted(Counter(statuses.values()).items()))
        progress.update(task, completed=done, detail=summary)
        if done == len(want):
            return seen
        stuck = {b: s for b, s in statuses.items() if s in DEAD_ENDS and want[b] not in DEAD_ENDS}
        if stuck or time.monotonic() > deadline:
            raise DemoFailure(f"{name}: the ledger shows {statuses}, expected {want}")
        await asyncio.sleep(0.5)


def read_auditor_token(keys_dir: Path) -> str:
    # tokens.json holds only hashes; `gputrace keys init` keeps the plain development tokens here.
    path = keys_dir / "tokens.dev.json"
    try:
        tokens = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DemoFailure(f"no auditor token: cannot read {path} ({exc}); pass --token") from exc
    if isinstance(tokens, dict) and isinstance(tokens.get("auditor"), str):
        return tokens["auditor"]
    raise DemoFailure(f"no auditor token in {path}; pass --token")


async def check_ledger(api: httpx.AsyncClient) -> None:
    try:
        r = await api.get("/v1/program")
    except httpx.HTTPError as exc:
        raise Unreachable(f"the ledger API at {api.base_url} does not answer ({exc}); is gputrace running?") from exc
    if r.status_code in (401, 403):
        raise DemoFailure(f"the ledger refuses the auditor token ({r.status_code}): wrong --keys or --token?")
    r.raise_for_status()


# --- the whole run --------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    bootstrap: str
    keys_dir: Path
    api_url: str
    token: str | None
    program_id: str
    scale: float = 1.0
    seed: int | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    timeout: float = 300.0
    # Every serial dispatched, cleared, received, installed and accepted; False: up to export clearance.
    serials: bool = True


@dataclass
class DemoReport:
    programme: Programme
    phases: list[PhaseResult]
    batches: dict[str, dict[str, Any]]
    program: dict[str, Any]
    forged: dict[str, Any]
    seconds: float


def _check_keys(keys_dir: Path, p: Programme) -> None:
    parties = {PROGRAM_OFFICE, LICENSING, LOGISTICS, SITE_PARTY}
    parties |= {b.alloc.funder for b in p.batches} | {o.vendor for b in p.batches for o in b.alloc.offers}
    missing = sorted(x for x in parties if not (keys_dir / f"{x}.key").exists())
    if missing:
        raise DemoFailure(
            f"no key for {', '.join(missing)} in {keys_dir}: point --keys at the running system's keys "
            "(make run: var/keys)"
        )


def make_progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<22}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


async def run_demo(cfg: DemoConfig, console: Console) -> DemoReport:
    p = plan(cfg.program_id, cfg.run_id, cfg.scale, cfg.seed)
    _check_keys(cfg.keys_dir, p)
    token = cfg.token or read_auditor_token(cfg.keys_dir)
    rng = random.Random(cfg.seed if cfg.seed is not None else cfg.run_id)
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=cfg.api_url, headers=headers, timeout=30) as api:
        await check_ledger(api)
        async with (
            OutcomeWatcher(cfg.bootstrap, cfg.keys_dir) as watcher,
            Publisher(cfg.bootstrap, cfg.keys_dir) as publisher,
        ):
            with make_progress(console) as progress:
                events = len(all_sends(p, random.Random(0), cfg.serials))
                overall = progress.add_task("[bold]whole programme", total=events, detail="")
                runner = Runner(publisher, watcher, progress, cfg.timeout, overall)
                forged, batches = await _programme(runner, api, p, rng, cfg.timeout, cfg.serials)
        program = (await api.get("/v1/program", params={"program_id": p.program_id})).raise_for_status().json()
    return DemoReport(p, runner.results, batches, program, forged, time.monotonic() - started)


def all_sends(p: Programme, rng: random.Random, serials: bool = True) -> list[Send]:
    """Every event of a run (resends aside), for the overall progress bar."""
    sends = [
        *pledge_sends(p),
        *pledge_change_sends(p),
        *request_sends(p),
        *quote_sends(p),
        *forged_sends(p),
        *award_sends(p),
        *licence_sends(p),
    ]
    if serials:
        sends += [*dispatch_sends(p), *customs_sends(p, rng), *receipt_sends(p), *install_sends(p)]
        sends += acceptance_sends(p)
    return sends


async def _programme(
    runner: Runner, api: httpx.AsyncClient, p: Programme, rng: random.Random, within: float, serials: bool = True
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The programme in the order the real world would publish it; returns the forged event's outcome."""
    progress = runner.progress
    await runner.phase(Phase("pledges", pledge_sends(p)))
    await runner.phase(Phase("pledge changes", pledge_change_sends(p)))
    await runner.phase(Phase("batch requests", request_sends(p)))
    await runner.phase(Phase("vendor quotes", quote_sends(p)))
    forged = (await runner.phase(Phase("forged award", forged_sends(p)))).decided[0][1]
    progress.console.print(forged_panel(forged))
    await runner.phase(Phase("awards", award_sends(p), retry_on=frozenset({"FUNDING_SHORTFALL"})))
    exports = {b.batch_id: "license_required" if b.code == LICENSED else "cleared" for b in p.batches}
    await wait_for_ledger(api, p, exports, "export decisions", progress, within)
    await runner.phase(Phase("licence", licence_sends(p)))
    cleared = await wait_for_ledger(api, p, dict.fromkeys(exports, "cleared"), "export clearance", progress, within)
    if not serials:
        return forged, cleared
    await runner.phase(Phase("dispatch", dispatch_sends(p)))
    await runner.phase(Phase("customs", customs_sends(p, rng)))
    await runner.phase(Phase("receipt", receipt_sends(p)))
    await runner.phase(Phase("installation", install_sends(p)))
    await runner.phase(Phase("acceptance", acceptance_sends(p)))
    final = await wait_for_ledger(api, p, dict.fromkeys(exports, "accepted"), "ledger: accepted", progress, within)
    return forged, final


def forged_panel(outcome: dict[str, Any]) -> Panel:
    body = (
        f"[bold]{escape(outcome.get('reason_code') or outcome['status'])}[/bold] by the {outcome['service']} "
        f"service: {escape(outcome['message'])}\nevent {outcome['event_id']} from {outcome['event_source']}, "
        f"decision {outcome['decision_id']}"
    )
    return Panel(body, title="forged award, read back from gputrace.outcomes.v1", border_style="yellow")
