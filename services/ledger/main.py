"""The ledger service: consumes every service's decisions into the Merkle log and serves auditors.

One process: a FastAPI app whose lifespan runs the Kafka subscriber (shared mechanism).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from services.ledger.api import router
from services.ledger.appender import Appender
from services.ledger.auth import load_tokens
from services.ledger.dashboard import router as dashboard_router
from services.ledger.log import LOG_TABLES, install_append_only_guards
from services.ledger.log_api import log_router
from services.ledger.projections import PROJECTION_TABLES, prefetch
from shared.contract import DECIDING_SERVICES, decisions_topic
from shared.contract.parties import load_private_key, write_private_key
from shared.runtime.service import Service
from shared.runtime.settings import Settings

SERVICE = "ledger"
log = logging.getLogger(__name__)


def _signing_key(settings: Settings):  # type: ignore[no-untyped-def]
    path = settings.ledger_signing_key
    if not path.exists():
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        log.warning("no ledger signing key at %s; generating a development key", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_key(path, Ed25519PrivateKey.generate())
    return load_private_key(path)


def build_service(settings: Settings | None = None) -> Service:
    settings = settings or Settings()
    appender = Appender(settings.ledger_origin, _signing_key(settings))
    return Service(
        SERVICE,
        tables=[*LOG_TABLES, *PROJECTION_TABLES],
        topics=[decisions_topic(s) for s in DECIDING_SERVICES],
        internal_handler=appender.on_decision,
        after_batch=appender.after_batch,
        prefetch=prefetch,
        settings=settings,
    )


def create_app(settings: Settings | None = None, consume: bool = True) -> FastAPI:
    settings = settings or Settings()
    service = build_service(settings)

    async def guard_log() -> None:
        async with service.engine.begin() as conn:
            await install_append_only_guards(conn)

    app = service.http_app(
        title="gputrace ledger",
        description="The tamper-evident record of the national GPU programme, for auditors.",
        on_startup=[guard_log],
        consume=consume,
    )
    app.version = "1.0.0"
    app.state.tokens = load_tokens(settings.api_tokens)
    app.include_router(router)
    app.include_router(log_router)
    app.include_router(dashboard_router)
    return app


def main() -> None:
    settings = Settings()
    service_app = create_app(settings)
    service_app.state.service.serve(service_app)


if __name__ == "__main__":
    main()
