"""The stage between sources and delivery: reader results → batches, closed by size or age.

Per chunk, not per message: the readers did the per-message work; here we count, append the
encoded events to the open batch and hand closed batches to delivery.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Protocol

from .acks import Ack
from .batching import AckGauge, Batch, Batcher, Waiter
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

    def dead_letter(self, batch: Batch, reason: str) -> asyncio.Future[bool] | None:
        """Queue the write; the future (if any) says True once it is on disk (fsync'd)."""
        ...

    def durable(self, batches: int, waiter: Waiter) -> None:
        """`waiter` also waits for the last `batches` submitted (see on_durable)."""
        ...


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
        # What on_durable needs of the last take(): the result, how many batches it closed
        # (valid while result.ends; a count, not the batches: an idle daemon must not keep
        # its last batch alive) and its dead-letter writes (valid while result.too_large).
        # Plain stores per take; sources that never call on_durable pay nothing more.
        self._took: ChunkResult | None = None
        self._closed = 0
        self._dead: list[asyncio.Future[bool] | None] = []
        self._acked_at = 0.0  # loop time of the last on_durable on the open batch
        self.acks = AckGauge()

    @property
    def acks_pending(self) -> int:
        """on_durable callbacks not called yet (the acks_pending gauge)."""
        return self.acks.pending

    def received_at(self) -> bytes:
        return self.clock.now()

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        self._take(result)
        if ack is not None:
            self.on_durable(ack.durable, ack.lost)

    def _take(self, result: ChunkResult) -> None:
        self._took = result
        c = self.counters
        c.accepted_events += result.accepted
        c.filtered_out += result.filtered
        c.invalid_timestamps += result.bad_times
        if result.ends:
            closed = self.batcher.add(result.data, result.ends, result.times)
            self._closed = len(closed)
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
        if result.too_large:
            self._dead = [
                self.delivery.dead_letter(Batch(fragment, [len(fragment)], [ts]),
                                          OVERSIZED_REASON)
                for fragment, ts in result.too_large
            ]

    def on_durable(self, callback: Callable[[], None],
                   on_lost: Callable[[], None] | None = None) -> None:
        """Call `callback` once every event of the last take() is settled.

        Settled: its batch appended to the spool and fsync'd, or accepted by the intake (no
        spool); an event too large for the intake once its dead letter is written and
        fsync'd, or dropped because it could not be (dead letters full, write failed: a drop
        counted in dropped_events and logged, which no resend can undo: the sender waiting
        for it would only send it again and again). Called once, from the event loop.
        If some event is lost instead (a delivery bug, the spool refusing it while the intake
        does too, shutdown without a spool) `on_lost` is called (once) and `callback` never;
        nothing at all at a crash. With no event in the last take() `callback` runs at once,
        synchronously. Must follow take() with no await in between: the batches are found by
        position.
        """
        result = self._took
        if result is None or (not result.ends and not result.too_large):
            callback()
            return
        w = Waiter(callback, self.acks, on_lost)
        n = len(result.ends)
        if n:
            cur = self.batcher.current
            if cur.ends:
                # The open batch holds the take's last min(len, n) events: if the take closed
                # batches, the open one holds only events of this take.
                w.hold()
                if cur.acks is None:
                    cur.acks = [w]
                else:
                    cur.acks.append(w)
                self._acked_at = asyncio.get_running_loop().time()
            if len(cur.ends) < n:
                # Every batch the take closed holds some of its events (add() closes a batch
                # only right after filling it); they were the last ones submitted.
                self.delivery.durable(self._closed, w)
        if result.too_large:
            for fut in self._dead:
                if fut is None:
                    w.lose()  # a delivery that cannot tell when it is on disk
                    break
                w.hold()
                fut.add_done_callback(functools.partial(_dead_letter_done, w))
        w.release()

    def _on_timer(self) -> None:
        self._timer = None
        if not self.batcher.current.ends:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = min(self._last + self.idle_flush, self._opened + self.max_delay)
        if self.batcher.current.acks is not None:
            # Its senders wait for the ack (a RELP window): no message of theirs for
            # idle_flush closes it, even while other traffic (TCP) keeps the input busy.
            due = min(due, self._acked_at + self.idle_flush)
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


def _dead_letter_done(w: Waiter, f: asyncio.Future[bool]) -> None:
    # False (dead letters full, the write failed): dropped, counted and logged by delivery;
    # settled all the same. Only a future that failed (never expected) is a loss.
    if not f.cancelled() and f.exception() is None:
        w.release()
    else:
        w.lose()
