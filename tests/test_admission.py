"""Admission cannot throw: reading a record, its limits, dead letters and bounded retries.

Pure: no Kafka. The reader is fed hostile bytes directly; the BatchProcessor runs on a SQLite
file (the embedded store), so a handler that raises is seen decided without a broker. Through
real Kafka: tests/test_poison_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from aiokafka import ConsumerRecord
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.pledges.main import HANDLERS, PledgeRow, prefetch
from shared.contract import (
    DLQ_TOPIC,
    OUTCOMES_TOPIC,
    PLEDGES_TOPIC,
    PledgeCommitted,
    decisions_topic,
    event_type,
    fit,
    service_source,
)
from shared.contract.cloudevents import CloudEvent, UnreadableRecord, read_record
from shared.contract.decisions import DECISION_TYPE, Decision, Verdict
from shared.contract.parties import PartyRegistry, load_private_key
from shared.runtime import kafka_records
from shared.runtime.consumer import (
    LETTER_VALUE_BYTES,
    MAX_TRIES,
    BatchProcessor,
    Emitter,
    Inbound,
    RetryBatch,
    dead_letter,
)
from shared.runtime.db import DeliveryFailure, OutboxMessage, create_tables, make_engine, session_factory, utcnow
from tests.partner import PartnerClient
from tools.devkeys import generate_dev_registry

HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"E-1"),
    ("ce_source", b"urn:gputrace:party:kdb"),
    ("ce_type", b"gputrace.pledge.committed.v1"),
    ("ce_subject", b"P-1"),
    ("ce_time", b"2025-03-01T09:00:00Z"),
    ("content-type", b"application/json"),
]


def with_header(name: str, value: bytes) -> list[tuple[str, bytes]]:
    """HEADERS with `name` replaced (or added)."""
    return [(k, v) for k, v in HEADERS if k != name] + [(name, value)]


def nested(levels: int) -> bytes:
    return b'{"a":' * (levels - 1) + b"{}" + b"}" * (levels - 1)


# --- the reader ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32"),
        (nested(33), "nested deeper than 32"),
        (b'{"n": ' + b"7" * 5000 + b"}", "beyond ±(2^53 − 1)"),
        (b'{"n": 9007199254740992}', "beyond ±(2^53 − 1)"),
        (b'{"n": 9007199254740993}', "beyond ±(2^53 − 1)"),
        (b'{"n": -9007199254740993}', "beyond ±(2^53 − 1)"),
        (b'{"n": 4.977e16}', "beyond ±(2^53 − 1)"),
        (b'{"n": -1e20}', "beyond ±(2^53 − 1)"),
        (b'{"n": NaN}', "NaN is not a JSON number"),
        (b'{"n": 1e400}', "out of range"),
        (b'{"n": 1, "n": 2}', "repeats a member name"),
        (b'{"s": "\\ud800"}', "lone surrogate"),
        (b'{"s": "a\\u0000b"}', "U+0000"),
        (json.dumps({"s": "x" * 10_001}).encode(), "10001 characters long"),
    ],
    ids=[
        "100k-levels",
        "33-levels",
        "5000-digits",
        "2^53",
        "2^53+1",
        "-(2^53+1)",
        "float-4.977e16",
        "float--1e20",
        "nan",
        "1e400",
        "dup",
        "surr",
        "nul",
        "long",
    ],
)
def test_data_beyond_the_limits_is_a_problem_not_an_exception(value: bytes, problem: str) -> None:
    got = read_record(value, HEADERS)
    assert got.problem is not None and problem in got.problem, got.problem
    assert got.event.data == {}
    # What a decision records of it can always be canonicalised (and so appended to the ledger).
    summary = got.summary()
    assert rfc8785.dumps(summary) and summary["data_length"] == len(value)


@pytest.mark.parametrize(
    "value",
    [
        nested(32),
        b'{"n": 9007199254740991, "m": -9007199254740991, "f": 1.5e15, "g": 2.5e-300}',
        b'{"s": "\\u00e9\\ud83d\\ude00"}',
    ],
    ids=["32-levels", "2^53-1", "unicode"],
)
def test_data_within_the_limits_is_read_and_signable(value: bytes) -> None:
    got = read_record(value, HEADERS)
    assert got.problem is None
    assert rfc8785.dumps(got.event.structured())


@pytest.mark.parametrize(
    ("headers", "key", "problem"),
    [
        (with_header("ce_type", b"t" * 300), None, "ce_type is 300 characters long"),
        (with_header("ce_subject", b"s" * 300), None, "ce_subject is 300 characters long"),
        (HEADERS, b"k" * 300, "record key is 300 bytes long"),
        (with_header("ce_time", b"9999-12-31T00:00:00Z"), None, "between the years 2020 and 2100"),
        (with_header("ce_time", b"2019-12-31T23:59:59Z"), None, "between the years 2020 and 2100"),
        (with_header("ce_time", b"yesterday"), None, "not an RFC 3339 time"),
        (with_header("ce_color", b"x" * 1001), None, "ce_color is 1001 characters long"),
    ],
    ids=["type-300", "subject-300", "key-300", "time-9999", "time-2019", "time-junk", "extension-1001"],
)
def test_envelope_beyond_the_limits_is_a_problem(
    headers: list[tuple[str, bytes]], key: bytes | None, problem: str
) -> None:
    got = read_record(b"{}", headers, key)
    assert got.problem is not None and problem in got.problem, got.problem
    assert len(json.dumps(got.summary())) < 2000


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ([*HEADERS, ("ce_\udcff\udcfe", b"1")], b"{}", "header name 'ce_\\xff\\xfe' is not UTF-8"),
        (with_header("ce_subject", b"\xff"), b"{}", "header 'ce_subject' is not UTF-8"),
        (with_header("ce_id", b"i" * 300), b"{}", "ce_id is 300 characters long"),
        (with_header("ce_source", b"s" * 201), b"{}", "ce_source is 201 characters long"),
        (with_header("ce_specversion", b"0.3"), b"{}", "unsupported ce_specversion"),
        ([*HEADERS, ("ce_id", b"E-2")], b"{}", "'ce_id' appears more than once"),
        ([*HEADERS, ("CE_TYPE", b"gputrace.pledge.withdrawn.v1")], b"{}", "'CE_TYPE' appears more than once"),
        ([*HEADERS, ("Content-Type", b"text/plain")], b"{}", "appears more than once"),
        (HEADERS, None, "no value"),
        (HEADERS, b"\xff{}", "not UTF-8"),
        (HEADERS, '{"a": 1}'.encode("utf-16"), "not UTF-8"),
        (HEADERS, b'{"a": oops', "not JSON"),
        (HEADERS, b"[1, 2]", "not an object"),
    ],
    ids=[
        "name-not-utf8",
        "value-not-utf8",
        "id-300",
        "source-201",
        "specversion",
        "dup-id",
        "dup-type-case",
        "dup-content-type",
        "no-value",
        "value-not-utf8",
        "utf16",
        "not-json",
        "array",
    ],
)
def test_unusable_envelopes_are_unreadable(headers: list[tuple[str, bytes]], value: bytes | None, reason: str) -> None:
    with pytest.raises(UnreadableRecord) as caught:
        read_record(value, headers)
    assert reason in str(caught.value), str(caught.value)


@pytest.mark.parametrize("missing", ["ce_specversion", "ce_id", "ce_source", "ce_type"])
def test_each_required_header_missing_is_unreadable(missing: str) -> None:
    with pytest.raises(UnreadableRecord, match=f"missing CloudEvents header.*{missing}"):
        read_record(b"{}", [(k, v) for k, v in HEADERS if k != missing])


def test_dates_in_data_must_be_plausible() -> None:
    base = {
        "pledge_id": "P-1",
        "partner_id": "kdb",
        "program_id": "X",
        "kind": "capital",
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }
    PledgeCommitted.model_validate(base)
    for field, value in [("committed_at", "9999-01-01T00:00:00Z"), ("due_by", "2019-12-31"), ("due_by", 253402300799)]:
        with pytest.raises(ValidationError, match="between the years 2020 and 2100"):
            PledgeCommitted.model_validate({**base, field: value})


def test_fit_keeps_plain_short_text_and_cuts_the_rest_with_a_digest() -> None:
    assert fit("P-1", 200) == "P-1"
    long_a, long_b = "x" * 299 + "a", "x" * 299 + "b"
    assert len(fit(long_a, 200)) == 200 and fit(long_a, 200) != fit(long_b, 200)
    assert fit(long_a, 200) == fit(long_a, 200)
    for dirty in ("a\x00b", "ce_\udcff"):
        cleaned = fit(dirty, 200)
        cleaned.encode("utf-8")  # storable: no lone surrogate
        assert "\x00" not in cleaned and cleaned != dirty


def test_a_dead_letter_always_fits_in_a_kafka_record() -> None:
    big = b"v" * (2 * 1024 * 1024)
    record = ConsumerRecord(
        PLEDGES_TOPIC, 1, 42, 0, 0, b"k" * 5000, big, None, 5000, len(big), [("h\udcff", b"y" * 5000)] * 100
    )
    letter = dead_letter(record, "r" * 100_000, "pledges")
    size = len(json.dumps(letter.model_dump(mode="json"), ensure_ascii=False).encode())
    assert size < 512 * 1024, size
    assert letter.truncated and letter.value_length == len(big) and letter.header_count == 100
    assert letter.headers[0][0] == "h\\xff"
    small = ConsumerRecord(PLEDGES_TOPIC, 1, 43, 0, 0, None, b"{oops", None, -1, 5, [])
    whole = dead_letter(small, "not JSON", "pledges")
    assert whole.value_b64 == "e29vcHM=" and not whole.truncated
    assert LETTER_VALUE_BYTES < 1024 * 1024


# --- aiokafka: a header name that is not UTF-8 ----------------------------------------------


class _RawName(str):
    """A header name whose bytes are given as they are (aiokafka's Python builder calls .encode)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawName:
        name = super().__new__(cls, raw.decode("utf-8", "replace"))
        name.raw = raw
        return name

    def encode(self, *_: Any, **__: Any) -> bytes:  # type: ignore[override]
        return self.raw


def _fetched(*headers: list[tuple[str, bytes]]) -> bytes:
    """The bytes a fetch returns for one v2 batch, built by aiokafka's own (Python) builder."""
    builder = _DefaultRecordBatchBuilderPy(2, 0, 0, -1, -1, -1, 1024 * 1024)
    for offset, hs in enumerate(headers):
        builder.append(offset, timestamp=0, key=None, value=b"{}", headers=hs)
    return bytes(builder.build())


def test_a_batch_with_a_bad_header_name_is_read_leniently_others_as_usual() -> None:
    data = _fetched([("ce_ok", b"1")], [(_RawName(b"ce_\xff"), b"2")], [("ce_ok", b"3")])
    from aiokafka.record.memory_records import MemoryRecords

    plain = MemoryRecords(data).next_batch()
    with pytest.raises(UnicodeDecodeError):  # aiokafka on its own: the partition would be stuck
        list(plain)
    batch = kafka_records.TolerantMemoryRecords(data).next_batch()
    assert batch.validate_crc()
    assert [r.headers for r in batch] == [[("ce_ok", b"1")], [("ce_\udcff", b"2")], [("ce_ok", b"3")]]
    good = kafka_records.TolerantMemoryRecords(_fetched([("ce_ok", b"1")])).next_batch()
    assert [r.offset for r in good] == [0] and good._batch.__class__ is plain.__class__


# --- the processor: bounded retries, INTERNAL_ERROR, outages retried forever ----------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_dev_registry(directory)
    return directory


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[Any]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'pledges.db'}")
    await create_tables(engine, [PledgeRow.__table__])  # type: ignore[list-item]
    yield session_factory(engine)
    await engine.dispose()


def pledge(pledge_id: str) -> dict[str, Any]:
    return {
        "pledge_id": pledge_id,
        "partner_id": "kdb",
        "program_id": "admission",
        "kind": "capital",
        "capital": {"amount": "1000", "currency": "KRW"},
        "committed_at": "2025-03-01T00:00:00Z",
        "due_by": "2025-12-31",
    }


def records(keys: Path, events: Sequence[tuple[str, dict[str, Any]]]) -> list[ConsumerRecord]:
    client = PartnerClient("unused", keys)
    out = []
    for offset, (short_type, data) in enumerate(events):
        key, value, headers, _ = client.record("kdb", short_type, data)
        out.append(ConsumerRecord(PLEDGES_TOPIC, 0, offset, 0, 0, key, value, None, len(key), len(value), headers))
    return out


async def outbox(sessions: Any) -> list[tuple[str, dict[str, Any]]]:
    async with sessions() as session:
        rows = (await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))).scalars().all()
    return [(r.topic, json.loads(r.value)) for r in rows]


def processor(sessions: Any, keys: Path, failing: Any) -> BatchProcessor:
    handlers = {**HANDLERS, event_type("pledge.withdrawn.v1"): failing}
    registry = PartyRegistry.load(keys / "registry.json")
    return BatchProcessor("pledges", sessions, registry=registry, partner_handlers=handlers, prefetch=prefetch)


async def test_a_handler_that_keeps_failing_gets_one_internal_error_one_outcome_one_letter(
    keys: Path, sessions: Any
) -> None:
    async def bug(session: AsyncSession, inbound: Inbound) -> Verdict:
        raise ZeroDivisionError("a bug in the handler")

    batch = records(
        keys,
        [
            ("pledge.committed.v1", pledge("P-before")),
            ("pledge.withdrawn.v1", {"pledge_id": "P-before", "partner_id": "kdb", "reason": "x"}),
            ("pledge.committed.v1", pledge("P-after")),
        ],
    )
    for attempt in range(1, MAX_TRIES):  # redelivered, counted in the database each time
        with pytest.raises(RetryBatch, match=f"{attempt} of {MAX_TRIES}"):
            await processor(sessions, keys, bug).process(batch)
        assert await outbox(sessions) == []
    await processor(sessions, keys, bug).process(batch)
    await processor(sessions, keys, bug).process(batch)  # a redelivery after that: nothing new

    written = await outbox(sessions)
    outcomes = [doc for topic, doc in written if topic == OUTCOMES_TOPIC]
    assert [(o["status"], o["reason_code"]) for o in outcomes] == [
        ("accepted", None),
        ("rejected", "INTERNAL_ERROR"),
        ("accepted", None),
    ]
    decisions = [doc for topic, doc in written if topic.endswith(".decisions.v1")]
    assert [d["reason_code"] for d in decisions] == [None, "INTERNAL_ERROR", None]
    assert "data_sha256" in decisions[1]["event"]  # a summary: the data may be what broke it
    rfc8785.dumps(decisions[1])
    letters = [doc for topic, doc in written if topic == DLQ_TOPIC]
    assert len(letters) == 1 and letters[0]["offset"] == 1
    assert "ZeroDivisionError: a bug in the handler" in letters[0]["reason"]
    async with sessions() as session:
        assert (await session.execute(select(DeliveryFailure))).scalars().all() == []


async def test_an_outage_is_retried_without_limit_and_never_dead_lettered(keys: Path, sessions: Any) -> None:
    async def outage(session: AsyncSession, inbound: Inbound) -> Verdict:
        raise sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("database is away"))

    batch = records(keys, [("pledge.withdrawn.v1", {"pledge_id": "P-x", "partner_id": "kdb", "reason": "x"})])
    for _ in range(MAX_TRIES + 2):
        with pytest.raises(sa_exc.OperationalError):
            await processor(sessions, keys, outage).process(batch)
    assert await outbox(sessions) == []
    async with sessions() as session:
        assert (await session.execute(select(DeliveryFailure))).scalars().all() == []


async def test_hostile_records_in_one_batch_are_each_answered_and_nothing_raises(keys: Path, sessions: Any) -> None:
    good = records(keys, [("pledge.committed.v1", pledge("P-good"))])[0]
    hostile = [
        (HEADERS, b"[" * 100_000 + b"]" * 100_000),
        (HEADERS, b'{"n": ' + b"9" * 5000 + b"}"),
        (HEADERS, b'{"n": 9007199254740993}'),
        (with_header("ce_type", b"t" * 300), b"{}"),
        (with_header("ce_id", b"i" * 300), b"{}"),
        ([*HEADERS, ("ce_\udcff", b"x")], b"{}"),
    ]
    batch = [
        ConsumerRecord(PLEDGES_TOPIC, 0, i, 0, 0, b"P-1", v, None, 3, len(v), [(k, x) for k, x in h])
        for i, (h, v) in enumerate(hostile)
    ]
    batch.append(ConsumerRecord(PLEDGES_TOPIC, 0, len(batch), 0, 0, good.key, good.value, None, 0, 0, good.headers))

    async def unused(session: AsyncSession, inbound: Inbound) -> Verdict:
        raise AssertionError("not called")

    await processor(sessions, keys, unused).process(batch)
    written = await outbox(sessions)
    outcomes = [doc for topic, doc in written if topic == OUTCOMES_TOPIC]
    assert [(o["status"], o["reason_code"]) for o in outcomes] == [("rejected", "SCHEMA_INVALID")] * 4 + [
        ("accepted", None)
    ]
    assert "nested deeper" in outcomes[0]["message"] and "2^53" in outcomes[2]["message"]
    assert len(outcomes[3]["event_type"]) <= 200
    for topic, doc in written:
        if topic.endswith(".decisions.v1"):
            rfc8785.dumps(doc)  # every decision can be appended to the ledger
    letters = [doc for topic, doc in written if topic == DLQ_TOPIC]
    assert sorted(letter["offset"] for letter in letters) == [4, 5]


async def test_a_batch_level_write_that_fails_isolates_its_record_and_lets_the_others_through(
    sessions: Any, keys: Path
) -> None:
    """Like the ledger's bulk append at the end of a batch: the failure belongs to no record's
    handler, so each record is replayed in its own transaction; the guilty one is retried, then
    dead-lettered, and the others are handled once."""
    topic = decisions_topic("pledges")
    handled: list[str] = []

    async def on_decision(session: AsyncSession, event: CloudEvent, decision: Decision, _: Emitter) -> None:
        session.info.setdefault("messages", []).append(decision.message)

    async def after_batch(session: AsyncSession) -> None:
        messages = session.info.pop("messages", [])
        if "poison" in messages:
            raise ValueError("the bulk write refused a row")
        handled.extend(messages)

    def record(offset: int, message: str) -> ConsumerRecord:
        decision = Decision(
            decision_id=f"d-{offset}",
            service="pledges",
            decided_at=utcnow(),
            status="accepted",
            message=message,
            event_type="gputrace.pledge.committed.v1",
        )
        event = CloudEvent(
            id=decision.decision_id,
            source=service_source("pledges"),
            type=DECISION_TYPE,
            data=decision.model_dump(mode="json"),
        ).signed(load_private_key(keys / "pledges.key"))  # only the topic's owner is read
        key, value, headers = event.as_record()
        return ConsumerRecord(topic, 0, offset, 0, 0, key, value, None, 0, len(value), headers)

    batch = [record(0, "first"), record(1, "poison"), record(2, "last")]
    registry = PartyRegistry.load(keys / "registry.json")
    ledger = BatchProcessor(
        "ledger",
        sessions,
        registry=registry,
        internal_handler=on_decision,
        internal_topics=[topic],
        after_batch=after_batch,
    )
    for _ in range(MAX_TRIES - 1):
        with pytest.raises(RetryBatch):
            await ledger.process(batch)
    await ledger.process(batch)
    assert handled == ["first", "last"]  # each once: the first was committed on the first replay
    letters = [doc for t, doc in await outbox(sessions) if t == DLQ_TOPIC]
    assert [(letter["offset"], "ValueError" in letter["reason"]) for letter in letters] == [(1, True)]
