"""`gputrace demo` at a small scale against the session's running system: it exits 0, and the
ledger's API then shows the programme it published (docs/architecture.md §1, §6)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stack import auditor_headers
from tools.demo import DAMAGED_UNITS, FAILED, FORGED, LICENSED, plan
from tools.demo.programme import DAMAGED, TARGET_GPUS
from tools.devstack import Stack

ROOT = Path(__file__).resolve().parent.parent
SCALE = 0.01
SEED = 7


@pytest.fixture(scope="module")
def demo_run(kafka_bootstrap: str, keys_dir: Path, stack: Stack) -> tuple[str, str, subprocess.CompletedProcess[str]]:
    program_id, run_id = f"KR-NAICC-TEST-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli",
            "demo",
            "--bootstrap",
            kafka_bootstrap,
            "--keys",
            str(keys_dir),
            "--api",
            stack.api_url,
            "--program-id",
            program_id,
            "--scale",
            str(SCALE),
            "--seed",
            str(SEED),
            "--run-id",
            run_id,
            "--timeout",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    return program_id, run_id, done


@pytest.fixture(scope="module")
def ledger(stack: Stack, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers=auditor_headers(tokens), timeout=30) as client:
        yield client


def get(ledger: httpx.Client, path: str, **params: Any) -> Any:
    return ledger.get(path, params=params).raise_for_status().json()


def test_demo_exits_zero_and_reports(demo_run: tuple[str, str, subprocess.CompletedProcess[str]]) -> None:
    _, _, done = demo_run
    assert done.returncode == 0, f"stdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-4000:]}"
    out = " ".join(done.stdout.split())
    assert "SIGNATURE_INVALID" in out, "the forged award's rejection is shown"
    assert "demo done" in out and "gputrace audit --url" in out and "/docs" in out


def test_the_ledger_holds_the_programme(
    demo_run: tuple[str, str, subprocess.CompletedProcess[str]], ledger: httpx.Client
) -> None:
    program_id, run_id, done = demo_run
    assert done.returncode == 0, done.stdout[-4000:]
    p = plan(program_id, run_id, SCALE, SEED)

    program = get(ledger, "/v1/program", program_id=program_id)
    # 26 tranches of 10,000 (the 2025-10-31 programme) at a hundredth: 100 GPUs each.
    assert program["gpus"] == p.in_kind_gpus() == {"B200": 10 * 100, "GB200": 16 * 100}
    assert program["gpus_total"] == 2600 == TARGET_GPUS // 100
    assert program["capital"] == {"KRW": str(p.pledged_capital())}, "SK's amendment counts"
    assert program["disbursed"] == {"KRW": str(p.disbursed())}
    # The running totals (kept at each append) agree with the batches the ledger lists.
    units = sum(b.units for b in p.batches)
    assert program["batches_by_stage"] == {"accepted": 26} and program["batches_total"] == 26
    flow = program["pipeline_gpus"]
    assert flow["awarded"] == flow["dispatched"] == flow["received"] == units
    assert flow["damaged"] == DAMAGED_UNITS and flow["failed"] == 1
    assert flow["installed"] == units - DAMAGED_UNITS and flow["accepted"] == units - DAMAGED_UNITS - 1
    assert program["anomalies_by_code"] == {"ACCEPTANCE_FAILED": 1, "DAMAGED_IN_TRANSIT": 1}

    listed = get(ledger, "/v1/batches", program_id=program_id, limit=50)
    assert listed["total"] == len(p.batches) == 26
    assert {b["batch_id"]: b["status"] for b in listed["items"]} == {b.batch_id: "accepted" for b in p.batches}
    for b in p.batches:
        doc = next(i for i in listed["items"] if i["batch_id"] == b.batch_id)
        assert doc["vendor_id"] == b.winner.vendor, "the cheapest quote wins"
        assert doc["quantities"]["awarded"] == doc["quantities"]["dispatched"] == b.units
        assert doc["export"]["rule_version"].startswith(("post-rescission", "review-policy-2026"))


def test_licence_damage_failure_and_forgery_are_on_record(
    demo_run: tuple[str, str, subprocess.CompletedProcess[str]], ledger: httpx.Client
) -> None:
    program_id, run_id, done = demo_run
    assert done.returncode == 0, done.stdout[-4000:]
    p = plan(program_id, run_id, SCALE, SEED)

    licensed = get(ledger, f"/v1/batches/{p.batch(LICENSED).batch_id}")
    assert licensed["export"]["status"] == "licensed" and licensed["export"]["license_number"]
    assert licensed["export"]["outcome"] == "license_required"

    damaged = p.batch(DAMAGED)
    q = get(ledger, f"/v1/batches/{damaged.batch_id}")["quantities"]
    assert (q["received"], q["damaged"]) == (damaged.units, DAMAGED_UNITS)
    assert q["installed"] == q["accepted"] == damaged.units - DAMAGED_UNITS

    failed = get(ledger, f"/v1/batches/{p.batch(FAILED).batch_id}")["quantities"]
    assert failed["failed"] == 1 and failed["accepted"] == failed["installed"] - 1

    forged = [
        s
        for s in get(ledger, f"/v1/batches/{p.batch(FORGED).batch_id}")["timeline"]
        if s["reason_code"] == "SIGNATURE_INVALID"
    ]
    assert [(s["event_type"], s["status"], s["party_id"]) for s in forged] == [
        ("gputrace.quote.awarded.v1", "rejected", "nipa")
    ]

    codes = sorted(a["code"] for b in p.batches for a in get(ledger, "/v1/anomalies", batch_id=b.batch_id)["items"])
    assert codes == ["ACCEPTANCE_FAILED", "DAMAGED_IN_TRANSIT"], "no export violation, no funding shortfall"
