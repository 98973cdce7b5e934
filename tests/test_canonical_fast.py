"""The fast canonical-JSON path gives exactly RFC 8785's bytes, and is really taken."""

from __future__ import annotations

from typing import Any

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.contract import MAX_SAFE_INTEGER
from shared.contract.cloudevents import _jcs_fast, canonical_json

# Everything JSON can hold, astral characters, lone surrogates, floats and big integers included;
# the characters where UTF-16 and code-point order part ways come often, so short keys collide.
ANY_TEXT = st.text(
    st.characters(exclude_categories=()) | st.sampled_from(["a", "\ue000", "\uffff", "\U0001f600", "\ud800"]),
    max_size=6,
)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=20,
)
# What the fast path takes: BMP without surrogates, no floats, safe integers.
BMP_TEXT = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=12)
PLAIN_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | BMP_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(BMP_TEXT, inner, max_size=4),
    max_leaves=20,
)


def _rfc8785(value: Any) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(value)
    except Exception as exc:
        return type(exc)


def _ours(value: Any) -> bytes | type[Exception]:
    try:
        return canonical_json(value)
    except Exception as exc:
        return type(exc)


@settings(max_examples=200, deadline=None)
@given(PLAIN_JSON)
def test_fast_path_is_taken_and_exact(value: Any) -> None:
    assert _jcs_fast(value)
    assert canonical_json(value) == rfc8785.dumps(value)


@settings(max_examples=200, deadline=None)
@given(ANY_JSON)
def test_same_bytes_or_same_refusal_on_any_json(value: Any) -> None:
    assert _ours(value) == _rfc8785(value)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(st.sampled_from("a\ud7ff\ue000\uffff\U0001f600"), max_size=2), st.integers(0, 3)))
def test_key_order_where_utf16_and_code_points_differ(value: dict[str, int]) -> None:
    assert _ours(value) == _rfc8785(value)


def test_edge_cases() -> None:
    # Sorting across the BMP (U+E000 after U+D7FF), escapes, DEL and U+2028 kept literal.
    for value in [
        {"\ue000": 1, "\ud7ff": 2, "a": [True, None, -MAX_SAFE_INTEGER]},
        '\x00\x1f\x7f\u2028"\\\n\t\b\f\r',
        {"": {"": []}},
    ]:
        assert _jcs_fast(value)
        assert canonical_json(value) == rfc8785.dumps(value)
    # Not plain: an astral key sorts by UTF-16 (before U+E000), a float, a big integer, a tuple.
    for value in [{"\U0001f600": 1, "\ue000": 2}, {"x": 1.5}, [MAX_SAFE_INTEGER + 1], ("a",)]:
        assert not _jcs_fast(value)
    assert canonical_json({"\U0001f600": 1, "\ue000": 2}) == rfc8785.dumps({"\U0001f600": 1, "\ue000": 2})
