"""`gputrace demo`: simulated partner systems publish the 2025 programme against a running gputrace.

The programme (design.md §1), at `--scale` of its real quantities:

- the 2025 GPU project allocations, each pledged in kind and bought as one batch: NHN Cloud
  7,656 B200, Kakao 2,424 B200, Naver Cloud 3,056 H200-SXM;
- two government-use batches for public research, funded by KDB and IBK (about 60 bn KRW each,
  their 15 % share of the SPC's 400 bn KRW equity); the IBK batch ships from Taiwan via Hong
  Kong, so it needs an export licence, which the licensing liaison then grants;
- capital pledges in KRW earmarked for every batch (Kakao raises its pledge, KDB disburses a
  third of its own), three vendor quotes per batch with the cheapest winning, awards after the
  2025-05-13 rescission, shipments of at most 1,000 serials, customs, receipt (one shipment
  arrives with damaged units, never installed), installation and acceptance (one unit fails);
- a forged award (claiming the programme office, signed with a vendor's key), which must come
  back rejected.

Every event is signed with the registered party keys (`--keys`) and published with aiokafka; the
demo reads each event's decision from `gputrace.outcomes.v1` and exits non-zero if an event it
expected to be accepted was not, so it doubles as a smoke test of a running system.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import secrets
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.cloudevents import CloudEvent, now_rfc3339
from shared.contract import EVENTS, OUTCOMES_TOPIC, party_source
from shared.parties import load_private_key

SHIPMENT_MAX = 1000  # serials per dispatch: a record stays far below Kafka's default 1 MB limit
MIN_UNITS = 8  # one 8-GPU node: the smallest batch at any scale
DAMAGED_UNITS = 3
FAILED_UNITS = 1
GPUS_PER_NODE = 8
NODES_PER_RACK = 4

PROGRAM_OFFICE = "nipa"
LICENSING = "bis-liaison"
LOGISTICS = "korea-logistics"
SITE_PARTY = "haenam-site"
SITE_ID = "haenam-1"
CENTER = {"name": "National AI Computing Center", "country": "KR"}

Status = Literal["accepted", "rejected"]


class DemoFailure(Exception):
    """The running system did not do what the programme expects; the message says what."""


class Unreachable(DemoFailure):
    """Kafka or the ledger API does not answer (exit code 2, not 1)."""


# --- the programme at full size -------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    vendor: str
    unit_price: int  # KRW per GPU, server and integration included
    origin: str
    route: tuple[str, ...]
    lead_time_days: int


@dataclass(frozen=True)
class Allocation:
    """One batch of the real programme, at full size."""

    code: str
    purpose: str
    model: str
    units: int
    funder: str
    capital_krw: int  # earmarked for the batch by the funder
    end_user: str
    offers: tuple[Offer, ...]
    in_kind: bool  # the funder also pledges the GPUs in kind (the 2025 GPU project)
    awarded: str  # award date, after the 2025-05-13 rescission
    carrier: str


def _offers(*rows: tuple[str, int, str, tuple[str, ...], int]) -> tuple[Offer, ...]:
    return tuple(Offer(*row) for row in rows)


ALLOCATIONS: tuple[Allocation, ...] = (
    Allocation(
        "NHN",
        "2025 GPU project: NHN Cloud allocation",
        "B200",
        7656,
        "nhn-cloud",
        550_000_000_000,
        "NHN Cloud Corp.",
        _offers(
            ("supermicro-apac", 68_400_000, "US", ("JP",), 75),
            ("nvidia-partner-kr", 69_100_000, "US", (), 60),
            ("dell-korea", 70_250_000, "US", ("JP",), 70),
        ),
        True,
        "2025-06-16T10:00:00+09:00",
        "Korean Air Cargo",
    ),
    Allocation(
        "KAKAO",
        "2025 GPU project: Kakao allocation",
        "B200",
        2424,
        "kakao",
        170_000_000_000,
        "Kakao Corp.",
        _offers(
            ("dell-korea", 68_900_000, "US", (), 65),
            ("nvidia-partner-kr", 69_300_000, "US", (), 60),
            ("supermicro-apac", 69_800_000, "US", ("JP",), 80),
        ),
        True,
        "2025-06-18T10:00:00+09:00",
        "Asiana Cargo",
    ),
    Allocation(
        "NAVER",
        "2025 GPU project: Naver Cloud allocation",
        "H200-SXM",
        3056,
        "naver-cloud",
        150_000_000_000,
        "Naver Cloud Corp.",
        _offers(
            ("nvidia-partner-kr", 47_800_000, "US", (), 45),
            ("dell-korea", 48_600_000, "US", ("JP",), 50),
            ("supermicro-apac", 49_100_000, "TW", (), 40),
        ),
        True,
        "2025-06-20T10:00:00+09:00",
        "Korean Air Cargo",
    ),
    Allocation(
        "GOV1",
        "Government use: public research (KDB share of the SPC)",
        "H200-SXM",
        1152,
        "kdb",
        60_000_000_000,
        "Korea Institute of Science and Technology Information",
        _offers(
            ("dell-korea", 48_200_000, "US", (), 50),
            ("nvidia-partner-kr", 48_900_000, "US", (), 45),
            ("supermicro-apac", 49_400_000, "TW", (), 40),
        ),
        False,
        "2025-07-01T10:00:00+09:00",
        "Korean Air Cargo",
    ),
    Allocation(
        "GOV2",
        "Government use: public research (IBK share of the SPC), shipped via Hong Kong",
        "B200",
        800,
        "ibk",
        60_000_000_000,
        "National AI Computing Center",
        _offers(
            ("supermicro-apac", 69_500_000, "TW", ("HK",), 35),
            ("nvidia-partner-kr", 70_400_000, "US", (), 60),
            ("dell-korea", 71_000_000, "US", ("JP",), 70),
        ),
        False,
        "2025-07-03T10:00:00+09:00",
        "Cathay Cargo",
    ),
)

AMENDED = "KAKAO"  # raises its capital pledge
AMENDED_CAPITAL_KRW = 180_000_000_000
DISBURSED = "GOV1"  # KDB disburses a third of its pledge
LICENSED = "GOV2"  # the route via Hong Kong needs a licence
DAMAGED = "NHN"  # one shipment arrives with damaged units
FAILED = "NAVER"  # one unit fails acceptance
FORGED = "NHN"  # a vendor forges the programme office's award


# --- the programme at the chosen scale ------------------------------------------------------


@dataclass(frozen=True)
class Shipment:
    shipment_id: str
    serials: tuple[str, ...]


@dataclass(frozen=True)
class Batch:
    alloc: Allocation
    batch_id: str
    units: int
    run_id: str
    serials: tuple[str, ...]
    damaged: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()

    @property
    def code(self) -> str:
        return self.alloc.code

    @property
    def winner(self) -> Offer:
        return min(self.alloc.offers, key=lambda o: o.unit_price)

    @property
    def dearest(self) -> Offer:
        return max(self.alloc.offers, key=lambda o: o.unit_price)

    def capital(self, full_krw: int | None = None) -> Decimal:
        """The full-size amount scaled with the units, rounded down to whole won."""
        full = Decimal(full_krw if full_krw is not None else self.alloc.capital_krw)
        return (full * self.units / self.alloc.units).quantize(Decimal(1), rounding=ROUND_FLOOR)

    def pledge_id(self, kind: str) -> str:
        return f"PL-{self.code}-{kind}-{self.run_id}"

    def quote_id(self, vendor: str) -> str:
        return f"Q-{self.code}-{vendor}-{self.run_id}"

    def shipments(self) -> list[Shipment]:
        return [
            Shipment(f"SH-{self.code}-{self.run_id}-{n + 1:02d}", self.serials[i : i + SHIPMENT_MAX])
            for n, i in enumerate(range(0, len(self.serials), SHIPMENT_MAX))
        ]

    @property
    def intact(self) -> tuple[str, ...]:
        return tuple(s for s in self.serials if s not in self.damaged)


@dataclass(frozen=True)
class Programme:
    program_id: str
    run_id: str
    scale: float
    batches: tuple[Batch, ...]

    def batch(self, code: str) -> Batch:
        return next(b for b in self.batches if b.code == code)

    def in_kind_gpus(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for b in self.batches:
            if b.alloc.in_kind:
                totals[b.alloc.model] += b.units
        return dict(totals)

    def pledged_capital(self) -> Decimal:
        """Pledged capital after the amendment, in KRW."""
        return sum(
            (b.capital(AMENDED_CAPITAL_KRW) if b.code == AMENDED else b.capital() for b in self.batches), Decimal(0)
        )

    def disbursed(self) -> Decimal:
        return (self.batch(DISBURSED).capital() / 3).quantize(Decimal(1), rounding=ROUND_FLOOR)


def scaled_units(units: int, scale: float) -> int:
    return max(MIN_UNITS, round(units * scale))


def _serials(alloc: Allocation, units: int, run_id: str) -> tuple[str, ...]:
    model = alloc.model.split("-")[0]
    return tuple(f"{alloc.code}-{model}-{n:06d}-{run_id}" for n in range(1, units + 1))


def _pick(rng: random.Random, serials: Sequence[str], k: int) -> frozenset[str]:
    return frozenset(rng.sample(list(serials), k))


def plan(program_id: str, run_id: str, scale: float = 1.0, seed: int | None = None) -> Programme:
    """The programme at `scale`; the same arguments always give the same ids and serials."""
    rng = random.Random(seed if seed is not None else run_id)
    batches = []
    for alloc in ALLOCATIONS:
        units = scaled_units(alloc.units, scale)
        b = Batch(
            alloc, f"{program_id}-{alloc.code}-{alloc.model}-{run_id}", units, run_id, _serials(alloc, units, run_id)
        )
        if alloc.code == DAMAGED:
            ships = b.shipments()
            b = dataclasses.replace(b, damaged=_pick(rng, ships[min(1, len(ships) - 1)].serials, DAMAGED_UNITS))
        if alloc.code == FAILED:
            b = dataclasses.replace(b, failed=_pick(rng, b.intact, FAILED_UNITS))
        batches.append(b)
    return Programme(program_id, run_id, scale, tuple(batches))


# --- the events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """One event a partner system publishes, and the decision the demo expects for it."""

    party: str
    short_type: str
    data: dict[str, Any]
    expect: Status = "accepted"
    reason: str | None = None
    sign_as: str | None = None  # a forger signs with another party's key
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def again(self) -> Send:
        return dataclasses.replace(self, event_id=str(uuid.uuid4()))


@dataclass(frozen=True)
class Phase:
    name: str
    sends: tuple[Send, ...]
    # Reason codes after which the sender sends again (a new event): the quotes service may judge
    # an award before it has read the pledge decision that funds it (services/quotes/domain.py).
    retry_on: frozenset[str] = frozenset()


def _at(when: str, days: int = 0, hours: int = 0) -> str:
    return (datetime.fromisoformat(when) + timedelta(days=days, hours=hours)).isoformat()


def _krw(amount: Decimal) -> dict[str, str]:
    return {"amount": str(amount), "currency": "KRW"}


def pledge_sends(p: Programme) -> tuple[Send, ...]:
    sends = []
    for b in p.batches:
        base = {
            "partner_id": b.alloc.funder,
            "program_id": p.program_id,
            "committed_at": "2025-03-14T09:00:00+09:00",
            "due_by": "2025-12-31",
        }
        sends.append(
            Send(
                b.alloc.funder,
                "pledge.committed.v1",
                {
                    **base,
                    "pledge_id": b.pledge_id("CAP"),
                    "kind": "capital",
                    "capital": _krw(b.capital()),
                    "earmark_batch_id": b.batch_id,
                },
            )
        )
        if b.alloc.in_kind:
            sends.append(
                Send(
                    b.alloc.funder,
                    "pledge.committed.v1",
                    {
                        **base,
                        "pledge_id": b.pledge_id("GPU"),
                        "kind": "gpus",
                        "gpus": {"model": b.alloc.model, "quantity": b.units},
                    },
                )
            )
    return tuple(sends)


def pledge_change_sends(p: Programme) -> tuple[Send, ...]:
    raised, paying = p.batch(AMENDED), p.batch(DISBURSED)
    return (
        Send(
            raised.alloc.funder,
            "pledge.amended.v1",
            {
                "pledge_id": raised.pledge_id("CAP"),
                "partner_id": raised.alloc.funder,
                "capital": _krw(raised.capital(AMENDED_CAPITAL_KRW)),
                "reason": "board approved additional financing for the B200 cluster",
            },
        ),
        Send(
            paying.alloc.funder,
            "pledge.disbursed.v1",
            {
                "pledge_id": paying.pledge_id("CAP"),
                "partner_id": paying.alloc.funder,
                "amount": _krw(p.disbursed()),
                "reference": f"{paying.alloc.funder.upper()}-WIRE-2025-0701-{p.run_id}",
            },
        ),
    )


def request_sends(p: Programme) -> tuple[Send, ...]:
    return tuple(
        Send(
            PROGRAM_OFFICE,
            "batch.requested.v1",
            {
                "batch_id": b.batch_id,
                "program_id": p.program_id,
                "model": b.alloc.model,
                "quantity": b.units,
                "site_id": SITE_ID,
                "needed_by": "2025-12-31",
            },
        )
        for b in p.batches
    )


def quote_data(b: Batch, offer: Offer) -> dict[str, Any]:
    return {
        "quote_id": b.quote_id(offer.vendor),
        "batch_id": b.batch_id,
        "vendor_id": offer.vendor,
        "model": b.alloc.model,
        "quantity": b.units,
        "unit_price": _krw(Decimal(offer.unit_price)),
        "valid_until": "2025-09-30",
        "lead_time_days": offer.lead_time_days,
        "origin_country": offer.origin,
        "route": list(offer.route),
        "consignee": CENTER,
        "end_user": {"name": b.alloc.end_user, "country": "KR", "headquarters_country": "KR"},
    }


def quote_sends(p: Programme) -> tuple[Send, ...]:
    return tuple(Send(o.vendor, "quote.submitted.v1", quote_data(b, o)) for b in p.batches for o in b.alloc.offers)


def award_data(b: Batch, offer: Offer) -> dict[str, Any]:
    return {"batch_id": b.batch_id, "quote_id": b.quote_id(offer.vendor), "awarded_at": b.alloc.awarded}


def forged_sends(p: Programme) -> tuple[Send, ...]:
    """The dearest vendor awards itself, claiming to be the programme office, signed with its own key."""
    b = p.batch(FORGED)
    return (
        Send(
            PROGRAM_OFFICE,
            "quote.awarded.v1",
            award_data(b, b.dearest),
            expect="rejected",
            reason="SIGNATURE_INVALID",
            sign_as=b.dearest.vendor,
        ),
    )


def award_sends(p: Programme) -> tuple[Send, ...]:
    return tuple(Send(PROGRAM_OFFICE, "quote.awarded.v1", award_data(b, b.winner)) for b in p.batches)


def licence_sends(p: Programme) -> tuple[Send, ...]:
    b = p.batch(LICENSED)
    return (
        Send(
            LICENSING,
            "license.granted.v1",
            {
                "batch_id": b.batch_id,
                "license_number": f"D{zlib.crc32(b.batch_id.encode()) % 10_000_000:07d}",
                "quantity": b.units,
                "valid_until": "2027-06-30",
            },
        ),
    )


def _shipped(b: Batch, n: int, days: int) -> str:
    return _at(b.alloc.awarded, days=14 + 2 * n + days)


def dispatch_sends(p: Programme) -> tuple[Send, ...]:
    return tuple(
        Send(
            LOGISTICS,
            "shipment.dispatched.v1",
            {
                "shipment_id": s.shipment_id,
                "batch_id": b.batch_id,
                "carrier": b.alloc.carrier,
                "serials": list(s.serials),
                "origin_country": b.winner.origin,
                "route": list(b.winner.route),
                "dispatched_at": _shipped(b, n, 0),
            },
        )
        for b in p.batches
        for n, s in enumerate(b.shipments())
    )


def customs_sends(p: Programme, rng: random.Random) -> tuple[Send, ...]:
    return tuple(
        Send(
            LOGISTICS,
            "shipment.cleared.v1",
            {
                "shipment_id": s.shipment_id,
                "batch_id": b.batch_id,
                "declaration_number": f"{rng.randint(10000, 99999)}-25-{rng.randint(0, 999_999):06d}M",
                "cleared_at": _shipped(b, n, 2),
            },
        )
        for b in p.batches
        for n, s in enumerate(b.shipments())
    )


def receipt_sends(p: Programme) -> tuple[Send, ...]:
    return tuple(
        Send(
            SITE_PARTY,
            "shipment.received.v1",
            {
                "shipment_id": s.shipment_id,
                "batch_id": b.batch_id,
                "site_id": SITE_ID,
                "received_serials": list(s.serials),
                "damaged_serials": sorted(b.damaged.intersection(s.serials)),
                "received_at": _shipped(b, n, 4),
            },
        )
        for b in p.batches
        for n, s in enumerate(b.shipments())
    )


def placement(b: Batch, index: int, serial: str) -> dict[str, str]:
    node, gpu = divmod(index, GPUS_PER_NODE)
    rack, slot = divmod(node, NODES_PER_RACK)
    return {"serial": serial, "rack": f"{b.code}-R{rack + 1:03d}", "slot": f"U{slot * 10 + 2:02d}-G{gpu + 1}"}


def install_sends(p: Programme) -> tuple[Send, ...]:
    sends = []
    for b in p.batches:
        position = {s: i for i, s in enumerate(b.serials)}
        for n, s in enumerate(b.shipments()):
            intact = [x for x in s.serials if x not in b.damaged]
            sends.append(
                Send(
                    SITE_PARTY,
                    "batch.installed.v1",
                    {
                        "batch_id": b.batch_id,
                        "site_id": SITE_ID,
                        "placements": [placement(b, position[x], x) for x in intact],
                        "installed_at": _shipped(b, n, 12),
                    },
                )
            )
    return tuple(sends)


def acceptance_sends(p: Programme) -> tuple[Send, ...]:
    return tuple(
        Send(
            SITE_PARTY,
            "batch.accepted.v1",
            {
                "batch_id": b.batch_id,
                "passed_serials": [x for x in s.serials if x not in b.damaged and x not in b.failed],
                "failed_serials": sorted(b.failed.intersection(s.serials)),
                "accepted_at": _shipped(b, n, 26),
                "report_uri": f"https://naicc.example.kr/acceptance/{b.batch_id}/{s.shipment_id}.pdf",
            },
        )
        for b in p.batches
        for n, s in enumerate(b.shipments())
    )


# --- Kafka: publishing and reading outcomes -------------------------------------------------


class Publisher:
    """Signs each event with its party's registered key and publishes it in binary mode."""

    def __init__(self, bootstrap: str, keys_dir: Path) -> None:
        self._keys_dir = keys_dir
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5, client_id="gputrace-demo"
        )

    async def __aenter__(self) -> Publisher:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise Unreachable(f"Kafka does not answer: {exc}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

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
        for send in sends:
            topic, event = self.event(send)
            key, value, headers = event.as_record()
            pending.append(await self._producer.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*pending)


class OutcomeWatcher:
    """Reads gputrace.outcomes.v1 from the end position taken at start, indexed by event id."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
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


class Runner:
    def __init__(self, publisher: Publisher, watcher: OutcomeWatcher, progress: Progress, timeout: float) -> None:
        self.publisher = publisher
        self.watcher = watcher
        self.progress = progress
        self.timeout = timeout
        self.results: list[PhaseResult] = []

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
            self.progress.update(
                task, completed=len(result.decided), detail=_detail(result.count("accepted"), result.count("rejected"))
            )
            if pending and time.monotonic() > deadline:
                raise DemoFailure(
                    f"{phase.name}: no outcome within {self.timeout:.0f} s for {len(pending)} event(s), "
                    f"e.g. {next(iter(pending.values()))[0].short_type}; are all services running?"
                )
            if pending:
                await self.watcher.changed(deadline - time.monotonic())
        result.seconds = time.monotonic() - started
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
    path = keys_dir / "tokens.json"
    try:
        tokens = json.loads(path.read_text())["tokens"]
    except (OSError, ValueError, KeyError) as exc:
        raise DemoFailure(f"no auditor token: cannot read {path} ({exc}); pass --token") from exc
    for t in tokens:
        if t.get("role") == "auditor":
            return str(t["token"])
    raise DemoFailure(f"no token with role auditor in {path}; pass --token")


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
        async with OutcomeWatcher(cfg.bootstrap) as watcher, Publisher(cfg.bootstrap, cfg.keys_dir) as publisher:
            with make_progress(console) as progress:
                runner = Runner(publisher, watcher, progress, cfg.timeout)
                forged, batches = await _programme(runner, api, p, rng, cfg.timeout)
        program = (await api.get("/v1/program", params={"program_id": p.program_id})).raise_for_status().json()
    return DemoReport(p, runner.results, batches, program, forged, time.monotonic() - started)


async def _programme(
    runner: Runner, api: httpx.AsyncClient, p: Programme, rng: random.Random, within: float
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
    await wait_for_ledger(api, p, dict.fromkeys(exports, "cleared"), "export clearance", progress, within)
    await runner.phase(Phase("dispatch", dispatch_sends(p)))
    await runner.phase(Phase("customs", customs_sends(p, rng)))
    await runner.phase(Phase("receipt", receipt_sends(p)))
    await runner.phase(Phase("installation", install_sends(p)))
    await runner.phase(Phase("acceptance", acceptance_sends(p)))
    final = await wait_for_ledger(api, p, dict.fromkeys(exports, "accepted"), "ledger: accepted", progress, within)
    return forged, final


# --- output ---------------------------------------------------------------------------------


def forged_panel(outcome: dict[str, Any]) -> Panel:
    body = (
        f"[bold]{escape(outcome.get('reason_code') or outcome['status'])}[/bold] by the {outcome['service']} "
        f"service: {escape(outcome['message'])}\nevent {outcome['event_id']} from {outcome['event_source']}, "
        f"decision {outcome['decision_id']}"
    )
    return Panel(body, title="forged award, read back from gputrace.outcomes.v1", border_style="yellow")


def batch_table(p: Programme, batches: dict[str, dict[str, Any]]) -> Table:
    table = Table(
        title=f"the ledger's batches, programme {p.program_id}",
        box=box.SIMPLE_HEAD,
        caption=f"batch ids: {p.program_id}-<batch>-<model>-{p.run_id}; scale {p.scale:g}",
    )
    for col in ("batch", "model", "vendor", "status", "export"):
        table.add_column(col)
    for col in ("awarded", "shipped", "damaged", "installed", "accepted", "failed"):
        table.add_column(col, justify="right")
    for b in p.batches:
        doc = batches.get(b.batch_id, {})
        q = doc.get("quantities") or {}
        table.add_row(
            b.code,
            b.alloc.model,
            doc.get("vendor_id") or "-",
            doc.get("status", "?"),
            (doc.get("export") or {}).get("status") or "-",
            *(f"{q.get(k, 0):,}" for k in ("awarded", "dispatched", "damaged", "installed", "accepted", "failed")),
        )
    return table


def _money(totals: dict[str, str] | None) -> str:
    return ", ".join(f"{Decimal(v):,} {c}" for c, v in (totals or {}).items()) or "none"


def phase_table(phases: Sequence[PhaseResult]) -> Table:
    table = Table(title="outcomes per phase (gputrace.outcomes.v1)", box=box.SIMPLE_HEAD)
    for col in ("phase", "events", "accepted", "rejected", "resent", "seconds"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for r in phases:
        table.add_row(
            r.name,
            str(len(r.decided)),
            str(r.count("accepted")),
            str(r.count("rejected")),
            str(r.retried),
            f"{r.seconds:.1f}",
        )
    return table


def print_report(console: Console, report: DemoReport, cfg: DemoConfig) -> None:
    console.print(phase_table(report.phases))
    console.print(batch_table(report.programme, report.batches))
    prog = report.program
    gpus = ", ".join(f"{n:,} {m}" for m, n in (prog.get("gpus") or {}).items())
    console.print(
        f"programme {report.programme.program_id} (all runs): in-kind GPUs {gpus} = "
        f"{prog.get('gpus_total', 0):,} against a target of {prog.get('target_gpus', 0):,}; capital pledged "
        f"{_money(prog.get('capital'))}, disbursed {_money(prog.get('disbursed'))}"
    )
    token = cfg.token or read_auditor_token(cfg.keys_dir)
    api = cfg.api_url.rstrip("/")
    console.print(f"[bold green]demo done[/bold green] in {report.seconds:.1f} s. Where to look:")
    console.print(f"  API docs   {api}/docs   (Authorization: Bearer <auditor token>)")
    console.print(f"  dashboard  {api}/")
    console.print(f"  batches    {api}/v1/batches?program_id={report.programme.program_id}")
    console.print(f"  verify     gputrace audit --url {api} --token {token} --tofu verify", soft_wrap=True)
    source = "--token" if cfg.token else f"{cfg.keys_dir / 'tokens.json'} (the entry with role auditor)"
    console.print(f"  auditor token: {source}")


# --- command line ---------------------------------------------------------------------------

RUN_ID = re.compile(r"^[A-Za-z0-9]{1,16}$")


def demo(
    bootstrap: Annotated[str, typer.Option(envvar="KAFKA_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers.")] = (
        "127.0.0.1:9092"
    ),
    keys: Annotated[Path, typer.Option(help="Directory of <party>.key files (and tokens.json).")] = Path("var/keys"),
    api: Annotated[str, typer.Option(help="Base URL of the ledger API.")] = "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(help="Auditor token (default: read from <keys>/tokens.json).")] = None,
    program_id: Annotated[str, typer.Option(help="Programme id of every pledge and batch.")] = "KR-NAICC-2025",
    scale: Annotated[float, typer.Option(min=0.0001, max=10.0, help="Fraction of the real quantities.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the random choices (damaged and failed units).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Suffix of every id (default: random), so runs never collide.")] = (
        None
    ),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each phase's outcomes.")] = 300.0,
) -> None:
    """Publish the 2025 programme, signed by simulated partner systems, against a running gputrace.

    Waits for every event's outcome and for the ledger to show each batch accepted.

    Exits non-zero if anything expected to be accepted was not: a smoke test of the whole system.
    """
    if run_id is not None and not RUN_ID.match(run_id):
        raise typer.BadParameter("letters and digits only, at most 16", param_hint="--run-id")
    cfg = DemoConfig(bootstrap, keys, api, token, program_id, scale, seed, run_id or secrets.token_hex(3), timeout)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and CI: wide enough for the tables
    console.print(
        f"gputrace demo: programme {program_id}, run {cfg.run_id}, scale {scale:g}, Kafka {bootstrap}, ledger {api}"
    )
    try:
        report = asyncio.run(run_demo(cfg, console))
    except Unreachable as exc:
        console.print(f"[bold red]cannot reach the system:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except DemoFailure as exc:
        console.print(f"[bold red]demo failed:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except (KafkaError, OSError, httpx.HTTPError) as exc:
        console.print(f"[bold red]cannot reach the system:[/bold red] {type(exc).__name__}: {escape(str(exc))}")
        raise typer.Exit(2) from None
    print_report(console, report, cfg)


__all__ = ["DemoConfig", "DemoFailure", "DemoReport", "Programme", "demo", "plan", "run_demo"]
