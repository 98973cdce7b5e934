"""The programme the demo publishes: its batches at full size and at a scale, and the events
every simulated partner sends for them (pure data, no I/O)."""

from __future__ import annotations

import dataclasses
import random
import uuid
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Literal

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


# The programme announced on 2025-10-31 (APEC, Gyeongju): about 260,000 NVIDIA Blackwell GPUs for
# Korea. Each partner's share arrives in tranches of at most 10,000 GPUs, one batch each; every
# tranche is pledged in kind (counting towards the target) and its capital earmarked in KRW.
TRANCHE = 10_000
CAPITAL_PER_GPU_KRW = 72_000_000  # earmarked per GPU: above every offer, so awards are funded

_VENDORS_US = _offers(
    ("nvidia-partner-kr", 66_900_000, "US", (), 60),
    ("dell-korea", 67_800_000, "US", ("JP",), 70),
    ("supermicro-apac", 68_500_000, "US", ("JP",), 75),
)
_VENDORS_TW = _offers(
    ("supermicro-apac", 65_400_000, "TW", (), 45),
    ("nvidia-partner-kr", 66_700_000, "US", (), 60),
    ("dell-korea", 68_100_000, "US", ("JP",), 70),
)
_VIA_HONG_KONG = _offers(
    ("supermicro-apac", 64_900_000, "TW", ("HK",), 35),
    ("nvidia-partner-kr", 66_700_000, "US", (), 60),
    ("dell-korea", 68_100_000, "US", ("JP",), 70),
)


@dataclass(frozen=True)
class Share:
    """One partner's share of the programme, as announced."""

    code: str
    purpose: str
    model: str
    units: int
    funder: str
    end_user: str
    carrier: str
    awarded: str  # the first tranche's award; later tranches a fortnight apart


SHARES: tuple[Share, ...] = (
    Share(
        "GOV",
        "Government: National AI Computing Center and sovereign AI clouds",
        "B200",
        50_000,
        "msit",
        "National AI Computing Center",
        "Korean Air Cargo",
        "2025-11-17T10:00:00+09:00",
    ),
    Share(
        "SAMSUNG",
        "Samsung Electronics: AI megafactory",
        "GB200",
        50_000,
        "samsung-electronics",
        "Samsung Electronics Co., Ltd.",
        "Korean Air Cargo",
        "2025-11-20T10:00:00+09:00",
    ),
    Share(
        "SK",
        "SK Group: AI factory and GPU cloud",
        "GB200",
        50_000,
        "sk-group",
        "SK Telecom Co., Ltd.",
        "Asiana Cargo",
        "2025-11-24T10:00:00+09:00",
    ),
    Share(
        "HYUNDAI",
        "Hyundai Motor Group: physical AI and autonomous driving",
        "B200",
        50_000,
        "hyundai-motor-group",
        "Hyundai Motor Company",
        "Korean Air Cargo",
        "2025-11-27T10:00:00+09:00",
    ),
    Share(
        "NAVER",
        "NAVER Cloud: sovereign AI and physical AI",
        "GB200",
        60_000,
        "naver-cloud",
        "NAVER Cloud Corp.",
        "Asiana Cargo",
        "2025-12-01T10:00:00+09:00",
    ),
)
TARGET_GPUS = sum(share.units for share in SHARES)  # 260,000

AMENDED = "SK-1"  # SK raises its capital pledge for its first tranche
AMENDED_CAPITAL_KRW = 760_000_000_000
DISBURSED = "GOV-1"  # the government disburses a third of its first tranche
LICENSED = "HYUNDAI-3"  # shipped from Taiwan via Hong Kong: needs a licence
DAMAGED = "SAMSUNG-2"  # one shipment arrives with damaged units
FAILED = "NAVER-4"  # one unit fails acceptance
FORGED = "SAMSUNG-1"  # a vendor forges the programme office's award


def _when(when: str, days: int) -> str:
    return (datetime.fromisoformat(when) + timedelta(days=days)).isoformat()


def _tranches(share: Share) -> list[Allocation]:
    out = []
    for n, start in enumerate(range(0, share.units, TRANCHE)):
        code = f"{share.code}-{n + 1}"
        units = min(TRANCHE, share.units - start)
        offers = _VIA_HONG_KONG if code == LICENSED else _VENDORS_TW if n % 2 else _VENDORS_US
        out.append(
            Allocation(
                code,
                f"{share.purpose}, tranche {n + 1}",
                share.model,
                units,
                share.funder,
                units * CAPITAL_PER_GPU_KRW,
                share.end_user,
                offers,
                True,
                _when(share.awarded, 14 * n),
                share.carrier,
            )
        )
    return out


ALLOCATIONS: tuple[Allocation, ...] = tuple(a for share in SHARES for a in _tranches(share))


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
            "committed_at": "2025-11-03T09:00:00+09:00",
            "due_by": "2026-12-31",
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
                "reference": f"{paying.alloc.funder.upper()}-WIRE-2025-1201-{p.run_id}",
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
                "needed_by": "2026-12-31",
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
        "valid_until": "2026-06-30",
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
