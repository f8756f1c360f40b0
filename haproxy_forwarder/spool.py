"""Durable on-disk spool of batches: append-only, checksummed segments; ack to delete.

Synchronous and self-contained: the daemon calls it from worker threads (asyncio.to_thread);
every public method is thread-safe.

API
---
    spool = Spool(directory, max_size=1 << 30, when_full="block", segment_size=32 << 20)
    report = spool.open()            # RecoveryReport: log report.as_dict()
    rid = spool.append(batch)        # durable (fsync'd) on return; SpoolFull, SpoolWriteError
    res = spool.append_ex(batch)     # AppendResult(record_id, dropped_batches, dropped_events)
    item = spool.next_batch()        # (rid, Batch) oldest not handed out and not acked, or None
    items = spool.next_batches(n)    # up to n of them, oldest first
    spool.release(rid)               # hand a record out again (retry later)
    spool.ack(rid) / spool.ack_many(rids)   # delivered: never replayed after a restart
    spool.stats()                    # dict for logs/metrics
    spool.purge()                    # delete every segment -> (batches, events) removed
    spool.close()
    spool.size_bytes, spool.pending_batches, spool.pending_events
    inspect_spool(directory)         # read-only stats + recovery report, for `spool stats` (CLI)

`Spool(d).open(readonly=True)` reads without modifying anything (no lock, no truncation, no
quarantine); append/ack/purge then raise SpoolError. A read-write open takes an exclusive
flock on segments/LOCK, so two daemons cannot share a spool (SpoolLocked).

On disk
-------
    <directory>/segments/<seq:012d>.seg   records, append-only
    <directory>/segments/<seq:012d>.ack   acked record offsets of that segment, append-only
    <directory>/quarantine/<seq:012d>.seg[.N]   segments with corruption in the middle

A record is a 24-byte header then the payload, all little-endian:
    magic b"\\xfeS" | version u8 (=1) | flags u8 | payload length u32 | events u32 |
    created (unix ms) u64 | crc32 of header bytes 0..19 + payload
flags is 0 for a batch. The payload of a batch of n events is 2n u32 lengths (in code points:
the n events, then the n timestamps) followed by the UTF-8 (surrogatepass) encoding of all those
strings concatenated; any str round-trips, decoding is one bytes->str decode plus slicing. 0xFE
never occurs in UTF-8, so the magic cannot appear in event text.
flags 1 marks a filler: events 0, created 0, a zero payload. Fillers are written only by
recovery, over corrupt byte ranges, so that every other record keeps its offset; they are never
replayed. (Versions without fillers see one as corruption: they quarantine the segment again
and replay only the records before it.)
An ack entry is 12 bytes: record offset u64 | crc32(seq u64, offset u64). Torn or bad entries
are ignored (the record is then replayed: a duplicate, never a loss).

A record id is (segment seq << 40) | offset: increasing in append order.

Recovery (open)
---------------
Every complete record with a good checksum is recovered. At a bad byte, recovery resynchronises:
it looks for the next position where a valid record starts (bytes.find of the magic, each
candidate verified by header, length and checksum: linear in practice; only crafted bytes
with many plausible headers make each candidate cost a checksum over its claimed length).
- Nothing valid after it: a torn tail (short header, short payload, bad checksum at the end,
  zero fill); the file is truncated there (report.truncated).
- A valid record follows: corruption in the middle. The whole original file is hard-linked (or
  copied) into quarantine/ for forensics, then the segment is atomically replaced by a repaired
  copy: the same bytes with every corrupt range overwritten by filler records of exactly its
  length (and any torn tail cut off). Offsets do not move, so the .ack file stays valid, and the
  next open finds a clean segment (nothing is quarantined twice). Every valid record, before
  and after the corruption, is replayed; report.quarantined says where the corruption was,
  how many bytes were skipped and how many records were recovered after it. (A corrupt range
  shorter than a header cannot hold a filler: it swallows the next record(s) until it can;
  those stay only in quarantine. It takes inserted/deleted bytes, which disks do not do.) If the
  repaired copy cannot be written (disk full), the original stays in place, its valid records
  are still replayed from it (same offsets), and the next open tries again.

Bounds: size is the sum of segment file sizes (acked records count until their segment is
deleted; a segment is deleted once every record in it is acked and it is not the one being
written). When an append would exceed max_size: "block" raises SpoolFull; "drop_oldest" deletes
whole oldest segments (sealing the current one first if nothing else is left) and counts the
un-acked batches/events they held as dropped, except those handed out (next_batch, or appended
with claim=True): the caller holds them in memory and still delivers them, so they are not
dropped, only no longer on disk (a crash now loses them; counted in stats "evicted_inflight").
Their later ack()/release() is a no-op.

Disk full: the segment being written is kept while it is fully acked (appending and acking
every batch must not create a file per batch), so its space would never come back when the disk
fills before max_size. An append failing with ENOSPC/EDQUOT therefore deletes every fully acked
segment, the one being written included, and if that freed anything retries once in a new
segment (stats "space_reclaims").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import os
import shutil
import struct
import sys
import threading
import time
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from itertools import accumulate, chain
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .batching import Batch

__all__ = [
    "AppendResult",
    "QuarantinedSegment",
    "RecordTooLarge",
    "RecoveryReport",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "SpoolLocked",
    "SpoolWriteError",
    "TruncatedTail",
    "inspect_spool",
]

MAGIC = b"\xfeS"
VERSION = 1
_HEAD = struct.Struct("<2sBBIIQ")  # everything the crc covers, before the crc itself
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size  # 24
_SYNC = MAGIC + bytes([VERSION])
_ACK = struct.Struct("<QI")
_ACK_KEY = struct.Struct("<QQ")
ACK_SIZE = _ACK.size  # 12
_ID_SHIFT = 40
_OFFSET_MASK = (1 << _ID_SHIFT) - 1
_MAX_PAYLOAD = 0xFFFFFFFF
FLAG_FILLER = 0x01  # a record covering a corrupt range: skipped, never replayed
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_BIG_ENDIAN = sys.byteorder == "big"
assert array("I").itemsize == 4

WhenFull = Literal["block", "drop_oldest"]


class SpoolError(Exception):
    """Base class of the spool's errors."""


class SpoolFull(SpoolError):
    """append() with when_full="block" and no room: apply backpressure, retry later."""


class RecordTooLarge(SpoolError, ValueError):
    """The batch can never fit (larger than max_size, or payload over 4 GiB)."""


class SpoolLocked(SpoolError):
    """Another process holds the spool directory."""


class SpoolWriteError(SpoolError):
    """The disk refused a write (ENOSPC, EIO, EROFS...); the spool is still consistent."""

    def __init__(self, message: str, cause: OSError) -> None:
        super().__init__(f"{message}: {cause}")
        self.cause = cause
        self.errno = cause.errno


class AppendResult(NamedTuple):
    record_id: int
    dropped_batches: int
    dropped_events: int


@dataclass
class TruncatedTail:
    segment: str
    offset: int
    bytes: int


@dataclass
class QuarantinedSegment:
    segment: str
    moved_to: str  # the whole original file
    bad_offset: int  # first byte that is not a good record
    good_records: int  # valid records before bad_offset
    discarded_bytes: int  # bytes not recovered (corrupt ranges, a cut tail): only in moved_to
    recovered_after: int = 0  # valid records after bad_offset, found by resynchronising
    skipped_bytes: int = 0  # bytes of the corrupt ranges in the middle (now filler records)
    skipped: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of each


@dataclass
class RecoveryReport:
    readonly: bool = False
    segments: int = 0
    records: int = 0  # un-acked batches recovered for replay
    events: int = 0
    bytes: int = 0
    acked_records: int = 0  # complete records skipped because their ack was persisted
    truncated: list[TruncatedTail] = field(default_factory=list)
    quarantined: list[QuarantinedSegment] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)  # empty/orphan/temp/fully-acked
    ignored_ack_entries: int = 0

    @property
    def truncated_bytes(self) -> int:
        return sum(t.bytes for t in self.truncated)

    @property
    def clean(self) -> bool:
        return not self.truncated and not self.quarantined

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["truncated_bytes"] = self.truncated_bytes
        return d


class _Corrupt(Exception):
    pass


@dataclass(eq=False)
class _Segment:
    seq: int
    path: Path
    size: int = 0  # bytes of good records (= file size once consistent)
    total: int = 0  # records in the file
    # Un-acked records, in offset order: offset -> (record length, events, created ms).
    recs: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    fd: int | None = None  # read-write fd while this is the segment being written

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(".ack")


# -- encoding -------------------------------------------------------------------------------


def _encode(batch: Batch) -> tuple[bytes, int]:
    events, times = batch.events, batch.times
    n = len(events)
    if len(times) != n:
        raise ValueError(f"batch has {n} events but {len(times)} timestamps")
    lens = array("I", map(len, events))
    lens.extend(map(len, times))
    if _BIG_ENDIAN:
        lens.byteswap()
    text = "".join(chain(events, times)).encode("utf-8", "surrogatepass")
    return lens.tobytes() + text, n


def _decode(payload: memoryview, n: int) -> Batch:
    k = 8 * n
    lens = array("I")
    lens.frombytes(payload[:k])
    if _BIG_ENDIAN:
        lens.byteswap()
    text = str(payload[k:], "utf-8", "surrogatepass")
    ends = list(accumulate(lens))
    if (ends[-1] if ends else 0) != len(text):
        raise _Corrupt("string lengths do not match the text")
    starts = [0, *ends]  # one longer than ends: zip stops at the last string
    strs = [text[a:b] for a, b in zip(starts, ends, strict=False)]
    return Batch(strs[:n], strs[n:])


def _record(batch: Batch, created_ms: int) -> tuple[bytes, int]:
    payload, n = _encode(batch)
    if len(payload) > _MAX_PAYLOAD:
        raise RecordTooLarge(f"batch payload of {len(payload)} bytes exceeds 4 GiB")
    head = _HEAD.pack(MAGIC, VERSION, 0, len(payload), n, created_ms)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, _CRC.pack(crc), payload)), n


def _filler(length: int) -> bytes:
    """Filler records covering exactly `length` (>= HEADER_SIZE) bytes."""
    assert length >= HEADER_SIZE
    parts: list[bytes] = []
    while length:
        size = min(length, HEADER_SIZE + _MAX_PAYLOAD)
        if 0 < length - size < HEADER_SIZE:
            size -= HEADER_SIZE
        zeros = bytes(size - HEADER_SIZE)
        head = _HEAD.pack(MAGIC, VERSION, FLAG_FILLER, len(zeros), 0, 0)
        parts += (head, _CRC.pack(zlib.crc32(zeros, zlib.crc32(head))), zeros)
        length -= size
    return b"".join(parts)


class _Parsed(NamedTuple):
    length: int  # header + payload
    events: int
    created: int  # unix ms
    flags: int  # 0: a batch, FLAG_FILLER: a filler


def _parse_at(data: bytes | memoryview, pos: int) -> _Parsed | None:
    """The valid record (batch or filler) at `pos`, else None."""
    end = len(data)
    if end - pos < HEADER_SIZE:
        return None
    magic, version, flags, plen, n, created = _HEAD.unpack_from(data, pos)
    if magic != MAGIC or version != VERSION or 8 * n > plen:
        return None
    if flags != 0 and (flags != FLAG_FILLER or n != 0):
        return None
    stop = pos + HEADER_SIZE + plen
    if stop > end:
        return None
    (crc,) = _CRC.unpack_from(data, pos + _HEAD.size)
    view = memoryview(data)
    if zlib.crc32(view[pos + HEADER_SIZE : stop], zlib.crc32(view[pos : pos + _HEAD.size])) != crc:
        return None
    return _Parsed(HEADER_SIZE + plen, n, created, flags)


def _next_valid(data: bytes, start: int) -> int:
    """Offset of the first valid record (batch or filler) at or after `start`, or -1."""
    i = data.find(_SYNC, start)
    while i != -1:
        if _parse_at(data, i) is not None:
            return i
        i = data.find(_SYNC, i + 1)
    return -1


class _Scan(NamedTuple):
    records: list[tuple[int, int, int, int]]  # batches: offset, length, events, created ms
    holes: list[tuple[int, int]]  # corrupt ranges [start, stop) before good_end
    good_end: int  # the file is cut here: what follows is not recoverable
    size: int  # of the file
    prefix: int  # records before the first corrupt byte
    tail_corrupt: bool  # the cut tail holds valid records (no room for a filler before them)

    @property
    def corrupt(self) -> bool:
        """Corruption in the middle (valid records after it): quarantine and repair."""
        return bool(self.holes) or self.tail_corrupt

    @property
    def bad_offset(self) -> int:
        return self.holes[0][0] if self.holes else self.good_end


def _scan(data: bytes) -> _Scan:
    """Index every valid record; resynchronise after corrupt ranges (see the docstring)."""
    recs: list[tuple[int, int, int, int]] = []
    holes: list[tuple[int, int]] = []
    pos, end = 0, len(data)
    tail_corrupt = False
    while pos < end:
        r = _parse_at(data, pos)
        if r is not None:
            if r.flags == 0:
                recs.append((pos, r.length, r.events, r.created))
            pos += r.length
            continue
        nxt = _next_valid(data, pos + 1)
        if nxt == -1:
            break  # a torn tail
        if nxt - pos < HEADER_SIZE:  # no room for a filler: swallow what follows
            nxt = _next_valid(data, pos + HEADER_SIZE)
            if nxt == -1:
                tail_corrupt = True
                break
        holes.append((pos, nxt))
        pos = nxt
    prefix = sum(1 for r in recs if r[0] < holes[0][0]) if holes else len(recs)
    return _Scan(recs, holes, pos, end, prefix, tail_corrupt)


def _ack_entry(seq: int, offset: int) -> bytes:
    return _ACK.pack(offset, zlib.crc32(_ACK_KEY.pack(seq, offset)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:  # pragma: no cover - pwrite raises instead on Linux
            raise OSError(errno.EIO, "short write")
        view = view[written:]
        offset += written


def _record_id(seq: int, offset: int) -> int:
    return (seq << _ID_SHIFT) | offset


def _seq_of(name: str) -> int | None:
    stem = name.split(".", 1)[0]
    return int(stem) if len(stem) == 12 and stem.isdigit() else None


# -- the spool ------------------------------------------------------------------------------


class Spool:
    def __init__(
        self,
        directory: Path | str,
        max_size: int = 1 << 30,
        when_full: WhenFull = "block",
        segment_size: int = 32 << 20,
    ) -> None:
        if when_full not in ("block", "drop_oldest"):
            raise ValueError(f"when_full must be 'block' or 'drop_oldest', not {when_full!r}")
        if max_size <= 0 or segment_size <= 0:
            raise ValueError("max_size and segment_size must be positive")
        self.directory = Path(directory)
        self.seg_dir = self.directory / "segments"
        self.quarantine_dir = self.directory / "quarantine"
        self.max_size = max_size
        self.when_full: WhenFull = when_full
        self.segment_size = segment_size
        # _wlock serialises appends (and anything touching the segment being written); it is
        # taken before _lock, never while holding it. _lock guards every in-memory structure.
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}  # ascending seq
        self._writing: _Segment | None = None
        self._next_seq = 0
        self._ready: list[int] = []  # heap of record ids that may be handed out
        self._inflight: set[int] = set()
        self._size = 0
        self._pending_batches = 0
        self._pending_events = 0
        self._rfd: tuple[int, int] | None = None  # cached read fd: (seq, fd)
        self._lock_fd: int | None = None
        self._state: Literal["new", "open", "readonly", "closed"] = "new"
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "appended",
                "appended_events",
                "acked",
                "acked_events",
                "dropped_full",
                "dropped_full_events",
                "evicted_inflight",
                "rejected_full",
                "write_errors",
                "space_reclaims",
                "ack_write_errors",
                "delete_errors",
                "quarantined",
                "repair_errors",
                "corrupt_records",
                "purged",
                "purged_events",
            ),
            0,
        )

    # -- properties -------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def pending_batches(self) -> int:
        """Un-acked batches (including those handed out and not yet acked)."""
        return self._pending_batches

    @property
    def pending_events(self) -> int:
        return self._pending_events

    @property
    def has_ready(self) -> bool:
        """A cheap hint that next_batch() may return something (no lock, no IO)."""
        return bool(self._ready)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- open / recovery --------------------------------------------------------------------

    def open(self, readonly: bool = False) -> RecoveryReport:
        with self._wlock, self._lock:
            if self._state != "new":
                raise SpoolError(f"spool already {self._state}")
            report = RecoveryReport(readonly=readonly)
            if not readonly:
                if not self.seg_dir.is_dir():
                    self.seg_dir.mkdir(parents=True, exist_ok=True)
                    _fsync_dir(self.directory)
                self._take_lock()
            try:
                self._recover(report, readonly)
            except BaseException:
                self._release_lock()
                raise
            self._state = "readonly" if readonly else "open"
            report.segments = len(self._segments)
            return report

    def _take_lock(self) -> None:
        fd = os.open(self.seg_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise SpoolLocked(f"{self.directory} is used by another process") from e
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self, report: RecoveryReport, readonly: bool) -> None:
        if not self.seg_dir.is_dir():
            return
        names = sorted(os.listdir(self.seg_dir))
        segs: dict[int, Path] = {}
        acks: set[int] = set()
        dir_changed = False
        for name in names:
            seq = _seq_of(name)
            if seq is None:
                continue
            path = self.seg_dir / name
            if name.endswith(".seg"):
                segs[seq] = path
            elif name.endswith(".ack"):
                acks.add(seq)
            elif name.endswith(".tmp"):
                # A quarantine prefix copy interrupted before its atomic rename: the original
                # segment is still in place and gets redone below.
                if not readonly:
                    path.unlink()
                    dir_changed = True
                report.removed_files.append(name)
        for seq in sorted(acks - segs.keys()):
            name = f"{seq:012d}.ack"
            if not readonly:
                (self.seg_dir / name).unlink()
                dir_changed = True
            report.removed_files.append(name)
        for seq in sorted(segs):
            dir_changed |= self._recover_segment(seq, segs[seq], report, readonly)
        self._next_seq = max(segs, default=-1) + 1
        # Fully acked segments (nothing is being written yet): delete now.
        for seg in list(self._segments.values()):
            if not seg.recs and not readonly and self._delete_or_count(seg, fsync_dir=False):
                report.removed_files.append(seg.path.name)
                dir_changed = True
        if dir_changed and not readonly:
            _fsync_dir(self.seg_dir)
        for seg in self._segments.values():
            for off, (_length, n, _created) in seg.recs.items():
                self._ready.append(_record_id(seg.seq, off))
                report.records += 1
                report.events += n
            report.bytes += seg.size
        heapq.heapify(self._ready)

    def _recover_segment(
        self, seq: int, path: Path, report: RecoveryReport, readonly: bool
    ) -> bool:
        """Load one segment into memory; True if the directory changed."""
        data = path.read_bytes()
        name = path.name
        ack_path = path.with_suffix(".ack")
        if not data:
            if not readonly:
                path.unlink()
                ack_path.unlink(missing_ok=True)
            report.removed_files.append(name)
            return True
        scan = _scan(data)
        changed = False
        cut = scan.size - scan.good_end
        if cut and not scan.tail_corrupt:
            report.truncated.append(TruncatedTail(name, scan.good_end, cut))
        if scan.corrupt:
            moved_to = (
                self._quarantine_path(path, data)
                if readonly
                else self._quarantine(path, data, scan)
            )
            skipped = sum(stop - start for start, stop in scan.holes)
            report.quarantined.append(
                QuarantinedSegment(
                    name,
                    str(moved_to),
                    bad_offset=scan.bad_offset,
                    good_records=scan.prefix,
                    discarded_bytes=skipped + cut,
                    recovered_after=len(scan.records) - scan.prefix,
                    skipped_bytes=skipped,
                    skipped=[(start, stop - start) for start, stop in scan.holes],
                )
            )
            self.counters["quarantined"] += 1
            changed = True
        elif cut and not readonly:
            fd = os.open(path, os.O_RDWR)
            try:
                os.ftruncate(fd, scan.good_end)
                os.fsync(fd)
            finally:
                os.close(fd)
        if not scan.records:
            if not readonly and path.exists():
                path.unlink()
                ack_path.unlink(missing_ok=True)
                changed = True
            if not scan.corrupt:
                report.removed_files.append(name)
            return changed
        seg = _Segment(seq, path, size=scan.good_end, total=len(scan.records))
        seg.recs = {off: (length, n, created) for off, length, n, created in scan.records}
        acked = self._load_acks(seg, report, readonly)
        for off in acked:
            if seg.recs.pop(off, None) is not None:
                report.acked_records += 1
        self._segments[seq] = seg
        self._size += seg.size
        for _length, n, _created in seg.recs.values():
            self._pending_batches += 1
            self._pending_events += n
        return changed

    def _load_acks(self, seg: _Segment, report: RecoveryReport, readonly: bool) -> set[int]:
        try:
            data = seg.ack_path.read_bytes()
        except FileNotFoundError:
            return set()
        acked: set[int] = set()
        whole = len(data) - len(data) % ACK_SIZE
        for pos in range(0, whole, ACK_SIZE):
            entry = data[pos : pos + ACK_SIZE]
            off, _crc = _ACK.unpack(entry)
            if entry == _ack_entry(seg.seq, off) and off in seg.recs:
                acked.add(off)
            else:
                report.ignored_ack_entries += 1
        if whole != len(data):
            report.ignored_ack_entries += 1
            if not readonly:  # keep later entries aligned
                os.truncate(seg.ack_path, whole)
        return acked

    def _quarantine_path(self, path: Path, data: bytes | None = None) -> Path:
        """Where `path` goes in quarantine/: an existing copy of it if there is one."""
        candidate = self.quarantine_dir / path.name
        i = 0
        while candidate.exists():
            with contextlib.suppress(OSError):
                if candidate.samefile(path):  # a previous, interrupted quarantine
                    return candidate
                if (
                    data is not None
                    and candidate.stat().st_size == len(data)
                    and candidate.read_bytes() == data
                ):  # copied (no hard links) by an open that could not repair the segment
                    return candidate
            i += 1
            candidate = self.quarantine_dir / f"{path.name}.{i}"
        return candidate

    def _quarantine(self, path: Path, data: bytes, scan: _Scan) -> Path:
        """Keep the whole file in quarantine/, repair it in place (same offsets).

        Crash-safe order: link the original into quarantine (fsync), then atomically replace
        the segment by its repaired copy (corrupt ranges overwritten by fillers, the tail cut
        at good_end). An interruption leaves the original in place and the next open redoes it
        (reusing the same quarantine file). If the repaired copy cannot be written, the
        original stays: its valid records are read from it, and the next open tries again.
        """
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self._quarantine_path(path, data)
        if not dest.exists():
            try:
                os.link(path, dest)
            except OSError:
                shutil.copyfile(path, dest)
                fd = os.open(dest, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(self.quarantine_dir)
            _fsync_dir(self.directory)
        if scan.records:
            repaired = bytearray(memoryview(data)[: scan.good_end])
            for start, stop in scan.holes:
                repaired[start:stop] = _filler(stop - start)
            tmp = path.with_suffix(".seg.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                try:
                    _pwrite_all(fd, repaired, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except OSError:
                self.counters["repair_errors"] += 1
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return dest

    # -- append -----------------------------------------------------------------------------

    def append(self, batch: Batch, claim: bool = False) -> int:
        """Store `batch`; returns its record id once it is on disk (fsync'd).

        claim=True: the caller keeps the batch and is already sending it (a retry after a
        first failure); the record counts as handed out, so next_batch() never returns it
        in this run and delivering it twice is impossible. ack() or release() it as usual.
        """
        return self.append_ex(batch, claim).record_id

    def append_ex(self, batch: Batch, claim: bool = False) -> AppendResult:
        """append() that also says how many batches/events drop_oldest discarded to make room."""
        created_ms = time.time_ns() // 1_000_000
        rec, n = _record(batch, created_ms)
        reclen = len(rec)
        if reclen > self.max_size:
            raise RecordTooLarge(f"record of {reclen} bytes exceeds max_size {self.max_size}")
        dropped_b = dropped_e = 0
        with self._wlock:
            for attempt in range(2):
                with self._lock:
                    self._check_writable()
                    b, e = self._make_room(reclen)
                    dropped_b, dropped_e = dropped_b + b, dropped_e + e
                    seg = self._writing_segment(reclen)
                    offset = seg.size
                    fd = seg.fd
                    assert fd is not None
                try:
                    _pwrite_all(fd, rec, offset)
                    os.fsync(fd)
                except OSError as err:
                    with self._lock:
                        self._undo_partial_write(seg, offset)
                        if attempt == 0 and err.errno in _NO_SPACE and self._reclaim_acked():
                            self.counters["space_reclaims"] += 1
                            continue  # once, in a new segment
                        self.counters["write_errors"] += 1
                    raise SpoolWriteError(f"cannot append to {seg.path}", err) from err
                with self._lock:
                    seg.size = offset + reclen
                    seg.total += 1
                    seg.recs[offset] = (reclen, n, created_ms)
                    rid = _record_id(seg.seq, offset)
                    if claim:
                        self._inflight.add(rid)
                    else:
                        heapq.heappush(self._ready, rid)
                    self._size += reclen
                    self._pending_batches += 1
                    self._pending_events += n
                    self.counters["appended"] += 1
                    self.counters["appended_events"] += n
                return AppendResult(rid, dropped_b, dropped_e)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_writable(self) -> None:
        if self._state != "open":
            raise SpoolError(f"spool is {self._state}, not open for writing")

    def _make_room(self, reclen: int) -> tuple[int, int]:
        dropped_b = dropped_e = 0
        while self._size + reclen > self.max_size:
            w = self._writing
            if w is not None and not w.recs and w.total:
                # The segment being written is fully acked: seal it so its space comes back.
                self._seal_writing()
                self._delete_or_count(w)
                continue
            if self.when_full == "block":
                self.counters["rejected_full"] += 1
                raise SpoolFull(
                    f"spool full: {self._size} + {reclen} bytes > max_size {self.max_size}"
                )
            victim = next((s for s in self._segments.values() if s is not self._writing), None)
            if victim is None:
                if w is None or not w.total:  # pragma: no cover - reclen <= max_size
                    raise SpoolFull("spool full and nothing left to drop")
                self._seal_writing()
                continue
            # Handed-out records live on in the caller's memory and get delivered (or released,
            # a no-op then): not dropped, only no longer on disk.
            held = b = e = 0
            for off, (_length, n, _created) in victim.recs.items():
                if _record_id(victim.seq, off) in self._inflight:
                    held += 1
                else:
                    b, e = b + 1, e + n
            try:
                self._delete_segment(victim, fsync_dir=True)
            except OSError as err:
                self.counters["delete_errors"] += 1
                raise SpoolWriteError(f"cannot drop {victim.path}", err) from err
            dropped_b += b
            dropped_e += e
            self.counters["evicted_inflight"] += held
            self.counters["dropped_full"] += b
            self.counters["dropped_full_events"] += e
        return dropped_b, dropped_e

    def _reclaim_acked(self) -> bool:
        """Disk full: delete every fully acked segment, the one being written included.

        True if that freed any bytes (worth one more try). Only here is a fully acked segment
        being written given up early: in the normal case it is kept until it is full or its
        space is needed for max_size, so that appending and acking every batch (write-ahead)
        does not create a file per batch.
        """
        w = self._writing
        if w is not None and w.total and not w.recs:
            self._seal_writing()
        freed = 0
        for seg in list(self._segments.values()):
            size = seg.size
            if seg.total and not seg.recs and self._delete_or_count(seg, fsync_dir=False):
                freed += size
        if freed:
            with contextlib.suppress(OSError):
                _fsync_dir(self.seg_dir)
        return freed > 0

    def _writing_segment(self, reclen: int) -> _Segment:
        w = self._writing
        if w is not None and w.size and w.size + reclen > self.segment_size:
            self._seal_writing()
            self._delete_or_count(w)
            w = None
        if w is None:
            seq = self._next_seq
            path = self.seg_dir / f"{seq:012d}.seg"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
            except OSError as e:
                self.counters["write_errors"] += 1
                raise SpoolWriteError(f"cannot create {path}", e) from e
            try:
                _fsync_dir(self.seg_dir)
            except OSError as e:
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()
                self.counters["write_errors"] += 1
                raise SpoolWriteError(f"cannot sync {self.seg_dir}", e) from e
            self._next_seq += 1
            w = _Segment(seq, path, fd=fd)
            self._segments[seq] = w
            self._writing = w
        return w

    def _seal_writing(self) -> None:
        w = self._writing
        if w is not None:
            self._writing = None
            if w.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(w.fd)
                w.fd = None

    def _undo_partial_write(self, seg: _Segment, offset: int) -> None:
        """Cut a failed append back to the last good record; seal the segment if we cannot."""
        fd = seg.fd
        try:
            assert fd is not None
            os.ftruncate(fd, offset)
            os.fsync(fd)
        except OSError:
            # Unknown tail on disk: stop writing here. Memory only knows good records, and
            # the next open() truncates the torn tail.
            if self._writing is seg:
                self._seal_writing()
                if not seg.total:
                    with contextlib.suppress(OSError):
                        self._delete_segment(seg, fsync_dir=True)

    # -- reading ----------------------------------------------------------------------------

    def next_batch(self) -> tuple[int, Batch] | None:
        """Oldest un-acked record not already handed out in this run, or None."""
        got = self.next_batches(1)
        return got[0] if got else None

    def next_batches(self, limit: int) -> list[tuple[int, Batch]]:
        out: list[tuple[int, Batch]] = []
        while len(out) < limit:
            raw: list[tuple[int, bytes, int]] = []
            with self._lock:
                if self._state not in ("open", "readonly"):
                    raise SpoolError(f"spool is {self._state}")
                while len(raw) + len(out) < limit and self._ready:
                    rid = heapq.heappop(self._ready)
                    seg = self._segments.get(rid >> _ID_SHIFT)
                    off = rid & _OFFSET_MASK
                    if seg is None or rid in self._inflight:
                        continue
                    meta = seg.recs.get(off)
                    if meta is None:
                        continue
                    try:
                        data = self._read(seg, off, meta[0])
                    except OSError:
                        data = b""
                    raw.append((rid, data, meta[1]))
                    self._inflight.add(rid)
            if not raw:
                break
            for rid, data, n in raw:
                try:
                    out.append((rid, self._decode_record(data, n)))
                except _Corrupt:
                    self._corrupt_at_runtime(rid)
        return out

    def _read(self, seg: _Segment, offset: int, length: int) -> bytes:
        if seg.fd is not None:
            fd = seg.fd
        elif self._rfd is not None and self._rfd[0] == seg.seq:
            fd = self._rfd[1]
        else:
            self._close_rfd()
            fd = os.open(seg.path, os.O_RDONLY)
            self._rfd = (seg.seq, fd)
        return os.pread(fd, length, offset)

    @staticmethod
    def _decode_record(data: bytes, n: int) -> Batch:
        parsed = _parse_at(data, 0)
        if parsed is None or parsed.flags or parsed.length != len(data) or parsed.events != n:
            raise _Corrupt("bad record")
        try:
            return _decode(memoryview(data)[HEADER_SIZE:], n)
        except (UnicodeDecodeError, ValueError) as e:
            raise _Corrupt(str(e)) from e

    def _corrupt_at_runtime(self, rid: int) -> None:
        """A record that verified at open/append no longer does: keep the file, skip it."""
        with self._lock:
            self._inflight.discard(rid)
            seg = self._segments.get(rid >> _ID_SHIFT)
            if seg is None:
                return
            meta = seg.recs.pop(rid & _OFFSET_MASK, None)
            if meta is None:
                return
            self._pending_batches -= 1
            self._pending_events -= meta[1]
            self.counters["corrupt_records"] += 1
            if self._state == "open":
                with contextlib.suppress(OSError):
                    self.quarantine_dir.mkdir(parents=True, exist_ok=True)
                    dest = self._quarantine_path(seg.path)
                    if not dest.exists():
                        os.link(seg.path, dest)
                        self.counters["quarantined"] += 1
            # Not acked on disk: the next open() finds the corruption and quarantines properly.

    def release(self, record_id: int) -> None:
        """Put a handed-out, un-acked record back: it is handed out again (oldest first)."""
        with self._lock:
            if record_id in self._inflight:
                self._inflight.discard(record_id)
                heapq.heappush(self._ready, record_id)

    # -- acks -------------------------------------------------------------------------------

    def ack(self, record_id: int) -> None:
        self.ack_many((record_id,))

    def ack_many(self, record_ids: Iterable[int]) -> None:
        """Mark records delivered: one ack-file write + fsync per touched segment.

        Unknown or already acked ids are ignored. Never raises on disk errors: an ack that
        could not be persisted only means a duplicate after a restart (counted).
        """
        with self._lock:
            self._check_writable()
            touched: dict[int, list[int]] = {}
            for rid in record_ids:
                seq, off = rid >> _ID_SHIFT, rid & _OFFSET_MASK
                self._inflight.discard(rid)
                seg = self._segments.get(seq)
                if seg is None:
                    continue
                meta = seg.recs.pop(off, None)
                if meta is None:
                    continue
                self._pending_batches -= 1
                self._pending_events -= meta[1]
                self.counters["acked"] += 1
                self.counters["acked_events"] += meta[1]
                touched.setdefault(seq, []).append(off)
            dir_changed = False
            for seq, offs in touched.items():
                seg = self._segments[seq]
                if self._delete_or_count(seg, fsync_dir=False):
                    dir_changed = True
                    continue
                entries = b"".join(_ack_entry(seq, off) for off in offs)
                try:
                    fd = os.open(seg.ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                    try:
                        os.write(fd, entries)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError:
                    self.counters["ack_write_errors"] += 1
            if dir_changed:
                with contextlib.suppress(OSError):
                    _fsync_dir(self.seg_dir)

    # -- deletion ---------------------------------------------------------------------------

    def _delete_segment(self, seg: _Segment, fsync_dir: bool) -> None:
        """Unlink a segment and its ack file, forget it (raises OSError if unlink fails)."""
        if self._rfd is not None and self._rfd[0] == seg.seq:
            self._close_rfd()
        if seg is self._writing:
            self._seal_writing()
        seg.path.unlink(missing_ok=True)
        seg.ack_path.unlink(missing_ok=True)
        del self._segments[seg.seq]
        self._size -= seg.size
        for off, (_length, n, _created) in seg.recs.items():
            self._pending_batches -= 1
            self._pending_events -= n
            self._inflight.discard(_record_id(seg.seq, off))
        if fsync_dir:
            _fsync_dir(self.seg_dir)

    def _delete_or_count(self, seg: _Segment, fsync_dir: bool = True) -> bool:
        """Delete `seg` if fully acked and not being written; failures are counted, retried."""
        if seg.recs or seg is self._writing or seg.seq not in self._segments:
            return False
        try:
            self._delete_segment(seg, fsync_dir=fsync_dir)
        except OSError:
            self.counters["delete_errors"] += 1
            return False
        return True

    def purge(self) -> tuple[int, int]:
        """Delete every segment (CLI `spool purge`); returns (batches, events) discarded."""
        with self._wlock, self._lock:
            self._check_writable()
            b, e = self._pending_batches, self._pending_events
            self._seal_writing()
            for seg in list(self._segments.values()):
                try:
                    self._delete_segment(seg, fsync_dir=False)
                except OSError as err:
                    raise SpoolWriteError(f"cannot delete {seg.path}", err) from err
            _fsync_dir(self.seg_dir)
            self._ready.clear()
            self._inflight.clear()
            self.counters["purged"] += b
            self.counters["purged_events"] += e
            return b, e

    # -- close / stats ----------------------------------------------------------------------

    def _close_rfd(self) -> None:
        if self._rfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._rfd[1])
            self._rfd = None

    def close(self) -> None:
        with self._wlock, self._lock:
            if self._state in ("new", "closed"):
                self._state = "closed"
                return
            w = self._writing
            self._seal_writing()
            if w is not None and self._state == "open":
                self._delete_or_count(w)
            self._close_rfd()
            self._release_lock()
            self._state = "closed"

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            oldest = next((s for s in self._segments.values() if s.recs), None)
            age = 0.0
            if oldest is not None:
                created = next(iter(oldest.recs.values()))[2]
                age = max(0.0, time.time() - created / 1000)
            out: dict[str, int | float] = {
                "batches": self._pending_batches,
                "events": self._pending_events,
                "bytes": self._size,
                "oldest_age_seconds": round(age, 3),
                "segments": len(self._segments),
                "inflight": len(self._inflight),
                "max_size": self.max_size,
            }
            out.update(self.counters)
            return out


def inspect_spool(directory: Path | str) -> dict[str, Any]:
    """Read-only look at a spool directory (no daemon needed; safe while one runs)."""
    spool = Spool(directory)
    report = spool.open(readonly=True)
    try:
        return {"stats": spool.stats(), "recovery": report.as_dict()}
    finally:
        spool.close()
