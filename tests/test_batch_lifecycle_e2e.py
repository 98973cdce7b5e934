"""A GPU batch's whole life, published by partner clients over real Kafka, ending in the ledger's
batch view (docs/architecture.md §5, issue: the four domain services, choreographed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, LiteralString, TypeVar

import httpx
import psycopg
import pytest

from tests.conftest import E2E
from tests.partner import PartnerClient, TopicWatcher

pytestmark = pytest.mark.asyncio(loop_scope="session")

CENTER = {"name": "National AI Computing Center", "country": "KR"}
PATIENCE = 60.0  # seconds a service or the ledger may take to catch up
T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll `probe` until it returns something other than None (the ledger and the services lag)."""
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while True:
        got = await probe()
        if got is not None:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def fetch_row(url: str, sql: LiteralString, *params: object) -> tuple[Any, ...] | None:
    """One row from a service's own database (read only: to know what it has stored)."""
    if url.startswith("sqlite"):  # the embedded default: the service's file, read in a thread
        return await asyncio.to_thread(_sqlite_row, url.split(":///", 1)[1], sql.replace("%s", "?"), params)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchone()


def _sqlite_row(path: str, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        row: tuple[Any, ...] | None = conn.execute(sql, params).fetchone()
        return row


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Programme:
    """The parties of one batch, publishing in the order the real world would.

    Services meet only through Kafka, so a service may judge an event before it has seen another
    service's decision it depends on (quotes needs the pledge's earmark, deliveries the export
    case). A real programme office does not award within milliseconds of a pledge; the tests wait
    until the service has stored what it needs (read from its own database) instead.
    """

    def __init__(
        self,
        partner: PartnerClient,
        outcomes: TopicWatcher,
        model: str = "B200",
        quantity: int = 8,
        *,
        db: dict[str, str] | None = None,
    ) -> None:
        self.p = partner
        self.outcomes = outcomes
        self.db = db or {}  # the services' database URLs, to wait on them (see the class doc)
        self.batch = uid("B")
        self.program = uid("prog")
        self.model = model
        self.quantity = quantity

    async def expect(self, event_id: str, status: str = "accepted", reason: str | None = None) -> dict[str, Any]:
        got = await self.outcomes.outcome(event_id)
        assert got["status"] == status, got
        if reason:
            assert got["reason_code"] == reason, got
        return got

    async def fund(self, amount: str = "2000000000") -> None:
        pledge = {
            "pledge_id": uid("P"),
            "partner_id": "nhn-cloud",
            "program_id": self.program,
            "kind": "capital",
            "capital": {"amount": amount, "currency": "KRW"},
            "earmark_batch_id": self.batch,
            "committed_at": "2025-03-01T00:00:00Z",
            "due_by": "2025-12-31",
        }
        await self.expect(await self.p.publish("nhn-cloud", "pledge.committed.v1", pledge))
        if self.db:
            await until(
                lambda: fetch_row(
                    self.db["quotes"], "SELECT 1 FROM quotes_earmarks WHERE pledge_id = %s", pledge["pledge_id"]
                ),
                f"quotes to hold the earmark of {pledge['pledge_id']}",
            )

    async def deliveries_see(self, export_status: str) -> None:
        """Wait until deliveries holds the award and this export status for the batch."""
        await until(
            lambda: fetch_row(
                self.db["deliveries"],
                "SELECT 1 FROM delivery_batches WHERE batch_id = %s AND awarded_quantity IS NOT NULL "
                "AND export_status = %s",
                self.batch,
                export_status,
            ),
            f"deliveries to see batch {self.batch} {export_status}",
        )

    async def request(self) -> None:
        await self.expect(
            await self.p.publish(
                "nipa",
                "batch.requested.v1",
                {
                    "batch_id": self.batch,
                    "program_id": self.program,
                    "model": self.model,
                    "quantity": self.quantity,
                    "site_id": "haenam-1",
                    "needed_by": "2025-12-31",
                },
            )
        )

    def quote(self, vendor: str, unit_price: str, hq: str = "KR", quantity: int | None = None) -> dict[str, Any]:
        return {
            "quote_id": uid("Q"),
            "batch_id": self.batch,
            "vendor_id": vendor,
            "model": self.model,
            "quantity": quantity or self.quantity,
            "unit_price": {"amount": unit_price, "currency": "KRW"},
            "valid_until": "2025-09-30",
            "lead_time_days": 60,
            "origin_country": "US",
            "route": ["JP"],
            "consignee": CENTER,
            "end_user": {
                "name": "Haenam Cloud Operations" if hq == "KR" else "Pearl River Compute Ltd",
                "country": "KR",
                "headquarters_country": hq,
            },
        }

    async def submit(self, vendor: str, unit_price: str, hq: str = "KR") -> str:
        q = self.quote(vendor, unit_price, hq)
        await self.expect(await self.p.publish(vendor, "quote.submitted.v1", q))
        return q["quote_id"]

    async def award(self, quote_id: str, status: str = "accepted", reason: str | None = None) -> None:
        await self.expect(
            await self.p.publish(
                "nipa",
                "quote.awarded.v1",
                {
                    "batch_id": self.batch,
                    "quote_id": quote_id,
                    "awarded_at": "2025-06-02T10:00:00Z",
                },
            ),
            status,
            reason,
        )

    def serials(self, start: int, end: int) -> list[str]:
        return [f"{self.batch}-SN{i:05d}" for i in range(start, end)]

    async def dispatch(
        self, shipment: str, serials: list[str], status: str = "accepted", reason: str | None = None
    ) -> None:
        await self.expect(
            await self.p.publish(
                "korea-logistics",
                "shipment.dispatched.v1",
                {
                    "shipment_id": shipment,
                    "batch_id": self.batch,
                    "carrier": "KAL Cargo",
                    "serials": serials,
                    "origin_country": "US",
                    "route": ["JP"],
                    "dispatched_at": "2025-07-01T00:00:00Z",
                },
            ),
            status,
            reason,
        )

    async def clear(self, shipment: str) -> None:
        await self.expect(
            await self.p.publish(
                "korea-logistics",
                "shipment.cleared.v1",
                {
                    "shipment_id": shipment,
                    "batch_id": self.batch,
                    "declaration_number": uid("KCS"),
                    "cleared_at": "2025-07-03T00:00:00Z",
                },
            )
        )

    async def receive(self, shipment: str, received: list[str], damaged: list[str] = ()) -> None:  # type: ignore[assignment]
        await self.expect(
            await self.p.publish(
                "haenam-site",
                "shipment.received.v1",
                {
                    "shipment_id": shipment,
                    "batch_id": self.batch,
                    "site_id": "haenam-1",
                    "received_serials": received,
                    "damaged_serials": list(damaged),
                    "received_at": "2025-07-05T00:00:00Z",
                },
            )
        )


async def batch_view(api: httpx.AsyncClient, batch: str, until: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    doc: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        r = await api.get(f"/v1/batches/{batch}")
        if r.status_code == 200:
            doc = r.json()
            if until(doc):
                return doc
        await asyncio.sleep(0.3)
    raise AssertionError(f"batch view never got there: {json.dumps(doc, indent=1)[:4000]}")


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_whole_life_of_a_batch(e2e: E2E) -> None:
    partner, api = e2e.partner, e2e.api
    g = Programme(partner, e2e.outcomes, db=e2e.database_urls)
    await g.fund()
    await g.request()
    winner = await g.submit("nvidia-partner-kr", "50000000")
    await g.submit("supermicro-apac", "52000000")
    await g.award(winner)
    await batch_view(api, g.batch, lambda d: d["status"] == "cleared")
    await g.deliveries_see("cleared")
    s1, s2 = uid("S"), uid("S")
    first, second = g.serials(0, 5), g.serials(5, 8)
    await g.dispatch(s1, first)
    await g.dispatch(s2, second)
    await g.clear(s1)
    await g.clear(s2)
    await g.receive(s1, first, damaged=[first[0]])
    await g.receive(s2, second)
    good = first[1:] + second
    await g.expect(
        await partner.publish(
            "haenam-site",
            "batch.installed.v1",
            {
                "batch_id": g.batch,
                "site_id": "haenam-1",
                "placements": [{"serial": s, "rack": "R01", "slot": str(i)} for i, s in enumerate(good)],
                "installed_at": "2025-07-10T00:00:00Z",
            },
        )
    )
    await g.expect(
        await partner.publish(
            "haenam-site",
            "batch.accepted.v1",
            {
                "batch_id": g.batch,
                "passed_serials": good[:-1],
                "failed_serials": good[-1:],
                "accepted_at": "2025-07-20T00:00:00Z",
                "report_uri": "https://example.invalid/acceptance/1.pdf",
            },
        )
    )

    doc = await batch_view(api, g.batch, lambda d: d["status"] == "accepted")
    q = doc["quantities"]
    assert (q["requested"], q["awarded"], q["dispatched"], q["received"]) == (8, 8, 8, 8)
    assert (q["damaged"], q["installed"], q["accepted"], q["failed"], q["in_transit"]) == (1, 7, 6, 1, 0)
    assert q["quoted"] == 2
    assert doc["vendor_id"] == "nvidia-partner-kr"
    assert doc["export"]["status"] == "cleared" and doc["export"]["rule_version"].startswith("post-rescission")
    assert doc["export"]["eccn"] == "3A090.a"
    assert doc["money"]["earmarked"] == {"KRW": "2000000000"}
    assert doc["money"]["awarded"] == {"amount": "400000000", "currency": "KRW"}
    assert doc["export_decision"]["reasoning"], "the export decision carries its reasoning"
    # The rule set is chosen by the planned shipment date: award (2025-06-02) + 60 days' lead time.
    assert doc["export_decision"]["inputs"]["decision_date"] == "2025-08-01"
    codes = sorted(a["code"] for step in doc["timeline"] for a in step["anomalies"])
    assert codes == ["ACCEPTANCE_FAILED", "DAMAGED_IN_TRANSIT"]
    steps = [s["event_type"] for s in doc["timeline"]]
    assert steps.count("gputrace.export.decided.v1") == 1
    assert [s["leaf_index"] for s in doc["timeline"]] == sorted(s["leaf_index"] for s in doc["timeline"])
    assert doc["anomalies"] == 2

    ocds = (await api.get(f"/v1/batches/{g.batch}/ocds")).raise_for_status().json()
    assert [r["tag"][0] for r in ocds["releases"]] == ["tender", "award", "implementation"]
    award_release = ocds["releases"][1]
    assert award_release["awards"][0]["value"] == {"amount": 400000000, "currency": "KRW"}
    assert award_release["awards"][0]["suppliers"] == [{"id": "nvidia-partner-kr", "name": "nvidia-partner-kr"}]
    assert len(award_release["bids"]["details"]) == 2
    epcis = (await api.get(f"/v1/batches/{g.batch}/epcis")).raise_for_status().json()
    assert epcis["type"] == "EPCISDocument" and epcis["schemaVersion"] == "2.0"

    def serials(step: str, disposition: str) -> int:
        return sum(
            len(e["epcList"])
            for e in epcis["epcisBody"]["eventList"]
            if e["bizStep"] == step and e["disposition"] == disposition
        )

    assert serials("shipping", "in_transit") == 8
    assert (serials("receiving", "in_progress"), serials("receiving", "damaged")) == (7, 1)
    assert serials("installing", "active") == 7
    assert (serials("accepting", "conformant"), serials("accepting", "non_conformant")) == (6, 1)


async def test_licence_required_then_granted(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, database_urls: dict[str, str]
) -> None:
    g = Programme(partner, outcomes, model="H200-SXM", quantity=4, db=database_urls)
    await g.fund()
    await g.request()
    quote = await g.submit("dell-korea", "60000000", hq="CN")
    await g.award(quote)
    doc = await batch_view(api, g.batch, lambda d: d["status"] == "license_required")
    assert doc["export"]["outcome"] == "license_required"
    await g.deliveries_see("license_required")
    # Dispatch before the licence: refused and flagged for auditors.
    early = uid("S")
    await g.dispatch(early, g.serials(0, 4), "rejected", "EXPORT_NOT_CLEARED")
    await g.expect(
        await partner.publish(
            "bis-liaison",
            "license.granted.v1",
            {
                "batch_id": g.batch,
                "license_number": "D1234567",
                "quantity": 4,
                "valid_until": "2027-06-30",
            },
        )
    )
    doc = await batch_view(api, g.batch, lambda d: d["status"] == "cleared")
    assert doc["export"]["status"] == "licensed" and doc["export"]["license_number"] == "D1234567"
    await g.deliveries_see("licensed")
    await g.dispatch(uid("S"), g.serials(0, 4))
    doc = await batch_view(api, g.batch, lambda d: d["status"] == "in_transit" and d["anomalies"] == 1)
    assert doc["quantities"]["in_transit"] == 4
    violations = (await api.get("/v1/anomalies", params={"batch_id": g.batch})).json()["items"]
    assert [a["code"] for a in violations] == ["EXPORT_VIOLATION"]


async def test_licence_required_then_denied(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, database_urls: dict[str, str]
) -> None:
    g = Programme(partner, outcomes, model="B200", quantity=2, db=database_urls)
    await g.fund()
    await g.request()
    await g.award(await g.submit("dell-korea", "70000000", hq="CN"))
    await batch_view(api, g.batch, lambda d: d["status"] == "license_required")
    await g.expect(
        await partner.publish(
            "bis-liaison",
            "license.denied.v1",
            {
                "batch_id": g.batch,
                "reason": "end user headquartered in a D:5 country",
            },
        )
    )
    doc = await batch_view(api, g.batch, lambda d: d["status"] == "license_denied")
    assert doc["export"]["status"] == "license_denied"
    await g.deliveries_see("license_denied")
    # The licence is spent: a second decision is refused; a dispatch is an export violation.
    await g.expect(
        await partner.publish(
            "bis-liaison",
            "license.granted.v1",
            {
                "batch_id": g.batch,
                "license_number": "LATE-1",
                "quantity": 2,
                "valid_until": "2027-01-01",
            },
        ),
        "rejected",
        "EXPORT_DENIED",
    )
    await g.dispatch(uid("S"), g.serials(0, 2), "rejected", "EXPORT_DENIED")
    await batch_view(api, g.batch, lambda d: d["anomalies"] == 2)
    anomalies = (await api.get("/v1/anomalies", params={"batch_id": g.batch})).json()["items"]
    assert sorted(a["code"] for a in anomalies) == ["EXPORT_VIOLATION", "LICENSE_DENIED"]
