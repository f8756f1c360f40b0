"""Encoded batches: events as JSON string literals in one buffer, closed on count, size or age.

Pure data structures, no asyncio, no clock: the timers that close the open batch on age or
when input pauses are the collector's (`Collector`, collector.py); the acknowledgements some
batches carry are acks.py's.

An event is carried from ingest to the intake as the exact bytes orjson writes for its text
(`orjson.dumps(text)`: a quoted, escaped UTF-8 JSON string), so request bodies are built by
concatenation and a compiled ingest can produce the same bytes without a Python object per
message. The text is decoded only on demand (dead letters, dry-run, /plain/batch).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from .acks import Waiter


class Batch:
    """`data` holds the fragments back to back; `ends[i]` is where fragment i stops.

    `times[i]` is the event's timestamp (RFC 3339, ASCII, JSON-safe: it is written between
    quotes as is). Parallel sequences, not an object per event: cheaper to build and split.

    `acks`: the waiters (acks.Waiter) of the takes whose events it holds, each held once by
    it; the collector gives them before handing the batch to delivery, which keeps them on
    its router entry from then on. Never copied by slice/split/join (delivery counts a
    batch's parts itself) nor written to the spool.
    """

    __slots__ = ("acks", "data", "ends", "times")

    def __init__(
        self,
        data: bytes | bytearray = b"",
        ends: list[int] | None = None,
        times: list[bytes] | None = None,
    ) -> None:
        self.data = bytearray(data)
        self.ends: list[int] = ends if ends is not None else []
        self.times: list[bytes] = times if times is not None else []
        self.acks: list[Waiter] | None = None
        if len(self.ends) != len(self.times):
            raise ValueError(f"{len(self.ends)} fragments but {len(self.times)} timestamps")

    @classmethod
    def from_events(cls, events: Iterable[str], times: Iterable[str | bytes]) -> Batch:
        """A batch of plain texts (requeued dead letters, spool v1 records, tests)."""
        frags = [orjson.dumps(e) for e in events]
        ts = [t.encode("ascii") if isinstance(t, str) else t for t in times]
        return cls(b"".join(frags), list(accumulate(map(len, frags))), ts)

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def nbytes(self) -> int:
        """Bytes of encoded events: what the size limits are about."""
        return len(self.data)

    def starts(self) -> list[int]:
        return [0, *self.ends[:-1]] if self.ends else []

    def fragments(self) -> list[bytes]:
        """Each event's JSON string literal, quotes included."""
        d = bytes(self.data)
        return [d[s:e] for s, e in zip(self.starts(), self.ends, strict=True)]

    def events(self) -> list[str]:
        """The event texts, decoded (dead letters, dry-run, /plain/batch)."""
        return [orjson.loads(f) for f in self.fragments()]

    def append(self, fragment: bytes, timestamp: bytes) -> None:
        self.data += fragment
        self.ends.append(len(self.data))
        self.times.append(timestamp)

    def slice(self, lo: int, hi: int) -> Batch:
        """Events lo..hi-1 as a new batch, without decoding."""
        base = self.ends[lo - 1] if lo else 0
        end = self.ends[hi - 1] if hi > lo else base
        return Batch(
            self.data[base:end], [e - base for e in self.ends[lo:hi]], self.times[lo:hi]
        )

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, order kept (used on 413 and when an encoded body is too large)."""
        mid = len(self) // 2
        return self.slice(0, mid), self.slice(mid, len(self))

    @classmethod
    def join(cls, parts: Sequence[Batch]) -> Batch:
        out = cls()
        for p in parts:
            base = len(out.data)
            out.data += p.data
            out.ends.extend([e + base for e in p.ends])
            out.times.extend(p.times)
        return out


class Batcher:
    """Accumulates encoded events; `add` hands back the batches that a limit just closed."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.current = Batch()

    def add(self, data: bytes, ends: Sequence[int], times: Sequence[bytes]) -> list[Batch]:
        """Append fragments (`ends` relative to `data`); returns the batches closed by it."""
        closed: list[Batch] = []
        n = len(ends)
        i = 0
        while i < n:
            cur = self.current
            room = self.max_events - len(cur)
            j = min(n, i + room)
            base = ends[i - 1] if i else 0
            # Events i..j-1 fit the count; cut further where the byte limit is crossed.
            # Closing after the crossing event overshoots max_bytes by at most one event
            # (250 KiB); the encoder still splits any body over the request limit.
            budget = self.max_bytes - len(cur.data)
            stop = min(j, bisect_left(ends, base + budget, i, j) + 1)
            shift = len(cur.data) - base
            cur.data += data[base : ends[stop - 1]]
            cur.ends.extend(map(shift.__add__, ends[i:stop]) if shift else ends[i:stop])
            cur.times.extend(times[i:stop])
            i = stop
            if len(cur) >= self.max_events or len(cur.data) >= self.max_bytes:
                closed.append(cur)
                self.current = Batch()
        return closed

    def take(self) -> Batch | None:
        """The open batch, if it has any event (age limit, shutdown)."""
        if not self.current.ends:
            return None
        full, self.current = self.current, Batch()
        return full
