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

from array import array
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import orjson

from .storage import Stored, cut, lens_of, new_lens, new_tlens, offsets, pack_times

if TYPE_CHECKING:
    from .acks import Waiter


class Batch(Stored):
    """Encoded events stored as storage.py says: `data` and `lens` (the JSON literals),
    `tdata` and `tlens` (their timestamps: RFC 3339, ASCII, JSON-safe, written between quotes
    as is). Four buffers, not an object per event: cheaper to build, split and keep.

    `acks`: the waiters (acks.Waiter) of the takes whose events it holds, each held once by
    it; the collector gives them before handing the batch to delivery, which keeps them on
    its router entry from then on. Never copied by slice/split/join (delivery counts a
    batch's parts itself) nor written to the spool.
    """

    __slots__ = ("acks", "data", "lens", "tdata", "tlens")

    def __init__(
        self,
        data: bytes | bytearray | memoryview = b"",
        lens: array[int] | None = None,
        tdata: bytes | bytearray | memoryview = b"",
        tlens: array[int] | None = None,
    ) -> None:
        self.data = bytearray(data)
        self.lens: array[int] = lens if lens is not None else new_lens()
        self.tdata = bytearray(tdata)
        self.tlens: array[int] = tlens if tlens is not None else new_tlens()
        self.acks: list[Waiter] | None = None
        if len(self.lens) != len(self.tlens):
            raise ValueError(f"{len(self.lens)} fragments but {len(self.tlens)} timestamps")

    @classmethod
    def from_lists(cls, data: bytes | bytearray | memoryview, ends: Sequence[int],
                   times: Sequence[bytes]) -> Batch:
        """A batch from end offsets and timestamp objects (tests, the rare paths)."""
        tdata, tlens = pack_times(times)
        if len(ends) != len(times):
            raise ValueError(f"{len(ends)} fragments but {len(times)} timestamps")
        return cls(data, lens_of(ends), tdata, tlens)

    @classmethod
    def from_events(cls, events: Iterable[str], times: Iterable[str | bytes]) -> Batch:
        """A batch of plain texts (requeued dead letters, spool v1 records, tests)."""
        frags = [orjson.dumps(e) for e in events]
        tdata, tlens = pack_times(t.encode("ascii") if isinstance(t, str) else t for t in times)
        return cls(b"".join(frags), new_lens(map(len, frags)), tdata, tlens)

    @property
    def nbytes(self) -> int:
        """Bytes of encoded events: what the size limits are about."""
        return len(self.data)

    def events(self) -> list[str]:
        """The event texts, decoded (dead letters, dry-run, /plain/batch)."""
        return [orjson.loads(f) for f in self.fragments()]

    def append(self, fragment: bytes, timestamp: bytes) -> None:
        tdata, tlens = pack_times((timestamp,))
        self.data += fragment
        self.lens.append(len(fragment))
        self.tdata += tdata
        self.tlens += tlens

    def slice(self, lo: int, hi: int) -> Batch:
        """Events lo..hi-1 as a new batch, without decoding."""
        hi = max(lo, hi)
        d0, t0 = offsets(self.lens, self.tlens, lo)
        d1, t1 = offsets(self.lens, self.tlens, hi)
        return Batch(self.data[d0:d1], self.lens[lo:hi], self.tdata[t0:t1], self.tlens[lo:hi])

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, order kept (used on 413 and when an encoded body is too large)."""
        mid = len(self) // 2
        return self.slice(0, mid), self.slice(mid, len(self))

    def extend(self, data: bytes | bytearray | memoryview, lens: array[int],
               tdata: bytes | bytearray | memoryview, tlens: array[int]) -> None:
        """Append another run of events (four copies, nothing per event)."""
        self.data += data
        self.lens += lens
        self.tdata += tdata
        self.tlens += tlens

    @classmethod
    def join(cls, parts: Sequence[Batch]) -> Batch:
        out = cls()
        for p in parts:
            out.extend(p.data, p.lens, p.tdata, p.tlens)
        return out


class Batcher:
    """Accumulates encoded events; `add` hands back the batches that a limit just closed."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.current = Batch()

    def add(self, data: bytes, lens: array[int], tdata: bytes,
            tlens: array[int]) -> list[Batch]:
        """Append a run of events (storage.py's four parts); returns the batches closed by it."""
        closed: list[Batch] = []
        n = len(lens)
        cur = self.current
        if (len(cur) + n < self.max_events and len(cur.data) + len(data) < self.max_bytes
                and len(tlens) == n):
            # The common case: the whole run fits and closes nothing.
            cur.extend(data, lens, tdata, tlens)
            return closed
        i = 0
        pos = tpos = 0
        view = memoryview(data)
        tview = memoryview(tdata)
        while i < n:
            cur = self.current
            j = min(n, i + self.max_events - len(cur))
            # Events i..j-1 fit the count; cut further where the byte limit is crossed.
            # Closing after the crossing event overshoots max_bytes by at most one event
            # (250 KiB); the encoder still splits any body over the request limit.
            stop, nbytes, tbytes = cut(lens, tlens, i, j, self.max_bytes - len(cur.data))
            cur.extend(view[pos : pos + nbytes], lens[i:stop], tview[tpos : tpos + tbytes],
                       tlens[i:stop])
            pos += nbytes
            tpos += tbytes
            i = stop
            if len(cur) >= self.max_events or len(cur.data) >= self.max_bytes:
                closed.append(cur)
                self.current = Batch()
        return closed

    def take(self) -> Batch | None:
        """The open batch, if it has any event (age limit, shutdown)."""
        if not self.current.lens:
            return None
        full, self.current = self.current, Batch()
        return full
