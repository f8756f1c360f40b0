"""`RecordIndex`: what the spool holds, in memory only (no IO, no lock of its own).

The segments and their un-acked records, the order in which records are handed out (a heap of
record ids: oldest first), the ones handed out and not acked yet (in flight), and the totals
kept from them (bytes on disk, pending batches and events), so that reading them costs nothing.

The Spool's _lock guards every change and every read but the lock-free hints it exposes
(size_bytes, pending_batches, pending_events, has_ready). The files behind the segments are
lifecycle.py's; this only follows what they hold.
"""

from __future__ import annotations

import heapq
import time

from . import format as fmt
from .segments import Segment

# (record length, events, created ms): a pending record, as `Segment.recs` keeps it
RecordMeta = tuple[int, int, int]


class RecordIndex:
    """See the module docstring."""

    def __init__(self) -> None:
        self.segments: dict[int, Segment] = {}  # ascending seq
        self.ready: list[int] = []  # heap of record ids that may be handed out
        self.inflight: set[int] = set()
        self.size = 0  # sum of segment file sizes: acked records count until deletion
        self.batches = 0  # un-acked, in flight included
        self.events = 0

    def load(self, segments: dict[int, Segment]) -> None:
        """Take what recovery found at open: every record it kept is ready again."""
        self.segments = segments
        for seg in segments.values():
            self.size += seg.size
            for off, (_length, n, _created) in seg.recs.items():
                self.ready.append(fmt.record_id(seg.seq, off))
                self.batches += 1
                self.events += n
        heapq.heapify(self.ready)

    def add_segment(self, seg: Segment) -> None:
        self.segments[seg.seq] = seg

    def add(self, seg: Segment, offset: int, length: int, n: int, created_ms: int,
            claim: bool) -> int:
        """A record now durable at `offset` of `seg`; its id. claim=True: in flight already
        (its holder sends it), so it is never handed out."""
        seg.size = offset + length
        seg.total += 1
        seg.recs[offset] = (length, n, created_ms)
        rid = fmt.record_id(seg.seq, offset)
        if claim:
            self.inflight.add(rid)
        else:
            heapq.heappush(self.ready, rid)
        self.size += length
        self.batches += 1
        self.events += n
        return rid

    def pop_ready(self) -> tuple[int, Segment, int, RecordMeta] | None:
        """The oldest ready record still pending and not in flight, taken off the ready heap:
        (id, segment, offset, meta). The caller reads it, then marks it in flight."""
        while self.ready:
            rid = heapq.heappop(self.ready)
            seq, off = fmt.split_id(rid)
            seg = self.segments.get(seq)
            # Entries whose record went meanwhile (acked, or its segment deleted) are skipped
            # here rather than searched for in the heap when that happens.
            if seg is None or rid in self.inflight:
                continue
            meta = seg.recs.get(off)
            if meta is None:
                continue
            return rid, seg, off, meta
        return None

    def forget(self, rid: int) -> tuple[Segment, RecordMeta] | None:
        """Drop a pending record (acked, or found corrupt): its segment and meta, or None if
        it is unknown or already gone. Its segment stays, fully acked or not."""
        self.inflight.discard(rid)
        seq, off = fmt.split_id(rid)
        seg = self.segments.get(seq)
        if seg is None:
            return None
        meta = seg.recs.pop(off, None)
        if meta is None:
            return None
        self.batches -= 1
        self.events -= meta[1]
        return seg, meta

    def remove_segment(self, seg: Segment) -> None:
        """Its file is unlinked: its bytes and pending records are gone with it."""
        del self.segments[seg.seq]
        self.size -= seg.size
        for off, (_length, n, _created) in seg.recs.items():
            self.batches -= 1
            self.events -= n
            self.inflight.discard(fmt.record_id(seg.seq, off))

    def clear_queue(self) -> None:
        """Nothing left to hand out nor in flight (after a purge deleted every segment)."""
        self.ready.clear()
        self.inflight.clear()

    def gauges(self) -> dict[str, int | float]:
        """What the spool holds now, `Spool.stats()` but max_size (in its order)."""
        oldest = next((s for s in self.segments.values() if s.recs), None)
        age = 0.0
        if oldest is not None:
            created = next(iter(oldest.recs.values()))[2]
            age = max(0.0, time.time() - created / 1000)
        return {
            "batches": self.batches,
            "events": self.events,
            "bytes": self.size,
            "oldest_age_seconds": round(age, 3),
            "segments": len(self.segments),
            "inflight": len(self.inflight),
        }
