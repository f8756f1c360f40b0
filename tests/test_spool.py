"""The durable spool (haproxy_forwarder/spool.py), on real files in tmp_path."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haproxy_forwarder import spool as spool_mod
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.spool import (
    HEADER_SIZE,
    RecordTooLarge,
    Spool,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolWriteError,
    inspect_spool,
)

ODD = [
    "",
    "plain",
    "line\nfeed\r\n",
    "nul\x00inside\x00",
    "repl\ufffdacement",
    "non-BMP \U0001f600 \U00010348",
    "lone surrogate \udc80",
    "split pair \ud83d",
    "\ude00 <- other half",
    "\ufeffbom",
    "é" * 1000,
    "x" * 70_000,
]


def batch(tag: str, n: int = 3) -> Batch:
    return Batch(
        [f"{tag}-{i}" for i in range(n)], [f"2026-01-01T00:00:0{i % 10}.000Z" for i in range(n)]
    )


def events_of(b: Batch) -> list[str]:
    return list(b.events)


def drain(sp: Spool) -> list[tuple[int, Batch]]:
    out: list[tuple[int, Batch]] = []
    while (item := sp.next_batch()) is not None:
        out.append(item)
    return out


def seg_files(d: Path, ext: str = "seg") -> list[Path]:
    return sorted((d / "segments").glob(f"*.{ext}"))


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


# -- round trip and order --------------------------------------------------------------------


def test_round_trip_odd_strings(make: Callable[..., Spool]) -> None:
    sp = make()
    assert sp.open().clean
    b = Batch(list(ODD), list(reversed(ODD)))
    rid = sp.append(b)
    got = sp.next_batch()
    assert got is not None
    assert got[0] == rid
    assert got[1].events == ODD and got[1].times == list(reversed(ODD))
    assert got[1].nbytes == b.nbytes
    sp, report = reopen(sp)
    assert report.records == 1 and report.events == len(ODD)
    got = sp.next_batch()
    assert got is not None and got[1].events == ODD
    sp.close()


@given(st.lists(st.text(st.characters(codec=None, exclude_categories=())), max_size=20))
@settings(max_examples=60, deadline=None)
def test_round_trip_any_text(events: list[str]) -> None:
    b = Batch(events, [e[::-1] for e in events])
    rec, n = spool_mod._record(b, 123)
    assert n == len(events)
    got = spool_mod._decode(memoryview(rec)[HEADER_SIZE:], n)
    assert got.events == events and got.times == b.times


def test_empty_batch_and_mismatched_lists(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    sp.append(Batch())
    item = sp.next_batch()
    assert item is not None and item[1].events == []
    with pytest.raises(ValueError):
        sp.append(Batch(["a", "b"], ["t"]))


def test_order_across_segments_and_reopen(make: Callable[..., Spool]) -> None:
    sp = make(segment_size=300)
    sp.open()
    ids = [sp.append(batch(f"b{i}")) for i in range(40)]
    assert ids == sorted(ids)
    assert len(seg_files(sp.directory)) > 5
    first = [sp.next_batch() for _ in range(10)]
    assert [f[1].events[0] for f in first if f] == [f"b{i}-0" for i in range(10)]
    # Appended after open, handed out after older ones; nothing is handed out twice.
    ids.append(sp.append(batch("late")))
    rest = drain(sp)
    assert [r for r, _ in rest] == ids[10:]
    assert sp.next_batch() is None
    sp, report = reopen(sp, segment_size=300)
    assert report.records == 41 and report.clean
    assert [b.events[0] for _, b in drain(sp)] == [f"b{i}-0" for i in range(40)] + ["late-0"]
    sp.close()


def test_release_hands_back_oldest_first(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    ids = [sp.append(batch(str(i))) for i in range(4)]
    got = sp.next_batches(3)
    assert [r for r, _ in got] == ids[:3]
    sp.release(ids[1])
    sp.release(ids[1])  # twice: still handed out once
    assert [r for r, _ in sp.next_batches(10)] == [ids[1], ids[3]]
    assert sp.next_batch() is None
    assert sp.pending_batches == 4


# -- acks ------------------------------------------------------------------------------------


def test_ack_then_reopen(make: Callable[..., Spool]) -> None:
    sp = make(segment_size=300)
    sp.open()
    ids = [sp.append(batch(str(i))) for i in range(30)]
    nseg = len(seg_files(sp.directory))
    first_seg = seg_files(sp.directory)[0]
    drain(sp)
    # Ack the whole first segment and every other record after it.
    first_seq = ids[0] >> 40
    acked = [r for r in ids if r >> 40 == first_seq] + ids[-12::2]
    sp.ack(acked[0])
    sp.ack_many(acked[1:])
    sp.ack(acked[0])  # again: ignored
    sp.ack(12345 << 40)  # unknown: ignored
    assert not first_seg.exists() and not first_seg.with_suffix(".ack").exists()
    assert len(seg_files(sp.directory)) == nseg - 1
    assert sp.pending_batches == 30 - len(acked)
    assert sp.stats()["acked"] == len(acked)
    sp, report = reopen(sp, segment_size=300)
    assert report.acked_records == len(acked) - sum(1 for r in ids if r >> 40 == first_seq)
    left = [r for r, _ in drain(sp)]
    assert left == [r for r in ids if r not in acked]
    sp.ack_many(left)
    assert sp.pending_batches == 0
    sp.close()  # nothing being written any more: every segment goes
    assert seg_files(sp.directory) == [] and seg_files(sp.directory, "ack") == []


def test_writing_segment_kept_until_rolled(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    rid = sp.append(batch("a"))
    sp.ack(rid)
    assert len(seg_files(sp.directory)) == 1  # still being written
    sp.append(batch("b"))
    assert sp.stats()["segments"] == 1


def test_torn_ack_file_replays_never_loses(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    ids = [sp.append(batch(str(i))) for i in range(6)]
    sp.ack_many(ids[:4])
    ack_file = seg_files(sp.directory, "ack")[0]
    sp.close()
    data = ack_file.read_bytes()
    assert len(data) == 4 * spool_mod.ACK_SIZE
    corrupted = bytearray(data[:-5])  # last entry torn
    corrupted[3] ^= 0xFF  # first entry damaged
    ack_file.write_bytes(bytes(corrupted))
    sp = Spool(sp.directory)
    report = sp.open()
    assert report.ignored_ack_entries == 2
    assert [r for r, _ in drain(sp)] == [ids[0], ids[3], ids[4], ids[5]]
    assert ack_file.stat().st_size % spool_mod.ACK_SIZE == 0  # realigned
    sp.ack(ids[0])
    sp.close()
    sp = Spool(sp.directory)
    sp.open()
    assert [r for r, _ in drain(sp)] == ids[3:]
    sp.close()


# -- crash recovery --------------------------------------------------------------------------


def _three_records(d: Path) -> tuple[Path, list[int]]:
    """A segment with three records; returns its path and the records' start offsets."""
    sp = Spool(d)
    sp.open()
    ids = [sp.append(batch(f"r{i}", 4)) for i in range(3)]
    sp._seal_writing()  # simulate a crash: no close(), so nothing is cleaned up
    sp._release_lock()
    path = seg_files(d)[0]
    return path, [r & ((1 << 40) - 1) for r in ids]


def _check_torn(d: Path, cut: int, zero_fill: int = 0) -> None:
    path, offs = _three_records(d)
    size = path.stat().st_size
    last = offs[-1]
    assert last < cut < size
    with path.open("r+b") as f:
        f.truncate(cut)
        f.seek(cut)
        f.write(b"\x00" * zero_fill)
    sp = Spool(d)
    report = sp.open()
    assert [b.events[0] for _, b in drain(sp)] == ["r0-0", "r1-0"]
    assert report.quarantined == []
    assert [(t.segment, t.offset, t.bytes) for t in report.truncated] == [
        (path.name, last, cut - last + zero_fill)
    ]
    assert path.stat().st_size == last
    # The spool keeps working after the truncation.
    sp.append(batch("new"))
    sp.close()
    sp = Spool(d)
    assert sp.open().clean
    assert [b.events[0] for _, b in drain(sp)] == ["r0-0", "r1-0", "new-0"]
    sp.close()


@pytest.mark.parametrize("into_last", [1, 2, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, -1])
@pytest.mark.parametrize("zero_fill", [0, 4096])
def test_torn_tail(tmp_path: Path, into_last: int, zero_fill: int) -> None:
    path, offs = _three_records(tmp_path / "probe")
    size = path.stat().st_size
    cut = size + into_last if into_last < 0 else offs[-1] + into_last
    _check_torn(tmp_path / "spool", cut, zero_fill)


@given(st.data())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_torn_tail_any_cut(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    d = tmp_path_factory.mktemp("torn")
    path, offs = _three_records(d / "probe")
    size = path.stat().st_size
    cut = data.draw(st.integers(offs[-1] + 1, size - 1))
    zero_fill = data.draw(st.sampled_from([0, 1, 100]))
    _check_torn(d / "spool", cut, zero_fill)


def test_bad_checksum_of_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    path, offs = _three_records(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    sp = Spool(tmp_path)
    report = sp.open()
    assert report.truncated_bytes == len(raw) - offs[-1] and not report.quarantined
    assert len(drain(sp)) == 2
    sp.close()


def _records(d: Path, k: int, ack: tuple[int, ...] = ()) -> tuple[Path, list[int]]:
    """A segment with k records r0..r{k-1} (those in `ack` acked), left as after a crash."""
    sp = Spool(d)
    sp.open()
    ids = [sp.append(batch(f"r{i}", 4)) for i in range(k)]
    sp.ack_many(ids[i] for i in ack)
    sp._seal_writing()
    sp._release_lock()
    return seg_files(d)[0], [r & ((1 << 40) - 1) for r in ids]


def _is_filler(data: bytes, pos: int, length: int) -> bool:
    parsed = spool_mod._parse_at(data, pos)
    return parsed is not None and parsed.flags == spool_mod.FLAG_FILLER and parsed.length == length


@pytest.mark.parametrize(
    ("where", "pos"),
    [("magic", 0), ("length", 4), ("length-high", 7), ("events", 8), ("payload", HEADER_SIZE + 5)],
)
def test_corruption_in_the_middle_is_quarantined(tmp_path: Path, where: str, pos: int) -> None:
    path, offs = _three_records(tmp_path)
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
    assert report.records == 2
    assert [b.events for _, b in drain(sp)] == [batch("r0", 4).events, batch("r2", 4).events]
    assert sp.stats()["quarantined"] == 1
    sp.close()
    # Reopening is clean and does not quarantine again.
    sp = Spool(tmp_path)
    assert sp.open().clean
    assert len(drain(sp)) == 2
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    sp.close()


def test_resync_after_several_corrupt_ranges_keeps_acks_and_cuts_torn_tail(
    tmp_path: Path,
) -> None:
    path, offs = _records(tmp_path, 6, ack=(4,))
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
    assert [b.events[0] for _, b in drain(sp)] == ["r0-0", "r2-0"]
    data = path.read_bytes()
    assert len(data) == offs[5]
    assert _is_filler(data, offs[1], lens[1]) and _is_filler(data, offs[3], lens[3])
    sp.close()
    sp = Spool(tmp_path)
    report = sp.open()
    assert report.clean and report.records == 2 and report.acked_records == 1
    sp.ack_many(r for r, _ in drain(sp))
    sp.close()
    assert seg_files(tmp_path) == []
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [path.name]


def test_short_garbage_swallows_the_next_record(tmp_path: Path) -> None:
    """Bytes inserted (no room for a filler before r1): r1 is given up, r2 still recovered."""
    path, offs = _three_records(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: offs[1]] + b"junk!" + raw[offs[1] :])
    sp = Spool(tmp_path)
    report = sp.open()
    (q,) = report.quarantined
    assert q.skipped == [(offs[1], offs[2] - offs[1] + 5)] and q.recovered_after == 1
    assert [b.events[0] for _, b in drain(sp)] == ["r0-0", "r2-0"]
    sp.close()
    # The same at the end: nothing to resynchronise on after r1, so the file is cut there,
    # but r1 is valid: quarantined, not a torn tail.
    path2, offs = _three_records(tmp_path / "b")
    raw = path2.read_bytes()
    path2.write_bytes(raw[: offs[2]] + b"junk!" + raw[offs[2] :])
    sp = Spool(tmp_path / "b")
    report = sp.open()
    assert report.truncated == []
    (q,) = report.quarantined
    assert (q.bad_offset, q.recovered_after, q.skipped) == (offs[2], 0, [])
    assert q.discarded_bytes == len(raw) - offs[2] + 5
    assert path2.stat().st_size == offs[2]
    assert [b.events[0] for _, b in drain(sp)] == ["r0-0", "r1-0"]
    sp.close()
    sp = Spool(tmp_path / "b")
    assert sp.open().clean
    sp.close()


def test_corrupt_first_record_the_rest_is_recovered(tmp_path: Path) -> None:
    path, offs = _three_records(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 2] ^= 0x01
    path.write_bytes(bytes(raw))
    sp = Spool(tmp_path)
    report = sp.open()
    (q,) = report.quarantined
    assert (q.bad_offset, q.good_records, q.recovered_after) == (0, 0, 2)
    assert _is_filler(path.read_bytes(), 0, offs[1])
    assert (tmp_path / "quarantine" / path.name).read_bytes() == bytes(raw)
    assert [b.events[0] for _, b in drain(sp)] == ["r1-0", "r2-0"]
    sp.close()


def test_scan_resync_is_linear_on_garbage() -> None:
    rec = spool_mod._record(batch("ok"), 0)[0]
    # Random bytes, zero fill, and magic bytes every few bytes whose headers never check out.
    junk = (
        os.urandom(1 << 20)
        + bytes(1 << 20)
        + (spool_mod._SYNC + b"\x00" + bytes(4) + b"\xff" * 4) * 100_000
    )
    data = rec + junk + rec
    started = time.monotonic()
    scan = spool_mod._scan(data)
    assert time.monotonic() - started < 5
    assert [r[0] for r in scan.records] == [0, len(rec) + len(junk)]
    assert scan.holes == [(len(rec), len(rec) + len(junk))]


def test_interrupted_quarantine_is_redone(tmp_path: Path) -> None:
    path, offs = _three_records(tmp_path)
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


def test_repair_that_cannot_be_written_still_replays_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, offs = _three_records(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offs[1] + HEADER_SIZE + 1] ^= 0x01
    path.write_bytes(bytes(raw))

    def no_space(*a: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_space)  # no hard links: quarantine/ gets a copy
    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_space)
        sp = Spool(tmp_path)
        report = sp.open()
    assert report.quarantined[0].recovered_after == 1
    assert sp.stats()["repair_errors"] == 1
    assert path.read_bytes() == bytes(raw)  # left as it was, read at the same offsets
    assert not path.with_suffix(".seg.tmp").exists()
    assert [b.events[0] for _, b in drain(sp)] == ["r0-0", "r2-0"]
    sp.close()
    sp = Spool(tmp_path)
    assert len(sp.open().quarantined) == 1  # repaired now, reusing the same copy
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [path.name]
    sp.close()
    sp = Spool(tmp_path)
    assert sp.open().clean
    assert len(drain(sp)) == 2
    sp.close()


def test_readonly_sees_records_after_corruption_changes_nothing(tmp_path: Path) -> None:
    path, offs = _three_records(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offs[1] + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    info = inspect_spool(tmp_path)
    assert info["stats"]["batches"] == 2
    (q,) = info["recovery"]["quarantined"]
    assert q["recovered_after"] == 1 and q["skipped_bytes"] == offs[2] - offs[1]
    assert path.read_bytes() == bytes(raw) and not (tmp_path / "quarantine").exists()


def test_readonly_inspect_changes_nothing(tmp_path: Path) -> None:
    path, _offs = _three_records(tmp_path)
    with path.open("ab") as f:
        f.write(b"\xfeS\x01torn")
    before = path.read_bytes()
    info = inspect_spool(tmp_path)
    assert info["stats"]["batches"] == 3 and info["stats"]["events"] == 12
    assert info["recovery"]["truncated_bytes"] == 7
    assert path.read_bytes() == before
    ro = Spool(tmp_path)
    ro.open(readonly=True)
    assert len(drain(ro)) == 3
    with pytest.raises(SpoolError):
        ro.append(batch("x"))
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


# -- bounds ----------------------------------------------------------------------------------


def _reclen(b: Batch | None = None) -> int:
    return len(spool_mod._record(b if b is not None else batch("b0"), 0)[0])


def test_block_when_full(make: Callable[..., Spool]) -> None:
    rl = _reclen()
    sp = make(max_size=rl * 5, segment_size=rl * 2)
    sp.open()
    ids = [sp.append(batch(f"b{i}")) for i in range(5)]
    with pytest.raises(SpoolFull):
        sp.append(batch("b5"))
    assert sp.stats()["rejected_full"] == 1 and sp.pending_batches == 5
    # Acking a whole sealed segment frees its room; acking part of one does not.
    drain(sp)
    sp.ack_many([ids[0], ids[1], ids[2]])
    sp.append(batch("b5"))
    sp.append(batch("b6"))
    with pytest.raises(SpoolFull):
        sp.append(batch("b7"))
    assert sp.size_bytes == 5 * rl
    with pytest.raises(RecordTooLarge):
        sp.append(batch("huge", 100))


def test_block_reclaims_fully_acked_writing_segment(make: Callable[..., Spool]) -> None:
    rl = _reclen()
    sp = make(max_size=rl * 2, segment_size=1 << 20)
    sp.open()
    ids = [sp.append(batch(f"b{i}")) for i in range(2)]
    with pytest.raises(SpoolFull):
        sp.append(batch("b2"))
    sp.ack_many(ids)
    assert sp.size_bytes == 2 * rl  # the segment being written is kept...
    sp.append(batch("b2"))  # ...until its space is needed
    assert sp.size_bytes == rl
    assert [b.events[0] for _, b in drain(sp)] == ["b2-0"]


def test_drop_oldest_counts_exactly(make: Callable[..., Spool]) -> None:
    rl = _reclen()
    sp = make(max_size=rl * 6, segment_size=rl * 2, when_full="drop_oldest")
    sp.open()
    ids = [sp.append_ex(batch(f"b{i}")) for i in range(6)]
    assert all(r.dropped_batches == 0 for r in ids)
    sp.ack(ids[0].record_id)  # acked records are not counted as dropped
    res = sp.append_ex(batch("b6"))
    assert (res.dropped_batches, res.dropped_events) == (1, 3)
    res = sp.append_ex(batch("b7"))
    assert (res.dropped_batches, res.dropped_events) == (0, 0)  # room left in that segment
    res = sp.append_ex(batch("b8"))
    assert (res.dropped_batches, res.dropped_events) == (2, 6)
    st_ = sp.stats()
    assert st_["dropped_full"] == 3 and st_["dropped_full_events"] == 9
    assert [b.events[0] for _, b in drain(sp)] == [f"b{i}-0" for i in range(4, 9)]
    assert sp.size_bytes <= rl * 6


def test_drop_oldest_seals_the_only_segment(make: Callable[..., Spool]) -> None:
    rl = _reclen()
    sp = make(max_size=rl * 3, segment_size=1 << 20, when_full="drop_oldest")
    sp.open()
    for i in range(3):
        sp.append(batch(f"b{i}"))
    res = sp.append_ex(batch("b3"))
    assert (res.dropped_batches, res.dropped_events) == (3, 9)
    assert [b.events[0] for _, b in drain(sp)] == ["b3-0"]


def test_drop_oldest_does_not_count_handed_out_records(make: Callable[..., Spool]) -> None:
    """Claimed (a worker retries them from memory) or handed out: not dropped, delivered."""
    rl = _reclen()
    sp = make(max_size=rl * 4, segment_size=rl * 2, when_full="drop_oldest")
    sp.open()
    r0 = sp.append(batch("b0"), claim=True)
    r1 = sp.append(batch("b1"))
    sp.append(batch("b2"))
    sp.append(batch("b3"))
    got = sp.next_batch()
    assert got is not None and got[0] == r1
    res = sp.append_ex(batch("b4"))  # drops the first segment: r0 and r1, both held
    assert (res.dropped_batches, res.dropped_events) == (0, 0)
    assert sp.pending_batches == 3 and sp.stats()["evicted_inflight"] == 2
    sp.ack(r0)  # the workers deliver them later: harmless no-ops
    sp.release(r1)
    got = sp.next_batch()
    assert got is not None and got[1].events[0] == "b2-0"
    r2 = got[0]
    assert sp.append_ex(batch("b5")).dropped_batches == 0
    res = sp.append_ex(batch("b6"))  # drops b2 (held) and b3 (not)
    assert (res.dropped_batches, res.dropped_events) == (1, 3)
    sp.ack(r2)
    st_ = sp.stats()
    assert (st_["dropped_full"], st_["dropped_full_events"], st_["evicted_inflight"]) == (1, 3, 3)
    assert st_["acked"] == 0 and st_["inflight"] == 0
    # Exact accounting: 7 appended = 3 delivered from memory + 1 dropped + 3 still spooled.
    assert [b.events[0] for _, b in drain(sp)] == ["b4-0", "b5-0", "b6-0"]
    assert sp.pending_batches == 3


# -- disk errors -----------------------------------------------------------------------------


def test_enospc_after_partial_write(
    make: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = make()
    sp.open()
    sp.append(batch("ok0"))
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, memoryview(data)[:10], offset)  # partial write...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("lost"))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "pwrite", real)
    path = seg_files(sp.directory)[0]
    assert path.stat().st_size == sp.size_bytes == _reclen(batch("ok0"))  # torn bytes cut away
    assert sp.stats()["write_errors"] == 1
    sp.append(batch("ok1"))
    sp, report = reopen(sp)
    assert report.clean
    assert [b.events[0] for _, b in drain(sp)] == ["ok0-0", "ok1-0"]
    sp.close()


def _enospc_once(monkeypatch: pytest.MonkeyPatch, times: int = 1, partial: int = 10) -> None:
    """os.pwrite writes `partial` bytes then fails with ENOSPC, `times` times."""
    real = os.pwrite
    left = {"n": times}

    def failing(fd: int, data: Any, offset: int) -> int:
        if left["n"] <= 0:
            return real(fd, data, offset)
        left["n"] -= 1
        real(fd, memoryview(data)[:partial], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", failing)


def test_enospc_reclaims_fully_acked_writing_segment(
    make: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = make()  # max_size far above what the "disk" holds
    sp.open()
    sp.ack_many([sp.append(batch(f"old{i}")) for i in range(3)])
    (old,) = seg_files(sp.directory)
    assert sp.pending_batches == 0 and sp.size_bytes == old.stat().st_size > 0
    _enospc_once(monkeypatch)
    res = sp.append_ex(batch("new"))  # the retry, in a fresh segment, succeeds
    monkeypatch.undo()
    assert res.dropped_batches == 0
    assert not old.exists() and not old.with_suffix(".ack").exists()
    (new,) = seg_files(sp.directory)
    assert new.stat().st_size == sp.size_bytes == _reclen(batch("new"))
    st_ = sp.stats()
    assert (st_["space_reclaims"], st_["write_errors"], st_["segments"]) == (1, 0, 1)
    assert [b.events[0] for _, b in drain(sp)] == ["new-0"]
    sp, report = reopen(sp)
    assert report.clean and report.records == 1
    sp.close()


def test_enospc_retried_only_once_and_only_if_space_was_freed(
    make: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = make()
    sp.open()
    sp.ack(sp.append(batch("old")))
    (old,) = seg_files(sp.directory)
    _enospc_once(monkeypatch, times=2)
    with pytest.raises(SpoolWriteError) as info:
        sp.append(batch("lost"))
    assert info.value.errno == errno.ENOSPC
    assert not old.exists()  # reclaimed anyway
    assert sp.stats()["space_reclaims"] == 1 and sp.stats()["write_errors"] == 1
    # Nothing fully acked left to free: no retry.
    sp.append(batch("keep"))
    _enospc_once(monkeypatch)
    with pytest.raises(SpoolWriteError):
        sp.append(batch("lost2"))
    assert sp.stats()["space_reclaims"] == 1 and sp.stats()["write_errors"] == 2
    monkeypatch.undo()
    sp.append(batch("after"))
    assert [b.events[0] for _, b in drain(sp)] == ["keep-0", "after-0"]
    assert sp.pending_batches == 2
    sp, report = reopen(sp)
    assert report.clean and report.records == 2
    sp.close()


def test_enospc_reclaims_acked_segments_left_by_failed_deletes(
    make: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    rl = _reclen()
    sp = make(segment_size=rl * 2)
    sp.open()
    ids = [sp.append(batch(f"b{i}")) for i in range(3)]  # b0, b1 sealed; b2 being written
    sealed = seg_files(sp.directory)[0]
    real_unlink = Path.unlink

    def eio(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(Path, "unlink", eio)
    sp.ack_many(ids[:2])
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert sealed.exists() and sp.stats()["delete_errors"] == 1
    _enospc_once(monkeypatch)
    sp.append(batch("b3"))  # into the same segment being written (it is not fully acked)
    monkeypatch.undo()
    assert not sealed.exists() and sp.stats()["space_reclaims"] == 1
    assert [b.events[0] for _, b in drain(sp)] == ["b2-0", "b3-0"]


def test_write_ahead_append_ack_keeps_one_segment(make: Callable[..., Spool]) -> None:
    """Appending and acking every batch reuses the segment being written: no file per batch."""
    sp = make()
    sp.open()
    for i in range(50):
        sp.ack(sp.append(batch(str(i))))
    assert len(seg_files(sp.directory)) == 1 and sp.stats()["segments"] == 1
    assert sp.stats()["space_reclaims"] == 0


def test_eio_on_truncate_seals_segment(
    make: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = make()
    sp.open()
    sp.append(batch("ok0"))

    real = os.pwrite

    def partial_then_eio(fd: int, data: Any, offset: int) -> int:
        real(fd, memoryview(data)[:30], offset)
        raise OSError(errno.EIO, "I/O error")

    def eio(*a: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pwrite", partial_then_eio)
    monkeypatch.setattr(os, "ftruncate", eio)
    with pytest.raises(SpoolWriteError):
        sp.append(batch("maybe"))
    monkeypatch.undo()
    sp.append(batch("ok1"))  # goes to a fresh segment
    assert len(seg_files(sp.directory)) == 2
    sp, report = reopen(sp)
    assert report.truncated_bytes == 30
    assert [b.events[0] for _, b in drain(sp)] == ["ok0-0", "ok1-0"]
    sp.close()


def test_create_segment_failure(
    make: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = make()
    sp.open()
    real = os.open

    def erofs(path: Any, flags: int, *a: Any) -> int:
        if str(path).endswith(".seg"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", erofs)
    with pytest.raises(SpoolWriteError):
        sp.append(batch("x"))
    monkeypatch.undo()
    sp.append(batch("y"))
    assert [b.events[0] for _, b in drain(sp)] == ["y-0"]


RLIMIT_SCRIPT = """
import resource, signal, sys, os
from pathlib import Path
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.spool import Spool, SpoolWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = Path(sys.argv[1])
sp = Spool(d)
sp.open()
sp.append(Batch(["small"], ["t"]))
size = sp.size_bytes
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 5000, resource.RLIM_INFINITY))
try:
    sp.append(Batch(["x" * 20000], ["t"]))
except SpoolWriteError as e:
    print("error", e.errno, sp.size_bytes, os.path.getsize(next((d / "segments").glob("*.seg"))))
sp.append(Batch(["after"], ["t"]))
sp._seal_writing(); sp._release_lock()  # crash: no close
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
    assert [b.events for _, b in drain(sp)] == [["small"], ["after"]]
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
                sp.append(Batch([f"{p}:{i}"], ["t"]))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def consume() -> None:
        try:
            while True:
                got = sp.next_batches(7)
                if not got:
                    if done.is_set() and sp.pending_batches == 0:
                        return
                    time.sleep(0.001)
                    continue
                seen.extend(b.events[0] for _, b in got)
                sp.ack_many(r for r, _ in got)
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
    assert not errors
    assert sorted(seen) == sorted(f"{p}:{i}" for p in range(producers) for i in range(per))
    st_ = sp.stats()
    assert st_["appended"] == st_["acked"] == producers * per
    assert st_["batches"] == 0 and st_["segments"] <= 1
    sp, report = reopen(sp)
    assert report.records == 0
    sp.close()


def test_stats_and_purge(make: Callable[..., Spool]) -> None:
    sp = make(segment_size=300)
    sp.open()
    for i in range(10):
        sp.append(batch(str(i), 2))
    s = sp.stats()
    for key in (
        "batches",
        "events",
        "bytes",
        "oldest_age_seconds",
        "segments",
        "appended",
        "acked",
        "dropped_full",
        "quarantined",
    ):
        assert key in s
    assert (s["batches"], s["events"], s["appended"]) == (10, 20, 10)
    assert s["bytes"] == sp.size_bytes == sum(p.stat().st_size for p in seg_files(sp.directory))
    assert 0 <= s["oldest_age_seconds"] < 60
    sp.next_batch()
    assert sp.purge() == (10, 20)
    assert seg_files(sp.directory) == [] and sp.size_bytes == 0 and sp.next_batch() is None
    sp.append(batch("again"))
    assert [b.events[0] for _, b in drain(sp)] == ["again-0"]


def test_runtime_corruption_is_skipped_and_kept(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    sp.append(batch("a"))
    rid = sp.append(batch("b"))
    sp.append(batch("c"))
    path = seg_files(sp.directory)[0]
    with path.open("r+b") as f:
        f.seek((rid & ((1 << 40) - 1)) + HEADER_SIZE + 3)
        f.write(b"!")
    assert [b.events[0] for _, b in drain(sp)] == ["a-0", "c-0"]
    assert sp.stats()["corrupt_records"] == 1
    assert (sp.directory / "quarantine" / path.name).exists()


def test_closed_spool_refuses(make: Callable[..., Spool]) -> None:
    sp = make()
    sp.open()
    sp.close()
    with pytest.raises(SpoolError):
        sp.append(batch("x"))
    with pytest.raises(SpoolError):
        sp.open()
