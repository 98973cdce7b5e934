"""One-shot, run as the ledger database's OWNER role: the ledger's tables, its append-only guards,
and the run-time role's grants (rows only). `python -m services.ledger.schema --runtime-role ROLE`.

The ledger itself then runs as the run-time role (docs/ops.md, "The ledger's two roles"): not owning
the tables, it cannot drop or disable the triggers that keep its log append-only, and at start-up
it only checks they are all there (services.ledger.log.install_append_only_guards). Compose runs
this as the `ledger-schema` job before the ledger; running it again changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from sqlalchemy import text

from services.ledger.log import LOG_TABLES, install_append_only_guards, runtime_grants
from services.ledger.projections import PROJECTION_TABLES, upgrade
from shared.runtime.db import create_tables, make_engine
from shared.runtime.observability import configure_logging
from shared.runtime.settings import Settings

log = logging.getLogger(__name__)


async def install_schema(url: str, runtime_role: str | None) -> None:
    engine = make_engine(url)
    try:
        await create_tables(engine, [*LOG_TABLES, *PROJECTION_TABLES])  # type: ignore[list-item]
        async with engine.begin() as conn:
            if await conn.scalar(text("SELECT tableowner FROM pg_tables WHERE tablename = 'log_entries'")) != (
                await conn.scalar(text("SELECT current_user"))
            ):
                raise SystemExit("ledger-schema: run it as the role that owns the ledger's tables")
            await install_append_only_guards(conn)
            for statement in runtime_grants(runtime_role) if runtime_role else []:
                await conn.execute(text(statement))
        await upgrade(engine)  # the indexes and backfills a start-up would otherwise attempt
    finally:
        await engine.dispose()
    log.info("ledger schema and guards installed%s", f"; rows granted to {runtime_role}" if runtime_role else "")


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
