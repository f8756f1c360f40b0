"""What delivery writes to disk, off the event loop: spool appends (the writer task, the claims
of failing batches, requeued dead letters), the ager that spills memory, and dead letters.

Each append runs in a thread and reports its outcome to the router from a done-callback, so
the router stays right even if the task that awaited it is cancelled (shutdown).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ..batching import Batch
from ..collector import OVERSIZED_REASON
from ..observability.counters import Counters
from ..sinks.deadletter import DeadLetters
from ..spool import AppendResult, RecordTooLarge, SpoolError, SpoolFull
from .router import SPILL_AFTER, Entry, Location, Router, durable

# How often a blocked spool writer (disk full, I/O error) tries again: slow enough not to
# spin, fast enough that backpressure lifts soon after space comes back.
SPOOL_RETRY = 1.0

Sleep = Callable[[float], Awaitable[None]]


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


class SpoolAppends:
    """Appends in worker threads, tracked until they end; drops and refusals logged once."""

    def __init__(self, spool: SpoolLike, router: Router, log: Any,
                 pool: ThreadPoolExecutor | None = None) -> None:
        self.spool = spool
        self.router = router
        self.log = log
        # Appends run in this one thread (the spool serialises them anyway): one glibc arena
        # holds what encoding records allocates, rather than one per default-executor thread.
        self.pool = pool or ThreadPoolExecutor(1, thread_name_prefix="spool-append")
        # task -> the router entry it writes (None for a requeued dead-letter batch)
        self.pending: dict[AppendTask, Entry | None] = {}

    async def append(self, batch: Batch, claim: bool = False) -> AppendResult:
        """One append in the append thread (also used for the shutdown appends)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.spool.append, batch, claim)

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
        if self.router.spool_writable():
            self.log.info("spool_writable_again", **self.fields())
        if result.dropped_batches:
            self.log.error(
                "spool_full_dropped_oldest",
                batches=result.dropped_batches,
                events=result.dropped_events,
                hint="spool.when_full = drop_oldest; raise spool.max_size to keep more",
            )

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
        self.router.spool_blocked = True

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
        """The failing batch, on disk and already handed out (the spool will not replay it)."""

        def done(task: AppendTask) -> None:
            if self.router.closed or task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                self.router.claimed(entry, task.result().record_id)
                self.appended(task.result())
            elif isinstance(exc, RecordTooLarge):
                entry.spoolable = False
            else:
                # Kept in memory and retried (the claim too); input is held back meanwhile.
                self.refused(exc)

        await asyncio.wait({self.start(batch, True, entry, done)})

    async def requeue(self, batch: Batch) -> int:
        """A batch that bypasses the router (requeued dead letters); errors go to the caller."""

        def done(task: AppendTask) -> None:
            if not task.cancelled() and task.exception() is None:
                self.appended(task.result())

        return (await asyncio.shield(self.start(batch, False, None, done))).record_id


class SpoolWriter:
    """One task moving the batches the router queued for disk to the spool, oldest first."""

    def __init__(
        self, router: Router, appends: SpoolAppends, wake: asyncio.Event,
        wake_workers: asyncio.Event, sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.router = router
        self.appends = appends
        self.wake = wake
        self.wake_workers = wake_workers
        self._sleep = sleep

    async def run(self) -> None:
        while True:
            entry = self.router.next_write()
            if entry is None:
                if self.router.spool_blocked:
                    # What the disk refused was sent from memory meanwhile: nothing is held
                    # back for the spool any more, so it no longer counts as refusing writes
                    # (health would stay failed for good). The next refusal says so again.
                    self.router.spool_blocked = False
                    self.appends.log.info("spool_unblocked", reason="nothing waits for the disk",
                                          **self.appends.fields())
                self.wake.clear()
                await self.wake.wait()
                continue
            await asyncio.wait({self.appends.write(entry)})
            self.wake_workers.set()  # a ready record, or a refused batch a worker may send
            if entry.location is Location.TO_SPOOL:
                # Refused: a fixed pause, not "until the next batch": retrying on every
                # submit would spin on a full or failing disk.
                await self._sleep(SPOOL_RETRY)


async def age(router: Router, wake_writer: asyncio.Event, sleep: Sleep = asyncio.sleep) -> None:
    """Batches that could not be sent within SPILL_AFTER go to disk (the ager task)."""
    while True:
        await sleep(SPILL_AFTER / 4)
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
            self.log.error("dead_letter_write_failed", events=n, reason=reason,
                           error=str(exc), action="events dropped")
            return False
        path = f.result()
        if path is None:
            self.counters.dropped(n, "dead_letter_full")
            self.log.error("dead_letter_full", events=n, reason=reason,
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
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
