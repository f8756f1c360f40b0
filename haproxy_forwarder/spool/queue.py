"""`Spool`: the durable queue of batches (append, hand out oldest first, ack to delete).

Locks, the flock, the open/closed state, and the order of each operation's steps; the rest is
delegated: the bytes are format.py's, the files segments.py's, the open recovery.py's, what is
held in memory (ready heap, in-flight set, totals) index.py's, creating, sealing and deleting
segments (and the ENOSPC reclaim) lifecycle.py's, the size bound (block / drop_oldest) room.py's.

Synchronous: the daemon calls it from threads of delivery's own executors (run_in_executor,
not asyncio.to_thread: appends and claims, the re-queuer's too, in one append thread,
next_batch in the spool-read threads, acks in an ack thread or, after a claim, the append
thread), and reads its cheap properties and stats() on the event loop as well; every public
method is thread-safe.

Bounds: size is the sum of segment file sizes (acked records count until their segment is
deleted; a segment is deleted once every record in it is acked and it is not the one being
written). When an append would exceed max_size: "block" raises SpoolFull; "drop_oldest" deletes
whole oldest segments (sealing the current one first if nothing else is left) and counts the
un-acked batches/events they held as dropped, except those handed out (next_batch, or appended
with claim=True): the caller holds them in memory and still delivers them, so they are not
dropped, only no longer on disk (counted as evicted_inflight). The append says which ones
(`AppendResult.evicted`): their holder must treat them as memory-only from then on (a crash
loses them; a shutdown must write them again). Their later ack() is a no-op.

Losses no caller was told of (records found corrupt at open or when read back, and what
drop_oldest deleted during an append that then failed) wait in `take_losses()`: whoever counts
drops for the daemon takes them from there, on its own thread, so each is counted once.

Disk full: the segment being written is kept while it is fully acked (appending and acking
every batch must not create a file per batch), so its space would never come back when the disk
fills before max_size. An append failing with ENOSPC/EDQUOT therefore deletes every fully acked
segment, the one being written included, and if that freed anything retries once in a new
segment (space_reclaims).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..batching import Batch
from ..observability.counters import SpoolCounters
from . import format as fmt
from .errors import RecordTooLarge, SpoolError, SpoolLocked, SpoolWriteError
from .index import RecordIndex
from .lifecycle import SegmentLifecycle
from .recovery import Recovery, RecoveryReport, quarantine_path
from .room import Evicted, Losses, Room, RoomTally, WhenFull
from .segments import Filesystem, SegmentFiles, fsync_dir

# The spool's public names (the package re-exports them); Evicted, Losses and WhenFull are
# room.py's, named here too because callers import them from this module.
__all__ = ["AppendResult", "Evicted", "Losses", "Spool", "WhenFull", "inspect_spool"]

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class AppendResult(NamedTuple):
    record_id: int
    dropped_batches: int  # drop_oldest: un-acked batches deleted to make room for this one
    dropped_events: int
    evicted: tuple[Evicted, ...] = ()  # handed-out records drop_oldest deleted as well


class Spool:
    """See the module docstring; `open()` before anything else, `close()` at the end."""

    def __init__(
        self,
        directory: Path | str,
        max_size: int = 1 << 30,
        when_full: WhenFull = "block",
        segment_size: int = 32 << 20,
        *,
        counters: SpoolCounters | None = None,
        fs: Filesystem | None = None,
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
        self.counters = counters if counters is not None else SpoolCounters()
        self.fs = fs if fs is not None else Filesystem()
        self._files = SegmentFiles(self.fs, self.seg_dir)
        # _wlock serialises appends (and anything touching the segment being written); it is
        # taken before _lock, never while holding it. _lock guards every in-memory structure:
        # the index, the lifecycle's and the room's state, the losses.
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._index = RecordIndex()
        self._life = SegmentLifecycle(self._files, self._index, self.counters, segment_size)
        self._room = Room(self._index, self._life, self.counters)
        self._lock_fd: int | None = None
        self._state: Literal["new", "open", "readonly", "closed"] = "new"
        self._losses = Losses()

    # -- properties (lock-free hints, read from the event loop) ----------------------------

    @property
    def size_bytes(self) -> int:
        return self._index.size

    @property
    def pending_batches(self) -> int:
        """Un-acked batches (including those handed out and not yet acked)."""
        return self._index.batches

    @property
    def pending_events(self) -> int:
        return self._index.events

    @property
    def has_ready(self) -> bool:
        """A cheap hint that next_batch() may return something (no lock, no IO)."""
        return bool(self._index.ready)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- open -------------------------------------------------------------------------------

    def open(self, readonly: bool = False) -> RecoveryReport:
        """Recover what is on disk; readonly=True changes nothing (no lock, no repair)."""
        with self._wlock, self._lock:
            if self._state != "new":
                raise SpoolError(f"spool already {self._state}")
            if not readonly:
                if not self.fs.is_dir(self.seg_dir):
                    self.fs.mkdir(self.seg_dir)
                    fsync_dir(self.fs, self.directory)
                self._take_lock()
            try:
                report, found = Recovery(
                    self._files, self.directory, self.quarantine_dir, self.counters, readonly
                ).run()
            except BaseException:
                self._release_lock()
                raise
            self._index.load(found.segments)
            self._life.next_seq = found.next_seq
            self._losses.corrupt_records += report.corrupt_records
            self._losses.corrupt_events += report.corrupt_events
            self._losses.corrupt_segments += [q.segment for q in report.quarantined]
            self._state = "readonly" if readonly else "open"
            return report

    def take_losses(self) -> Losses:
        """The losses not reported yet (see the module docstring), once: the next call only
        returns what happened after this one."""
        # Asked from the event loop after every append: no lock when there is nothing (a loss
        # noted meanwhile is returned by the next call).
        if not self._losses:
            return Losses()
        with self._lock:
            out, self._losses = self._losses, Losses()
            return out

    def _take_lock(self) -> None:
        fd = self.fs.open(self.seg_dir / "LOCK", os.O_RDWR | os.O_CREAT)
        try:
            self.fs.flock(fd)
        except OSError as e:
            self.fs.close(fd)
            raise SpoolLocked(f"{self.directory} is used by another process") from e
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            self.fs.close(self._lock_fd)
            self._lock_fd = None

    def _check_writable(self) -> None:
        if self._state != "open":
            raise SpoolError(f"spool is {self._state}, not open for writing")

    # -- append -----------------------------------------------------------------------------

    def append(self, batch: Batch, claim: bool = False) -> AppendResult:
        """Store `batch`; returns once it is on disk (fsync'd), with what drop_oldest dropped.

        claim=True: the caller keeps the batch and is already sending it (a retry after a
        first failure); the record counts as handed out, so next_batch() never returns it
        in this run and delivering it twice is impossible. ack() it as usual.
        """
        created_ms = time.time_ns() // 1_000_000
        rec = fmt.encode_record(batch, created_ms)
        n = len(batch)
        reclen = len(rec)
        if reclen > self.max_size:
            raise RecordTooLarge(f"record of {reclen} bytes exceeds max_size {self.max_size}")
        tally = RoomTally()
        try:
            with self._wlock:
                return self._append(rec, n, created_ms, claim, tally)
        except BaseException:
            if tally.batches or tally.evicted:
                with self._lock:  # dropped all the same: told through take_losses()
                    self._losses.dropped_batches += tally.batches
                    self._losses.dropped_events += tally.events
                    self._losses.evicted += tally.evicted
            raise

    def _append(
        self, rec: bytes, n: int, created_ms: int, claim: bool, tally: RoomTally
    ) -> AppendResult:
        """append() under _wlock; what drop_oldest deletes is noted in `tally` as it goes."""
        reclen = len(rec)
        for attempt in range(2):
            with self._lock:
                self._check_writable()
                self._room.make(reclen, self.max_size, self.when_full, tally)
                seg = self._life.writing_segment(reclen)
                offset = seg.size
            # The write and fsync run outside _lock: readers and acks go on meanwhile.
            try:
                self._files.write(seg, rec, offset)
            except OSError as err:
                with self._lock:
                    self._life.undo_partial_write(seg, offset)
                    if attempt == 0 and err.errno in _NO_SPACE and self._life.reclaim_acked():
                        self.counters.space_reclaims += 1
                        continue  # once, in a new segment
                    self.counters.write_errors += 1
                raise SpoolWriteError(f"cannot append to {seg.path}", err) from err
            with self._lock:
                rid = self._index.add(seg, offset, reclen, n, created_ms, claim)
                self.counters.appended_batches += 1
                self.counters.appended_events += n
                if self._life.dirty:
                    self._life.cut_dirty()  # the disk writes again: worth another try
            return AppendResult(rid, tally.batches, tally.events, tuple(tally.evicted))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- reading ----------------------------------------------------------------------------

    def next_batch(self) -> tuple[int, Batch] | None:
        """Oldest un-acked record not already handed out in this run, or None."""
        while True:
            with self._lock:
                if self._state not in ("open", "readonly"):
                    raise SpoolError(f"spool is {self._state}")
                got = self._index.pop_ready()
                if got is None:
                    return None
                rid, seg, off, (length, n, _created) = got
                try:
                    data = self._files.read(seg, off, length)
                except OSError:
                    data = b""  # unreadable: handled as a corrupt record
                self._index.inflight.add(rid)
            try:  # decoding runs outside the lock
                return rid, fmt.decode_record(data, n)
            except fmt.CorruptRecord:
                self._corrupt_at_runtime(rid)

    def _corrupt_at_runtime(self, rid: int) -> None:
        """A record that verified at open/append no longer does (or cannot be read): keep the
        file in quarantine/, skip the record, count it and its events (the index knows how
        many) for take_losses()."""
        with self._lock:
            found = self._index.forget(rid)
            if found is None:
                return
            seg, meta = found
            events = meta[1]
            self.counters.corrupt_records += 1
            self.counters.corrupt_events += events
            self._losses.corrupt_records += 1
            self._losses.corrupt_events += events
            self._losses.corrupt_segments.append(seg.path.name)
            if self._state != "open":
                return
            with contextlib.suppress(OSError):
                self.fs.mkdir(self.quarantine_dir)
                dest = quarantine_path(self.fs, self.quarantine_dir, seg.path)
                if not self.fs.exists(dest):
                    self.fs.link(seg.path, dest)
                    self.counters.quarantined_segments += 1
            # Acked on disk too: its loss is counted now, so the next open() must neither
            # count it again nor replay it (a record read back wrong once is not trusted).
            # That open still quarantines and repairs the damaged range.
            self._life.write_ack(seg, rid)

    # -- acks -------------------------------------------------------------------------------

    def ack(self, record_id: int) -> None:
        """Mark a record delivered (one ack-file write + fsync): never replayed after a restart.

        Unknown or already acked ids are ignored. Never raises on disk errors: an ack that
        could not be persisted only means a duplicate after a restart (counted).
        """
        with self._lock:
            self._check_writable()
            found = self._index.forget(record_id)
            if found is None:
                return
            seg, meta = found
            self.counters.acked_batches += 1
            self.counters.acked_events += meta[1]
            self._life.write_ack(seg, record_id)

    def purge(self) -> tuple[int, int]:
        """Delete every segment (CLI `spool purge`); returns (batches, events) discarded."""
        with self._wlock, self._lock:
            self._check_writable()
            b, e = self._index.batches, self._index.events
            self._life.seal_writing()
            for seg in list(self._index.segments.values()):
                try:
                    self._life.delete(seg, fsync_dir=False)
                except OSError as err:
                    raise SpoolWriteError(f"cannot delete {seg.path}", err) from err
            self._life.sync_deleted()
            self._index.clear_queue()
            self.counters.purged_batches += b
            self.counters.purged_events += e
            return b, e

    # -- close / stats ----------------------------------------------------------------------

    def close(self) -> None:
        with self._wlock, self._lock:
            if self._state in ("new", "closed"):
                self._state = "closed"
                return
            w = self._life.writing
            self._life.seal_writing()
            if w is not None and self._state == "open":
                self._life.delete_or_count(w)
            if self._life.dirty:
                self._life.cut_dirty()
            if self._life.unlinked:  # a folder fsync failed after some unlinks: once more
                with contextlib.suppress(OSError):
                    self._life.sync_deleted()
            self._files.close_reader()
            self._release_lock()
            self._state = "closed"

    def stats(self) -> dict[str, int | float]:
        """The gauges (what the spool holds now); the counters are in `self.counters`."""
        with self._lock:
            return {**self._index.gauges(), "max_size": self.max_size}


def inspect_spool(directory: Path | str) -> dict[str, Any]:
    """Read-only look at a spool directory (no daemon needed; safe while one runs).

    "stats" is the gauges and what this read-only recovery counted (spool_* names).
    """
    spool = Spool(directory)
    report = spool.open(readonly=True)
    try:
        return {
            "stats": {**spool.stats(), **spool.counters.snapshot()},
            "recovery": report.as_dict(),
        }
    finally:
        spool.close()
