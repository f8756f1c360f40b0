"""The stage between sources and delivery: reader results → batches, closed by size or age.

Per chunk, not per message: the readers did the per-message work; here we count, append the
encoded events to the open batch and hand closed batches to delivery.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Protocol

from .acks import Ack, AckGauge, Waiter
from .batching import Batch, Batcher
from .config import MAX_EVENT_BYTES, BatchConfig
from .ingest import ChunkResult
from .observability.counters import Counters

OVERSIZED_REASON = f"event over 250 KiB ({MAX_EVENT_BYTES} bytes), the intake limit"
# Default of batch.idle_flush: the open batch is also closed when no event came for this long,
# so the end of a burst is sent at once instead of waiting out batch.max_delay (syslog-ng
# flushes when its queue is idle). Steady traffic has no such pause: batches still fill up.
IDLE_FLUSH = 0.05


class DeliveryInput(Protocol):
    """Delivery, as the collector sees it."""

    def submit(self, batch: Batch) -> None:
        """A closed batch; its waiters (`Batch.acks`) are delivery's from now on."""
        ...

    def dead_letter(self, batch: Batch, reason: str) -> asyncio.Future[bool] | None:
        """Queue the write; the future (if any) says True once it is on disk (fsync'd)."""
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
    """Reader results into batches, closed by count or size (`Batcher`), by age (`max_delay`)
    or when input pauses (`idle_flush`), and handed to delivery with the acknowledgements
    of the takes whose events they hold."""

    def __init__(self, batcher: Batcher, delivery: DeliveryInput, counters: Counters,
                 max_delay: float, idle_flush: float = IDLE_FLUSH) -> None:
        self.batcher = batcher
        self.delivery = delivery
        self.counters = counters
        self._set_delays(max_delay, idle_flush)
        self.clock = Clock()
        self._timer: asyncio.TimerHandle | None = None
        self._opened = 0.0  # loop time of the open batch's first event
        self._last = 0.0  # loop time of the last chunk that added events
        self._acked_at = 0.0  # loop time of the last take with an Ack that reached the open batch
        self.acks = AckGauge()

    def _set_delays(self, max_delay: float, idle_flush: float) -> None:
        # The one rule for both (constructor and reload): an idle_flush at or above max_delay
        # changes nothing, max_delay closes the batch first.
        self.max_delay = max_delay
        self.idle_flush = min(idle_flush, max_delay)

    def reconfigure(self, batch: BatchConfig) -> None:
        """New [batch] limits (a reload). The open batch closes under the limits it was opened
        with (a lower max_events must not meet a batch already over it)."""
        self.flush()
        self.batcher.max_events = batch.max_events
        self.batcher.max_bytes = batch.max_bytes
        self._set_delays(batch.max_delay, batch.idle_flush)

    @property
    def acks_pending(self) -> int:
        """Acknowledgements not given yet (the acks_pending gauge)."""
        return self.acks.pending

    def received_at(self) -> bytes:
        return self.clock.now()

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        """Count a reader's result, batch its events and dead-letter those too large.

        `ack`: told once every event of this take is settled, or lost (see acks.Ack). It
        travels as one `Waiter` held by each batch holding some of the take's events, given
        before the batch goes to delivery (the open batch holds it too, if the take left
        events in it), and by each dead-letter write of its too-large events. A take with no
        event calls `ack.durable()` at once, synchronously.
        """
        c = self.counters
        c.accepted_events += result.accepted
        c.filtered_out += result.filtered
        c.invalid_timestamps += result.bad_times
        if ack is not None and not result.lens and not result.too_large:
            ack.durable()
            return
        w = Waiter.of(ack, self.acks) if ack is not None else None
        if result.lens:
            closed = self.batcher.add(result.data, result.lens, result.tdata, result.tlens)
            # Every batch the take closed holds some of its events (add() closes a batch only
            # right after filling it), and if the open one has any, it holds the take's last.
            for batch in closed:
                if w is not None:
                    _give(batch, w)
                self.delivery.submit(batch)
            cur = self.batcher.current
            if cur.lens:
                loop = asyncio.get_running_loop()
                self._last = now = loop.time()
                if w is not None:
                    _give(cur, w)
                    self._acked_at = now
                if closed or self._timer is None:
                    self._opened = now  # a new open batch: its age starts now
                if self._timer is None:
                    # One timer for the open batch, not one per chunk: it re-arms itself.
                    self._timer = loop.call_at(now + self.idle_flush, self._on_timer)
        for fragment, ts in result.too_large:
            fut = self.delivery.dead_letter(Batch.from_lists(fragment, [len(fragment)], [ts]),
                                            OVERSIZED_REASON)
            if w is None:
                continue
            if fut is None:
                w.lose()  # a delivery that cannot tell when it is on disk
            else:
                w.hold()
                fut.add_done_callback(functools.partial(_dead_letter_done, w))
        if w is not None:
            w.release()  # the creator's hold: every place that holds the take has it now

    def _on_timer(self) -> None:
        self._timer = None
        if not self.batcher.current.lens:
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
        """Close the open batch now (age limit, reload, shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        full = self.batcher.take()
        if full is not None:
            self.delivery.submit(full)


def _give(batch: Batch, w: Waiter) -> None:
    """`batch` holds events of `w`'s take: it holds `w` once, until delivery settles it."""
    w.hold()
    if batch.acks is None:
        batch.acks = [w]
    else:
        batch.acks.append(w)


def _dead_letter_done(w: Waiter, f: asyncio.Future[bool]) -> None:
    # False (dead letters full, the write failed): dropped, counted and logged by delivery;
    # settled all the same. Only a future that failed (never expected) is a loss.
    if not f.cancelled() and f.exception() is None:
        w.release()
    else:
        w.lose()
