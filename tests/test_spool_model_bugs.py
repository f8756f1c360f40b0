"""Plain regression tests beside the spool model's replays (tests/test_spool_model.py): what
needs a power loss, so the model's in-memory filesystem (`MemFs`) rather than real files.

The others the model found are in tests/test_spool.py, on real files: a half-failed segment
create, drop_oldest whose victim's clean-up fails, torn and short ack writes.

Strict POSIX, as MemFs: a name's creation or removal is durable once its folder is fsync'd,
and two changes not separated by such an fsync may reach the disk in either order.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path

from haproxy_forwarder.batching import Batch
from haproxy_forwarder.spool import Spool

from .spool_model_support import Crash, Fault, MemFs

ROOT = Path("/spool")
SEG_DIR = ROOT / "segments"
TIME = "2026-01-01T00:00:00.000Z"


def batch(tag: str) -> Batch:
    return Batch.from_events([f"{tag}-0", f"{tag}-1"], [TIME, TIME])


def opened(fs: MemFs) -> Spool:
    sp = Spool(ROOT, fs=fs)
    sp.open()
    return sp


def replayed(fs: MemFs) -> list[str]:
    """A new process opens the spool: the first event of every record it hands out."""
    sp = opened(fs)
    out = []
    while (item := sp.next_batch()) is not None:
        out.append(item[1].events()[0])
    sp.close()
    return out


def folder_syncs(fs: MemFs, since: int) -> int:
    return fs.trace[since:].count(f"fsync {SEG_DIR}")


def test_ack_file_name_survives_a_power_loss() -> None:
    """The first ack of a segment creates its .ack file: once ack() returned, a power loss
    must not take the file's name away (strict POSIX: a new name is durable once its folder
    is fsync'd), or the acked record comes back."""
    fs = MemFs(str(ROOT))
    sp = opened(fs)
    ids = [sp.append(batch(f"r{i}")).record_id for i in range(3)]
    sp.ack(ids[0])
    assert sp.counters.ack_write_errors == 0
    fs.power_loss(0, writeback=False)  # only what was made durable survives
    assert replayed(fs) == ["r1-0", "r2-0"]


def test_ack_file_folder_is_synced_once_per_file_not_per_ack() -> None:
    fs = MemFs(str(ROOT))
    sp = opened(fs)
    ids = [sp.append(batch(f"r{i}")).record_id for i in range(4)]
    mark = len(fs.trace)
    sp.ack(ids[0])
    assert folder_syncs(fs, mark) == 1
    mark = len(fs.trace)
    sp.ack(ids[1])
    sp.ack(ids[2])
    assert folder_syncs(fs, mark) == 0
    sp.close()


def test_ack_file_left_by_a_killed_process_is_made_durable_by_the_next() -> None:
    """A process dies after writing a new .ack file, before its folder fsync: the name is in
    the folder but not durable. The next process finds it and acks into it: that ack must
    survive a power loss too (a listing does not say a name is durable)."""
    fs = MemFs(str(ROOT))
    sp = opened(fs)
    for i in range(3):
        sp.append(batch(f"r{i}"))
    rid = sp.next_batch()
    assert rid is not None
    fs.arm(Fault(at=5, kind="crash"))  # open .ack, write, fsync, close, then the folder
    with contextlib.suppress(Crash):
        sp.ack(rid[0])
    assert fs.fired is not None and fs.trace[-2] == f"open_dir {SEG_DIR}"
    fs.crash()  # kill -9: the .ack name is live, not durable
    sp = opened(fs)
    got = sp.next_batch()
    assert got is not None and got[1].events()[0] == "r1-0"  # r0's entry is in the file
    sp.ack(got[0])
    fs.power_loss(0, writeback=False)
    assert replayed(fs) == ["r2-0"]


def _acked_segment(fs: MemFs) -> Spool:
    """Segment 0 holds r0 and r1, both acked (kept: it is the one being written)."""
    sp = Spool(ROOT, fs=fs, segment_size=250)
    sp.open()
    ids = [sp.append(batch(f"r{i}")).record_id for i in range(2)]
    for rid in ids:
        sp.ack(rid)
    assert sp.counters.ack_write_errors == sp.counters.delete_errors == 0
    return sp


def _crash_anywhere_acks_stay(step: Callable[[Spool], object], killed: bool = False) -> None:
    """Run `step` on a spool whose segment 0 is fully acked (`killed`: its process was killed
    before, so `step` opens another one), with the process dying at each of its calls in turn
    and the power going with any of segment 0's two name changes (.seg, .ack removed) written
    back: r0 and r1, durably acked, must never come back."""
    names = [SEG_DIR / "000000000000.seg", SEG_DIR / "000000000000.ack"]
    for at in itertools.count(1):
        for back in ([], names[:1], names[1:], names):
            fs = MemFs(str(ROOT))
            sp = _acked_segment(fs)
            if killed:
                fs.crash()
            fs.arm(Fault(at=at, kind="crash"))
            with contextlib.suppress(Crash):
                step(sp)
            if fs.fired is None:  # `step` made fewer calls: every crash point was tried
                assert at > 4
                return
            for path in back:
                fs.write_back(path)
            fs.power_loss(0, writeback=False)
            assert not {"r0-0", "r1-0"} & set(replayed(fs)), (at, back, fs.trace)


def test_acked_segment_deleted_when_rolled_over_never_comes_back_without_its_acks() -> None:
    """The append that rolls over to a new segment deletes the fully acked one: its .ack
    removal must not reach the disk before the segment's own."""
    _crash_anywhere_acks_stay(lambda sp: sp.append(batch("r2")))


def test_acked_segment_deleted_at_open_never_comes_back_without_its_acks() -> None:
    """Killed with a fully acked segment (the one being written): the next open deletes it,
    in the same order."""
    _crash_anywhere_acks_stay(lambda sp: Spool(ROOT, fs=sp.fs, segment_size=250).open(),
                              killed=True)
