"""Delivery: workers that get closed batches accepted by the intake, whatever it takes.

Where a batch lives, in order of preference:
  memory  -> sent at once when the intake is healthy and nothing older waits on disk;
  spool   -> when the intake fails, when memory is full, when older batches are on disk
             (so order is kept), or always in write-ahead mode;
  dead letters -> when the intake refuses it for good (400, an event it will never take).
Transient failures are retried forever (tenacity, full jitter, Retry-After honoured); the
failing batch is written to the spool at its first failure, so a crash cannot lose it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never

from .batching import Batch
from .deadletter import DeadLetters
from .encoding import bodies_bounded
from .intake import IntakeClient, Kind, Outcome
from .metrics import Counters
from .spool import AppendResult, RecordTooLarge, Spool, SpoolError, SpoolFull

BACKOFF_MIN = 0.5
# How often a blocked spool writer (disk full, I/O error) tries again: slow enough not to
# spin, fast enough that backpressure lifts soon after space comes back.
SPOOL_RETRY = 1.0
# A batch waiting in memory longer than this (the intake is slower than the input) is written
# to the spool: "cannot be delivered at once" must not mean "only in RAM".
SPILL_AFTER = 1.0


class Sink(Protocol):
    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        """One attempt for the batch (possibly split in bodies); an outcome per part."""
        ...

    async def aclose(self) -> None: ...


class IntakeSink:
    """Encodes a batch for the configured endpoint and POSTs it."""

    def __init__(self, client: IntakeClient, endpoint: str, use_gzip: bool) -> None:
        self.client = client
        self.endpoint = endpoint
        self.use_gzip = use_gzip

    def _bodies(self, batch: Batch) -> list[tuple[Batch, bytes]]:
        return bodies_bounded(batch, self.endpoint, self.client.key, self.use_gzip)

    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        # Off the event loop: zlib releases the GIL, so listeners keep reading meanwhile.
        parts = await asyncio.to_thread(self._bodies, batch)
        out: list[tuple[Batch, Outcome]] = []
        for b, body in parts:
            outcome = await self.client.post(body)
            out.append((b, outcome))
            if outcome.kind is not Kind.DELIVERED:
                # Don't push the other parts at an intake that just failed; they are retried.
                out += [(rest, outcome) for rest, _ in parts[len(out) :]]
                break
        return out

    async def aclose(self) -> None:
        await self.client.aclose()


class DryRunSink:
    """Writes each event as a JSON line on stdout instead of pushing it."""

    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        out = b"".join(
            orjson.dumps({"timestamp": t, "event": e}) + b"\n"
            for e, t in zip(batch.events, batch.times, strict=True)
        )
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
        return [(batch, Outcome(Kind.DELIVERED, 200))]

    async def aclose(self) -> None:
        return None


class _Again(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


class Backoff:
    """Full jitter between 0.5 s and an exponential cap; a Retry-After replaces it.

    401/403/404 wait `auth_retry` (±20 %): a wrong key or URL does not fix itself quickly,
    but giving up would destroy data, so it is retried slowly and loudly, forever.
    """

    def __init__(self, retry_max: float, auth_retry: float) -> None:
        self.retry_max = retry_max
        self.auth_retry = auth_retry

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        outcome = exc.outcome if isinstance(exc, _Again) else None
        if outcome is not None and outcome.kind is Kind.AUTH:
            base = self.auth_retry * random.uniform(0.8, 1.2)
        else:
            cap = min(self.retry_max, BACKOFF_MIN * 2 ** (state.attempt_number - 1))
            base = random.uniform(BACKOFF_MIN, max(cap, BACKOFF_MIN))
        if outcome is not None and outcome.retry_after is not None:
            return max(outcome.retry_after, base if outcome.kind is Kind.AUTH else 0.0)
        return base


@dataclass(slots=True)
class Work:
    batch: Batch
    record: int | None  # spool record id once the batch is on disk
    sending: bool = False


class Delivery:
    """Workers draining memory and the spool; a writer moving batches to disk."""

    def __init__(
        self,
        sink: Sink,
        counters: Counters,
        dead: DeadLetters,
        log: Any,
        workers: int,
        backoff: Backoff,
        max_in_flight: int,
        on_pressure: Callable[[bool], None],
        spool: Spool | None = None,
        write_ahead: bool = False,
    ) -> None:
        self.sink = sink
        self.counters = counters
        self.dead = dead
        self.log = log
        self.backoff = backoff
        self.max_in_flight = max_in_flight
        self.on_pressure = on_pressure
        self.spool = spool
        self.write_ahead = write_ahead and spool is not None
        # Batches to send from memory, with the monotonic time they were queued.
        self.memory: collections.deque[tuple[Batch, float]] = collections.deque()
        self.to_spool: collections.deque[Batch] = collections.deque()
        self.writing: Batch | None = None  # the batch the spool writer is appending
        self.held: dict[int, Work] = {}
        self.failing = False
        self.spool_blocked = False
        self.stopping = False
        self.pressure = False
        # Appends running in a worker thread: stop() waits for them, because cancelling the
        # awaiting task would not stop the thread, and the batch would be spooled twice.
        self._appending = 0
        # Monotonic time of the last accepted request (or start): what /healthz judges.
        self.last_progress = time.monotonic()
        self._wake_workers = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]
        if spool is not None:
            self._tasks.append(asyncio.create_task(self._writer()))
            self._tasks.append(asyncio.create_task(self._ager()))

    # -- accounting ---------------------------------------------------------------------------

    @property
    def in_memory(self) -> int:
        """Batches held in memory only: neither delivered nor on disk yet."""
        return len(self._memory_batches())

    def _memory_batches(self) -> list[Batch]:
        out = [b for b, _ in self.memory] + list(self.to_spool)
        if self.writing is not None:
            out.append(self.writing)
        out += [w.batch for w in self.held.values() if w.record is None]
        return out

    def _check_pressure(self) -> None:
        waiting = len(self.memory) + len(self.to_spool) + (self.writing is not None)
        if not self.pressure and waiting >= self.max_in_flight:
            self.pressure = True
            self.on_pressure(True)
        elif self.pressure and waiting < max(1, self.max_in_flight // 2):
            self.pressure = False
            self.on_pressure(False)

    # -- intake of closed batches -------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        if self.spool is not None and (
            self.write_ahead
            or self.failing
            or self.to_spool
            or self.writing is not None
            or self.spool.has_ready
        ):
            # Behind what is already on disk, so per-connection order is kept.
            self.to_spool.append(batch)
            self._wake_writer.set()
        else:
            # A burst the intake absorbs within SPILL_AFTER stays in memory (bounded by
            # max_in_flight through backpressure); the ager spills what waits longer.
            self.memory.append((batch, time.monotonic()))
            self._wake_workers.set()
        self._check_pressure()

    def poke(self) -> None:
        """Something new is on disk (re-queued dead letters): wake idle workers."""
        self._wake_workers.set()

    # -- spool writer ---------------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            if not self.to_spool:
                self._wake_writer.clear()
                await self._wake_writer.wait()
                continue
            batch = self.writing = self.to_spool.popleft()
            try:
                result = await self._append(batch)
            except RecordTooLarge:
                # Larger than the whole spool (a tiny max_size): it can only go from memory.
                self.writing = None
                self.memory.append((batch, time.monotonic()))
                self._wake_workers.set()
                continue
            except (SpoolFull, SpoolError) as exc:
                self.writing = None
                self.to_spool.appendleft(batch)
                self._spool_trouble(exc)
                self._wake_workers.set()  # a healthy intake can take them from memory
                # A fixed pause, not "until the next batch": retrying on every submit would
                # spin on a full or failing disk.
                await asyncio.sleep(SPOOL_RETRY)
                continue
            self.writing = None
            self._appended(result)
            self._check_pressure()
            self._wake_workers.set()

    async def spool_append(self, batch: Batch, claim: bool = False) -> int:
        """Append off the event loop; drops made to find room are counted and logged."""
        result = await self._append(batch, claim)
        self._appended(result)
        return result.record_id

    async def _append(self, batch: Batch, claim: bool = False) -> AppendResult:
        assert self.spool is not None
        self._appending += 1
        try:
            return await asyncio.to_thread(self.spool.append_ex, batch, claim)
        finally:
            self._appending -= 1

    def _appended(self, result: AppendResult) -> None:
        self.counters.spooled_batches += 1
        if self.spool_blocked:
            self.spool_blocked = False
            self.log.info("spool_writable_again", **self._spool_stats())
        if result.dropped_batches:
            self.counters.spool_dropped_events += result.dropped_events
            self.log.error(
                "spool_full_dropped_oldest",
                batches=result.dropped_batches,
                events=result.dropped_events,
                hint="spool.when_full = drop_oldest; raise spool.max_size to keep more",
            )

    async def _ager(self) -> None:
        """Batches that could not be sent within SPILL_AFTER go to disk."""
        while True:
            await asyncio.sleep(SPILL_AFTER / 4)
            if self.memory and self.memory[0][1] < time.monotonic() - SPILL_AFTER:
                # All of them, not just the stale ones: newer batches must stay behind older
                # ones, or per-connection order breaks.
                self.to_spool.extend(b for b, _ in self.memory)
                self.memory.clear()
                self._wake_writer.set()

    def _spool_trouble(self, exc: Exception) -> None:
        if isinstance(exc, SpoolFull):
            if not self.spool_blocked:
                self.log.error(
                    "spool_full", action="holding input (TCP paused, UDP dropped)",
                    **self._spool_stats(),
                )
        else:
            self.counters.spool_write_errors += 1
            if not self.spool_blocked:
                self.log.error(
                    "spool_write_failed", error=str(exc.__cause__ or exc),
                    action="holding input (TCP paused, UDP dropped); retrying every second",
                )
        self.spool_blocked = True

    def _spool_stats(self) -> dict[str, Any]:
        if self.spool is None:
            return {}
        st = self.spool.stats()
        return {
            "spool_batches": st["batches"],
            "spool_events": st["events"],
            "spool_bytes": st["bytes"],
            "spool_oldest_age": st["oldest_age_seconds"],
        }

    # -- workers ------------------------------------------------------------------------------

    async def _take(self) -> Work:
        while True:
            self._wake_workers.clear()
            # While the intake fails, the workers already retrying are the probes; the
            # others wait instead of adding to a retry storm (Vector #10870).
            if not self.failing:
                if self.memory:
                    return Work(self.memory.popleft()[0], None)
                if self.spool is not None and not self.stopping and self.spool.has_ready:
                    got = await asyncio.to_thread(self.spool.next_batch)
                    if got is not None:
                        return Work(got[1], got[0])
                    continue
                if self.spool_blocked and self.to_spool:
                    return Work(self.to_spool.popleft(), None)
            await self._wake_workers.wait()

    async def _worker(self, n: int) -> None:
        while True:
            work = await self._take()
            self.held[n] = work
            self._check_pressure()
            try:
                await self._deliver(work)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker and silently stall delivery
                self.log.exception("delivery_bug", events=len(work.batch))
                if work.record is None:
                    self.write_dead(work.batch, "internal error while delivering")
            del self.held[n]
            self._check_pressure()
            self._wake_workers.set()

    async def _deliver(self, work: Work) -> None:
        todo = [work.batch]
        while todo:
            part = todo.pop(0)
            async for attempt in AsyncRetrying(
                stop=stop_never,
                wait=self.backoff,
                retry=retry_if_exception_type(_Again),
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    work.sending = True
                    # Not in a `finally`: if cancelled mid-request (shutdown), the flag must
                    # stay set so stop() counts the request as in doubt.
                    answers = await self.sink.send(part)
                    work.sending = False
                    self.counters.batches_sent += 1
                    failed = [(b, o) for b, o in answers if o.kind in (Kind.RETRY, Kind.AUTH)]
                    for sent, outcome in answers:
                        if outcome.kind is Kind.DELIVERED:
                            self.last_progress = time.monotonic()
                            self.counters.delivered_events += len(sent)
                            self.counters.delivered_batches += 1
                        elif outcome.kind is Kind.TOO_LARGE and len(sent) > 1:
                            self.log.warning("intake_payload_too_large", events=len(sent),
                                             action="split in halves")
                            todo[:0] = sent.split()
                        elif outcome.kind in (Kind.TOO_LARGE, Kind.REJECTED):
                            self.write_dead(sent, f"intake answered {outcome.status}",
                                            outcome.status, outcome.detail)
                    if failed:
                        outcome = failed[0][1]
                        if outcome.uncertain:
                            self.counters.uncertain_deliveries += 1
                        part = Batch([e for b, _ in failed for e in b.events],
                                     [t for b, _ in failed for t in b.times])
                        await self._on_failure(work, part)
                        raise _Again(outcome)
            if self.failing:
                self.failing = False
                self.log.info("intake_recovered", **self._spool_stats())
                self._wake_workers.set()
        if work.record is not None and self.spool is not None:
            await asyncio.to_thread(self.spool.ack, work.record)

    async def _on_failure(self, work: Work, remaining: Batch) -> None:
        """First failure of a batch: put it on disk now, before waiting to retry it."""
        if not self.failing:
            self.failing = True
            if self.spool is not None:
                # Batches queued in memory go to disk too: the outage may last.
                self.to_spool.extendleft(reversed([b for b, _ in self.memory]))
                self.memory.clear()
                self._wake_writer.set()
        if work.record is None and self.spool is not None:
            try:
                work.record = await self.spool_append(remaining, claim=True)
                work.batch = remaining
            except (SpoolFull, SpoolError) as exc:
                self._spool_trouble(exc)  # kept in memory and retried; input is held back

    def _log_retry(self, state: RetryCallState) -> None:
        self.counters.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, _Again):
            return
        o = exc.outcome
        wait = round(state.upcoming_sleep, 2)
        if o.kind is Kind.AUTH:
            self.log.error(
                "intake_refused_check_config",
                status=o.status,
                response=o.detail,
                hint="check intake.key and intake.url; data is kept and retried",
                retry_in=wait,
                attempt=state.attempt_number,
            )
        else:
            self.log.warning(
                "intake_retry",
                status=o.status,
                error=o.detail,
                retry_in=wait,
                attempt=state.attempt_number,
                uncertain=o.uncertain,
            )

    # -- dead letters -------------------------------------------------------------------------

    def write_dead(
        self, batch: Batch, reason: str, status: int | None = None, response: str = ""
    ) -> None:
        try:
            path = self.dead.write(batch, reason, status, response)
        except OSError as exc:
            self.counters.dropped_events += len(batch)
            self.log.error("dead_letter_write_failed", events=len(batch), reason=reason,
                           error=str(exc), action="events dropped")
            return
        if path is None:
            self.counters.dropped_events += len(batch)
            self.log.error("dead_letter_full", events=len(batch), reason=reason,
                           max_size=self.dead.max_size, action="events dropped")
            return
        self.counters.dead_lettered_events += len(batch)
        self.log.error(
            "dead_lettered", events=len(batch), reason=reason, status=status,
            response=response[:200], file=str(path),
        )

    # -- shutdown -----------------------------------------------------------------------------

    def _settled(self) -> bool:
        """Nothing left that exists only in memory, and no request on the wire."""
        return (
            not self.memory
            and not self.to_spool
            and self.writing is None
            and all(w.record is not None and not w.sending for w in self.held.values())
        )

    async def drain(self, timeout: float) -> bool:
        """Deliver (or spool) what is in memory, for at most `timeout` seconds."""
        self.stopping = True
        self._wake_workers.set()
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> tuple[int, int]:
        """Cancel everything; spool what is still in memory. Returns (spooled, lost) events."""
        deadline = time.monotonic() + 5.0
        while self._appending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self.held.values():
            if w.sending:
                # Cancelled mid-request: the intake may have taken it; replay can duplicate.
                self.counters.uncertain_deliveries += 1
        leftovers = self._memory_batches()
        spooled = lost = 0
        for batch in leftovers:
            if self.spool is not None:
                try:
                    self._appended(self.spool.append_ex(batch))
                    spooled += len(batch)
                    continue
                except (SpoolFull, SpoolError) as exc:
                    self.log.error("shutdown_spool_failed", events=len(batch), error=str(exc))
            lost += len(batch)
        self.counters.dropped_events += lost
        await self.sink.aclose()
        return spooled, lost
