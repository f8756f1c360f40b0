"""The stage between sources and delivery: reader results → batches, closed by size or age.

Per chunk, not per message: the readers did the per-message work; here we count, append the
encoded events to the open batch and hand closed batches to delivery.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from .batching import Batch, Batcher
from .config import MAX_EVENT_BYTES
from .ingest import ChunkResult
from .observability.counters import Counters

OVERSIZED_REASON = f"event over 250 KiB ({MAX_EVENT_BYTES} bytes), the intake limit"
# Default of batch.idle_flush: the open batch is also closed when no event came for this long,
# so the end of a burst is sent at once instead of waiting out batch.max_delay (syslog-ng
# flushes when its queue is idle). Steady traffic has no such pause: batches still fill up.
IDLE_FLUSH = 0.05


class BatchSink(Protocol):
    """Delivery, as the collector sees it."""

    def submit(self, batch: Batch) -> None: ...

    def dead_letter(self, batch: Batch, reason: str) -> None: ...


class Clock:
    """Reception time as the intake wants it (UTC, milliseconds), formatted once per ms."""

    __slots__ = ("_ms", "_text")

    def __init__(self) -> None:
        self._ms = -1
        self._text = b""

    def now(self) -> bytes:
        t = time.time()
        ms = int(t * 1000)
        if ms != self._ms:
            self._ms = ms
            self._text = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms % 1000:03d}Z"
            ).encode("ascii")
        return self._text


class Collector:
    def __init__(self, batcher: Batcher, delivery: BatchSink, counters: Counters,
                 max_delay: float, idle_flush: float = IDLE_FLUSH) -> None:
        self.batcher = batcher
        self.delivery = delivery
        self.counters = counters
        self.max_delay = max_delay
        self.idle_flush = min(idle_flush, max_delay)
        self.clock = Clock()
        self._timer: asyncio.TimerHandle | None = None
        self._opened = 0.0  # loop time of the open batch's first event
        self._last = 0.0  # loop time of the last chunk that added events

    def received_at(self) -> bytes:
        return self.clock.now()

    def take(self, result: ChunkResult) -> None:
        c = self.counters
        c.accepted_events += result.accepted
        c.filtered_out += result.filtered
        c.invalid_timestamps += result.bad_times
        if result.ends:
            closed = self.batcher.add(result.data, result.ends, result.times)
            for batch in closed:
                self.delivery.submit(batch)
            if self.batcher.current.ends:
                loop = asyncio.get_running_loop()
                self._last = now = loop.time()
                if closed or self._timer is None:
                    self._opened = now  # a new open batch: its age starts now
                if self._timer is None:
                    # One timer for the open batch, not one per chunk: it re-arms itself.
                    self._timer = loop.call_at(now + self.idle_flush,
                                               self._on_timer)
        for fragment, ts in result.too_large:
            self.delivery.dead_letter(Batch(fragment, [len(fragment)], [ts]), OVERSIZED_REASON)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.batcher.current.ends:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = min(self._last + self.idle_flush, self._opened + self.max_delay)
        if now >= due:
            self.flush()
        else:
            self._timer = loop.call_at(due, self._on_timer)

    def flush(self) -> None:
        """Close the open batch now (age limit, shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        full = self.batcher.take()
        if full is not None:
            self.delivery.submit(full)
