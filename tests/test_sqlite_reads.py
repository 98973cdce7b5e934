"""The embedded default (SQLite, `make run`): the ledger's API reads never take the write lock.

The consumer's transactions BEGIN IMMEDIATE (the write lock up front, shared.runtime.db); the API's
read engine begins deferred transactions on a WAL database, so a long read and an append proceed
side by side. Each case is also run with the old behaviour (the API reading through an engine
that begins IMMEDIATE, as every transaction did), where the same read and append wait for each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.log import LogEntry, LogWriter
from services.ledger.main import create_app
from shared.runtime.db import make_engine, session_factory
from shared.runtime.migrations import migrate
from shared.runtime.settings import Settings
from tests.test_log_api import ORIGIN, Keys, fake_decision, make_keys

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Long enough to tell "waits for the other" from "proceeds" on a loaded machine; the old behaviour
# waits far longer (SQLite's busy timeout is 30 s), until the other transaction ends.
PROCEEDS_WITHIN = 4.0


@dataclass
class Ledger:
    app: object
    writer: async_sessionmaker[AsyncSession]
    reader: async_sessionmaker[AsyncSession]
    keys: Keys
    appended: int = 0

    async def append(self, count: int = 5, hold: asyncio.Event | None = None) -> None:
        """One appending transaction through the real LogWriter; `hold`: wait for it before committing."""
        async with self.writer() as session, session.begin():
            writer = await LogWriter.open(session)
            for i in range(writer.size, writer.size + count):
                d = fake_decision(i, "wal-")
                writer.append(d, service=d["service"], event_type=d["event_type"], status=d["status"])
            await writer.finish(ORIGIN, ORIGIN, self.keys.private)
            if hold is not None:
                await hold.wait()
        self.appended += count


@pytest.fixture(params=["deferred reads", "old: every transaction immediate"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    keys = make_keys(tmp_path / "keys")
    settings = Settings(
        database_url=None,  # the embedded default: var/data/ledger.db
        var_dir=tmp_path / "var",
        ledger_signing_key=keys.key_path,
        api_tokens=keys.tokens_path,
        party_registry=keys.directory / "registry.json",
        ledger_origin=ORIGIN,
        kafka_bootstrap_servers="127.0.0.1:9",  # never contacted: no lifespan, no consumer
    )
    url = settings.sqlalchemy_url("ledger")
    engine = make_engine(url)
    await migrate(engine, "ledger")
    await engine.dispose()
    app = create_app(settings, consume=False)
    old: AsyncEngine | None = None
    if request.param.startswith("old"):
        old = make_engine(url, reader=False)
        app.state.sessions = session_factory(old)
    ledger = Ledger(app, app.state.service.sessions, app.state.sessions, keys)
    await ledger.append(10)
    try:
        yield ledger
    finally:
        await app.state.service.engine.dispose()
        await app.state.sessions.kw["bind"].dispose()


def _old(request: pytest.FixtureRequest) -> bool:
    return "old" in request.node.callspec.id


async def test_the_database_is_in_wal_mode(ledger: Ledger) -> None:
    async with ledger.reader() as session:
        assert (await session.execute(text("PRAGMA journal_mode"))).scalar() == "wal"


async def test_a_long_api_read_does_not_block_an_append(ledger: Ledger, request: pytest.FixtureRequest) -> None:
    async with ledger.reader() as session:
        # A read transaction the API holds open (a slow client, a large page being streamed).
        assert len((await session.execute(select(LogEntry.leaf_index))).all()) == 10
        appending = asyncio.create_task(ledger.append(5))
        done, _ = await asyncio.wait({appending}, timeout=PROCEEDS_WITHIN)
        blocked = not done
        if not _old(request):
            # Still inside its transaction, the read keeps its snapshot: 10 entries, not 15.
            assert len((await session.execute(select(LogEntry.leaf_index))).all()) == 10
    await appending  # the old behaviour's append goes on once the read has ended
    assert ledger.appended == 15
    assert blocked == _old(request), "the append waited for the read" if blocked else "the append did not wait"


async def test_an_append_in_progress_does_not_block_an_api_read(ledger: Ledger, request: pytest.FixtureRequest) -> None:
    hold = asyncio.Event()
    appending = asyncio.create_task(ledger.append(5, hold))
    await asyncio.sleep(0.5)  # the append has the write lock and its rows written, not committed
    transport = httpx.ASGITransport(app=ledger.app)  # type: ignore[arg-type]
    headers = ledger.keys.headers()
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger", headers=headers) as client:
        reading = asyncio.create_task(client.get("/v1/log/checkpoint", params={"format": "json"}))
        done, _ = await asyncio.wait({reading}, timeout=PROCEEDS_WITHIN)
        blocked = not done
        hold.set()
        await appending
        answer = await reading
    assert answer.status_code == 200, answer.text
    assert blocked == _old(request), "the read waited for the append" if blocked else "the read did not wait"
    if not blocked:
        assert answer.json()["size"] == 10  # the committed log, not the append in progress
