"""KEY_MISMATCH through real Kafka and PostgreSQL: the record key decides the partition (so which
replica decides the event) but is not signed. A copy of a genuine event under another key is
refused, answered and counted, and never shadows the genuine event sent later under its own key
(docs/partner-contract.md §2)."""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
import pytest

from shared.contract import PLEDGES_TOPIC
from tests.partner import PartnerClient, TopicWatcher
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")


def capital(pledge_id: str, partner: str, amount: str) -> dict[str, str | dict[str, str]]:
    return {
        "pledge_id": pledge_id,
        "partner_id": partner,
        "program_id": f"keys-{pledge_id}",
        "kind": "capital",
        "capital": {"amount": amount, "currency": "KRW"},
        "committed_at": "2025-03-01T09:00:00Z",
        "due_by": "2025-12-31",
    }


def key_mismatches(stack: Stack) -> float:
    """The pledges service's count of KEY_MISMATCH rejections (gputrace_decisions_total)."""
    text = httpx.get(f"http://127.0.0.1:{stack.ports['pledges']}/metrics/", timeout=10, follow_redirects=True).text
    pattern = r'^gputrace_decisions_total\{[^}]*reason="KEY_MISMATCH"[^}]*\} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, text, re.MULTILINE))


async def test_a_rekeyed_copy_is_refused_and_the_genuine_event_is_still_accepted(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, stack: Stack
) -> None:
    pledge = f"P-keys-{uuid.uuid4().hex[:10]}"
    counted = key_mismatches(stack)
    key, value, headers, event_id = partner.record(
        "kt-cloud", "pledge.committed.v1", capital(pledge, "kt-cloud", "700")
    )
    assert key == pledge.encode()

    # Whoever saw the signed record re-sends it under another key (another partition), and once with none.
    await partner.send_raw(PLEDGES_TOPIC, b"elsewhere-" + key, value, headers)
    await partner.send_raw(PLEDGES_TOPIC, None, value, headers)
    await outcomes.wait(lambda: len(outcomes.by_event[event_id]) >= 1)
    refused = outcomes.by_event[event_id][0]
    assert (refused["status"], refused["reason_code"]) == ("rejected", "KEY_MISMATCH"), refused
    assert pledge in refused["message"]

    # The genuine record, under its aggregate's key: accepted, not taken for a redelivery.
    await partner.send_raw(PLEDGES_TOPIC, key, value, headers)
    await outcomes.wait(lambda: any(o["status"] == "accepted" for o in outcomes.by_event[event_id]), timeout=90)
    got = outcomes.by_event[event_id]
    assert [o["status"] for o in got].count("accepted") == 1, got
    # The null-keyed copy has the same bytes as the first copy: one rejection answers both.
    assert [(o["status"], o["reason_code"]) for o in got if o["status"] == "rejected"] == [
        ("rejected", "KEY_MISMATCH")
    ], got
    # The accepted decision is the genuine event's own (its id from (source, ce_id)), unlike the refusal's.
    accepted = next(o for o in got if o["status"] == "accepted")
    assert accepted["decision_id"] != refused["decision_id"]

    # The pledge exists once (the ledger's view), and the refusal was counted like any other.
    for _ in range(100):
        answer = await api.get(f"/v1/pledges/{pledge}")
        if answer.status_code == 200:
            break
        await asyncio.sleep(0.3)
    assert answer.status_code == 200 and answer.json()["version"] == 1, answer.text
    assert key_mismatches(stack) >= counted + 1
