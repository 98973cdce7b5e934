"""The composition root of a gputrace service: settings, database, broker, subscriber, outbox relay.

A service says which topics it reads and which handlers decide; this module wires the one
mechanism (shared.runtime.consumer + shared.runtime.outbox) around them. Services never import each other.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from aiokafka import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from prometheus_client import make_asgi_app
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.contract import DECIDING_SERVICES, DECISION_TOPIC_OWNERS, DECISION_TOPICS
from shared.contract.parties import PartyRegistry, load_private_key, public_key_b64
from shared.runtime.consumer import (
    BatchHook,
    BatchProcessor,
    InternalHandler,
    PartnerHandler,
    Prefetch,
    RetryBatch,
    retry_pause,
)
from shared.runtime.db import make_engine, session_factory
from shared.runtime.health import Readiness
from shared.runtime.kafka_auth import faststream_security
from shared.runtime.kafka_records import install as tolerate_bad_header_names
from shared.runtime.migrations import prepare_schema, refuse_older_schema
from shared.runtime.observability import HANDLER_SECONDS, configure_logging
from shared.runtime.outbox import OutboxRelay
from shared.runtime.settings import Settings
from shared.runtime.topics import ensure_topics
from shared.runtime.tracing import kafka_middleware, setup_tracing

log = logging.getLogger(__name__)


# aiokafka itself would stop at a header name that is not UTF-8 (see shared.runtime.kafka_records).
tolerate_bad_header_names()


def _safe_headers(record: ConsumerRecord) -> ConsumerRecord:
    # Headers dropped: FastStream would decode every value as UTF-8 (and raise on bad bytes or a
    # null value), and needs none of them; our reader sees the originals.
    return dataclasses.replace(record, headers=(), value=None)


async def _parser(records: Any, original: Any) -> Any:
    """FastStream's parser must not raise on any record, or the partition stalls: it parses a
    header-less copy of the batch's first record only (FastStream reads nothing else of it but the
    offsets, which are kept), and the handler gets the original records. A copy per record, and a
    header dict per record, were ~5% of a service's CPU."""
    batch = records if isinstance(records, tuple) else (records,)
    message = await original((_safe_headers(batch[0]),))
    message.raw_message = batch
    message.body = [r.value or b"" for r in batch]
    message.message_id = f"{batch[0].offset}-{batch[-1].offset}-{batch[0].timestamp}"
    return message


async def _decoder(message: Any, original: Any) -> None:
    # The handler reads the raw records; FastStream's JSON decoding would raise on bad input.
    return None


def tune_gc() -> None:
    """After start-up: what start-up made (modules, models, clients) is frozen out of the
    collector's sight, and young collections run ten times less often. Each event allocates
    short-lived containers that reference counting frees anyway; with the defaults the cyclic
    collector rescanned them, and the long-lived heap, for ~7% of a service's CPU."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


class ServiceConfigError(RuntimeError):
    """The service cannot start as configured; the message (one line) says what to do."""


def load_registry(settings: Settings) -> PartyRegistry:
    path = settings.party_registry
    if not path.exists():
        raise ServiceConfigError(
            f"no party registry at {path}: create it with `gputrace keys init` (or set PARTY_REGISTRY)"
        )
    return PartyRegistry.load(path)


def signing_key(settings: Settings, name: str, registry: PartyRegistry) -> Ed25519PrivateKey:
    """The key a deciding service signs its decisions with: it must exist and be the one the
    registry names for the service, or its every decision would be dead-lettered downstream."""
    path = settings.signing_key_path(name)
    fix = "create it with `gputrace keys init` (or set SERVICE_SIGNING_KEY to the service's key)"
    if not path.exists():
        raise ServiceConfigError(f"no signing key for the {name} service at {path}: {fix}")
    try:
        key = load_private_key(path)
    except ValueError as exc:
        raise ServiceConfigError(f"the {name} service's signing key at {path} is unreadable ({exc}): {fix}") from None
    entry = registry.service(name)
    if entry is None:
        raise ServiceConfigError(
            f"the party registry {settings.party_registry} has no entry for the {name} service (role service): "
            "add it with `gputrace keys init`"
        )
    if public_key_b64(entry.public_key) != public_key_b64(key.public_key()):
        raise ServiceConfigError(
            f"the {name} service's signing key at {path} does not match its entry in {settings.party_registry}: "
            "run `gputrace keys init` with the same keys directory, or register this key"
        )
    return key


class Service:
    def __init__(
        self,
        name: str,
        *,
        tables: Sequence[Table],
        topics: Sequence[str],
        partner_handlers: dict[str, PartnerHandler] | None = None,
        internal_handler: InternalHandler | None = None,
        after_batch: BatchHook | None = None,
        prefetch: Prefetch | None = None,
        settings: Settings | None = None,
        before_batch: BatchHook | None = None,
    ) -> None:
        self.name = name
        self.settings = settings or Settings()
        # Tracing is configured here, before the broker and the relay that record with it.
        setup_tracing(self.settings, name)
        self.engine: AsyncEngine = make_engine(self.settings.sqlalchemy_url(name))
        self.sessions = session_factory(self.engine)
        self.tables = list(tables)
        self.topics = list(topics)
        internal_topics = [t for t in self.topics if t in DECISION_TOPICS]
        deciding = name in DECIDING_SERVICES
        registry = load_registry(self.settings) if partner_handlers or internal_topics or deciding else None
        key = signing_key(self.settings, name, registry) if deciding and registry is not None else None
        for topic in internal_topics:
            owner = DECISION_TOPIC_OWNERS[topic]
            if registry is not None and registry.service(owner) is None:
                # Every record of that topic would be dead-lettered: refuse, rather than drop them all.
                raise ServiceConfigError(
                    f"the party registry {self.settings.party_registry} has no key for the {owner} service, whose "
                    f"decisions {name} reads: add it with `gputrace keys init`"
                )
        self.processor = BatchProcessor(
            name,
            self.sessions,
            registry=registry,
            partner_handlers=partner_handlers,
            internal_handler=internal_handler,
            internal_topics=internal_topics,
            after_batch=after_batch,
            prefetch=prefetch,
            signing_key=key,
            before_batch=before_batch,
        )
        self.readiness = Readiness(
            stall_seconds=self.settings.readiness_stall_seconds,
            relay_seconds=self.settings.readiness_relay_seconds,
            probe_timeout=self.settings.readiness_probe_seconds,
        )
        # FastStream logs through our logger, so its lines are JSON like ours. The readiness
        # middleware sees every polled batch start, finish or fail.
        # This service's own Kafka principal: the ACLs let it read its inputs and write only its own
        # outputs (tools/kafka_access.py).
        self.kafka_options = self.settings.kafka_client_options()
        self.broker = KafkaBroker(
            # A list: FastStream takes a string as one host, so "a:9092,b:9092" (a cluster) would fail.
            self.settings.kafka_bootstrap_servers.split(","),
            client_id=f"gputrace-{name}",
            security=faststream_security(self.kafka_options),
            # Topics are the admin's (`gputrace topics`); a service principal may not create any.
            allow_auto_create_topics=False,
            logger=logging.getLogger("faststream"),
            # Telemetry outermost: its batch span covers the readiness bookkeeping too.
            middlewares=(kafka_middleware(), self.readiness.middleware()),
        )
        self.relay = OutboxRelay(
            name,
            self.engine,
            self.sessions,
            self.settings.kafka_bootstrap_servers,
            self.settings.outbox_poll_seconds,
            group_prefix=self.settings.consumer_group_prefix,
            client_options=self.kafka_options,
        )
        self.relay.on_round = self.readiness.note_relay_round
        self._subscribe()

    def _subscribe(self) -> None:
        processor, relay = self.processor, self.relay

        @self.broker.subscriber(
            *self.topics,
            group_id=f"{self.settings.consumer_group_prefix}-{self.name}",
            batch=True,
            max_records=self.settings.batch_max_records,
            batch_timeout_ms=self.settings.batch_timeout_ms,
            auto_offset_reset="earliest",
            # Decisions come from transactional relays (shared.runtime.outbox): aborted records never count.
            isolation_level="read_committed",
            # Offsets are committed after the handler returned, i.e. after the database commit;
            # on an exception the consumer seeks back and the batch comes again.
            ack_policy=AckPolicy.NACK_ON_ERROR,
            parser=_parser,
            decoder=_decoder,
        )
        async def on_batch(body: Any, message: KafkaMessage) -> None:
            started = time.monotonic()
            try:
                with HANDLER_SECONDS.labels(self.name).time():
                    await processor.process(message.raw_message)
            except RetryBatch as exc:
                # A record's handler failed; it has tries left (then it is dead-lettered).
                log.warning("batch will be redelivered: %s", exc)
                await retry_pause(started)
                raise
            except Exception:
                log.exception("batch failed; it will be redelivered")
                await retry_pause(started)
                raise
            relay.wake()

    async def start_dependencies(self) -> None:
        # On a secured broker topics are made by the admin (`gputrace topics`), before the services.
        if "sasl_mechanism" not in self.kafka_options:
            await ensure_topics(self.settings.kafka_bootstrap_servers)
        # Its schema from its migrations: an empty database is created, an older one refused.
        await prepare_schema(self.engine, self.name)
        await self.relay.start()

    async def stop_dependencies(self) -> None:
        await self.relay.stop()
        await self.engine.dispose()

    def http_app(
        self,
        *,
        title: str | None = None,
        description: str = "",
        on_startup: Sequence[Callable[[], Awaitable[None]]] = (),
        on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
        consume: bool = True,
    ) -> FastAPI:
        """The service's process: an ASGI app whose lifespan runs the Kafka subscriber and the outbox
        relay, serving /healthz (liveness), /readyz (readiness, shared.runtime.health) and /metrics
        (Prometheus). The ledger adds its API routes to it."""
        service = self

        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            await service.start_dependencies()
            for hook in on_startup:
                await hook()
            if consume:
                await service.broker.start()
            tune_gc()
            try:
                yield
            finally:
                if consume:
                    await service.broker.stop()
                await service.stop_dependencies()
                for hook in on_shutdown:
                    await hook()

        app = FastAPI(title=title or f"gputrace {self.name}", description=description, lifespan=lifespan)
        app.state.service = self
        app.state.settings = self.settings
        app.state.sessions = self.sessions

        @app.get("/healthz", include_in_schema=False)
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "service": service.name}

        @app.get("/readyz", include_in_schema=False)
        async def readyz() -> JSONResponse:
            report = await service.readiness.check(service.broker if consume else None)
            return JSONResponse(report.as_json(service.name), status_code=200 if report.ready else 503)

        app.mount("/metrics", make_asgi_app())
        return app

    def serve(self, app: FastAPI) -> None:
        configure_logging(self.settings.log_level, self.settings.log_json)
        refuse_older_schema(self.settings.sqlalchemy_url(self.name), self.name)
        uvicorn.run(app, host=self.settings.http_host, port=self.settings.http_port, log_config=None)


def run_service(build: Callable[[], Service]) -> None:
    """`python -m services.<name>`: build the service from the environment and serve it."""
    try:
        service = build()
    except ServiceConfigError as exc:
        # One clear line on stderr and a non-zero exit, not a traceback.
        raise SystemExit(f"refusing to start: {exc}") from None
    service.serve(service.http_app())
