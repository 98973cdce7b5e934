"""Service signatures on entries, with only the verifier installed: an in-memory ledger whose
entries are decisions signed the way the services sign them, and the keys' pinning in the state file."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier.audit import AuditFailure, Exit, Options, verify
from gputrace_verifier.checkpoint import make_vkey
from test_audit_checks import ORIGIN, URL, MemoryLedger  # the in-memory ledger of the checks' tests

SERVICES = ("pledges", "quotes")


def raw(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


def registry(path: Path, keys: dict[str, Ed25519PrivateKey]) -> Path:
    parties = [{"id": "kakao", "roles": ["partner"], "public_key": raw(Ed25519PrivateKey.generate())}]
    parties += [{"id": name, "roles": ["service"], "public_key": raw(key)} for name, key in keys.items()]
    path.write_text(json.dumps({"parties": parties}))
    return path


def entry(i: int, service: str, key: Ed25519PrivateKey, **change: Any) -> bytes:
    """A ledger entry: the decision as signed, plus its envelope (attributes and signature)."""
    data = {"decision_id": f"d-{i}", "service": service, "status": "accepted", "facts": {"ratio": i / 3}}
    attrs = {
        "specversion": "1.0",
        "id": f"d-{i}",
        "source": f"urn:gputrace:service:{service}",
        "type": "gputrace.decision.v1",
        "datacontenttype": "application/json",
    }
    signature = base64.b64encode(key.sign(rfc8785.dumps({**attrs, "data": data}))).decode()
    return rfc8785.dumps({**data, **change, "envelope": {**attrs, "signature": signature}})


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {name: Ed25519PrivateKey.generate() for name in SERVICES}


def run(ledger: MemoryLedger, state: Path, service_keys: Path | None) -> Any:
    opts = Options(URL, None, state, make_vkey(ORIGIN, ledger.key.public_key()), None, False)
    opts.service_keys = str(service_keys) if service_keys else None
    return verify(opts, transport=httpx.MockTransport(ledger.handle), seed=1)


def test_signed_entries_verify_and_the_keys_are_pinned(keys: dict[str, Ed25519PrivateKey], tmp_path: Path) -> None:
    ledger = MemoryLedger(
        Ed25519PrivateKey.generate(), [entry(i, SERVICES[i % 2], keys[SERVICES[i % 2]]) for i in range(9)]
    )
    state = tmp_path / "audit.json"
    assert run(ledger, state, registry(tmp_path / "registry.json", keys)).signatures_checked == 9
    assert set(json.loads(state.read_text())["service_keys"]) == set(SERVICES)  # not the partner
    # Later runs check with the pinned keys, without the registry.
    ledger.append([entry(9, "quotes", keys["pledges"])])  # signed with the wrong service's key
    with pytest.raises(AuditFailure) as caught:
        run(ledger, state, None)
    assert caught.value.code == Exit.ENTRY_SIGNATURE
    assert "leaf 9: the quotes service's signature does not verify" in caught.value.message


def test_each_way_of_not_being_signed_by_the_service_is_named(
    keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    bad = [
        entry(0, "pledges", keys["pledges"], status="rejected"),  # altered after signing
        rfc8785.dumps({"decision_id": "d-1", "service": "pledges"}),  # no envelope
        entry(2, "ledger", Ed25519PrivateKey.generate()),  # a service nobody registered
    ]
    ledger = MemoryLedger(Ed25519PrivateKey.generate(), bad)
    with pytest.raises(AuditFailure) as caught:
        run(ledger, tmp_path / "audit.json", registry(tmp_path / "registry.json", keys))
    assert caught.value.code == Exit.ENTRY_SIGNATURE
    message = caught.value.message
    assert "leaf 0: the pledges service's signature does not verify" in message
    assert "leaf 1: entry carries no service signature" in message
    assert "leaf 2: no trusted key for service 'ledger'" in message
    # Without keys the entries are still re-hashed, and the report says signatures were not checked.
    assert run(ledger, tmp_path / "fresh.json", None).signatures_checked is None
