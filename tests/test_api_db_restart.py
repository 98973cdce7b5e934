"""The auditor API across a PostgreSQL crash and restart (issue 11): the read pool no longer pings
before every request, so a connection the restart killed can be met by a request; that request
is answered anyway (retried once, on pinged connections), and while the database is down the API
answers 503 with Retry-After, not 500.

A PostgreSQL of its own (it is killed here), the real ledger app in-process over ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.runtime import db
from tests.benchmarks import bench_api
from tests.infra import LocalPostgres

POOL = 3


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    if os.environ.get("DATABASE_URL"):
        pytest.skip("the database server is not ours to kill (external PostgreSQL)")
    directory = Path(tempfile.mkdtemp(prefix="gputrace-pg-restart-"))
    pg = LocalPostgres(directory).start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ledger_url(own_postgres: LocalPostgres) -> str:
    """A small ledger, bulk-loaded as the bench loads its big one (outside the event loop)."""
    url = bench_api.create_database(own_postgres.url.replace("postgresql+psycopg://", "postgresql://", 1))
    bench_api.create_tables(url)
    bench_api.load(url, 64, 5, 5, Ed25519PrivateKey.generate())
    return url


@pytest.fixture
async def api(
    ledger_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine]]:
    from services.ledger.auth import write_dev_tokens
    from shared.contract.parties import write_private_key
    from tools.devkeys import DEV_PARTIES, generate_dev_registry

    url = ledger_url
    keys = tmp_path / "keys"
    generate_dev_registry(keys)
    write_private_key(keys / "ledger.key", Ed25519PrivateKey.generate())
    tokens = write_dev_tokens(keys / "tokens.json", [p for p, _, _ in DEV_PARTIES])
    for name, value in {
        "DATABASE_URL": url,
        "PARTY_REGISTRY": str(keys / "registry.json"),
        "LEDGER_SIGNING_KEY": str(keys / "ledger.key"),
        "API_TOKENS": str(keys / "tokens.json"),
        "VAR_DIR": str(tmp_path / "var"),
        "API_DB_POOL_SIZE": str(POOL),
    }.items():
        monkeypatch.setenv(name, value)
    # Never pinged for being idle: every connection the restart killed is met by a request.
    monkeypatch.setattr(db, "READ_PING_IDLE_SECONDS", 3600.0)
    app = bench_api.bench_app()
    headers = {"Authorization": f"Bearer {tokens['auditor']}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger", headers=headers) as client:
            yield client, app.state.sessions.kw["bind"]


async def _fill_the_pool(engine: AsyncEngine) -> None:
    """Every pooled read connection open and used just now (so none is pinged for being idle)."""
    await engine.dispose()  # a fresh pool: what an earlier crash left in it does not count
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(POOL):
            conn = await stack.enter_async_context(engine.connect())
            await conn.execute(text("SELECT 1"))
    assert engine.sync_engine.pool.checkedin() == POOL


async def test_a_database_restart_costs_the_auditors_no_request(
    api: tuple[httpx.AsyncClient, AsyncEngine], own_postgres: LocalPostgres
) -> None:
    client, engine = api
    # The log's fixed statements (psycopg directly), then SQLAlchemy Core reads, each right after
    # a crash that killed every pooled connection.
    for path in ("/v1/log/proof/inclusion?leaf_index=7&tree_size=64", "/v1/batches?limit=5"):
        await _fill_the_pool(engine)
        await asyncio.to_thread(own_postgres.kill)
        await asyncio.to_thread(own_postgres.start)
        statuses = [(await client.get(path)).status_code for _ in range(2 * POOL)]
        assert statuses == [200] * (2 * POOL), path

    # Down: a retryable 503 saying so, not a 500.
    await _fill_the_pool(engine)
    await asyncio.to_thread(own_postgres.kill)
    try:
        down = await client.get("/v1/log/proof/consistency?first=3&second=64")
        assert down.status_code == 503, down.text
        assert down.headers["Retry-After"] == "1"
        assert "unavailable" in down.json()["detail"]
    finally:
        await asyncio.to_thread(own_postgres.start)
    assert (await client.get("/v1/log/proof/consistency?first=3&second=64")).status_code == 200
