"""The size bound: making room for a record under `when_full`, and what that cost.

"block" refuses (SpoolFull); "drop_oldest" deletes whole oldest segments and counts what they
held: un-acked records as dropped, handed-out ones as evicted (their holder still delivers
them from memory). Before either, a fully acked segment being written is given up, so its
space comes back. What one append dropped is kept in a `RoomTally`, so that it is reported
even if the append then fails (through `Losses`, see `Spool.take_losses`).

Called with the Spool's _lock held; the deletions are lifecycle.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from ..observability.counters import SpoolCounters
from . import format as fmt
from .errors import SpoolFull, SpoolWriteError
from .index import RecordIndex
from .lifecycle import SegmentLifecycle

WhenFull = Literal["block", "drop_oldest"]


class Evicted(NamedTuple):
    """A handed-out record drop_oldest deleted: from now on it exists only in its holder's
    memory."""

    record_id: int
    events: int


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


class RoomTally:
    """What one append's drop_oldest deleted so far (kept if the append then fails)."""

    __slots__ = ("batches", "events", "evicted")

    def __init__(self) -> None:
        self.batches = 0
        self.events = 0
        self.evicted: list[Evicted] = []


class Room:
    """See the module docstring; the bound and the policy are the Spool's, given per call."""

    def __init__(
        self, index: RecordIndex, lifecycle: SegmentLifecycle, counters: SpoolCounters
    ) -> None:
        self.index = index
        self.lifecycle = lifecycle
        self.counters = counters

    def make(self, reclen: int, max_size: int, when_full: WhenFull, tally: RoomTally) -> None:
        """Free space until `reclen` more bytes fit in `max_size`, or raise (SpoolFull, or
        SpoolWriteError if a deletion fails); what was dropped meanwhile is in `tally`."""
        index, life = self.index, self.lifecycle
        while index.size + reclen > max_size:
            w = life.writing
            if w is not None and not w.recs and w.total:
                # The segment being written is fully acked: seal it so its space comes back.
                life.seal_writing()
                life.delete_or_count(w)
                continue
            if when_full == "block":
                self.counters.rejected_full += 1
                raise SpoolFull(
                    f"spool full: {index.size} + {reclen} bytes > max_size {max_size}"
                )
            victim = next((s for s in index.segments.values() if s is not life.writing), None)
            if victim is None:
                if w is None or not w.total:  # pragma: no cover - reclen <= max_size
                    raise SpoolFull("spool full and nothing left to drop")
                life.seal_writing()
                continue
            # Handed-out records live on in the holder's memory and get delivered (their ack
            # is a no-op then): not dropped, only no longer on disk. Said in `tally.evicted`,
            # so that the holder knows a crash or a shutdown would lose them now.
            held: list[Evicted] = []
            b = e = 0
            for off, (_length, n, _created) in victim.recs.items():
                rid = fmt.record_id(victim.seq, off)
                if rid in index.inflight:
                    held.append(Evicted(rid, n))
                else:
                    b, e = b + 1, e + n
            try:
                life.delete(victim, fsync_dir=True)
            except OSError as err:
                self.counters.delete_errors += 1
                if victim.seq in index.segments:  # the file is still there: nothing dropped
                    raise SpoolWriteError(f"cannot drop {victim.path}", err) from err
                # Its records went with the file; only the clean-up after (the .ack
                # unlink, the folder fsync) failed: dropped all the same, so counted.
                self._count_drop(tally, b, e, held)
                raise SpoolWriteError(f"cannot drop {victim.path}", err) from err
            self._count_drop(tally, b, e, held)

    def _count_drop(self, tally: RoomTally, batches: int, events: int,
                    held: list[Evicted]) -> None:
        tally.batches += batches
        tally.events += events
        tally.evicted += held
        self.counters.evicted_inflight += len(held)
        self.counters.dropped_batches += batches
        self.counters.dropped_events += events
