"""docs/ matches the code.

Every generated document is regenerated in memory and compared with the committed file. The
partner contract's worked example is recomputed twice: with gputrace's own code, and from
scratch with rfc8785 + cryptography, the way an integrator would, so the bytes and signature
printed in the document are the ones a partner must produce.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.contract import EVENTS, PARTY_SOURCE_PREFIX, ReasonCode
from shared.contract.cloudevents import from_record
from tools import docs

DOCS = docs.DOCS_DIR
FIX = "the code changed: run `make docs` (or `gputrace docs`) and commit docs/"


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return docs.generate()


def test_generated_documents_match_the_code(generated: dict[str, str]) -> None:
    missing = [p for p in generated if not (DOCS / p).exists()]
    differ = [p for p, text in generated.items() if p not in missing and (DOCS / p).read_text() != text]
    assert not missing and not differ, f"docs/ out of date (missing {missing}, differing {differ}); {FIX}"


def test_no_document_for_a_service_that_is_gone(generated: dict[str, str]) -> None:
    committed = {str(p.relative_to(DOCS)) for p in (DOCS / "asyncapi").glob("*.json")}
    assert committed <= set(generated), f"stale: {sorted(committed - set(generated))}; delete them"


def test_generation_is_deterministic(generated: dict[str, str]) -> None:
    # A second run uses other temporary keys and paths; nothing of them may show.
    assert docs.generate() == generated


def test_every_reason_code_is_explained() -> None:
    assert set(docs.REASON_MEANINGS) == set(ReasonCode), "describe each ReasonCode in tools/docs.py REASON_MEANINGS"


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_asyncapi_documents_carry_the_whole_contract() -> None:
    received: dict[tuple[str, str], dict[str, Any]] = {}  # (topic, type) -> data schema
    for path in sorted((DOCS / "asyncapi").glob("*.json")):
        doc = json.loads(path.read_text())
        assert doc["asyncapi"].startswith("3."), path
        for ref in _refs(doc):
            _resolve(doc, ref)  # raises on a dangling reference
        for op in doc["operations"].values():
            channel = _resolve(doc, op["channel"]["$ref"])
            for ref in op["messages"]:
                message = _resolve(doc, _resolve(doc, ref["$ref"])["$ref"])
                assert message["headers"]["properties"]["ce_type"]["const"] == message["name"]
                if op["action"] == "receive":
                    received[channel["address"], message["name"]] = _resolve(doc, message["payload"]["$ref"])
    # Every partner event type is read by some service, on its topic, with its data fields.
    for spec in EVENTS.values():
        schema = received.get((spec.topic, spec.type))
        assert schema is not None, f"no AsyncAPI document reads {spec.type} on {spec.topic}"
        assert set(schema["properties"]) == set(spec.data.model_fields), spec.type


# --- the worked example ------------------------------------------------------------------


def _example() -> dict[str, Any]:
    text = (DOCS / docs.CONTRACT_DOC).read_text()
    block = text.split("<!-- generated:example -->", 1)[1].split("<!-- /generated:example -->", 1)[0]
    fenced = re.findall(r"```(\w+)\n(.*?)\n```", block, re.S)
    assert [lang for lang, _ in fenced] == ["json", "json", "text", "text"], "the example's layout changed"
    topic, key = re.search(r"on topic `([^`]+)` with key `([^`]+)`", block).groups()  # type: ignore[union-attr]
    return {
        "seed": re.search(r"seed: `([0-9a-f]{64})`", block).group(1),  # type: ignore[union-attr]
        "public": re.search(r"public key: `([A-Za-z0-9+/=]+)`", block).group(1),  # type: ignore[union-attr]
        "topic": topic,
        "key": key,
        "headers": re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|$", block, re.M),
        "value": fenced[0][1],
        "structured": fenced[1][1],
        "canonical": fenced[2][1],
        "signature": fenced[3][1],
    }


def test_example_key_is_the_published_test_key() -> None:
    ex = _example()
    assert ex["seed"] == hashlib.sha256(b"gputrace example partner").hexdigest()


def test_example_from_scratch() -> None:
    """Only the standards: JCS (rfc8785) and Ed25519 (cryptography); no gputrace code."""
    ex = _example()
    headers = dict(ex["headers"])
    # The structured form is the record's ce_ headers (without signature), content-type, and data.
    rebuilt: dict[str, Any] = {k.removeprefix("ce_"): v for k, v in headers.items() if k.startswith("ce_")}
    del rebuilt["signature"]
    rebuilt["datacontenttype"] = headers["content-type"]
    rebuilt["data"] = json.loads(ex["value"])
    assert rebuilt == json.loads(ex["structured"])
    canonical = rfc8785.dumps(rebuilt)
    assert canonical == ex["canonical"].encode()

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(ex["seed"]))
    signature = base64.b64encode(key.sign(canonical)).decode()
    assert signature == ex["signature"] == headers["ce_signature"]
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64encode(public).decode() == ex["public"]
    Ed25519PublicKey.from_public_bytes(public).verify(base64.b64decode(signature), canonical)
    assert ex["key"] == headers["ce_subject"]


def test_example_with_gputrace_code() -> None:
    """The record as documented is what the services accept: a valid event that verifies."""
    ex = _example()
    event = from_record(ex["value"].encode(), [(k, v.encode()) for k, v in ex["headers"]])
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(ex["public"]))
    assert event.signing_input() == ex["canonical"].encode()
    assert event.verify(public)
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(ex["seed"]))
    assert event.signed(key).signature == ex["signature"]

    spec = EVENTS[event.type]
    data = spec.data.model_validate(event.data)
    assert ex["topic"] == spec.topic
    assert event.subject == str(getattr(data, spec.aggregate_field))
    if spec.self_field:
        assert getattr(data, spec.self_field) == event.source.removeprefix(PARTY_SOURCE_PREFIX)
    # And a changed byte breaks it.
    value = ex["value"].replace("400000000000", "400000000001")
    assert not from_record(value.encode(), [(k, v.encode()) for k, v in ex["headers"]]).verify(public)


def test_reproduce_snippet_prints_the_signature(tmp_path: Path) -> None:
    """The Python snippet in the document, run as a partner would run it."""
    text = (DOCS / docs.CONTRACT_DOC).read_text()
    snippet = re.search(r"To reproduce it.*?```python\n(.*?)\n```", text, re.S).group(1)  # type: ignore[union-attr]
    ex = _example()
    (tmp_path / "event.json").write_text(ex["structured"])
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ex["signature"]


# --- the HTTP API's schema ----------------------------------------------------------------


def _typed(doc: dict[str, Any], schema: dict[str, Any]) -> bool:
    """An object schema with named properties and no free-form `additionalProperties`, or an array of them."""
    if "$ref" in schema:
        schema = _resolve(doc, schema["$ref"])
    if schema.get("type") == "array":
        return _typed(doc, schema["items"])
    return schema.get("type") == "object" and bool(schema.get("properties")) and not schema.get("additionalProperties")


def test_openapi_every_response_is_typed() -> None:
    """What a partner's generated client needs: every JSON body a real model, every refusal the
    Problem shape, and the version of the code that serves it."""
    from importlib.metadata import version

    doc = json.loads((DOCS / "openapi.json").read_text())
    assert doc["info"]["version"] == version("gputrace"), f"app.version is not the package's; {FIX}"
    untyped, undocumented = [], []
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for status, response in op["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema is None or not _typed(doc, schema):
                    untyped.append(f"{method.upper()} {path} {status}")
            if op["responses"].get("4XX", {}).get("content", {}).get("application/json", {}).get("schema") != {
                "$ref": "#/components/schemas/Problem"
            }:
                undocumented.append(f"{method.upper()} {path}")
    assert not untyped, f"responses without a typed JSON schema (use a services/ledger/responses.py model): {untyped}"
    assert not undocumented, f"routes whose refusals are not documented as Problem: {undocumented}"
