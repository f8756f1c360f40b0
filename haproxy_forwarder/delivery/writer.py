"""What delivery writes to disk, off the event loop: spool appends (the writer task, the claims
of batches being sent, requeued dead letters), the ager that spills memory, and dead letters.

Each append runs in a thread and reports its outcome to the router from a done-callback, so
the router stays right even if the task that awaited it is cancelled (shutdown).

What the spool loses is counted here, on the event loop, once each (`Counters.dropped`) and
said in a rate-limited line: what drop_oldest deletes (`AppendResult`, or `take_losses()` after
an append that failed), records found corrupt at open or when read back (`take_losses()`,
polled by the writer task, as the spool's readers run in threads), and handed-out records
drop_oldest deleted (the router makes them memory-only; after the router stopped, nobody holds
them any more: lost).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ..batching import Batch
from ..collector import OVERSIZED_REASON
from ..observability.counters import Counters
from ..observability.quiet import QuietLog
from ..sinks.deadletter import DeadLetters
from ..spool import AppendResult, Losses, RecordTooLarge, SpoolError, SpoolFull
from .router import SPILL_AFTER, Entry, Location, Router, durable

# How often a blocked spool writer (disk full, I/O error) tries again: slow enough not to
# spin, fast enough that backpressure lifts soon after space comes back.
SPOOL_RETRY = 1.0
# How often the idle writer asks the spool for losses its readers found (corrupt records).
LOSS_POLL = 1.0
# A loss line is said at once, then at most once per this many seconds with the totals since.
LOSS_LOG_INTERVAL = 5.0


class SpoolLike(Protocol):
    """The spool as delivery uses it (haproxy_forwarder.spool.Spool); thread-safe."""

    @property
    def has_ready(self) -> bool: ...

    @property
    def pending_batches(self) -> int: ...

    def append(self, batch: Batch, claim: bool = False) -> AppendResult: ...

    def next_batch(self) -> tuple[int, Batch] | None: ...

    def ack(self, record_id: int) -> None: ...

    def stats(self) -> dict[str, Any]: ...


AppendTask = asyncio.Task[AppendResult]


class LossLine:
    """The log line of one kind of loss: the first at once, then at most one per `interval`
    with the totals since the last line (`occurrences`: how many losses it sums up).

    `flush()` says what is pending once the interval is over (`force`: now, at shutdown).
    """

    def __init__(self, say: Callable[..., None], event: str, *,
                 interval: float = LOSS_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, **fixed: Any) -> None:
        self.say = say
        self.event = event
        self.interval = interval
        self.clock = clock
        self.fixed = fixed
        self.counts: dict[str, int] = {}
        self.names: list[str] = []
        self.occurrences = 0
        self.quiet_until = float("-inf")

    def add(self, names: Iterable[str] = (), **counts: int) -> None:
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        for name in names:
            if name not in self.names:
                self.names.append(name)
        self.occurrences += 1
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not self.occurrences:
            return
        now = self.clock()
        if not force and now < self.quiet_until:
            return
        extra: dict[str, Any] = {"segments": self.names} if self.names else {}
        if self.occurrences > 1:
            extra["occurrences"] = self.occurrences
        self.say(self.event, **self.counts, **extra, **self.fixed)
        self.counts, self.names, self.occurrences = {}, [], 0
        self.quiet_until = now + self.interval


class SpoolAppends:
    """Appends in worker threads, tracked until they end; drops and refusals logged once.

    `counters`: where the spool's losses are counted as dropped events (by reason); without
    it they are still logged and the router still told.
    """

    def __init__(self, spool: SpoolLike, router: Router, log: Any,
                 pool: ThreadPoolExecutor | None = None, *,
                 counters: Counters | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.router = router
        self.log = log
        self.counters = counters
        # Appends run in this one thread (the spool serialises them anyway): one glibc arena
        # holds what encoding records allocates, rather than one per default-executor thread.
        self.pool = pool or ThreadPoolExecutor(1, thread_name_prefix="spool-append")
        # task -> the router entry it writes (None for a requeued dead-letter batch)
        self.pending: dict[AppendTask, Entry | None] = {}
        self.claims: dict[Entry, AppendTask] = {}  # the running claim of each held batch
        self._full = LossLine(
            log.error, "spool_full_dropped_oldest", clock=clock,
            hint="spool.when_full = drop_oldest; raise spool.max_size to keep more")
        self._full_in_flight = LossLine(
            log.error, "spool_full_dropped_in_flight", clock=clock,
            hint="deleted by drop_oldest while being sent at shutdown; raise spool.max_size")
        self._corrupt = LossLine(
            log.error, "spool_corrupt_records", clock=clock,
            action="skipped (damaged on disk); the segment is kept in quarantine/")
        # What recovery found corrupt at open: counted now; open_spool logged it already.
        self.report_losses(say=False)

    async def append(self, batch: Batch, claim: bool = False) -> AppendResult:
        """One append in the append thread (also used for the shutdown appends)."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self.spool.append, batch, claim)
        # Reported from the future itself, before anyone resumes, and even if the caller is
        # cancelled meanwhile (shielded): what the append deleted is counted once, here.
        fut.add_done_callback(self._reported)
        return await asyncio.shield(fut)

    def _reported(self, fut: asyncio.Future[AppendResult]) -> None:
        if fut.cancelled():
            return
        if fut.exception() is None:
            result = fut.result()
            if result.dropped_batches or result.evicted:
                self._dropped(result.dropped_batches, result.dropped_events,
                              len(result.evicted))
            self._evicted(result.evicted)
        # A failed append's drops, and what the readers found corrupt, wait in the spool.
        self.report_losses()

    # -- what the spool lost ------------------------------------------------------------------

    def report_losses(self, *, say: bool = True, flush: bool = False) -> None:
        """Count (and say) the losses the spool has not reported through an AppendResult."""
        take: Callable[[], Losses] | None = getattr(self.spool, "take_losses", None)
        if take is not None:  # (a test's fake spool never loses anything)
            losses = take()
            if losses.dropped_batches or losses.evicted:
                self._dropped(losses.dropped_batches, losses.dropped_events,
                              len(losses.evicted))
            self._evicted(losses.evicted)
            if losses.corrupt_records:
                if self.counters is not None:
                    self.counters.dropped(losses.corrupt_events, "spool_corrupt")
                if say:
                    self._corrupt.add(losses.corrupt_segments,
                                      records=losses.corrupt_records,
                                      events=losses.corrupt_events)
        if self.router.closed and self.router.gone:
            self._lost_in_flight(self.router.take_gone().items())
        force = flush or self.router.closed  # nothing may stay unsaid after a stop
        for line in (self._full, self._full_in_flight, self._corrupt):
            line.flush(force)

    def _dropped(self, batches: int, events: int, in_flight: int) -> None:
        """drop_oldest deleted un-acked batches (lost) and `in_flight` handed-out ones."""
        if self.counters is not None and batches:
            self.counters.dropped(events, "spool_full")
        self._full.add(batches=batches, events=events, in_flight_batches=in_flight)

    def _evicted(self, evicted: Sequence[tuple[int, int]]) -> None:
        """Handed-out records drop_oldest deleted: memory-only from now on, or lost if the
        router stopped (its workers are gone, what was only in memory is written already)."""
        if not evicted:
            return
        if self.router.closed:
            self._lost_in_flight(evicted)
        else:
            self.router.evicted(evicted)

    def _lost_in_flight(self, records: Iterable[tuple[int, int]]) -> None:
        records = list(records)
        events = sum(n for _, n in records)
        if self.counters is not None:
            self.counters.dropped(events, "spool_full")
        self._full_in_flight.add(batches=len(records), events=events)
        self._full_in_flight.flush(force=True)

    def start(
        self, batch: Batch, claim: bool, entry: Entry | None,
        done: Callable[[AppendTask], None],
    ) -> AppendTask:
        task = asyncio.create_task(self.append(batch, claim))
        self.pending[task] = entry
        # Registered before anyone awaits the task, so it runs before the awaiting coroutine
        # resumes, and runs even if that coroutine was cancelled meanwhile.
        task.add_done_callback(done)
        task.add_done_callback(lambda t: self.pending.pop(t, None))
        return task

    async def wait(self, timeout: float) -> set[Entry]:
        """Wait for running appends; returns the entries of those still running (in doubt)."""
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=timeout)
        return {e for e in self.pending.values() if e is not None}

    def appended(self, result: AppendResult) -> None:
        """An append succeeded (what it dropped was reported by `append` already)."""
        if self.router.unblock_spool():
            self.log.info("spool_writable_again", **self.fields())

    def refused(self, exc: BaseException) -> None:
        """The spool refused an append (full, disk error): said once, until it writes again."""
        if not self.router.spool_blocked:
            if isinstance(exc, SpoolFull):
                self.log.error(
                    "spool_full", action="holding input (TCP paused, UDP dropped)",
                    **self.fields(),
                )
            else:
                self.log.error(
                    "spool_write_failed", error=str(exc.__cause__ or exc),
                    action="holding input (TCP paused, UDP dropped); retrying every second",
                )
        self.router.block_spool()

    def fields(self) -> dict[str, Any]:
        st = self.spool.stats()
        return {
            "spool_batches": st["batches"],
            "spool_events": st["events"],
            "spool_bytes": st["bytes"],
            "spool_oldest_age": st["oldest_age_seconds"],
        }

    # -- the three kinds of append ------------------------------------------------------------

    def write(self, entry: Entry) -> AppendTask:
        """The writer's append of a queued batch: ready on disk, in order."""

        def done(task: AppendTask) -> None:
            if self.router.closed or task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                self.router.written(entry)
                self.appended(task.result())
                durable(entry)  # Spool.append returns after the fsync
            elif isinstance(exc, RecordTooLarge):
                self.router.unspoolable(entry)
            else:
                if not isinstance(exc, SpoolError):
                    self.log.error("delivery_bug", error=repr(exc), events=len(entry.batch))
                self.refused(exc)  # first: it logs only if the spool was not blocked yet
                self.router.write_refused(entry)

        return self.start(entry.batch, False, entry, done)

    async def claim(self, entry: Entry, batch: Batch) -> None:
        """A batch a worker holds, on disk and already handed out (the spool will not replay
        it before a restart): at its first failure (the worker), or before anything newer is
        written (the writer, see Router.next_write). One claim of a batch at a time: a second
        caller waits for the running one rather than writing the batch twice."""
        task = self.claims.get(entry)
        if task is None:
            task = self.claims[entry] = self._claim(entry, batch)
        await asyncio.wait({task})

    def _claim(self, entry: Entry, batch: Batch) -> AppendTask:
        def done(task: AppendTask) -> None:
            self.claims.pop(entry, None)
            if self.router.closed or task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                record = task.result().record_id
                if self.router.claimed(entry, record):
                    self._ack(record)  # delivered while its claim was being written
                self.appended(task.result())
            elif isinstance(exc, RecordTooLarge):
                self.router.never_fits(entry)
            else:
                # Kept in memory and retried (the claim too); input is held back meanwhile.
                self.refused(exc)

        return self.start(batch, True, entry, done)

    def _ack(self, record: int) -> None:
        """Ack in the append thread, after the append that made the record."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self.spool.ack, record)

        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                # Not acked: sent again after a restart (a duplicate, never a loss).
                self.log.error("spool_ack_failed", record=record, error=str(f.exception()))

        fut.add_done_callback(done)


class SpoolWriter:
    """One task moving the batches the router queued for disk to the spool, oldest first."""

    def __init__(
        self, router: Router, appends: SpoolAppends, wake: asyncio.Event,
        wake_workers: asyncio.Event,
    ) -> None:
        self.router = router
        self.appends = appends
        self.wake = wake
        self.wake_workers = wake_workers

    async def run(self) -> None:
        try:
            await self._run()
        finally:  # cancelled at shutdown: what waits in the loss lines is said now
            self.appends.report_losses(flush=True)

    async def _run(self) -> None:
        while True:
            entry = self.router.next_write()
            if entry is None:
                if self.router.unblock_spool():
                    # What the disk refused was sent from memory meanwhile: nothing is held
                    # back for the spool any more, so it no longer counts as refusing writes
                    # (health would stay failed for good). The next refusal says so again.
                    self.appends.log.info("spool_unblocked", reason="nothing waits for the disk",
                                          **self.appends.fields())
                await self._idle()
                self.appends.report_losses()
                continue
            if entry.location is Location.SENDING:
                await self._claim(entry)
                continue
            await asyncio.wait({self.appends.write(entry)})
            self.wake_workers.set()  # a ready record, or a refused batch a worker may send
            if entry.location is Location.TO_SPOOL:
                # Refused: a fixed pause, not "until the next batch": retrying on every
                # submit would spin on a full or failing disk.
                await asyncio.sleep(SPOOL_RETRY)

    async def _claim(self, entry: Entry) -> None:
        """A batch a worker sends, older than what must be written next: claimed first, so
        that a restart replays it first (or the worker's own claim, already running)."""
        await self.appends.claim(entry, entry.batch)
        self.wake_workers.set()  # a refusal: a worker may send the queued batches meanwhile
        if (entry.location is Location.SENDING and entry.record is None
                and entry.spoolable and not entry.evicted):
            # Refused: a pause before trying again, as for a refused write; nothing newer
            # is written meanwhile.
            await asyncio.sleep(SPOOL_RETRY)

    async def _idle(self) -> None:
        """Until woken, or LOSS_POLL at most: the spool's readers run in threads, so the
        corrupt records they skip are counted and said from here.

        Not `asyncio.wait_for(wake.wait(), LOSS_POLL)`: on Python 3.11 it swallows a
        cancellation that comes once the wait is over (CPython gh-86296), and the writer
        would run on for ever after Delivery.stop() cancelled it. A timer that sets the
        event leaves the cancellation to Event.wait(), which always raises it.
        """
        self.wake.clear()
        timer = asyncio.get_running_loop().call_later(LOSS_POLL, self.wake.set)
        try:
            await self.wake.wait()
        finally:
            timer.cancel()


async def age(router: Router, wake_writer: asyncio.Event) -> None:
    """Batches that could not be sent within SPILL_AFTER go to disk (the ager task)."""
    while True:
        await asyncio.sleep(SPILL_AFTER / 4)
        if router.spill():
            wake_writer.set()


def dead_letter_label(reason: str, status: int | None) -> str:
    """The `reason` label of dead_lettered_events: a few values, not the free-text reason."""
    if status == 413:
        return "too_large"  # a single event the intake refuses as too large
    if status is not None:
        return "rejected"  # 400/422: the intake will never take it
    return "oversized" if reason == OVERSIZED_REASON else "internal"


class DeadLetterWriter:
    """Dead-letter writes (append + fsync) in one thread, in call order; counted on the loop."""

    def __init__(self, dead: DeadLetters, counters: Counters, log: Any) -> None:
        self.dead = dead
        self.counters = counters
        self.log = log
        self._pool: ThreadPoolExecutor | None = None  # its thread starts at the first write
        self._pending: set[asyncio.Future[bool]] = set()
        # A full or failing store refuses every batch that comes: one line, then a summary
        # per interval (the counters have every event).
        self.quiet = QuietLog(log)

    def write(
        self, batch: Batch, reason: str, status: int | None = None, response: str = ""
    ) -> asyncio.Future[bool]:
        """Queue the write; the future resolves (never fails) once it is counted and logged:
        True if the events are on disk (fsync'd), False if they were dropped."""
        loop = asyncio.get_running_loop()
        if self._pool is None:
            # One thread: writes land in the order they were asked for.
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dead-letter")
        at = time.gmtime()
        inner = loop.run_in_executor(self._pool, self.dead.write, batch, reason, status,
                                     response, at)
        outer: asyncio.Future[bool] = loop.create_future()
        self._pending.add(outer)

        def done(f: asyncio.Future[Any]) -> None:
            written = self._report(batch, reason, status, response, f)
            self._pending.discard(outer)
            if not outer.done():
                outer.set_result(written)

        inner.add_done_callback(done)
        return outer

    def _report(
        self, batch: Batch, reason: str, status: int | None, response: str,
        f: asyncio.Future[Any],
    ) -> bool:
        n = len(batch)
        exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self.counters.dropped(n, "dead_letter_failed")
            self.quiet.warning("dead_letter_write_failed", events=n, reason=reason,
                               error=str(exc), action="events dropped")
            return False
        path = f.result()
        if path is None:
            self.counters.dropped(n, "dead_letter_full")
            self.quiet.warning("dead_letter_full", events=n, reason=reason,
                               max_size=self.dead.max_size, action="events dropped")
            return False
        self.counters.dead_lettered(n, dead_letter_label(reason, status))
        self.log.error(
            "dead_lettered", events=n, reason=reason, status=status,
            response=response[:200], file=str(path),
        )
        return True

    async def close(self, timeout: float) -> None:
        """Wait for queued writes (up to `timeout`), then let the thread go."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
        self.quiet.flush()  # what was suppressed is said before `stopped`
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
