"""A hostile partner, through real Kafka against the running services: every record gets exactly
one outcome (status and reason code as the contract says) or exactly one dead letter (with its
reason), the good event sent after each on the same partition is accepted, every outcome's
decision is in the ledger, no service restarted, and every consumer group ends at lag 0.

All records are published first and the test waits once (much faster than case by case). Then
hypothesis mutates a valid event of every type (bounded, derandomised): the same rules hold.
Outcomes, decisions and letters are read raw with isolation_level=read_committed (tests.chaos).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiokafka.producer.message_accumulator as accumulator
import aiokafka.producer.producer as producer_module
import psycopg
import pytest
import rfc8785
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.chaos import Lag, RawTally, audit_verify
from tests.partner import now, topic_for
from tools.devstack import Stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

PLEDGES = "partner.pledges.v1"
PROCUREMENT = "partner.procurement.v1"

# --- building records by hand -----------------------------------------------------------------


class RawName(str):
    """A header name sent as these bytes (Kafka allows any; aiokafka's API takes text and its
    Python batch builder calls .encode() on it, which this answers with the raw bytes)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("utf-8", "replace"))
        name.raw = raw
        return name

    def encode(self, *_: Any, **__: Any) -> bytes:  # type: ignore[override]
        return self.raw


@dataclass
class Rec:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    event_id: str


class Forge:
    """Signed CloudEvents (binary mode) built field by field, so any part can be broken: the
    signature covers exactly the attributes sent, as the contract says (§4)."""

    def __init__(self, keys_dir: Path) -> None:
        self._dir = keys_dir
        self._keys: dict[str, Ed25519PrivateKey] = {}

    def private(self, party: str) -> Ed25519PrivateKey:
        if party not in self._keys:
            key = serialization.load_pem_private_key((self._dir / f"{party}.key").read_bytes(), None)
            assert isinstance(key, Ed25519PrivateKey)
            self._keys[party] = key
        return self._keys[party]

    def record(
        self,
        party: str,
        short_type: str,
        data: Any,
        *,
        event_id: str,
        key: str | bytes | None = None,
        subject: str | None = None,
        topic: str | None = None,
        type_: str | None = None,
        time: str | None = None,
        specversion: str = "1.0",
        source: str | None = None,
        sign_as: str | None = None,
        omit: tuple[str, ...] = (),
        value: bytes | None = None,
    ) -> Rec:
        aggregate = data.get("pledge_id") or data.get("batch_id") if isinstance(data, dict) else None
        subject = subject if subject is not None else str(aggregate)
        attrs = {
            "specversion": specversion,
            "id": event_id,
            "source": source or f"urn:gputrace:party:{party}",
            "type": type_ or f"gputrace.{short_type}",
            "time": time or now(),
            "subject": subject,
            "datacontenttype": "application/json",
        }
        sent = {
            k: v
            for k, v in attrs.items()
            if f"ce_{k}" not in omit and not (k == "datacontenttype" and "content-type" in omit)
        }
        try:
            signing_input = rfc8785.dumps({**sent, "data": data})
            signature = base64.b64encode(self.private(sign_as or party).sign(signing_input)).decode()
        except Exception:  # not signable (beyond I-JSON): any signature will do, it is refused first
            signature = base64.b64encode(os.urandom(64)).decode()
        headers = [(f"ce_{k}", v.encode()) for k, v in sent.items() if k != "datacontenttype"]
        if "datacontenttype" in sent:
            headers.append(("content-type", b"application/json"))
        if "ce_signature" not in omit:
            headers.append(("ce_signature", signature.encode()))
        if key is None:
            key = subject
        return Rec(
            topic=topic or topic_for(short_type),
            key=key.encode() if isinstance(key, str) else key,
            value=value if value is not None else json.dumps(data).encode(),
            headers=headers,
            event_id=event_id,
        )


def replaced(rec: Rec, name: str, value: bytes) -> Rec:
    return Rec(rec.topic, rec.key, rec.value, [(k, value if k == name else v) for k, v in rec.headers], rec.event_id)


def plus(rec: Rec, *extra: tuple[str, bytes]) -> Rec:
    return Rec(rec.topic, rec.key, rec.value, [*rec.headers, *extra], rec.event_id)


# --- valid events of every type ---------------------------------------------------------------

SENDER = {
    "pledge": "kdb",
    "batch.requested": "nipa",
    "quote.awarded": "nipa",
    "quote": "nvidia-partner-kr",
    "license": "bis-liaison",
    "shipment.received": "haenam-site",
    "shipment": "korea-logistics",
    "batch": "haenam-site",
}


def sender(short_type: str) -> str:
    return next(party for prefix, party in SENDER.items() if short_type.startswith(prefix))


def pledge(pid: str, amount: str = "10", **extra: Any) -> dict[str, Any]:
    return {
        "pledge_id": pid,
        "partner_id": "kdb",
        "program_id": "hostile",
        "kind": "capital",
        "capital": {"amount": amount, "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
        **extra,
    }


def valid(short_type: str, agg: str) -> dict[str, Any]:
    """A schema-valid event of each type about aggregate `agg` (the domain may still refuse it)."""
    center = {"name": "National AI Computing Center", "country": "KR"}
    at = "2025-07-01T00:00:00Z"
    return {
        "pledge.committed.v1": pledge(agg),
        "pledge.amended.v1": {"pledge_id": agg, "partner_id": "kdb", "due_by": "2026-01-31", "reason": "r"},
        "pledge.withdrawn.v1": {"pledge_id": agg, "partner_id": "kdb", "reason": "r"},
        "pledge.disbursed.v1": {
            "pledge_id": agg,
            "partner_id": "kdb",
            "amount": {"amount": "1", "currency": "KRW"},
            "reference": "R",
        },
        "batch.requested.v1": {
            "batch_id": agg,
            "program_id": "hostile",
            "model": "B200",
            "quantity": 8,
            "site_id": "haenam-1",
            "needed_by": "2025-12-31",
        },
        "quote.submitted.v1": {
            "quote_id": f"{agg}-Q",
            "batch_id": agg,
            "vendor_id": "nvidia-partner-kr",
            "model": "B200",
            "quantity": 8,
            "unit_price": {"amount": "50000000", "currency": "KRW"},
            "valid_until": "2025-09-30",
            "lead_time_days": 60,
            "origin_country": "US",
            "route": ["JP"],
            "consignee": center,
            "end_user": {**center, "headquarters_country": "KR"},
        },
        "quote.withdrawn.v1": {
            "quote_id": f"{agg}-Q",
            "batch_id": agg,
            "vendor_id": "nvidia-partner-kr",
            "reason": "r",
        },
        "quote.awarded.v1": {"batch_id": agg, "quote_id": f"{agg}-Q", "awarded_at": "2025-06-02T10:00:00Z"},
        "license.granted.v1": {"batch_id": agg, "license_number": "L-1", "quantity": 8, "valid_until": "2026-06-30"},
        "license.denied.v1": {"batch_id": agg, "reason": "r"},
        "shipment.dispatched.v1": {
            "shipment_id": f"{agg}-S",
            "batch_id": agg,
            "carrier": "KAL Cargo",
            "serials": [f"{agg}-SN1"],
            "origin_country": "US",
            "route": ["JP"],
            "dispatched_at": at,
        },
        "shipment.cleared.v1": {
            "shipment_id": f"{agg}-S",
            "batch_id": agg,
            "declaration_number": "D-1",
            "cleared_at": at,
        },
        "shipment.received.v1": {
            "shipment_id": f"{agg}-S",
            "batch_id": agg,
            "site_id": "haenam-1",
            "received_serials": [f"{agg}-SN1"],
            "received_at": at,
        },
        "batch.installed.v1": {
            "batch_id": agg,
            "site_id": "haenam-1",
            "placements": [{"serial": f"{agg}-SN1", "rack": "R1", "slot": 1}],
            "installed_at": at,
        },
        "batch.accepted.v1": {
            "batch_id": agg,
            "passed_serials": [f"{agg}-SN1"],
            "accepted_at": at,
            "report_uri": "https://example.org/r",
        },
    }[short_type]


TYPES = [
    "pledge.committed.v1",
    "pledge.amended.v1",
    "pledge.withdrawn.v1",
    "pledge.disbursed.v1",
    "batch.requested.v1",
    "quote.submitted.v1",
    "quote.withdrawn.v1",
    "quote.awarded.v1",
    "license.granted.v1",
    "license.denied.v1",
    "shipment.dispatched.v1",
    "shipment.cleared.v1",
    "shipment.received.v1",
    "batch.installed.v1",
    "batch.accepted.v1",
]


# --- expectations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str | None = None
    message: str = ""  # a part of the message, when it matters


@dataclass(frozen=True)
class Letter:
    reason: str  # a part of the dead letter's reason (case-insensitive)


@dataclass(frozen=True)
class Refused:
    """The broker (or the client, for the broker's limit) refuses the record at produce time."""


@dataclass(frozen=True)
class Either:
    """Exactly one outcome or exactly one dead letter, whichever (hypothesis' mutations)."""


Expect = Outcome | Letter | Refused | Either


@dataclass
class Case:
    name: str
    records: list[Rec]  # sent in order; the last is the one judged
    expect: tuple[Expect, ...]  # acceptable answers
    good: Rec | None = None  # sent right after, same partition where possible: must be accepted
    ledger_has: str | None = None  # a text the ledger entry of the outcome's decision must contain
    refused: bool = False  # set when the broker refused the last record


# --- the corpus -------------------------------------------------------------------------------


def corpus(f: Forge, tag: str) -> list[Case]:
    cases: list[Case] = []
    n = 0

    def eid() -> str:
        nonlocal n
        n += 1
        return f"{tag}-e{n}"

    def case(name: str, build: Any, *expect: Expect, follow: str = "commit", **kw: Any) -> None:
        """`build(pid)` gives the record(s) about pledge (or batch) `pid`, keyed `pid`; a good event
        on the same key (so the same partition) follows: a new pledge `pid`, or, where the hostile
        record was accepted, an amendment of it; a batch request on the procurement topic."""
        pid = f"{tag}-{name}"
        built = build(pid)
        records = built if isinstance(built, list) else [built]
        if records[-1].topic == PROCUREMENT:
            good = f.record("nipa", "batch.requested.v1", valid("batch.requested.v1", pid), event_id=eid(), key=pid)
        elif follow == "amend":
            good = f.record("kdb", "pledge.amended.v1", valid("pledge.amended.v1", pid), event_id=eid(), key=pid)
        else:
            good = f.record("kdb", "pledge.committed.v1", pledge(pid), event_id=eid(), key=pid)
        cases.append(Case(name, records, expect, good, **kw))

    def commit(pid: str, data: dict[str, Any] | None = None, **kw: Any) -> Rec:
        kw.setdefault("event_id", eid())
        kw.setdefault("key", pid)
        return f.record("kdb", "pledge.committed.v1", data or pledge(pid), **kw)

    def header(rec: Rec, name: str) -> tuple[str, bytes]:
        return next((k, v) for k, v in rec.headers if k == name)

    schema = Outcome("rejected", "SCHEMA_INVALID")

    # Parsing and numbers.
    deep = b'{"pledge_id": "p", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    case("deep-nesting", lambda p: commit(p, value=deep), Outcome("rejected", "SCHEMA_INVALID", "nested"))
    big = b'{"pledge_id": "p", "n": ' + b"9" * 5000 + b"}"
    case("5000-digit-int", lambda p: commit(p, value=big), Outcome("rejected", "SCHEMA_INVALID", "2^53"))
    gpus = {"kind": "gpus", "capital": None}
    case(
        "2^53+1",
        lambda p: commit(p, {**pledge(p), **gpus, "gpus": {"model": "B200", "quantity": 2**53 + 1}}),
        Outcome("rejected", "SCHEMA_INVALID", "2^53"),
    )
    case("nan", lambda p: commit(p, value=b'{"pledge_id": "p", "n": NaN}'), schema)
    case("repeated-member", lambda p: commit(p, value=b'{"pledge_id": "a", "pledge_id": "b"}'), schema)
    case("value-not-utf8", lambda p: commit(p, value=b'{"pledge_id": "\xff\xfe"}'), Letter("not UTF-8"))
    case("value-not-json", lambda p: commit(p, value=b'{"pledge_id": oops'), Letter("not JSON"))
    case("value-not-object", lambda p: commit(p, value=b"[1, 2, 3]"), Letter("not an object"))
    case("value-missing", lambda p: Rec(PLEDGES, p.encode(), None, commit(p).headers, "-"), Letter("no value"))

    # Headers: names and values that are not UTF-8, every one missing, every one twice.
    case("header-name-not-utf8", lambda p: plus(commit(p), (RawName(b"ce_\xff\xfe"), b"x")), Letter("not UTF-8"))
    case("header-value-not-utf8", lambda p: replaced(commit(p), "ce_subject", b"\xff\xfe\xfd"), Letter("not UTF-8"))
    for name in ("ce_specversion", "ce_id", "ce_source", "ce_type"):
        case(f"missing-{name}", lambda p, h=name: commit(p, omit=(h,)), Letter("missing"))
    case("missing-ce_signature", lambda p: commit(p, omit=("ce_signature",)), Outcome("rejected", "SIGNATURE_INVALID"))
    for name in ("ce_time", "ce_subject", "content-type"):
        # Optional: signed without it, the event is whole.
        case(f"missing-{name}", lambda p, h=name: commit(p, omit=(h,)), Outcome("accepted"), follow="amend")
    for name in ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_time", "content-type"):
        case(f"twice-{name}", lambda p, h=name: plus(r := commit(p), header(r, h)), Letter("more than once"))
    case("twice-ce_signature", lambda p: plus(r := commit(p), header(r, "ce_signature")), Letter("more than once"))
    trace = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    case(
        "twice-traceparent",  # not signed, not an attribute: the first one is used
        lambda p: plus(commit(p), ("traceparent", trace), ("traceparent", b"x")),
        Outcome("accepted"),
        follow="amend",
    )
    case("specversion-0.3", lambda p: commit(p, specversion="0.3"), Letter("specversion"))

    # Oversized: 900 KB is a readable record beyond the string limit; 2 MB is beyond the broker's.
    def withdrawal(p: str, size: int) -> Rec:
        data = {"pledge_id": p, "partner_id": "kdb", "reason": "r" * size}
        return f.record("kdb", "pledge.withdrawn.v1", data, event_id=eid(), key=p)

    case("900KB", lambda p: withdrawal(p, 900_000), Outcome("rejected", "SCHEMA_INVALID", "characters long"))
    # Its dead letter must still fit in one Kafka record.
    case("900KB-bad-header", lambda p: plus(withdrawal(p, 900_000), ("ce_x", b"\xff")), Letter("not UTF-8"))
    # Refused by the broker (topics take 1 MiB); should a topic ever allow it, it is still judged.
    case("2MB", lambda p: withdrawal(p, 2_000_000), Refused(), schema)

    # 300 characters where the contract allows fewer.
    long = "x" * 300
    case("300-ce_id", lambda p: commit(p, event_id=f"{tag}-{long}"), Letter("ce_id"))
    case("300-ce_source", lambda p: commit(p, source=f"urn:gputrace:party:{long}"), Letter("ce_source"))
    case("300-ce_type", lambda p: commit(p, type_=f"gputrace.{long}"), Outcome("rejected", "SCHEMA_INVALID", "ce_type"))
    case("300-ce_subject-and-key", lambda p: commit(p, subject=long, key=long), schema)
    case("300-pledge_id", lambda p: commit(p, pledge(f"{p}-{long}"), subject=f"{p}-{long}"), schema)

    # Identity, authority, routing.
    case("unknown-type", lambda p: commit(p, type_="gputrace.pledge.exploded.v1"), Outcome("rejected", "UNKNOWN_TYPE"))
    case("wrong-topic", lambda p: commit(p, topic=PROCUREMENT), Outcome("rejected", "WRONG_TOPIC"))
    case(
        "bad-signature",
        lambda p: replaced(commit(p), "ce_signature", base64.b64encode(os.urandom(64))),
        Outcome("rejected", "SIGNATURE_INVALID"),
    )
    case(
        "signature-not-base64",
        lambda p: replaced(commit(p), "ce_signature", b"!!not base64!!"),
        Outcome("rejected", "SIGNATURE_INVALID"),
    )
    case("signed-by-another-party", lambda p: commit(p, sign_as="kakao"), Outcome("rejected", "SIGNATURE_INVALID"))
    case(
        "speaks-for-another-party",  # kakao, signing as kakao, commits a pledge in kdb's name
        lambda p: f.record("kakao", "pledge.committed.v1", pledge(p), event_id=eid(), key=p),
        Outcome("rejected", "NOT_AUTHORIZED"),
    )
    case(
        "unknown-party",
        lambda p: commit(p, source="urn:gputrace:party:nobody-inc"),
        Outcome("rejected", "UNKNOWN_PARTY"),
    )
    case(
        "role-not-held",  # a partner requesting a batch (the programme office's role)
        lambda p: f.record("kdb", "batch.requested.v1", valid("batch.requested.v1", p), event_id=eid(), key=p),
        Outcome("rejected", "NOT_AUTHORIZED"),
    )
    case("exact-replay", lambda p: [r := commit(p), r], Outcome("accepted"), follow="amend")

    def same_id_new_content(p: str) -> list[Rec]:
        event_id = eid()
        first = f.record("kdb", "pledge.committed.v1", pledge(p, amount="11"), event_id=event_id, key=p)
        second = f.record("kdb", "pledge.committed.v1", pledge(p, amount="999"), event_id=event_id, key=p)
        return [first, second]

    # One outcome, the first content's: a second (source, id) is a redelivery, not a new event.
    case("same-id-new-content", same_id_new_content, Outcome("accepted"), follow="amend", ledger_has='"amount":"11"')
    case("subject-not-data", lambda p: commit(p, subject=f"{p}-other"), Outcome("rejected", "SUBJECT_MISMATCH"))
    # The key is not signed but places the record (its partition, so the replica deciding it): an
    # event keyed otherwise than its aggregate is refused (tests/test_key_mismatch_e2e.py).
    case("key-not-subject", lambda p: commit(p, pledge(f"{p}-x")), Outcome("rejected", "KEY_MISMATCH"))

    # Contract values.
    case("year-9999", lambda p: commit(p, pledge(p, committed_at="9999-01-01T00:00:00Z")), schema)
    case("ce_time-9999", lambda p: commit(p, time="9999-01-01T00:00:00Z"), schema)
    case("year-1900", lambda p: commit(p, pledge(p, due_by="1900-01-01")), schema)
    case("negative-amount", lambda p: commit(p, pledge(p, amount="-5")), Outcome("rejected", "AMOUNT_NOT_POSITIVE"))
    case("zero-amount", lambda p: commit(p, pledge(p, amount="0")), Outcome("rejected", "AMOUNT_NOT_POSITIVE"))
    case(
        "negative-gpus",
        lambda p: commit(p, {**pledge(p), **gpus, "gpus": {"model": "B200", "quantity": -8}}),
        Outcome("rejected", "AMOUNT_NOT_POSITIVE"),
    )
    case(
        "zero-batch-quantity",
        lambda p: f.record(
            "nipa", "batch.requested.v1", {**valid("batch.requested.v1", p), "quantity": 0}, event_id=eid(), key=p
        ),
        Outcome("rejected", "AMOUNT_NOT_POSITIVE"),
    )
    case(
        "unknown-currency",
        lambda p: commit(p, {**pledge(p), "capital": {"amount": "5", "currency": "XXX"}}),
        Outcome("rejected", "CURRENCY_UNKNOWN"),
    )
    return cases


# --- hypothesis: mutations of every event type --------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutation(draw: st.DrawFn, short_type: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid event's data with one to three fields changed, dropped or added, and how its
    envelope is treated (signed as sent, or a header changed after signing)."""
    data = valid(short_type, "AGG")
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "drop", "add", "nest"]))
        name = draw(st.sampled_from(sorted(data))) if data else "x"
        if kind == "set":
            data[name] = draw(JSON)
        elif kind == "drop":
            data.pop(name, None)
        elif kind == "add":
            data[draw(st.text(min_size=1, max_size=12))] = draw(JSON)
        else:
            data[name] = {"v": data.get(name)}
    envelope = draw(
        st.sampled_from(["signed", "signed", "signed", "tampered-header", "no-time", "odd-time"])
        | st.builds(lambda t: f"time:{t}", st.text(max_size=20))
    )
    return data, {"envelope": envelope}


def mutated_records(f: Forge, tag: str, examples: int) -> list[tuple[str, Rec]]:
    """`examples` hypothesis-generated mutations per event type, each with its own key."""
    out: list[tuple[str, Rec]] = []
    for short_type in TYPES:
        collect_mutants(f, tag, short_type, examples, out)
    return out


def collect_mutants(f: Forge, tag: str, short_type: str, examples: int, out: list[tuple[str, Rec]]) -> None:
    """Runs hypothesis' generation for one type; each example becomes a record in `out`."""
    party = sender(short_type)

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(mutation(short_type))
    def collect(drawn: tuple[dict[str, Any], dict[str, Any]]) -> None:
        data, how = drawn
        key = f"{tag}-h{len(out)}"
        for name in ("pledge_id", "batch_id"):
            if data.get(name) == "AGG":
                data[name] = key
        envelope = how["envelope"]
        kw: dict[str, Any] = {"event_id": key, "key": key, "subject": key}
        if envelope == "no-time":
            kw["omit"] = ("ce_time",)
        elif envelope == "odd-time":
            kw["time"] = "2025-13-45T99:99:99Z"
        elif envelope.startswith("time:"):
            kw["time"] = envelope[5:] or "x"
        rec = f.record(party, short_type, data, **kw)
        if envelope == "tampered-header":
            rec = replaced(rec, "ce_time", b"2025-01-01T00:00:00Z")
        out.append((f"{short_type}#{len(out)}", rec))

    collect()


# --- the test ---------------------------------------------------------------------------------


@dataclass
class Results:
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


def letters_for(tally: RawTally, rec: Rec) -> list[dict[str, Any]]:
    key = base64.b64encode(rec.key or b"").decode()
    return [d for d in tally.letters if d.get("topic") == rec.topic and (d.get("key_b64") or "") == key and key]


def ledger_entries(url: str, decision_ids: list[str]) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT decision_id, entry FROM log_entries WHERE decision_id = ANY(%s)", (decision_ids,)
        ).fetchall()
    return dict(rows)


async def test_a_hostile_corpus_and_mutations_of_every_type_are_answered_once_and_nothing_stops(
    kafka_bootstrap: str,
    keys_dir: Path,
    stack: Stack,
    tokens: dict[str, str],
    database_urls: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    pids = {name: p.proc.pid for name, p in stack.processes.items() if p.proc and p.running}
    tag = f"hx{uuid.uuid4().hex[:8]}"
    forge = Forge(keys_dir)
    cases = corpus(forge, tag)
    # Generated in a thread (hypothesis takes seconds) while the corpus is published.
    generating = asyncio.create_task(asyncio.to_thread(mutated_records, forge, tag, 10))
    # A producer that can write header names that are not UTF-8 (test side only); and one without
    # idempotence that takes records up to 3 MB, so the broker, not the client, judges the 2 MB
    # one (a refused record would leave a gap in an idempotent producer's sequence).
    monkeypatch.setattr(accumulator, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    monkeypatch.setattr(producer_module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    large = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=3 * 1024 * 1024)
    prefix = stack.base_env["CONSUMER_GROUP_PREFIX"]
    async with RawTally(kafka_bootstrap, tag) as tally, Lag(kafka_bootstrap, prefix) as lag:
        await producer.start()
        await large.start()
        try:
            for c in cases:
                for rec in c.records:
                    if len(rec.value or b"") < 1_000_000:
                        await producer.send_and_wait(rec.topic, rec.value, key=rec.key, headers=rec.headers)
                        continue
                    try:
                        await large.send_and_wait(rec.topic, rec.value, key=rec.key, headers=rec.headers)
                    except KafkaError as exc:
                        c.refused = True
                        print(f"{c.name}: refused at produce time: {type(exc).__name__}")
                if c.good:
                    await producer.send_and_wait(c.good.topic, c.good.value, key=c.good.key, headers=c.good.headers)
            mutants = await generating
            for _, rec in mutants:
                await producer.send_and_wait(rec.topic, rec.value, key=rec.key, headers=rec.headers)
        finally:
            await producer.stop()
            await large.stop()

        goods = [c.good.event_id for c in cases if c.good]
        await tally.wait(lambda: all(g in tally.outcomes for g in goods), 120)
        # Every consumer group has read everything, then a moment for what it publishes.
        lags = await lag.wait_zero(90)
        await asyncio.sleep(3)

    r = Results()
    for c in cases:
        if c.good:
            got = tally.outcomes.get(c.good.event_id, [])
            r.check(
                [(o["status"], o["reason_code"]) for o in got] == [("accepted", None)],
                f"{c.name}: the good event after it got {[(o['status'], o['reason_code'], o['message']) for o in got]}",
            )
        judged(r, c.name, c.records[-1], c.expect, c.refused, tally)
    for name, rec in mutants:
        judged(r, name, rec, (Either(),), False, tally)

    # Every decision behind an outcome is in the ledger (rejections of what cannot be signed too).
    wanted = {docs[0]["decision_id"]: e for e, docs in tally.outcomes.items()}
    deadline = asyncio.get_running_loop().time() + 60
    entries: dict[str, str] = {}
    while True:
        entries = await asyncio.to_thread(ledger_entries, database_urls["ledger"], list(wanted))
        if len(entries) == len(wanted) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    missing = [wanted[d] for d in wanted if d not in entries]
    r.check(not missing, f"{len(missing)} decisions not in the ledger, events: {missing[:10]}")
    for c in cases:
        docs = tally.outcomes.get(c.records[-1].event_id)
        if c.ledger_has and docs:
            entry = entries.get(docs[0]["decision_id"], "")
            r.check(c.ledger_has in entry, f"{c.name}: ledger entry lacks {c.ledger_has}: {entry[:300]}")
    for d, copies in tally.decisions.items():
        r.check(len(copies) == 1, f"decision {d} is {len(copies)} records on its topic")

    now_pids = {name: p.proc.pid for name, p in stack.processes.items() if p.proc and p.running}
    r.check(now_pids == pids, f"services restarted or died: {pids} -> {now_pids}")
    r.check(not any(lags.values()), f"consumer groups not at lag 0: {lags}")
    # What the hostile records left in the ledger must still verify for an auditor.
    done = await asyncio.to_thread(audit_verify, stack.api_url, tokens["auditor"], keys_dir, tmp_path / "audit.json")
    r.check(done.returncode == 0, f"audit verify exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    assert not r.failures, f"{len(r.failures)} failures:\n" + "\n".join(r.failures)


def judged(r: Results, name: str, rec: Rec, expect: tuple[Expect, ...], refused: bool, tally: RawTally) -> None:
    """One case: what it got must be one of the acceptable answers, exactly once."""
    outcomes = tally.outcomes.get(rec.event_id, []) if rec.event_id.startswith(tally.tag) else []
    letters = letters_for(tally, rec)
    got = (
        [f"outcome {o['status']} {o['reason_code']}: {o['message'][:120]}" for o in outcomes]
        + [f"letter: {d['reason'][:160]}" for d in letters]
        + (["refused at produce time"] if refused else [])
    )
    for e in expect:
        if isinstance(e, Refused) and refused and not outcomes and not letters:
            return
        if isinstance(e, Outcome) and not refused and len(outcomes) == 1 and not letters:
            o = outcomes[0]
            if (o["status"], o["reason_code"]) == (e.status, e.reason) and e.message in o["message"]:
                return
        if isinstance(e, Letter) and not refused and len(letters) == 1 and not outcomes:
            if e.reason.lower() in letters[0]["reason"].lower():
                return
        if isinstance(e, Either) and not refused and len(outcomes) + len(letters) == 1:
            return
    r.check(False, f"{name}: expected one of {expect}, got {got or 'nothing'}")
