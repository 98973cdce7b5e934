"""What a typed response costs FastAPI per request, without the database or the network: the
work between a route's return and the response's bytes, for the inclusion proof's body (20
hashes, a proof at 10^6 entries), a batch view's (a 12-step timeline with an award) and a page of
500 batch summaries (GET /v1/batches?limit=500), five ways:

- `dict`: `-> dict[str, Any]`, what the untyped routes did;
- `model`: the route builds the model and returns it (`-> InclusionProof`): the constructor
  validates once, FastAPI's response validation is then an isinstance check, pydantic-core writes the JSON;
- `dict+model`: the route returns a dict and names the model in `response_model`: one validation
  of the dict into the model, then the JSON (this API's one-object routes);
- `JSONResponse`: the dict encoded by json.dumps and returned as is (`response_model` only documents);
- `to_json`: the dict encoded by pydantic-core's to_json into a plain Response (likewise; this
  API's list routes, /v1/batches and /v1/anomalies).

FastAPI's own `serialize_response` is timed with each route's own response field, in CPU time
(time.process_time), the ways interleaved round by round so a loaded machine slows each alike.

    .venv/bin/python -m tests.benchmarks.bench_response_models [--calls 5000] [--rounds 5]

Prints the median CPU microseconds per response of each way, per body, and the ratio to `dict`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, serialize_response
from pydantic_core import to_json

from services.ledger.responses import BatchDetail, BatchesPage, BatchSummary, InclusionProof

PROOF = {
    "leaf_index": 123_456,
    "tree_size": 1_000_000,
    "proof": [base64.b64encode(hashlib.sha256(bytes([i])).digest()).decode() for i in range(20)],
}
_MONEY = {"amount": "100000000", "currency": "KRW"}
_STEP = {
    "leaf_index": 0,
    "service": "deliveries",
    "decided_at": "2025-07-05T00:00:00Z",
    "status": "accepted",
    "reason_code": None,
    "message": "received",
    "event_type": "gputrace.shipment.received.v1",
    "party_id": "haenam-site",
    "anomalies": [],
    "event_id": "e-1",
}
BATCH: dict[str, Any] = {
    "batch_id": "B-1",
    "program_id": "prog",
    "status": "received",
    "model": "B200",
    "site_id": "haenam-1",
    "requested": 8,
    "vendor_id": "v",
    "quantities": dict.fromkeys(
        ("requested", "quoted", "awarded", "export_cleared", "dispatched", "in_transit", "received", "damaged"), 1
    )
    | {"installed": 0, "accepted": 0, "failed": 0},
    "export": None,
    "anomalies": 1,
    "last_leaf_index": 11,
    "money": {"earmarked": {"KRW": "1"}, "disbursed": {}, "awarded": _MONEY, "unit_price": _MONEY, "pledges": ["P"]},
    "export_decision": None,
    "award": {
        "batch_id": "B-1",
        "quote_id": "Q",
        "vendor_id": "v",
        "program_id": "prog",
        "site_id": "haenam-1",
        "model": "B200",
        "quantity": 8,
        "unit_price": _MONEY,
        "total_price": _MONEY,
        "origin_country": "US",
        "route": ["JP"],
        "consignee": {"name": "c", "country": "KR", "address": None},
        "end_user": {"name": "e", "country": "KR", "address": None, "headquarters_country": "KR"},
        "awarded_at": "2025-06-02T10:00:00+00:00",
        "lead_time_days": 60,
        "funding": {"currency": "KRW", "required": "1", "earmarked": "1", "shortfall": "0", "pledges": ["P"]},
        "leaf_index": 3,
    },
    "timeline": [{**_STEP, "leaf_index": i} for i in range(12)],
}

# GET /v1/batches?limit=500: the list routes answer with pydantic-core's to_json for this reason.
PAGE = {
    "total": 1000,
    "limit": 500,
    "offset": 0,
    "items": [{k: BATCH[k] for k in BatchSummary.model_fields} | {"batch_id": f"B-{i}"} for i in range(500)],
}


def ways(body: dict[str, Any], model: Any) -> dict[str, Callable[[], Coroutine[Any, Any, bytes]]]:
    """Each way: from the route's data to the response's bytes, as FastAPI does it."""
    app = FastAPI()

    @app.get("/dict")
    async def as_dict() -> dict[str, Any]:
        return body

    @app.get("/model", response_model=model)
    async def as_model() -> Any:
        return model(**body)

    fields = {r.path: r.response_field for r in app.routes if isinstance(r, APIRoute)}

    # FastAPI wraps the serialised bytes in a Response: each way pays for one.
    async def plain() -> bytes:
        content = await serialize_response(field=fields["/dict"], response_content=dict(body), dump_json=True)
        return Response(content, media_type="application/json").body

    async def built() -> bytes:
        content = await serialize_response(field=fields["/model"], response_content=model(**body), dump_json=True)
        return Response(content, media_type="application/json").body

    async def validated() -> bytes:
        content = await serialize_response(field=fields["/model"], response_content=dict(body), dump_json=True)
        return Response(content, media_type="application/json").body

    async def encoded() -> bytes:
        return JSONResponse(dict(body)).body

    async def rust_encoded() -> bytes:
        return Response(to_json(dict(body)), media_type="application/json").body

    return {
        "dict": plain,
        "model": built,
        "dict+model": validated,
        "JSONResponse": encoded,
        "to_json": rust_encoded,
    }


async def run(calls: int, rounds: int) -> None:
    for name, body, model in (
        ("proof", PROOF, InclusionProof),
        ("batch", BATCH, BatchDetail),
        ("page", PAGE, BatchesPage),
    ):
        n = calls if name != "page" else max(calls // 100, 10)  # a page is ~100 small bodies
        each = ways(body, model)
        answers = {w: json.loads(await f()) for w, f in each.items()}
        assert all(a == answers["dict"] for a in answers.values()), f"{name}: the ways answer different JSON"
        times: dict[str, list[float]] = {w: [] for w in each}
        for _ in range(rounds):
            for way, f in each.items():
                start = time.process_time()
                for _ in range(n):
                    await f()
                times[way].append((time.process_time() - start) / n * 1e6)
        base = statistics.median(times["dict"])
        for way in each:
            median = statistics.median(times[way])
            print(f"{name:6} {way:13} {median:7.1f} us CPU/response  {median / base:5.2f}x dict")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000, help="responses per way per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
