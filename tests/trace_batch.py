"""One GPU batch's award traced through the real services, exported over OTLP/HTTP.

    .venv/bin/python -m tests.trace_batch

Starts Kafka and PostgreSQL (or uses KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL), a local OTLP/HTTP
receiver that decodes the spans it is sent, and the five services as processes with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at it; funds a batch, requests it, takes two quotes, then
sends the award with a partner `traceparent` and prints that trace: service, span, duration and
start offset, the relays' transactions (linked spans) under the span whose decision they sent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

SPANS: list[dict[str, Any]] = []


class Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector reduced to what this needs: decode, keep, answer 200."""

    def do_POST(self) -> None:
        request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for s in scope.spans:
                    SPANS.append(
                        {
                            "service": attributes.get("service.name", "?"),
                            "name": s.name,
                            "trace": s.trace_id.hex(),
                            "span": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "links": [link.span_id.hex() for link in s.links],
                            "status": next(
                                (a.value.string_value for a in s.attributes if a.key == "gputrace.decision.status"), ""
                            ),
                        }
                    )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def tree(trace_id: str) -> str:
    spans = sorted((s for s in SPANS if s["trace"] == trace_id), key=lambda s: s["start"])
    ids = {s["span"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent"] if s["parent"] in ids else "", []).append(s)
    t0 = spans[0]["start"] if spans else 0
    lines: list[str] = []

    def line(s: dict[str, Any], depth: int, prefix: str = "") -> str:
        took, at = (s["end"] - s["start"]) / 1e6, (s["start"] - t0) / 1e6
        status = f"  {s['status']}" if s["status"] else ""
        return f"{'  ' * depth}{prefix}[{s['service']}] {s['name']}  {took:.1f} ms  (+{at:.0f} ms){status}"

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            lines.append(line(s, depth))
            for relay in (o for o in SPANS if s["span"] in o["links"] and o["name"].endswith(" publish")):
                lines.append(line(relay, depth + 1, "(linked) "))
            walk(s["span"], depth + 1)

    walk("", 0)
    return "\n".join(lines)


async def award_trace(work: Path) -> tuple[str, str]:
    from shared.contract import OUTCOMES_TOPIC
    from tests.infra import kafka_and_postgres
    from tests.partner import PartnerClient, TopicWatcher
    from tests.stack import start_stack
    from tests.test_batch_lifecycle_e2e import Programme

    with kafka_and_postgres(work) as (bootstrap, admin_url, *_):
        stack, _ = await asyncio.to_thread(start_stack, bootstrap, admin_url, work / "stack")
        try:
            outcomes = await TopicWatcher(bootstrap, OUTCOMES_TOPIC).start()
            async with PartnerClient(bootstrap, work / "stack" / "keys") as partner:
                g = Programme(partner, outcomes, db=stack.database_urls)
                await g.fund()
                await g.request()
                winner = await g.submit("nvidia-partner-kr", "50000000")
                await g.submit("supermicro-apac", "52000000")
                trace_id = secrets.token_hex(16)
                award = {"batch_id": g.batch, "quote_id": winner, "awarded_at": "2025-06-02T10:00:00Z"}
                key, value, headers, event_id = partner.record("nipa", "quote.awarded.v1", award)
                headers.append(("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01".encode()))
                await partner.send_raw("partner.procurement.v1", key, value, headers)
                await g.expect(event_id)
                await g.deliveries_see("cleared")
                await asyncio.sleep(3)  # the services export every 200 ms (OTEL_BSP_SCHEDULE_DELAY)
            await outcomes.stop()
        finally:
            stack.stop()
    return g.batch, trace_id


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The services (started by start_stack) inherit these.
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    work = Path(tempfile.mkdtemp(prefix="gputrace-trace-"))
    work.chmod(0o755)
    try:
        batch, trace_id = asyncio.run(award_trace(work))
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    services = sorted({s["service"] for s in SPANS})
    print(f"{len(SPANS)} spans received over OTLP/HTTP from {', '.join(services)}")
    print(f"batch {batch}, its award (quote.awarded.v1), trace {trace_id}:")
    print(tree(trace_id))


if __name__ == "__main__":
    main()
