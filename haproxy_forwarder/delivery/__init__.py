"""Delivery: closed batches accepted by the intake, whatever it takes; the daemon's one handle.

`Delivery` wires the router (where each batch is), the workers (retry loop), the spool writer
and ager, and the dead-letter writer; it builds everything in the constructor and starts the
tasks in `start()`.

Where a batch lives, in order of preference:
  memory  -> sent at once when the intake is healthy and nothing older waits on disk;
  spool   -> when the intake fails, when it waited in memory over SPILL_AFTER, when older
             batches are on disk (so order is kept), or always in write-ahead mode, and
             at once for a batch carrying on_durable waiters (RELP: answered after the fsync);
  dead letters -> when the intake refuses it for good (400, an event it will never take).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..batching import Batch, Waiter
from ..observability.counters import Counters
from ..sinks import Sink
from ..sinks.deadletter import DeadLetters
from ..spool import SpoolError, SpoolFull
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
        self._appends = SpoolAppends(spool, self.router, log) if spool is not None else None
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
        entry = self.router.submit(batch)
        if entry.location is Location.TO_SPOOL:
            self.wake_writer.set()
        else:
            self.wake_workers.set()

    def durable(self, batches: int, waiter: Waiter) -> None:
        """`waiter` waits for the last `batches` submitted too: see Collector.on_durable."""
        if self.router.attach(batches, waiter):
            self.wake_writer.set()

    def dead_letter(
        self, batch: Batch, reason: str, status: int | None = None, response: str = ""
    ) -> asyncio.Future[bool]:
        """Keep events the intake will never take; written and fsync'd off the event loop.

        The future says True once they are on disk, False if they were dropped."""
        return self._dead.write(batch, reason, status, response)

    async def spool_append(self, batch: Batch) -> int:
        """Append straight to the spool (requeued dead letters); SpoolError goes to the caller."""
        if self._appends is None:
            raise SpoolError("no spool (dry-run)")
        return await self._appends.requeue(batch)

    def poke(self) -> None:
        """Something new is on disk (re-queued dead letters): wake idle workers."""
        self.wake_workers.set()

    # -- what the workers ask for (worker.Host) -----------------------------------------------

    def mark_progress(self) -> None:
        self.last_progress = self._clock()

    def dead_letter_later(
        self, batch: Batch, reason: str, status: int | None, response: str
    ) -> asyncio.Future[bool]:
        return self._dead.write(batch, reason, status, response)

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
        self.router.max_in_flight = n
        self.router._check_pressure()

    # -- shutdown -----------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Deliver (or spool) what is only in memory, for at most `timeout` seconds."""
        self.router.stopping = True
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
        self.router.stopping = True
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
