"""`make bench-api` in seconds: a small bulk-loaded ledger served by the real app, every auditor
endpoint and proof measured without an error, and the JSON and markdown written (issue 11, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import bench_api


def test_bench_api_runs_clean_on_a_small_ledger(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    out = tmp_path / "results"
    args = ["--log-entries", "2000", "--pledges", "200", "--batches", "20", "--requests", "15", "--warmup", "2"]
    report = bench_api.main([*args, "--clients", "8", "--client-procs", "2", "--out", str(out)])

    measured = report["results"]["concurrent"]
    assert set(measured) == set(bench_api.endpoints(_loaded()).keys())
    assert {name: r["errors"] for name, r in measured.items()} == dict.fromkeys(measured, 0)
    assert all(r["requests"] == 15 for r in measured.values())
    # The same endpoints on a fixed schedule (open loop), latency from each request's due time.
    scheduled = report["results"]["scheduled"]
    assert set(scheduled) == set(measured)
    assert {name: (r["errors"], r["requests"]) for name, r in scheduled.items()} == dict.fromkeys(scheduled, (0, 15))
    assert set(report["results"]["sequential"]) == set(report["results"]["sequential_stdlib"])
    assert set(report["results"]["sequential"]) == {"/healthz", *bench_api.PROOFS}
    assert json.loads((out / "api.json").read_text())["log_entries"] == 2000
    table = (out / "api.md").read_text()
    assert "p99 / healthz p99" in table and "inclusion proof (hash)" in table
    assert "fixed schedule, 100 requests/s in total" in table and "judged on the fixed schedule" in table


def _loaded() -> bench_api.Loaded:
    return bench_api.Loaded(10, [b"x" * 32], ["B"], ["P"], 0.0)


async def test_the_fixed_schedule_counts_a_stall_against_every_request_due_during_it() -> None:
    """Latency from each request's due time: one 300 ms stall at 100 req/s delays the ~30 requests
    due meanwhile, where timing from the send would show one slow request (coordinated omission)."""
    import asyncio
    import random
    import time

    import httpx

    sent = 0

    async def server(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        if sent == 20:
            await asyncio.sleep(0.3)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(server), base_url="http://x") as client:

        def path(_: random.Random) -> str:
            return "/"

        latencies, errors, _, _ = await bench_api._measure_scheduled(
            client, path, total=100, warmup=0, rate=100.0, clients=1, mine=[0], start_wall=time.time()
        )
    assert errors == 0 and len(latencies) == 100
    assert sum(latency > 0.1 for latency in latencies) >= 15
