"""OpenTelemetry traces: where one event's time went, across every service it passed through.

Recording only when OTEL_EXPORTER_OTLP_ENDPOINT is set (`setup_tracing`, called by the composition
root, shared.runtime.service) or a test installs a provider (`install`). Otherwise tracing is
silent: no SDK provider, no span, and the W3C context a partner sent (`traceparent`,
`tracestate`) is passed on unchanged to the records written for its event, as
docs/partner-contract.md promises: one dict handed along, nothing parsed.

While recording, one partner event makes one trace:

- FastStream's KafkaTelemetryMiddleware: a span per polled batch (`<topic> process`).
- shared.runtime.consumer: a CONSUMER span per record, `<service> decide <topic>` (partner events)
  or `<service> process <topic>` (another service's decisions), the child of the context the
  record carried and linked to its batch's span.
- What the record's handling enqueues carries that span's context (`outgoing`): the outbox row
  stores it in its headers, so it survives the transaction, the table and a crash.
- The outbox relay: each row goes out with the stored context as its `traceparent`, so the next
  service's span is the child of the span that decided; a PRODUCER span per Kafka transaction,
  `<service> publish`, linked to its rows' contexts.
- The ledger's API: FastAPI's instrumentation (`instrument_api`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord
    from fastapi import FastAPI
    from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware

    from shared.contract.cloudevents import CloudEvent
    from shared.contract.decisions import Decision
    from shared.runtime.settings import Settings

# The contract's trace headers are W3C trace context, nothing else (no baggage): the one propagator.
PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = ("traceparent", "tracestate")
INSTRUMENTATION = "gputrace"

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_SILENT: AbstractContextManager[None] = nullcontext()


def setup_tracing(settings: Settings, service: str) -> TracerProvider | None:
    """The process's tracer provider: with OTEL_EXPORTER_OTLP_ENDPOINT, an SDK provider exporting
    over OTLP/HTTP in the background (made once per process); else the one a test installed, or
    None (silent). The SDK is imported only when recording, so a silent process never loads it."""
    if _provider is None and settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # The generic OTLP endpoint names the collector; traces go to its /v1/traces (OTLP spec).
        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the sampler honours OTEL_TRACES_SAMPLER.
        provider = SdkTracerProvider(resource=Resource.create({SERVICE_NAME: f"gputrace-{service}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        install(provider)
    return _provider


def install(provider: TracerProvider | None) -> None:
    """Record with `provider` from now on (None: silent again). Services take it when built."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None


def tracer() -> Tracer | None:
    """The tracer while recording, None while silent."""
    return _tracer


def kafka_middleware() -> KafkaTelemetryMiddleware:
    """FastStream's telemetry middleware: a span per polled batch. Silent, a no-op provider, so
    that nothing set globally later makes a silent service record."""
    from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware

    return KafkaTelemetryMiddleware(
        tracer_provider=_provider or trace.NoOpTracerProvider(), include_messages_counters=False
    )


def instrument_api(app: FastAPI) -> None:
    """FastAPI's instrumentation on an HTTP API, while recording (silent: the app is left as is)."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        # Probes and scrapes would drown the traces; the ASGI send/receive spans say nothing more.
        excluded_urls="/healthz,/readyz,/metrics",
        exclude_spans=["receive", "send"],
    )


def record_span(
    tracer: Tracer | None, service: str, record: ConsumerRecord, event: CloudEvent | None, internal: bool
) -> AbstractContextManager[Any]:
    """The span of one record's handling, current while it runs; silent, a shared no-op."""
    if tracer is None:
        return _SILENT
    batch = trace.get_current_span().get_span_context()
    # Few attributes: each costs CPU on every span (the service is the resource's service.name).
    attributes: dict[str, Any] = {"messaging.system": "kafka", "messaging.destination.name": record.topic}
    if event is not None:
        attributes["messaging.message.id"] = event.id
    return tracer.start_as_current_span(
        f"{service} {'process' if internal else 'decide'} {record.topic}",
        # The context the record carried: the partner's, or that of the service that decided it.
        # (an unreadable record: none, so a trace of its own, not its batch's).
        context=PROPAGATOR.extract(event.trace if event is not None else {}),
        kind=SpanKind.CONSUMER,
        links=[Link(batch)] if batch.is_valid else None,
        attributes=attributes,
    )


def outgoing(incoming: dict[str, str]) -> dict[str, str]:
    """The trace headers of a record written while handling an event whose headers were
    `incoming`: the current span's context while recording; silent, the partner's unchanged."""
    if _tracer is None:
        return incoming
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier


def annotate(decision: Decision) -> None:
    """The decision on the current record's span, so a trace shows what was decided."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        attributes = {"gputrace.event_type": decision.event_type, "gputrace.decision.status": decision.status}
        for name, value in (("reason_code", decision.reason_code), ("batch_id", decision.batch_id)):
            if value:
                attributes[f"gputrace.{name}"] = value
        span.set_attributes(attributes)


class PublishSpans:
    """The relay's span of one Kafka transaction (`<service> publish`), linked to the context each of
    its rows was written in (the first MAX_LINKS). The rows go out with that stored context as their
    `traceparent`, so the next service's span is the child of the span that decided: a span per
    transaction, not per row, as the messaging conventions have it for a batch sent at once (a
    span costs tens of µs of CPU, more than a row's share of a transaction)."""

    MAX_LINKS = 128  # the SDK's default limit of links per span: more would only be dropped

    def __init__(self, service: str) -> None:
        self._service = service
        self._tracer = _tracer
        self._links: list[Link] = []
        self._rows = 0

    def headers(self, topic: str, headers: Sequence[tuple[str, bytes]]) -> Sequence[tuple[str, bytes]]:
        """The row's headers as sent: as stored, its trace context included (noted for the link)."""
        if self._tracer is None:
            return headers
        self._rows += 1
        if len(self._links) < self.MAX_LINKS:
            stored = {k: v.decode("utf-8", "replace") for k, v in headers if k in TRACE_HEADERS}
            written = trace.get_current_span(PROPAGATOR.extract(stored)).get_span_context()
            if written.is_valid:
                self._links.append(Link(written))
        return headers

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Around the Kafka transaction: the span, made once its rows are known, covers it."""
        if self._tracer is None:
            yield
            return
        started = time.time_ns()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            span = self._tracer.start_span(
                f"{self._service} publish",
                kind=SpanKind.PRODUCER,
                links=self._links,
                start_time=started,
                attributes={"messaging.system": "kafka", "messaging.batch.message_count": self._rows},
            )
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.end()
