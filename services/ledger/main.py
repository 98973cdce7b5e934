"""The ledger service: consumes every service's decisions into the Merkle log and serves auditors.

One process: a FastAPI app whose lifespan runs the Kafka subscriber (shared mechanism). Several
instances may run: each serves the API, one at a time appends (services.ledger.leadership), the
others stand by and take over when it dies; /readyz says which (`role`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from importlib.metadata import version

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from services.ledger.api import router
from services.ledger.appender import Appender
from services.ledger.auth import TokenFileError, Tokens, load_tokens
from services.ledger.dashboard import router as dashboard_router
from services.ledger.leadership import Leadership
from services.ledger.log import LOG_TABLES, install_append_only_guards
from services.ledger.log_api import log_router
from services.ledger.projections import PROJECTION_TABLES, prefetch
from services.ledger.witnessing import Witnesser
from shared.contract import DECIDING_SERVICES, decisions_topic
from shared.contract.parties import PartyRegistry, load_private_key
from shared.runtime.db import make_engine, session_factory
from shared.runtime.service import Service, ServiceConfigError
from shared.runtime.settings import Settings
from shared.runtime.tracing import instrument_api

SERVICE = "ledger"
log = logging.getLogger(__name__)


class LedgerConfigError(RuntimeError):
    """The ledger cannot start as configured; the message says what to do."""


def _signing_key(settings: Settings) -> Ed25519PrivateKey:
    path = settings.ledger_signing_key
    if not path.exists():
        # Never generated here: a new key is a new log identity that no auditor trusts, and it
        # would let a deleted key quietly "reset" the log.
        raise LedgerConfigError(
            f"no ledger signing key at {path}: create it once with `gputrace keys init` "
            "(or set LEDGER_SIGNING_KEY to the existing key); the ledger will not invent a new identity"
        )
    return load_private_key(path)


def _tokens(settings: Settings) -> Tokens:
    registry = PartyRegistry.load(settings.party_registry) if settings.party_registry.exists() else None
    if registry is None:
        log.warning("no party registry at %s: partner tokens are checked for a party_id only", settings.party_registry)
    try:
        return load_tokens(settings.api_tokens, registry)
    except TokenFileError as exc:
        raise LedgerConfigError(f"refusing to start: {exc}") from exc


def build_service(settings: Settings | None = None, on_checkpoint: Callable[[], None] | None = None) -> Service:
    settings = settings or Settings()
    appender = Appender(settings.ledger_origin, _signing_key(settings))
    appender.on_checkpoint = on_checkpoint
    return Service(
        SERVICE,
        tables=[*LOG_TABLES, *PROJECTION_TABLES],
        topics=[decisions_topic(s) for s in DECIDING_SERVICES],
        internal_handler=appender.on_decision,
        before_batch=appender.before_batch,
        after_batch=appender.after_batch,
        prefetch=prefetch,
        settings=settings,
    )


def create_app(settings: Settings | None = None, consume: bool = True) -> FastAPI:
    settings = settings or Settings()
    tokens = _tokens(settings)  # first: a bad tokens file stops start-up before anything else
    # The witnesses are asked to cosign each checkpoint in the background (none configured: no-op).
    witnesser = Witnesser(settings.witnesses, settings.witness_poll_seconds)
    service = build_service(settings, on_checkpoint=witnesser.wake)
    # The API reads through its own pool: auditors' load and the consumer's writes never wait
    # for each other's connections.
    api_engine = make_engine(service.engine.url.render_as_string(hide_password=False), settings.api_db_pool_size, True)

    async def guard_log() -> None:
        # Indexes and backfills belong to `gputrace migrate`: every instance starting (a standby
        # during a fail-over too) only checks the guards, taking no lock the readers would meet.
        async with service.engine.begin() as conn:
            await install_append_only_guards(conn)

    # One appender at a time: the consumer runs only while this instance leads. Its lock lives on
    # a connection of its own (closing it frees the lock), apart from the consumer's pool.
    leader_engine = make_engine(service.engine.url.render_as_string(hide_password=False), 1)
    leadership = Leadership(leader_engine)
    leading: list[asyncio.Task[None]] = []

    async def activate() -> None:
        # Active from the moment it holds the lock, while its consumer joins the group.
        service.readiness.note_role("active", service.broker)
        await service.broker.start()

    async def stand_by() -> None:
        service.readiness.note_role("standby")
        await service.broker.stop()

    async def start_leading() -> None:
        service.readiness.note_role("standby")
        leading.append(asyncio.create_task(leadership.run(activate, stand_by), name="ledger-leadership"))

    async def stop_leading() -> None:
        for task in leading:
            task.cancel()
        await asyncio.gather(*leading, return_exceptions=True)
        if leadership.role == "active":
            await service.broker.stop()
        await leader_engine.dispose()

    app = service.http_app(
        title="gputrace ledger",
        description="The tamper-evident record of the national GPU programme, for auditors.",
        on_startup=[guard_log, *([start_leading] if consume else [])],
        on_shutdown=[*([stop_leading] if consume else []), api_engine.dispose],
        # The consumer is started and stopped by the leadership above, not by the app's lifespan.
        consume=False,
    )
    app.state.leadership = leadership
    app.version = version("gputrace")  # the installed package's, so the schema names the code it describes
    app.state.tokens = tokens
    app.state.sessions = session_factory(api_engine)
    app.include_router(router)
    app.include_router(log_router)
    app.include_router(dashboard_router)
    witnesser.attach(app, service.sessions)
    instrument_api(app)  # a span per API request while tracing records (shared.runtime.tracing)
    return app


def main() -> None:
    settings = Settings()
    try:
        service_app = create_app(settings)
    except (LedgerConfigError, ServiceConfigError) as exc:
        # One clear line and a non-zero exit, not a traceback.
        log.critical("%s", exc)
        raise SystemExit(f"ledger: {exc}") from None
    service_app.state.service.serve(service_app)


if __name__ == "__main__":
    main()
