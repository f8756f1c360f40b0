"""Plain regression tests beside the spool model's replays (tests/test_spool_model.py): what
needs a power loss, so the model's in-memory filesystem (`MemFs`) rather than real files.

The others the model found are in tests/test_spool.py, on real files: a half-failed segment
create, drop_oldest whose victim's clean-up fails, torn and short ack writes.
"""

from __future__ import annotations

import contextlib
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
