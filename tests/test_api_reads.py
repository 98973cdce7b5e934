"""The auditor API's lean reads (issue 11): the log's proof/entry reads give the same answers on
PostgreSQL (fixed statements on the driver connection) and SQLite (SQLAlchemy Core), and
GET /v1/batches?after= pages by key exactly as offset paging does, over real HTTP and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier import merkle
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ledger.log import LOG_TABLES, LogWriter, entries_and_size, size_and_leaf_index, size_and_nodes
from services.ledger.projections import PROJECTION_TABLES
from shared.runtime.db import create_tables, make_engine, session_factory
from tests.benchmarks import bench_api

SIZE = 100


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(params=["sqlite", "postgresql"])
async def log_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A log of SIZE entries appended by the real LogWriter (in three transactions)."""
    admin = name = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    else:
        admin = _libpq(request.getfixturevalue("postgres_url"))
        name = f"gt_reads_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        url = f"{admin.rpartition('/')[0]}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    engine = make_engine(url)
    await create_tables(engine, [*LOG_TABLES, *PROJECTION_TABLES])  # type: ignore[list-item]
    key = Ed25519PrivateKey.generate()
    try:
        for count in (40, 1, 59):
            async with session_factory(engine)() as session, session.begin():
                writer = await LogWriter.open(session)
                for i in range(writer.size, writer.size + count):
                    writer.append({"decision_id": f"d-{i}", "n": i}, service="s", event_type="e", status="accepted")
                await writer.finish("o", "o", key)
        yield engine
    finally:
        await engine.dispose()
        if admin is not None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def _root(leaves: list[bytes]) -> bytes:
    frontier = merkle.Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


def _leaf(i: int) -> bytes:
    return merkle.leaf_hash(json.dumps({"decision_id": f"d-{i}", "n": i}, separators=(",", ":")).encode())


async def test_proof_reads_answer_alike_on_both_databases(log_engine: AsyncEngine) -> None:
    leaves = [_leaf(i) for i in range(SIZE)]
    root = _root(leaves)
    async with log_engine.connect() as conn:
        for index, tree in ((0, 1), (37, 64), (37, SIZE), (SIZE - 1, SIZE)):
            coords = merkle.inclusion_proof_coords(index, tree)
            size, nodes = await size_and_nodes(conn, coords)
            assert size == SIZE and set(nodes) == set(coords)
            proof = merkle.inclusion_proof(index, tree, nodes)
            assert merkle.verify_inclusion(leaves[index], index, tree, proof, _root(leaves[:tree]))
        size, nodes = await size_and_nodes(conn, merkle.consistency_proof_coords(41, SIZE))
        proof = merkle.consistency_proof(41, SIZE, nodes)
        assert merkle.verify_consistency(41, SIZE, _root(leaves[:41]), root, proof)
        # Beyond the head: the size says so (a 416), and no node is invented.
        size, nodes = await size_and_nodes(conn, merkle.inclusion_proof_coords(3, 4 * SIZE))
        assert size == SIZE and len(nodes) < len(merkle.inclusion_proof_coords(3, 4 * SIZE))

        rows, size = await entries_and_size(conn, 38, 42)  # straddles two transactions
        assert size == SIZE and [i for i, _, _ in rows] == [38, 39, 40, 41]
        assert [h for _, _, h in rows] == leaves[38:42] == [merkle.leaf_hash(e.encode()) for _, e, _ in rows]
        assert await entries_and_size(conn, SIZE, SIZE + 5) == ([], SIZE)

        assert await size_and_leaf_index(conn, leaves[57], SIZE) == (SIZE, 57)
        assert await size_and_leaf_index(conn, leaves[57], 57) == (SIZE, None)  # not below tree_size 57
        assert await size_and_leaf_index(conn, b"\0" * 32, SIZE) == (SIZE, None)


async def test_the_read_pool_keeps_its_connections_under_concurrency(postgres_url: str) -> None:
    """More concurrent requests than pooled connections wait for one; none is opened (a PostgreSQL
    backend started) and closed per request, as overflow connections were at 50 clients."""
    engine = make_engine(postgres_url, pool_size=3, reader=True)
    opened = 0

    @event.listens_for(engine.sync_engine, "connect")
    def _count(*_: Any) -> None:
        nonlocal opened
        opened += 1

    async def reader() -> None:
        for _ in range(5):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(0.005)"))

    try:
        await asyncio.gather(*(reader() for _ in range(12)))
    finally:
        await engine.dispose()
    assert opened == 3


def test_keyset_pages_walk_the_batches_as_offset_pages_do(postgres_url: str) -> None:
    """A bulk-loaded ledger (the bench's loader) served by the real app in its own process."""
    admin = _libpq(postgres_url)
    url = bench_api.create_database(admin)
    work = Path(tempfile.mkdtemp(prefix="gt-keyset-"))
    try:
        bench_api.create_tables(url)
        bench_api.load(url, 50, 10, 23, Ed25519PrivateKey.generate())
        with bench_api.ledger_server(url, work, 2) as (base, token, _):
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:

                def page(**params: Any) -> dict[str, Any]:
                    r = client.get("/v1/batches", params=params)
                    assert r.status_code == 200, r.text
                    return r.json()

                for filters in ({}, {"status": "accepted"}, {"partner": "samsung-electronics"}):
                    everything = page(limit=500, **filters)
                    walked: list[str] = []
                    after: dict[str, str] = {}
                    while items := (got := page(limit=4, **filters, **after))["items"]:
                        assert got["total"] == everything["total"]  # the total counts every match
                        walked += [b["batch_id"] for b in items]
                        assert len(walked) <= everything["total"], "a keyset page repeated a batch"
                        after = {"after": walked[-1]}
                    assert walked == [b["batch_id"] for b in everything["items"]], filters
                    assert len(walked) == everything["total"] > 0
                # The same items as the offset page at the same place.
                assert page(limit=5, after="B-000009")["items"] == page(limit=5, offset=10)["items"]
    finally:
        bench_api.drop_database(admin, url)
