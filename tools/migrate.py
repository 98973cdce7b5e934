"""`gputrace migrate`: bring each service's database to the schema revision its code needs.

Each service owns its database and its history of revisions (services/<name>/migrations, version
table alembic_version_<name>). Run it as the role that owns the tables, before the services:
compose's `migrate` job, and `gputrace run` for the embedded SQLite databases. A service started
on an older schema refuses to start and names this command (shared.runtime.migrations).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from shared.contract import SERVICES
from shared.runtime.db import make_engine
from shared.runtime.migrations import SchemaMismatch, SchemaState, migrate, schema_state
from shared.runtime.settings import Settings

# The witness keeps a database too (services/witness), though it reads no Kafka.
MIGRATED = (*SERVICES, "witness")


def database_url(service: str, var_dir: Path, given: str | None = None) -> str:
    """As the service finds its own: DATABASE_URL_<SERVICE>, DATABASE_URL, else VAR_DIR's SQLite file."""
    url = given or os.environ.get(f"DATABASE_URL_{service.upper()}") or os.environ.get("DATABASE_URL")
    return Settings(database_url=url, var_dir=var_dir).sqlalchemy_url(service)


async def migrate_one(url: str, service: str, revision: str = "head", runtime_role: str | None = None) -> str:
    """One line saying what was done."""
    engine = make_engine(url)
    try:
        if service == "ledger":
            # The ledger's step also grants rows to its run-time role (services/ledger/schema.py).
            from services.ledger.schema import migrate_ledger

            before = await schema_state(engine, service)
            after = await migrate_ledger(engine, runtime_role, revision)
        else:
            before, after = await migrate(engine, service, revision)
    finally:
        await engine.dispose()
    return (
        f"{service}: {_describe(before)} -> {after.current}"
        if before.current != after.current
        else (f"{service}: at {after.current} already")
    )


def _describe(state: SchemaState) -> str:
    return state.current or ("none (adopted: tables made before migrations)" if state.has_tables else "empty")


async def check_one(url: str, service: str) -> tuple[bool, str]:
    engine = make_engine(url)
    try:
        state = await schema_state(engine, service)
    finally:
        await engine.dispose()
    return state.current == state.head, f"{service}: at {_describe(state)}, code needs {state.head}"


def migrate_command(
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help=f"Only these (repeatable): {', '.join(MIGRATED)}")
    ] = None,
    var_dir: Annotated[Path, typer.Option(help="Where the embedded SQLite databases live")] = Path("var"),
    database_url_: Annotated[
        str | None, typer.Option("--database-url", help="The database of the one --service given")
    ] = None,
    revision: Annotated[str, typer.Option(help="Target revision (default: the code's)")] = "head",
    runtime_role: Annotated[
        str | None, typer.Option(help="Ledger on PostgreSQL: the role it runs as, granted rows (not tables)")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Change nothing; exit 1 unless every schema is current")
    ] = False,
) -> None:
    """Upgrade each service's database to the schema its code needs (Alembic; one version table per
    service). A database made before migrations existed is adopted at the baseline first. Run it as
    the owner of the tables, before starting the services; running it again changes nothing."""
    services = service or list(MIGRATED)
    unknown = [s for s in services if s not in MIGRATED]
    if unknown:
        raise typer.BadParameter(f"unknown service {unknown[0]!r}; choose from {', '.join(MIGRATED)}")
    if database_url_ and len(services) != 1:
        raise typer.BadParameter("--database-url names one service's database: give one --service")
    current = True
    for svc in services:
        url = database_url(svc, var_dir, database_url_)
        try:
            if check:
                ok, line = asyncio.run(check_one(url, svc))
                current = current and ok
            else:
                line = asyncio.run(migrate_one(url, svc, revision, runtime_role if svc == "ledger" else None))
        except SchemaMismatch as exc:
            typer.echo(f"{svc}: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(line)
    if not current:
        raise typer.Exit(1)
