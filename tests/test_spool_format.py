"""The spool's record format (haproxy_forwarder/spool/format.py), pure: bytes in, bytes out.

Version-1 and version-2 records are built here from the format's description (nothing writes
them any more).
"""

from __future__ import annotations

import struct
import zlib
from itertools import accumulate

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_forwarder.batching import Batch
from haproxy_forwarder.spool import HEADER_SIZE
from haproxy_forwarder.spool import format as fmt
from haproxy_forwarder.storage import new_lens, new_tlens


def v1_record(events: list[str], times: list[str], created: int = 0, flags: int = 0) -> bytes:
    """A version-1 record, as the releases before wrote it (see format.py's docstring)."""
    lens = [len(s) for s in events] + [len(s) for s in times]
    text = "".join(events + times).encode("utf-8", "surrogatepass")
    payload = struct.pack(f"<{len(lens)}I", *lens) + text
    head = struct.pack("<2sBBIIQ", b"\xfeS", 1, flags, len(payload), len(events), created)
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def raw_record(version: int, n: int, payload: bytes, created: int = 0) -> bytes:
    """A record with a good checksum around any payload (to test the decoder)."""
    head = struct.pack("<2sBBIIQ", b"\xfeS", version, 0, len(payload), n, created)
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def v2_raw(n: int, payload: bytes, created: int = 0) -> bytes:
    return raw_record(2, n, payload, created)


def v3_raw(n: int, payload: bytes) -> bytes:
    return raw_record(3, n, payload)


def texts(b: Batch) -> list[str]:
    """b.events(), also for an empty batch (Batch.fragments() raises on one: reported)."""
    return b.events() if len(b) else []


TEXT = st.text(st.characters(codec="utf-8"), max_size=30)  # what ingest can produce
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
TIMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=35)


@st.composite
def raw_batches(draw: st.DrawFn) -> Batch:
    """Any bytes cut anywhere: the spool stores a batch as it is, whatever its bytes."""
    frags = draw(st.lists(st.binary(max_size=20), max_size=20))
    times = draw(st.lists(st.binary(max_size=10), min_size=len(frags), max_size=len(frags)))
    return Batch.from_lists(b"".join(frags), list(accumulate(map(len, frags))), times)


def v2_payload(b: Batch) -> bytes:
    """A batch as version 2 stored it (end offsets), what the releases before wrote."""
    ends, tends = b.ends, list(accumulate(map(len, b.times)))
    return struct.pack(f"<{2 * len(b)}I", *ends, *tends) + bytes(b.data) + b"".join(b.times)


@given(raw_batches(), st.integers(0, 2**63))
@settings(max_examples=200, deadline=None)
def test_v3_stores_the_batch_bytes_as_they_are(b: Batch, created: int) -> None:
    rec = fmt.encode_record(b, created)
    assert rec[2] == fmt.VERSION == 3
    parsed = fmt.parse_at(rec, 0)
    assert parsed == fmt.Parsed(len(rec), len(b), created, 0, 3)
    got = fmt.decode_record(rec, len(b))
    assert (got.data, got.ends, got.times) == (b.data, b.ends, b.times)
    assert (got.lens, got.tdata, got.tlens) == (b.lens, b.tdata, b.tlens)
    # Not re-encoded: the blocks themselves are in the record, lengths little-endian.
    assert bytes(b.data) + bytes(b.tdata) in rec
    assert struct.pack(f"<{len(b)}I", *b.lens) + struct.pack(f"<{len(b)}H", *b.tlens) in rec


@given(raw_batches(), st.integers(0, 2**63))
@settings(max_examples=200, deadline=None)
def test_v2_records_written_before_are_still_read(b: Batch, created: int) -> None:
    rec = v2_raw(len(b), v2_payload(b), created)
    assert fmt.parse_at(rec, 0) == fmt.Parsed(len(rec), len(b), created, 0, 2)
    got = fmt.decode_record(rec, len(b))
    assert (got.data, got.lens, got.tdata, got.tlens) == (b.data, b.lens, b.tdata, b.tlens)
    assert [r.offset for r in fmt.scan(rec + fmt.encode_record(b, 0)).records] == [0, len(rec)]


@given(st.lists(TEXT, max_size=20), st.data())
@settings(max_examples=100, deadline=None)
def test_v2_round_trip_any_text(events: list[str], data: st.DataObject) -> None:
    times = data.draw(st.lists(TIMES, min_size=len(events), max_size=len(events)))
    b = Batch.from_events(events, times)
    got = fmt.decode_record(fmt.encode_record(b, 1), len(events))
    assert texts(got) == events and got.times == [t.encode() for t in times]


@given(st.lists(ANY_TEXT, max_size=20), st.data())
@settings(max_examples=100, deadline=None)
def test_v1_records_are_read_into_encoded_batches(events: list[str], data: st.DataObject) -> None:
    times = data.draw(st.lists(TIMES, min_size=len(events), max_size=len(events)))
    rec = v1_record(events, times, created=7)
    assert fmt.parse_at(rec, 0) == fmt.Parsed(len(rec), len(events), 7, 0, 1)
    got = fmt.decode_record(rec, len(events))
    # A lone surrogate cannot be JSON: U+FFFD, as the ingest does for invalid UTF-8.
    clean = ["".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in e) for e in events]
    assert texts(got) == clean
    assert (got.fragments() if events else []) == [orjson.dumps(e) for e in clean]
    assert got.times == [orjson.dumps(t)[1:-1] for t in times]  # JSON-safe between quotes


def test_v1_odd_strings_and_non_ascii_timestamps() -> None:
    events = ['q"b\\', "nul\x00", "é\ufffd", "\U0001f600", "lone \udc80", ""]
    rec = v1_record(events, ["2026-01-01T00:00:00Z", "x", "é", '"', "", "\ud800"])
    got = fmt.decode_record(rec, len(events))
    assert got.events() == ['q"b\\', "nul\x00", "é\ufffd", "\U0001f600", "lone \ufffd", ""]
    # Timestamps go between quotes as they are: a non-ASCII one is kept JSON-escaped.
    assert got.times == [b"2026-01-01T00:00:00Z", b"x", b"\xc3\xa9", b'\\"', b"", b"\xef\xbf\xbd"]


def test_scan_finds_v1_and_v2_records_and_resynchronises_on_both() -> None:
    r1 = v1_record(["old"], ["t"])
    r2 = fmt.encode_record(Batch.from_events(["new"], ["t"]), 0)
    junk = b"\xfeS\x01" + b"\x00" * 40 + b"\xfeS\x02" + b"\xff" * 40
    data = r1 + junk + r2 + junk + r1 + r2
    scan = fmt.scan(data)
    offs = [0, len(r1) + len(junk), len(r1) + len(junk) + len(r2) + len(junk)]
    offs.append(offs[2] + len(r1))
    assert [r.offset for r in scan.records] == offs
    assert scan.holes == [(len(r1), offs[1]), (offs[1] + len(r2), offs[2])]
    assert scan.good_end == len(data) and not scan.tail_corrupt and scan.prefix == 1
    fixed = fmt.repaired(data, scan)
    assert len(fixed) == len(data)
    again = fmt.scan(fixed)
    assert again.holes == [] and [r.offset for r in again.records] == offs


def test_v1_filler_is_skipped_v2_fillers_are_written() -> None:
    zeros = bytes(10)
    head = struct.pack("<2sBBIIQ", b"\xfeS", 1, fmt.FLAG_FILLER, len(zeros), 0, 0)
    v1_filler = head + struct.pack("<I", zlib.crc32(zeros, zlib.crc32(head))) + zeros
    r = fmt.encode_record(Batch.from_events(["a"], ["t"]), 0)
    scan = fmt.scan(v1_filler + r)
    assert [x.offset for x in scan.records] == [len(v1_filler)] and scan.holes == []
    f = fmt.filler(100)
    assert f[2] == 3 and fmt.parse_at(f, 0) == fmt.Parsed(100, 0, 0, fmt.FLAG_FILLER, 3)


@pytest.mark.parametrize("length", [HEADER_SIZE, HEADER_SIZE + 1, 1000])
def test_filler_covers_exactly(length: int) -> None:
    f = fmt.filler(length)
    assert len(f) == length
    scan = fmt.scan(f)
    assert scan.records == [] and scan.holes == [] and scan.good_end == length
    with pytest.raises(ValueError):
        fmt.filler(HEADER_SIZE - 1)


def test_decoder_rejects_what_the_checksum_cannot_catch() -> None:
    ok = fmt.encode_record(Batch.from_events(["ab", "c"], ["t1", "t2"]), 0)
    with pytest.raises(fmt.CorruptRecord):
        fmt.decode_record(ok, 3)  # not the events count the index holds
    with pytest.raises(fmt.CorruptRecord):
        fmt.decode_record(ok[:-1], 2)
    # Offsets going backwards, or not adding up to the payload, with a good checksum.
    body = b'"ab""c"t1t2'
    backwards = struct.pack("<4I", 4, 3, 2, 4) + body
    with pytest.raises(fmt.CorruptRecord):
        fmt.decode_record(v2_raw(2, backwards), 2)
    short = struct.pack("<4I", 4, 7, 2, 3) + body
    with pytest.raises(fmt.CorruptRecord):
        fmt.decode_record(v2_raw(2, short), 2)
    assert fmt.decode_record(v2_raw(2, struct.pack("<4I", 4, 7, 2, 4) + body), 2).events() == [
        "ab",
        "c",
    ]
    # Version 3: lengths that do not add up to the payload, with a good checksum.
    lens = struct.pack("<2I2H", 4, 3, 2, 2)
    assert fmt.decode_record(v3_raw(2, lens + body), 2).events() == ["ab", "c"]
    for bad in (struct.pack("<2I2H", 4, 4, 2, 2), struct.pack("<2I2H", 4, 3, 2, 1)):
        with pytest.raises(fmt.CorruptRecord):
            fmt.decode_record(v3_raw(2, bad + body), 2)
    with pytest.raises(fmt.CorruptRecord):  # v1 text that is not UTF-8
        fmt.decode_record(v1_record(["a"], ["t"])[:-1] + b"\xff", 1)


def test_inconsistent_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        fmt.encode_record(Batch.from_lists(b'"ab"', [3], [b"t"]), 0)
    with pytest.raises(ValueError):
        fmt.encode_record(Batch(b'"ab"'), 0)  # bytes but no fragment
    with pytest.raises(ValueError):  # timestamps that do not add up to their bytes
        fmt.encode_record(Batch(b'"ab"', new_lens([4]), b"t", new_tlens([2])), 0)
    with pytest.raises(OverflowError):  # a fragment over 4 GiB cannot even be held
        Batch.from_lists(b"", [1 << 32], [b""])


def test_ack_entries() -> None:
    entries = [fmt.ack_entry(5, off) for off in (0, 120, 4096)]
    assert all(len(e) == fmt.ACK_SIZE for e in entries)
    data = bytearray(b"".join(entries))
    assert fmt.scan_acks(bytes(data), 5) == fmt.AckScan([0, 120, 4096], 0, len(data))
    assert fmt.scan_acks(bytes(data), 6).ignored == 3  # another segment's entries
    data[13] ^= 1
    torn = bytes(data) + entries[0][:5]
    assert fmt.scan_acks(torn, 5) == fmt.AckScan([0, 4096], 2, 3 * fmt.ACK_SIZE)


def test_record_ids_increase_with_segment_and_offset() -> None:
    assert fmt.split_id(fmt.record_id(3, 77)) == (3, 77)
    assert fmt.record_id(1, 0) > fmt.record_id(0, (1 << 40) - 1)


@given(st.binary(max_size=3000), st.integers(0, 2**32 - 1), st.integers(0, 100))
@settings(max_examples=300, deadline=None)
def test_the_checksum_is_zlibs_crc32(data: bytes, value: int, cut: int) -> None:
    """ISA-L's crc32 where it imports (faster), zlib's otherwise: the same values, so a spool
    is read by either."""
    view = memoryview(data)[cut:]
    assert fmt.crc32(view, value) == zlib.crc32(view, value)
    assert fmt.crc32(data) == zlib.crc32(data)
