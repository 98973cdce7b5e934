"""Trust boundaries of the ledger's views, through real Kafka and the real services: a rejected
event is in the log but grants no access and creates no batch; /metrics does not take label
values from the sender."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.partner import PartnerClient, TopicWatcher
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def quote(batch: str, vendor: str) -> dict[str, Any]:
    return {
        "quote_id": uid("Q"),
        "batch_id": batch,
        "vendor_id": vendor,
        "model": "B200",
        "quantity": 2,
        "unit_price": {"amount": "40000.00", "currency": "KRW"},
        "valid_until": "2025-09-30",
        "lead_time_days": 60,
        "origin_country": "US",
        "route": ["JP"],
        "consignee": "haenam-1",
        "end_user": {"name": "Haenam Cloud Operations", "country": "KR", "headquarters_country": "KR"},
    }


async def logged(api: httpx.AsyncClient, *event_ids: str, timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Waits until the ledger has appended a decision on each event; returns them by event id.
    Without this wait a 404 would prove nothing (the decision might simply not be there yet)."""
    deadline = asyncio.get_running_loop().time() + timeout
    found: dict[str, dict[str, Any]] = {}
    start = 0
    while True:
        r = await api.get("/v1/log/checkpoint")
        size = int(r.text.splitlines()[1]) if r.status_code == 200 else 0
        while start < size:
            end = min(start + 1000, size)
            for e in (await api.get("/v1/log/entries", params={"start": start, "end": end})).raise_for_status().json():
                doc = json.loads(e["entry"])
                event_id = (doc.get("event") or {}).get("id")
                if event_id in event_ids:
                    found[event_id] = doc
            start = end
        if len(found) == len(event_ids):
            return found
        assert asyncio.get_running_loop().time() < deadline, f"the ledger never logged {set(event_ids) - set(found)}"
        await asyncio.sleep(0.3)


async def test_rejections_grant_no_access_and_create_no_batch(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, stack: Stack, tokens: dict[str, str]
) -> None:
    program, batch, ghost = uid("trust"), uid("B-1"), uid("B-ghost")
    requested = await partner.publish("nipa", "batch.requested.v1", {
        "batch_id": batch, "program_id": program, "model": "B200", "quantity": 2, "site_id": "haenam-1",
        "needed_by": "2025-12-31",
    })  # fmt: skip
    assert (await outcomes.outcome(requested))["status"] == "accepted"
    # kakao is a partner, not a vendor: its quote for B-1 is refused, and so is one for a batch
    # that does not exist; a third claims to be samsung but is signed with kakao's key.
    attacks = [
        await partner.publish("kakao", "quote.submitted.v1", quote(batch, "kakao")),
        await partner.publish("kakao", "quote.submitted.v1", quote(ghost, "kakao")),
        await partner.publish("dell-korea", "quote.submitted.v1", quote(ghost, "dell-korea"), sign_as="kakao"),
    ]
    reasons = [o["reason_code"] for o in await outcomes.outcomes(*attacks)]
    assert reasons == ["NOT_AUTHORIZED", "NOT_AUTHORIZED", "SIGNATURE_INVALID"]
    entries = await logged(api, requested, *attacks)
    # They are facts: in the log, with the batch id and party they claimed.
    assert entries[attacks[0]]["status"] == "rejected" and entries[attacks[0]]["batch_id"] == batch

    async with httpx.AsyncClient(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {tokens['partner:kakao']}"}, timeout=30
    ) as kakao:
        assert (await kakao.get(f"/v1/batches/{batch}")).status_code == 404
        assert (await kakao.get(f"/v1/batches/{batch}/epcis")).status_code == 404
        listed = (await kakao.get("/v1/batches", params={"program_id": program})).raise_for_status().json()
        assert listed["total"] == 0 and listed["items"] == []
        assert (await kakao.get(f"/v1/batches/{ghost}")).status_code == 404
    # The auditor sees B-1 (requested by nipa), and no phantom batch for the unknown id.
    assert (await api.get(f"/v1/batches/{batch}")).status_code == 200
    assert (await api.get(f"/v1/batches/{ghost}")).status_code == 404
    assert (await api.get("/v1/batches", params={"program_id": program})).json()["total"] == 1


async def test_metrics_do_not_take_the_senders_type(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, stack: Stack
) -> None:
    random_type = f"quote.x{uuid.uuid4().hex[:12]}.v1"
    event = await partner.publish("dell-korea", random_type, quote(uid("B"), "dell-korea"))
    assert (await outcomes.outcome(event))["reason_code"] == "UNKNOWN_TYPE"
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{stack.ports['quotes']}/metrics/")).raise_for_status().text
    assert random_type not in text and random_type.split(".")[1] not in text
    other = {"service": "quotes", "event_type": "other", "status": "rejected", "reason": "UNKNOWN_TYPE"}
    counted = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gputrace_decisions_total" and sample.labels == other
    ]
    assert counted and counted[0] >= 1
