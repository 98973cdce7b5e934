"""Every domain rule of docs/architecture.md §5 broken once, through real Kafka: a partner publishes a signed
event that breaks the rule, reads the rejection and its reason code on gputrace.outcomes.v1 (and,
where auditors must see it, the anomaly at /v1/anomalies), then publishes one valid event that is
accepted only if the rejected one changed nothing.

Services meet only through Kafka, so a service may judge an event before it has seen another
service's decision it depends on (quotes needs the pledge's earmark, deliveries the award and the
export case). Where a test depends on such a decision, it waits until that service has stored it
(read from the service's own database) rather than sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest

from tests.conftest import E2E
from tests.partner import PartnerClient, TopicWatcher
from tests.test_batch_lifecycle_e2e import Programme, batch_view, fetch_row, uid, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

OWNER = "nhn-cloud"
OTHER_PARTNER = "kakao"
VENDOR = "nvidia-partner-kr"
OTHER_VENDOR = "supermicro-apac"
LOGISTICS = "korea-logistics"
SITE = "haenam-site"
LICENSING = "bis-liaison"

UNIT_PRICE = "50000000"  # KRW; the default batch of 8 units costs 400,000,000 KRW
AWARD_TOTAL = 400_000_000


class Case(Programme):
    """One batch's parties (Programme), plus what rule tests need: events published as they are,
    outcome checks, waits on the services a later event depends on, and the auditors' view."""

    def __init__(
        self,
        partner: PartnerClient,
        outcomes: TopicWatcher,
        api: httpx.AsyncClient,
        database_urls: dict[str, str],
        *,
        quantity: int = 8,
    ) -> None:
        super().__init__(partner, outcomes, model="B200", quantity=quantity, db=database_urls)
        self.api = api

    # --- outcomes ---------------------------------------------------------------------------

    async def accepted(self, event_id: str) -> dict[str, Any]:
        return await self.expect(event_id, "accepted")

    async def rejected(self, event_id: str, reason: str) -> dict[str, Any]:
        got = await self.expect(event_id, "rejected", reason)
        assert got["message"], got
        return got

    async def anomalies(self, code: str, count: int = 1) -> list[dict[str, Any]]:
        """The batch's anomalies of this code, once the ledger lists `count` of them."""

        async def probe() -> list[dict[str, Any]] | None:
            r = await self.api.get("/v1/anomalies", params={"batch_id": self.batch, "code": code})
            items: list[dict[str, Any]] = r.raise_for_status().json()["items"]
            return items if len(items) >= count else None

        return await until(probe, f"{count} {code} anomaly(ies) for {self.batch}")

    # --- funding and procurement ------------------------------------------------------------

    async def pledge(self, amount: str) -> str:
        """Commit a capital pledge earmarked for the batch; return once quotes counts it."""
        pledge_id = uid("P")
        await self.accepted(
            await self.p.publish(
                OWNER,
                "pledge.committed.v1",
                {
                    "pledge_id": pledge_id,
                    "partner_id": OWNER,
                    "program_id": self.program,
                    "kind": "capital",
                    "capital": {"amount": amount, "currency": "KRW"},
                    "earmark_batch_id": self.batch,
                    "committed_at": "2025-03-01T00:00:00Z",
                    "due_by": "2025-12-31",
                },
            )
        )
        await until(
            lambda: fetch_row(self.db["quotes"], "SELECT 1 FROM quotes_earmarks WHERE pledge_id = %s", pledge_id),
            f"quotes to hold the earmark of {pledge_id}",
        )
        return pledge_id

    def offer(self, vendor: str = VENDOR, **changes: Any) -> dict[str, Any]:
        """A quote that matches the batch request, with `changes` applied."""
        return {**self.quote(vendor, UNIT_PRICE), **changes}

    async def send_quote(self, quote: dict[str, Any]) -> str:
        return await self.p.publish(quote["vendor_id"], "quote.submitted.v1", quote)

    async def submit_offer(self, vendor: str = VENDOR, **changes: Any) -> str:
        quote = self.offer(vendor, **changes)
        await self.accepted(await self.send_quote(quote))
        return str(quote["quote_id"])

    async def send_award(self, quote_id: str) -> str:
        return await self.p.publish(
            "nipa",
            "quote.awarded.v1",
            {
                "batch_id": self.batch,
                "quote_id": quote_id,
                "awarded_at": "2025-06-02T10:00:00Z",
            },
        )

    async def awarded(self, export_status: str = "cleared", **end_user: str) -> str:
        """Fund, request, quote and award the batch; return the awarded quote once deliveries knows
        its export case. `end_user` overrides the quote's end user (a foreign HQ, a listed name)."""
        await self.pledge(str(AWARD_TOTAL * 5))
        await self.request()
        quote = self.offer()
        quote["end_user"] = {**quote["end_user"], **end_user}
        await self.accepted(await self.send_quote(quote))
        await self.award(quote["quote_id"])
        await self.deliveries_see(export_status)
        return str(quote["quote_id"])

    # --- logistics and the site -------------------------------------------------------------

    async def send_dispatch(self, shipment: str, serials: Sequence[str], batch: str | None = None) -> str:
        return await self.p.publish(
            LOGISTICS,
            "shipment.dispatched.v1",
            {
                "shipment_id": shipment,
                "batch_id": batch or self.batch,
                "carrier": "KAL Cargo",
                "serials": list(serials),
                "origin_country": "US",
                "route": ["JP"],
                "dispatched_at": "2025-07-01T00:00:00Z",
            },
        )

    async def send_receipt(self, shipment: str, received: Sequence[str], damaged: Sequence[str] = ()) -> str:
        return await self.p.publish(
            SITE,
            "shipment.received.v1",
            {
                "shipment_id": shipment,
                "batch_id": self.batch,
                "site_id": "haenam-1",
                "received_serials": list(received),
                "damaged_serials": list(damaged),
                "received_at": "2025-07-05T00:00:00Z",
            },
        )

    async def send_installation(self, serials: Sequence[str]) -> str:
        return await self.p.publish(
            SITE,
            "batch.installed.v1",
            {
                "batch_id": self.batch,
                "site_id": "haenam-1",
                "placements": [{"serial": s, "rack": "R07", "slot": str(i)} for i, s in enumerate(serials)],
                "installed_at": "2025-07-10T00:00:00Z",
            },
        )

    async def send_acceptance(self, passed: Sequence[str], failed: Sequence[str] = ()) -> str:
        return await self.p.publish(
            SITE,
            "batch.accepted.v1",
            {
                "batch_id": self.batch,
                "passed_serials": list(passed),
                "failed_serials": list(failed),
                "accepted_at": "2025-07-20T00:00:00Z",
                "report_uri": "https://example.invalid/acceptance.pdf",
            },
        )

    async def delivered(self, serials: Sequence[str], damaged: Sequence[str] = ()) -> str:
        """Dispatch and receive `serials` in one shipment; return the shipment id."""
        shipment = uid("S")
        await self.accepted(await self.send_dispatch(shipment, serials))
        await self.accepted(await self.send_receipt(shipment, serials, damaged))
        return shipment


@pytest.fixture
def case(e2e: E2E) -> Callable[..., Case]:
    """Cases on the session's stack (PostgreSQL), or on SQLite too where a test parametrises `backend`."""

    def make(**kw: Any) -> Case:
        return Case(e2e.partner, e2e.outcomes, e2e.api, e2e.database_urls, **kw)

    return make


# A representative few also run on the embedded default (SQLite): one rule per service that keeps state.
BOTH = pytest.mark.parametrize("backend", ["postgres", "sqlite"])


# --- pledges ------------------------------------------------------------------------------------


def capital(pledge_id: str, amount: str, currency: str = "KRW") -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": OWNER,
        "program_id": uid("prog"),
        "kind": "capital",
        "capital": {"amount": amount, "currency": currency},
        "committed_at": "2025-03-01T09:00:00Z",
        "due_by": "2025-12-31",
    }


def disbursement(pledge_id: str, amount: str) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": OWNER,
        "amount": {"amount": amount, "currency": "KRW"},
        "reference": uid("TR"),
    }


async def pledge_view(api: httpx.AsyncClient, pledge_id: str, until_version: int) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        r = await api.get(f"/v1/pledges/{pledge_id}")
        doc: dict[str, Any] | None = r.json() if r.status_code == 200 else None
        return doc if doc and doc["version"] >= until_version else None

    return await until(probe, f"the ledger to show pledge {pledge_id} at version {until_version}")


async def test_pledged_amount_must_be_positive(case: Callable[..., Case], partner: PartnerClient) -> None:
    g, pledge = case(), uid("P")
    await g.rejected(await partner.publish(OWNER, "pledge.committed.v1", capital(pledge, "0")), "AMOUNT_NOT_POSITIVE")
    # No pledge of 0 was created: the same pledge id commits (else DUPLICATE_PLEDGE).
    await g.accepted(await partner.publish(OWNER, "pledge.committed.v1", capital(pledge, "1000")))


async def test_pledged_currency_must_be_known(case: Callable[..., Case], partner: PartnerClient) -> None:
    g, pledge = case(), uid("P")
    await g.rejected(
        await partner.publish(OWNER, "pledge.committed.v1", capital(pledge, "1000", "XYZ")), "CURRENCY_UNKNOWN"
    )
    await g.accepted(await partner.publish(OWNER, "pledge.committed.v1", capital(pledge, "1000", "KRW")))


async def test_only_the_owner_amends_a_pledge(
    case: Callable[..., Case], partner: PartnerClient, api: httpx.AsyncClient
) -> None:
    g, pledge = case(), uid("P")
    await g.accepted(await partner.publish(OWNER, "pledge.committed.v1", capital(pledge, "1000")))
    # Kakao, speaking as itself (a valid identity), amends nhn-cloud's pledge down to 1 KRW.
    await g.rejected(
        await partner.publish(
            OTHER_PARTNER,
            "pledge.amended.v1",
            {
                "pledge_id": pledge,
                "partner_id": OTHER_PARTNER,
                "capital": {"amount": "1", "currency": "KRW"},
                "reason": "not mine to change",
            },
        ),
        "NOT_AUTHORIZED",
    )
    # Still 1000: the owner disburses all of it.
    await g.accepted(await partner.publish(OWNER, "pledge.disbursed.v1", disbursement(pledge, "1000")))
    doc = await pledge_view(api, pledge, until_version=2)
    assert doc["capital"] == {"amount": "1000", "currency": "KRW"}
    assert doc["partner_id"] == OWNER


async def test_disbursed_never_exceeds_pledged(
    case: Callable[..., Case], partner: PartnerClient, api: httpx.AsyncClient
) -> None:
    g, pledge = case(), uid("P")
    await g.accepted(await partner.publish(OWNER, "pledge.committed.v1", capital(pledge, "1000")))
    await g.accepted(await partner.publish(OWNER, "pledge.disbursed.v1", disbursement(pledge, "600")))
    await g.rejected(
        await partner.publish(OWNER, "pledge.disbursed.v1", disbursement(pledge, "401")), "DISBURSEMENT_EXCEEDS_PLEDGE"
    )
    # Exactly the remainder is accepted: the rejected 401 was not counted.
    await g.accepted(await partner.publish(OWNER, "pledge.disbursed.v1", disbursement(pledge, "400")))
    doc = await pledge_view(api, pledge, until_version=3)
    assert doc["disbursed"] == {"amount": "1000", "currency": "KRW"}


# --- quotes -------------------------------------------------------------------------------------


async def test_a_quote_for_an_unknown_batch_is_refused(case: Callable[..., Case]) -> None:
    g = case()
    quote = g.offer()  # the batch is never requested before this quote
    await g.rejected(await g.send_quote(quote), "UNKNOWN_BATCH")
    await g.request()
    # Nothing was stored: the same quote id is now accepted (else DUPLICATE_QUOTE).
    await g.accepted(await g.send_quote(quote))


async def test_a_quote_for_another_model_is_refused(case: Callable[..., Case]) -> None:
    g = case()
    await g.request()
    quote = g.offer(model="H100-SXM")
    await g.rejected(await g.send_quote(quote), "QUOTE_MISMATCH")
    await g.accepted(await g.send_quote({**quote, "model": g.model}))


@BOTH
async def test_a_quote_for_more_than_requested_is_refused(case: Callable[..., Case]) -> None:
    g = case()
    await g.request()
    quote = g.offer(quantity=g.quantity + 1)
    await g.rejected(await g.send_quote(quote), "QUOTE_MISMATCH")
    # Exactly the quantity requested is accepted, under the same quote id.
    await g.accepted(await g.send_quote({**quote, "quantity": g.quantity}))


async def test_only_its_vendor_withdraws_a_quote(case: Callable[..., Case], partner: PartnerClient) -> None:
    g = case()
    await g.request()
    quote = await g.submit_offer(VENDOR)

    def withdrawal(vendor: str) -> dict[str, Any]:
        return {"quote_id": quote, "batch_id": g.batch, "vendor_id": vendor, "reason": "price changed"}

    await g.rejected(
        await partner.publish(OTHER_VENDOR, "quote.withdrawn.v1", withdrawal(OTHER_VENDOR)), "NOT_AUTHORIZED"
    )
    # Still open: its own vendor withdraws it (a withdrawn quote would be QUOTE_NOT_OPEN).
    await g.accepted(await partner.publish(VENDOR, "quote.withdrawn.v1", withdrawal(VENDOR)))


async def test_a_withdrawn_quote_is_not_awarded(case: Callable[..., Case], partner: PartnerClient) -> None:
    g = case()
    await g.pledge(str(AWARD_TOTAL))
    await g.request()
    withdrawn = await g.submit_offer(VENDOR)
    standing = await g.submit_offer(OTHER_VENDOR)
    await g.accepted(
        await partner.publish(
            VENDOR,
            "quote.withdrawn.v1",
            {
                "quote_id": withdrawn,
                "batch_id": g.batch,
                "vendor_id": VENDOR,
                "reason": "capacity sold",
            },
        )
    )
    await g.rejected(await g.send_award(withdrawn), "QUOTE_NOT_OPEN")
    # The batch is still open for award.
    await g.accepted(await g.send_award(standing))


async def test_an_expired_quote_is_not_awarded(case: Callable[..., Case]) -> None:
    g = case()
    await g.pledge(str(AWARD_TOTAL))
    await g.request()
    stale = await g.submit_offer(VENDOR, valid_until="2025-06-01")  # the award is on 2025-06-02
    fresh = await g.submit_offer(OTHER_VENDOR, valid_until="2025-09-30")
    await g.rejected(await g.send_award(stale), "QUOTE_NOT_OPEN")
    await g.accepted(await g.send_award(fresh))


async def test_a_batch_is_awarded_once(case: Callable[..., Case], api: httpx.AsyncClient) -> None:
    g = case()
    await g.pledge(str(AWARD_TOTAL))
    await g.request()
    first = await g.submit_offer(VENDOR)
    second = await g.submit_offer(OTHER_VENDOR, quantity=g.quantity // 2)
    await g.award(first)
    await g.rejected(await g.send_award(second), "ALREADY_AWARDED")
    # The first award holds: all of its units ship (the second award was for half as many).
    await g.deliveries_see("cleared")
    await g.accepted(await g.send_dispatch(uid("S"), g.serials(0, g.quantity)))
    doc = await batch_view(api, g.batch, lambda d: d["status"] == "in_transit")
    assert doc["vendor_id"] == VENDOR and doc["quantities"]["awarded"] == g.quantity


@BOTH
async def test_an_award_beyond_earmarked_funding_is_refused_and_flagged(case: Callable[..., Case]) -> None:
    g = case()
    await g.pledge(str(AWARD_TOTAL - 1))
    await g.request()
    quote = await g.submit_offer(VENDOR)
    await g.rejected(await g.send_award(quote), "FUNDING_SHORTFALL")
    [flag] = await g.anomalies("FUNDING_SHORTFALL")
    assert flag["details"]["quote_id"] == quote
    assert (flag["details"]["required"], flag["details"]["earmarked"], flag["details"]["shortfall"]) == (
        str(AWARD_TOTAL),
        str(AWARD_TOTAL - 1),
        "1",
    )
    # The missing 1 KRW is pledged and the same award is sent again: the quote was still open.
    await g.pledge("1")
    await g.accepted(await g.send_award(quote))


# --- deliveries ---------------------------------------------------------------------------------


async def test_a_dispatch_for_an_unknown_batch_is_refused_and_flagged(
    case: Callable[..., Case], api: httpx.AsyncClient
) -> None:
    g = case()
    await g.awarded()
    shipment, serials, unknown = uid("S"), g.serials(0, 4), uid("B-unknown")
    await g.rejected(await g.send_dispatch(shipment, serials, batch=unknown), "UNKNOWN_BATCH")
    # Shipped for a batch nobody awarded, so without export clearance: auditors see it.

    async def flagged() -> list[dict[str, Any]] | None:
        r = await api.get("/v1/anomalies", params={"batch_id": unknown, "code": "EXPORT_VIOLATION"})
        return r.raise_for_status().json()["items"] or None

    await until(flagged, f"an EXPORT_VIOLATION for {unknown}")
    # Neither the shipment nor its serials were recorded: both ship for the real batch.
    await g.accepted(await g.send_dispatch(shipment, serials))


async def test_a_dispatch_before_export_clearance_is_refused_and_flagged(
    case: Callable[..., Case], partner: PartnerClient
) -> None:
    g = case()
    await g.awarded("license_required", headquarters_country="CN")
    shipment, serials = uid("S"), g.serials(0, g.quantity)
    await g.rejected(await g.send_dispatch(shipment, serials), "EXPORT_NOT_CLEARED")
    [violation] = await g.anomalies("EXPORT_VIOLATION")
    assert violation["details"]["shipment_id"] == shipment
    assert violation["details"]["export_status"] == "license_required"
    await g.accepted(
        await partner.publish(
            LICENSING,
            "license.granted.v1",
            {
                "batch_id": g.batch,
                "license_number": uid("D"),
                "quantity": g.quantity,
                "valid_until": "2027-06-30",
            },
        )
    )
    await g.deliveries_see("licensed")
    # Once licensed, the very same shipment goes: the refused one was not recorded.
    await g.accepted(await g.send_dispatch(shipment, serials))


@BOTH
async def test_dispatched_never_exceeds_awarded(case: Callable[..., Case]) -> None:
    g = case()
    await g.awarded()
    await g.accepted(await g.send_dispatch(uid("S"), g.serials(0, 5)))
    second, rest = uid("S"), g.serials(5, g.quantity + 1)  # 5 + 4 = 9 of the 8 awarded
    await g.rejected(await g.send_dispatch(second, rest), "QUANTITY_EXCEEDS_AWARD")
    # Exactly the remaining 3 ship, under the same shipment id.
    await g.accepted(await g.send_dispatch(second, rest[:-1]))


@BOTH
async def test_a_serial_is_unique_across_batches(case: Callable[..., Case]) -> None:
    first, second = case(), case()
    await asyncio.gather(first.awarded(), second.awarded())
    taken = first.serials(0, 2)
    await first.accepted(await first.send_dispatch(uid("S"), taken))
    shipment = uid("S")
    await second.rejected(await second.send_dispatch(shipment, [*second.serials(0, 1), taken[0]]), "SERIAL_DUPLICATE")
    await second.accepted(await second.send_dispatch(shipment, second.serials(0, 2)))


async def test_only_dispatched_serials_are_received(case: Callable[..., Case]) -> None:
    g = case()
    await g.awarded()
    shipment, serials = uid("S"), g.serials(0, 4)
    await g.accepted(await g.send_dispatch(shipment, serials))
    await g.rejected(await g.send_receipt(shipment, [*serials, *g.serials(4, 5)]), "SERIAL_UNKNOWN")
    # The shipment was not marked received (a second receipt would be OUT_OF_ORDER).
    await g.accepted(await g.send_receipt(shipment, serials))


async def test_a_damaged_unit_is_not_installed(case: Callable[..., Case]) -> None:
    g = case()
    await g.awarded()
    serials = g.serials(0, 4)
    await g.delivered(serials, damaged=serials[:1])
    await g.rejected(await g.send_installation(serials), "SERIAL_DAMAGED")
    # None of them was installed by the refused event (else SERIAL_DUPLICATE).
    await g.accepted(await g.send_installation(serials[1:]))


async def test_a_unit_never_received_is_not_installed(case: Callable[..., Case]) -> None:
    g = case()
    await g.awarded()
    here, on_the_way = g.serials(0, 4), g.serials(4, 6)
    await g.delivered(here)
    await g.accepted(await g.send_dispatch(uid("S"), on_the_way))
    await g.rejected(await g.send_installation([*here, on_the_way[0]]), "SERIAL_NOT_RECEIVED")
    await g.accepted(await g.send_installation(here))


async def test_a_unit_not_installed_is_not_accepted(case: Callable[..., Case]) -> None:
    g = case()
    await g.awarded()
    serials = g.serials(0, 4)
    await g.delivered(serials)
    installed = serials[:3]
    await g.accepted(await g.send_installation(installed))
    await g.rejected(await g.send_acceptance(serials), "SERIAL_NOT_INSTALLED")
    # None of them was accepted by the refused event (else SERIAL_DUPLICATE).
    await g.accepted(await g.send_acceptance(installed))


# --- export controls ----------------------------------------------------------------------------


async def test_a_licence_for_a_batch_that_needs_none_is_refused(
    case: Callable[..., Case], partner: PartnerClient, database_urls: dict[str, str]
) -> None:
    g = case()
    await g.awarded("cleared")
    await g.rejected(
        await partner.publish(
            LICENSING,
            "license.granted.v1",
            {
                "batch_id": g.batch,
                "license_number": uid("D"),
                "quantity": 2,
                "valid_until": "2027-06-30",
            },
        ),
        "LICENSE_NOT_REQUIRED",
    )
    # The case is as it was (cleared for the whole award, no licence), and all 8 units ship,
    # not only the 2 the licence named.
    row = await fetch_row(
        database_urls["export_controls"],
        "SELECT status, cleared_quantity, license_number FROM export_cases WHERE batch_id = %s",
        g.batch,
    )
    assert row == ("cleared", g.quantity, None)
    await g.accepted(await g.send_dispatch(uid("S"), g.serials(0, g.quantity)))


async def test_an_end_user_on_the_entity_list_is_denied_export(
    case: Callable[..., Case], partner: PartnerClient, api: httpx.AsyncClient
) -> None:
    g = case()
    # Declared as a Korean company, but named as a party on the Entity List: screening catches it.
    await g.awarded("denied", name="Huawei Technologies Korea Co., Ltd.", headquarters_country="KR")
    doc = await batch_view(api, g.batch, lambda d: d["status"] == "export_denied")
    assert doc["export"]["status"] == "denied"
    assert any("EL-HUAWEI" in step for step in doc["export_decision"]["reasoning"]), doc["export_decision"]
    [denial] = await g.anomalies("EXPORT_DENIED")
    assert denial["service"] == "export_controls"
    assert "EL-HUAWEI" in json.dumps(denial)
    # A denial is final: no licence reopens it.
    await g.rejected(
        await partner.publish(
            LICENSING,
            "license.granted.v1",
            {
                "batch_id": g.batch,
                "license_number": uid("D"),
                "quantity": g.quantity,
                "valid_until": "2027-06-30",
            },
        ),
        "EXPORT_DENIED",
    )
