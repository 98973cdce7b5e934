"""Alembic's environment for every service: the caller hands over a live connection
(shared.runtime.migrations), so migrations run through the service's own engine and driver."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

config = context.config
connection = config.attributes["connection"]
service: str = config.attributes["service"]

context.configure(
    connection=connection,
    target_metadata=config.attributes.get("metadata"),
    version_table=f"alembic_version_{service}",
    # SQLite alters a table by copying it (batch mode); harmless elsewhere.
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=False,
)

with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        # Two processes migrating one database (two replicas starting, a job and a service) take
        # turns: the second finds the work done.
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"gputrace-migrate-{service}"})
    context.run_migrations()
