"""The auditor API's bearer roles over real HTTP: auditor reads everything, a partner only what
concerns its own party, ops the log and the aggregate views; 401 without a valid token."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.partner import PartnerClient, TopicWatcher
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _fund_and_request(
    partner: PartnerClient, outcomes: TopicWatcher, party: str, program: str, batch: str
) -> str:
    pledge = uid("P")
    ids = [
        await partner.publish(party, "pledge.committed.v1", {
            "pledge_id": pledge, "partner_id": party, "program_id": program, "kind": "capital",
            "capital": {"amount": "1000", "currency": "KRW"}, "earmark_batch_id": batch,
            "committed_at": "2025-03-01T00:00:00Z", "due_by": "2025-12-31",
        }),
        await partner.publish("nipa", "batch.requested.v1", {
            "batch_id": batch, "program_id": program, "model": "B200", "quantity": 2, "site_id": "haenam-1",
            "needed_by": "2025-12-31",
        }),
    ]  # fmt: skip
    assert [o["status"] for o in await outcomes.outcomes(*ids)] == ["accepted", "accepted"]
    return pledge


async def _until_listed(api: httpx.AsyncClient, program: str, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        total = (await api.get("/v1/batches", params={"program_id": program})).json()["total"]
        pledges = (await api.get("/v1/program", params={"program_id": program})).json()["pledges"]
        if total == count and pledges == count:
            return
        assert asyncio.get_running_loop().time() < deadline, "the ledger never listed the batches"
        await asyncio.sleep(0.3)


async def test_roles(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, stack: Stack, tokens: dict[str, str]
) -> None:
    program = uid("roles")
    kakao_batch, nhn_batch = uid("B-kakao"), uid("B-nhn")
    kakao_pledge = await _fund_and_request(partner, outcomes, "kakao", program, kakao_batch)
    nhn_pledge = await _fund_and_request(partner, outcomes, "nhn-cloud", program, nhn_batch)
    await _until_listed(api, program, 2)

    def client(token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=stack.api_url, headers=headers, timeout=30)

    async with client(None) as anonymous, client("not-a-token") as stranger:
        for path in ("/v1/program", "/v1/batches", "/v1/anomalies", f"/v1/pledges/{kakao_pledge}",
                     f"/v1/batches/{kakao_batch}", "/v1/log/checkpoint"):  # fmt: skip
            for who in (anonymous, stranger):
                r = await who.get(path)
                assert r.status_code == 401, (path, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"

    async with client(tokens["partner:kakao"]) as kakao:

        async def get(path: str, **params: Any) -> httpx.Response:
            return await kakao.get(path, params=params)

        # Its own pledge and batch, not another partner's.
        assert (await get(f"/v1/pledges/{kakao_pledge}")).status_code == 200
        assert (await get(f"/v1/pledges/{nhn_pledge}")).status_code == 403
        assert (await get(f"/v1/batches/{kakao_batch}")).status_code == 200
        assert (await get(f"/v1/batches/{nhn_batch}")).status_code == 404
        listed = (await get("/v1/batches", program_id=program)).json()
        assert [b["batch_id"] for b in listed["items"]] == [kakao_batch]
        assert (await get("/v1/batches", partner="nhn-cloud")).status_code == 403
        summary = (await get("/v1/program", program_id=program)).json()
        assert list(summary["by_partner"]) == ["kakao"]
        # The full procurement record (competitors' bids) and the raw log are for auditors and ops.
        assert (await get(f"/v1/batches/{kakao_batch}/ocds")).status_code == 403
        assert (await get(f"/v1/batches/{kakao_batch}/epcis")).status_code == 200
        assert (await get("/v1/log/entries", start=0, end=1)).status_code == 403

    async with client(tokens["ops"]) as ops:
        assert (await ops.get("/v1/log/checkpoint")).status_code == 200
        assert (await ops.get("/v1/batches", params={"program_id": program})).json()["total"] == 2
        assert (await ops.get(f"/v1/pledges/{kakao_pledge}")).status_code == 403

    # The auditor reads everything.
    assert (await api.get(f"/v1/pledges/{nhn_pledge}")).status_code == 200
    summary = (await api.get("/v1/program", params={"program_id": program})).json()
    assert sorted(summary["by_partner"]) == ["kakao", "nhn-cloud"]
    assert (await api.get(f"/v1/batches/{nhn_batch}/ocds")).status_code == 200
