"""`gputrace screening import` takes effect in the running export_controls process (a real service
process on real Kafka and PostgreSQL, no restart): an award decided before the import records the
snapshot that was active then, one decided after records the imported snapshot — and screens the
consignee's address against it (an address-only match is a SCREENING_REVIEW in the ledger)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.export_controls.domain.screening import load_screening_list
from services.export_controls.domain.snapshots import active_hash, set_active, snapshot_dir
from tests.partner import PartnerClient, TopicWatcher
from tests.stack import Stack
from tests.test_batch_lifecycle_e2e import Programme, fetch_row, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parent.parent
CSL = ROOT / "services/export_controls/data/csl/consolidated.json"
# synthetic-001's listed street address (data/csl/README.md); the party below has another name.
LOTUS_ADDRESS = "Unit 1801, 18/F, Example Harbour Tower, 1 Example Road, Kwun Tong, Kowloon"


async def decision_of(g: Programme) -> dict[str, Any]:
    """The export decision the service stored for the batch (its full evaluation)."""
    row = await until(
        lambda: fetch_row(g.db["export_controls"], "SELECT decision FROM export_cases WHERE batch_id = %s", g.batch),
        f"export_controls to decide batch {g.batch}",
    )
    return json.loads(row[0])


async def awarded(g: Programme, consignee: dict[str, str] | None = None) -> dict[str, Any]:
    await g.fund()
    await g.request()
    quote = g.quote("nvidia-partner-kr", "50000000")
    if consignee is not None:
        quote["consignee"] = consignee
        quote["end_user"] = {**consignee, "headquarters_country": consignee["country"]}
    await g.expect(await g.p.publish("nvidia-partner-kr", "quote.submitted.v1", quote))
    await g.award(quote["quote_id"])
    return await decision_of(g)


async def test_an_import_takes_effect_without_a_restart(
    running: tuple[Stack, dict[str, str], Path],
    partner: PartnerClient,
    outcomes: TopicWatcher,
    api: httpx.AsyncClient,
    database_urls: dict[str, str],
) -> None:
    stack, _, workdir = running
    var = workdir / "var"  # the stack's VAR_DIR (tests/stack.py)
    proc = stack.processes["export_controls"].proc
    assert proc is not None
    pid = proc.pid
    previous = active_hash(var)
    before_hash = previous or load_screening_list().sha256
    try:
        before = await awarded(Programme(partner, outcomes, db=database_urls))
        assert before["screening"]["sha256"] == before_hash

        # The operator's command, as its own process, while the service runs.
        cli = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "tools.cli", "screening", "import", str(CSL), "--var-dir", str(var)],
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await cli.communicate()
        assert cli.returncode == 0
        imported = json.loads(stdout)["sha256"]
        assert imported != before_hash and active_hash(var) == imported

        party = {"name": "Harbour Light Logistics Ltd.", "country": "HK", "address": LOTUS_ADDRESS}
        g = Programme(partner, outcomes, db=database_urls)
        after = await awarded(g, party)
        assert after["screening"]["sha256"] == imported
        assert after["data_digests"]["screening_list"] == imported
        consignee = after["screening"]["parties"][0]
        assert consignee["method"] == "address" and consignee["review"] and not consignee["hit"]
        assert consignee["matched_entry"]["id"] == "synthetic-001"

        async def review() -> list[dict[str, Any]] | None:
            r = await api.get("/v1/anomalies", params={"batch_id": g.batch, "code": "SCREENING_REVIEW"})
            items: list[dict[str, Any]] = r.raise_for_status().json()["items"]
            return items or None

        assert await until(review, f"the ledger to list SCREENING_REVIEW for {g.batch}")
        # The same process decided both (no restart happened) and is still running.
        after_proc = stack.processes["export_controls"].proc
        assert after_proc is not None and after_proc.pid == pid and after_proc.poll() is None
    finally:
        # Leave the stack's screening as other tests found it.
        if previous is None:
            (snapshot_dir(var) / "ACTIVE").unlink(missing_ok=True)
        else:
            set_active(var, previous)
