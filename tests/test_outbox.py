"""The outbox relay's progress record: what one Kafka transaction published, small enough for the
broker's offset metadata, and specific enough that a row reusing a published id is never taken
for a published one."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, create_engine, insert, select

from shared.runtime.outbox import PROGRESS_CHARS, RELAY_BATCH, RELAY_BYTES, Progress, _digest, _fit, _ranges

ROWS = Table(
    "outbox",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("topic", String),
    Column("key", LargeBinary),
    Column("value", LargeBinary),
    Column("headers", String),
)


def rows(*specs: tuple[int, bytes]) -> list[Any]:
    """Real SQLAlchemy rows, as the relay selects them."""
    engine = create_engine("sqlite://")
    ROWS.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(ROWS), [{"id": i, "topic": "t", "key": b"k", "value": v, "headers": "[]"} for i, v in specs]
        )
        return list(conn.execute(select(ROWS).order_by(ROWS.c.id)).all())


def test_ranges_compress_consecutive_ids_and_decode_back() -> None:
    assert _ranges([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    assert _ranges([]) == ""
    published = rows((4, b"a"), (5, b"b"), (9, b"c"))
    progress = Progress.of(published)
    assert progress.encode().startswith("v1:") and progress.encode().endswith(":4-5,9")
    assert Progress.decode(progress.encode()) == progress
    assert Progress.decode(None) is None and Progress.decode("") is None and Progress.decode("something else") is None


def test_the_digest_tells_a_reused_id_from_the_row_that_was_published() -> None:
    assert _digest(rows((1, b"decision"))) == _digest(rows((1, b"decision")))
    assert _digest(rows((1, b"decision"))) != _digest(rows((1, b"another decision")))
    assert _digest(rows((1, b"ab"), (2, b"c"))) != _digest(rows((1, b"a"), (2, b"bc")))  # parts are delimited


def test_a_round_is_cut_to_what_its_progress_and_its_transaction_can_hold() -> None:
    scattered = rows(*((i * 2, b"v") for i in range(RELAY_BATCH)))  # no two ids consecutive
    fitted = _fit(scattered)
    assert 0 < len(fitted) < len(scattered)
    assert len(Progress.of(fitted).encode()) <= PROGRESS_CHARS + 40
    big = rows(*((i, b"x" * (RELAY_BYTES // 3)) for i in range(1, 6)))
    assert len(_fit(big)) == 3
    huge = rows((1, b"x" * (RELAY_BYTES + 1)))
    assert len(_fit(huge)) == 1  # always at least one row: a round never stalls


def test_progress_of_a_full_round_fits_the_brokers_offset_metadata() -> None:
    full = rows(*((i, b"v") for i in range(10_000, 10_000 + RELAY_BATCH)))
    assert _fit(full) == full
    assert len(Progress.of(full).encode()) < 4096
