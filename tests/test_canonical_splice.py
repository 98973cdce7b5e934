"""An event's data is serialised once (CloudEvent.canonical_data) and its signing input, its record
value and the ledger entry's canonical form are built from it: each must be exactly what
serialising the whole gives, RFC 8785's bytes, for any JSON data (astral characters, floats,
member names around the ledger's `envelope` included)."""

from __future__ import annotations

import json
from typing import Any

import rfc8785
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
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    signed = _event(data, {}).signed(key)
    record_key, value, headers = signed.as_record()
    assert value == rfc8785.dumps(data)
    received = read_record(value, headers, record_key, limits=False).event
    assert received.data == json.loads(value) and received.verify(key.public_key())
