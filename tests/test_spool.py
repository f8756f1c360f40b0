"""The durable spool (haproxy_forwarder/spool/), on real files in tmp_path.

Disk faults (ENOSPC, EIO, EROFS, torn writes, crashes) go through the `Filesystem` seam.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.probe import wait_until
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.observability.counters import SpoolCounters
from haproxy_forwarder.spool import (
    HEADER_SIZE,
    Filesystem,
    RecordTooLarge,
    Spool,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolWriteError,
    inspect_spool,
)
from haproxy_forwarder.spool import format as fmt

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "spool-v1"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "spool-v2"

ODD = [
    "",
    "plain",
    'quotes " and \\ backslashes \\"',
    "line\nfeed\r\n",
    "nul\x00inside\x00 esc\x1b del\x7f c1\x85",
    "repl\ufffdacement",
    "non-BMP \U0001f600 \U00010348",
    "\ufeffbom",
    "é" * 1000,
    "x" * 70_000,
]


def batch(tag: str, n: int = 3) -> Batch:
    return Batch.from_events(
        [f"{tag}-{i}" for i in range(n)], [f"2026-01-01T00:00:0{i % 10}.000Z" for i in range(n)]
    )


def put(sp: Spool, b: Batch, claim: bool = False) -> int:
    return sp.append(b, claim=claim).record_id


def first_event(b: Batch) -> str:
    return b.events()[0]


def drain(sp: Spool) -> list[tuple[int, Batch]]:
    out: list[tuple[int, Batch]] = []
    while (item := sp.next_batch()) is not None:
        out.append(item)
    return out


def seg_files(d: Path, ext: str = "seg") -> list[Path]:
    return sorted((d / "segments").glob(f"*.{ext}"))


def offset(rid: int) -> int:
    return rid & ((1 << 40) - 1)


def reclen(b: Batch | None = None) -> int:
    return len(fmt.encode_record(b if b is not None else batch("b0"), 0))


# -- the filesystem seam with faults ------------------------------------------------------------


@dataclass
class Fault:
    op: str
    errno: int
    times: int | None  # None: every call
    partial: int  # pwrite/write: bytes really written before the error
    suffix: str | None  # only paths ending so
    crash: bool  # raise Crash (the process dies) instead of OSError
    short: bool = False  # write: return `partial` (a short write, as a full disk) instead


class Crash(BaseException):
    """The process dies here (nothing after it runs, not even except OSError)."""


class FaultyFs(Filesystem):
    """The real filesystem, with calls that fail on demand, and a crash (every fd closed)."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.fds: set[int] = set()

    def fail(
        self,
        op: str,
        err: int,
        *,
        times: int | None = 1,
        partial: int = 0,
        suffix: str | None = None,
        crash: bool = False,
        short: bool = False,
    ) -> None:
        self.faults.append(Fault(op, err, times, partial, suffix, crash, short))

    def heal(self) -> None:
        self.faults.clear()

    def crash(self) -> None:
        """What the kernel does when the process dies: close its fds (the flock goes too)."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def _check(
        self,
        op: str,
        path: Path | None = None,
        data: memoryview | None = None,
        fd: int = -1,
        offset: int = 0,
    ) -> int | None:
        """Raise the fault armed for this call, if any; a short write returns its count."""
        for f in self.faults:
            if f.op != op or f.times == 0:
                continue
            if f.suffix is not None and not str(path).endswith(f.suffix):
                continue
            if f.times is not None:
                f.times -= 1
            if f.partial and data is not None:
                if op == "write":  # O_APPEND: at the end, wherever `offset` says
                    super().write(fd, bytes(data[: f.partial]))
                else:
                    super().pwrite(fd, data[: f.partial], offset)
                if f.short:
                    return f.partial
            if f.crash:
                raise Crash
            raise OSError(f.errno, os.strerror(f.errno))
        return None

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        self._check("open", path)
        fd = super().open(path, flags, mode)
        self.fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.discard(fd)
        super().close(fd)
        self._check("close")  # after: the fd is gone even when close reports an error

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        self._check("pwrite", data=data, fd=fd, offset=offset)
        return super().pwrite(fd, data, offset)

    def write(self, fd: int, data: bytes) -> int:
        short = self._check("write", data=memoryview(data), fd=fd)
        return short if short is not None else super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._check("fsync")
        super().fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self._check("ftruncate")
        super().ftruncate(fd, length)

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        self._check("unlink", path)
        super().unlink(path, missing_ok)

    def link(self, src: Path, dst: Path) -> None:
        self._check("link", src)
        super().link(src, dst)

    def replace(self, src: Path, dst: Path) -> None:
        self._check("replace", dst)
        super().replace(src, dst)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Spool]]:
    opened: list[Spool] = []

    def factory(**kw: Any) -> Spool:
        sp = Spool(tmp_path / "spool", **kw)
        opened.append(sp)
        return sp

    yield factory
    for sp in opened:
        sp.close()


def reopen(sp: Spool, **kw: Any) -> tuple[Spool, Any]:
    sp.close()
    new = Spool(sp.directory, **kw)
    return new, new.open()


def crashed(d: Path, k: int = 3, ack: tuple[int, ...] = ()) -> tuple[Path, list[int]]:
    """A segment with k records r0..r{k-1} (those in `ack` acked), left as after a crash."""
    fs = FaultyFs()
    sp = Spool(d, fs=fs)
    sp.open()
    ids = [put(sp, batch(f"r{i}", 4)) for i in range(k)]
    for i in ack:
        sp.ack(ids[i])
    fs.crash()  # no close(): nothing is cleaned up
    return seg_files(d)[0], [offset(r) for r in ids]


# -- round trip and order --------------------------------------------------------------------


def test_round_trip_odd_strings(make: Callable[..., Spool]) -> None:
    sp = make()
    assert sp.open().clean
    times = [f"2026-01-01T00:00:{i:02d}.000+02:00".encode() for i in range(len(ODD))]
    b = Batch.from_events(ODD, times)
    rid = put(sp, b)
    got = sp.next_batch()
    assert got is not None
    assert got[0] == rid
    assert got[1].events() == ODD and got[1].times == times
    assert got[1].data == b.data and got[1].ends == b.ends  # the encoded bytes, as they were
    sp, report = reopen(sp)
    assert report.records == 1 and report.events == len(ODD)
    got = sp.next_batch()
    assert got is not None and got[1].events() == ODD and got[1].times == times
    sp.close()


def test_empty_batch_and_inconsistent_batch(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    put(sp, Batch())
    item = sp.next_batch()
    # (not .events(): Batch.fragments() of an empty batch raises, reported to the lead)
    assert item is not None and len(item[1]) == 0 and item[1].data == b"" and item[1].times == []
    size = sp.size_bytes
    with pytest.raises(ValueError):
        sp.append(Batch.from_lists(b'"ab"', [3], [b"t"]))  # ends short of the data
    assert sp.size_bytes == size and sp.pending_batches == 1


def test_order_across_segments_and_reopen(make: Callable[..., Spool]) -> None:
    sp = make(segment_size=300)
    sp.open()
    ids = [put(sp, batch(f"b{i}")) for i in range(40)]
    assert ids == sorted(ids)
    assert len(seg_files(sp.directory)) > 5
    first = [sp.next_batch() for _ in range(10)]
    assert [first_event(f[1]) for f in first if f] == [f"b{i}-0" for i in range(10)]
    # Appended after open, handed out after older ones; nothing is handed out twice.
    ids.append(put(sp, batch("late")))
    rest = drain(sp)
    assert [r for r, _ in rest] == ids[10:]
    assert sp.next_batch() is None
    assert sp.stats()["inflight"] == 41
    sp, report = reopen(sp, segment_size=300)
    assert report.records == 41 and report.clean
    assert [first_event(b) for _, b in drain(sp)] == [f"b{i}-0" for i in range(40)] + ["late-0"]
    sp.close()


def test_claimed_append_is_never_handed_out(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    r0 = put(sp, batch("held"), claim=True)
    r1 = put(sp, batch("free"))
    assert [r for r, _ in drain(sp)] == [r1]
    assert sp.pending_batches == 2 and sp.stats()["inflight"] == 2
    sp.ack(r0)
    sp, _ = reopen(sp)
    assert [first_event(b) for _, b in drain(sp)] == ["free-0"]  # replayed after a restart
    sp.close()


# -- acks ------------------------------------------------------------------------------------


def test_ack_then_reopen(make: Callable[..., Spool]) -> None:
    sp = make(segment_size=300)
    sp.open()
    ids = [put(sp, batch(str(i))) for i in range(30)]
    nseg = len(seg_files(sp.directory))
    first_seg = seg_files(sp.directory)[0]
    drain(sp)
    # Ack the whole first segment and every other record after it.
    first_seq = ids[0] >> 40
    acked = [r for r in ids if r >> 40 == first_seq] + ids[-12::2]
    for r in acked:
        sp.ack(r)
    sp.ack(acked[0])  # again: ignored
    sp.ack(12345 << 40)  # unknown: ignored
    assert not first_seg.exists() and not first_seg.with_suffix(".ack").exists()
    assert len(seg_files(sp.directory)) == nseg - 1
    assert sp.pending_batches == 30 - len(acked)
    assert sp.counters.acked_batches == len(acked)
    assert sp.counters.acked_events == 3 * len(acked)
    sp, report = reopen(sp, segment_size=300)
    assert report.acked_records == len(acked) - sum(1 for r in ids if r >> 40 == first_seq)
    left = [r for r, _ in drain(sp)]
    assert left == [r for r in ids if r not in acked]
    for r in left:
        sp.ack(r)
    assert sp.pending_batches == 0
    sp.close()  # nothing being written any more: every segment goes
    assert seg_files(sp.directory) == [] and seg_files(sp.directory, "ack") == []


def test_writing_segment_kept_until_rolled(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    sp.ack(put(sp, batch("a")))
    assert len(seg_files(sp.directory)) == 1  # still being written
    put(sp, batch("b"))
    assert sp.stats()["segments"] == 1


def test_torn_ack_file_replays_never_loses(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    ids = [put(sp, batch(str(i))) for i in range(6)]
    for r in ids[:4]:
        sp.ack(r)
    ack_file = seg_files(sp.directory, "ack")[0]
    sp.close()
    data = ack_file.read_bytes()
    assert len(data) == 4 * fmt.ACK_SIZE
    corrupted = bytearray(data[:-5])  # last entry torn
    corrupted[3] ^= 0xFF  # first entry damaged
    ack_file.write_bytes(bytes(corrupted))
    sp = Spool(sp.directory)
    report = sp.open()
    assert report.ignored_ack_entries == 2
    assert [r for r, _ in drain(sp)] == [ids[0], ids[3], ids[4], ids[5]]
    assert ack_file.stat().st_size % fmt.ACK_SIZE == 0  # realigned
    sp.ack(ids[0])
    sp.close()
    sp = Spool(sp.directory)
    sp.open()
    assert [r for r, _ in drain(sp)] == ids[3:]
    sp.close()


def test_ack_that_cannot_be_written_is_replayed_not_lost(tmp_path: Path) -> None:
    fs = FaultyFs()
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    ids = [put(sp, batch(str(i))) for i in range(3)]
    drain(sp)
    fs.fail("open", errno.EROFS, suffix=".ack")
    sp.ack(ids[0])  # never raises: counted
    fs.heal()
    sp.ack(ids[1])
    assert sp.counters.ack_write_errors == 1 and sp.counters.acked_batches == 2
    assert sp.pending_batches == 1
    sp, _ = reopen(sp)
    assert [r for r, _ in drain(sp)] == [ids[0], ids[2]]  # a duplicate, never a loss
    sp.close()


def _acked_on_disk_then_reopen(sp: Spool, ids: list[int]) -> list[int]:
    """Close, check the .ack file holds whole entries only, reopen: the ids replayed."""
    (ack_file,) = seg_files(sp.directory, "ack")
    sp.close()
    assert ack_file.stat().st_size % fmt.ACK_SIZE == 0
    again = Spool(sp.directory)
    report = again.open()
    assert report.ignored_ack_entries == 0
    got = [r for r, _ in drain(again)]
    again.close()
    assert set(got) <= set(ids)
    return got


def test_torn_ack_entry_is_cut_so_later_acks_are_kept(tmp_path: Path) -> None:
    """An ack whose write fails part-way (1 byte written, then ENOSPC) is counted and cut back
    to the last whole entry: the acks after it stay aligned, so they are not replayed."""
    fs = FaultyFs()
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    ids = [put(sp, batch(f"r{i}")) for i in range(4)]
    drain(sp)
    sp.ack(ids[0])
    fs.fail("write", errno.ENOSPC, partial=1)
    sp.ack(ids[1])  # never raises: counted, replayed after a restart
    assert sp.counters.ack_write_errors == 1
    sp.ack(ids[2])  # returns without error: must never come back
    assert sp.counters.ack_write_errors == 1
    assert _acked_on_disk_then_reopen(sp, ids) == [ids[1], ids[3]]


def test_torn_ack_entry_that_cannot_be_cut_at_once_is_cut_before_the_next(
    tmp_path: Path,
) -> None:
    fs = FaultyFs()
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    ids = [put(sp, batch(f"r{i}")) for i in range(4)]
    drain(sp)
    fs.fail("write", errno.EIO, partial=7)
    fs.fail("ftruncate", errno.EIO)
    sp.ack(ids[0])
    sp.ack(ids[1])
    assert sp.counters.ack_write_errors == 1
    assert _acked_on_disk_then_reopen(sp, ids) == [ids[0], ids[2], ids[3]]


def test_torn_ack_entry_never_cut_writes_nothing_after_it(tmp_path: Path) -> None:
    """The cut keeps failing: no entry is appended after the torn one (each ack is counted);
    the next open cuts the torn entry."""
    fs = FaultyFs()
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    ids = [put(sp, batch(f"r{i}")) for i in range(4)]
    drain(sp)
    sp.ack(ids[0])
    fs.fail("write", errno.EIO, partial=7)
    fs.fail("ftruncate", errno.EIO, times=None)
    sp.ack(ids[1])
    sp.ack(ids[2])
    assert sp.counters.ack_write_errors == 2
    (ack_file,) = seg_files(sp.directory, "ack")
    assert ack_file.stat().st_size == fmt.ACK_SIZE + 7
    fs.heal()
    sp.close()
    sp = Spool(tmp_path)
    assert sp.open().ignored_ack_entries == 1  # the torn entry, cut
    assert [r for r, _ in drain(sp)] == ids[1:]
    sp.close()


def test_short_ack_write_is_completed(tmp_path: Path) -> None:
    """write() may write part of an entry and return its count: the rest is written."""
    fs = FaultyFs()
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    ids = [put(sp, batch(f"r{i}")) for i in range(3)]
    drain(sp)
    fs.fail("write", 0, partial=5, short=True)
    sp.ack(ids[0])
    sp.ack(ids[1])
    assert sp.counters.ack_write_errors == 0
    assert _acked_on_disk_then_reopen(sp, ids) == [ids[2]]


def test_short_ack_write_on_a_full_disk_is_an_error(tmp_path: Path) -> None:
    """A full disk: 5 bytes of the entry, then ENOSPC. Not persisted: counted, cut back, the
    record replayed (a duplicate, never a loss); the next ack is kept."""
    fs = FaultyFs()
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    ids = [put(sp, batch(f"r{i}")) for i in range(3)]
    drain(sp)
    fs.fail("write", 0, partial=5, short=True)
    fs.fail("write", errno.ENOSPC)
    sp.ack(ids[0])
    assert sp.counters.ack_write_errors == 1
    sp.ack(ids[1])
    assert _acked_on_disk_then_reopen(sp, ids) == [ids[0], ids[2]]


# -- crash recovery --------------------------------------------------------------------------


def _check_torn(d: Path, cut: int, zero_fill: int = 0) -> None:
    path, offs = crashed(d)
    size = path.stat().st_size
    last = offs[-1]
    assert last < cut < size
    with path.open("r+b") as f:
        f.truncate(cut)
        f.seek(cut)
        f.write(b"\x00" * zero_fill)
    sp = Spool(d)
    report = sp.open()
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r1-0"]
    assert report.quarantined == []
    assert [(t.segment, t.offset, t.bytes) for t in report.truncated] == [
        (path.name, last, cut - last + zero_fill)
    ]
    assert path.stat().st_size == last
    assert sp.counters.corrupt_records == 0  # a torn tail is what a crash leaves
    # The spool keeps working after the truncation.
    put(sp, batch("new"))
    sp.close()
    sp = Spool(d)
    assert sp.open().clean
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r1-0", "new-0"]
    sp.close()


@pytest.mark.parametrize("into_last", [1, 2, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, -1])
@pytest.mark.parametrize("zero_fill", [0, 4096])
def test_torn_tail(tmp_path: Path, into_last: int, zero_fill: int) -> None:
    path, offs = crashed(tmp_path / "probe")
    size = path.stat().st_size
    cut = size + into_last if into_last < 0 else offs[-1] + into_last
    _check_torn(tmp_path / "spool", cut, zero_fill)


@given(st.data())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_torn_tail_any_cut(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    d = tmp_path_factory.mktemp("torn")
    path, offs = crashed(d / "probe")
    size = path.stat().st_size
    cut = data.draw(st.integers(offs[-1] + 1, size - 1))
    zero_fill = data.draw(st.sampled_from([0, 1, 100]))
    _check_torn(d / "spool", cut, zero_fill)


def test_crash_in_the_middle_of_a_write_leaves_a_torn_tail(tmp_path: Path) -> None:
    fs = FaultyFs()
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    put(sp, batch("ok0"))
    good = sp.size_bytes
    fs.fail("pwrite", 0, partial=40, crash=True)  # part of the record, then the process dies
    with pytest.raises(Crash):
        sp.append(batch("lost"))
    fs.crash()
    assert seg_files(tmp_path)[0].stat().st_size == good + 40
    sp = Spool(tmp_path)
    report = sp.open()
    assert [(t.offset, t.bytes) for t in report.truncated] == [(good, 40)]
    assert [first_event(b) for _, b in drain(sp)] == ["ok0-0"]
    sp.close()


def test_bad_checksum_of_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    path, offs = crashed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    sp = Spool(tmp_path)
    report = sp.open()
    assert report.truncated_bytes == len(raw) - offs[-1] and not report.quarantined
    assert len(drain(sp)) == 2
    sp.close()


def _is_filler(data: bytes, pos: int, length: int) -> bool:
    parsed = fmt.parse_at(data, pos)
    return parsed is not None and parsed.flags == fmt.FLAG_FILLER and parsed.length == length


@pytest.mark.parametrize(
    ("where", "pos"),
    [("magic", 0), ("length", 4), ("length-high", 7), ("events", 8), ("payload", HEADER_SIZE + 5)],
)
def test_corruption_in_the_middle_is_quarantined(tmp_path: Path, where: str, pos: int) -> None:
    path, offs = crashed(tmp_path)
    original = bytearray(path.read_bytes())
    original[offs[1] + pos] ^= 0x40
    path.write_bytes(bytes(original))
    bad_len = offs[2] - offs[1]
    sp = Spool(tmp_path)
    report = sp.open()
    assert report.truncated == []
    (q,) = report.quarantined
    assert q.segment == path.name and q.bad_offset == offs[1] and q.good_records == 1
    assert q.recovered_after == 1  # r2, intact, found again after the bad record
    assert q.skipped == [(offs[1], bad_len)] and q.skipped_bytes == q.discarded_bytes == bad_len
    moved = Path(q.moved_to)
    assert moved.parent == tmp_path / "quarantine"
    assert moved.read_bytes() == bytes(original)  # kept whole, never deleted
    # Repaired in place, same offsets: the bad record is now a filler of the same length.
    repaired = path.read_bytes()
    assert len(repaired) == len(original)
    assert repaired[: offs[1]] == original[: offs[1]] and repaired[offs[2] :] == original[offs[2] :]
    assert _is_filler(repaired, offs[1], bad_len)
    assert repaired[offs[1] + 2] == fmt.VERSION  # fillers are written as version 2
    assert report.records == 2
    assert [b.events() for _, b in drain(sp)] == [batch("r0", 4).events(), batch("r2", 4).events()]
    assert (sp.counters.quarantined_segments, sp.counters.corrupt_records) == (1, 1)
    sp.close()
    # Reopening is clean and does not quarantine again.
    sp = Spool(tmp_path)
    assert sp.open().clean
    assert len(drain(sp)) == 2
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    assert (sp.counters.quarantined_segments, sp.counters.corrupt_records) == (0, 0)
    sp.close()


def test_corrupt_segment_recovery_is_counted_in_the_shared_counters(tmp_path: Path) -> None:
    path, offs = crashed(tmp_path, 4)
    raw = bytearray(path.read_bytes())
    raw[offs[1] + HEADER_SIZE + 3] ^= 0x01
    raw[offs[2] + HEADER_SIZE + 3] ^= 0x01  # two records in a row: one corrupt range
    path.write_bytes(bytes(raw))
    # `spool stats` (read-only) sees it: two records lost (their headers still read: their
    # 4 events each), in one quarantined segment...
    stats = inspect_spool(tmp_path)["stats"]
    assert (stats["spool_corrupt_records"], stats["spool_quarantined_segments"]) == (2, 1)
    assert stats["spool_corrupt_events"] == 8
    assert stats["batches"] == 2
    # ...and so does the daemon's registry, through the counters it passes in.
    counters = SpoolCounters()
    sp = Spool(tmp_path, counters=counters)
    sp.open()
    assert sp.counters is counters
    snap = counters.snapshot()
    assert (snap["spool_corrupt_records"], snap["spool_quarantined_segments"]) == (2, 1)
    assert (snap["spool_corrupt_events"], snap["spool_recovered_events"]) == (8, 16)
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r3-0"]
    sp.close()


def test_resync_after_several_corrupt_ranges_keeps_acks_and_cuts_torn_tail(
    tmp_path: Path,
) -> None:
    path, offs = crashed(tmp_path, 6, ack=(4,))
    raw = bytearray(path.read_bytes())
    raw[offs[1] + HEADER_SIZE + 7] ^= 0x01  # payload of r1
    raw[offs[3] + 2] ^= 0x10  # header of r3
    del raw[-9:]  # r5 torn
    path.write_bytes(bytes(raw))
    lens = [b - a for a, b in pairwise(offs)]
    sp = Spool(tmp_path)
    report = sp.open()
    (q,) = report.quarantined
    assert (q.bad_offset, q.good_records, q.recovered_after) == (offs[1], 1, 2)  # r2, r4
    assert q.skipped == [(offs[1], lens[1]), (offs[3], lens[3])]
    assert q.skipped_bytes == lens[1] + lens[3]
    assert q.discarded_bytes == lens[1] + lens[3] + len(raw) - offs[5]
    assert [(t.segment, t.offset, t.bytes) for t in report.truncated] == [
        (path.name, offs[5], len(raw) - offs[5])
    ]
    assert report.records == 2 and report.acked_records == 1  # r4's ack is still valid
    assert report.ignored_ack_entries == 0
    assert sp.counters.corrupt_records == 2
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r2-0"]
    data = path.read_bytes()
    assert len(data) == offs[5]
    assert _is_filler(data, offs[1], lens[1]) and _is_filler(data, offs[3], lens[3])
    sp.close()
    sp = Spool(tmp_path)
    report = sp.open()
    assert report.clean and report.records == 2 and report.acked_records == 1
    for r, _ in drain(sp):
        sp.ack(r)
    sp.close()
    assert seg_files(tmp_path) == []
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [path.name]


def test_short_garbage_swallows_the_next_record(tmp_path: Path) -> None:
    """Bytes inserted (no room for a filler before r1): r1 is given up, r2 still recovered."""
    path, offs = crashed(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: offs[1]] + b"junk!" + raw[offs[1] :])
    sp = Spool(tmp_path)
    report = sp.open()
    (q,) = report.quarantined
    assert q.skipped == [(offs[1], offs[2] - offs[1] + 5)] and q.recovered_after == 1
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r2-0"]
    sp.close()
    # The same at the end: nothing to resynchronise on after r1, so the file is cut there,
    # but r1 is valid: quarantined, not a torn tail.
    path2, offs = crashed(tmp_path / "b")
    raw = path2.read_bytes()
    path2.write_bytes(raw[: offs[2]] + b"junk!" + raw[offs[2] :])
    sp = Spool(tmp_path / "b")
    report = sp.open()
    assert report.truncated == []
    (q,) = report.quarantined
    assert (q.bad_offset, q.recovered_after, q.skipped) == (offs[2], 0, [])
    assert q.discarded_bytes == len(raw) - offs[2] + 5
    assert path2.stat().st_size == offs[2]
    assert sp.counters.corrupt_records == 1
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r1-0"]
    sp.close()
    sp = Spool(tmp_path / "b")
    assert sp.open().clean
    sp.close()


def test_corrupt_first_record_the_rest_is_recovered(tmp_path: Path) -> None:
    path, offs = crashed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 2] ^= 0x01
    path.write_bytes(bytes(raw))
    sp = Spool(tmp_path)
    report = sp.open()
    (q,) = report.quarantined
    assert (q.bad_offset, q.good_records, q.recovered_after) == (0, 0, 2)
    assert _is_filler(path.read_bytes(), 0, offs[1])
    assert (tmp_path / "quarantine" / path.name).read_bytes() == bytes(raw)
    assert [first_event(b) for _, b in drain(sp)] == ["r1-0", "r2-0"]
    sp.close()


def test_scan_resync_is_linear_on_garbage() -> None:
    rec = fmt.encode_record(batch("ok"), 0)
    # Random bytes, zero fill, and magic bytes every few bytes whose headers never check out
    # (both versions).
    junk = (
        os.urandom(1 << 20)
        + bytes(1 << 20)
        + (fmt.MAGIC + b"\x01\x00" + bytes(4) + b"\xff" * 4) * 50_000
        + (fmt.MAGIC + b"\x02\x00" + bytes(4) + b"\xff" * 4) * 50_000
    )
    data = rec + junk + rec
    # How long it takes, and that it grows linearly: a figure of `make bench`
    # (bench.micro.scan_resync), not a test.
    scan = fmt.scan(data)
    assert [r.offset for r in scan.records] == [0, len(rec) + len(junk)]
    assert scan.holes == [(len(rec), len(rec) + len(junk))]


def test_interrupted_quarantine_is_redone(tmp_path: Path) -> None:
    path, offs = crashed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offs[1] + HEADER_SIZE] ^= 0x01
    path.write_bytes(bytes(raw))
    # Crash after the hard link and a partial temp copy, before the atomic rename.
    (tmp_path / "quarantine").mkdir()
    os.link(path, tmp_path / "quarantine" / path.name)
    path.with_suffix(".seg.tmp").write_bytes(bytes(raw[:10]))
    sp = Spool(tmp_path)
    report = sp.open()
    assert report.quarantined[0].moved_to == str(tmp_path / "quarantine" / path.name)
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    assert not path.with_suffix(".seg.tmp").exists()
    assert len(drain(sp)) == 2
    sp.close()


def test_repair_that_cannot_be_written_still_replays_and_is_retried(tmp_path: Path) -> None:
    path, offs = crashed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offs[1] + HEADER_SIZE + 1] ^= 0x01
    path.write_bytes(bytes(raw))
    fs = FaultyFs()
    fs.fail("link", errno.ENOSPC, times=None)  # no hard links: quarantine/ gets a copy
    fs.fail("replace", errno.ENOSPC, times=None)
    sp = Spool(tmp_path, fs=fs)
    report = sp.open()
    assert report.quarantined[0].recovered_after == 1
    assert sp.counters.repair_errors == 1
    assert path.read_bytes() == bytes(raw)  # left as it was, read at the same offsets
    assert not path.with_suffix(".seg.tmp").exists()
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r2-0"]
    sp.close()
    fs = FaultyFs()
    fs.fail("link", errno.ENOSPC, times=None)
    sp = Spool(tmp_path, fs=fs)
    assert len(sp.open().quarantined) == 1  # repaired now, reusing the same copy
    assert sp.counters.repair_errors == 0
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [path.name]
    sp.close()
    sp = Spool(tmp_path)
    assert sp.open().clean
    assert len(drain(sp)) == 2
    sp.close()


def test_readonly_sees_records_after_corruption_changes_nothing(tmp_path: Path) -> None:
    path, offs = crashed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offs[1] + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    info = inspect_spool(tmp_path)
    assert info["stats"]["batches"] == 2
    (q,) = info["recovery"]["quarantined"]
    assert q["recovered_after"] == 1 and q["skipped_bytes"] == offs[2] - offs[1]
    assert path.read_bytes() == bytes(raw) and not (tmp_path / "quarantine").exists()


def test_readonly_inspect_changes_nothing(tmp_path: Path) -> None:
    path, _offs = crashed(tmp_path)
    with path.open("ab") as f:
        f.write(b"\xfeS\x02torn")
    before = path.read_bytes()
    info = inspect_spool(tmp_path)
    assert info["stats"]["batches"] == 3 and info["stats"]["events"] == 12
    assert info["recovery"]["truncated_bytes"] == 7
    assert set(info["stats"]) == {
        "batches",
        "events",
        "bytes",
        "oldest_age_seconds",
        "segments",
        "inflight",
        "max_size",
        *SpoolCounters().snapshot(),
    }
    assert path.read_bytes() == before
    ro = Spool(tmp_path)
    ro.open(readonly=True)
    assert len(drain(ro)) == 3
    with pytest.raises(SpoolError):
        ro.append(batch("x"))
    with pytest.raises(SpoolError):
        ro.ack(0)
    ro.close()
    assert inspect_spool(tmp_path / "nothing")["stats"]["batches"] == 0
    assert not (tmp_path / "nothing").exists()


def test_second_writer_is_refused(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    other = Spool(sp.directory)
    with pytest.raises(SpoolLocked):
        other.open()
    sp.close()
    other = Spool(sp.directory)
    other.open()
    other.close()


# -- version 1 segments (written by the releases before) -----------------------------------------


@pytest.mark.parametrize(("fixture", "version"), [(FIXTURE_V1, 1), (FIXTURE_V2, 2)])
def test_old_segment_is_replayed_then_the_spool_goes_on_in_the_current_version(
        tmp_path: Path, fixture: Path, version: int) -> None:
    d = tmp_path / "spool"
    shutil.copytree(fixture / "segments", d / "segments")
    expected = json.loads((fixture / "expected.json").read_text())
    pending = [e for e in expected if not e["acked"]]
    old = (d / "segments" / "000000000000.seg").read_bytes()
    assert all(old[e["record_id"] + 2] == version for e in expected)  # really that version
    sp = Spool(d)
    report = sp.open()
    assert report.clean and report.acked_records == 1
    assert report.records == len(pending) == 4
    got = drain(sp)
    assert [r for r, _ in got] == [e["record_id"] for e in pending]
    for (_rid, b), e in zip(got, pending, strict=True):
        assert b.events() == e["events"], e["what"]
        assert b.times == [t.encode() for t in e["times"]]
        assert b.fragments() == [orjson.dumps(x) for x in e["events"]]  # what ingest makes
    # Appending to the same spool writes the current version, next to the old segment.
    new = [put(sp, batch(f"new-{i}")) for i in range(3)]
    sp.ack(got[0][0])
    sp.close()
    assert (d / "segments" / "000000000000.seg").read_bytes() == old  # never rewritten
    current = seg_files(d)[1].read_bytes()
    assert all(current[offset(r) + 2] == fmt.VERSION == 3 for r in new)
    sp = Spool(d)
    report = sp.open()
    assert report.clean and report.records == len(pending) - 1 + 3
    replay = drain(sp)
    assert [r for r, _ in replay] == [e["record_id"] for e in pending[1:]] + new
    assert [b.events() for _, b in replay] == [e["events"] for e in pending[1:]] + [
        batch(f"new-{i}").events() for i in range(3)
    ]
    for r, _ in replay:
        sp.ack(r)
    sp.close()
    assert seg_files(d) == []


# -- bounds ----------------------------------------------------------------------------------


def test_block_when_full(make: Callable[..., Spool]) -> None:
    rl = reclen()
    sp = make(max_size=rl * 5, segment_size=rl * 2)
    sp.open()
    ids = [put(sp, batch(f"b{i}")) for i in range(5)]
    with pytest.raises(SpoolFull):
        sp.append(batch("b5"))
    assert sp.counters.rejected_full == 1 and sp.pending_batches == 5
    # Acking a whole sealed segment frees its room; acking part of one does not.
    drain(sp)
    for r in ids[:3]:
        sp.ack(r)
    put(sp, batch("b5"))
    put(sp, batch("b6"))
    with pytest.raises(SpoolFull):
        sp.append(batch("b7"))
    assert sp.size_bytes == 5 * rl
    with pytest.raises(RecordTooLarge):
        sp.append(batch("huge", 100))


def test_block_reclaims_fully_acked_writing_segment(make: Callable[..., Spool]) -> None:
    rl = reclen()
    sp = make(max_size=rl * 2, segment_size=1 << 20)
    sp.open()
    ids = [put(sp, batch(f"b{i}")) for i in range(2)]
    with pytest.raises(SpoolFull):
        sp.append(batch("b2"))
    for r in ids:
        sp.ack(r)
    assert sp.size_bytes == 2 * rl  # the segment being written is kept...
    put(sp, batch("b2"))  # ...until its space is needed
    assert sp.size_bytes == rl
    assert [first_event(b) for _, b in drain(sp)] == ["b2-0"]


def test_drop_oldest_counts_exactly(make: Callable[..., Spool]) -> None:
    rl = reclen()
    sp = make(max_size=rl * 6, segment_size=rl * 2, when_full="drop_oldest")
    sp.open()
    ids = [sp.append(batch(f"b{i}")) for i in range(6)]
    assert all(r.dropped_batches == 0 for r in ids)
    sp.ack(ids[0].record_id)  # acked records are not counted as dropped
    res = sp.append(batch("b6"))
    assert (res.dropped_batches, res.dropped_events) == (1, 3)
    res = sp.append(batch("b7"))
    assert (res.dropped_batches, res.dropped_events) == (0, 0)  # room left in that segment
    res = sp.append(batch("b8"))
    assert (res.dropped_batches, res.dropped_events) == (2, 6)
    assert (sp.counters.dropped_batches, sp.counters.dropped_events) == (3, 9)
    assert [first_event(b) for _, b in drain(sp)] == [f"b{i}-0" for i in range(4, 9)]
    assert sp.size_bytes <= rl * 6


def test_drop_oldest_seals_the_only_segment(make: Callable[..., Spool]) -> None:
    rl = reclen()
    sp = make(max_size=rl * 3, segment_size=1 << 20, when_full="drop_oldest")
    sp.open()
    for i in range(3):
        sp.append(batch(f"b{i}"))
    res = sp.append(batch("b3"))
    assert (res.dropped_batches, res.dropped_events) == (3, 9)
    assert [first_event(b) for _, b in drain(sp)] == ["b3-0"]


def test_drop_oldest_does_not_count_handed_out_records(make: Callable[..., Spool]) -> None:
    """Claimed (a worker retries them from memory) or handed out: not dropped, delivered."""
    rl = reclen()
    sp = make(max_size=rl * 4, segment_size=rl * 2, when_full="drop_oldest")
    sp.open()
    r0 = put(sp, batch("b0"), claim=True)
    r1 = put(sp, batch("b1"))
    put(sp, batch("b2"))
    put(sp, batch("b3"))
    got = sp.next_batch()
    assert got is not None and got[0] == r1
    res = sp.append(batch("b4"))  # drops the first segment: r0 and r1, both held
    assert (res.dropped_batches, res.dropped_events) == (0, 0)
    assert sp.pending_batches == 3 and sp.counters.evicted_inflight == 2
    sp.ack(r0)  # the workers deliver them later: harmless no-ops
    sp.ack(r1)
    got = sp.next_batch()
    assert got is not None and first_event(got[1]) == "b2-0"
    r2 = got[0]
    assert sp.append(batch("b5")).dropped_batches == 0
    res = sp.append(batch("b6"))  # drops b2 (held) and b3 (not)
    assert (res.dropped_batches, res.dropped_events) == (1, 3)
    sp.ack(r2)
    c = sp.counters
    assert (c.dropped_batches, c.dropped_events, c.evicted_inflight) == (1, 3, 3)
    assert c.acked_batches == 0 and sp.stats()["inflight"] == 0
    # Exact accounting: 7 appended = 3 delivered from memory + 1 dropped + 3 still spooled.
    assert c.appended_batches == 7
    assert [first_event(b) for _, b in drain(sp)] == ["b4-0", "b5-0", "b6-0"]
    assert sp.pending_batches == 3


@pytest.mark.parametrize("fail", ["fsync", "close", "unlink .ack"])
@pytest.mark.parametrize("held", [False, True])
def test_drop_oldest_counts_a_victim_whose_clean_up_fails(
    tmp_path: Path, fail: str, held: bool
) -> None:
    """drop_oldest unlinks the oldest segment, then the folder fsync (or its close) fails: the
    append fails, but the victim's records are gone with its file, so they are counted
    (dropped, or evicted if held) and told through take_losses(). Its .ack unlink failing
    comes after the folder fsync: the append goes on (the next open removes that .ack)."""
    rl = reclen()
    fs = FaultyFs()
    sp = Spool(tmp_path, max_size=rl * 4, segment_size=rl * 2, when_full="drop_oldest", fs=fs)
    sp.open()
    r0 = put(sp, batch("b0"), claim=held)
    sp.ack(put(sp, batch("b1")))  # the victim has an .ack file
    put(sp, batch("b2"))
    put(sp, batch("b3"))
    victim = seg_files(tmp_path)[0]
    assert seg_files(tmp_path, "ack") == [victim.with_suffix(".ack")]
    op, _, suffix = fail.partition(" ")
    fs.fail(op, errno.EIO, suffix=suffix or None)
    kept = ["b2-0", "b3-0"]
    if op == "unlink":
        res = sp.append(batch("b4"))
        told = (res.dropped_batches, res.dropped_events, [e.record_id for e in res.evicted])
        assert not sp.take_losses()  # the append said it
        assert victim.with_suffix(".ack").exists()
        kept.append("b4-0")
    else:
        with pytest.raises(SpoolWriteError):
            sp.append(batch("b4"))
        lost = sp.take_losses()
        told = (lost.dropped_batches, lost.dropped_events, [e.record_id for e in lost.evicted])
    fs.heal()
    assert not victim.exists()
    c = sp.counters
    if held:
        assert told == (0, 0, [r0])
        assert (c.dropped_batches, c.dropped_events, c.evicted_inflight) == (0, 0, 1)
    else:
        assert told == (1, 3, [])
        assert (c.dropped_batches, c.dropped_events, c.evicted_inflight) == (1, 3, 0)
    assert c.delete_errors == 1
    # Exactly what is left: appended = 1 acked + 1 dropped/evicted + the rest pending.
    assert (sp.pending_batches, sp.pending_events) == (len(kept), 3 * len(kept))
    put(sp, batch("b5"))
    kept.append("b5-0")
    assert [first_event(b) for _, b in drain(sp)] == kept
    sp.close()
    sp = Spool(tmp_path)
    sp.open()
    assert [first_event(b) for _, b in drain(sp)] == kept
    assert seg_files(tmp_path, "ack") == []
    sp.close()


# -- disk errors, through the Filesystem seam ---------------------------------------------------


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[Spool, FaultyFs]]:
    fs = FaultyFs()
    sp = Spool(tmp_path / "spool", fs=fs)
    sp.open()
    yield sp, fs
    fs.heal()
    sp.close()


def test_enospc_after_partial_write(faulty: tuple[Spool, FaultyFs]) -> None:
    sp, fs = faulty
    put(sp, batch("ok0"))
    fs.fail("pwrite", errno.ENOSPC, partial=10)  # a torn write: 10 bytes, then the disk is full
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("lost"))
    assert info.value.errno == errno.ENOSPC
    path = seg_files(sp.directory)[0]
    assert path.stat().st_size == sp.size_bytes == reclen(batch("ok0"))  # torn bytes cut away
    assert sp.counters.write_errors == 1 and sp.counters.space_reclaims == 0
    put(sp, batch("ok1"))
    sp, report = reopen(sp)
    assert report.clean
    assert [first_event(b) for _, b in drain(sp)] == ["ok0-0", "ok1-0"]
    sp.close()


def test_enospc_reclaims_fully_acked_writing_segment(faulty: tuple[Spool, FaultyFs]) -> None:
    sp, fs = faulty  # max_size far above what the "disk" holds
    for i in range(3):
        sp.ack(put(sp, batch(f"old{i}")))
    (old,) = seg_files(sp.directory)
    assert sp.pending_batches == 0 and sp.size_bytes == old.stat().st_size > 0
    fs.fail("pwrite", errno.ENOSPC, partial=10)
    res = sp.append(batch("new"))  # the retry, in a fresh segment, succeeds
    assert res.dropped_batches == 0
    assert not old.exists() and not old.with_suffix(".ack").exists()
    (new,) = seg_files(sp.directory)
    assert new.stat().st_size == sp.size_bytes == reclen(batch("new"))
    assert (sp.counters.space_reclaims, sp.counters.write_errors) == (1, 0)
    assert sp.stats()["segments"] == 1
    assert [first_event(b) for _, b in drain(sp)] == ["new-0"]
    sp, report = reopen(sp)
    assert report.clean and report.records == 1
    sp.close()


def test_enospc_retried_only_once_and_only_if_space_was_freed(
    faulty: tuple[Spool, FaultyFs],
) -> None:
    sp, fs = faulty
    sp.ack(put(sp, batch("old")))
    (old,) = seg_files(sp.directory)
    fs.fail("pwrite", errno.ENOSPC, times=2, partial=10)
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("lost"))
    assert info.value.errno == errno.ENOSPC
    assert not old.exists()  # reclaimed anyway
    assert (sp.counters.space_reclaims, sp.counters.write_errors) == (1, 1)
    # Nothing fully acked left to free: no retry.
    put(sp, batch("keep"))
    fs.fail("pwrite", errno.ENOSPC, partial=10)
    with pytest.raises(SpoolWriteError):
        sp.append(batch("lost2"))
    assert (sp.counters.space_reclaims, sp.counters.write_errors) == (1, 2)
    put(sp, batch("after"))
    assert [first_event(b) for _, b in drain(sp)] == ["keep-0", "after-0"]
    assert sp.pending_batches == 2
    sp, report = reopen(sp)
    assert report.clean and report.records == 2
    sp.close()


def test_enospc_reclaims_acked_segments_left_by_failed_deletes(tmp_path: Path) -> None:
    fs = FaultyFs()
    sp = Spool(tmp_path, segment_size=reclen() * 2, fs=fs)
    sp.open()
    ids = [put(sp, batch(f"b{i}")) for i in range(3)]  # b0, b1 sealed; b2 being written
    sealed = seg_files(tmp_path)[0]
    fs.fail("unlink", errno.EIO, times=None)
    for r in ids[:2]:
        sp.ack(r)
    fs.heal()
    assert sealed.exists() and sp.counters.delete_errors == 1
    fs.fail("pwrite", errno.ENOSPC, partial=10)
    put(sp, batch("b3"))  # into the same segment being written (it is not fully acked)
    assert not sealed.exists() and sp.counters.space_reclaims == 1
    assert [first_event(b) for _, b in drain(sp)] == ["b2-0", "b3-0"]
    sp.close()


def test_write_ahead_append_ack_keeps_one_segment(make: Callable[..., Spool]) -> None:
    """Appending and acking every batch reuses the segment being written: no file per batch."""
    sp = make()
    sp.open()
    for i in range(50):
        sp.ack(put(sp, batch(str(i))))
    assert len(seg_files(sp.directory)) == 1 and sp.stats()["segments"] == 1
    assert sp.counters.space_reclaims == 0
    assert (sp.counters.appended_batches, sp.counters.acked_batches) == (50, 50)


def test_eio_on_truncate_seals_segment(faulty: tuple[Spool, FaultyFs]) -> None:
    sp, fs = faulty
    put(sp, batch("ok0"))
    good = sp.size_bytes
    fs.fail("pwrite", errno.EIO, partial=30)
    fs.fail("ftruncate", errno.EIO)
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("maybe"))
    assert info.value.errno == errno.EIO
    first = seg_files(sp.directory)[0]
    assert first.stat().st_size == good + 30  # the failed write's bytes are still there
    put(sp, batch("ok1"))  # goes to a fresh segment; the disk writes again: cut once more
    assert len(seg_files(sp.directory)) == 2
    assert first.stat().st_size == good
    sp, report = reopen(sp)
    # Clean: otherwise the tail of a segment that is not the newest would be corruption.
    assert report.clean and sp.counters.corrupt_records == 0
    assert [first_event(b) for _, b in drain(sp)] == ["ok0-0", "ok1-0"]
    sp.close()


def test_failed_append_whose_tail_cannot_be_cut_is_counted_not_hidden(
    faulty: tuple[Spool, FaultyFs],
) -> None:
    """The cut keeps failing (to the end of the run): the next open finds a bad tail in a
    sealed segment. It cannot tell it from damage, so it counts it: never silent."""
    sp, fs = faulty
    put(sp, batch("ok0"))
    fs.fail("pwrite", errno.EIO, partial=HEADER_SIZE + 2)  # a whole header, then the error
    fs.fail("ftruncate", errno.EIO, times=None)
    with pytest.raises(SpoolWriteError):
        sp.append(batch("maybe"))
    put(sp, batch("ok1"))
    sp.close()
    fs.heal()
    sp = Spool(sp.directory)
    report = sp.open()
    (q,) = report.quarantined
    assert q.segment == seg_files(sp.directory)[0].name and q.lost_records == 1
    assert report.corrupt_events == 3 and report.truncated == []
    assert [first_event(b) for _, b in drain(sp)] == ["ok0-0", "ok1-0"]
    sp.close()


def test_eio_on_fsync_is_a_write_error_and_the_record_is_cut(
    faulty: tuple[Spool, FaultyFs],
) -> None:
    sp, fs = faulty
    put(sp, batch("ok0"))
    size = sp.size_bytes
    fs.fail("fsync", errno.EIO)  # the data may not be on disk: not acknowledged as stored
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("unsure"))
    assert info.value.errno == errno.EIO
    assert sp.size_bytes == size == seg_files(sp.directory)[0].stat().st_size
    assert sp.pending_batches == 1 and sp.counters.write_errors == 1
    put(sp, batch("ok1"))
    sp, report = reopen(sp)
    assert report.clean
    assert [first_event(b) for _, b in drain(sp)] == ["ok0-0", "ok1-0"]
    sp.close()


def test_create_segment_failure_erofs(faulty: tuple[Spool, FaultyFs]) -> None:
    sp, fs = faulty
    fs.fail("open", errno.EROFS, suffix=".seg")
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("x"))
    assert info.value.errno == errno.EROFS and sp.counters.write_errors == 1
    assert seg_files(sp.directory) == []
    put(sp, batch("y"))
    assert [first_event(b) for _, b in drain(sp)] == ["y-0"]


def test_segment_whose_directory_entry_cannot_be_synced_is_removed(
    faulty: tuple[Spool, FaultyFs],
) -> None:
    sp, fs = faulty
    fs.fail("fsync", errno.EIO)  # the directory fsync after creating the segment
    with pytest.raises(SpoolWriteError):
        sp.append(batch("x"))
    assert seg_files(sp.directory) == [] and sp.stats()["segments"] == 0


def test_segment_create_whose_clean_up_fails_does_not_wedge_appends(
    faulty: tuple[Spool, FaultyFs],
) -> None:
    """The folder fsync after creating a segment fails, then closing it and unlinking it fail
    too: the empty file stays. Later appends go on in the next segment (not EEXIST for ever);
    the next open removes the empty file."""
    sp, fs = faulty
    fs.fail("fsync", errno.EIO)
    fs.fail("close", errno.EIO, times=2)  # the folder's fd, then the new segment's
    fs.fail("unlink", errno.EIO)
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("x"))
    assert info.value.errno == errno.EIO
    fs.heal()
    (left,) = seg_files(sp.directory)
    assert left.stat().st_size == 0
    put(sp, batch("y"))
    put(sp, batch("z"))
    assert sp.counters.write_errors == 1
    sp, report = reopen(sp)
    assert left.name in report.removed_files and not left.exists()
    assert [first_event(b) for _, b in drain(sp)] == ["y-0", "z-0"]
    sp.close()


RLIMIT_SCRIPT = """
import resource, signal, sys, os
from pathlib import Path
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.spool import Spool, SpoolWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = Path(sys.argv[1])
sp = Spool(d)
sp.open()
sp.append(Batch.from_events(["small"], ["t"]))
size = sp.size_bytes
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 5000, resource.RLIM_INFINITY))
try:
    sp.append(Batch.from_events(["x" * 20000], ["t"]))
except SpoolWriteError as e:
    print("error", e.errno, sp.size_bytes, os.path.getsize(next((d / "segments").glob("*.seg"))))
sp.append(Batch.from_events(["after"], ["t"]))
sys.stdout.flush()
os._exit(0)  # crash: no close
"""


def test_real_partial_write_with_rlimit_fsize(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", RLIMIT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.split()
    assert out[0] == "error" and int(out[1]) == errno.EFBIG
    assert out[2] == out[3]  # file cut back to the last good record
    sp = Spool(tmp_path)
    assert sp.open().clean
    assert [b.events() for _, b in drain(sp)] == [["small"], ["after"]]
    sp.close()


# -- concurrency, stats, purge ---------------------------------------------------------------


def test_concurrent_append_and_ack(make: Callable[..., Spool]) -> None:
    sp = make(segment_size=4096)
    sp.open()
    producers, per = 4, 150
    done = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def produce(p: int) -> None:
        try:
            for i in range(per):
                sp.append(Batch.from_events([f"{p}:{i}"], ["t"]))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def consume() -> None:
        try:
            while True:
                got = wait_until(
                    lambda: sp.next_batch() or (done.is_set() and sp.pending_batches == 0), 30,
                    "a batch to take, or the producers done and the spool empty", step=0.001)
                if got is True:
                    return
                seen.append(first_event(got[1]))
                sp.ack(got[0])
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for t in threads + consumers:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in consumers:
        t.join(timeout=60)
        assert not t.is_alive(), "a consumer hung"
    assert not errors
    assert sorted(seen) == sorted(f"{p}:{i}" for p in range(producers) for i in range(per))
    c = sp.counters
    assert c.appended_batches == c.acked_batches == producers * per
    st_ = sp.stats()
    assert st_["batches"] == 0 and st_["segments"] <= 1
    sp, report = reopen(sp)
    assert report.records == 0
    sp.close()


def test_stats_and_purge(make: Callable[..., Spool]) -> None:
    sp = make(segment_size=300)
    sp.open()
    for i in range(10):
        put(sp, batch(str(i), 2))
    s = sp.stats()
    assert set(s) == {
        "batches",
        "events",
        "bytes",
        "oldest_age_seconds",
        "segments",
        "inflight",
        "max_size",
    }
    assert (s["batches"], s["events"], sp.counters.appended_batches) == (10, 20, 10)
    assert sp.counters.appended_events == 20
    assert s["bytes"] == sp.size_bytes == sum(p.stat().st_size for p in seg_files(sp.directory))
    assert 0 <= s["oldest_age_seconds"] < 60
    sp.next_batch()
    assert sp.purge() == (10, 20)
    assert (sp.counters.purged_batches, sp.counters.purged_events) == (10, 20)
    assert seg_files(sp.directory) == [] and sp.size_bytes == 0 and sp.next_batch() is None
    put(sp, batch("again"))
    assert [first_event(b) for _, b in drain(sp)] == ["again-0"]


def test_runtime_corruption_is_skipped_and_kept(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    put(sp, batch("a"))
    rid = put(sp, batch("b"))
    put(sp, batch("c"))
    path = seg_files(sp.directory)[0]
    with path.open("r+b") as f:
        f.seek(offset(rid) + HEADER_SIZE + 3)
        f.write(b"!")
    assert [first_event(b) for _, b in drain(sp)] == ["a-0", "c-0"]
    assert sp.counters.corrupt_records == 1 and sp.counters.quarantined_segments == 1
    assert sp.pending_batches == 2
    assert (sp.directory / "quarantine" / path.name).exists()


def test_closed_spool_refuses(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    sp.close()
    with pytest.raises(SpoolError):
        sp.append(batch("x"))
    with pytest.raises(SpoolError):
        sp.next_batch()
    with pytest.raises(SpoolError):
        sp.open()
    with Spool(sp.directory) as again:  # a context manager closes it
        again.open()
        put(again, batch("y"))
    assert len(seg_files(sp.directory)) == 1  # closed: the lock is free again
    other = Spool(sp.directory)
    other.open()
    other.close()


# -- symbolic links and files of other users (issue 11) --------------------------------------

OTHER_UID = 65534  # nobody


def _victim(tmp_path: Path) -> tuple[Path, bytes]:
    """A file outside the spool that a planted link points at; it must stay as it is."""
    target = tmp_path / "victim"
    content = b"precious data that is not a spool segment\n" * 10
    target.write_bytes(content)
    return target, content


@pytest.mark.parametrize("which", ["seg", "ack", "LOCK"])
def test_symlinked_spool_file_is_refused_and_its_target_untouched(
    tmp_path: Path, which: str
) -> None:
    d = tmp_path / "spool"
    sp = Spool(d)
    sp.open()
    rid = put(sp, batch("a"))
    put(sp, batch("b"))
    if which == "ack":
        sp.ack(rid)
    sp.close()
    target, content = _victim(tmp_path)
    path = {"seg": seg_files(d)[0], "ack": seg_files(d, "ack")[0] if which == "ack" else None,
            "LOCK": d / "segments" / "LOCK"}[which]
    assert path is not None and path.exists()
    path.unlink()
    path.symlink_to(target)
    for readonly in (False, True):
        if which == "LOCK" and readonly:
            continue  # a read-only open takes no lock
        with pytest.raises(SpoolError, match=f"refusing spool file {path}: .*symbolic link"):
            Spool(d).open(readonly=readonly)
    assert target.read_bytes() == content
    assert path.is_symlink()


def test_fifo_as_a_segment_is_refused_without_hanging(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    sp = Spool(d)
    sp.open()
    put(sp, batch("a"))
    sp.close()
    path = seg_files(d)[0]
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(SpoolError, match=f"refusing spool file {path}: not a regular file"):
        Spool(d).open()


def test_symlinked_ack_planted_while_running_is_not_written_through(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    sp.open()
    rid = put(sp, batch("a"))
    put(sp, batch("b"))
    target, content = _victim(tmp_path)
    ack = seg_files(sp.directory)[0].with_suffix(".ack")
    ack.symlink_to(target)
    sp.ack(rid)  # never raises: counted as an ack that could not be written
    assert sp.counters.ack_write_errors == 1
    assert target.read_bytes() == content
    sp.close()


def test_symlinked_segment_being_replaced_by_repair_is_refused(tmp_path: Path) -> None:
    """A link planted as the repair's temporary file: O_NOFOLLOW, not O_TRUNC through it."""
    path, offs = crashed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offs[1] + HEADER_SIZE] ^= 0xFF  # damage in the middle: recovery repairs via .seg.tmp
    path.write_bytes(bytes(raw))
    target, content = _victim(tmp_path)
    # Recovery removes stray .tmp files first: plant the link just before the copy is written.
    fs = FaultyFs()
    tmp = path.with_suffix(".seg.tmp")
    orig_mkdir = fs.mkdir

    def mkdir_then_plant(p: Path) -> None:
        orig_mkdir(p)
        if not tmp.is_symlink():
            tmp.symlink_to(target)

    fs.mkdir = mkdir_then_plant  # type: ignore[method-assign]
    sp = Spool(tmp_path, fs=fs)
    sp.open()
    assert target.read_bytes() == content
    assert sp.counters.repair_errors == 1
    assert [first_event(b) for _, b in drain(sp)] == ["r0-0", "r2-0"]
    sp.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_segment_of_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    sp = Spool(d)
    sp.open()
    put(sp, batch("a"))
    sp.close()
    path = seg_files(d)[0]
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(SpoolError, match=f"refusing spool file {path}: owned by uid {OTHER_UID}"):
        Spool(d).open()
    # A folder owned by that user (root running `spool stats` on the service's spool): fine.
    os.chown(d / "segments", OTHER_UID, OTHER_UID)
    assert inspect_spool(d)["stats"]["batches"] == 1


def test_spool_folders_are_created_0700(tmp_path: Path) -> None:
    d = tmp_path / "new" / "spool"
    old = os.umask(0)  # the modes come from the code, not from a lucky umask
    try:
        sp = Spool(d)
        sp.open()
        rid = put(sp, batch("a"))
        put(sp, batch("b"))
        sp.ack(rid)
        sp._corrupt_at_runtime(put(sp, batch("c")))  # creates quarantine/
    finally:
        os.umask(old)
    sp.close()
    for folder in (tmp_path / "new", d, d / "segments", d / "quarantine"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for f in (d / "segments").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f


def test_every_spool_open_is_nofollow_and_cloexec(tmp_path: Path) -> None:
    seen: list[int] = []
    real = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).startswith(str(tmp_path)) and not flags & os.O_DIRECTORY:
            seen.append(flags)
        return real(path, flags, mode, **kw)

    os.open = spy  # type: ignore[assignment]
    try:
        sp = Spool(tmp_path / "spool", segment_size=200)
        sp.open()
        ids = [put(sp, batch(f"r{i}")) for i in range(4)]
        sp.ack(ids[0])
        assert [first_event(b) for _, b in drain(sp)] == ["r1-0", "r2-0", "r3-0"]
        sp.close()
        inspect_spool(tmp_path / "spool")
    finally:
        os.open = real  # type: ignore[assignment]
    assert len(seen) > 5
    assert all(f & os.O_NOFOLLOW and f & os.O_CLOEXEC for f in seen), [hex(f) for f in seen]


def test_dead_letter_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    from haproxy_forwarder.sinks.deadletter import DeadLetters, read_dead_letters

    target, content = _victim(tmp_path)
    dead = DeadLetters(tmp_path / "spool")
    when = time.gmtime(0)
    dead.write(batch("first"), "rejected", 400, "bad", at=when)
    path = dead.files()[0]
    assert dead.dir.stat().st_mode & 0o777 == 0o700
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(SpoolError, match="symbolic link"):
        dead.write(batch("second"), "rejected", 400, "bad", at=when)
    with pytest.raises(SpoolError, match="symbolic link"):
        list(read_dead_letters(path))  # the requeue folder's files are read the same way
    assert target.read_bytes() == content


# -- crafted segments: recovery stays linear (issue 11) ---------------------------------------


def _crafted_segment(path: Path, junk_bytes: int) -> tuple[bytes, int]:
    """Two good records around `junk_bytes` of fake headers, back to back, each claiming a
    payload up to the end of the junk (plausible in every field but the checksum)."""
    rec = fmt.encode_record(batch("ok"), 0)
    count = junk_bytes // HEADER_SIZE
    end = count * HEADER_SIZE
    junk = b"".join(
        fmt.MAGIC + bytes([2, 0]) + (end - i * HEADER_SIZE - HEADER_SIZE).to_bytes(4, "little")
        + bytes(16)
        for i in range(count)
    )
    data = rec + junk + rec
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data, len(rec)


def _bytes_checksummed(monkeypatch: pytest.MonkeyPatch, path: Path) -> tuple[int, Spool]:
    examined = 0
    real = fmt.crc32  # the format's checksum function (ISA-L's or zlib's)

    def counting(data: Any, value: int = 0) -> int:
        nonlocal examined
        examined += len(data)
        return real(data, value)

    monkeypatch.setattr(fmt, "crc32", counting)
    try:
        sp = Spool(path.parent.parent)
        sp.open()
    finally:
        monkeypatch.setattr(fmt, "crc32", real)
    assert examined > 0, "the count missed the format's checksum calls"
    return examined, sp


def test_crafted_segment_recovery_examines_a_linear_number_of_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[int, int] = {}
    for junk in (64 * 1024, 128 * 1024):
        seg = tmp_path / f"s{junk}" / "segments" / "000000000000.seg"
        data, reclen = _crafted_segment(seg, junk)
        examined, sp = _bytes_checksummed(monkeypatch, seg)
        # Every record before and after the fake headers is found; the junk becomes fillers.
        assert [first_event(b) for _, b in drain(sp)] == ["ok-0", "ok-0"]
        assert sp.counters.quarantined_segments == 1
        sp.close()
        # Checking every one of the ~junk/24 candidates over its claimed length (the old scan)
        # examines ~junk**2/48 bytes: 85 MiB for 64 KiB. Bounded work per candidate is linear.
        # At most 2 * 256 + 24 bytes per candidate (format.RangeCrc), one candidate per header.
        bound = 6 * len(data) + (junk // HEADER_SIZE) * (2 * 256 + HEADER_SIZE)
        assert examined <= bound, f"{examined} bytes checksummed for a {len(data)}-byte segment"
        seen[junk] = examined
        assert reclen < junk
    assert seen[128 * 1024] < 2.5 * seen[64 * 1024], seen


@given(st.binary(min_size=0, max_size=3000), st.data())
@settings(max_examples=200, deadline=None)
def test_range_crc_equals_zlib(data: bytes, draw: st.DataObject) -> None:
    import zlib

    start = draw.draw(st.integers(0, len(data)))
    stop = draw.draw(st.integers(start, len(data)))
    value = draw.draw(st.integers(0, 0xFFFFFFFF))
    sums = fmt.RangeCrc(data)
    assert sums.crc32(start, stop, value) == zlib.crc32(data[start:stop], value)


def test_range_crc_long_ranges_equal_zlib() -> None:
    import random
    import zlib

    rnd = random.Random(11)
    data = rnd.randbytes(200_000)
    sums = fmt.RangeCrc(data)
    for _ in range(300):
        start = rnd.randrange(len(data))
        stop = rnd.randrange(start, len(data) + 1)
        value = rnd.randrange(1 << 32)
        assert sums.crc32(start, stop, value) == zlib.crc32(data[start:stop], value)
