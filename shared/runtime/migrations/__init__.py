"""Schema migrations (Alembic), one history per service: `services/<name>/migrations/` holds its
revisions, `alembic_version_<name>` in its own database says which one it is at.

What a service does with its database at start-up (`prepare_schema`, docs/ops.md "Schema migrations"):

- at the head revision of its code: starts;
- empty (none of its tables, no version row): created at head, as `create_all` did before;
- anything else (an older revision, tables made before migrations existed, a revision this code
  does not know): refuses to start with one line naming both revisions. Upgrading a database that
  holds data is `gputrace migrate`'s job (compose's `migrate` job, `gputrace run` before the services),
  run as the role that owns the tables.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.runtime.db import make_engine

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
BASELINE = "0001"


class SchemaMismatch(RuntimeError):
    """The database is not at the revision this code needs; the message (one line) says what to do."""


def version_table(service: str) -> str:
    return f"alembic_version_{service}"


def versions_dir(service: str) -> Path:
    """`services/<service>/migrations`, found by name: the runtime knows services only by name."""
    spec = importlib.util.find_spec(f"services.{service}.migrations")
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"no migrations for service {service!r} (services/{service}/migrations)")
    return Path(next(iter(spec.submodule_search_locations)))


def config(service: str, connection: Connection | None = None, metadata: MetaData | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("version_locations", str(versions_dir(service)))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes.update(service=service, connection=connection, metadata=metadata)
    return cfg


def head(service: str) -> str:
    """The revision this code needs."""
    found = ScriptDirectory.from_config(config(service)).get_current_head()
    if found is None:
        raise LookupError(f"service {service!r} has no migrations")
    return found


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # the database's revision; None when it has no version row
    head: str  # the code's
    has_tables: bool  # any table at all besides the version table (made before migrations, or foreign)

    @property
    def empty(self) -> bool:
        return self.current is None and not self.has_tables

    def describe(self) -> str:
        if self.current is None:
            return "none (tables made before migrations)" if self.has_tables else "none (empty database)"
        return self.current


def _state(sync: Connection, service: str) -> SchemaState:
    context = MigrationContext.configure(sync, opts={"version_table": version_table(service)})
    tables = set(inspect(sync).get_table_names()) - {version_table(service)}
    return SchemaState(context.get_current_revision(), head(service), bool(tables))


def _upgrade(sync: Connection, service: str, revision: str) -> None:
    state = _state(sync, service)
    if state.current is None and state.has_tables:
        # A database made by create_all before migrations existed: that schema is the baseline
        # (0001 reproduces it, guards included), so it is adopted at 0001 and upgraded from there.
        command.stamp(config(service, sync), BASELINE)
    command.upgrade(config(service, sync), revision)


async def schema_state(engine: AsyncEngine, service: str) -> SchemaState:
    async with engine.connect() as conn:
        return await conn.run_sync(_state, service)


async def migrate(engine: AsyncEngine, service: str, revision: str = "head") -> tuple[SchemaState, SchemaState]:
    """Upgrade the service's database to `revision` (head: this code's); (before, after)."""
    before = await schema_state(engine, service)
    if before.current is not None and before.current != before.head:
        _known(service, before.current)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, service, revision)
    return before, await schema_state(engine, service)


def _known(service: str, revision: str) -> None:
    try:
        ScriptDirectory.from_config(config(service)).get_revision(revision)
    except Exception:
        raise SchemaMismatch(
            f"database schema at revision {revision}, which this code does not know (newer code migrated it?): "
            "run the newer code, or restore a backup"
        ) from None


async def prepare_schema(engine: AsyncEngine, service: str) -> SchemaState:
    """At start-up: go on at head, create an empty database at head, refuse anything else."""
    state = await schema_state(engine, service)
    if state.current == state.head:
        return state
    if state.empty:
        await migrate(engine, service)
        return await schema_state(engine, service)
    if state.current is not None:
        _known(service, state.current)
    raise SchemaMismatch(
        f"{service}: database schema at revision {state.describe()}, code needs {state.head}: run gputrace migrate"
        f" --service {service}"
    )


def refuse_older_schema(url: str, service: str) -> None:
    """Before a server starts (`python -m services.<name>`): an empty database is created at head,
    a schema older than the code stops the process with one line instead of a lifespan traceback."""

    async def check() -> None:
        # Its own engine: the service's pool must not keep connections made on this event loop.
        engine = make_engine(url)
        try:
            await prepare_schema(engine, service)
        finally:
            await engine.dispose()

    try:
        asyncio.run(check())
    except SchemaMismatch as exc:
        log.critical("refusing to start: %s", exc)
        raise SystemExit(f"refusing to start: {exc}") from None
