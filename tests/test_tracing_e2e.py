"""OpenTelemetry traces through real Kafka and PostgreSQL (shared.runtime.tracing).

A pledges service and a ledger in this process, each on its own PostgreSQL database, record
into an in-memory exporter. One partner event, sent with the partner's `traceparent`, must make
ONE trace: the pledges service's span deciding it (child of the partner's span), the ledger's
span appending its decision (child of the deciding span, though the context crossed a committed
transaction, the outbox table and Kafka), and the auditor's API read under the same context; the
relay's span of the Kafka transaction that published the decision links to the deciding span.
Silent, nothing is recorded and the partner's context is passed on unchanged.

The relay publishes onto the contract's `gputrace.pledges.decisions.v1`, signed with this test's
own keys: a session stack's ledger and quotes, if running, dead-letter those records as forged.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import opentelemetry.exporter.otlp.proto.http.trace_exporter as otlp
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.ledger.auth import write_dev_tokens
from services.ledger.main import create_app
from shared.contract import DECIDING_SERVICES, OUTCOMES_TOPIC, PLEDGES_TOPIC, decisions_topic
from shared.contract.parties import write_private_key
from shared.runtime import tracing
from shared.runtime.settings import Settings
from tests.inprocess import build, capital, group_of, start_group_at_end
from tests.partner import PartnerClient, TopicWatcher
from tools.devkeys import DEV_PARTIES

pytestmark = pytest.mark.asyncio(loop_scope="session")

DECISIONS = decisions_topic("pledges")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans of services built while it is installed, kept in memory (synchronously exported)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.install(provider)
    try:
        yield spans
    finally:
        tracing.install(None)
        provider.shutdown()


def database(admin_url: str, label: str) -> str:
    name = f"trace_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _trace(spans: list[ReadableSpan], trace_id: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if _hex(s.context.trace_id, 32) == trace_id), key=lambda s: s.start_time or 0)


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def appended(spans: list[ReadableSpan], decision_id: str) -> ReadableSpan | None:
    """The ledger's span of the record carrying this decision."""
    name = f"ledger process {DECISIONS}"
    return next(
        (s for s in spans if s.name == name and (s.attributes or {}).get("messaging.message.id") == decision_id), None
    )


def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def _parent_is(child: ReadableSpan, parent: ReadableSpan) -> bool:
    return child.parent is not None and child.parent.span_id == parent.context.span_id


def linking(spans: list[ReadableSpan], to: ReadableSpan) -> list[ReadableSpan]:
    """The spans (of other traces) with a link to `to`: the relay's transactions, for one."""
    return [s for s in spans if any(link.context.span_id == to.context.span_id for link in s.links)]


def render(spans: list[ReadableSpan], every: list[ReadableSpan] = ()) -> str:  # type: ignore[assignment]
    """The trace as a tree: span names, durations and the decision, for the eye (pytest -s); the
    spans of `every` that link to one of it (the relay's transactions) shown under it too."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in by_parent.get(parent, []):
            ms = ((s.end_time or 0) - (s.start_time or 0)) / 1e6
            status = (s.attributes or {}).get("gputrace.decision.status")
            lines.append(f"{'  ' * depth}{s.name}  {ms:.1f} ms" + (f"  [{status}]" if status else ""))
            for other in linking(every, s):
                other_ms = ((other.end_time or 0) - (other.start_time or 0)) / 1e6
                lines.append(f"{'  ' * (depth + 1)}(linked) {other.name}  {other_ms:.1f} ms")
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    # tests.inprocess.build writes the party registry and service keys there; the ledger's come here.
    keys.mkdir()
    write_private_key(keys / "ledger.key", Ed25519PrivateKey.generate())
    return keys


async def test_one_partner_event_is_one_trace_from_the_deciding_service_to_the_ledger(
    exporter: InMemorySpanExporter, kafka_bootstrap: str, postgres_url: str, tmp_path: Path, keys: Path
) -> None:
    pledges = build(kafka_bootstrap, tmp_path, database_url=database(postgres_url, "pledges"), outbox_poll_seconds=0.2)
    prefix = f"trace-{uuid.uuid4().hex[:8]}"
    ledger_settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        database_url=database(postgres_url, "ledger"),
        party_registry=keys / "registry.json",
        ledger_signing_key=keys / "ledger.key",
        api_tokens=keys / "tokens.json",
        var_dir=tmp_path / "ledger-var",
        consumer_group_prefix=prefix,
        outbox_poll_seconds=0.2,
    )
    auditor = write_dev_tokens(keys / "tokens.json", [p for p, _, _ in DEV_PARTIES])["auditor"]
    ledger = create_app(ledger_settings)
    # Both groups start at the topics' ends: only this test's records count.
    await start_group_at_end(kafka_bootstrap, group_of(pledges), PLEDGES_TOPIC)
    for service in DECIDING_SERVICES:
        await start_group_at_end(kafka_bootstrap, f"{prefix}-ledger", decisions_topic(service))

    partner_trace, partner_span = secrets.token_hex(16), secrets.token_hex(8)
    pledge = f"TRACE-{uuid.uuid4().hex[:8]}"
    outcomes = await TopicWatcher(kafka_bootstrap, OUTCOMES_TOPIC).start()
    await pledges.start_dependencies()
    await pledges.broker.start()
    try:
        async with ledger.router.lifespan_context(ledger), PartnerClient(kafka_bootstrap, keys) as partner:
            key, value, headers, event_id = partner.record("kdb", "pledge.committed.v1", capital(pledge, prefix))
            context = f"00-{partner_trace}-{partner_span}-01"
            headers.append(("traceparent", context.encode()))
            await partner.send_raw(PLEDGES_TOPIC, key, value, headers)
            # Its own pledges service's outcome: when the session's stack runs too, its pledges
            # service also answers this event (rejected: this test's keys are not in its registry).
            await outcomes.wait(lambda: any(o["status"] == "accepted" for o in outcomes.by_event.get(event_id, [])))
            outcome = next(o for o in outcomes.by_event[event_id] if o["status"] == "accepted")
            # The ledger's span of this decision, whatever trace it landed in.
            await until(lambda: appended(finished(exporter), outcome["decision_id"]) is not None)
            # The auditor reads the pledge under the same context: the API's span joins the trace.
            transport = httpx.ASGITransport(app=ledger)
            async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as api:
                auth = {"Authorization": f"Bearer {auditor}"}
                # (the span ends before the ledger's batch commits: read once it has)
                while (await api.get(f"/v1/pledges/{pledge}", headers=auth)).status_code == 404:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
                read = await api.get(f"/v1/pledges/{pledge}", headers={**auth, "traceparent": context})
            assert read.status_code == 200, read.text
    finally:
        await pledges.broker.stop()
        await pledges.stop_dependencies()
        await outcomes.stop()

    assert outcome["status"] == "accepted"
    spans = _trace(finished(exporter), partner_trace)
    print(f"\ntrace {partner_trace} (partner span {partner_span}):\n{render(spans, finished(exporter))}")
    append = appended(finished(exporter), outcome["decision_id"])
    assert append is not None and _hex(append.context.trace_id, 32) == partner_trace, (
        "the ledger's span is in another trace"
    )
    decide = _one(spans, f"pledges decide {PLEDGES_TOPIC}")
    # Deciding: the child of the partner's span, the decision on it.
    assert decide.parent is not None and decide.parent.is_remote and _hex(decide.parent.span_id, 16) == partner_span
    assert (decide.attributes or {})["gputrace.decision.status"] == "accepted"
    assert decide.kind is trace.SpanKind.CONSUMER
    # The decision left through the outbox with the context it was enqueued in, and the ledger
    # appended it as the child of the span that decided, across Kafka.
    assert _parent_is(append, decide), "the ledger's span is not the child of the span that decided"
    assert append.parent is not None and append.parent.is_remote
    # The relay's transaction that published it links to that context.
    published = [s for s in linking(finished(exporter), decide) if s.name == "pledges publish"]
    assert published and published[0].kind is trace.SpanKind.PRODUCER, "no relay span links to the decision"
    # The partner's outcome went out the same way, and carries the trace for the partner.
    outcome_record = next(
        r for r in outcomes.records if json.loads(r.value).get("decision_id") == outcome["decision_id"]
    )
    sent = dict(outcome_record.headers)["traceparent"].decode().split("-")
    assert sent[1:] == [partner_trace, _hex(decide.context.span_id, 16), "01"]
    # The auditor's read, with FastAPI's instrumentation.
    assert any(s.name == "GET /v1/pledges/{pledge_id}" for s in spans), [s.name for s in spans]
    # Each service's batch span is linked from its records' spans (FastStream's middleware).
    for span in (decide, append):
        linked = {link.context.span_id for link in span.links}
        batch = [s for s in exporter.get_finished_spans() if s.context.span_id in linked]
        assert batch and batch[0].name.endswith(" process") and batch[0].kind is trace.SpanKind.CONSUMER


async def test_silent_tracing_records_nothing_and_passes_the_partners_context_on() -> None:
    """Without a provider (no OTEL_EXPORTER_OTLP_ENDPOINT): no tracer, no span, the partner's
    headers handed on as they came (W3C: a participant that records nothing may keep parent-id)."""
    assert tracing.tracer() is None
    incoming = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01", "tracestate": "k=v"}
    assert tracing.outgoing(incoming) is incoming
    spans = tracing.PublishSpans("pledges")
    headers = [("ce_id", b"x"), ("traceparent", incoming["traceparent"].encode())]
    async with spans.transaction():
        assert spans.headers("t", headers) is headers


async def test_the_otlp_endpoint_makes_an_exporting_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone turns recording on, exporting to its /v1/traces."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9/")
    installed: list[Any] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)  # the process-wide one stays unset
    endpoints: list[str | None] = []

    class Recorded(otlp.OTLPSpanExporter):
        def __init__(self, endpoint: str | None = None) -> None:
            endpoints.append(endpoint)
            super().__init__(endpoint=endpoint)

    monkeypatch.setattr(otlp, "OTLPSpanExporter", Recorded)
    assert tracing.setup_tracing(Settings(_env_file=None, otel_exporter_otlp_endpoint=None), "pledges") is None
    provider = tracing.setup_tracing(Settings(), "pledges")
    try:
        assert provider is not None and installed == [provider] and tracing.tracer() is not None
        assert provider.resource.attributes["service.name"] == "gputrace-pledges"
        assert endpoints == ["http://127.0.0.1:9/v1/traces"]
    finally:
        tracing.install(None)
        provider.shutdown() if provider is not None else None


async def until(predicate: Any, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (spans arrive from the services' own tasks)
            await asyncio.sleep(0.1)
