"""An event's data is serialised once (CloudEvent.canonical_data) and its signing input, its record
value and the ledger entry's canonical form are built from it: each must be exactly what
serialising the whole gives, RFC 8785's bytes, for any JSON data (astral characters, floats,
member names around the ledger's `envelope` included)."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.contract.cloudevents import CloudEvent, canonical_json, read_record

# Names that sort around "envelope" and "data", and where UTF-16 and code-point order differ.
NAMES = st.sampled_from(["envelope", "envelopf", "envelop", "e", "f", "data", "datacontenttype", "\uffff"]) | st.text(
    st.characters(exclude_categories=["Cs"]) | st.sampled_from(["\ue000", "\U0001f600"]), max_size=6
)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.floats(-1e15, 1e15) | NAMES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=12,
)
DATA = st.dictionaries(NAMES, VALUES, max_size=8)
EXTENSIONS = st.dictionaries(st.sampled_from(["data", "batch", "zz", "a"]), st.text(max_size=5), max_size=2)


def _event(data: dict[str, Any], extensions: dict[str, str]) -> CloudEvent:
    return CloudEvent(id="1", source="urn:s", type="t", data=data, subject="s", time=None, extensions=extensions)


@settings(max_examples=400, deadline=None)
@given(data=DATA, extensions=EXTENSIONS, envelope=st.dictionaries(NAMES, VALUES, max_size=3))
def test_the_spliced_forms_are_the_whole_forms(
    data: dict[str, Any], extensions: dict[str, str], envelope: dict[str, Any]
) -> None:
    event = _event(data, extensions)
    assert event.canonical_data() == canonical_json(data) == rfc8785.dumps(data)
    assert event.signing_input() == rfc8785.dumps(event.structured())
    assert event.canonical_with_data("envelope", envelope) == rfc8785.dumps({**data, "envelope": envelope})


@settings(max_examples=200, deadline=None)
@given(data=DATA)
def test_a_signed_event_travels_as_its_canonical_data_and_reads_back_alike(data: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.generate()
    signed = _event(data, {}).signed(key)
    record_key, value, headers = signed.as_record()
    assert value == rfc8785.dumps(data)
    received = read_record(value, headers, record_key, limits=False).event
    assert received.data == json.loads(value) and received.verify(key.public_key())


# --- a record of our own services is verified over its bytes as they came (CloudEvent.verify) ---

KEY = Ed25519PrivateKey.generate()


def _received(value: bytes, headers: list[tuple[str, bytes]], key: bytes | None) -> CloudEvent:
    return read_record(value, headers, key, limits=False).event


@settings(max_examples=300, deadline=None)
@given(data=DATA, extensions=EXTENSIONS, envelope=st.dictionaries(NAMES, VALUES, max_size=3))
def test_verified_over_its_bytes_an_event_gives_the_canonical_forms(
    data: dict[str, Any], extensions: dict[str, str], envelope: dict[str, Any]
) -> None:
    record_key, value, headers = _event(data, extensions).signed(KEY).as_record()
    received = _received(value, headers, record_key)
    assert received.verify(KEY.public_key())
    # The halves cut from the bytes are the ones serialising gives: the ledger's entry is the same.
    assert received.canonical_with_data("envelope", envelope) == rfc8785.dumps({**data, "envelope": envelope})
    assert received.signing_input() == rfc8785.dumps(received.structured())


def test_data_sent_in_another_layout_still_verifies_by_its_canonical_form() -> None:
    data = {"decision_id": "d", "event": {"b": 1, "a": [1, 2]}, "aggregate_id": "x"}
    record_key, _, headers = _event(data, {}).signed(KEY).as_record()
    spaced = json.dumps(data, indent=2).encode()  # the same JSON, not canonical
    received = _received(spaced, headers, record_key)
    assert received.verify(KEY.public_key())
    assert received.canonical_with_data("envelope", {}) == rfc8785.dumps({**data, "envelope": {}})


def test_bytes_signed_in_a_non_canonical_layout_do_not_count() -> None:
    """We only ever sign the canonical form. Bytes that do not start as canonical JSON would are
    judged by their canonical form, so a signature over them (whoever made it) fails. (A key holder
    that signed a non-canonical tail would get an entry the auditor's verifier rejects, since it
    re-verifies every entry's signature over the canonical form.)"""
    data = {"aggregate_id": "x", "decision_id": "d", "event": {"a": 1}}
    event = _event(data, {})
    spaced = b'{"aggregate_id": "x", "decision_id": "d", "event": {"a": 1}}'
    raw_input = event.signing_input().replace(event.canonical_data(), spaced)
    signature = base64.b64encode(KEY.sign(raw_input)).decode()
    record_key, _, headers = replace(event, signature=signature).as_record()
    assert not _received(spaced, headers, record_key).verify(KEY.public_key())


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v.replace(b'"x"', b'"y"'),  # another aggregate
        lambda v: v.replace(b'"a":1', b'"a":2'),  # deep inside
        lambda v: v[:-1] + b',"z":1}',  # a member added at the end
        lambda v: v.replace(b'{"aggregate_id":"x",', b'{"aggregate_id":"x","aggregate_id":"x",'),  # duplicated
    ],
)
def test_tampered_bytes_do_not_verify(tamper: Any) -> None:
    data = {"aggregate_id": "x", "decision_id": "d", "event": {"a": 1}}
    record_key, value, headers = _event(data, {}).signed(KEY).as_record()
    forged = tamper(value)
    assert forged != value
    assert not _received(forged, headers, record_key).verify(KEY.public_key())


def test_moving_bytes_between_the_attributes_and_the_data_does_not_verify() -> None:
    """The splice can be cut only one way: data that ends early, with the rest carried as an
    attribute, is refused."""
    data = {"aggregate_id": "x", "decision_id": "d"}
    record_key, _, headers = _event(data, {"zz": "q"}).signed(KEY).as_record()
    moved = [(n, v) for n, v in headers if n != "ce_zz"] + [("ce_data", b'{"aggregate_id":"x"}')]
    assert not _received(b'{"decision_id":"d"}', moved, record_key).verify(KEY.public_key())
