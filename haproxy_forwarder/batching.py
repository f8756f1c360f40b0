"""Batches of events: filled by the listeners, closed on count, size or age.

Pure data structures; the timer that closes a batch on age lives in the pipeline.
"""

from __future__ import annotations


class Batch:
    """Events and their timestamps as two parallel lists (cheaper than an object per event)."""

    __slots__ = ("events", "nbytes", "times")

    def __init__(self, events: list[str] | None = None, times: list[str] | None = None) -> None:
        self.events: list[str] = events if events is not None else []
        self.times: list[str] = times if times is not None else []
        # Bytes of event text, as received (before JSON encoding); drives the size limit.
        self.nbytes = sum(len(e) for e in self.events)

    def __len__(self) -> int:
        return len(self.events)

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, order kept (used on 413 and when an encoded body is too large)."""
        mid = len(self.events) // 2
        return (
            Batch(self.events[:mid], self.times[:mid]),
            Batch(self.events[mid:], self.times[mid:]),
        )


class Batcher:
    """Accumulates events; `add` hands back the batch that a limit just closed."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.current = Batch()

    def add(self, event: str, timestamp: str, size: int) -> Batch | None:
        cur = self.current
        cur.events.append(event)
        cur.times.append(timestamp)
        cur.nbytes += size
        # Closing after the append can overshoot max_bytes by one event (at most 250 KiB);
        # the encoder still splits any body that would exceed the request limit.
        if len(cur.events) >= self.max_events or cur.nbytes >= self.max_bytes:
            self.current = Batch()
            return cur
        return None

    def take(self) -> Batch | None:
        """The open batch, if it has any event (age limit, shutdown)."""
        if not self.current.events:
            return None
        full, self.current = self.current, Batch()
        return full
