"""Service signatures on ledger entries: each entry is attributable to the service that decided it.

A ledger entry is a decision exactly as its service signed it plus, under `envelope`, the signed
CloudEvents envelope: the attributes (specversion, id, source, type, subject, time,
datacontenttype) and `signature`. The signature is Ed25519 over the RFC 8785 canonical JSON of
the structured event: the envelope without `signature`, plus `data` = the entry without
`envelope` (the same rule as a partner's event, docs/partner-contract.md §2–§4).

The services' public keys are not taken from the ledger: the auditor passes the party registry
(`--service-keys`, as published by the programme office); its `service` entries are pinned in the
state file on first use, so a later run without the option still checks against the same keys.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ENVELOPE = "envelope"
SERVICE_ROLE = "service"
SERVICE_SOURCE_PREFIX = "urn:gputrace:service:"
DECISION_TYPE = "gputrace.decision.v1"


class ServiceKeyError(ValueError):
    """The registry file cannot give service keys; the message says why."""


def read_service_keys(path: Path) -> dict[str, str]:
    """{service name: base64 raw Ed25519 public key} from a party registry file (its `service` entries)."""
    try:
        doc = json.loads(path.expanduser().read_text())
        parties = doc["parties"]
        keys = {
            str(p["id"]): str(p["public_key"])
            for p in parties
            if isinstance(p, dict) and SERVICE_ROLE in (p.get("roles") or [])
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServiceKeyError(f"{path} is not a readable party registry ({type(e).__name__}: {e})") from None
    if not keys:
        raise ServiceKeyError(f"{path} has no entry with role {SERVICE_ROLE!r}")
    for name, key in keys.items():
        public_key(name, key)  # refuse a bad key now, not at the first entry it would check
    return keys


def public_key(name: str, b64: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
    except (binascii.Error, ValueError) as e:
        raise ServiceKeyError(f"the key of service {name!r} is not a base64 Ed25519 public key ({e})") from None


def signature_problem(index: int, entry: str, keys: dict[str, Ed25519PublicKey]) -> str | None:
    """What is wrong with the service signature of one entry, or None if it verifies."""
    where = f"leaf {index}"
    try:
        doc: Any = json.loads(entry)
    except ValueError:
        return f"{where}: entry is not JSON, so no service signature can be checked"
    if not isinstance(doc, dict):
        return f"{where}: entry is not a JSON object"
    envelope = doc.get(ENVELOPE)
    service = doc.get("service")
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signature"), str):
        return f"{where}: entry carries no service signature (decision of {service!r})"
    if not isinstance(service, str) or service not in keys:
        return f"{where}: no trusted key for service {service!r} (not in --service-keys)"
    if envelope.get("source") != SERVICE_SOURCE_PREFIX + service:
        return f"{where}: signed as {envelope.get('source')!r}, but the decision is the {service} service's"
    if envelope.get("type") != DECISION_TYPE:
        return f"{where}: envelope type {envelope.get('type')!r} is not {DECISION_TYPE}"
    data = {k: v for k, v in doc.items() if k != ENVELOPE}
    structured = {**{k: v for k, v in envelope.items() if k != "signature"}, "data": data}
    try:
        signature = base64.b64decode(envelope["signature"], validate=True)
        keys[service].verify(signature, rfc8785.dumps(structured))
    except (InvalidSignature, binascii.Error, ValueError, rfc8785.CanonicalizationError):
        return f"{where}: the {service} service's signature does not verify (decision {doc.get('decision_id')!r})"
    return None
