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
- The outbox relay: a PRODUCER span per row, `<service> publish <topic>`, child of the stored
  context, from the send to the Kafka transaction's commit; its context is the `traceparent` the
  record goes out with, so the next service's span is its child.
- The ledger's API: FastAPI's instrumentation (`instrument_api`).
"""

from __future__ import annotations

import contextlib
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
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": record.topic,
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
        "gputrace.service": service,
    }
    if event is not None:
        attributes["messaging.message.id"] = event.id
        attributes["cloudevents.event_source"] = event.source
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
        span.set_attributes(
            {
                "gputrace.event_type": decision.event_type,
                "gputrace.decision.status": decision.status,
                "gputrace.decision.reason_code": decision.reason_code or "",
                "gputrace.batch_id": decision.batch_id or "",
                "gputrace.party_id": decision.party_id or "",
            }
        )


class PublishSpans:
    """The relay's spans of one Kafka transaction, one per row, ended when it commits (or fails)."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._tracer = _tracer
        self._spans: list[trace.Span] = []

    def headers(self, topic: str, headers: Sequence[tuple[str, bytes]]) -> Sequence[tuple[str, bytes]]:
        """The row's headers as sent: its stored trace context replaced by its publish span's."""
        if self._tracer is None:
            return headers
        stored = {k: v.decode("utf-8", "replace") for k, v in headers if k in TRACE_HEADERS}
        span = self._tracer.start_span(
            f"{self._service} publish {topic}",
            context=PROPAGATOR.extract(stored),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic,
                "gputrace.service": self._service,
            },
        )
        self._spans.append(span)
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return [(k, v) for k, v in headers if k not in TRACE_HEADERS] + [(k, v.encode()) for k, v in carrier.items()]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Around the Kafka transaction: its outcome is each row's span's."""
        try:
            yield
        except BaseException as exc:
            for span in self._spans:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            for span in self._spans:
                span.end()
            self._spans.clear()
