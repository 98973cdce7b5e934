"""Poison records through real Kafka and PostgreSQL: each is answered (SCHEMA_INVALID) or
dead-lettered with its position, the valid pledge sent after it on the same partition is
accepted, the rejection's decision is in the ledger, and no service restarted.

Focused on the records that used to stop a consumer for good; the unit-level reader and the
bounded-retry path are in tests/test_admission.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import aiokafka.producer.message_accumulator as accumulator
import aiokafka.producer.producer as producer_module
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from tests.partner import PartnerClient, TopicWatcher
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOPIC = "partner.pledges.v1"


class RawName(str):
    """A header name sent as these bytes: aiokafka's Python batch builder calls .encode() on it.
    (Kafka allows any bytes in a header name; aiokafka's client API only takes text.)"""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("utf-8", "replace"))
        name.raw = raw
        return name

    def encode(self, *_: Any, **__: Any) -> bytes:  # type: ignore[override]
        return self.raw


def pledge(pledge_id: str) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": "kdb",
        "program_id": "poison",
        "kind": "capital",
        "capital": {"amount": "10", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


def replaced(headers: list[tuple[str, bytes]], name: str, value: bytes) -> list[tuple[str, bytes]]:
    return [(k, value if k == name else v) for k, v in headers]


async def test_poison_records_are_answered_or_dead_lettered_and_the_partition_flows(
    partner: PartnerClient,
    outcomes: TopicWatcher,
    dlq: TopicWatcher,
    stack: Stack,
    database_urls: dict[str, str],
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pids = {name: proc.proc.pid for name, proc in stack.processes.items() if proc.proc}
    # A producer that can write a header name that is not UTF-8 (test-side only).
    monkeypatch.setattr(accumulator, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    monkeypatch.setattr(producer_module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await raw.start()

    rejected: dict[str, tuple[str, str]] = {}  # event id -> (expected message part, pledge id)
    lettered: dict[str, str] = {}  # pledge id (the key) -> expected reason part
    followers: list[str] = []

    async def then_a_good_pledge(pid: str) -> None:
        followers.append(await partner.publish("kdb", "pledge.committed.v1", pledge(pid)))

    def base(pid: str) -> tuple[bytes, bytes, list[tuple[str, bytes]], str]:
        return partner.record("kdb", "pledge.committed.v1", pledge(pid))

    try:
        for name, value, expect in [
            ("deep", b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32"),
            ("huge-int", b'{"n": ' + b"9" * 5000 + b"}", "beyond ±(2^53 − 1)"),
            ("2^53+1", b'{"pledge_id": "x", "n": 9007199254740993}', "beyond ±(2^53 − 1)"),
        ]:
            pid = f"P-{name}-{uuid.uuid4().hex[:8]}"
            key, _, headers, event_id = base(pid)
            await partner.send_raw(TOPIC, key, value, headers)
            rejected[event_id] = (expect, pid)
            await then_a_good_pledge(pid)

        pid = f"P-type-{uuid.uuid4().hex[:8]}"
        key, value, headers, event_id = base(pid)
        await partner.send_raw(TOPIC, key, value, replaced(headers, "ce_type", b"gputrace." + b"t" * 291))
        rejected[event_id] = ("ce_type is 300 characters long", pid)
        await then_a_good_pledge(pid)

        pid = f"P-id-{uuid.uuid4().hex[:8]}"
        key, value, headers, _ = base(pid)
        await partner.send_raw(TOPIC, key, value, replaced(headers, "ce_id", b"i" * 300))
        lettered[pid] = "ce_id is 300 characters long"
        await then_a_good_pledge(pid)

        pid = f"P-name-{uuid.uuid4().hex[:8]}"
        key, value, headers, _ = base(pid)
        await raw.send_and_wait(TOPIC, value, key=key, headers=[*headers, (RawName(b"ce_\xff\xfe"), b"x")])
        lettered[pid] = "header name 'ce_\\xff\\xfe' is not UTF-8"
        await then_a_good_pledge(pid)
    finally:
        await raw.stop()

    got = await outcomes.outcomes(*followers, timeout=90)
    assert [g["status"] for g in got] == ["accepted"] * len(followers), got
    answers = await outcomes.outcomes(*rejected, timeout=30)
    for answer, (expect, _) in zip(answers, rejected.values(), strict=True):
        assert (answer["status"], answer["reason_code"]) == ("rejected", "SCHEMA_INVALID"), answer
        assert expect in answer["message"], answer

    def letters() -> dict[str, dict[str, Any]]:
        by_key = {}
        for rec in dlq.records:
            doc = json.loads(rec.value)
            key = base64.b64decode(doc.get("key_b64") or "").decode(errors="replace")
            by_key[key] = doc
        return by_key

    await dlq.wait(lambda: set(lettered) <= set(letters()), timeout=30)
    for pid, reason in lettered.items():
        letter = letters()[pid]
        assert reason in letter["reason"], letter
        assert letter["topic"] == TOPIC and letter["partition"] >= 0 and letter["offset"] >= 0
        assert letter["value_sha256"] and letter["value_b64"]

    # Every rejection's decision is in the ledger, the 2^53+1 one included (it could not be
    # canonicalised before): found by decision id in the ledger's own database.
    wanted = {a["decision_id"] for a in answers}
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        with psycopg.connect(database_urls["ledger"]) as conn:
            rows = conn.execute(
                "SELECT decision_id, entry FROM log_entries WHERE decision_id = ANY(%s)", (list(wanted),)
            ).fetchall()
        if len(rows) == len(wanted) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert {r[0] for r in rows} == wanted
    for _, entry in rows:
        doc = json.loads(entry)
        assert doc["reason_code"] == "SCHEMA_INVALID" and "data_sha256" in doc["event"]

    # No service restarted on the way.
    assert {name: proc.proc.pid for name, proc in stack.processes.items() if proc.proc} == pids
    assert all(proc.running for proc in stack.processes.values())
