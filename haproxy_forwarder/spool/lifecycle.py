"""`SegmentLifecycle`: a segment from its creation to its deletion, the index kept in step.

Which segment is written (a new one once it is full), sealing it, cutting a failed append
back, deleting fully acked segments in the order that keeps acks durable, giving back acked
space when the disk is full, and writing a record's ack. The files are segments.py's; the
in-memory view is the `RecordIndex` this updates as files come and go.

Called with the Spool's _lock held (never takes it): no locking of its own.
"""

from __future__ import annotations

import contextlib

from ..observability.counters import SpoolCounters
from . import format as fmt
from .errors import SpoolWriteError
from .index import RecordIndex
from .segments import Segment, SegmentFiles


class SegmentLifecycle:
    """See the module docstring."""

    def __init__(
        self, files: SegmentFiles, index: RecordIndex, counters: SpoolCounters, segment_size: int
    ) -> None:
        self.files = files
        self.index = index
        self.counters = counters
        self.segment_size = segment_size
        self.writing: Segment | None = None
        self.next_seq = 0
        # Sealed segments a failed append left longer than their good records (the cut back
        # failed too): cut again later, or the next open would take the tail for corruption.
        self.dirty: set[int] = set()
        # Segments unlinked whose .ack file waits for the folder fsync (see sync_deleted).
        self.unlinked: list[Segment] = []

    # -- the segment being written ----------------------------------------------------------

    def writing_segment(self, reclen: int) -> Segment:
        """The segment the next `reclen` bytes go to: a new one if they would overflow it."""
        w = self.writing
        if w is not None and w.size and w.size + reclen > self.segment_size:
            self.seal_writing()
            self.delete_or_count(w)
            w = None
        if w is None:
            seq = self.next_seq
            # Never tried twice: a create that failed half-way may leave the name behind (its
            # clean-up failed too), and O_EXCL would then refuse every later append.
            self.next_seq += 1
            try:
                w = self.files.create(seq)
            except OSError as e:
                self.counters.write_errors += 1
                raise SpoolWriteError(f"cannot create a segment in {self.files.dir}", e) from e
            self.index.add_segment(w)
            self.writing = w
        return w

    def seal_writing(self) -> None:
        w = self.writing
        if w is not None:
            self.writing = None
            self.files.seal(w)

    def undo_partial_write(self, seg: Segment, offset: int) -> None:
        """Cut a failed append back to the last good record; seal the segment if we cannot."""
        try:
            self.files.cut(seg, offset)
        except OSError:
            # Unknown tail on disk: stop writing here. Memory only knows good records; the
            # cut is tried again after the next good append and at close. (If it never
            # succeeds, the next open() finds a bad tail in a segment that is not the newest
            # and counts it as corrupt: counted, never silently dropped.)
            if self.writing is seg:
                self.seal_writing()
                if not seg.total:
                    with contextlib.suppress(OSError):
                        self.delete(seg, fsync_dir=True)
                    if seg.seq not in self.index.segments:  # unlinked: no tail left to cut
                        return
                self.dirty.add(seg.seq)

    def cut_dirty(self) -> None:
        """Cut the segments in `dirty` back to their good records."""
        for seq in list(self.dirty):
            seg = self.index.segments.get(seq)
            if seg is not None:
                try:
                    self.files.truncate(seg)
                except OSError:
                    continue
            self.dirty.discard(seq)

    # -- acks and deletion ------------------------------------------------------------------

    def write_ack(self, seg: Segment, record_id: int) -> None:
        """Make a record's end durable, the record already forgotten by the index: delete its
        segment if that was the last pending record, else append its ack entry. Never raises
        on disk errors: an ack not persisted means a duplicate after a restart (counted)."""
        if self.delete_or_count(seg, fsync_dir=True):
            return
        seq, off = fmt.split_id(record_id)
        try:
            self.files.append_acks(seg, fmt.ack_entry(seq, off))
        except OSError:
            self.counters.ack_write_errors += 1

    def delete(self, seg: Segment, fsync_dir: bool) -> None:
        """Unlink a segment, forget it; its .ack file goes after the folder fsync (now if
        `fsync_dir`, else at the caller's `sync_deleted`).

        OSError if the disk refuses: the segment is still indexed if its file is still there
        (nothing changed), and forgotten as soon as the file is unlinked, whatever fails
        after (an .ack left behind is removed by the next open).
        """
        if seg is self.writing:
            self.seal_writing()
        self.files.unlink_segment(seg)
        self.index.remove_segment(seg)
        self.unlinked.append(seg)
        if fsync_dir:
            self.sync_deleted()

    def sync_deleted(self) -> None:
        """Make the segment unlinks durable (fsync the folder), then unlink their .ack files.

        Never the other way round: a power loss could keep an .ack's removal and not its
        segment's (strict POSIX orders neither), and the segment would come back without its
        acks, replaying what was delivered. A .ack left behind is harmless (the next open
        removes it): its failure is counted, not raised.
        """
        self.files.sync_dir()
        done, self.unlinked = self.unlinked, []
        for seg in done:
            try:
                self.files.unlink_acks(seg)
            except OSError:
                self.counters.delete_errors += 1

    def delete_or_count(self, seg: Segment, fsync_dir: bool = True) -> bool:
        """Delete `seg` if fully acked and not being written; failures are counted, retried.

        True if the segment file is gone (even if its clean-up then failed, counted).
        """
        if seg.recs or seg is self.writing or seg.seq not in self.index.segments:
            return False
        try:
            self.delete(seg, fsync_dir=fsync_dir)
        except OSError:
            self.counters.delete_errors += 1
            return seg.seq not in self.index.segments
        return True

    def reclaim_acked(self) -> bool:
        """Disk full: delete every fully acked segment, the one being written included.

        True if that freed any bytes (worth one more try). Only here is a fully acked segment
        being written given up early: in the normal case it is kept until it is full or its
        space is needed for max_size, so that appending and acking every batch (write-ahead)
        does not create a file per batch.
        """
        w = self.writing
        if w is not None and w.total and not w.recs:
            self.seal_writing()
        freed = 0
        for seg in list(self.index.segments.values()):
            size = seg.size
            if seg.total and not seg.recs and self.delete_or_count(seg, fsync_dir=False):
                freed += size
        if freed:
            with contextlib.suppress(OSError):
                self.sync_deleted()
        return freed > 0
