"""CloudEvents 1.0 in Kafka binary mode, and the partner signature of design.md §4.

Binary mode: the record value is the JSON `data`; every other attribute is a `ce_<name>`
header, `content-type` stands for `datacontenttype`. The signature (`ce_signature`) is the
base64 Ed25519 signature over the RFC 8785 canonical JSON of the event in structured form:
all attributes except `signature`, plus `data`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CE_PREFIX = "ce_"
CONTENT_TYPE = "application/json"
REQUIRED = ("specversion", "id", "source", "type")
# W3C trace context travels next to the CloudEvents headers (distributed tracing extension).
TRACE_HEADERS = ("traceparent", "tracestate")


class UnreadableRecord(Exception):
    """A Kafka record that cannot be read as an event at all: it goes to the DLQ."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical form; the one serialisation that is signed and hashed."""
    return rfc8785.dumps(value)


@dataclass(frozen=True)
class CloudEvent:
    id: str
    source: str
    type: str
    data: dict[str, Any]
    subject: str | None = None
    time: str | None = None
    specversion: str = "1.0"
    datacontenttype: str | None = CONTENT_TYPE
    signature: str | None = None
    # Other ce_* extension attributes (they are signed too).
    extensions: dict[str, str] = field(default_factory=dict)
    trace: dict[str, str] = field(default_factory=dict)

    def attributes(self) -> dict[str, str]:
        """All attributes except `signature` and `data`, as they travel."""
        attrs: dict[str, str] = {"specversion": self.specversion, "id": self.id, "source": self.source}
        attrs["type"] = self.type
        for name in ("subject", "time", "datacontenttype"):
            value = getattr(self, name)
            if value is not None:
                attrs[name] = value
        attrs.update(self.extensions)
        return attrs

    def structured(self) -> dict[str, Any]:
        """The structured form the signature covers (design.md §4)."""
        return {**self.attributes(), "data": self.data}

    def signing_input(self) -> bytes:
        return canonical_json(self.structured())

    def signed(self, key: Ed25519PrivateKey) -> CloudEvent:
        sig = base64.b64encode(key.sign(self.signing_input())).decode()
        return replace(self, signature=sig)

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        if not self.signature:
            return False
        try:
            public_key.verify(base64.b64decode(self.signature, validate=True), self.signing_input())
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True

    def as_record(self) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        """(key, value, headers) for a Kafka producer, in binary mode."""
        headers = [(f"{CE_PREFIX}{k}", v.encode()) for k, v in self.attributes().items() if k != "datacontenttype"]
        if self.datacontenttype:
            headers.append(("content-type", self.datacontenttype.encode()))
        if self.signature:
            headers.append(("ce_signature", self.signature.encode()))
        headers.extend((k, v.encode()) for k, v in self.trace.items())
        key = self.subject.encode() if self.subject else None
        return key, json.dumps(self.data, separators=(",", ":"), ensure_ascii=False).encode(), headers


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def child_trace(parent: dict[str, str]) -> dict[str, str]:
    """W3C trace context for what a service emits while handling an event: the same trace id
    under a new span id; a new trace when the event carried none (or an unreadable one)."""
    match = _TRACEPARENT.match(parent.get("traceparent", ""))
    trace_id, flags = (match.group(1), match.group(3)) if match else (secrets.token_hex(16), "01")
    child = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"}
    if match and "tracestate" in parent:
        child["tracestate"] = parent["tracestate"]
    return child


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def from_record(value: bytes | None, headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes]) -> CloudEvent:
    """Read a binary-mode record; raises UnreadableRecord naming what is missing or broken."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    attrs: dict[str, str] = {}
    trace: dict[str, str] = {}
    content_type: str | None = None
    for name, raw in items:
        try:
            text = raw.decode() if isinstance(raw, bytes | bytearray) else str(raw)
        except UnicodeDecodeError as exc:
            raise UnreadableRecord(f"header {name!r} is not UTF-8") from exc
        lname = name.lower()
        if lname.startswith(CE_PREFIX):
            attrs[lname[len(CE_PREFIX) :]] = text
        elif lname == "content-type":
            content_type = text
        elif lname in TRACE_HEADERS:
            trace[lname] = text
    missing = [f"ce_{a}" for a in REQUIRED if not attrs.get(a)]
    if missing:
        raise UnreadableRecord(f"missing CloudEvents header(s): {', '.join(missing)}")
    if attrs["specversion"] != "1.0":
        raise UnreadableRecord(f"unsupported ce_specversion {attrs['specversion']!r} (expected 1.0)")
    if value is None:
        raise UnreadableRecord("record has no value (expected the event's JSON data)")
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableRecord(f"record value is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UnreadableRecord("record value is JSON but not an object")
    known = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "signature"}
    return CloudEvent(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        data=data,
        subject=attrs.get("subject"),
        time=attrs.get("time"),
        specversion=attrs["specversion"],
        datacontenttype=content_type,
        signature=attrs.get("signature"),
        extensions={k: v for k, v in attrs.items() if k not in known},
        trace=trace,
    )
