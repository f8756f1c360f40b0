"""`Spool`: the durable queue of batches (append, hand out oldest first, ack to delete).

Locks, the flock, the ready heap and the in-flight set, the size bound (block / drop_oldest)
and the ENOSPC reclaim; the bytes are format.py's, the files segments.py's, the open recovery.py's.

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
import heapq
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..batching import Batch
from ..observability.counters import SpoolCounters
from . import format as fmt
from .errors import RecordTooLarge, SpoolError, SpoolFull, SpoolLocked, SpoolWriteError
from .recovery import Recovery, RecoveryReport, quarantine_path
from .segments import Filesystem, Segment, SegmentFiles, fsync_dir

WhenFull = Literal["block", "drop_oldest"]
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class Evicted(NamedTuple):
    """A handed-out record drop_oldest deleted: from now on it exists only in its holder's
    memory."""

    record_id: int
    events: int


class AppendResult(NamedTuple):
    record_id: int
    dropped_batches: int  # drop_oldest: un-acked batches deleted to make room for this one
    dropped_events: int
    evicted: tuple[Evicted, ...] = ()  # handed-out records drop_oldest deleted as well


@dataclass
class Losses:
    """What the spool lost that no caller was told of yet (see `Spool.take_losses`)."""

    # drop_oldest, during appends that then failed (a successful one returns them)
    dropped_batches: int = 0
    dropped_events: int = 0
    evicted: list[Evicted] = field(default_factory=list)
    # records that failed their checksum, at open or when read back, and their events where
    # a header said how many
    corrupt_records: int = 0
    corrupt_events: int = 0
    corrupt_segments: list[str] = field(default_factory=list)  # file names, for the logs

    def __bool__(self) -> bool:
        return bool(self.dropped_batches or self.evicted or self.corrupt_records)


class _Room:
    """What one append's drop_oldest deleted so far (kept if the append then fails)."""

    __slots__ = ("batches", "events", "evicted")

    def __init__(self) -> None:
        self.batches = 0
        self.events = 0
        self.evicted: list[Evicted] = []


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
        # taken before _lock, never while holding it. _lock guards every in-memory structure.
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._segments: dict[int, Segment] = {}  # ascending seq
        self._writing: Segment | None = None
        self._next_seq = 0
        self._ready: list[int] = []  # heap of record ids that may be handed out
        self._inflight: set[int] = set()
        self._size = 0
        self._pending_batches = 0
        self._pending_events = 0
        self._lock_fd: int | None = None
        self._state: Literal["new", "open", "readonly", "closed"] = "new"
        self._losses = Losses()
        # Sealed segments a failed append left longer than their good records (the cut back
        # failed too): cut again later, or the next open would take the tail for corruption.
        self._dirty: set[int] = set()
        # Segments unlinked whose .ack file waits for the folder fsync (see _sync_deleted).
        self._unlinked: list[Segment] = []

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
                report, index = Recovery(
                    self._files, self.directory, self.quarantine_dir, self.counters, readonly
                ).run()
            except BaseException:
                self._release_lock()
                raise
            self._segments = index.segments
            self._next_seq = index.next_seq
            for seg in self._segments.values():
                self._size += seg.size
                for off, (_length, n, _created) in seg.recs.items():
                    self._ready.append(fmt.record_id(seg.seq, off))
                    self._pending_batches += 1
                    self._pending_events += n
            heapq.heapify(self._ready)
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
        room = _Room()
        try:
            with self._wlock:
                return self._append(rec, n, created_ms, claim, room)
        except BaseException:
            if room.batches or room.evicted:
                with self._lock:  # dropped all the same: told through take_losses()
                    self._losses.dropped_batches += room.batches
                    self._losses.dropped_events += room.events
                    self._losses.evicted += room.evicted
            raise

    def _append(
        self, rec: bytes, n: int, created_ms: int, claim: bool, room: _Room
    ) -> AppendResult:
        """append() under _wlock; what drop_oldest deletes is noted in `room` as it goes."""
        reclen = len(rec)
        for attempt in range(2):
            with self._lock:
                self._check_writable()
                self._make_room(reclen, room)
                seg = self._writing_segment(reclen)
                offset = seg.size
            # The write and fsync run outside _lock: readers and acks go on meanwhile.
            try:
                self._files.write(seg, rec, offset)
            except OSError as err:
                with self._lock:
                    self._undo_partial_write(seg, offset)
                    if attempt == 0 and err.errno in _NO_SPACE and self._reclaim_acked():
                        self.counters.space_reclaims += 1
                        continue  # once, in a new segment
                    self.counters.write_errors += 1
                raise SpoolWriteError(f"cannot append to {seg.path}", err) from err
            with self._lock:
                seg.size = offset + reclen
                seg.total += 1
                seg.recs[offset] = (reclen, n, created_ms)
                rid = fmt.record_id(seg.seq, offset)
                if claim:
                    self._inflight.add(rid)
                else:
                    heapq.heappush(self._ready, rid)
                self._size += reclen
                self._pending_batches += 1
                self._pending_events += n
                self.counters.appended_batches += 1
                self.counters.appended_events += n
                if self._dirty:
                    self._cut_dirty()  # the disk writes again: worth another try
            return AppendResult(rid, room.batches, room.events, tuple(room.evicted))
        raise AssertionError("unreachable")  # pragma: no cover

    def _make_room(self, reclen: int, room: _Room) -> None:
        while self._size + reclen > self.max_size:
            w = self._writing
            if w is not None and not w.recs and w.total:
                # The segment being written is fully acked: seal it so its space comes back.
                self._seal_writing()
                self._delete_or_count(w)
                continue
            if self.when_full == "block":
                self.counters.rejected_full += 1
                raise SpoolFull(
                    f"spool full: {self._size} + {reclen} bytes > max_size {self.max_size}"
                )
            victim = next((s for s in self._segments.values() if s is not self._writing), None)
            if victim is None:
                if w is None or not w.total:  # pragma: no cover - reclen <= max_size
                    raise SpoolFull("spool full and nothing left to drop")
                self._seal_writing()
                continue
            # Handed-out records live on in the holder's memory and get delivered (their ack
            # is a no-op then): not dropped, only no longer on disk. Said in `room.evicted`,
            # so that the holder knows a crash or a shutdown would lose them now.
            held: list[Evicted] = []
            b = e = 0
            for off, (_length, n, _created) in victim.recs.items():
                rid = fmt.record_id(victim.seq, off)
                if rid in self._inflight:
                    held.append(Evicted(rid, n))
                else:
                    b, e = b + 1, e + n
            try:
                self._delete_segment(victim, fsync_dir=True)
            except OSError as err:
                self.counters.delete_errors += 1
                if victim.seq in self._segments:  # the file is still there: nothing dropped
                    raise SpoolWriteError(f"cannot drop {victim.path}", err) from err
                # Its records went with the file; only the clean-up after (the .ack
                # unlink, the folder fsync) failed: dropped all the same, so counted.
                self._count_drop(room, b, e, held)
                raise SpoolWriteError(f"cannot drop {victim.path}", err) from err
            self._count_drop(room, b, e, held)

    def _count_drop(self, room: _Room, batches: int, events: int, held: list[Evicted]) -> None:
        room.batches += batches
        room.events += events
        room.evicted += held
        self.counters.evicted_inflight += len(held)
        self.counters.dropped_batches += batches
        self.counters.dropped_events += events

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
                self._sync_deleted()
        return freed > 0

    def _writing_segment(self, reclen: int) -> Segment:
        w = self._writing
        if w is not None and w.size and w.size + reclen > self.segment_size:
            self._seal_writing()
            self._delete_or_count(w)
            w = None
        if w is None:
            seq = self._next_seq
            # Never tried twice: a create that failed half-way may leave the name behind (its
            # clean-up failed too), and O_EXCL would then refuse every later append.
            self._next_seq += 1
            try:
                w = self._files.create(seq)
            except OSError as e:
                self.counters.write_errors += 1
                raise SpoolWriteError(f"cannot create a segment in {self.seg_dir}", e) from e
            self._segments[w.seq] = w
            self._writing = w
        return w

    def _seal_writing(self) -> None:
        w = self._writing
        if w is not None:
            self._writing = None
            self._files.seal(w)

    def _undo_partial_write(self, seg: Segment, offset: int) -> None:
        """Cut a failed append back to the last good record; seal the segment if we cannot."""
        try:
            self._files.cut(seg, offset)
        except OSError:
            # Unknown tail on disk: stop writing here. Memory only knows good records; the
            # cut is tried again after the next good append and at close. (If it never
            # succeeds, the next open() finds a bad tail in a segment that is not the newest
            # and counts it as corrupt: counted, never silently dropped.)
            if self._writing is seg:
                self._seal_writing()
                if not seg.total:
                    with contextlib.suppress(OSError):
                        self._delete_segment(seg, fsync_dir=True)
                    if seg.seq not in self._segments:  # unlinked: no tail left to cut
                        return
                self._dirty.add(seg.seq)

    def _cut_dirty(self) -> None:
        """Cut the segments in _dirty back to their good records (holds _lock)."""
        for seq in list(self._dirty):
            seg = self._segments.get(seq)
            if seg is not None:
                try:
                    self._files.truncate(seg)
                except OSError:
                    continue
            self._dirty.discard(seq)

    # -- reading ----------------------------------------------------------------------------

    def next_batch(self) -> tuple[int, Batch] | None:
        """Oldest un-acked record not already handed out in this run, or None."""
        while True:
            with self._lock:
                if self._state not in ("open", "readonly"):
                    raise SpoolError(f"spool is {self._state}")
                got = self._pop_ready()
                if got is None:
                    return None
                rid, data, n = got
            try:  # decoding runs outside the lock
                return rid, fmt.decode_record(data, n)
            except fmt.CorruptRecord:
                self._corrupt_at_runtime(rid)

    def _pop_ready(self) -> tuple[int, bytes, int] | None:
        while self._ready:
            rid = heapq.heappop(self._ready)
            seq, off = fmt.split_id(rid)
            seg = self._segments.get(seq)
            if seg is None or rid in self._inflight:
                continue
            meta = seg.recs.get(off)
            if meta is None:
                continue
            try:
                data = self._files.read(seg, off, meta[0])
            except OSError:
                data = b""  # unreadable: handled as a corrupt record
            self._inflight.add(rid)
            return rid, data, meta[1]
        return None

    def _forget(self, rid: int) -> tuple[Segment, tuple[int, int, int]] | None:
        """Drop a pending record from the index (acked, or found corrupt): its segment and
        (length, events, created), or None if it is unknown or already gone. Holds _lock."""
        self._inflight.discard(rid)
        seq, off = fmt.split_id(rid)
        seg = self._segments.get(seq)
        if seg is None:
            return None
        meta = seg.recs.pop(off, None)
        if meta is None:
            return None
        self._pending_batches -= 1
        self._pending_events -= meta[1]
        return seg, meta

    def _corrupt_at_runtime(self, rid: int) -> None:
        """A record that verified at open/append no longer does (or cannot be read): keep the
        file in quarantine/, skip the record, count it and its events (the index knows how
        many) for take_losses()."""
        with self._lock:
            found = self._forget(rid)
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
            if self._delete_or_count(seg, fsync_dir=True):
                return
            seq, off = fmt.split_id(rid)
            try:
                self._files.append_acks(seg, fmt.ack_entry(seq, off))
            except OSError:
                self.counters.ack_write_errors += 1

    # -- acks -------------------------------------------------------------------------------

    def ack(self, record_id: int) -> None:
        """Mark a record delivered (one ack-file write + fsync): never replayed after a restart.

        Unknown or already acked ids are ignored. Never raises on disk errors: an ack that
        could not be persisted only means a duplicate after a restart (counted).
        """
        with self._lock:
            self._check_writable()
            found = self._forget(record_id)
            if found is None:
                return
            seg, meta = found
            seq, off = fmt.split_id(record_id)
            self.counters.acked_batches += 1
            self.counters.acked_events += meta[1]
            if self._delete_or_count(seg, fsync_dir=True):
                return
            try:
                self._files.append_acks(seg, fmt.ack_entry(seq, off))
            except OSError:
                self.counters.ack_write_errors += 1

    # -- deletion ---------------------------------------------------------------------------

    def _delete_segment(self, seg: Segment, fsync_dir: bool) -> None:
        """Unlink a segment, forget it; its .ack file goes after the folder fsync (now if
        `fsync_dir`, else at the caller's `_sync_deleted`).

        OSError if the disk refuses: the segment is still indexed if its file is still there
        (nothing changed), and forgotten as soon as the file is unlinked, whatever fails
        after (an .ack left behind is removed by the next open).
        """
        if seg is self._writing:
            self._seal_writing()
        self._files.unlink_segment(seg)
        del self._segments[seg.seq]
        self._size -= seg.size
        for off, (_length, n, _created) in seg.recs.items():
            self._pending_batches -= 1
            self._pending_events -= n
            self._inflight.discard(fmt.record_id(seg.seq, off))
        self._unlinked.append(seg)
        if fsync_dir:
            self._sync_deleted()

    def _sync_deleted(self) -> None:
        """Make the segment unlinks durable (fsync the folder), then unlink their .ack files.

        Never the other way round: a power loss could keep an .ack's removal and not its
        segment's (strict POSIX orders neither), and the segment would come back without its
        acks, replaying what was delivered. A .ack left behind is harmless (the next open
        removes it): its failure is counted, not raised.
        """
        self._files.sync_dir()
        done, self._unlinked = self._unlinked, []
        for seg in done:
            try:
                self._files.unlink_acks(seg)
            except OSError:
                self.counters.delete_errors += 1

    def _delete_or_count(self, seg: Segment, fsync_dir: bool = True) -> bool:
        """Delete `seg` if fully acked and not being written; failures are counted, retried.

        True if the segment file is gone (even if its clean-up then failed, counted).
        """
        if seg.recs or seg is self._writing or seg.seq not in self._segments:
            return False
        try:
            self._delete_segment(seg, fsync_dir=fsync_dir)
        except OSError:
            self.counters.delete_errors += 1
            return seg.seq not in self._segments
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
            self._sync_deleted()
            self._ready.clear()
            self._inflight.clear()
            self.counters.purged_batches += b
            self.counters.purged_events += e
            return b, e

    # -- close / stats ----------------------------------------------------------------------

    def close(self) -> None:
        with self._wlock, self._lock:
            if self._state in ("new", "closed"):
                self._state = "closed"
                return
            w = self._writing
            self._seal_writing()
            if w is not None and self._state == "open":
                self._delete_or_count(w)
            if self._dirty:
                self._cut_dirty()
            if self._unlinked:  # a folder fsync failed after some unlinks: once more
                with contextlib.suppress(OSError):
                    self._sync_deleted()
            self._files.close_reader()
            self._release_lock()
            self._state = "closed"

    def stats(self) -> dict[str, int | float]:
        """The gauges (what the spool holds now); the counters are in `self.counters`."""
        with self._lock:
            oldest = next((s for s in self._segments.values() if s.recs), None)
            age = 0.0
            if oldest is not None:
                created = next(iter(oldest.recs.values()))[2]
                age = max(0.0, time.time() - created / 1000)
            return {
                "batches": self._pending_batches,
                "events": self._pending_events,
                "bytes": self._size,
                "oldest_age_seconds": round(age, 3),
                "segments": len(self._segments),
                "inflight": len(self._inflight),
                "max_size": self.max_size,
            }


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
