"""The chaos run of `make chaos`, short enough for `make test`: a mixed workload published at a
fixed 100 records/s while two services are SIGKILLed at once, then another, then PostgreSQL;
nothing may be lost, duplicated (raw records) or stalled, and the ledger must verify."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.chaos import Fault, chaos_run, print_summary
from tests.infra import LocalKafka, LocalPostgres
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_short_chaos_run_loses_duplicates_and_stalls_nothing(
    kafka_bootstrap: str,
    stack: Stack,
    tokens: dict[str, str],
    keys_dir: Path,
    local_kafka: LocalKafka | None,
    local_postgres: LocalPostgres | None,
    tmp_path: Path,
) -> None:
    plan = [Fault(("pledges", "ledger"), 1.5), Fault(("quotes",), 1.0)]
    if local_postgres is not None:  # an external database server is not ours to kill
        plan.append(Fault(("postgres",), 2.0))
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line)  # shown by pytest on a failure or a timeout

    report = await chaos_run(
        bootstrap=kafka_bootstrap,
        stack=stack,
        tokens=tokens,
        keys_dir=keys_dir,
        workdir=tmp_path,
        kafka=local_kafka,
        pg=local_postgres,
        events=800,
        seed=7,
        rate=100,
        plan=plan,
        settle_timeout=90,
        grace=45,
        say=say,
    )
    print_summary(report, lines.append)
    text = "\n".join(lines)
    assert report.lost == 0, text
    assert report.duplicated == 0, text
    assert not report.stalled, text
    c = report.counts
    assert (c["ledger_missing"], c["ledger_extra"], c["ledger_duplicates"]) == (0, 0, 0), text
    assert c["outcomes_without_decision"] == 0, text
    assert all(f["recovery_s"] is not None for f in report.faults), text
    assert report.audit_verify == 0, report.audit_output
    await asyncio.to_thread(stack.wait_ready, 60)
