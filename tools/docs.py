"""`gputrace docs`: the documents derived from the code, regenerated so they cannot drift from it.

- `docs/asyncapi/<service>.json`: each service's AsyncAPI 3 document. Channels and operations come
  from the service's own FastStream broker (what it really subscribes to) plus the topics the shared
  mechanism writes for it; the messages on them (CloudEvents headers, record key, data schema) come
  from the partner contract and the decision records.
- `docs/openapi.json`: the ledger's HTTP API.
- `docs/configuration.md`: every setting of `shared/runtime/settings.py`.
- `docs/partner-contract.md` is written by hand; only its blocks between `<!-- generated:NAME -->`
  and `<!-- /generated:NAME -->` are rewritten (event table, reason codes, record formats, and the
  signed worked example).

`tests/test_docs.py` regenerates everything in memory and compares it with the committed files.
Heavy imports (FastStream, the services) happen inside functions so the CLI starts fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

from shared.contract import (
    DECIDING_SERVICES,
    DECISION_TOPICS,
    DLQ_TOPIC,
    EVENTS,
    OUTCOMES_TOPIC,
    SERVICES,
    TOPIC_PARTITIONS,
    ReasonCode,
    decisions_topic,
)
from shared.runtime.settings import Settings

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
CONTRACT_DOC = "partner-contract.md"
KAFKA_BINDING = "0.4.0"  # the AsyncAPI Kafka bindings version FastStream writes

# One line per reason code. A new ReasonCode without a line here fails `gputrace docs` (and the
# test), so the partner contract always explains every code a partner can receive.
REASON_MEANINGS: dict[ReasonCode, str] = {
    ReasonCode.SCHEMA_INVALID: "`data` does not match the schema of its event type (the message lists the fields), "
    "or the event breaks a limit of §2 (checked first, before the signature).",
    ReasonCode.UNKNOWN_TYPE: "`ce_type` is not an event type of the contract.",
    ReasonCode.WRONG_TOPIC: "The event type belongs on another topic (or no service here handles it).",
    ReasonCode.SIGNATURE_INVALID: "`ce_signature` is missing or does not verify with the party's registered key.",
    ReasonCode.UNKNOWN_PARTY: "`ce_source` names no registered party (it must be `urn:gputrace:party:` + your id).",
    ReasonCode.NOT_AUTHORIZED: "The party lacks the role for this type, or speaks for another party or its object.",
    ReasonCode.SUBJECT_MISMATCH: "`ce_subject` is not the aggregate id named in `data`.",
    ReasonCode.KEY_MISMATCH: "The Kafka record key is not the aggregate id named in `data` (the table in §3): "
    "the key decides the partition, so the event is refused rather than decided out of its aggregate's order.",
    ReasonCode.UNKNOWN_PLEDGE: "No pledge with this `pledge_id`.",
    ReasonCode.DUPLICATE_PLEDGE: "A pledge with this `pledge_id` already exists.",
    ReasonCode.PLEDGE_WITHDRAWN: "The pledge was withdrawn; it cannot change any more.",
    ReasonCode.AMOUNT_NOT_POSITIVE: "An amount, quantity or number of GPU hours is zero or negative.",
    ReasonCode.CURRENCY_UNKNOWN: "The currency is not one the programme deals in.",
    ReasonCode.CURRENCY_MISMATCH: "The currency differs from the pledge's currency.",
    ReasonCode.DISBURSEMENT_EXCEEDS_PLEDGE: "Disbursed in total would exceed the amount pledged.",
    ReasonCode.AMENDMENT_BELOW_DISBURSED: "The amended amount is below what was already disbursed.",
    ReasonCode.UNKNOWN_BATCH: "No batch request with this `batch_id`.",
    ReasonCode.DUPLICATE_BATCH: "A batch with this `batch_id` was already requested.",
    ReasonCode.UNKNOWN_MODEL: "The GPU model is not in the catalogue.",
    ReasonCode.QUOTE_MISMATCH: "The quote does not match the batch request (model, quantity, price or validity).",
    ReasonCode.QUOTE_NOT_OPEN: "The quote or its batch is no longer open (awarded or withdrawn).",
    ReasonCode.UNKNOWN_QUOTE: "No quote with this `quote_id` for the batch.",
    ReasonCode.DUPLICATE_QUOTE: "A quote with this `quote_id` already exists.",
    ReasonCode.ALREADY_AWARDED: "The batch was already awarded; there is one award per batch.",
    ReasonCode.FUNDING_SHORTFALL: "Capital earmarked for the batch by active pledges does not cover the award.",
    ReasonCode.EXPORT_NOT_CLEARED: "The batch is not (yet) cleared for export; a dispatch now is a violation.",
    ReasonCode.EXPORT_DENIED: "Export of the batch was denied.",
    ReasonCode.LICENSE_NOT_REQUIRED: "No licence decision is pending for the batch (cleared without one, or denied).",
    ReasonCode.QUANTITY_EXCEEDS_AWARD: "More units would ship than the award covers.",
    ReasonCode.QUANTITY_EXCEEDS_LICENSE: "More units would ship than the export clearance or licence covers.",
    ReasonCode.UNKNOWN_SHIPMENT: "No shipment with this `shipment_id` in the batch.",
    ReasonCode.DUPLICATE_SHIPMENT: "A shipment with this `shipment_id` was already dispatched.",
    ReasonCode.SERIAL_UNKNOWN: "A serial number was not dispatched in this shipment.",
    ReasonCode.SERIAL_DUPLICATE: "A serial number repeats in the event, is already in the programme, or is installed.",
    ReasonCode.SERIAL_NOT_RECEIVED: "A serial number was never received at the site.",
    ReasonCode.SERIAL_DAMAGED: "A serial number was received damaged and cannot be installed.",
    ReasonCode.SERIAL_NOT_INSTALLED: "A serial number is not installed, so it cannot be accepted or failed.",
    ReasonCode.OUT_OF_ORDER: "The step already happened, or comes before the step it depends on.",
    ReasonCode.INTERNAL_ERROR: "A fault on our side: the service failed to decide the event, tried again and "
    "gave up; the record is in the dead-letter topic for the operators. Send it again with a new `ce_id`.",
}


# --- isolation: the documents must not depend on the machine that generates them --------------


@contextmanager
def isolated_settings() -> Iterator[Settings]:
    """Every setting at its default, whatever the environment says, with throwaway dev keys.

    Services that build their own `Settings()` read the environment, so the environment itself is
    scrubbed for the duration (and restored after).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.contract.parties import write_private_key
    from tools.devkeys import generate_dev_registry

    with tempfile.TemporaryDirectory(prefix="gputrace-docs-") as tmp:
        keys = Path(tmp) / "keys"
        generate_dev_registry(keys)
        write_private_key(keys / "ledger.key", Ed25519PrivateKey.generate())
        wanted = {
            "VAR_DIR": tmp,
            "PARTY_REGISTRY": str(keys / "registry.json"),
            "LEDGER_SIGNING_KEY": str(keys / "ledger.key"),
            "API_TOKENS": str(keys / "tokens.json"),  # absent on purpose: no tokens, same schema
        }
        saved = {k: v for k, v in os.environ.items() if k.lower() in Settings.model_fields}
        for name in saved:
            del os.environ[name]
        os.environ.update(wanted)
        try:
            yield Settings()
        finally:
            for name in wanted:
                os.environ.pop(name, None)
            os.environ.update(saved)


# --- AsyncAPI ----------------------------------------------------------------------------


class _Message(typing.NamedTuple):
    type: str
    model: type[BaseModel]
    summary: str
    key: str
    signed: bool


def _topic_messages() -> dict[str, list[_Message]]:
    """What travels on each topic: partner events (contract) and the records services write."""
    from shared.contract.decisions import DECISION_TYPE, DLQ_TYPE, OUTCOME_TYPE, DeadLetter, Decision, Outcome

    by_topic: dict[str, list[_Message]] = {}
    for spec in EVENTS.values():
        roles = ", ".join(sorted(spec.roles))
        by_topic.setdefault(spec.topic, []).append(
            _Message(spec.type, spec.data, f"Sent by role {roles}.", spec.aggregate_field, True)
        )
    for topic in sorted(DECISION_TOPICS):
        by_topic[topic] = [_Message(DECISION_TYPE, Decision, "A service's decision.", "aggregate_id", False)]
    by_topic[OUTCOMES_TOPIC] = [
        _Message(OUTCOME_TYPE, Outcome, "The receipt of one partner event.", "the sending party's id", False)
    ]
    by_topic[DLQ_TOPIC] = [
        _Message(DLQ_TYPE, DeadLetter, "A record that could not be read as an event.", "topic/partition", False)
    ]
    return by_topic


def _headers_schema(message: _Message) -> dict[str, Any]:
    source = "urn:gputrace:party:<party_id>" if message.signed else "urn:gputrace:service:<service>"
    props: dict[str, Any] = {
        "ce_specversion": {"type": "string", "const": "1.0"},
        "ce_id": {"type": "string", "description": "Unique per source; a repeated (source, id) is the same event."},
        "ce_source": {"type": "string", "description": source},
        "ce_type": {"type": "string", "const": message.type},
        "ce_time": {"type": "string", "format": "date-time"},
        "ce_subject": {"type": "string", "description": f"The record key: {message.key}."},
        "content-type": {"type": "string", "const": "application/json"},
    }
    required = ["ce_specversion", "ce_id", "ce_source", "ce_type"]
    if message.signed:
        props["ce_signature"] = {
            "type": "string",
            "description": "Base64 Ed25519 signature over the RFC 8785 canonical JSON of the structured event "
            "(all attributes except signature, plus data); see partner-contract.md.",
        }
        required.append("ce_signature")
    return {"type": "object", "properties": props, "required": required}


def _declare_publishers(service: Any) -> None:
    """Add the topics the shared mechanism (shared/runtime/consumer.py) writes for this service: its decision
    topic, the outcomes of partner events, the DLQ. The relay publishes them with its own producer,
    so the broker would not know them; declaring them here touches only this process's broker."""
    writes = []
    if service.name in DECIDING_SERVICES:
        writes.append(
            (
                decisions_topic(service.name),
                "Every decision this service takes, published exactly once in Kafka transactions: "
                "read with isolation.level=read_committed. ce_id is the decision id, stable across redeliveries. "
                "Signed with the service's own key (ce_signature, as a partner signs its events; role service in "
                "the party registry): readers count a record only if this service signed it.",
            )
        )
    if any(t not in DECISION_TOPICS for t in service.topics):
        writes.append(
            (
                OUTCOMES_TOPIC,
                "One outcome per partner event, keyed by the sending party, published exactly once in Kafka "
                "transactions: read with isolation.level=read_committed (a read_uncommitted reader may see "
                "records of aborted transactions). ce_id is the decision id, stable: deduplicate on it if you "
                "cannot read committed.",
            )
        )
    writes.append((DLQ_TOPIC, "Records that are not readable events, with their bytes and the reason."))
    for topic, description in writes:
        service.broker.publisher(topic, title=f"{topic}:Publish", description=description)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _with_contract_messages(doc: dict[str, Any], group_id: str) -> dict[str, Any]:
    """Replace FastStream's untyped payloads by one message per event type, with its headers,
    key and data schema; name the consumer group on receive operations."""
    from pydantic.json_schema import models_json_schema

    def channel_of(operation: dict[str, Any]) -> str:
        return operation["channel"]["$ref"].removeprefix("#/channels/")

    # FastStream keeps subscribers and publishers in sets: order them so the file is stable.
    doc["operations"] = dict(
        sorted(
            doc["operations"].items(),
            key=lambda kv: (kv[1]["action"] != "receive", doc["channels"][channel_of(kv[1])]["address"]),
        )
    )
    rank = {channel_of(op): i for i, op in enumerate(doc["operations"].values())}
    doc["channels"] = dict(sorted(doc["channels"].items(), key=lambda kv: rank[kv[0]]))

    by_topic = _topic_messages()
    entries = {cid: by_topic[channel["address"]] for cid, channel in doc["channels"].items()}
    # What partners send is what we validate; what services write is what they serialise.
    wanted = {(m.model, "validation" if m.signed else "serialization") for ms in entries.values() for m in ms}
    refs, defs = models_json_schema(
        sorted(wanted, key=lambda mm: (mm[0].__name__, mm[1])),  # type: ignore[arg-type]
        ref_template="#/components/schemas/{model}",
    )
    messages: dict[str, Any] = {}
    for cid, channel in doc["channels"].items():
        channel["messages"] = {}
        for m in entries[cid]:
            messages[m.type] = {
                "name": m.type,
                "title": m.type,
                "summary": m.summary,
                "contentType": "application/json",
                "headers": _headers_schema(m),
                "payload": refs[(m.model, "validation" if m.signed else "serialization")],
                "bindings": {
                    "kafka": {"key": {"type": "string", "description": m.key}, "bindingVersion": KAFKA_BINDING},
                },
            }
            channel["messages"][m.type] = {"$ref": f"#/components/messages/{m.type}"}
    for operation in doc["operations"].values():
        cid = channel_of(operation)
        operation["messages"] = [{"$ref": f"#/channels/{cid}/messages/{m.type}"} for m in entries[cid]]
        if operation["action"] == "receive":
            operation["bindings"] = {
                "kafka": {"groupId": {"type": "string", "enum": [group_id]}, "bindingVersion": KAFKA_BINDING}
            }
    # FastStream's untyped placeholder messages and schemas are replaced wholesale.
    doc["components"] = {"messages": messages, "schemas": dict(sorted(defs.get("$defs", {}).items()))}
    dangling = {r for r in _refs(doc) if not _resolves(doc, r)}
    if dangling:
        raise RuntimeError(f"AsyncAPI document has dangling references: {sorted(dangling)}")
    return doc


def _resolves(doc: dict[str, Any], ref: str) -> bool:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _build_service(name: str, settings: Settings) -> Any:
    import importlib

    module = importlib.import_module(f"services.{name}.main")
    if name == "ledger":
        return module.build_service(settings)
    return module.build()  # reads the (scrubbed) environment


def _docstring(name: str) -> str:
    import importlib

    doc = importlib.import_module(f"services.{name}.main").__doc__ or ""
    paragraphs = [" ".join(p.split()) for p in doc.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def asyncapi(name: str, settings: Settings) -> dict[str, Any]:
    from importlib.metadata import version

    from faststream.specification import AsyncAPI

    service = _build_service(name, settings)
    _declare_publishers(service)
    spec = AsyncAPI(
        service.broker,
        title=f"gputrace {name}",
        version=version("gputrace"),
        description=_docstring(name),
    ).to_specification()
    return _with_contract_messages(spec.to_jsonable(), f"{settings.consumer_group_prefix}-{name}")


def openapi(settings: Settings) -> dict[str, Any]:
    from services.ledger.main import create_app

    return create_app(settings, consume=False).openapi()


# --- configuration -------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        parts = [_type_name(a) for a in args if a is not type(None)]
        optional = type(None) in args
        return " or ".join(parts) + (" (optional)" if optional else "")
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (`<prefix>` would otherwise vanish as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def configuration_md() -> str:
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `gputrace docs` from shared/runtime/settings.py; edit the code, then run `make docs`. -->",
        "",
        "Every gputrace process (`python -m services.<name>`, `gputrace ...`) reads these settings from the",
        "environment; the variable is the setting's name in upper case. Each service is its own process",
        "with its own values: `DATABASE_URL` in particular names that service's own database.",
        "",
        "| Environment variable | Type | Default | Description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        lines.append(
            f"| `{name.upper()}` | {_type_name(field.annotation)} | {_cell(_default(field.default))} "
            f"| {_cell(field.description or '')} |"
        )
    return "\n".join(lines) + "\n"


# --- partner contract: generated blocks ----------------------------------------------------


# How a non-structural type is named in the event table; plain strings and integers need no note.
_SIMPLE = {date: "date", datetime: "RFC 3339 time", Decimal: "decimal string"}


def _alternatives(annotation: Any) -> list[Any]:
    """The types a field may hold, without Annotated wrappers and without None."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [t for a in typing.get_args(annotation) if a is not type(None) for t in _alternatives(a)]
    return [annotation]


def _shape(annotation: Any) -> str:
    alternatives = _alternatives(annotation)
    if len(alternatives) > 1:
        return " (" + " or ".join(_SIMPLE.get(a, getattr(a, "__name__", str(a))) for a in alternatives) + ")"
    t = alternatives[0]
    if typing.get_origin(t) is Literal:
        return " (" + "/".join(f"`{a}`" for a in typing.get_args(t)) + ")"
    if typing.get_origin(t) is list:
        return " [" + (_shape(typing.get_args(t)[0]).strip() or "…") + "]"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return " {" + _fields(t) + "}"
    return f" ({_SIMPLE[t]})" if t in _SIMPLE else ""


def _fields(model: type[BaseModel]) -> str:
    parts = []
    for name, field in model.model_fields.items():
        optional = "?" if not field.is_required() else ""
        parts.append(f"{name}{optional}{_shape(field.annotation)}")
    return ", ".join(parts)


def _events_block() -> str:
    lines = [
        "| topic | type | sent by role | record key | data (`?` optional) |",
        "|---|---|---|---|---|",
    ]
    for spec in EVENTS.values():
        roles = ", ".join(f"`{r}`" for r in sorted(spec.roles))
        self_note = f"; `{spec.self_field}` must be the sender" if spec.self_field else ""
        lines.append(
            f"| `{spec.topic}` | `{spec.type}` | {roles} | `{spec.aggregate_field}` "
            f"| {_cell(_fields(spec.data))}{self_note} |"
        )
    return "\n".join(lines)


def _topics_block() -> str:
    readers = {spec.topic for spec in EVENTS.values()}
    lines = ["| topic | partitions | who writes | who reads |", "|---|---|---|---|"]
    for topic, partitions in TOPIC_PARTITIONS.items():
        if topic in readers:
            who = ("partners", "the gputrace service of that topic")
        elif topic == OUTCOMES_TOPIC:
            who = ("gputrace services", "partners (filter on `event_source` or the record key)")
        elif topic == DLQ_TOPIC:
            who = ("gputrace services", "ops (a partner asks them for its records)")
        else:
            who = ("that gputrace service", "other gputrace services and the ledger")
        lines.append(f"| `{topic}` | {partitions} | {who[0]} | {who[1]} |")
    return "\n".join(lines)


def _reasons_block() -> str:
    missing = [c.value for c in ReasonCode if c not in REASON_MEANINGS]
    if missing:
        raise RuntimeError(f"reason code(s) without a meaning in tools/docs.py REASON_MEANINGS: {missing}")
    lines = ["| reason code | meaning |", "|---|---|"]
    lines += [f"| `{code.value}` | {_cell(REASON_MEANINGS[code])} |" for code in ReasonCode]
    return "\n".join(lines)


def _model_block(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="serialization")
    rows = []
    for name, prop in schema["properties"].items():
        kinds = [p.get("format") or p.get("type", "?") for p in prop.get("anyOf", [prop])]
        if "items" in prop:
            kinds = [f"array of {prop['items'].get('type', 'array')}"]
        if "enum" in prop:
            kinds = [" / ".join(f"`{v}`" for v in prop["enum"])]
        required = "yes" if name in schema.get("required", []) else "no"
        kind, note = _cell(" or ".join(str(k) for k in kinds)), _cell(prop.get("description", ""))
        rows.append([f"`{name}`", kind, required, note])
    header = ["field", "JSON type", "required", "note"]
    if not any(row[3] for row in rows):  # no empty column when the model documents no field
        header, rows = header[:3], [row[:3] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# The worked example: a published test key (registered nowhere) and one real event of the contract.
EXAMPLE_SEED_TEXT = b"gputrace example partner"
EXAMPLE_ATTRIBUTES = {
    "id": "5b0e2f6c-3b7d-4d8e-9a51-0c1f2e3d4a5b",
    "source": "urn:gputrace:party:nhn-cloud",
    "type": "gputrace.pledge.committed.v1",
    "subject": "P-2025-0001",
    "time": "2025-03-01T09:00:00Z",
}
EXAMPLE_DATA = {
    "pledge_id": "P-2025-0001",
    "partner_id": "nhn-cloud",
    "program_id": "KR-AI-2025",
    "kind": "capital",
    "capital": {"amount": "400000000000", "currency": "KRW"},
    "earmark_batch_id": "B-2025-0001",
    "committed_at": "2025-03-01T09:00:00Z",
    "due_by": "2025-12-31",
}


def example_event() -> Any:
    """The worked example, signed with the example key (Ed25519 signatures are deterministic)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.contract.cloudevents import CloudEvent

    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(EXAMPLE_SEED_TEXT).digest())
    return CloudEvent(data=EXAMPLE_DATA, **EXAMPLE_ATTRIBUTES).signed(key)


def _example_block() -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.contract.parties import public_key_b64

    seed = hashlib.sha256(EXAMPLE_SEED_TEXT).digest()
    event = example_event()
    spec = EVENTS[event.type]
    spec.data.model_validate(event.data)  # the example must be a valid event of the contract
    key, value, headers = event.as_record()
    canonical = event.signing_input()
    assert key is not None
    rows = "\n".join(f"| `{name}` | `{raw.decode()}` |" for name, raw in headers)
    public = public_key_b64(Ed25519PrivateKey.from_private_bytes(seed).public_key())
    pretty = json.dumps(event.structured(), indent=2, ensure_ascii=False)
    return f"""Private key, the 32-byte Ed25519 seed in hex (it is SHA-256 of the ASCII text
`{EXAMPLE_SEED_TEXT.decode()}`; a published test key that no registry holds):

seed: `{seed.hex()}`

Its public key, raw 32 bytes in base64 as the party registry holds it:

public key: `{public}`

The Kafka record, on topic `{spec.topic}` with key `{key.decode()}`. Headers:

| header | value |
|---|---|
{rows}

Value (the event's `data`, UTF-8 JSON):

```json
{value.decode()}
```

**Step 1.** The structured form that is signed: every attribute except `signature`, plus `data`.
The `content-type` header is the `datacontenttype` attribute:

```json
{pretty}
```

**Step 2.** Its RFC 8785 (JCS) canonical JSON: the exact bytes signed, UTF-8, {len(canonical)} bytes,
no trailing newline:

```text
{canonical.decode()}
```

**Step 3.** The Ed25519 signature of those bytes, base64 (standard alphabet, padded), sent as
`ce_signature`:

```text
{event.signature}
```"""


def _values_block() -> str:
    from shared.contract import GPU_MODELS, KNOWN_CURRENCIES

    return (
        f"- GPU models (the catalogue): {', '.join(f'`{m}`' for m in GPU_MODELS)}.\n"
        f"- Currencies (ISO 4217): {', '.join(f'`{c}`' for c in sorted(KNOWN_CURRENCIES))}."
    )


GENERATED_BLOCKS = {
    "topics": _topics_block,
    "values": _values_block,
    "events": _events_block,
    "reason-codes": _reasons_block,
    "outcome": lambda: _model_block(_decisions().Outcome),
    "deadletter": lambda: _model_block(_decisions().DeadLetter),
    "example": _example_block,
}


def _decisions() -> Any:
    import shared.contract.decisions

    return shared.contract.decisions


def fill_blocks(markdown: str) -> str:
    """Rewrite every `<!-- generated:NAME -->...<!-- /generated:NAME -->` block; unknown or
    missing blocks are errors, so a typo cannot silently leave a block stale."""
    found = set(re.findall(r"<!-- generated:([a-z-]+) -->", markdown))
    if found != set(GENERATED_BLOCKS):
        raise RuntimeError(
            f"{CONTRACT_DOC} must hold exactly the generated blocks {sorted(GENERATED_BLOCKS)}; has {sorted(found)}"
        )
    for name, make in GENERATED_BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(?:.*?\n)?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(markdown):
            raise RuntimeError(f"{CONTRACT_DOC}: block {name!r} has no closing <!-- /generated:{name} -->")
        body = make()
        markdown = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), markdown)
    return markdown


# --- the whole set -------------------------------------------------------------------------


def _json(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def generate(docs_dir: Path = DOCS_DIR) -> dict[str, str]:
    """Every generated document: path relative to docs/ → its text."""
    out: dict[str, str] = {}
    with isolated_settings() as settings:
        for name in SERVICES:
            out[f"asyncapi/{name}.json"] = _json(asyncapi(name, settings))
        out["openapi.json"] = _json(openapi(settings))
        scratch = str(settings.var_dir)
    out["configuration.md"] = configuration_md()
    out[CONTRACT_DOC] = fill_blocks((docs_dir / CONTRACT_DOC).read_text())
    leaked = [path for path, text in out.items() if scratch in text]
    if leaked:
        raise RuntimeError(f"temporary paths leaked into {leaked}; documents must be deterministic")
    return out


def stale(docs_dir: Path = DOCS_DIR) -> list[str]:
    """Generated documents that differ from the files in docs_dir (or are missing), and AsyncAPI
    files of services that no longer exist."""
    wanted = generate(docs_dir)
    differ = [p for p, text in wanted.items() if not (docs_dir / p).exists() or (docs_dir / p).read_text() != text]
    extra = [
        str(p.relative_to(docs_dir))
        for p in sorted((docs_dir / "asyncapi").glob("*.json"))
        if str(p.relative_to(docs_dir)) not in wanted
    ]
    return differ + extra


def docs_command(
    check: Annotated[bool, typer.Option(help="Write nothing; exit 1 if docs/ is out of date")] = False,
    docs_dir: Annotated[Path, typer.Option("--dir", help="The docs directory")] = DOCS_DIR,
) -> None:
    """Regenerate docs/ from the code: AsyncAPI per service, the ledger's OpenAPI, the configuration
    table and the generated parts of the partner contract."""
    if check:
        outdated = stale(docs_dir)
        if outdated:
            typer.echo(f"out of date: {', '.join(outdated)}; run `make docs`", err=True)
            raise typer.Exit(1)
        typer.echo("docs/ is up to date")
        return
    wanted = generate(docs_dir)
    written = []
    for rel, text in wanted.items():
        path = docs_dir / rel
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(rel)
    for path in sorted((docs_dir / "asyncapi").glob("*.json")):
        if str(path.relative_to(docs_dir)) not in wanted:  # a service that no longer exists
            path.unlink()
            written.append(f"{path.relative_to(docs_dir)} (removed)")
    typer.echo(f"wrote {', '.join(written)}" if written else "docs/ is up to date")
