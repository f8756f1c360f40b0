"""The spool's on-disk format: records, fillers, ack entries and the resynchronising scan.

Pure (bytes in, bytes or values out, no IO): the reference of the format, tested on its own.

On disk
-------
    <directory>/segments/<seq:012d>.seg   records, append-only
    <directory>/segments/<seq:012d>.ack   acked record offsets of that segment, append-only
    <directory>/segments/LOCK             flock'd by the one process writing the spool
    <directory>/quarantine/<seq:012d>.seg[.N]   segments with corruption in the middle

A record is a 24-byte header then the payload, all little-endian:
    magic b"\\xfeS" | version u8 | flags u8 | payload length u32 | events u32 |
    created (unix ms) u64 | crc32 of header bytes 0..19 + payload
flags is 0 for a batch. n is the header's events field.

Version 3 (written since batches store lengths, storage.py) stores the Batch as it is:
    n fragment lengths u32 | n timestamp lengths u16 | batch.data | batch.tdata
batch.data is the events' JSON string literals back to back (`orjson.dumps(text)`, quotes
included), batch.tdata their timestamps (ASCII) back to back. Writing is four copies and
reading four slices: no event is decoded or re-encoded, no Python object made per event.

Version 2 (written from the encoded batches until version 3) holds the same bytes with end
offsets instead of lengths:
    n fragment end offsets u32 | n timestamp end offsets u32 | batch.data | the timestamps
It is still read, its offsets turned into lengths.

Version 1 (written by the releases before) stores 2n u32 lengths in code points (the n
events, then the n timestamps) followed by the UTF-8 (surrogatepass) encoding of all those
strings concatenated. It is still read: the texts are decoded and encoded into a Batch
(`Batch.from_events`); a lone surrogate, which JSON cannot carry, becomes U+FFFD. Nothing
writes version 1 any more.

0xFE never occurs in UTF-8 (nor in JSON or ASCII), so the magic cannot appear in event text.

flags 1 marks a filler: events 0, created 0, a zero payload. Fillers are written only by
recovery, over corrupt byte ranges, so that every other record keeps its offset; they are never
replayed. New fillers are version 3; version-1 and 2 fillers (written by the releases before) are
read as well. (A release that does not know a version sees its records as corruption; spools
are not meant to be downgraded.)

An ack entry is 12 bytes: record offset u64 | crc32(seq u64, offset u64). Torn or bad entries
are ignored (the record is then replayed: a duplicate, never a loss).

A record id is (segment seq << 40) | offset: increasing in append order.

Scanning (recovery)
-------------------
Every complete record with a good checksum, of either version, is found. At a bad byte, the
scan resynchronises: it looks for the next position where a valid record starts (bytes.find
of the magic, each candidate verified by version, header, length and checksum). From the first
bad byte on, checksums go through RangeCrc, so a candidate costs a bounded amount of work
whatever length it claims: the scan is O(n) in the segment size. Worst case (a crafted file
with a plausible header every few bytes): one pass of crc32 over the file plus at most 536
bytes of crc32 and ~10 table steps per candidate, about 0.3 s per MiB of fake headers.
- Nothing valid after it: a torn tail (short header, short payload, bad checksum at the end,
  zero fill); the file is cut there. Only the segment being appended to at a crash (the
  newest) can have one: in any other segment recovery treats such a tail as corruption.
- A valid record follows: corruption in the middle, a "hole" that recovery covers with filler
  records of exactly its length. A corrupt range shorter than a header cannot hold a filler:
  it swallows the next record(s) until it can (it takes inserted/deleted bytes, which disks
  do not do). If no valid record follows such a short range, the valid records it swallowed
  make the tail "corrupt" rather than torn.
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from itertools import accumulate
from typing import NamedTuple

import orjson

try:
    # ISA-L's CRC-32: the same checksum as zlib's (same polynomial, same running value), about
    # 12x faster (0.019 against 0.24 ns per byte here): every record is checksummed when
    # written, read back and scanned at start, 3 MiB or more each at 10,000 events.
    from isal.isal_zlib import crc32
except ImportError:  # a platform without an isal wheel: zlib's, slower, the same values
    from zlib import crc32

from ..batching import Batch
from ..storage import new_lens, new_tlens, offsets
from .errors import RecordTooLarge

MAGIC = b"\xfeS"
VERSION = 3  # what is written
READ_VERSIONS = (1, 2, 3)
# The least payload bytes per event of each version: what a header's event count must fit.
_MIN_EVENT_BYTES = {1: 8, 2: 8, 3: 6}
FLAG_FILLER = 0x01  # a record covering a corrupt range: skipped, never replayed

_HEAD = struct.Struct("<2sBBIIQ")  # everything the crc covers, before the crc itself
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size  # 24
_ACK = struct.Struct("<QI")
_ACK_KEY = struct.Struct("<QQ")
ACK_SIZE = _ACK.size  # 12
ID_SHIFT = 40
OFFSET_MASK = (1 << ID_SHIFT) - 1
MAX_PAYLOAD = 0xFFFFFFFF
_BIG_ENDIAN = sys.byteorder == "big"
assert array("I").itemsize == 4


class CorruptRecord(ValueError):
    """Bytes that do not hold a valid batch record."""


# -- ids --------------------------------------------------------------------------------------


def record_id(seq: int, offset: int) -> int:
    return (seq << ID_SHIFT) | offset


def split_id(rid: int) -> tuple[int, int]:
    """(segment seq, offset) of a record id."""
    return rid >> ID_SHIFT, rid & OFFSET_MASK


# -- batch payloads ----------------------------------------------------------------------------


def _le(arr: array[int]) -> bytes | array[int]:
    # The array's bytes, little-endian (what is on disk).
    if _BIG_ENDIAN:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr


def _read_u32s(raw: memoryview) -> array[int]:
    return _read(new_lens(), raw)


def _read(arr: array[int], raw: memoryview) -> array[int]:
    arr.frombytes(raw)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr


def encode_payload(batch: Batch) -> bytes:
    """The version-3 payload of `batch` (its own bytes, not re-encoded)."""
    dlen, tlen = offsets(batch.lens, batch.tlens, len(batch))
    if dlen != len(batch.data) or tlen != len(batch.tdata):
        raise ValueError(f"batch fragments end at {dlen} but it holds {len(batch.data)} bytes"
                         if dlen != len(batch.data) else
                         f"timestamps end at {tlen} but it holds {len(batch.tdata)} bytes")
    return b"".join((_le(batch.lens), _le(batch.tlens), batch.data, batch.tdata))


def _decode_v3(payload: memoryview, n: int) -> Batch:
    k = 4 * n
    lens = _read(new_lens(), payload[:k])
    tlens = _read(new_tlens(), payload[k : k + 2 * n])
    body = payload[k + 2 * n :]
    dlen, tlen = offsets(lens, tlens, n)
    # The checksum already held: this only catches a writer bug.
    if dlen + tlen != len(body):
        raise CorruptRecord("fragment lengths do not match the payload")
    return Batch(body[:dlen], lens, body[dlen:], tlens)


def _decode_v2(payload: memoryview, n: int) -> Batch:
    k = 4 * n
    ends = _read_u32s(payload[:k]).tolist()
    tends = _read_u32s(payload[k : 2 * k]).tolist()
    body = payload[2 * k :]
    dlen = ends[-1] if n else 0
    tlen = tends[-1] if n else 0
    # The checksum already held: these only catch a writer bug, cheaply (sorted input is O(n)).
    if dlen + tlen != len(body) or ends != sorted(ends) or tends != sorted(tends):
        raise CorruptRecord("fragment offsets do not match the payload")
    tb = bytes(body[dlen:])
    times = [tb[a:b] for a, b in zip([0, *tends], tends, strict=False)]
    return Batch.from_lists(body[:dlen], ends, times)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(text: str) -> str:
    """JSON (and orjson) cannot carry a lone surrogate: one U+FFFD each, as the ingest does."""
    return _SURROGATE.sub("\ufffd", text)


def _decode_v1(payload: memoryview, n: int) -> Batch:
    lens = _read_u32s(payload[: 8 * n])
    text = str(payload[8 * n :], "utf-8", "surrogatepass")
    ends = list(accumulate(lens))
    if (ends[-1] if ends else 0) != len(text):
        raise CorruptRecord("string lengths do not match the text")
    strs = [text[a:b] for a, b in zip([0, *ends], ends, strict=False)]
    events, times = strs[:n], strs[n:]
    # v1 timestamps are ASCII RFC 3339 (then this leaves them as they are); anything else is
    # JSON-escaped so that it can still be written between quotes as is.
    tbytes = [orjson.dumps(_no_surrogates(t))[1:-1] for t in times]
    try:
        return Batch.from_events(events, tbytes)
    except orjson.JSONEncodeError:
        return Batch.from_events(map(_no_surrogates, events), tbytes)


def decode_payload(version: int, payload: memoryview, n: int) -> Batch:
    try:
        if version == 3:
            return _decode_v3(payload, n)
        if version == 2:
            return _decode_v2(payload, n)
        return _decode_v1(payload, n)
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CorruptRecord):
            raise
        raise CorruptRecord(str(e)) from e


# -- records -----------------------------------------------------------------------------------


def _pack(version: int, flags: int, payload: bytes | bytearray, n: int, created: int) -> bytes:
    head = _HEAD.pack(MAGIC, version, flags, len(payload), n, created)
    return b"".join((head, _CRC.pack(crc32(payload, crc32(head))), payload))


def encode_record(batch: Batch, created_ms: int) -> bytes:
    """A version-3 batch record: header then payload."""
    payload = encode_payload(batch)
    if len(payload) > MAX_PAYLOAD:
        raise RecordTooLarge(f"batch payload of {len(payload)} bytes exceeds 4 GiB")
    return _pack(VERSION, 0, payload, len(batch), created_ms)


def filler(length: int) -> bytes:
    """Version-2 filler records covering exactly `length` (>= HEADER_SIZE) bytes."""
    if length < HEADER_SIZE:
        raise ValueError(f"a filler needs at least {HEADER_SIZE} bytes, not {length}")
    parts: list[bytes] = []
    while length:
        size = min(length, HEADER_SIZE + MAX_PAYLOAD)
        if 0 < length - size < HEADER_SIZE:
            size -= HEADER_SIZE
        parts.append(_pack(VERSION, FLAG_FILLER, bytes(size - HEADER_SIZE), 0, 0))
        length -= size
    return b"".join(parts)


# -- checksums of arbitrary ranges (the resynchronising scan) ----------------------------------
#
# A crafted segment can put a plausible header every few bytes, each claiming a payload up to
# the end of the file: checking each one with zlib.crc32 over its claimed length is quadratic.
# CRC-32 is linear over GF(2), so the crc of any range follows from the crc of two prefixes of
# the file and the operator "advance the register by L zero bytes". RangeCrc keeps the prefix
# crc every _BLOCK bytes (one pass over the file), finishes a prefix from the nearest mark
# (< _BLOCK bytes) and applies the operator for L digit by digit in base 16 (<= 9 table steps,
# tables built once). So a candidate costs at most 2 * _BLOCK + 20 bytes of zlib.crc32 and a
# constant number of table steps, whatever length it claims.

_MASK = 0xFFFFFFFF
_BLOCK = 256
_Op = list[list[int]]  # 4 tables of 256: the image of each byte of the register
_SHIFT_OPS: list[list[_Op]] = []  # [k][d - 1]: advance by d * 16**k zero bytes


def _apply(op: _Op, r: int) -> int:
    return op[0][r & 255] ^ op[1][(r >> 8) & 255] ^ op[2][(r >> 16) & 255] ^ op[3][r >> 24]


def _compose(f: _Op, g: _Op) -> _Op:
    """f after g."""
    return [[_apply(f, _apply(g, v << (8 * j))) for v in range(256)] for j in range(4)]


def _shift_ops() -> list[list[_Op]]:
    if not _SHIFT_OPS:
        table = []
        for b in range(256):
            c = b
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            table.append(c)
        # One zero byte into the (reflected) register r: table[r & 255] ^ (r >> 8).
        base = [[table[(v << (8 * j)) & 255] ^ ((v << (8 * j)) >> 8) for v in range(256)]
                for j in range(4)]
        ops: list[list[_Op]] = []
        for _k in range(9):  # 16**9 > the longest range (4 GiB + a header)
            row = [base]
            for _d in range(2, 16):
                row.append(_compose(base, row[-1]))
            ops.append(row)
            base = _compose(base, row[-1])
        _SHIFT_OPS[:] = ops
    return _SHIFT_OPS


def _advance(r: int, length: int) -> int:
    """The raw register `r` after `length` zero bytes."""
    ops = _shift_ops()
    k = 0
    while length:
        d = length & 15
        if d:  # _apply, inlined: this is the scan's inner loop on crafted input
            t = ops[k][d - 1]
            r = t[0][r & 255] ^ t[1][(r >> 8) & 255] ^ t[2][(r >> 16) & 255] ^ t[3][r >> 24]
        length >>= 4
        k += 1
    return r


class RangeCrc:
    """zlib.crc32 of any range of `data` in bounded work (see above); counts bytes examined."""

    MAX_PER_CANDIDATE = 2 * _BLOCK + HEADER_SIZE

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.view = memoryview(data)
        self.marks: array[int] | None = None  # crc32(data[: k * _BLOCK], _MASK), built lazily
        self.examined = 0

    def _prefix(self, x: int) -> int:
        """zlib.crc32(data[:x], 0xFFFFFFFF): the bitwise complement of the raw register."""
        if self.marks is None:
            marks = array("I")
            c = _MASK
            for k in range(len(self.view) // _BLOCK + 1):
                marks.append(c)
                c = crc32(self.view[k * _BLOCK : (k + 1) * _BLOCK], c)
            self.examined += len(self.view)
            self.marks = marks
        k = x // _BLOCK
        self.examined += x - k * _BLOCK
        return crc32(self.view[k * _BLOCK : x], self.marks[k])

    def crc32(self, start: int, stop: int, value: int) -> int:
        """== zlib.crc32(data[start:stop], value)."""
        if stop - start <= 2 * _BLOCK:
            self.examined += stop - start
            return crc32(self.view[start:stop], value)
        ga = ~self._prefix(start) & _MASK
        gb = ~self._prefix(stop) & _MASK
        return ~(_advance((~value & _MASK) ^ ga, stop - start) ^ gb) & _MASK


class Parsed(NamedTuple):
    length: int  # header + payload
    events: int
    created: int  # unix ms
    flags: int  # 0: a batch, FLAG_FILLER: a filler
    version: int


def parse_at(
    data: bytes | bytearray | memoryview, pos: int, sums: RangeCrc | None = None
) -> Parsed | None:
    """The valid record (batch or filler, either version) at `pos`, else None.

    `sums` (a RangeCrc of `data`) checks a long payload's checksum in constant time.
    """
    parsed = _header(data, pos)
    if parsed is None:
        return None
    stop = pos + parsed.length
    if stop > len(data):
        return None
    (crc,) = _CRC.unpack_from(data, pos + _HEAD.size)
    view = memoryview(data)
    head_crc = crc32(view[pos : pos + _HEAD.size])
    if sums is not None:
        got = sums.crc32(pos + HEADER_SIZE, stop, head_crc)
    else:
        got = crc32(view[pos + HEADER_SIZE : stop], head_crc)
    return parsed if got == crc else None


def decode_record(data: bytes | bytearray | memoryview, events: int) -> Batch:
    """The batch in `data`, exactly one record of `events` events (re-verified: read back)."""
    parsed = parse_at(data, 0)
    if parsed is None or parsed.flags or parsed.length != len(data) or parsed.events != events:
        raise CorruptRecord("bad record")
    return decode_payload(parsed.version, memoryview(data)[HEADER_SIZE:], events)


def next_valid(data: bytes | bytearray, start: int, sums: RangeCrc | None = None) -> int:
    """Offset of the first valid record (batch or filler) at or after `start`, or -1."""
    i = data.find(MAGIC, start)
    while i != -1:
        if parse_at(data, i, sums) is not None:
            return i
        i = data.find(MAGIC, i + 1)
    return -1


class ScannedRecord(NamedTuple):
    offset: int
    length: int
    events: int
    created: int  # unix ms


class Scan(NamedTuple):
    records: list[ScannedRecord]  # batches (fillers left out), in offset order
    holes: list[tuple[int, int]]  # corrupt ranges [start, stop) before good_end
    good_end: int  # the file is cut here: what follows is not recoverable
    size: int  # of the file
    prefix: int  # records before the first corrupt byte
    tail_corrupt: bool  # the cut tail holds valid records (no room for a filler before them)

    @property
    def bad_offset(self) -> int:
        return self.holes[0][0] if self.holes else self.good_end


def scan(data: bytes | bytearray) -> Scan:
    """Index every valid record; resynchronise after corrupt ranges (see the docstring)."""
    recs: list[ScannedRecord] = []
    holes: list[tuple[int, int]] = []
    pos, end = 0, len(data)
    tail_corrupt = False
    # A clean segment is checksummed record by record (each byte once); from the first bad
    # byte on, every check goes through RangeCrc so that candidates cost O(1) each.
    sums: RangeCrc | None = None
    while pos < end:
        r = parse_at(data, pos, sums)
        if r is not None:
            if r.flags == 0:
                recs.append(ScannedRecord(pos, r.length, r.events, r.created))
            pos += r.length
            continue
        if sums is None:
            sums = RangeCrc(data)
        nxt = next_valid(data, pos + 1, sums)
        if nxt == -1:
            break  # a torn tail
        if nxt - pos < HEADER_SIZE:  # no room for a filler: swallow what follows
            nxt = next_valid(data, pos + HEADER_SIZE, sums)
            if nxt == -1:
                tail_corrupt = True
                break
        holes.append((pos, nxt))
        pos = nxt
    prefix = sum(1 for r in recs if r.offset < holes[0][0]) if holes else len(recs)
    return Scan(recs, holes, pos, end, prefix, tail_corrupt)


class LostRecord(NamedTuple):
    offset: int
    events: int | None  # None: no readable header says how many


def _header(data: bytes | bytearray | memoryview, pos: int) -> Parsed | None:
    """The header at `pos` if it reads as a record's (its checksum is not checked: the damage
    may be anywhere in the record); its length may run past the end of `data`."""
    if len(data) - pos < HEADER_SIZE:
        return None
    magic, version, flags, plen, n, created = _HEAD.unpack_from(data, pos)
    if magic != MAGIC or version not in READ_VERSIONS or _MIN_EVENT_BYTES[version] * n > plen:
        return None
    if flags != 0 and (flags != FLAG_FILLER or n != 0):
        return None
    return Parsed(HEADER_SIZE + plen, n, created, flags, version)


def damaged_records(
    data: bytes | bytearray, start: int, stop: int, sums: RangeCrc | None = None
) -> list[LostRecord]:
    """The batch records that were in the damaged range [start, stop) of a segment (a hole,
    or a tail that is not a torn write), with their event counts where a header says so.

    Walks the headers: an intact record the range swallowed counts with its events; a header
    that reads well and ends exactly where the range or another readable header begins counts
    with the events it states (only its payload or checksum is damaged). Bytes no header
    explains count as one record of unknown size, up to the next intact record, unless they
    are too short to have held one (bytes inserted before a record, which disks do not do).
    Fillers are never lost records. Linear, as the scan: at most one resync per gap.
    """
    out: list[LostRecord] = []
    pos = start
    while pos < stop:
        whole = parse_at(data, pos, sums)
        if whole is not None and pos + whole.length <= stop:
            if not whole.flags:
                out.append(LostRecord(pos, whole.events))
            pos += whole.length
            continue
        head = _header(data, pos)
        if head is not None:
            end = pos + head.length
            if end == stop or (end < stop and _header(data, end) is not None):
                if not head.flags:
                    out.append(LostRecord(pos, head.events))
                pos = end
                continue
        nxt = next_valid(data, pos + 1, sums)
        nxt = stop if nxt == -1 or nxt > stop else nxt
        if nxt - pos >= HEADER_SIZE:
            events = head.events if head is not None and not head.flags else None
            out.append(LostRecord(pos, events))
        pos = nxt
    return out


def repaired(data: bytes | bytearray, result: Scan) -> bytearray:
    """`data` with every hole overwritten by fillers and the tail cut at good_end."""
    out = bytearray(memoryview(data)[: result.good_end])
    for start, stop in result.holes:
        out[start:stop] = filler(stop - start)
    return out


# -- ack entries -------------------------------------------------------------------------------


def ack_entry(seq: int, offset: int) -> bytes:
    return _ACK.pack(offset, crc32(_ACK_KEY.pack(seq, offset)))


class AckScan(NamedTuple):
    offsets: list[int]  # of the valid entries, in file order
    ignored: int  # bad entries, plus one for a torn last entry
    whole: int  # bytes of whole entries (a torn last entry starts here)


def scan_acks(data: bytes, seq: int) -> AckScan:
    offsets: list[int] = []
    ignored = 0
    whole = len(data) - len(data) % ACK_SIZE
    for pos in range(0, whole, ACK_SIZE):
        entry = data[pos : pos + ACK_SIZE]
        off, _crc = _ACK.unpack(entry)
        if entry == ack_entry(seq, off):
            offsets.append(off)
        else:
            ignored += 1
    if whole != len(data):
        ignored += 1
    return AckScan(offsets, ignored, whole)
