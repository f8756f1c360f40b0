"""The retry loop: one worker sends the batch it holds until every event is delivered or
dead-lettered. Each attempt's answers become explicit actions (Vector's RetryAction).

Transient and configuration failures are retried forever (giving up is how rsyslog #4636 and
Fluent Bit's Retry_Limit lost data); the failing batch is claimed on the spool first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..batching import Batch
from ..config import MAX_EVENT_BYTES
from ..observability.counters import Counters
from ..sinks import Kind, Outcome, Sink
from .retry import BACKOFF_MIN as BACKOFF_MIN  # re-exported: the retry policy lives in retry.py
from .retry import Backoff as Backoff
from .retry import RetryWait as RetryWait
from .router import FROM_SPOOL, Entry, Router, RouterError, durable, lost

# -- what one attempt's answers mean --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    batch: Batch


@dataclass(frozen=True, slots=True)
class Split:
    """413 on several events: send the halves instead."""

    halves: tuple[Batch, Batch]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    batch: Batch
    reason: str
    status: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class Resend:
    """Parts never sent (an earlier body was not accepted): sent next, without a wait."""

    batch: Batch


@dataclass(frozen=True, slots=True)
class Retry:
    """Nothing of the part went through: send it all again after the wait."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class RetryPartial:
    """Some parts were delivered; `remaining` (the others, in order) is sent again."""

    remaining: Batch
    outcome: Outcome


Action = Delivered | Split | DeadLetter | Resend | Retry | RetryPartial


def judge(part: Batch, answers: list[tuple[Batch, Outcome]]) -> list[Action]:
    """The actions for one attempt at `part`; at most one Retry/RetryPartial, last.

    Parts never sent are judged by no other part's answer: they join the retry if there is
    one (in order), else they are sent next (Resend, after the halves of a 413).
    """
    actions: list[Action] = []
    failed: list[tuple[Batch, Outcome]] = []
    again: list[Batch] = []  # failed and unsent parts, in order
    unsent: list[Batch] = []
    for sent, outcome in answers:
        kind = outcome.kind
        if kind is Kind.DELIVERED:
            actions.append(Delivered(sent))
        elif kind is Kind.NOT_SENT:
            unsent.append(sent)
            again.append(sent)
        elif kind in (Kind.RETRY, Kind.AUTH):
            failed.append((sent, outcome))
            again.append(sent)
        elif kind is Kind.TOO_LARGE and len(sent) > 1:
            actions.append(Split(sent.split()))
        elif kind is Kind.TOO_LARGE and sent.nbytes < MAX_EVENT_BYTES:
            # One event the intake takes refused as too large: a body limit in between (a
            # proxy), a configuration problem. Kept and retried slowly, never dead-lettered.
            failed.append((sent, outcome))
            again.append(sent)
        else:  # 400/422, or 413 on one event over the intake's limit: never taken
            actions.append(
                DeadLetter(sent, f"intake answered {outcome.status}", outcome.status,
                           outcome.detail)
            )
    if len(unsent) == len(answers) and answers:
        # Nothing was sent at all (a sink that gave up at once): a retry, after a wait.
        actions.append(Retry(answers[0][1]))
    elif failed:
        first = failed[0][1]
        if len(again) == len(answers):
            actions.append(Retry(first))
        else:
            actions.append(RetryPartial(Batch.join(again), first))
    elif unsent:
        actions.append(Resend(Batch.join(unsent)))
    return actions


# -- the worker -----------------------------------------------------------------------------


class Host(Protocol):
    """What a worker needs from the delivery around it."""

    router: Router
    counters: Counters
    log: Any
    wake_workers: asyncio.Event
    wake_writer: asyncio.Event
    # An error line was logged for the 413s of a body limit in between; cleared by a delivery.
    body_limit_reported: bool

    def mark_progress(self) -> None: ...

    def dead_letter(
        self, batch: Batch, reason: str, status: int | None, response: str
    ) -> asyncio.Future[bool]: ...

    async def next_record(self) -> tuple[int, Batch] | None: ...

    async def claim(self, entry: Entry, batch: Batch) -> None: ...

    async def ack(self, record: int) -> None: ...

    def spool_fields(self) -> dict[str, Any]: ...


class Worker:
    def __init__(
        self, n: int, host: Host, sink: Sink, backoff: RetryWait,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.n = n
        self.host = host
        self.sink = sink
        self.backoff = backoff
        self._sleep = sleep
        # Set by a reload that lowers intake.concurrency: the worker ends after its batch.
        self.retired = False
        # The sink of the request in flight: a replaced sink is closed once no worker uses it.
        self.sending_on: Sink | None = None

    async def run(self) -> None:
        host = self.host
        while True:
            entry = await self._take()
            if entry is None:
                return
            try:
                await self.deliver(entry)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker and silently stall delivery
                host.log.exception("delivery_bug", events=len(entry.batch))
                lost(entry)  # whatever became of it, not acknowledged
                if entry.record is None:
                    # Only in memory: kept with its reason rather than lost. With a record it
                    # stays on disk (handed out) and is sent again at the next start.
                    host.dead_letter(entry.batch, "internal error while delivering",
                                           None, "")
            host.router.finished(self.n)
            host.wake_workers.set()
            # Not held while waiting for the next one: an idle worker would otherwise keep its
            # last batch (up to batch.max_bytes) alive until the next batch comes.
            del entry

    async def _take(self) -> Entry | None:
        host = self.host
        while True:
            if self.retired:
                return None
            host.wake_workers.clear()
            got = host.router.take(self.n)
            if isinstance(got, Entry):
                return got
            if got is FROM_SPOOL:
                record = await host.next_record()
                if record is None:
                    continue
                try:
                    return host.router.took_record(self.n, *record)
                except RouterError:
                    # The spool handed out a record already being sent: not sent twice; it
                    # stays handed out and is replayed at the next start.
                    host.log.exception("delivery_bug", events=len(record[1]))
                    continue
            await host.wake_workers.wait()

    async def deliver(self, entry: Entry) -> None:
        """Every event of `entry` delivered or dead-lettered; then its record is acked."""
        host = self.host
        todo = [entry.batch]
        dead: list[asyncio.Future[bool]] = []
        while todo:
            part = todo.pop(0)
            attempt = 0
            while True:
                attempt += 1
                entry.on_wire = True
                # Read per attempt: after a reload, the retry goes with the new key and URL.
                self.sending_on = sink = self.sink
                try:
                    answers = await sink.send(part)
                finally:
                    # Also when send raises: a replaced sink is closed once no worker is in
                    # a request on it (Delivery._close_when_idle), not at this worker's next.
                    self.sending_on = None
                # Not in a `finally`: if cancelled mid-request (shutdown), the flag must stay
                # set so stop() counts the request as in doubt.
                entry.on_wire = False
                host.counters.batches_sent += 1
                requests = host.counters.requests
                for _, outcome in answers:
                    if outcome.elapsed is not None:  # one per HTTP request actually made
                        requests.observe(outcome.elapsed, outcome.status)
                again: Retry | RetryPartial | None = None
                splits: list[Batch] = []  # the halves of a 413, then the parts never sent
                actions = judge(part, answers)
                settled = any(isinstance(a, Delivered | DeadLetter) for a in actions)
                for action in actions:
                    if isinstance(action, Delivered):
                        host.body_limit_reported = False
                        host.mark_progress()
                        host.counters.delivered_events += len(action.batch)
                        host.counters.delivered_batches += 1
                    elif isinstance(action, Split):
                        host.log.warning("intake_payload_too_large",
                                         events=len(action.halves[0]) + len(action.halves[1]),
                                         action="split in halves")
                        splits.extend(action.halves)
                    elif isinstance(action, Resend):
                        splits.append(action.batch)
                    elif isinstance(action, DeadLetter):
                        dead.append(host.dead_letter(
                            action.batch, action.reason, action.status, action.detail))
                    else:
                        again = action
                todo[:0] = splits
                if again is None:
                    if todo and settled:
                        # What a stop spools (or the bug path dead-letters) is what is left,
                        # not the events this batch already settled. Also with a record: drop_
                        # oldest may delete it later (Router.evicted), and the batch is then
                        # only in memory, spooled again at a stop (as router.failed keeps it).
                        entry.batch = Batch.join(todo)
                    break
                if isinstance(again, RetryPartial):
                    part = again.remaining
                await self._before_retry(entry, part, todo, again.outcome, attempt, dead)
            if host.router.recovered():
                host.log.info("intake_recovered", **host.spool_fields())
                host.wake_workers.set()
        if entry.acks is not None:
            # Sent from memory (no spool, or it refused the batch): acknowledged once every
            # part is delivered and every dead letter of it is on disk.
            await self._acknowledge(entry, dead)
        if entry.record is not None:
            # Dead letters of a spooled batch are on disk before its record goes: a crash in
            # between would otherwise lose those events.
            for fut in dead:
                await fut
            await host.ack(entry.record)

    @staticmethod
    async def _acknowledge(entry: Entry, dead: list[asyncio.Future[bool]]) -> None:
        results = await asyncio.gather(*dead, return_exceptions=True)
        # Written, or dropped because the store is full or failing (counted and logged as
        # dropped_events): settled either way, as for events over 250 KiB, since a resend
        # would meet the same refusal. Only an error of ours is a loss.
        if any(isinstance(r, BaseException) for r in results):
            lost(entry)
        else:
            durable(entry)

    async def _before_retry(
        self, entry: Entry, part: Batch, todo: list[Batch], outcome: Outcome, attempt: int,
        dead: list[asyncio.Future[bool]],
    ) -> None:
        host = self.host
        if outcome.uncertain:
            host.counters.uncertain_deliveries += 1
        # What is not delivered yet: the part to retry and the halves queued behind it.
        claim = host.router.failed(self.n, Batch.join([part, *todo]) if todo else part)
        host.wake_writer.set()  # the first failure queued the memory batches for disk
        if claim is not None:
            # On disk before the wait, so a crash during a long outage cannot lose it.
            await host.claim(entry, claim)
        if entry.acks is not None and entry.record is not None:
            # What is left is fsync'd (by this claim, or by the writer's, which keeps disk
            # order), the rest delivered: its senders need not wait out the outage (once its
            # dead letters, if any, are on disk too).
            await self._acknowledge(entry, dead)
        wait = self.backoff.delay(attempt, outcome)
        host.counters.retries += 1
        self._log_retry(outcome, round(wait, 2), attempt)
        await self._sleep(wait)

    def _log_retry(self, o: Outcome, wait: float, attempt: int) -> None:
        host = self.host
        if o.kind is Kind.TOO_LARGE:
            host.counters.body_limit_refusals += 1
            if not host.body_limit_reported:  # once per episode, not per worker or attempt
                host.body_limit_reported = True
                host.log.error(
                    "intake_body_limit_check_proxy",
                    status=o.status,
                    response=o.detail,
                    hint="a single small event was refused as too large: a proxy's body "
                         "limit? data is kept and retried every intake.auth_retry",
                    retry_in=wait,
                )
                return
        if o.kind is Kind.AUTH:
            self.host.log.error(
                "intake_refused_check_config",
                status=o.status,
                response=o.detail,
                hint="check intake.key and intake.url; data is kept and retried",
                retry_in=wait,
                attempt=attempt,
            )
        else:
            self.host.log.warning(
                "intake_retry",
                status=o.status,
                error=o.detail,
                retry_in=wait,
                attempt=attempt,
                uncertain=o.uncertain,
            )
