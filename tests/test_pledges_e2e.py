"""Pledges through real Kafka and PostgreSQL: partners publish with plain aiokafka, read their
outcomes, and the ledger's API shows the programme totals (docs/partner-contract.md and docs/architecture.md §5–§6)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.partner import PartnerClient, TopicWatcher

pytestmark = pytest.mark.asyncio(loop_scope="session")


def capital(pledge_id: str, partner: str, program: str, amount: str, **extra: Any) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": partner,
        "program_id": program,
        "kind": "capital",
        "capital": {"amount": amount, "currency": "KRW"},
        "committed_at": "2025-03-01T09:00:00Z",
        "due_by": "2025-12-31",
        **extra,
    }


def gpus(pledge_id: str, partner: str, program: str, model: str, quantity: int) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": partner,
        "program_id": program,
        "kind": "gpus",
        "gpus": {"model": model, "quantity": quantity},
        "committed_at": "2025-03-01T09:00:00Z",
        "due_by": "2025-12-31",
    }


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_program(api: httpx.AsyncClient, program: str, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        doc = (await api.get("/v1/program", params={"program_id": program})).raise_for_status().json()
        if check(doc):
            return doc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"programme never reached the expected state: {json.dumps(doc, indent=1)}")
        await asyncio.sleep(0.3)


async def test_each_pledge_event_gets_one_decision_and_the_ledger_totals(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient
) -> None:
    program = uid("prog")
    nhn, kakao, naver = uid("P-nhn"), uid("P-kakao"), uid("P-naver")
    ids = [
        await partner.publish("nhn-cloud", "pledge.committed.v1", capital(nhn, "nhn-cloud", program, "400000000000")),
        await partner.publish("kakao", "pledge.committed.v1", gpus(kakao, "kakao", program, "B200", 2424)),
        await partner.publish(
            "naver-cloud", "pledge.committed.v1", gpus(naver, "naver-cloud", program, "H200-SXM", 3056)
        ),
        await partner.publish(
            "nhn-cloud",
            "pledge.disbursed.v1",
            {
                "pledge_id": nhn,
                "partner_id": "nhn-cloud",
                "amount": {"amount": "125000000000", "currency": "KRW"},
                "reference": "KDB-TR-0001",
            },
        ),
        await partner.publish(
            "kakao",
            "pledge.amended.v1",
            {
                "pledge_id": kakao,
                "partner_id": "kakao",
                "gpus": {"model": "B200", "quantity": 2500},
                "reason": "second tranche confirmed",
            },
        ),
    ]
    results = await outcomes.outcomes(*ids)
    assert [r["status"] for r in results] == ["accepted"] * 5, results
    doc = await wait_program(
        api, program, lambda d: d["disbursed"].get("KRW") == "125000000000" and d["gpus_total"] == 5556
    )
    assert doc["capital"] == {"KRW": "400000000000"}
    assert doc["gpus"] == {"B200": 2500, "H200-SXM": 3056}
    assert doc["progress"]["gpus_pledged"] == 5556
    assert doc["by_partner"]["kakao"]["gpus"] == {"B200": 2500}
    assert doc["by_partner"]["nhn-cloud"]["disbursed"] == {"KRW": "125000000000"}

    one = (await api.get(f"/v1/pledges/{kakao}")).raise_for_status().json()
    assert one["gpus"] == {"model": "B200", "quantity": 2500} and one["version"] == 2
    await asyncio.sleep(0.5)
    assert all(len(outcomes.by_event[e]) == 1 for e in ids), "an event got more than one outcome"


async def test_a_redelivered_event_changes_nothing(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient
) -> None:
    program, pledge = uid("prog"), uid("P")
    first = await partner.publish("kt-cloud", "pledge.committed.v1", capital(pledge, "kt-cloud", program, "1000"))
    disburse = {
        "pledge_id": pledge,
        "partner_id": "kt-cloud",
        "amount": {"amount": "600", "currency": "KRW"},
        "reference": "R-1",
    }
    key, value, headers, event_id = partner.record("kt-cloud", "pledge.disbursed.v1", disburse)
    for _ in range(3):  # the same record, three times: a producer retry, a replay, a redelivery
        await partner.send_raw("partner.pledges.v1", key, value, headers)
    # A later event on the same key (same partition) proves the copies were consumed.
    sentinel = await partner.publish(
        "kt-cloud",
        "pledge.amended.v1",
        {"pledge_id": pledge, "partner_id": "kt-cloud", "due_by": "2026-06-30", "reason": "sentinel"},
    )
    got = await outcomes.outcomes(first, event_id, sentinel)
    assert [g["status"] for g in got] == ["accepted", "accepted", "accepted"], got
    await asyncio.sleep(0.5)
    # Raw records, not distinct ids: the copies got no second outcome at all.
    assert len(outcomes.by_event[event_id]) == 1, outcomes.by_event[event_id]
    doc = await wait_program(
        api, program, lambda d: d["by_partner"].get("kt-cloud", {}).get("disbursed") not in (None, {"KRW": "0"})
    )
    # Disbursed once (600), not three times; a second copy would also have breached the pledge.
    assert doc["disbursed"] == {"KRW": "600"}


async def test_bad_input_is_rejected_or_dead_lettered_and_valid_events_still_flow(
    partner: PartnerClient, outcomes: TopicWatcher, dlq: TopicWatcher, api: httpx.AsyncClient
) -> None:
    program, pledge = uid("prog"), uid("P")
    ok = await partner.publish("nhn-cloud", "pledge.committed.v1", capital(pledge, "nhn-cloud", program, "500"))
    await outcomes.outcome(ok)
    cases: dict[str, str] = {}
    amend = {
        "pledge_id": pledge,
        "partner_id": "nhn-cloud",
        "capital": {"amount": "1", "currency": "KRW"},
        "reason": "forged",
    }
    # Signed by kakao's key while claiming to be nhn-cloud.
    cases["SIGNATURE_INVALID"] = await partner.publish("nhn-cloud", "pledge.amended.v1", amend, sign_as="kakao")
    # No signature at all.
    cases["SIGNATURE_INVALID/missing"] = await partner.publish(
        "nhn-cloud", "pledge.amended.v1", amend, drop=("ce_signature",)
    )
    # A party nobody registered (signs with some key; the registry has none for it).
    key, value, headers, unknown = partner.record(
        "nobody-inc", "pledge.committed.v1", capital(uid("P"), "nobody-inc", program, "5"), sign_as="kakao"
    )
    await partner.send_raw("partner.pledges.v1", key, value, headers)
    cases["UNKNOWN_PARTY"] = unknown
    # Kakao amends nhn-cloud's pledge, speaking as itself...
    cases["NOT_AUTHORIZED/owner"] = await partner.publish(
        "kakao", "pledge.amended.v1", {**amend, "partner_id": "kakao"}, subject=pledge
    )
    # ...and speaking as nhn-cloud (a foreign identity).
    cases["NOT_AUTHORIZED/identity"] = await partner.publish(
        "kakao", "pledge.withdrawn.v1", {"pledge_id": pledge, "partner_id": "nhn-cloud", "reason": "not mine"}
    )
    cases["DISBURSEMENT_EXCEEDS_PLEDGE"] = await partner.publish(
        "nhn-cloud",
        "pledge.disbursed.v1",
        {
            "pledge_id": pledge,
            "partner_id": "nhn-cloud",
            "amount": {"amount": "501", "currency": "KRW"},
            "reference": "too much",
        },
    )
    cases["SCHEMA_INVALID"] = await partner.publish(
        "nhn-cloud", "pledge.committed.v1", {"pledge_id": uid("P"), "partner_id": "nhn-cloud", "kind": "capital"}
    )
    cases["UNKNOWN_PLEDGE"] = await partner.publish(
        "nhn-cloud", "pledge.withdrawn.v1", {"pledge_id": uid("nope"), "partner_id": "nhn-cloud", "reason": "x"}
    )
    # Records that are not events at all: bytes that are not JSON, and a record without ce_type.
    key, _, headers, bad_json_id = partner.record(
        "nhn-cloud", "pledge.committed.v1", capital(uid("P"), "nhn-cloud", program, "1")
    )
    await partner.send_raw("partner.pledges.v1", pledge.encode(), b'{"pledge_id": oops', headers)
    key, value, headers, _ = partner.record(
        "nhn-cloud", "pledge.committed.v1", capital(uid("P"), "nhn-cloud", program, "1"), drop=("ce_type",)
    )
    await partner.send_raw("partner.pledges.v1", pledge.encode(), value, headers)
    # A valid event after all of that, on the same partition (same key), still flows.
    after = await partner.publish(
        "nhn-cloud",
        "pledge.disbursed.v1",
        {
            "pledge_id": pledge,
            "partner_id": "nhn-cloud",
            "amount": {"amount": "200", "currency": "KRW"},
            "reference": "fine",
        },
    )
    assert (await outcomes.outcome(after))["status"] == "accepted"
    for expected, event_id in cases.items():
        got = await outcomes.outcome(event_id)
        assert got["status"] == "rejected", (expected, got)
        assert got["reason_code"] == expected.split("/")[0], (expected, got)
        assert got["message"]
    await dlq.wait(lambda: len(_letters_for(dlq, pledge.encode())) >= 2)
    letters = _letters_for(dlq, pledge.encode())
    reasons = " | ".join(letter["reason"] for letter in letters)
    assert "not JSON" in reasons and "ce_type" in reasons, reasons
    raw = next(letter for letter in letters if "not JSON" in letter["reason"])
    assert base64.b64decode(raw["value_b64"]) == b'{"pledge_id": oops'
    assert raw["topic"] == "partner.pledges.v1" and raw["offset"] >= 0 and raw["partition"] >= 0
    assert bad_json_id not in outcomes.by_event  # not an event: no outcome, a dead letter
    doc = await wait_program(api, program, lambda d: d["disbursed"].get("KRW") == "200")
    assert doc["capital"] == {"KRW": "500"}  # no forged amendment took effect


def _letters_for(dlq: TopicWatcher, key: bytes) -> list[dict[str, Any]]:
    out = []
    for rec in dlq.records:
        doc = json.loads(rec.value)
        if doc.get("key_b64") == base64.b64encode(key).decode():
            out.append(doc)
    return out


async def test_pledges_service_killed_mid_stream_loses_and_duplicates_nothing(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, stack: Any, database_urls: dict[str, str]
) -> None:
    program = uid("prog")
    pledges = [uid("K") for _ in range(400)]
    acked: list[str] = []
    for i, p in enumerate(pledges):
        acked.append(await partner.publish("ibk", "pledge.committed.v1", capital(p, "ibk", program, "10")))
        if i == 150:
            await outcomes.wait(lambda: sum(1 for e in acked if outcomes.by_event.get(e)) >= 50, timeout=60)
            stack.processes["pledges"].kill()
        if i == 300:
            stack.processes["pledges"].start()
    await outcomes.outcomes(*acked, timeout=120)
    for e in acked:
        assert len({o["decision_id"] for o in outcomes.by_event[e]}) == 1
        assert outcomes.by_event[e][0]["status"] == "accepted", outcomes.by_event[e]
    doc = await wait_program(api, program, lambda d: d["pledges"] == len(pledges), timeout=90)
    assert doc["capital"] == {"KRW": str(10 * len(pledges))}
    # Exactly one ledger entry per pledge, read from the ledger's own database.
    with psycopg.connect(database_urls["ledger"]) as conn:
        rows = conn.execute(
            "SELECT aggregate_id, count(*) FROM log_entries WHERE aggregate_id = ANY(%s) GROUP BY aggregate_id",
            (pledges,),
        ).fetchall()
    assert len(rows) == len(pledges) and all(n == 1 for _, n in rows)
