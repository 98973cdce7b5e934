"""The programme's running totals on PostgreSQL (issue 11, item 1): kept by the projections in the
appending transaction, equal to a recomputation from the views, and read without the views, so
GET /v1/program costs a few indexed rows however many pledges there are."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.auth import write_dev_tokens
from services.ledger.batches import AnomalyView, BatchView
from services.ledger.log import LOG_TABLES
from services.ledger.main import create_app
from services.ledger.projections import (
    PROJECTION_TABLES,
    PledgeView,
    Statistics,
    flush,
    program_summary,
    project,
    recompute_totals,
    stored_totals,
)
from shared.contract.decisions import Decision
from shared.contract.parties import write_private_key
from shared.runtime.db import create_tables, make_engine, session_factory
from shared.runtime.settings import Settings
from tools.devkeys import DEV_PARTIES, generate_dev_registry

PROGRAM = "KR-TOTALS"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    admin = _libpq(postgres_url)
    name = f"gt_totals_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    engine = make_engine(f"{postgres_url.rpartition('/')[0]}/{name}")
    await create_tables(engine, [*LOG_TABLES, *PROJECTION_TABLES])  # type: ignore[list-item]
    try:
        yield engine
    finally:
        await engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def decision(n: int, service: str, event_type: str, batch_id: str | None, **kw: Any) -> Decision:
    return Decision(
        decision_id=f"d{n}",
        service=service,
        decided_at=datetime(2025, 11, 3, tzinfo=UTC),
        status=kw.pop("status", "accepted"),
        message="m",
        event_type=f"gputrace.{event_type}",
        batch_id=batch_id,
        party_id=kw.pop("party_id", "nipa"),
        **kw,
    )


def pledge(n: int, pledge_id: str, partner: str, version: int = 1, **facts: Any) -> Decision:
    doc = {
        "pledge_id": pledge_id,
        "partner_id": partner,
        "program_id": PROGRAM,
        "kind": "capital" if "capital" in facts else "gpus",
        "committed_at": "2025-11-03T09:00:00+09:00",
        "due_by": "2026-12-31",
        "status": facts.pop("status", "active"),
        "version": version,
        **facts,
    }
    return decision(
        n, "pledges", "pledge.committed.v1", doc.get("earmark_batch_id"), party_id=partner, facts={"pledge": doc}
    )


def krw(amount: int) -> dict[str, str]:
    return {"amount": str(amount), "currency": "KRW"}


def batch_step(n: int, batch_id: str, **facts: Any) -> Decision:
    return decision(
        n, "deliveries", "shipment.dispatched.v1", batch_id, facts=facts, anomalies=facts.pop("anomalies", [])
    )


# A programme in the order a ledger would see it, in three consumer batches (transactions).
ROUNDS: list[list[Decision]] = [
    [
        pledge(0, "PL-S-CAP", "samsung-electronics", capital=krw(720), earmark_batch_id="B-1"),
        pledge(1, "PL-S-GPU", "samsung-electronics", gpus={"model": "GB200", "quantity": 10}),
        pledge(2, "PL-K-CAP", "sk-group", capital=krw(500)),
        batch_step(3, "B-1", batch={"program_id": PROGRAM, "model": "GB200", "quantity": 10}),
    ],
    [
        # SK raises its pledge (a new version), then an older version arrives late: ignored.
        pledge(4, "PL-K-CAP", "sk-group", version=3, capital=krw(760)),
        pledge(5, "PL-K-CAP", "sk-group", version=2, capital=krw(999)),
        pledge(
            6,
            "PL-S-CAP",
            "samsung-electronics",
            version=2,
            capital=krw(720),
            earmark_batch_id="B-1",
            disbursed=krw(240),
        ),
        batch_step(7, "B-1", award={"vendor_id": "v", "quantity": 10, "program_id": PROGRAM}),
    ],
    [
        pledge(
            8, "PL-S-GPU", "samsung-electronics", version=2, status="withdrawn", gpus={"model": "GB200", "quantity": 10}
        ),
        batch_step(
            9,
            "B-1",
            delivery={"dispatched": 10, "received": 10, "damaged": 2, "installed": 8, "accepted": 7, "failed": 1},
            anomalies=[{"code": "DAMAGED_IN_TRANSIT", "message": "2 damaged", "batch_id": "B-1"}],
        ),
        # A rejection: in the log, its anomaly listed, but no batch created.
        batch_step(10, "B-2", status="rejected", anomalies=[{"code": "NOT_AUTHORIZED", "message": "no"}]),
    ],
]


async def test_running_totals_match_the_views_and_need_no_pledge_rows(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    leaf = 0
    for batch in ROUNDS:
        async with sessions() as session, session.begin():
            for d in batch:
                await project(session, d, leaf)
                leaf += 1
            await flush(session)

    async with sessions() as session:
        stored = await stored_totals(session)
        views = [(await session.execute(select(m))).scalars().all() for m in (PledgeView, BatchView, AnomalyView)]
        assert stored == recompute_totals(*views), "running totals = a recount from the views"
        summary = await program_summary(session, 260_000, PROGRAM)

    assert summary["capital"] == {"KRW": "1480"}, "760 (SK's newest version) + 720"
    assert summary["disbursed"] == {"KRW": "240"}
    assert (summary["pledges"], summary["withdrawn"], summary["gpus_total"]) == (2, 1, 0)
    assert summary["by_partner"]["sk-group"]["capital"] == {"KRW": "760"}
    assert summary["batches_by_stage"] == {"accepted": 1} and summary["batches_total"] == 1
    assert summary["pipeline_gpus"] == {
        "awarded": 10,
        "dispatched": 10,
        "received": 10,
        "damaged": 2,
        "installed": 8,
        "accepted": 7,
        "failed": 1,
    }
    assert summary["anomalies_by_code"] == {"DAMAGED_IN_TRANSIT": 1}, "B-2's rejection has no programme"

    # The summary is the totals alone: with every view row gone it answers the same.
    async with sessions() as session, session.begin():
        for model in (PledgeView, BatchView, AnomalyView):
            await session.execute(delete(model))
    async with sessions() as session:
        assert await program_summary(session, 260_000, PROGRAM) == summary


async def test_statistics_are_refreshed_as_the_log_grows(engine: AsyncEngine) -> None:
    stats = Statistics()
    async with AsyncSession(engine) as session, session.begin():
        assert await stats.refresh(session, 10) is False, "a small log is left to autovacuum"
        assert await stats.refresh(session, 1_000) is True
        assert await stats.refresh(session, 1_500) is False, "grown by less than a fifth + 1,000"
        assert await stats.refresh(session, 2_200) is True
        assert stats.runs == 2 and stats.analysed_at == 2_200
    async with AsyncSession(engine) as session:
        # ANALYZE ran inside the transaction and committed with it.
        analysed = await session.scalar(
            text("SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'log_entries'")
        )
        assert analysed


def test_the_api_reads_through_its_own_pool(tmp_path: Path, postgres_url: str) -> None:
    """The auditors' queries never take a connection from the consumer's pool, nor it from theirs."""
    keys = tmp_path / "keys"
    generate_dev_registry(keys)
    write_private_key(keys / "ledger.key", Ed25519PrivateKey.generate())
    write_dev_tokens(keys / "tokens.json", [p for p, _, _ in DEV_PARTIES])
    settings = Settings(
        database_url=postgres_url,
        party_registry=keys / "registry.json",
        ledger_signing_key=keys / "ledger.key",
        api_tokens=keys / "tokens.json",
        var_dir=tmp_path / "var",
        api_db_pool_size=7,
    )
    app = create_app(settings, consume=False)
    api_engine = app.state.sessions.kw["bind"]
    consumer_engine = app.state.service.engine
    assert api_engine is not consumer_engine and api_engine.pool is not consumer_engine.pool
    assert api_engine.pool.size() == 7 and consumer_engine.pool.size() == 5
    assert app.state.service.sessions.kw["bind"] is consumer_engine, "the consumer keeps its own"
