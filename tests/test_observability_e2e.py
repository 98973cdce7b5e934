"""Observability through real Kafka: W3C trace context from partner to ledger, structured JSON logs
naming event, batch and party, and Prometheus metrics on every service."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.partner import PartnerClient, TopicWatcher
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _json_lines(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


async def _log_line(stack: Stack, service: str, match: dict[str, object], timeout: float = 30) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        text = stack.processes[service].log_path.read_text(errors="replace")
        for doc in _json_lines(text):
            if all(doc.get(k) == v for k, v in match.items()):
                return doc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no {service} log line with {match}")
        await asyncio.sleep(0.3)


async def _batch_line(stack: Stack, service: str, event_id: str, timeout: float = 30) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        text = stack.processes[service].log_path.read_text(errors="replace")
        for doc in _json_lines(text):
            if event_id in (doc.get("event_ids") or []):  # type: ignore[operator]
                return doc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no {service} batch line naming {event_id}")
        await asyncio.sleep(0.3)


async def _appended_entry(stack: Stack, event_id: str, timeout: float = 30) -> dict[str, object]:
    """The entry naming this event in one of the ledger's INFO lines per appended batch."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        text = stack.processes["ledger"].log_path.read_text(errors="replace")
        for doc in _json_lines(text):
            for entry in doc.get("entries") or []:  # type: ignore[attr-defined]
                if doc.get("level") == "INFO" and entry.get("event_id") == event_id:
                    return entry  # type: ignore[no-any-return]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no ledger batch line naming {event_id}")
        await asyncio.sleep(0.3)


async def test_trace_context_and_structured_logs_from_partner_to_ledger(
    partner: PartnerClient, outcomes: TopicWatcher, kafka_bootstrap: str, stack: Stack
) -> None:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    pledge = f"TR-{uuid.uuid4().hex[:8]}"
    data = {
        "pledge_id": pledge, "partner_id": "naver-cloud", "program_id": "trace", "kind": "capacity",
        "capacity": {"gpu_hours": 1000}, "committed_at": "2025-03-01T00:00:00Z", "due_by": "2025-12-31",
    }  # fmt: skip
    key, value, headers, event_id = partner.record("naver-cloud", "pledge.committed.v1", data)
    headers.append(("traceparent", f"00-{trace_id}-{span_id}-01".encode()))
    decisions = await TopicWatcher(kafka_bootstrap, "gputrace.pledges.decisions.v1").start()
    try:
        await partner.send_raw("partner.pledges.v1", key, value, headers)
        await outcomes.outcome(event_id)

        def decision_record() -> object:
            return next((r for r in decisions.records if _answered_event(r.value) == event_id), None)

        await decisions.wait(lambda: decision_record() is not None)
        record = decision_record()
    finally:
        await decisions.stop()
    traceparent = dict(record.headers)["traceparent"].decode()  # type: ignore[attr-defined]
    version, tid, child_span, flags = traceparent.split("-")
    # The partner's trace goes on: unchanged while tracing is silent (this stack), under the deciding
    # service's own span while it records (tests/test_tracing_e2e.py).
    assert (version, tid, flags) == ("00", trace_id, "01")
    assert child_span == span_id or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")

    # The pledges service logs each batch as one JSON line at INFO naming its events (the decision's
    # own line is DEBUG); the ledger's line per batch names each entry's leaf index, event and trace.
    decided = await _batch_line(stack, "pledges", event_id)
    assert decided["level"] == "INFO" and "accepted" in decided["decisions"]  # type: ignore[operator]
    appended = await _appended_entry(stack, event_id)
    assert str(appended["traceparent"]).split("-")[1] == trace_id
    assert isinstance(appended["leaf_index"], int)


async def test_every_service_serves_prometheus_metrics(stack: Stack, api: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        texts = {
            name: (await client.get(f"http://127.0.0.1:{stack.ports[name]}/metrics/")).raise_for_status().text
            for name in stack.processes
        }
    for name, text in texts.items():
        for metric in (
            "gputrace_outbox_backlog gauge",
            "gputrace_batch_seconds histogram",
            "gputrace_events_consumed_total counter",
            "gputrace_decisions_total counter",
        ):
            assert f"# TYPE {metric}" in text, (name, metric)
    wanted = {"service": "pledges", "event_type": "gputrace.pledge.committed.v1", "status": "accepted", "reason": ""}
    accepted = [
        sample.value
        for family in text_string_to_metric_families(texts["pledges"])
        for sample in family.samples
        if sample.name == "gputrace_decisions_total" and sample.labels == wanted
    ]
    assert accepted and accepted[0] > 0
    size = [line for line in texts["ledger"].splitlines() if line.startswith("gputrace_ledger_size ")]
    assert size and float(size[0].split()[1]) > 0


def _answered_event(value: bytes | None) -> object:
    """The id of the partner event a decision record answers; None for anything else on the topic
    (decisions a service took on its own, and the forged records other tests send)."""
    try:
        decision = json.loads(value or b"")
    except ValueError:
        return None
    event = decision.get("event") if isinstance(decision, dict) else None
    return event.get("id") if isinstance(event, dict) else None
