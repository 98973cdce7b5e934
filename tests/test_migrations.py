"""Schema migrations (shared/runtime/migrations, services/<name>/migrations), on SQLite and PostgreSQL.

- Each service's migrations at head build exactly the schema its models describe.
- A ledger created by the baseline (or by create_all before migrations existed), holding entries
  written by the real LogWriter, upgraded by `gputrace migrate`: every row is still there, the
  guards still refuse UPDATE, and `gputrace audit verify` still verifies the log over HTTP.
- A service on an older schema refuses to start with one line, through `python -m services.<x>`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier.cli import main as audit_main
from sqlalchemy import MetaData, Table, inspect, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from services.deliveries.main import TABLES as DELIVERIES_TABLES
from services.export_controls.main import ExportCase, QuotaUsage
from services.ledger.log import LOG_TABLES, LogCosignature, LogWriter, install_append_only_guards
from services.ledger.projections import PROJECTION_TABLES
from services.pledges.main import PledgeRow
from services.quotes.main import TABLES as QUOTES_TABLES
from services.witness.main import WITNESS_TABLES
from shared.contract.parties import write_private_key
from shared.runtime.db import MECHANISM_TABLES, create_tables, make_engine, session_factory
from shared.runtime.migrations import head, migrate, schema_state
from tests.test_log_api import (
    ORIGIN,
    Keys,
    ServerThread,
    fake_decision,
    libpq,
    make_keys,
    run_async,
)
from tools.cli import app as gputrace_app

ROOT = Path(__file__).resolve().parents[1]

# What each service's models say its database holds (the witness has no delivery mechanism).
MODELS: dict[str, list[Any]] = {
    "pledges": [PledgeRow.__table__],
    "quotes": list(QUOTES_TABLES),
    "export_controls": [ExportCase.__table__, QuotaUsage.__table__],
    "deliveries": list(DELIVERIES_TABLES),
    "ledger": [*LOG_TABLES, *PROJECTION_TABLES],
    "witness": list(WITNESS_TABLES),
}

NewDatabase = Callable[[str], str]


@pytest.fixture(params=["sqlite", "postgres"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewDatabase]:
    """Makes empty databases (an SQLAlchemy URL each) on the embedded default or on PostgreSQL."""
    made: list[str] = []
    admin = libpq(request.getfixturevalue("postgres_url")) if request.param == "postgres" else ""

    def make(name: str) -> str:
        if not admin:
            return f"sqlite+aiosqlite:///{tmp_path / name}.db"
        db = f"gt_mig_{name}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        made.append(db)
        return admin.rpartition("/")[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{db}"

    yield make
    if made:
        with psycopg.connect(admin, autocommit=True) as conn:
            for db in made:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_migrations_at_head_build_what_the_models_describe(new_database: NewDatabase) -> None:
    """A model changed without a revision (or a revision the models do not have) shows here."""

    async def differences(service: str, url: str) -> list[Any]:
        engine = make_engine(url)
        metadata = MetaData()
        for table in [*(MECHANISM_TABLES if service != "witness" else []), *MODELS[service]]:
            table.to_metadata(metadata)
        try:
            await migrate(engine, service)
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: [
                        d
                        for d in compare_metadata(MigrationContext.configure(sync), metadata)
                        # The version table is the migrations' own.
                        if not (d[0] == "remove_table" and d[1].name.startswith("alembic_version_"))
                    ]
                )
        finally:
            await engine.dispose()

    for service in MODELS:
        assert run_async(differences(service, new_database(service))) == [], service


# --------------------------------------------------------------------------- an upgrade keeps the log


async def _fill(url: str, keys: Keys, batches: list[int]) -> int:
    """Entries through the real LogWriter (a signed checkpoint per transaction) and a cosignature."""
    engine = make_engine(url)
    size = 0
    try:
        sessions = session_factory(engine)
        for count in batches:
            async with sessions() as session, session.begin():
                writer = await LogWriter.open(session)
                for i in range(writer.size, writer.size + count):
                    d = fake_decision(i, "mig-")
                    writer.append(
                        d, service=d["service"], event_type=d["event_type"], status=d["status"],
                        batch_id=d["batch_id"], party_id=d["party_id"],
                    )  # fmt: skip
                await writer.finish(ORIGIN, ORIGIN, keys.private)
                size = writer.size
        async with sessions() as session, session.begin():
            # Well-formed (key id, timestamp, signature) from a witness the auditor does not know.
            line = "— w.example " + base64.b64encode(bytes.fromhex("0a0b0c0d") + bytes(72)).decode() + "\n"
            session.add(LogCosignature(size=size, key_id="0a0b0c0d", witness="w.example", line=line, timestamp=0))
    finally:
        await engine.dispose()
    return size


async def _rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the version table, in a stable order."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
            return {
                name: sorted((tuple(r) for r in await conn.execute(text(f'SELECT * FROM "{name}"'))), key=repr)
                for name in names
                if not name.startswith("alembic_version_")
            }
    finally:
        await engine.dispose()


async def _refused(url: str, statement: str) -> bool:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    except DBAPIError as exc:
        return "append-only" in str(exc.orig)
    finally:
        await engine.dispose()
    return False


async def _at_baseline(url: str) -> None:
    engine = make_engine(url)
    try:
        await migrate(engine, "ledger", "0001")
    finally:
        await engine.dispose()


async def _made_before_migrations(url: str) -> None:
    """What the ledger's start-up did before migrations existed: create_all, then the guards."""
    engine = make_engine(url)
    try:
        # The tables as they were: without revision 0002's index, which the models now carry.
        metadata = MetaData()
        for table in [*MECHANISM_TABLES, *LOG_TABLES, *PROJECTION_TABLES]:
            copy: Table = table.to_metadata(metadata)
            copy.indexes = {i for i in copy.indexes if i.name != "ix_log_cosignatures_key_size"}
        await create_tables(engine, [])  # the delivery mechanism's tables
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: metadata.create_all(sync))
            await install_append_only_guards(conn)
    finally:
        await engine.dispose()


async def _indexes(url: str, table: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda sync: {i["name"] for i in inspect(sync).get_indexes(table)})
    finally:
        await engine.dispose()


@pytest.mark.parametrize("made_by", ["baseline", "create_all"])
def test_an_upgrade_keeps_every_row_and_the_ledger_still_verifies(
    new_database: NewDatabase, made_by: str, tmp_path: Path
) -> None:
    from services.ledger.main import create_app
    from shared.runtime.settings import Settings

    url = new_database("ledger")
    run_async(_at_baseline(url) if made_by == "baseline" else _made_before_migrations(url))
    keys = make_keys(tmp_path / "keys")
    size = run_async(_fill(url, keys, [40, 1, 25]))
    before = run_async(_rows(url))
    assert "ix_log_cosignatures_key_size" not in run_async(_indexes(url, "log_cosignatures"))

    # The real command, in this process (a process start costs seconds on a loaded machine).
    done = CliRunner().invoke(gputrace_app, ["migrate", "--service", "ledger", "--database-url", url])
    assert done.exit_code == 0, done.output
    assert f"-> {head('ledger')}" in done.output, done.output

    after = run_async(_rows(url))
    # Nothing lost anywhere; the log itself exactly as it was (the projections may have been
    # backfilled from it by the ledger's migrate step).
    assert all(set(rows) <= set(after[name]) for name, rows in before.items()), before.keys()
    for name in ("log_entries", "log_nodes", "log_checkpoints", "log_cosignatures", "log_head"):
        assert after[name] == before[name], name
    assert len(after["log_entries"]) == size == 66
    assert "ix_log_cosignatures_key_size" in run_async(_indexes(url, "log_cosignatures"))
    state = run_async(_state(url))
    assert state.current == state.head
    assert run_async(_refused(url, "UPDATE log_entries SET status = 'x'"))
    assert run_async(_refused(url, "DELETE FROM log_nodes"))

    # The auditor's command, over HTTP, against the real ledger app on the upgraded database.
    settings = Settings(
        database_url=url,
        ledger_signing_key=keys.key_path,
        api_tokens=keys.tokens_path,
        party_registry=keys.directory / "registry.json",
        ledger_origin=ORIGIN,
        var_dir=tmp_path / "var",
        kafka_bootstrap_servers="127.0.0.1:9",
    )
    app = create_app(settings, consume=False)
    server = ServerThread(app, app.state.service.engine).start()
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = audit_main(
                ["--url", server.url, "--token", keys.tokens["auditor"], "--state", str(tmp_path / "audit.json"),
                 "--key", keys.vkey, "verify"]
            )  # fmt: skip
    finally:
        server.stop()
    assert code == 0, out.getvalue()
    assert str(size) in out.getvalue(), out.getvalue()


async def _state(url: str) -> Any:
    engine = make_engine(url)
    try:
        return await schema_state(engine, "ledger")
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- refusing an older schema


def _start(service: str, url: str, keys: Keys, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "PARTY_REGISTRY": str(keys.directory / "registry.json"),
        "LEDGER_SIGNING_KEY": str(keys.key_path),
        "API_TOKENS": str(keys.tokens_path),
        "VAR_DIR": str(tmp_path / "var"),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # never reached: it stops before
        "HTTP_PORT": "9",
        "LOG_JSON": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_a_service_on_an_older_schema_refuses_to_start(new_database: NewDatabase, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    ledger = new_database("ledger")
    run_async(_at_baseline(ledger))
    run_async(_fill(ledger, keys, [3]))
    done = _start("ledger", ledger, keys, tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"refusing to start: ledger: database schema at revision 0001, code needs {head('ledger')}: "
        "run gputrace migrate --service ledger"
    ), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert run_async(_state(ledger)).current == "0001"  # it changed nothing

    # A deciding service whose tables were made before migrations existed: not guessed at either.
    pledges = new_database("pledges")

    async def pre_migration() -> None:
        engine = make_engine(pledges)
        try:
            await create_tables(engine, [PledgeRow.__table__])  # type: ignore[list-item]
        finally:
            await engine.dispose()

    run_async(pre_migration())
    done = _start("pledges", pledges, keys, tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "refusing to start: pledges: database schema at revision none (tables made before migrations), "
        "code needs 0001: run gputrace migrate --service pledges"
    ), done.stderr


def test_the_witness_on_tables_from_before_migrations_refuses_to_start(tmp_path: Path) -> None:
    """The witness keeps what it has cosigned (a log's size and root): its database is upgraded by
    `gputrace migrate`, never guessed at by the process."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'witness.db'}"

    async def pre_migration() -> None:
        engine = make_engine(url)
        try:
            await create_tables(engine, list(WITNESS_TABLES))  # type: ignore[arg-type]
        finally:
            await engine.dispose()

    run_async(pre_migration())
    write_private_key(tmp_path / "witness.key", Ed25519PrivateKey.generate())
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "WITNESS_SIGNING_KEY": str(tmp_path / "witness.key"),
        "VAR_DIR": str(tmp_path / "var"),
        "HTTP_PORT": "9",
        "LOG_JSON": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.witness"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "refusing to start: witness: database schema at revision none (tables made before migrations), "
        "code needs 0001: run gputrace migrate --service witness"
    ), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
