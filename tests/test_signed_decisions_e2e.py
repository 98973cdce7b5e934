"""Signed decisions (issue 9, item 1), as attacks: whoever can write a decisions topic cannot write
the ledger. Through the real services, Kafka and PostgreSQL: forged records on
gputrace.pledges.decisions.v1 are dead-lettered with their reason, counted, and never appended;
the genuine traffic behind them flows on; `gputrace audit verify --service-keys` checks every
entry's service signature, and exits non-zero on an entry written without one."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier.audit import Exit
from gputrace_verifier.cli import main as audit_main
from prometheus_client.parser import text_string_to_metric_families

from services.ledger.appender import signed_entry
from services.ledger.log import LogWriter
from shared.contract import decisions_topic, service_source
from shared.contract.cloudevents import CloudEvent
from shared.contract.decisions import DECISION_TYPE
from shared.contract.parties import load_private_key, write_private_key
from shared.runtime.db import make_engine, session_factory
from tests.partner import PartnerClient, TopicWatcher
from tests.test_ledger_trust_e2e import logged
from tests.test_log_api import ORIGIN, LedgerDB, make_keys, run_async, serve_ledger
from tools.devkeys import generate_dev_registry
from tools.devstack import Stack

TOPIC = decisions_topic("pledges")
ROOT = Path(__file__).resolve().parents[1]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pledge(pledge_id: str, partner: str, program: str) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": partner,
        "program_id": program,
        "kind": "capital",
        "capital": {"amount": "1000", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


def decision(pledge_id: str, service: str = "pledges") -> dict[str, Any]:
    """An "accepted" decision on a pledge nobody made, as a forger would write it."""
    return {
        "decision_id": str(uuid.uuid4()),
        "service": service,
        "decided_at": "2025-03-01T00:00:00Z",
        "status": "accepted",
        "message": "accepted",
        "event_type": "gputrace.pledge.committed.v1",
        "aggregate_id": pledge_id,
        "party_id": "kakao",
        "facts": {"capital": {"KRW": "999999999999"}},
        "anomalies": [],
    }


def record(data: dict[str, Any], source: str, key: Ed25519PrivateKey | None) -> tuple[bytes, list[tuple[str, bytes]]]:
    event = CloudEvent(
        id=data["decision_id"], source=source, type=DECISION_TYPE, subject=data["aggregate_id"], data=data
    )
    if key is not None:
        event = event.signed(key)
    _, value, headers = event.as_record()
    return value, headers


def audit(url: str, state: Path, token: str, vkey: str, registry: Path) -> tuple[int, str]:
    out = io.StringIO()
    argv = ["--url", url, "--token", token, "--key", vkey, "--state", str(state), "--service-keys", str(registry)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = audit_main([*argv, "verify"])
    return code, out.getvalue()


def forged_counts(text: str, service: str) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gputrace_forged_decisions_total"
        and sample.labels.get("service") == service
        and sample.labels.get("topic") == TOPIC
    }


@pytest.mark.asyncio(loop_scope="session")
async def test_forged_decisions_are_dead_lettered_counted_and_never_logged(
    partner: PartnerClient,
    outcomes: TopicWatcher,
    dlq: TopicWatcher,
    api: httpx.AsyncClient,
    stack: Stack,
    tokens: dict[str, str],
    keys_dir: Path,
    kafka_bootstrap: str,
    database_urls: dict[str, str],
    tmp_path: Path,
) -> None:
    program = uid("forge")
    decisions = await TopicWatcher(kafka_bootstrap, TOPIC).start()
    try:
        # A genuine rejection to replay: kakao pledges in kdb's name (NOT_AUTHORIZED).
        refused = await partner.publish("kakao", "pledge.committed.v1", pledge(uid("P"), "kdb", program))
        assert (await outcomes.outcome(refused))["reason_code"] == "NOT_AUTHORIZED"
        await decisions.wait(lambda: any(_about(r, refused) for r in decisions.records))
        genuine = next(r for r in decisions.records if _about(r, refused))
    finally:
        await decisions.stop()

    after = uid("P")  # the genuine pledge published after the attacks, on the same partition
    pledges_source = service_source("pledges")
    unsigned, by_partner, by_quotes, as_quotes = (decision(after), decision(after), decision(after), decision(after))
    as_quotes["service"] = "quotes"
    replayed = {**json.loads(genuine.value), "status": "accepted", "reason_code": None, "message": "accepted"}
    attacks: dict[str, tuple[bytes, list[tuple[str, bytes]]]] = {
        "unsigned": record(unsigned, pledges_source, None),
        "partner key": record(by_partner, pledges_source, partner.key("kakao")),
        "quotes key": record(by_quotes, pledges_source, load_private_key(keys_dir / "quotes.key")),
        "quotes source": record(as_quotes, service_source("quotes"), load_private_key(keys_dir / "quotes.key")),
        # The genuine record's headers and signature, its data turned from rejected to accepted.
        "replay": (json.dumps(replayed).encode(), list(genuine.headers)),
    }
    for value, headers in attacks.values():
        await partner.send_raw(TOPIC, after.encode(), value, headers)
    flowing = await partner.publish("kdb", "pledge.committed.v1", pledge(after, "kdb", program))
    assert (await outcomes.outcome(flowing))["status"] == "accepted"

    # Each is dead-lettered by the ledger (and by quotes, which reads pledges' decisions too).
    digests = {hashlib.sha256(value).hexdigest(): name for name, (value, _) in attacks.items()}

    def letters(service: str) -> dict[str, str]:
        docs = (json.loads(r.value) for r in dlq.records)
        return {
            digests[d["value_sha256"]]: d["reason"]
            for d in docs
            if d.get("value_sha256") in digests and d.get("service") == service
        }

    await dlq.wait(lambda: len(letters("ledger")) == len(attacks) and len(letters("quotes")) == len(attacks))
    reasons = letters("ledger")
    for name, why in reasons.items():
        assert why.startswith(f"decision on {TOPIC} not signed by pledges: "), (name, why)
    assert "missing ce_signature" in reasons["unsigned"]
    assert "does not verify with the pledges service's key" in reasons["partner key"]
    assert "does not verify with the pledges service's key" in reasons["quotes key"]
    assert "is not 'urn:gputrace:service:pledges'" in reasons["quotes source"]
    assert "does not verify with the pledges service's key" in reasons["replay"]

    # The genuine pledge behind them is decided and logged; none of the forgeries is.
    entries = await logged(api, flowing, refused)
    assert entries[flowing]["status"] == "accepted" and entries[refused]["status"] == "rejected"
    forged_ids = [d["decision_id"] for d in (unsigned, by_partner, by_quotes, as_quotes)]
    with psycopg.connect(database_urls["ledger"]) as conn:
        rows = conn.execute(
            "SELECT decision_id, status FROM log_entries WHERE decision_id = ANY(%s) OR aggregate_id = %s",
            ([*forged_ids, replayed["decision_id"]], after),
        ).fetchall()
    assert sorted(rows) == sorted(
        [(replayed["decision_id"], "rejected"), (entries[flowing]["decision_id"], "accepted")]
    )
    # The ledger's entry carries the pledges service's signed envelope.
    assert entries[flowing]["envelope"]["source"] == pledges_source and entries[flowing]["envelope"]["signature"]

    # Counted, with bounded labels, by each reader of the topic.
    async with httpx.AsyncClient(timeout=10) as client:
        for service in ("ledger", "quotes"):
            text = (await client.get(f"http://127.0.0.1:{stack.ports[service]}/metrics/")).raise_for_status().text
            counts = forged_counts(text, service)
            assert counts.get("unsigned", 0) >= 1 and counts.get("wrong_source", 0) >= 1, counts
            assert counts.get("bad_signature", 0) >= 3, counts

    # And the auditor finds every entry of the real ledger signed by the service that decided it.
    vkey = (await api.get("/v1/log/public-key")).raise_for_status().json()["vkey"]
    code, output = audit(stack.api_url, tmp_path / "audit.json", tokens["auditor"], vkey, keys_dir / "registry.json")
    assert code == Exit.OK, output
    assert "service signatures verified" in output


def _about(rec: Any, event_id: str) -> bool:
    return (json.loads(rec.value).get("event") or {}).get("id") == event_id


def test_an_entry_without_its_services_signature_fails_the_audit(postgres_url: str, tmp_path: Path) -> None:
    """Whoever can write the log directly (the LogWriter, here) still cannot make an entry the
    auditor attributes to a service: unsigned, or signed with another service's key."""
    keys = make_keys(tmp_path / "keys")
    registry = keys.directory / "registry.json"  # with the services' keys (make_keys)
    db = LedgerDB(postgres_url, keys)
    server = serve_ledger(db, tmp_path)
    try:
        pledges_key = load_private_key(tmp_path / "keys" / "pledges.key")
        quotes_key = load_private_key(tmp_path / "keys" / "quotes.key")
        genuine = [signed(decision(f"P-{i}"), pledges_key) for i in range(3)]
        run_async(append(db, genuine))
        state = tmp_path / "audit.json"
        code, output = audit(server.url, state, keys.tokens["auditor"], keys.vkey, registry)
        assert code == Exit.OK and "3 service signatures verified" in output, output

        bare = decision("P-bare")  # no envelope at all
        other = signed(decision("P-other"), quotes_key)  # quotes' key, pledges' name
        altered = signed(decision("P-altered"), pledges_key)
        altered["status"] = "rejected"  # changed after signing
        run_async(append(db, [bare, other, altered]))
        code, output = audit(server.url, state, keys.tokens["auditor"], keys.vkey, registry)
        assert code == Exit.ENTRY_SIGNATURE, output
        assert "leaf 3: entry carries no service signature" in output
        assert "leaf 4: the pledges service's signature does not verify" in output
        assert "leaf 5: the pledges service's signature does not verify" in output
        assert "leaf 0" not in output
    finally:
        server.stop()
        db.drop()


def signed(data: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A log entry as the ledger writes it for a record signed with `key`."""
    event = CloudEvent(
        id=data["decision_id"], source=service_source("pledges"), type=DECISION_TYPE, subject="s", data=data
    ).signed(key)
    entry = signed_entry(event)
    rfc8785.dumps(entry)  # storable as is
    assert base64.b64decode(entry["envelope"]["signature"])
    return entry


async def append(db: LedgerDB, entries: list[dict[str, Any]]) -> None:
    engine = make_engine(db.url)
    try:
        async with session_factory(engine)() as session, session.begin():
            writer = await LogWriter.open(session)
            for e in entries:
                writer.append(e, service=e["service"], event_type=e["event_type"], status=e["status"])
            await writer.finish(ORIGIN, ORIGIN, db.keys.private)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("problem", ["missing", "not registered"])
def test_a_service_without_its_registered_key_refuses_to_start(tmp_path: Path, problem: str) -> None:
    """Before touching Kafka or its database: one line naming the fix, and a non-zero exit."""
    keys = tmp_path / "keys"
    generate_dev_registry(keys)
    if problem == "missing":
        (keys / "pledges.key").unlink()
    else:
        write_private_key(keys / "pledges.key", Ed25519PrivateKey.generate())
    env = {**os.environ, "PARTY_REGISTRY": str(keys / "registry.json"), "VAR_DIR": str(tmp_path / "var")}
    env["KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:9"  # never reached
    done = subprocess.run(
        [sys.executable, "-m", "services.pledges"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and "gputrace keys init" in last, done.stderr
    assert ("no signing key" if problem == "missing" else "does not match its entry") in last
    assert "Traceback" not in done.stderr
