"""One-shot, run as the ledger database's OWNER role: the ledger's migrations (its tables and
append-only guards, services/ledger/migrations), then the run-time role's grants (rows only).
`python -m services.ledger.schema --runtime-role ROLE`, or `gputrace migrate --service ledger
--runtime-role ROLE` (what compose's `ledger-migrate` job runs).

The ledger itself then runs as the run-time role (docs/ops.md, "The ledger's two roles"): not owning
the tables, it cannot drop or disable the triggers that keep its log append-only, and at start-up
it only checks they are all there (services.ledger.log.install_append_only_guards) and that its
schema is at the revision its code needs. Running this again changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ledger.log import runtime_grants
from services.ledger.projections import backfill_projections
from shared.runtime.db import is_postgres, make_engine
from shared.runtime.migrations import SchemaState, migrate
from shared.runtime.observability import configure_logging
from shared.runtime.settings import Settings

log = logging.getLogger(__name__)
SERVICE = "ledger"


async def _check_owner(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        owner = await conn.scalar(text("SELECT tableowner FROM pg_tables WHERE tablename = 'log_entries'"))
        if owner is not None and owner != await conn.scalar(text("SELECT current_user")):
            raise SystemExit("ledger-schema: run it as the role that owns the ledger's tables")


async def migrate_ledger(engine: AsyncEngine, runtime_role: str | None, revision: str = "head") -> SchemaState:
    """The ledger's migrations as the owner, then rows granted to the run-time role (re-granted
    each time: a revision may add tables) and the backfills a start-up would otherwise do."""
    if is_postgres(engine):
        await _check_owner(engine)
    _, after = await migrate(engine, SERVICE, revision)
    if runtime_role:
        if not is_postgres(engine):
            raise SystemExit("--runtime-role: roles are PostgreSQL's; the embedded SQLite ledger has none")
        async with engine.begin() as conn:
            for statement in runtime_grants(runtime_role):
                await conn.execute(text(statement))
    if after.current == after.head:
        await backfill_projections(engine)
    return after


async def install_schema(url: str, runtime_role: str | None) -> None:
    engine = make_engine(url)
    try:
        state = await migrate_ledger(engine, runtime_role)
    finally:
        await engine.dispose()
    granted = f"; rows granted to {runtime_role}" if runtime_role else ""
    log.info("ledger schema at revision %s, guards installed%s", state.current, granted)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.ledger.schema", description=__doc__)
    parser.add_argument("--runtime-role", help="The role the ledger runs as (gets rows, not tables).")
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    if not settings.database_url or settings.sqlalchemy_url("ledger").startswith("sqlite"):
        raise SystemExit("ledger-schema: set DATABASE_URL to the ledger's PostgreSQL database, as its owner role")
    asyncio.run(install_schema(settings.sqlalchemy_url("ledger"), args.runtime_role))


if __name__ == "__main__":
    main()
