"""The ledger's writer lock and frontier survive a record's savepoint rollback (real PostgreSQL).

A batch replayed record by record runs each record in a savepoint. The writer (its advisory lock,
the head row, the Merkle frontier) is opened before the record loop, outside every savepoint: a
first record whose projection fails, rolled back and given up, neither releases the lock for
the records after it nor leaves its leaf behind in the frontier. The log then verifies: contiguous
indices, the signed checkpoint's root recomputed from the stored entries.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import make_vkey, parse_and_verify
from sqlalchemy import select, text
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger import appender as appender_module
from services.ledger.appender import Appender
from services.ledger.log import LOG_TABLES, WRITER_LOCK, LogEntry, SignedCheckpoint, install_append_only_guards
from services.ledger.projections import PROJECTION_TABLES, prefetch
from shared.contract import decisions_topic, service_source
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import DECISION_TYPE, Decision
from shared.contract.parties import PartyRegistry, load_private_key
from shared.runtime.consumer import MAX_TRIES, BatchProcessor, RetryBatch
from shared.runtime.db import DeliveryFailure, create_tables, make_engine, session_factory, utcnow
from tools.devkeys import generate_dev_registry

ORIGIN = "gputrace.test/savepoint"
TOPIC = decisions_topic("pledges")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_dev_registry(directory)
    return directory


@pytest.fixture
async def ledger_db(postgres_url: str) -> AsyncIterator[tuple[Any, str]]:
    name = f"savepoint_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = postgres_url.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(url)
    await create_tables(engine, [*LOG_TABLES, *PROJECTION_TABLES])
    async with engine.begin() as conn:
        await install_append_only_guards(conn)
    yield session_factory(engine), url
    await engine.dispose()


def decision_record(keys: Path, offset: int) -> ConsumerRecord:
    decision = Decision(
        decision_id=f"d-{offset}-{uuid.uuid4().hex[:6]}",
        service="pledges",
        decided_at=utcnow(),
        status="rejected",
        reason_code="UNKNOWN_PLEDGE",
        message=f"decision {offset}",
        event_type="gputrace.pledge.amended.v1",
        aggregate_id=f"P-{offset}",
    )
    event = CloudEvent(
        id=decision.decision_id,
        source=service_source("pledges"),
        type=DECISION_TYPE,
        subject=decision.aggregate_id,
        data=decision.model_dump(mode="json"),
    ).signed(load_private_key(keys / "pledges.key"))
    key, value, headers = event.as_record()
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, key, value, None, 0, len(value), headers)


async def test_a_rolled_back_first_record_leaves_the_lock_held_and_the_frontier_as_it_was(
    keys: Path, ledger_db: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions, url = ledger_db
    signing = Ed25519PrivateKey.generate()
    appender = Appender(ORIGIN, signing)
    processor = BatchProcessor(
        "ledger",
        sessions,
        registry=PartyRegistry.load(keys / "registry.json"),
        internal_handler=appender.on_decision,
        internal_topics=[TOPIC],
        before_batch=appender.before_batch,
        after_batch=appender.after_batch,
        prefetch=prefetch,
    )
    batch = [decision_record(keys, i) for i in range(4)]
    poisoned = batch[0].offset
    real_project = appender_module.project
    lock_free_during: list[int] = []

    async def project(session: AsyncSession, decision: Decision, leaf_index: int) -> None:
        await real_project(session, decision, leaf_index)
        offset = int(decision.decision_id.split("-")[1])
        if offset == poisoned:
            # The projection's write is refused when its savepoint is released, AFTER the entry
            # was appended: the savepoint rolls back (a value too long for its column).
            session.add(DeliveryFailure(position="x" * 1000, attempts=0))
        elif session.sync_session.in_nested_transaction():
            # Record by record, after the rollback: is the writer lock still held by this batch?
            async with await psycopg.AsyncConnection.connect(url.replace("+psycopg", ""), autocommit=True) as other:
                cur = await other.execute("SELECT pg_try_advisory_lock(%s)", (WRITER_LOCK,))
                row = await cur.fetchone()
                if row and row[0]:
                    lock_free_during.append(offset)
                    await other.execute("SELECT pg_advisory_unlock(%s)", (WRITER_LOCK,))

    monkeypatch.setattr(appender_module, "project", project)
    for _ in range(MAX_TRIES - 1):
        with pytest.raises(RetryBatch):
            await processor.process(batch)
    await processor.process(batch)  # the last try: the poisoned record is given up, the rest appended

    assert lock_free_during == [], f"the writer lock was free while records {lock_free_during} were appended"
    async with sessions() as session:
        entries = (await session.execute(select(LogEntry).order_by(LogEntry.leaf_index))).scalars().all()
        checkpoint = (
            await session.execute(select(SignedCheckpoint).order_by(SignedCheckpoint.size.desc()).limit(1))  # type: ignore[attr-defined]
        ).scalar_one()
        head = (await session.execute(text("SELECT size FROM log_head"))).scalar_one()
    appended = [int(e.decision_id.split("-")[1]) for e in entries]
    # The rolled-back record's leaf is not in the log: its savepoint took it back with it.
    assert appended == [1, 2, 3], appended
    assert [e.leaf_index for e in entries] == list(range(len(entries))) and head == len(entries)
    # The audit's own check: the signed checkpoint's root is the stored entries' Merkle root.
    note = parse_and_verify(checkpoint.note, make_vkey(ORIGIN, signing.public_key()), expected_origin=ORIGIN)
    frontier = merkle.Frontier()
    for e in entries:
        assert merkle.leaf_hash(e.entry.encode()) == bytes(e.leaf_hash)
        frontier.append(bytes(e.leaf_hash))
    assert (note.size, note.root_hash) == (len(entries), frontier.root())
