"""A consumer must survive a record whose header NAME is not UTF-8.

aiokafka decodes header names strictly as UTF-8 while it unpacks a fetched batch (both its C
extension and its pure-Python reader), before any of our code sees the record. The error escapes
`getmany`, FastStream restarts the fetch at the same offset, and the partition is stuck for good.

`install()` (called once at start-up by shared.runtime.service) swaps the fetcher's MemoryRecords for one
that keeps aiokafka's fast C decoding, and only for a batch that fails so re-reads that batch in
Python, decoding header names with `surrogateescape`. The record then reaches the consumer,
whose reader (shared.contract.cloudevents.read_record) sees the undecodable name and dead-letters it with
its position. Written against aiokafka 0.14 (`aiokafka.record.*`); tests/test_admission.py
checks it on bytes aiokafka itself builds, and tests/test_poison_e2e.py through a real broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiokafka.consumer.fetcher as _fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import _MemoryRecordsPy
from aiokafka.record.util import decode_varint


def _sized(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    """A varint length and that many bytes (None for -1), as Kafka's record format writes them."""
    length, pos = decode_varint(buffer, pos)
    if length < 0:
        return None, pos
    return bytes(buffer[pos : pos + length]), pos + length


class _LenientRecordBatch(_DefaultRecordBatchPy):
    """aiokafka's pure-Python v2 batch, reading header names with surrogateescape."""

    def _read_msg(self, decode_varint: Any = decode_varint) -> _DefaultRecordPy:
        # The same layout as aiokafka's _read_msg: Length, Attributes, TimestampDelta, OffsetDelta,
        # Key, Value, Headers [HeaderKey HeaderValue].
        buffer = self._buffer
        length, pos = decode_varint(buffer, self._pos)
        start = pos
        _, pos = decode_varint(buffer, pos)
        ts_delta, pos = decode_varint(buffer, pos)
        logged = self.timestamp_type == self.LOG_APPEND_TIME
        timestamp = self.max_timestamp if logged else self.first_timestamp + ts_delta
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _sized(buffer, pos)
        value, pos = _sized(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        if count < 0:
            raise CorruptRecordException(f"Found invalid number of record headers {count}")
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):
            name, pos = _sized(buffer, pos)
            if name is None:
                raise CorruptRecordException("Invalid negative header key size")
            header_value, pos = _sized(buffer, pos)
            headers.append((name.decode("utf-8", "surrogateescape"), header_value))
        if pos - start != length:
            raise CorruptRecordException(f"Invalid record size: expected {length}, read {pos - start}")
        self._pos = pos
        return _DefaultRecordPy(self.base_offset + offset_delta, timestamp, self.timestamp_type, key, value, headers)


class _TolerantBatch:
    """One record batch: aiokafka's own (C) decoding, or the lenient one if that one raises."""

    def __init__(self, batch: Any, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._records: Iterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:  # offsets, flags, validate_crc(): the batch's own
        return getattr(self._batch, name)

    def __iter__(self) -> _TolerantBatch:
        return self

    def __next__(self) -> Any:
        if self._records is None:
            try:
                records = list(self._batch)
            except UnicodeDecodeError:
                records = list(_LenientRecordBatch(self._raw))
            self._records = iter(records)
        return next(self._records)


class TolerantMemoryRecords:
    """The fetcher's view of a fetched buffer, split into batches by aiokafka's own Python class
    (whose batches are the C ones when the extension is there), each wrapped in _TolerantBatch."""

    def __init__(self, data: bytes) -> None:
        self._records = _MemoryRecordsPy(data)

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self) -> Any:
        raw = self._records._next_slice
        batch = self._records.next_batch()
        # Legacy (v0/v1) batches have no headers: nothing to tolerate.
        if batch is None or raw is None or batch.magic < 2:
            return batch
        return _TolerantBatch(batch, raw)


def install() -> None:
    """Make every aiokafka consumer in this process tolerate non-UTF-8 header names. Idempotent."""
    _fetcher.MemoryRecords = TolerantMemoryRecords  # type: ignore[misc, assignment]
