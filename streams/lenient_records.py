"""Fetched records whose header names are not UTF-8 are read instead of stopping the reader.

The Kafka protocol makes a header name a string, and aiokafka decodes it as UTF-8 while it
walks a record batch; a name that is not UTF-8 (only a hand-made producer writes one) raises
in the middle of the batch, the fetch is given up, the same batch is fetched again, and the
consumer (faust's fetcher, for the configs stream) stops for good. One bad record from any
publisher would halt every config change of the deployment.

`install()` replaces the record set aiokafka's fetcher builds from each fetch response with
one that still lets aiokafka's fast reader walk every batch; only when a record of a batch
cannot be decoded is the rest of that batch read again here, from the first record not yet
handed out, with header names decoded with `surrogateescape`. Such a name is a `str` that
cannot be encoded as UTF-8: `undecodable_header_names` finds it, so that the record can be
refused with a reason, and `printable_header_name` turns it into one that can be written.

This leans on aiokafka's record classes as the pinned version has them; the tests read a
crafted record through a real broker, so an aiokafka that changes them fails there.
"""

from __future__ import annotations

from typing import Iterator

import aiokafka.consumer.fetcher as fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import MemoryRecords, _MemoryRecordsPy
from aiokafka.record.util import decode_varint

_installed = False


def install() -> None:
    """Make every aiokafka consumer of this process read batches leniently; idempotent."""
    global _installed
    if not _installed:
        fetcher.MemoryRecords = LenientMemoryRecords
        _installed = True


def undecodable_header_names(headers: list[tuple[str, bytes]]) -> list[str]:
    """The names, made printable, of the headers whose name is not UTF-8."""
    bad = []
    for name, _ in headers:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(printable_header_name(name))
    return bad


def printable_header_name(name: str) -> str:
    """The name itself when it is UTF-8; otherwise its bytes, the undecodable as `\\xNN`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class LenientMemoryRecords:
    """aiokafka's record set over one fetched partition's bytes, walked twice in step: by
    the fast reader, whose batches are handed out, and by the pure-Python one, used only
    to cut the bytes into slices (no batch is built of them), each kept for a lenient
    second reading."""

    def __init__(self, data: bytes) -> None:
        self._fast = MemoryRecords(data)
        self._slices = _MemoryRecordsPy(data)

    def size_in_bytes(self) -> int:
        return self._fast.size_in_bytes()

    def has_next(self) -> bool:
        return self._fast.has_next()

    def next_batch(self):
        batch = self._fast.next_batch()
        piece = self._slices._next_slice  # this batch's bytes
        self._slices._cache_next()  # on to the next slice, without building a batch of it
        if piece is not None and piece[_MemoryRecordsPy.MAGIC_OFFSET] >= 2:
            return LenientBatch(batch, piece)
        return batch  # the old formats carry no headers


class LenientBatch:
    """One record batch: aiokafka's, until a record of it cannot be decoded."""

    def __init__(self, fast, piece: memoryview) -> None:
        self._fast = fast
        self._piece = piece
        self._records: Iterator | None = None

    def __getattr__(self, name: str):
        return getattr(self._fast, name)

    def __iter__(self) -> LenientBatch:
        return self

    def __next__(self):
        if self._records is None:
            self._records = self._read()
        return next(self._records)

    def _read(self) -> Iterator:
        last = None
        try:
            for record in self._fast:
                last = record.offset
                yield record
            return
        except UnicodeDecodeError:
            pass
        for record in _read_leniently(_DefaultRecordBatchPy(self._piece)):
            if last is None or record.offset > last:
                yield record


def _read_leniently(batch: _DefaultRecordBatchPy) -> Iterator[_DefaultRecordPy]:
    """The records of a v2 batch, as aiokafka reads them, except that a header name is
    decoded with `surrogateescape`. See the record layout in aiokafka's `_read_msg`."""
    batch._maybe_uncompress()
    buffer, pos = batch._buffer, batch._pos
    log_append = batch.timestamp_type == batch.LOG_APPEND_TIME
    for _ in range(batch._num_records):
        _, pos = decode_varint(buffer, pos)  # length
        _, pos = decode_varint(buffer, pos)  # attributes
        timestamp_delta, pos = decode_varint(buffer, pos)
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _nullable_bytes(buffer, pos)
        value, pos = _nullable_bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        headers = []
        for _ in range(max(count, 0)):
            name, pos = _nullable_bytes(buffer, pos)
            header_value, pos = _nullable_bytes(buffer, pos)
            headers.append(((name or b"").decode("utf-8", "surrogateescape"), header_value))
        timestamp = batch.max_timestamp if log_append else batch.first_timestamp + timestamp_delta
        yield _DefaultRecordPy(batch.base_offset + offset_delta, timestamp,
                               batch.timestamp_type, key, value, headers)


def _nullable_bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(buffer, pos)
    if length < 0:
        return None, pos
    return bytes(buffer[pos:pos + length]), pos + length
