"""`make bench` in miniature: both systems through the session's Kafka and PostgreSQL with tiny
numbers; the report has every figure and counts every event exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.bench_pipeline import LEVELS, Options, run_bench
from tools.devstack import Stack


# Generous: on a loaded machine the two systems' start-up alone can take a minute.
@pytest.mark.timeout(600)
def test_bench_counts_every_event_once(
    kafka_bootstrap: str, postgres_url: str, stack: Stack, keys_dir: Path, tmp_path: Path
) -> None:
    opts = Options(events=20, warmup=5, rounds=2, level_seconds=0.3, out=tmp_path, timeout=240)
    report = run_bench(kafka_bootstrap, postgres_url, stack, keys_dir, opts)

    for name in ("gputrace", "baseline"):
        s = report[name]
        assert len(s["rounds"]) == 2
        for r in s["rounds"]:
            assert r["outcomes_counted"] == r["events"] == r["ledger_entries"] == 20
            assert r["duplicates"] == 0
            assert r["end_to_end_per_s"] > 0
            assert set(r["cpu_ms_per_event"]) == set(s["processes"])
        assert [lv["level_pct"] for lv in s["latency"]] == list(LEVELS)
        assert all(0 < lv["p50"] <= lv["p95"] <= lv["p99"] for lv in s["latency"])
    assert {"pledges", "ledger"} <= set(report["gputrace"]["processes"])
    assert report["ratios"]["end_to_end"] > 0
    assert report["raw"]["consume_commit_per_s"] > 0
    assert json.loads((tmp_path / "pipeline.json").read_text())["gputrace"]["rounds"]
    assert "| end to end" in (tmp_path / "pipeline.md").read_text()
    assert (tmp_path / "pipeline.png").read_bytes()[:4] == b"\x89PNG"
