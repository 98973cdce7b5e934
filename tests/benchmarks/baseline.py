"""The fair baseline gputrace is judged against: a minimal hand-written service doing the same
essential work per event on the same Kafka and PostgreSQL, with nothing else (no ORM, no
framework, no rules beyond the essentials).

Two roles, each one process (as gputrace's pledges service and ledger are). Signatures go through
the same Ed25519 functions as gputrace's (shared.contract.ed25519, libsodium): the comparison is of
everything else.

- `decide`: per polled batch, for each partner event: parse (headers + JSON), RFC 8785, Ed25519
  verify; then ONE transaction: dedupe (processed keys), state upsert, processed rows, outbox rows
  (decision + outcome); commit; produce the decision and the outcome; commit the offsets.
- `append`: per polled batch of decisions: parse, RFC 8785, Ed25519 verify (when decisions are
  signed), leaf hash; ONE transaction: dedupe, append the log entries after the head, move the
  head, processed rows; commit; commit the offsets.

    python -m tests.benchmarks.baseline decide --bootstrap ... --db ... --registry ... --topics IN,DECISIONS,OUTCOMES
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import rfc8785
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.contract import ed25519
from shared.contract.parties import PartyRegistry

SCHEMA = """
CREATE TABLE IF NOT EXISTS base_state (id text PRIMARY KEY, state text NOT NULL);
CREATE TABLE IF NOT EXISTS base_processed (
    role text, source text, event_id text, PRIMARY KEY (role, source, event_id));
CREATE TABLE IF NOT EXISTS base_outbox (
    id bigserial PRIMARY KEY, topic text, key bytea, value bytea, headers text);
CREATE TABLE IF NOT EXISTS base_log (seq bigint PRIMARY KEY, aggregate_id text, leaf bytea, entry bytea);
CREATE TABLE IF NOT EXISTS base_head (id int PRIMARY KEY, size bigint NOT NULL);
INSERT INTO base_head VALUES (1, 0) ON CONFLICT DO NOTHING;
"""


def decision_key(seed: str) -> Ed25519PrivateKey:
    """The baseline's own signing key, derived from the run's seed so both roles know it."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed.encode()).digest())


def _attrs(record: ConsumerRecord) -> tuple[dict[str, Any], str | None]:
    attrs: dict[str, Any] = {}
    signature = None
    for name, value in record.headers:
        if name == "ce_signature":
            signature = value.decode()
        elif name.startswith("ce_"):
            attrs[name[3:]] = value.decode()
        elif name == "content-type":
            attrs["datacontenttype"] = value.decode()
    return attrs, signature


def _verified(structured: dict[str, Any], signature: str | None, key: Any) -> bool:
    if signature is None:
        return False
    try:
        raw = base64.b64decode(signature)
    except ValueError:
        return False
    return ed25519.verify(key, raw, rfc8785.dumps(structured))


async def _seen(cur: psycopg.AsyncCursor[Any], role: str, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    await cur.execute(
        "SELECT source, event_id FROM base_processed WHERE role = %s AND (source, event_id) IN "
        "(SELECT * FROM unnest(%s::text[], %s::text[]))",
        (role, [k[0] for k in keys], [k[1] for k in keys]),
    )
    return {(s, e) for s, e in await cur.fetchall()}


async def decide(args: argparse.Namespace) -> None:
    registry = PartyRegistry.load(args.registry)
    in_topic, decisions_topic, outcomes_topic = args.topics.split(",")
    key = decision_key(args.seed) if args.sign_decisions else None
    source = "urn:gputrace:service:baseline"
    conn = await psycopg.AsyncConnection.connect(args.db)
    consumer = AIOKafkaConsumer(
        in_topic,
        bootstrap_servers=args.bootstrap,
        group_id=f"base-decide-{args.seed}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await consumer.start()
    await producer.start()
    try:
        while True:
            polled = await consumer.getmany(timeout_ms=100, max_records=args.batch)
            records = [r for recs in polled.values() for r in recs]
            if not records:
                continue
            events = []
            for record in records:
                attrs, signature = _attrs(record)
                data = json.loads(record.value)
                party = registry.by_source(attrs.get("source", ""))
                ok = party is not None and _verified({**attrs, "data": data}, signature, party.public_key)
                events.append((attrs, data, ok))
            out: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []
            async with conn.transaction(), conn.cursor() as cur:
                seen = await _seen(cur, "decide", [(a["source"], a["id"]) for a, _, _ in events])
                states, processed = [], []
                for attrs, data, ok in events:
                    k = (attrs["source"], attrs["id"])
                    if k in seen:
                        continue
                    seen.add(k)
                    status = "accepted" if ok else "rejected"
                    if ok:
                        states.append((data["pledge_id"], json.dumps({"status": "committed", **data})))
                    decision_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"baseline/{k[0]}/{k[1]}"))
                    decision = {
                        "decision_id": decision_id,
                        "service": "baseline",
                        "status": status,
                        "event_type": attrs.get("type"),
                        "aggregate_id": data.get("pledge_id"),
                        "event": {**attrs, "data": data},
                    }
                    d_attrs = {"specversion": "1.0", "id": decision_id, "source": source, "type": "decision"}
                    d_attrs["subject"] = str(data.get("pledge_id"))
                    headers = [(f"ce_{n}", v.encode()) for n, v in d_attrs.items()]
                    if key is not None:
                        sig = ed25519.sign(key, rfc8785.dumps({**d_attrs, "data": decision}))
                        headers.append(("ce_signature", base64.b64encode(sig).decode().encode()))
                    outcome = {"event_id": attrs["id"], "status": status, "decision_id": decision_id}
                    o_headers = [("ce_id", decision_id.encode()), ("ce_type", b"outcome")]
                    out.append((decisions_topic, d_attrs["subject"].encode(), json.dumps(decision).encode(), headers))
                    out.append((outcomes_topic, b"kdb", json.dumps(outcome).encode(), o_headers))
                    processed.append(("decide", k[0], k[1]))
                if states:
                    await cur.executemany(
                        "INSERT INTO base_state VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET state = excluded.state",
                        states,
                    )
                if processed:
                    await cur.executemany("INSERT INTO base_processed VALUES (%s, %s, %s)", processed)
                if out:
                    await cur.executemany(
                        "INSERT INTO base_outbox (topic, key, value, headers) VALUES (%s, %s, %s, %s)",
                        [(t, k, v, json.dumps([[n, h.decode()] for n, h in hs])) for t, k, v, hs in out],
                    )
            futures = [await producer.send(t, v, key=k, headers=hs) for t, k, v, hs in out]
            await asyncio.gather(*futures)
            await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()
        await conn.close()


async def append(args: argparse.Namespace) -> None:
    _, decisions_topic, _ = args.topics.split(",")
    public = decision_key(args.seed).public_key() if args.sign_decisions else None
    conn = await psycopg.AsyncConnection.connect(args.db)
    consumer = AIOKafkaConsumer(
        decisions_topic,
        bootstrap_servers=args.bootstrap,
        group_id=f"base-append-{args.seed}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        while True:
            polled = await consumer.getmany(timeout_ms=100, max_records=args.batch)
            records = [r for recs in polled.values() for r in recs]
            if not records:
                continue
            entries = []
            for record in records:
                attrs, signature = _attrs(record)
                data = json.loads(record.value)
                canonical = rfc8785.dumps({**attrs, "data": data})
                if public is not None:
                    try:
                        raw = base64.b64decode(signature or "")
                    except ValueError:
                        continue
                    if not ed25519.verify(public, raw, canonical):
                        continue
                leaf = hashlib.sha256(b"\0" + canonical).digest()
                entries.append((attrs, data, canonical, leaf))
            async with conn.transaction(), conn.cursor() as cur:
                seen = await _seen(cur, "append", [(a["source"], a["id"]) for a, _, _, _ in entries])
                await cur.execute("SELECT size FROM base_head WHERE id = 1 FOR UPDATE")
                row = await cur.fetchone()
                size = int(row[0]) if row else 0
                rows, processed = [], []
                for attrs, data, canonical, leaf in entries:
                    k = (attrs["source"], attrs["id"])
                    if k in seen:
                        continue
                    seen.add(k)
                    rows.append((size, data.get("aggregate_id"), leaf, canonical))
                    processed.append(("append", k[0], k[1]))
                    size += 1
                if rows:
                    await cur.executemany("INSERT INTO base_log VALUES (%s, %s, %s, %s)", rows)
                    await cur.executemany("INSERT INTO base_processed VALUES (%s, %s, %s)", processed)
                    await cur.execute("UPDATE base_head SET size = %s WHERE id = 1", (size,))
            await consumer.commit()
    finally:
        await consumer.stop()
        await conn.close()


def prepare(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(SCHEMA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["decide", "append"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--db", required=True, help="libpq URL")
    parser.add_argument("--registry", type=Path, help="the party registry (decide)")
    parser.add_argument("--topics", required=True, help="IN,DECISIONS,OUTCOMES")
    parser.add_argument("--seed", required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sign-decisions", action="store_true")
    args = parser.parse_args()
    run = decide if args.role == "decide" else append
    if os.environ.get("KAFKA_CREDENTIALS_DIR"):
        # A secured broker started by the bench: speak as its admin, as the bench itself does.
        from tests.infra import speak_as_admin

        speak_as_admin(Path(os.environ["KAFKA_CREDENTIALS_DIR"]))

    async def serve() -> None:
        task = asyncio.create_task(run(args))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    started = time.monotonic()
    asyncio.run(serve())
    print(f"baseline {args.role} stopped after {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main()
