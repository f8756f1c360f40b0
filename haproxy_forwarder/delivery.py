"""Delivery: workers that take closed batches and get them accepted, whatever it takes.

Transient failures are retried forever with jittered exponential backoff (tenacity),
honouring Retry-After; 413 splits the batch; 400 and oversized events go to dead letters.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never

from .batching import Batch
from .deadletter import DeadLetters
from .encoding import encode_bounded, gzip
from .intake import IntakeClient, Kind, Outcome
from .metrics import Counters

BACKOFF_MIN = 0.5


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
        parts = encode_bounded(batch, self.endpoint, self.client.key)
        if self.use_gzip:
            return [(b, gzip(body)) for b, body in parts]
        return parts

    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        # Off the event loop: zlib releases the GIL, so listeners keep reading meanwhile.
        parts = await asyncio.to_thread(self._bodies, batch)
        return [(b, await self.client.post(body)) for b, body in parts]

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
    """Full jitter between 0.5 s and an exponential cap; Retry-After is a floor.

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


class Delivery:
    """A pool of workers draining a queue of batches."""

    def __init__(
        self,
        sink: Sink,
        counters: Counters,
        dead: DeadLetters,
        log: Any,
        workers: int,
        on_done: Callable[[], None],
        backoff: Backoff,
    ) -> None:
        self.backoff = backoff
        self.sink = sink
        self.counters = counters
        self.dead = dead
        self.log = log
        self.queue: asyncio.Queue[Batch] = asyncio.Queue()
        self.in_flight: dict[int, Batch] = {}
        self.on_done = on_done
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    @property
    def pending(self) -> int:
        """Batches in memory not yet delivered: queued plus being sent."""
        return self.queue.qsize() + len(self.in_flight)

    def pending_events(self) -> int:
        queued: list[Batch] = list(self.queue._queue)  # type: ignore[attr-defined]
        return sum(len(b) for b in queued) + sum(len(b) for b in self.in_flight.values())

    def submit(self, batch: Batch) -> None:
        self.queue.put_nowait(batch)

    async def _worker(self, n: int) -> None:
        while True:
            batch = await self.queue.get()
            self.in_flight[n] = batch
            try:
                await self.deliver(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker and silently stall delivery
                self.log.exception("delivery_bug", events=len(batch))
                self.counters.dropped_events += len(batch)
            finally:
                del self.in_flight[n]
                self.queue.task_done()
                self.on_done()

    async def deliver(self, batch: Batch) -> None:
        todo = [batch]
        while todo:
            part = todo.pop(0)
            for sent, outcome in await self._attempts(part):
                if outcome.kind is Kind.DELIVERED:
                    self.counters.delivered_events += len(sent)
                    self.counters.delivered_batches += 1
                elif outcome.kind is Kind.TOO_LARGE and len(sent) > 1:
                    self.log.warning("intake_payload_too_large", events=len(sent), action="split")
                    todo[:0] = sent.split()
                else:
                    self._dead_letter(sent, outcome)

    async def _attempts(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        """Send until every part has a final answer; transient failures retry forever."""
        results: list[tuple[Batch, Outcome]] = []
        todo = [batch]
        while todo:
            current = todo.pop(0)
            async for attempt in AsyncRetrying(
                stop=stop_never,
                wait=self.backoff,
                retry=retry_if_exception_type(_Again),
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    self.counters.batches_sent += 1
                    answers = await self.sink.send(current)
                    for i, (sent, outcome) in enumerate(answers):
                        if outcome.kind in (Kind.RETRY, Kind.AUTH):
                            if outcome.uncertain:
                                self.counters.uncertain_deliveries += 1
                            # Keep what was answered; retry only this part and the rest.
                            rest = [b for b, _ in answers[i + 1 :]]
                            todo[:0] = rest
                            current = sent
                            raise _Again(outcome)
                        results.append((sent, outcome))
        return results

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

    def _dead_letter(self, batch: Batch, outcome: Outcome) -> None:
        reason = f"intake answered {outcome.status}"
        self.write_dead(batch, reason, outcome.status, outcome.detail)

    def write_dead(
        self, batch: Batch, reason: str, status: int | None = None, response: str = ""
    ) -> None:
        self.counters.dead_lettered_events += len(batch)
        try:
            path = self.dead.write(batch, reason, status, response)
        except OSError as exc:
            self.counters.dropped_events += len(batch)
            self.log.error(
                "dead_letter_write_failed", events=len(batch), reason=reason, error=str(exc)
            )
            return
        self.log.error(
            "dead_lettered", events=len(batch), reason=reason, status=status,
            response=response[:200], file=str(path),
        )

    async def drain(self, timeout: float) -> bool:
        """Wait until every submitted batch is done, at most `timeout` seconds."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sink.aclose()
