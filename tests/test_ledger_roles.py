"""The ledger as compose runs it: roles made by infra/docker/postgres-init.sh, the schema and guards
made by the owner in the one-shot `python -m services.ledger.schema` job, the ledger at run time as
the run-time role, which can append (and store witness cosignatures) but not remove its guards.

On the session's real PostgreSQL, no Docker: the init script's SQL is run with this test's own role
and database names, the schema job as a real process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.ledger.log import LOG_TABLES, LogCosignature, LogWriter, install_append_only_guards
from services.ledger.projections import PROJECTION_TABLES
from shared.runtime.db import create_tables, make_engine, session_factory
from tests.test_log_api import libpq, run_async

ROOT = Path(__file__).resolve().parent.parent
INIT = (ROOT / "infra" / "docker" / "postgres-init.sh").read_text()
COMPOSE_OWNER, COMPOSE_APP = "gputrace_ledger_owner", "gputrace_ledger_app"


def init_sql(database: str, owner: str, app: str) -> str:
    """The ledger-roles block of the compose init script, for this database and these roles."""
    sql = re.search(r"<<SQL\n(.*?)\nSQL\n", INIT, re.S)
    assert sql, "postgres-init.sh has no ledger-roles heredoc"
    body = re.sub(r"'\$\{[A-Z_]+:-\$\{POSTGRES_PASSWORD\}\}'", "'secret'", sql.group(1))
    body = body.replace(COMPOSE_OWNER, owner).replace(COMPOSE_APP, app)
    return re.sub(r"\bgputrace_ledger\b", database, body)


@pytest.fixture
def roles(postgres_url: str) -> Iterator[tuple[str, str, str]]:
    """(owner URL, run-time URL, run-time role) of a fresh ledger database set up by the init script."""
    admin = libpq(postgres_url)
    tag = uuid.uuid4().hex[:8]
    database, owner, app = f"gt_ledger_{tag}", f"gt_ledger_owner_{tag}", f"gt_ledger_app_{tag}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    with psycopg.connect(admin.rsplit("/", 1)[0] + f"/{database}", autocommit=True) as conn:
        conn.execute(init_sql(database, owner, app))
    host = postgres_url.rsplit("/", 1)[0].split("@", 1)[1]
    yield (
        f"postgresql+psycopg://{owner}:secret@{host}/{database}",
        f"postgresql+psycopg://{app}:secret@{host}/{database}",
        app,
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in (app, owner):
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_init_script_makes_both_roles_for_the_ledger_database() -> None:
    sql = init_sql("db", "o", "a")
    assert "CREATE ROLE o LOGIN" in sql and "CREATE ROLE a LOGIN" in sql
    assert "ALTER DATABASE db OWNER TO o" in sql and "gputrace_ledger" not in sql


def test_the_ledger_runs_as_the_runtime_role_after_the_owner_s_schema_job(roles: tuple[str, str, str]) -> None:
    owner_url, app_url, app_role = roles
    job = subprocess.run(
        [sys.executable, "-m", "services.ledger.schema", "--runtime-role", app_role],
        env={**os.environ, "DATABASE_URL": owner_url, "LOG_JSON": "false"},
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout + job.stderr
    again = subprocess.run(  # as compose's `up` again: nothing to do, no error
        [sys.executable, "-m", "services.ledger.schema", "--runtime-role", app_role],
        env={**os.environ, "DATABASE_URL": owner_url}, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    as_app = subprocess.run(  # the job refuses to run as a role that does not own the tables
        [sys.executable, "-m", "services.ledger.schema"],
        env={**os.environ, "DATABASE_URL": app_url}, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert as_app.returncode != 0

    async def run_as_app() -> list[str]:
        engine = make_engine(app_url)
        refused: list[str] = []
        try:
            # What the ledger's start-up does: create what is missing (nothing), check the guards.
            await create_tables(engine, [*LOG_TABLES, *PROJECTION_TABLES])  # type: ignore[list-item]
            async with engine.begin() as conn:
                await install_append_only_guards(conn)
            key = Ed25519PrivateKey.generate()
            async with session_factory(engine)() as session, session.begin():
                writer = await LogWriter.open(session)
                writer.append(
                    {"decision_id": "d-1", "n": 1}, service="quotes", event_type="t", status="accepted"
                )  # fmt: skip
                assert await writer.finish("roles.example/log", "roles.example/log", key) is not None
                session.add(LogCosignature(size=1, key_id="00000000", witness="w", line="— w AAAA\n", timestamp=1))
            for sql in (
                "DROP TRIGGER log_entries_append_only ON log_entries",
                "ALTER TABLE log_entries DISABLE TRIGGER ALL",
                "UPDATE log_entries SET status = 'rejected'",
                "DELETE FROM log_checkpoints",
                "UPDATE log_head SET size = 0",
            ):
                try:
                    async with engine.begin() as conn:
                        await conn.execute(text(sql))
                except DBAPIError as exc:
                    refused.append(str(exc.orig).splitlines()[0])
        finally:
            await engine.dispose()
        return refused

    refused = run_async(run_as_app())
    assert len(refused) == 5, refused
    assert "must be owner" in refused[0] and "must be owner" in refused[1]
    assert all("append-only" in r or "only grow" in r for r in refused[2:]), refused
