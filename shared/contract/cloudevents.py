"""CloudEvents 1.0 in Kafka binary mode, and the partner signature of docs/partner-contract.md §2–§4.

Binary mode: the record value is the JSON `data`; every other attribute is a `ce_<name>`
header, `content-type` stands for `datacontenttype`. The signature (`ce_signature`) is the
base64 Ed25519 signature over the RFC 8785 canonical JSON of the event in structured form:
all attributes except `signature`, plus `data`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.contract import (
    EARLIEST_YEAR,
    LATEST_YEAR,
    MAX_ATTRIBUTE_CHARS,
    MAX_DEPTH,
    MAX_ID_CHARS,
    MAX_SAFE_INTEGER,
    MAX_STRING_CHARS,
    MAX_SUBJECT_CHARS,
    MAX_TYPE_CHARS,
    ed25519,
    fit,
)

CE_PREFIX = "ce_"
CONTENT_TYPE = "application/json"
REQUIRED = ("specversion", "id", "source", "type")
# W3C trace context travels next to the CloudEvents headers (distributed tracing extension).
TRACE_HEADERS = ("traceparent", "tracestate")


class UnreadableRecord(Exception):
    """A Kafka record that cannot be read as an event at all: it goes to the DLQ."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical form; the one serialisation that is signed and hashed.

    Float-free data whose strings are all in the Basic Multilingual Plane (no surrogates) takes a
    fast path: there `json.dumps(sort_keys=True)` gives RFC 8785's bytes (code-point order is
    UTF-16 order, integers print alike, the same escapes), ~5x faster than `rfc8785`. Anything
    else (floats, astral characters, big integers, other types) goes to `rfc8785`."""
    if _jcs_fast(value):
        return _CANONICAL.encode(value).encode()
    return rfc8785.dumps(value)


# Built once: json.dumps with these options would build an encoder on every call (several per event).
_CANONICAL = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))

# The member name around which an event's data is serialised in two halves (CloudEvent.canonical_data):
# the ledger adds it to the data (its entries' envelope), so an entry's canonical form is the two
# halves with that member between them. ASCII, so it sorts alike in UTF-16 and code-point order.
_PIVOT = "envelope"


def _halves(value: dict[str, Any], pivot: str) -> tuple[bytes, bytes]:
    """canonical_json of the members of `value` whose names sort before `pivot`, and after it.
    RFC 8785 sorts names by UTF-16 code units; against an ASCII name that order and Python's agree
    (a character beyond U+FFFF is above ASCII in both), so the two halves joined are
    canonical_json(value)."""
    before = {k: v for k, v in value.items() if isinstance(k, str) and k < pivot}
    after = {k: v for k, v in value.items() if not (isinstance(k, str) and k < pivot)}
    return canonical_json(before), canonical_json(after)


def _cut(raw: bytes, value: dict[str, Any], pivot: str) -> tuple[bytes, bytes] | None:
    """`_halves(value, pivot)` when `raw` is canonical_json(value), serialising only the members
    before `pivot` (a decision's few small ones) and cutting `raw` after them; None when `raw`
    does not start as canonical_json would have it."""
    before = canonical_json({k: v for k, v in value.items() if k < pivot})
    if before == b"{}":
        return before, raw
    head = before[:-1]
    if not raw.startswith(head):
        return None
    rest = raw[len(head) :]
    if rest == b"}":
        return before, b"{}"
    if not rest.startswith(b","):
        return None
    return before, b"{" + rest[1:]


def _join(before: bytes, member: bytes, after: bytes) -> bytes:
    """The object of two canonical objects' members, with `member` (b'"name":value') between."""
    parts = [p for p in (before[1:-1], member, after[1:-1]) if p]
    return b"{" + b",".join(parts) + b"}"


def _with_member(members: dict[str, Any], name: str, canonical_value: bytes) -> bytes:
    """canonical_json({**members, name: value}) given canonical_json(value); `name` is ASCII and
    replaces a member of that name, as in the dict."""
    before = {k: v for k, v in members.items() if k < name}
    after = {k: v for k, v in members.items() if k > name}
    return _join(canonical_json(before), json.dumps(name).encode() + b":" + canonical_value, canonical_json(after))


# What UTF-16 orders differently from code points (RFC 8785 §3.2.3), or cannot encode at all.
_NOT_BMP = re.compile("[\ud800-\udfff\U00010000-\U0010ffff]")


def _jcs_fast(value: Any) -> bool:
    """True when `value` is made only of dicts (str keys), lists, BMP strings, bools, None and
    integers within ±(2^53-1): the data on which the fast canonical path is exact. A loop, not
    recursion, and one search over all strings joined: this check must cost less than rfc8785."""
    strings: list[str] = []
    stack = [value]
    pop, push, add = stack.pop, stack.append, strings.append
    while stack:
        v = pop()
        kind = type(v)
        if kind is str:
            add(v)
        elif kind is dict:
            for k, item in v.items():
                if type(k) is not str:
                    return False
                add(k)
                if type(item) is str:
                    add(item)
                else:
                    push(item)
        elif kind is list:
            stack.extend(v)
        elif kind is int:
            if not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
                return False
        elif not (kind is bool or v is None):
            return False
    text = "".join(strings)
    return text.isascii() or _NOT_BMP.search(text) is None


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
        """The structured form the signature covers (docs/partner-contract.md §2–§4)."""
        return {**self.attributes(), "data": self.data}

    def signing_input(self) -> bytes:
        """canonical_json(self.structured()), built from the data's canonical form (kept, see
        `canonical_data`) and the attributes': the data is serialised once per event, however
        many times it is signed, verified, sent or appended to the ledger."""
        return _with_member(self.attributes(), "data", self.canonical_data())

    def canonical_data(self) -> bytes:
        """canonical_json(self.data), computed once per event. `data` is not to be changed after
        an event is made (the signature covers it)."""
        before, after = self._data_halves()
        return _join(before, b"", after)

    def canonical_with_data(self, name: str, value: Any) -> bytes:
        """canonical_json({**self.data, name: value}) for the member that the ledger adds
        (shared.runtime.consumer.ENVELOPE_FIELD), reusing the data's canonical form."""
        if name != _PIVOT or name in self.data:
            return canonical_json({**self.data, name: value})
        before, after = self._data_halves()
        return _join(before, json.dumps(name).encode() + b":" + canonical_json(value), after)

    def _data_halves(self) -> tuple[bytes, bytes]:
        cached = self.__dict__.get("_halves")
        if cached is None:
            cached = _halves(self.data, _PIVOT)
            # A frozen dataclass, but a cache is not state: set directly, as cached_property does.
            self.__dict__["_halves"] = cached
        return cached  # type: ignore[no-any-return]

    def signed(self, key: Ed25519PrivateKey) -> CloudEvent:
        sig = base64.b64encode(ed25519.sign(key, self.signing_input())).decode()
        event = replace(self, signature=sig)
        event.__dict__["_halves"] = self._data_halves()  # same data: its canonical form goes along
        return event

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        if not self.signature:
            return False
        try:
            signature = base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        raw = self.__dict__.get("_raw_data")
        if raw is not None and "_halves" not in self.__dict__:
            # Our services send a signed event's data as its canonical bytes (as_record): the
            # signature is checked over the bytes as they came, spliced into the attributes, with
            # no serialisation. Valid, those bytes are exactly what the key's holder signed (the
            # splice can be cut only one way: every attribute is a JSON string, the data an
            # object), and what we parsed from them is what it meant.
            if ed25519.verify(public_key, signature, _with_member(self.attributes(), "data", raw)):
                halves = _cut(raw, self.data, _PIVOT)
                if halves is not None:
                    self.__dict__["_halves"] = halves
                    return True
                # Signed, but not laid out as canonical JSON: only the canonical form counts.
            # Otherwise not sent as canonical bytes (or forged): the canonical form decides.
        return ed25519.verify(public_key, signature, self.signing_input())

    def as_record(self) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        """(key, value, headers) for a Kafka producer, in binary mode."""
        headers = [(f"{CE_PREFIX}{k}", v.encode()) for k, v in self.attributes().items() if k != "datacontenttype"]
        if self.datacontenttype:
            headers.append(("content-type", self.datacontenttype.encode()))
        if self.signature:
            headers.append(("ce_signature", self.signature.encode()))
        headers.extend((k, v.encode()) for k, v in self.trace.items())
        key = self.subject.encode() if self.subject else None
        # A signed event's value is its data's canonical JSON, already made for the signature.
        halves = self.__dict__.get("_halves")
        value = _join(halves[0], b"", halves[1]) if halves is not None else None
        return key, value or json.dumps(self.data, separators=(",", ":"), ensure_ascii=False).encode(), headers


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Limit(Exception):
    """Raised by the JSON parser's hooks: the value is JSON but breaks the contract's limits."""


def _parse_int(text: str) -> int:
    # Judged on the literal's digits, before converting: a 5,000-digit literal costs nothing (and
    # never reaches int()'s 4,300-digit ValueError).
    if len(text) > 17 or abs(n := int(text)) > MAX_SAFE_INTEGER:
        raise _Limit(f"integer {_head(text)} is beyond ±(2^53 − 1)")
    return n


def _parse_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _Limit(f"number {_head(text)} is out of range")
    # RFC 8785 writes 4.97e16 as the integer 49700000000000000, which reads back as an integer
    # beyond 2^53 that no canonicaliser accepts: the same magnitude bound as for integers.
    if abs(number) > MAX_SAFE_INTEGER:
        raise _Limit(f"number {_head(text)} is beyond ±(2^53 − 1)")
    return number


def _parse_constant(name: str) -> Any:
    raise _Limit(f"{name} is not a JSON number")


def _parse_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Which one was signed? RFC 8785 (I-JSON) has no answer: refuse.
        raise _Limit("an object repeats a member name")
    return obj


# Built once: json.loads with hooks would build a decoder per call.
_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant, object_pairs_hook=_parse_object
)


def parse_json(value: bytes) -> Any:
    """UTF-8 JSON within the number limits (ints ±(2^53 − 1), finite), no repeated member names.
    Raises UnreadableRecord when the bytes are not UTF-8 JSON, _Limit when they break a limit;
    RecursionError (nesting beyond the parser's stack) is the caller's to name."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableRecord(f"record value is not UTF-8: {exc}") from exc
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise UnreadableRecord(f"record value is not JSON: {exc}") from exc


def _head(text: str, n: int = 24) -> str:
    return text if len(text) <= n else f"{text[:n]}… ({len(text)} characters)"


def _text_problem(text: str, limit: int) -> str | None:
    """Why a string cannot be stored and signed as it is, or None."""
    if len(text) > limit:
        return f"is {len(text)} characters long (limit {limit})"
    if "\x00" in text:
        return "contains U+0000"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (a lone surrogate)"
    return None


def _within_limits(data: dict[str, Any]) -> bool:
    """The fast pass over every event: no paths built. Iterative: depth is what it checks."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > MAX_DEPTH:
                return False
            for name, item in node.items():
                if not _plain(name):
                    return False
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
                elif isinstance(item, str) and not _plain(item):
                    return False
        elif isinstance(node, list):
            if depth > MAX_DEPTH:
                return False
            for item in node:
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
                elif isinstance(item, str) and not _plain(item):
                    return False
    return True


def _plain(text: str) -> bool:
    return (
        len(text) <= MAX_STRING_CHARS
        and "\x00" not in text
        and (text.isascii() or _text_problem(text, MAX_STRING_CHARS) is None)
    )


def _data_problem(data: dict[str, Any]) -> str | None:
    """The first way `data` breaks the limits, or None; the message names where."""
    if _within_limits(data):
        return None
    stack: list[tuple[Any, int, str]] = [(data, 1, "data")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                return f"data is nested deeper than {MAX_DEPTH} levels"
            if isinstance(node, dict):
                for name, item in node.items():
                    if why := _text_problem(name, MAX_STRING_CHARS):
                        return f"a member name in {where} {why}"
                    stack.append((item, depth + 1, f"{where}.{_head(name)}"))
            else:
                stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(node))
        elif isinstance(node, str) and (why := _text_problem(node, MAX_STRING_CHARS)):
            return f"{where} {why}"
    return None


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


def _time_problem(text: str) -> str | None:
    upper = text.upper()
    if not _RFC3339.match(upper):
        return f"ce_time {_head(text)!r} is not an RFC 3339 time"
    try:
        # fromisoformat (3.11) takes at most microseconds: cut nanoseconds, the year is what counts.
        moment = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", upper.replace("Z", "+00:00")))
    except ValueError:
        return f"ce_time {_head(text)!r} is not an RFC 3339 time"
    if not EARLIEST_YEAR <= moment.year <= LATEST_YEAR:
        return f"ce_time {_head(text)!r} is not between the years {EARLIEST_YEAR} and {LATEST_YEAR}"
    return None


def _envelope_problem(attrs: dict[str, str], names: list[str], key: bytes | None) -> str | None:
    """The first way the attributes or the key break the limits (identity is checked before)."""
    for name in names:
        if len(name) > MAX_TYPE_CHARS:
            return f"header name {_head(name)!r} is {len(name)} characters long (limit {MAX_TYPE_CHARS})"
    limits = {"type": MAX_TYPE_CHARS, "subject": MAX_SUBJECT_CHARS}
    for name, text in attrs.items():
        if why := _text_problem(text, limits.get(name, MAX_ATTRIBUTE_CHARS)):
            return f"{'content-type' if name == 'datacontenttype' else 'ce_' + name} {why}"
    if key is not None and len(key) > MAX_SUBJECT_CHARS:
        return f"the record key is {len(key)} bytes long (limit {MAX_SUBJECT_CHARS})"
    if "time" in attrs:
        return _time_problem(attrs["time"])
    return None


def _name(raw: Any) -> str:
    """A header name as text; bytes that are not UTF-8 stay visible as surrogate escapes."""
    if isinstance(raw, str):
        return raw
    return bytes(raw).decode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """Text safe to serialise anywhere (no lone surrogates): undecodable bytes as \\xNN."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (a JSON "\\ud800")
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Received:
    """A record read as an event. `problem` says how it breaks the contract's limits (the event is
    then rejected SCHEMA_INVALID, unsigned-checked, and `event.data` is empty)."""

    event: CloudEvent
    value_sha256: str
    value_length: int
    problem: str | None = None

    def summary(self) -> dict[str, Any]:
        """What a decision records of an event whose data cannot be recorded: its attributes (cut to
        fit) and the SHA-256 of the record value, which identifies the bytes without holding them."""
        attrs = {fit(k, MAX_TYPE_CHARS): fit(v, MAX_SUBJECT_CHARS) for k, v in self.event.attributes().items()}
        if self.event.signature:
            attrs["signature"] = fit(self.event.signature, MAX_SUBJECT_CHARS)
        return {**attrs, "data_sha256": self.value_sha256, "data_length": self.value_length}


def read_record(
    value: bytes | None,
    headers: Iterable[tuple[Any, bytes | None]] | Mapping[str, bytes],
    key: bytes | None = None,
    *,
    limits: bool = True,
) -> Received:
    """Read a binary-mode record. Total: raises only UnreadableRecord (a record with no usable
    envelope: no identity to answer to), naming what is missing or broken. `limits=False` (records
    of our own services) skips the attribute, key and nesting limits but still parses safely."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    attrs: dict[str, str] = {}
    names: list[str] = []
    trace: dict[str, str] = {}
    content_type: str | None = None
    for raw_name, raw in items:
        # The usual case first (a str name, bytes value, both ASCII): no copy, no escaping.
        name = raw_name if type(raw_name) is str else _name(raw_name)
        if not name.isascii() and printable(name) != name:
            raise UnreadableRecord(f"header name '{printable(name)}' is not UTF-8")
        try:
            text = raw.decode() if type(raw) is bytes else bytes(raw or b"").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnreadableRecord(f"header '{printable(name)}' is not UTF-8") from exc
        lname = name.lower()
        if lname.startswith(CE_PREFIX) or lname == "content-type":
            attr = "datacontenttype" if lname == "content-type" else lname[len(CE_PREFIX) :]
            if attr in attrs or (attr == "datacontenttype" and content_type is not None):
                # Two values for one attribute: which was signed is anyone's guess.
                raise UnreadableRecord(f"header '{printable(name)}' appears more than once")
            names.append(name)
            if attr == "datacontenttype":
                content_type = text
            else:
                attrs[attr] = text
        elif lname in TRACE_HEADERS and lname not in trace and len(text) <= 512:
            trace[lname] = text  # W3C caps tracestate at 512; a longer one is dropped, not copied on
    missing = [f"ce_{a}" for a in REQUIRED if not attrs.get(a)]
    if missing:
        raise UnreadableRecord(f"missing CloudEvents header(s): {', '.join(missing)}")
    if attrs["specversion"] != "1.0":
        raise UnreadableRecord(f"unsupported ce_specversion {_head(attrs['specversion'])!r} (expected 1.0)")
    for attr in ("id", "source"):
        if why := _text_problem(attrs[attr], MAX_ID_CHARS):
            raise UnreadableRecord(f"ce_{attr} {why}: the event has no identity an outcome could name")
    if value is None:
        raise UnreadableRecord("record has no value (expected the event's JSON data)")
    digest, length = hashlib.sha256(value).hexdigest(), len(value)
    problem: str | None = None
    data: Any = {}
    try:
        data = parse_json(value)
    except _Limit as exc:
        problem = str(exc)
    except RecursionError:
        problem = f"data is nested deeper than {MAX_DEPTH} levels"
    except ValueError as exc:  # the parser's own limits, should a hook not see them first
        problem = f"data is out of bounds: {_head(str(exc), 200)}"
    if problem is None:
        if not isinstance(data, dict):
            raise UnreadableRecord("record value is JSON but not an object")
        if limits:
            problem = _data_problem(data) or _envelope_problem(attrs, names, key)
    known = {"specversion", "id", "source", "type", "subject", "time", "signature"}
    event = CloudEvent(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        data=data if problem is None else {},
        subject=attrs.get("subject"),
        time=attrs.get("time"),
        specversion=attrs["specversion"],
        datacontenttype=content_type,
        signature=attrs.get("signature"),
        extensions={k: v for k, v in attrs.items() if k not in known},
        trace=trace,
    )
    if not limits and problem is None:
        # A record of our own services: `verify` may check the signature over these bytes first.
        event.__dict__["_raw_data"] = bytes(value)
    return Received(event, digest, length, problem)


def from_record(value: bytes | None, headers: Iterable[tuple[Any, bytes | None]] | Mapping[str, bytes]) -> CloudEvent:
    """Read a binary-mode record strictly: UnreadableRecord also for one that breaks a limit."""
    received = read_record(value, headers)
    if received.problem is not None:
        raise UnreadableRecord(received.problem)
    return received.event
