"""Reading fetched record batches that hold a header name which is not UTF-8."""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from streams.lenient_records import (
    LenientMemoryRecords,
    printable_header_name,
    undecodable_header_names,
)


class NotUtf8(str):
    """A header name that the pure-Python builder writes as bytes that are not UTF-8."""

    def encode(self, *args: object, **kwargs: object) -> bytes:
        return b"\xff\xfename"


def batch_bytes(records: list[tuple[bytes, list]], *, compression: int = 0,
                base_offset: int = 0) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(
        magic=2, compression_type=compression, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20,
    )
    for delta, (key, headers) in enumerate(records):
        builder.append(delta, timestamp=1_700_000_000_000 + delta, key=key,
                       value=b"v-" + key, headers=headers)
    raw = bytearray(builder.build())
    raw[0:8] = base_offset.to_bytes(8, "big")
    return bytes(raw)


def read_all(data: bytes) -> list:
    records = LenientMemoryRecords(data)
    out = []
    while records.has_next():
        batch = records.next_batch()
        assert batch.validate_crc()
        out.extend(batch)
    return out


@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_a_batch_with_a_bad_header_name_is_read_whole(compression: int) -> None:
    data = batch_bytes([(b"a", [("traceparent", b"t")]), (b"b", [(NotUtf8("x"), b"h")]),
                        (b"c", [("ok", None)])], compression=compression, base_offset=40)
    records = read_all(data)
    assert [r.offset for r in records] == [40, 41, 42]
    assert [r.key for r in records] == [b"a", b"b", b"c"]
    assert [r.value for r in records] == [b"v-a", b"v-b", b"v-c"]
    assert [r.timestamp for r in records] == [1_700_000_000_000 + d for d in range(3)]
    assert records[0].headers == [("traceparent", b"t")]
    assert records[2].headers == [("ok", None)]
    (name, value), = records[1].headers
    assert value == b"h"
    assert undecodable_header_names(records[1].headers) == ["\\xff\\xfename"]
    assert undecodable_header_names(records[0].headers) == []


def test_batches_after_a_bad_one_are_read_by_the_fast_reader() -> None:
    data = (batch_bytes([(b"a", [(NotUtf8("x"), b"h")])], base_offset=0)
            + batch_bytes([(b"b", [("n", b"v")]), (b"c", [])], base_offset=1))
    records = read_all(data)
    assert [r.offset for r in records] == [0, 1, 2]
    assert type(records[1]).__module__.startswith("aiokafka.record._crecords")


def test_a_bad_first_record_is_not_handed_out_twice() -> None:
    data = batch_bytes([(b"a", [(NotUtf8("x"), b"h")]), (b"b", [])])
    assert [r.key for r in read_all(data)] == [b"a", b"b"]


def test_printable_names() -> None:
    assert printable_header_name("traceparent") == "traceparent"
    assert printable_header_name(b"\xffname".decode("utf-8", "surrogateescape")) == "\\xffname"
    assert printable_header_name("é") == "é"
