"""The dashboard (docs/architecture.md §6) in a real headless Chromium against the running stack: after a few
batches go through Kafka, the page shows the numbers the API gives; without a good token it shows
the sign-in prompt and no data; a role that may not read the log sees why."""

from __future__ import annotations

import asyncio
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.partner import PartnerClient, TopicWatcher
from tests.test_batch_lifecycle_e2e import Programme, batch_view, uid
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")

# The page's pipeline groups (dashboard.js PIPELINE/STOPPED): status -> (card, units it carries there).
STAGE_OF = {
    "requested": ("requested", "requested"),
    "quoted": ("quoted", "requested"),
    "awarded": ("awarded", "awarded"),
    "export_pending": ("awarded", "awarded"),
    "license_required": ("license_required", "awarded"),
    "cleared": ("cleared", "export_cleared"),
    "in_transit": ("in_transit", "dispatched"),
    "received": ("received", "received"),
    "installed": ("installed", "installed"),
    "accepted": ("accepted", "accepted"),
    "export_denied": ("export_denied", "awarded"),
    "license_denied": ("license_denied", "awarded"),
}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Dom(HTMLParser):
    """Text and attributes of every element carrying a data-testid (Chromium's serialised DOM)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.open: list[tuple[str, dict[str, str | None], list[str]]] = []
        self.found: dict[str, list[tuple[dict[str, str | None], str]]] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.open.append((tag, dict(attrs), []))

    def handle_endtag(self, tag: str) -> None:
        while self.open:
            name, attrs, text = self.open.pop()
            if "data-testid" in attrs:
                self.found.setdefault(str(attrs["data-testid"]), []).append((attrs, " ".join("".join(text).split())))
            if self.open:
                self.open[-1][2].extend(text)
            if name == tag:
                return

    def handle_data(self, data: str) -> None:
        if self.open:
            self.open[-1][2].append(data)

    def text(self, testid: str) -> str:
        assert testid in self.found, f"no element with data-testid={testid!r}"
        return self.found[testid][0][1]

    def attrs(self, testid: str) -> dict[str, str | None]:
        return self.found[testid][0][0]

    def number(self, testid: str) -> int:
        value = self.text(testid)
        assert value.replace(",", "").isdigit(), f"{testid}: {value!r} is not a formatted count"
        return int(value.replace(",", ""))

    def count(self, prefix: str) -> int:
        return sum(len(v) for k, v in self.found.items() if k.startswith(prefix))


def grouped(n: int | str) -> str:
    return f"{int(n):,}"


async def chromium(url: str, profile: Path, *extra: str) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *extra,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode()


async def load(url: str, tmp_path: Path, name: str) -> Dom:
    dom = Dom(await chromium(url, tmp_path / f"profile-{name}", "--dump-dom"))
    return dom


async def settled(api: httpx.AsyncClient, quiet: float = 1.5) -> int:
    """Waits until the log stops growing (the services have decided everything published so far)."""
    loop = asyncio.get_running_loop()
    last, since = -1, loop.time()
    async with asyncio.timeout(60):
        while True:
            size = (await api.get("/v1/log/checkpoint", params={"format": "json"})).raise_for_status().json()["size"]
            if size != last:
                last, since = size, loop.time()
            elif loop.time() - since >= quiet:
                return size
            await asyncio.sleep(0.25)


async def all_batches(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        page = (await api.get("/v1/batches", params={"limit": 500, "offset": len(items)})).raise_for_status().json()
        items += page["items"]
        if not page["items"] or len(items) >= page["total"]:
            return items


async def make_batches(partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient) -> dict[str, str]:
    """One accepted (two anomalies), one quoted, one waiting for an export licence; GPUs pledged in
    kind and a disbursement."""
    done = Programme(partner, outcomes, quantity=4)
    await done.fund()
    await done.request()
    await done.award(await done.submit("nvidia-partner-kr", "50000000"))
    await batch_view(api, done.batch, lambda d: d["status"] == "cleared")
    shipment, serials = uid("S"), done.serials(0, 4)
    await done.dispatch(shipment, serials)
    await done.clear(shipment)
    await done.receive(shipment, serials, damaged=serials[:1])
    await done.expect(
        await partner.publish(
            "haenam-site",
            "batch.installed.v1",
            {
                "batch_id": done.batch,
                "site_id": "haenam-1",
                "installed_at": "2025-07-10T00:00:00Z",
                "placements": [{"serial": s, "rack": "R07", "slot": str(i)} for i, s in enumerate(serials[1:])],
            },
        )
    )
    await done.expect(
        await partner.publish(
            "haenam-site",
            "batch.accepted.v1",
            {
                "batch_id": done.batch,
                "passed_serials": serials[1:3],
                "failed_serials": serials[3:],
                "accepted_at": "2025-07-20T00:00:00Z",
                "report_uri": "https://example.invalid/acceptance/7.pdf",
            },
        )
    )

    quoted = Programme(partner, outcomes, model="H100-SXM", quantity=16)
    await quoted.request()
    await quoted.submit("supermicro-apac", "41000000")

    licence = Programme(partner, outcomes, model="H200-SXM", quantity=2)
    await licence.fund()
    await licence.request()
    await licence.award(await licence.submit("dell-korea", "60000000", hq="CN"))

    pledge = uid("P")
    await done.expect(
        await partner.publish(
            "kakao",
            "pledge.committed.v1",
            {
                "pledge_id": pledge,
                "partner_id": "kakao",
                "program_id": done.program,
                "kind": "gpus",
                "gpus": {"model": "B200", "quantity": 1536},
                "committed_at": "2025-03-14T09:00:00Z",
                "due_by": "2025-12-31",
            },
        )
    )
    cash = uid("P")
    await done.expect(
        await partner.publish(
            "kdb",
            "pledge.committed.v1",
            {
                "pledge_id": cash,
                "partner_id": "kdb",
                "program_id": done.program,
                "kind": "capital",
                "capital": {"amount": "1250000000", "currency": "KRW"},
                "committed_at": "2025-03-14T09:00:00Z",
                "due_by": "2025-12-31",
            },
        )
    )
    await done.expect(
        await partner.publish(
            "kdb",
            "pledge.disbursed.v1",
            {
                "pledge_id": cash,
                "partner_id": "kdb",
                "amount": {"amount": "250000000", "currency": "KRW"},
                "reference": f"KDB-WIRE-{cash}",
            },
        )
    )

    await batch_view(api, done.batch, lambda d: d["status"] == "accepted" and d["anomalies"] == 2)
    await batch_view(api, quoted.batch, lambda d: d["status"] == "quoted")
    await batch_view(api, licence.batch, lambda d: d["status"] == "license_required")
    return {"accepted": done.batch, "quoted": quoted.batch, "license_required": licence.batch}


@needs_chromium
async def test_the_page_shows_what_the_api_says(
    partner: PartnerClient,
    outcomes: TopicWatcher,
    api: httpx.AsyncClient,
    stack: Stack,
    tokens: dict[str, str],
    tmp_path: Path,
) -> None:
    mine = await make_batches(partner, outcomes, api)
    size = await settled(api)
    program = (await api.get("/v1/program")).raise_for_status().json()
    batches = await all_batches(api)
    anomalies = (await api.get("/v1/anomalies", params={"limit": 1000})).raise_for_status().json()["items"]
    done = (await api.get(f"/v1/batches/{mine['accepted']}")).raise_for_status().json()

    url = f"{stack.api_url}/#token={tokens['auditor']}&batch={mine['accepted']}"
    dom = await load(url, tmp_path, "auditor")
    assert dom.attrs("page").get("data-state") == "ready", "every section loaded"
    assert "hidden" in dom.attrs("login"), "signed in: no sign-in prompt"

    # (1) progress
    assert dom.number("gpus-pledged") == program["progress"]["gpus_pledged"] >= 1536
    assert dom.text("target-gpus") == grouped(program["target_gpus"]) == "260,000"
    assert dom.number("pledge-count") == program["pledges"]
    assert dom.number("gpus-model-B200") == program["gpus"]["B200"]
    assert dom.text("capital-pledged-KRW") == grouped(program["capital"]["KRW"])
    assert dom.text("capital-disbursed-KRW") == grouped(program["disbursed"]["KRW"])
    assert dom.number("partner-gpus-kakao") == program["by_partner"]["kakao"]["gpus_total"]

    # (2) the pipeline: batches and GPUs at each stage
    assert dom.number("batch-total") == len(batches)
    counts: dict[str, int] = {}
    units: dict[str, int] = {}
    for b in batches:
        card, measure = STAGE_OF[b["status"]]
        counts[card] = counts.get(card, 0) + 1
        units[card] = units.get(card, 0) + (b["quantities"][measure] or 0)
    for card, _ in STAGE_OF.values():
        assert dom.number(f"stage-count-{card}") == counts.get(card, 0), card
        assert dom.number(f"stage-units-{card}") == units.get(card, 0), card
    for stage in ("quoted", "license_required", "accepted"):
        assert counts[stage] >= 1
    assert dom.number("funnel-accepted") == sum(b["quantities"]["accepted"] for b in batches)

    # (3) the list
    assert dom.count("batch-row-") == min(len(batches), 300)
    labels = {"accepted": "Accepted", "quoted": "Quoted", "license_required": "Licence required"}
    for status, batch_id in mine.items():
        assert f"batch-row-{batch_id}" in dom.found
        assert dom.text(f"batch-status-{batch_id}") == labels[status]
    assert dom.number(f"batch-accepted-{mine['accepted']}") == done["quantities"]["accepted"] == 2
    assert dom.number(f"batch-anomalies-{mine['accepted']}") == done["anomalies"] == 2
    assert dom.number(f"batch-requested-{mine['quoted']}") == 16

    # (4) the selected batch's timeline, one row per ledger entry, in ledger order
    assert dom.text("detail-batch-id") == mine["accepted"]
    assert dom.number("detail-accepted") == 2 and dom.number("detail-damaged") == 1
    steps = [int(str(attrs["data-leaf"])) for attrs, _ in dom.found["timeline-step"]]
    assert steps == [s["leaf_index"] for s in done["timeline"]] and len(steps) >= 8
    assert any("ACCEPTANCE_FAILED" in text for _, text in dom.found["timeline-step"])

    # (5) anomalies and the checkpoint
    assert dom.number("anomaly-count") == len(anomalies) >= 2
    assert dom.count("anomaly-row") == len(anomalies)
    assert dom.number("checkpoint-size") >= size
    assert len(dom.text("checkpoint-root")) == 44  # base64 of a SHA-256

    # and a picture, for people to look at (DASHBOARD_SCREENSHOT=path keeps it)
    shot = Path(os.environ.get("DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    await chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,1800")
    assert (await asyncio.to_thread(shot.stat)).st_size > 20_000


@needs_chromium
async def test_without_a_good_token_the_page_asks_for_one(stack: Stack, tmp_path: Path) -> None:
    for name, url in (("none", f"{stack.api_url}/"), ("bad", f"{stack.api_url}/#token=not-a-token")):
        dom = await load(url, tmp_path, name)
        assert "hidden" not in dom.attrs("login"), name
        assert dom.attrs("gpus-pledged") and dom.text("gpus-pledged") == "", name
        assert dom.count("batch-row-") == 0 and dom.count("anomaly-row") == 0, name
        assert dom.text("checkpoint-size") == "", name
        message = dom.text("auth-message")
        if name == "bad":
            assert "401" in message and "did not accept this token" in message
        else:
            assert message == "" and "hidden" in dom.attrs("auth-message")


@needs_chromium
async def test_a_partner_sees_why_the_log_is_not_for_it(stack: Stack, tokens: dict[str, str], tmp_path: Path) -> None:
    dom = await load(f"{stack.api_url}/#token={tokens['partner:kakao']}", tmp_path, "partner")
    assert "hidden" in dom.attrs("login")
    assert dom.text("checkpoint-size") == ""
    assert "may not read this (403" in dom.text("error-checkpoint")
    assert dom.text("target-gpus") == "260,000", "the rest of the page still loads"
    assert dom.attrs("page").get("data-state") == "partial"


async def test_assets_are_served_with_a_strict_policy(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            asset = await client.get(f"/dashboard/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert f"/dashboard/static/{name}" in page.text
        for bad in ("index.html", "..%2Frouter.py", "router.py", "nope.js"):
            assert (await client.get(f"/dashboard/static/{bad}")).status_code == 404, bad
        assert (await client.get("/v1/program")).status_code == 401, "the data still needs a token"
