"""Delivery: closed batches accepted by the intake, whatever it takes; the daemon's one handle.

`Delivery` wires the router (where each batch is), the workers (retry loop), the spool writer
and ager, and the dead-letter writer; it builds everything in the constructor and starts the
tasks in `start()`.

Where a batch lives, in order of preference:
  memory  -> sent at once when the intake is healthy and nothing older waits on disk;
  spool   -> when the intake fails, when it waited in memory over SPILL_AFTER, when older
             batches are on disk (so order is kept), or always in write-ahead mode, and
             at once for a batch carrying acknowledgements (RELP: answered after the fsync);
  dead letters -> when the intake refuses it for good (400, an event it will never take).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..batching import Batch
from ..observability.counters import Counters
from ..sinks import Sink
from ..sinks.deadletter import DeadLetters
from ..spool import AppendResult, SpoolError, SpoolFull
from .requeue import Requeuer
from .router import SPILL_AFTER, Entry, Location, Router, durable, lost
from .worker import Backoff, RetryWait, Worker
from .writer import SPOOL_RETRY, DeadLetterWriter, SpoolAppends, SpoolLike, SpoolWriter, age

__all__ = [
    "SPILL_AFTER",
    "SPOOL_RETRY",
    "Backoff",
    "Delivery",
    "Location",
    "RetryWait",
    "Router",
    "SpoolLike",
]

# How long stop() waits for appends and dead-letter writes still running in threads.
STOP_WAIT = 5.0
# Threads reading the spool (next_batch) for the workers.
READ_THREADS = 2
# How often drain() looks whether everything is delivered or on disk.
DRAIN_POLL = 0.02


class Delivery:
    """Workers draining memory and the spool; a writer moving batches to disk."""

    def __init__(
        self,
        sink: Sink,
        spool: SpoolLike | None,
        dead: DeadLetters,
        counters: Counters,
        log: Any,
        *,
        workers: int,
        backoff: RetryWait,
        max_in_flight: int,
        write_ahead: bool,
        on_pressure: Callable[[bool], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.spool = spool
        self.counters = counters
        self.log = log
        self._clock = clock
        self.router = Router(
            now=clock,
            spool_ready=(lambda: spool.has_ready) if spool is not None else None,
            write_ahead=write_ahead,
            max_in_flight=max_in_flight,
            on_pressure=on_pressure,
        )
        self.wake_workers = asyncio.Event()
        self.wake_writer = asyncio.Event()
        self.body_limit_reported = False  # see Host in worker.py
        self._appends = (SpoolAppends(spool, self.router, log, counters=counters)
                         if spool is not None else None)
        # Spool reads in threads of their own (two: a pread and a decode overlap, which
        # replay needs), acks in another: a few malloc arenas hold the records read back,
        # rather than one per default-executor thread that ever decoded one.
        self._spool_reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="spool-read")
        self._spool_acks = ThreadPoolExecutor(1, thread_name_prefix="spool-ack")
        self._dead = DeadLetterWriter(dead, counters, log)
        self._backoff = backoff
        self._workers = [Worker(i, self, sink, backoff) for i in range(workers)]
        # Replaced sinks (a reload) not closed yet: requests of theirs are still in flight.
        self._retiring: dict[asyncio.Task[None], Sink] = {}
        self._writer = (
            SpoolWriter(self.router, self._appends, self.wake_writer, self.wake_workers)
            if self._appends is not None else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.requeuer: Requeuer | None = None  # start_requeue()
        self._requeue_task: asyncio.Task[None] | None = None
        # Monotonic time of the last accepted request (or start): what /healthz judges.
        self.last_progress = clock()

    def start(self) -> None:
        if self._tasks:
            raise RuntimeError("delivery already started")
        self._tasks = [asyncio.create_task(w.run(), name=f"worker-{w.n}") for w in self._workers]
        if self._writer is not None:
            self._tasks.append(asyncio.create_task(self._writer.run(), name="spool-writer"))
            self._tasks.append(
                asyncio.create_task(age(self.router, self.wake_writer), name="spool-ager"))

    # -- read-only state ----------------------------------------------------------------------

    @property
    def in_memory(self) -> int:
        """Batches held in memory only: neither delivered nor on disk yet."""
        return self.router.in_memory

    @property
    def failing(self) -> bool:
        return self.router.failing

    @property
    def spool_blocked(self) -> bool:
        return self.router.spool_blocked

    @property
    def backlog(self) -> int:
        """Batches not delivered yet: in memory only, plus those waiting on the spool."""
        return self.in_memory + (self.spool.pending_batches if self.spool is not None else 0)

    # -- input --------------------------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        """A closed batch; the waiters it carries (`Batch.acks`: acks.Waiter) are released once
        it is durable (on the spool, or delivered), or lost (see router.durable, lost)."""
        entry = self.router.submit(batch)
        if entry.location is Location.TO_SPOOL:
            self.wake_writer.set()
        else:
            self.wake_workers.set()

    def dead_letter(
        self, batch: Batch, reason: str, status: int | None = None, response: str = ""
    ) -> asyncio.Future[bool]:
        """Keep events the intake will never take; written and fsync'd off the event loop.

        The future says True once they are on disk, False if they were dropped (counted and
        logged either way). The collector, the workers and the requeuer all come here."""
        return self._dead.write(batch, reason, status, response)

    async def spool_append(self, batch: Batch) -> int:
        """Append re-queued dead letters straight to the spool (fsync'd), bypassing the router.

        Once on disk they are input again (requeued_events, counted once, even if the caller
        was cancelled meanwhile) and the workers are woken: each batch goes out as soon as it
        is in, not once a whole file is. SpoolError (full, disk error, too large) is raised."""
        appends = self._appends
        if appends is None:
            raise SpoolError("no spool (dry-run)")
        n = len(batch)

        def done(task: asyncio.Task[AppendResult]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            appends.appended(task.result())
            self.counters.requeued_events += n
            self.wake_workers.set()

        return (await asyncio.shield(appends.start(batch, False, None, done))).record_id

    def poke(self) -> None:
        """Something new is on disk: wake idle workers."""
        self.wake_workers.set()

    # -- re-queued dead letters -----------------------------------------------------------------

    def start_requeue(self, folder: Path, max_events: int, max_bytes: int,
                      stall_after: float) -> None:
        """Re-queue the dead-letter files `spool replay-dead-letter` moves into `folder` (none
        without a spool: dry-run). Batches of at most `max_events` events and `max_bytes` bytes,
        and an eighth of the spool, so that several fit in the share it may take."""
        if self.spool is None or self._appends is None or self.requeuer is not None:
            return
        limit = min(max_bytes, max(1, int(self.spool.stats()["max_size"]) // 8))
        self.requeuer = Requeuer(folder, self, self.spool, self._dead.dead, self.counters,
                                 self.log, max_events=max_events, max_bytes=limit,
                                 stall_after=stall_after, clock=self._clock)
        self._requeue_task = asyncio.create_task(self.requeuer.run(), name="requeue")

    def requeue_stall_reason(self) -> str | None:
        """Why re-queued dead letters count as stuck (no progress for stall_after), or None."""
        return self.requeuer.stall_reason() if self.requeuer is not None else None

    @property
    def requeue_files(self) -> int:
        """Re-queued dead-letter files not yet all in the spool."""
        return self.requeuer.waiting_files if self.requeuer is not None else 0

    def requeue_idle_seconds(self) -> float:
        """Seconds since a re-queued file last moved, while some wait (0 when none does)."""
        return self.requeuer.idle_seconds() if self.requeuer is not None else 0.0

    async def _stop_requeue(self) -> None:
        # Between two batches: what it appended has its progress on disk (no duplicate later).
        task, self._requeue_task = self._requeue_task, None
        if task is not None and self.requeuer is not None:
            await self.requeuer.stop(task, STOP_WAIT)

    # -- what the workers ask for (worker.Host) -----------------------------------------------

    def mark_progress(self) -> None:
        self.last_progress = self._clock()

    async def next_record(self) -> tuple[int, Batch] | None:
        assert self.spool is not None  # the router only says FROM_SPOOL when there is one
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._spool_reads, self.spool.next_batch)

    async def claim(self, entry: Entry, batch: Batch) -> None:
        if self._appends is not None:
            await self._appends.claim(entry, batch)

    async def ack(self, record: int) -> None:
        if self.spool is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._spool_acks, self.spool.ack, record)

    def spool_fields(self) -> dict[str, Any]:
        return self._appends.fields() if self._appends is not None else {}

    # -- reload -------------------------------------------------------------------------------

    def replace_sink(self, sink: Sink) -> None:
        """Every request from now on goes to `sink`; the old one is closed once idle."""
        old, self.sink = self.sink, sink
        for w in self._workers:
            w.sink = sink
        task = asyncio.create_task(self._close_when_idle(old), name="sink-retire")
        self._retiring[task] = old
        task.add_done_callback(self._retiring.pop)

    async def _close_when_idle(self, old: Sink) -> None:
        while any(w.sending_on is old for w in self._workers):
            await asyncio.sleep(DRAIN_POLL)
        await old.aclose()

    def set_workers(self, n: int) -> None:
        """intake.concurrency changed: start workers, or retire some after their batch.

        Retired workers stay listed (their last request may be on the old sink); new ones get
        fresh numbers, as a retiring worker may still hold a batch in the router under its own.
        """
        live = [w for w in self._workers if not w.retired]
        for w in live[n:]:
            w.retired = True
        for _ in range(n - len(live)):
            w = Worker(len(self._workers), self, self.sink, self._backoff)
            self._workers.append(w)
            if self._tasks:
                self._tasks.append(asyncio.create_task(w.run(), name=f"worker-{w.n}"))
        self.wake_workers.set()

    def set_backoff(self, backoff: RetryWait) -> None:
        self._backoff = backoff
        for w in self._workers:
            w.backoff = backoff

    def set_max_in_flight(self, n: int) -> None:
        self.router.set_max_in_flight(n)

    # -- shutdown -----------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Deliver (or spool) what is only in memory, for at most `timeout` seconds."""
        self.router.begin_drain()
        await self._stop_requeue()  # no new dead letters into the spool from now on
        self.wake_workers.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.router.settled():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL)
        return True

    async def stop(self) -> tuple[int, int]:
        """Cancel the tasks; spool what is only in memory. Returns (spooled, lost) events."""
        self.router.begin_drain()
        await self._stop_requeue()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Appends already running finish in their threads whatever we do; their outcome must
        # reach the router first, or the batch would be spooled a second time below.
        in_doubt = await self._appends.wait(STOP_WAIT) if self._appends is not None else set()
        held = list(self.router.held.values())
        for e in held:
            if e.on_wire:
                # Cancelled mid-request: the intake may have taken it; replay can duplicate.
                self.counters.uncertain_deliveries += 1
        spooled = dropped = 0
        for entry in self.router.stop():
            n = len(entry.batch)
            if entry in in_doubt:
                # Its append is still running (a hung disk): it may yet land; not again.
                self.log.error("shutdown_spool_failed", events=n,
                               error="an append of this batch is still running")
                lost(entry)
                dropped += n
                continue
            if self.spool is not None and self._appends is not None:
                try:
                    result = await self._appends.append(entry.batch)
                    self._appends.appended(result)
                    durable(entry)  # on disk (fsync'd): its senders are acknowledged now
                    spooled += n
                    continue
                except (SpoolFull, SpoolError) as exc:
                    self.log.error("shutdown_spool_failed", events=n, error=str(exc))
            lost(entry)
            dropped += n
        for e in held:
            lost(e)  # claimed batches still waiting for their dead letters: not tracked further
        self.counters.dropped(dropped, "shutdown")
        if self._appends is not None:
            # Records evicted while their worker was cancelled between reading and taking
            # them, and loss lines still pending: counted and said before `stopped`.
            self._appends.report_losses(flush=True)
        await self._dead.close(STOP_WAIT)
        await self.sink.aclose()
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.aclose()
        # Not waited for: an append or read stuck on a hung disk must not hang the exit.
        self._spool_reads.shutdown(wait=False)
        self._spool_acks.shutdown(wait=False)
        if self._appends is not None:
            self._appends.pool.shutdown(wait=False)
        return spooled, dropped
