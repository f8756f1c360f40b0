"""Opening a spool: scan every segment, load acks, cut torn tails, quarantine and repair.

Returns a `RecoveryReport` (what was found, for the logs and `spool stats`) and the `Index`
the queue starts from. Read-only recovery changes nothing on disk.

Torn tail or corruption: a crash in the middle of an append leaves a torn tail, and only in
the segment being appended to, the newest (an append that fails is cut back at once, and a
new segment starts only after the last one's records were all fsync'd). So a bad tail is cut
silently in the newest segment only (that append was never acknowledged); in any other
segment it is corruption, as is a bad record followed by good ones anywhere: the file is
quarantined and repaired, and the records lost are counted (`corrupt_records`), with their
events where a header still says how many (`corrupt_events`). A lost record whose offset is in
the ack file was delivered before it went bad: not lost, not counted.

Repair (a corrupt range in the middle, see format.py): the whole original file is hard-linked
(or copied) into quarantine/ for forensics, then the segment is atomically replaced by a
repaired copy: the same bytes with every corrupt range overwritten by filler records of exactly
its length (and any torn tail cut off). Offsets do not move, so the .ack file stays valid, and
the next open finds a clean segment (nothing is quarantined twice). Every valid record, before
and after the corruption, is replayed. If the repaired copy cannot be written (disk full), the
original stays in place, its valid records are still replayed from it (same offsets), and the
next open tries again.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..observability.counters import SpoolCounters
from . import format as fmt
from .segments import Filesystem, Segment, SegmentFiles, fsync_dir, fsync_file, pwrite_all, seq_of


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
    lost_records: int = 0  # un-acked batch records in the damaged bytes
    lost_events: int = 0  # their events, where a header still says how many


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
    corrupt_records: int = 0  # un-acked records lost to corruption (sum over `quarantined`)
    corrupt_events: int = 0  # their events, where known

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


@dataclass
class Index:
    """What the queue starts from: the segments in ascending seq, the next seq to create."""

    segments: dict[int, Segment] = field(default_factory=dict)
    next_seq: int = 0


def quarantine_path(fs: Filesystem, qdir: Path, path: Path, data: bytes | None = None) -> Path:
    """Where `path` goes in quarantine/: an existing copy of it if there is one."""
    candidate = qdir / path.name
    i = 0
    while fs.exists(candidate):
        with contextlib.suppress(OSError):
            if fs.samefile(candidate, path):  # a previous, interrupted quarantine
                return candidate
            if (
                data is not None
                and fs.size(candidate) == len(data)
                and fs.read_bytes(candidate) == data
            ):  # copied (no hard links) by an open that could not repair the segment
                return candidate
        i += 1
        candidate = qdir / f"{path.name}.{i}"
    return candidate


class Recovery:
    """One open's recovery; `run()` once."""

    def __init__(
        self,
        files: SegmentFiles,
        directory: Path,
        quarantine_dir: Path,
        counters: SpoolCounters,
        readonly: bool,
    ) -> None:
        self.files = files
        self.fs = files.fs
        self.directory = directory
        self.qdir = quarantine_dir
        self.counters = counters
        self.readonly = readonly
        self.report = RecoveryReport(readonly=readonly)
        self.index = Index()

    def run(self) -> tuple[RecoveryReport, Index]:
        report, fs = self.report, self.fs
        seg_dir = self.files.dir
        if not fs.is_dir(seg_dir):
            return report, self.index
        segs: dict[int, Path] = {}
        acks: set[int] = set()
        changed = False
        for name in sorted(fs.listdir(seg_dir)):
            seq = seq_of(name)
            if seq is None:
                continue
            path = seg_dir / name
            if name.endswith(".seg"):
                segs[seq] = path
            elif name.endswith(".ack"):
                acks.add(seq)
            elif name.endswith(".tmp"):
                # A repaired copy interrupted before its atomic rename: the original segment
                # is still in place and gets redone below.
                changed |= self._remove(path)
                report.removed_files.append(name)
        for seq in sorted(acks - segs.keys()):
            name = f"{seq:012d}.ack"
            changed |= self._remove(seg_dir / name)
            report.removed_files.append(name)
        newest = max(segs, default=None)
        for seq in sorted(segs):
            changed |= self._segment(seq, segs[seq], newest=seq == newest)
        self.index.next_seq = max(segs, default=-1) + 1
        # Fully acked segments (nothing is being written yet): delete now. Their .ack files
        # only once the segments' removal is durable (lifecycle.SegmentLifecycle.sync_deleted).
        gone: list[Segment] = []
        for seg in list(self.index.segments.values()):
            if not seg.recs and not self.readonly:
                try:
                    self.files.unlink_segment(seg)
                except OSError:
                    self.counters.delete_errors += 1
                    continue
                del self.index.segments[seg.seq]
                report.removed_files.append(seg.path.name)
                gone.append(seg)
                changed = True
        if gone:
            self.files.sync_dir()
            for seg in gone:
                try:
                    self.files.unlink_acks(seg)
                except OSError:
                    self.counters.delete_errors += 1  # removed by the next open
        if changed and not self.readonly:
            self.files.sync_dir()
        for seg in self.index.segments.values():
            report.records += len(seg.recs)
            report.events += sum(n for _length, n, _created in seg.recs.values())
            report.bytes += seg.size
        report.segments = len(self.index.segments)
        report.corrupt_records = sum(q.lost_records for q in report.quarantined)
        report.corrupt_events = sum(q.lost_events for q in report.quarantined)
        self.counters.corrupt_records += report.corrupt_records
        self.counters.corrupt_events += report.corrupt_events
        # Input of this run, as found on disk: those now lost included (they are counted as
        # dropped, so the accounting identity of this run needs them on the input side too).
        self.counters.recovered_events += report.events + report.corrupt_events
        return report, self.index

    def _remove(self, path: Path) -> bool:
        if self.readonly:
            return False
        self.fs.unlink(path)
        return True

    def _segment(self, seq: int, path: Path, newest: bool) -> bool:
        """Load one segment into the index; True if the directory changed."""
        fs, report, name = self.fs, self.report, path.name
        data = fs.read_bytes(path)
        ack_path = path.with_suffix(".ack")
        if not data:
            if not self.readonly:
                fs.unlink(path)
                fs.unlink(ack_path, missing_ok=True)
            report.removed_files.append(name)
            return True
        scan = fmt.scan(data)
        changed = False
        cut = scan.size - scan.good_end
        # A bad tail is a torn write only where an append can have been cut short (see above).
        torn = bool(cut) and newest and not scan.tail_corrupt
        damaged = list(scan.holes)
        if cut and not torn:
            damaged.append((scan.good_end, scan.size))
        if torn:
            report.truncated.append(TruncatedTail(name, scan.good_end, cut))
        acked, ack_size = self._acks(seq, ack_path)
        if damaged:
            self._damaged(path, data, scan, damaged, cut, set(acked))
            changed = True
        elif cut and not self.readonly:
            fd = fs.open(path, os.O_RDWR)
            try:
                fs.ftruncate(fd, scan.good_end)
                fs.fsync(fd)
            finally:
                fs.close(fd)
        if not scan.records:
            if not self.readonly and fs.exists(path):
                fs.unlink(path)
                fs.unlink(ack_path, missing_ok=True)
                changed = True
            if not damaged:
                report.removed_files.append(name)
            return changed
        seg = Segment(seq, path, size=scan.good_end, total=len(scan.records), ack_size=ack_size)
        seg.recs = {r.offset: (r.length, r.events, r.created) for r in scan.records}
        for off in dict.fromkeys(acked):  # an offset acked twice counts once
            if seg.recs.pop(off, None) is not None:
                report.acked_records += 1
            else:
                report.ignored_ack_entries += 1  # a valid entry, but no record there
        self.index.segments[seq] = seg
        return changed

    def _damaged(
        self, path: Path, data: bytes, scan: fmt.Scan, damaged: list[tuple[int, int]],
        cut: int, acked: set[int],
    ) -> None:
        """Quarantine and repair a segment with corrupt ranges; count what they held."""
        sums = fmt.RangeCrc(data)
        lost = [
            r for start, stop in damaged for r in fmt.damaged_records(data, start, stop, sums)
            if r.offset not in acked  # delivered before the damage: nothing lost
        ]
        moved_to = (
            quarantine_path(self.fs, self.qdir, path, data)
            if self.readonly
            else self._quarantine(path, data, scan)
        )
        skipped = sum(stop - start for start, stop in scan.holes)
        self.report.quarantined.append(
            QuarantinedSegment(
                path.name,
                str(moved_to),
                bad_offset=scan.bad_offset,
                good_records=scan.prefix,
                discarded_bytes=skipped + cut,
                recovered_after=len(scan.records) - scan.prefix,
                skipped_bytes=skipped,
                skipped=[(start, stop - start) for start, stop in scan.holes],
                lost_records=len(lost),
                lost_events=sum(r.events or 0 for r in lost),
            )
        )
        self.counters.quarantined_segments += 1

    def _acks(self, seq: int, ack_path: Path) -> tuple[list[int], int]:
        """The acked offsets of segment `seq`, in file order (a torn last entry cut off), and
        the bytes of whole entries (where the next entry is appended)."""
        try:
            data = self.fs.read_bytes(ack_path)
        except FileNotFoundError:
            return [], 0
        acks = fmt.scan_acks(data, seq)
        self.report.ignored_ack_entries += acks.ignored
        if acks.whole != len(data) and not self.readonly:  # keep later entries aligned
            self.fs.truncate(ack_path, acks.whole)
        return acks.offsets, acks.whole

    def _quarantine(self, path: Path, data: bytes, scan: fmt.Scan) -> Path:
        """Keep the whole file in quarantine/, repair it in place (same offsets).

        Crash-safe order: link the original into quarantine (fsync), then atomically replace
        the segment by its repaired copy. An interruption leaves the original in place and the
        next open redoes it (reusing the same quarantine file).
        """
        fs = self.fs
        fs.mkdir(self.qdir)
        dest = quarantine_path(fs, self.qdir, path, data)
        if not fs.exists(dest):
            try:
                fs.link(path, dest)
            except OSError:
                fs.copyfile(path, dest)
                fsync_file(fs, dest)
            fsync_dir(fs, self.qdir)
            fsync_dir(fs, self.directory)
        if scan.records:
            tmp = path.with_suffix(".seg.tmp")
            try:
                fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                try:
                    pwrite_all(fs, fd, fmt.repaired(data, scan), 0)
                    fs.fsync(fd)
                finally:
                    fs.close(fd)
                fs.replace(tmp, path)
            except OSError:
                self.counters.repair_errors += 1
                with contextlib.suppress(OSError):
                    fs.unlink(tmp)
        return dest
