"""Delivery against a model: a Hypothesis state machine (issue 17, item 4b).

The real `Delivery` (router, workers, spool writer, ager, dead-letter writer) and the real
`IntakeSink`/`IntakeClient` (bodies, their split under a body limit, the answers' classes,
the request deadline) run on a deterministic event loop with virtual time; the network is an
`httpx.MockTransport` whose every request waits until the state machine answers it: 2xx, 400,
422, 413, 429 (Retry-After), 5xx, 401, a connection error, a reset after the body (the intake
may have taken it), no answer at all (the deadline cuts it), or an exception. Other rules
submit batches (with a RELP waiter or not), let time pass (spill after 1 s, backoff,
Retry-After, the writer's retry), trouble the spool (full, failing, too small for a batch,
drop_oldest) and the dead letters (full, failing), reload (a new sink, another concurrency),
restart (drain, stop, replay) and crash (kill -9: memory gone, the spool replays).

The model is what an operator is promised (docs/design.md, Guarantees):

- every event ends delivered, dead-lettered with the answer of a request that carried it,
  dropped and counted by reason (shutdown, spool_full, dead_letter_full/failed), lost in a
  crash while only in memory, or is held (memory, spool, in flight); at the end, with a
  healthy intake, nothing is held any more;
- an event gets a second outcome only where that is allowed: the intake took a request
  without answering (a reset or a deadline after the body, a stop cutting it), or a restart
  or crash replayed a record still held by a worker (partly delivered, or retrying);
- a RELP waiter is answered only once its events are on the spool or settled, and such an
  event is never lost (drop_oldest aside, as documented); every waiter is answered or given up;
- with one worker, events reach the intake in the order they were submitted, across restarts
  and crashes (the exceptions are named where the check is made);
- the counters say the same (delivered, dead-lettered, dropped by reason), and a sink a reload
  replaced is closed once no request of it is in flight.

Learned from Vector's disk_v2 model tests (`lib/vector-buffers/.../disk_v2/tests/model`):
the system runs step by step under the test's control (there, futures polled by hand; here,
an event loop that only moves when told and whose clock is virtual), and each step is checked
against a much simpler model of what must have happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from haproxy_forwarder.acks import AckGauge, Waiter
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.config import IntakeConfig
from haproxy_forwarder.delivery import Backoff, Delivery
from haproxy_forwarder.observability.counters import DROP_REASONS, Counters
from haproxy_forwarder.sinks.intake import IntakeClient, IntakeSink, Outcome
from haproxy_forwarder.spool import AppendResult, RecordTooLarge, SpoolFull, SpoolWriteError
from haproxy_forwarder.spool.queue import Evicted
from tests.recording import Log as RecordingLog
from tests.vclock import VirtualLoop

TS = b"2024-05-01T12:00:00.000Z"
KEY = "K3y"
TIMEOUT = 5.0  # intake.timeout: a request nobody answers is cut after this (virtual) time
RETRY_MAX = 4.0
AUTH_RETRY = 10.0
# Bodies hold this many events at most (each event is ~75 bytes of /array body).
BODY_LIMITS = {1: 100, 2: 180, 3: 260, 100: 1 << 20}
INTERNAL = "internal error while delivering"


# -- a loop that moves only when told (tests/vclock.py), with no thread -----------------------


class OnTheLoop(httpx.AsyncBaseTransport):
    """Only asynchronous, so IntakeClient calls it on the loop (a MockTransport is also
    synchronous, which the client would call in its threads)."""

    def __init__(self, inner: httpx.MockTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)


class InlineExecutor(Executor):
    """Runs the call at once, on the loop's thread: no thread, so no race with the steps."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever awaits it, as a thread would
            f.set_exception(exc)
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


# -- the spool, the dead letters and the logs, in memory --------------------------------------


# spool.when_full = "drop_oldest" on a spool of this many events (the "drop_oldest" trouble).
DROP_OLDEST_ROOM = 6


class ModelSpool:
    """The spool API delivery uses (SpoolLike): records in append order, handed out oldest
    first, once until a restart; `trouble` makes appends fail as a full or failing disk,
    refuses batches of over 2 events (tiny), or deletes the oldest records to make room
    (drop_oldest: `on_drop(rid, events, handed_out)` tells the machine)."""

    def __init__(self, on_drop: Callable[[int, list[int], bool], None],
                 on_claim_refused: Callable[[list[int]], None]) -> None:
        self.records: dict[int, tuple[Batch, bool]] = {}  # rid -> (batch, handed out)
        # A batch held by a worker that the writer tried to claim, refused as too large.
        self.on_claim_refused = on_claim_refused
        self.ids = itertools.count(1)
        self.trouble: str | None = None
        self.violation: str | None = None
        self.on_drop = on_drop
        self.deleted: set[int] = set()  # records drop_oldest deleted

    @property
    def has_ready(self) -> bool:
        return any(not out for _, out in self.records.values())

    @property
    def pending_batches(self) -> int:
        return len(self.records)

    def append(self, batch: Batch, claim: bool = False) -> AppendResult:
        if self.trouble == "full":
            raise SpoolFull("spool full")
        if self.trouble == "failing":
            raise SpoolWriteError("append failed", OSError(5, "Input/output error"))
        if self.trouble == "tiny" and len(batch) > 2:
            if claim:
                self.on_claim_refused([seq(e) for e in batch.events()])
            raise RecordTooLarge("larger than the whole spool")
        dropped: list[int] = []
        evicted: list[Evicted] = []
        if self.trouble == "drop_oldest":
            if len(batch) > DROP_OLDEST_ROOM:
                raise RecordTooLarge("larger than the whole spool")
            while sum(len(b) for b, _ in self.records.values()) + len(batch) > DROP_OLDEST_ROOM:
                old = min(self.records)
                gone, out = self.records.pop(old)
                self.deleted.add(old)
                if out:
                    evicted.append(Evicted(old, len(gone)))
                else:
                    dropped.append(len(gone))
                self.on_drop(old, [seq(e) for e in gone.events()], out)
        rid = next(self.ids)
        self.records[rid] = (Batch.join([batch]), claim)
        return AppendResult(rid, len(dropped), sum(dropped), tuple(evicted))

    def next_batch(self) -> tuple[int, Batch] | None:
        for rid, (batch, out) in self.records.items():
            if not out:
                self.records[rid] = (batch, True)
                return rid, batch
        return None

    def ack(self, record_id: int) -> None:
        if record_id in self.deleted:
            return  # deleted by drop_oldest while handed out (the real spool ignores it too)
        _, out = self.records.pop(record_id)
        if not out and self.violation is None:  # said by the machine, not to the caller
            self.violation = f"record {record_id} acked but never handed out"

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.records), "events": sum(len(b) for b, _ in
                                                            self.records.values()),
                "bytes": 0, "oldest_age_seconds": 0.0}

    def reopen(self) -> None:
        """A restart: what was handed out and not acked is ready again, in the same order."""
        self.records = {rid: (b, False) for rid, (b, _) in self.records.items()}

    def events(self) -> dict[int, list[int]]:
        return {rid: [seq(e) for e in b.events()] for rid, (b, _) in self.records.items()}


class MemoryDeadLetters:
    """DeadLetters' write(), in memory: (event, reason, status) per line; `trouble` makes it
    full (None: dropped as dead_letter_full) or failing (OSError: dead_letter_failed)."""

    max_size = 1 << 40

    def __init__(self, on_line: Callable[[int, str, int | None, str | None], None]) -> None:
        self.lines: list[tuple[int, str, int | None]] = []
        self.on_line = on_line
        self.trouble: str | None = None

    def write(self, batch: Batch, reason: str, status: int | None = None, response: str = "",
              at: Any = None) -> Path | None:
        for e in batch.events():
            if self.trouble is None:
                self.lines.append((seq(e), reason, status))
            self.on_line(seq(e), reason, status, self.trouble)
        if self.trouble == "failing":
            raise OSError(28, "No space left on device")
        return None if self.trouble == "full" else Path("dead-letter/memory.jsonl")


class Log(RecordingLog):
    def exception(self, event: str, **fields: Any) -> None:
        self._add(event, traceback=traceback.format_exc(), **fields)


def text(n: int) -> str:
    return f"event {n:05d}"


def seq(event: str) -> int:
    return int(event.split()[1])


# -- the intake's answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the intake does with one request: `status`, or `error` raised by the transport
    (`hang`: no answer, the client's deadline cuts it); `taken`: the events reached the
    intake although the client cannot know it (a reset or a deadline after the body)."""

    status: int | None = None
    error: str | None = None  # "connect", "reset", "hang", "boom"
    taken: bool = False
    retry_after: int | None = None

    def __repr__(self) -> str:
        if self.status is not None:
            after = f", retry_after={self.retry_after}" if self.retry_after is not None else ""
            return f"Answer(status={self.status}{after})"
        return f"Answer(error={self.error!r}, taken={self.taken})"


OK = Answer(200)
ANSWERS = st.one_of(
    st.sampled_from([OK, Answer(202), Answer(400), Answer(422), Answer(413), Answer(500),
                     Answer(503), Answer(401), Answer(error="connect"), Answer(error="boom")]),
    st.builds(Answer, status=st.just(429), retry_after=st.sampled_from([None, 0, 2])),
    st.builds(Answer, error=st.sampled_from(["reset", "hang"]), taken=st.booleans()),
)


@dataclass(eq=False)
class Request:
    n: int
    events: list[int]
    answer: asyncio.Future[Answer]
    given: Answer | None = None
    sink: int = 0  # which of the machine's sinks sent it


@dataclass
class Fate:
    """What the model knows of one event."""

    sure: int = 0  # 2xx answers to requests that carried it
    maybe: int = 0  # requests carrying it the intake took unanswered (reset, deadline, stop)
    dead: list[tuple[str, int | None]] = field(default_factory=list)  # (reason, status)
    dropped: bool = False  # counted as dropped (shutdown)
    carried: list[Request] = field(default_factory=list)  # requests that carried it
    # A second outcome is allowed: the intake took it unanswered, or a restart replayed it.
    may_repeat: bool = False
    # In a batch whose send raised (a bug): memory-only, it is dead-lettered as an internal
    # error; spooled, its record stays handed out until the next start (design: held), so
    # it arrives after newer events.
    bug: bool = False
    crashed: bool = False  # only in memory at a crash: lost, as the design says
    # In a handed-out record drop_oldest deleted: in its worker's memory, or lost (and
    # counted) at the next stop if nobody held it.
    evicted: bool = False
    # drop_oldest deleted its record while a worker held it: written again at the tail (a
    # failure, a stop), it comes after newer batches. drop_oldest trades data for room; the
    # order of what survives it is not promised either.
    unordered: bool = False
    # Submitted with a waiter (RELP): acked once durable; lost if the waiter was given up.
    waiter: Waiter | None = None
    acked: bool = False
    # drop_oldest deleted its record (handed out) after its batch had released its share of
    # the waiter (it was durable then), before the take's other batches released theirs: the
    # answer still comes, for data drop_oldest deleted, as when the deletion follows it.
    deleted_before_ack: bool = False

    @property
    def outcomes(self) -> int:
        return self.sure + self.maybe + len(self.dead) + self.dropped + self.crashed

    @property
    def settled(self) -> bool:
        """Nothing will be done with it any more (a `maybe` is retried until sure)."""
        return bool(self.sure or self.dead or self.dropped or self.crashed)


# -- the machine ----------------------------------------------------------------------------


class DeliveryMachine(RuleBasedStateMachine):
    """One delivery (then the next, after a restart or crash) on one spool, and the model.

    Rules act (submit, answer, wait, trouble, reload, restart, crash); the intake's handler,
    the spool and the dead-letter store tell the model what happened as it happens; the
    invariants compare. `teardown` heals everything and requires that all of it leaves.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualLoop()
        self.spool = ModelSpool(self._spool_dropped, self._claim_refused)
        self.dead = MemoryDeadLetters(self._dead_lettered)
        self.counters = Counters()
        self.log = Log()
        self.fates: dict[int, Fate] = {}
        self.pending: list[Request] = []  # requests waiting for the machine's answer
        self.open: list[Request] = []  # requests whose handler has not returned
        self.requests = itertools.count(1)
        # Events in the order they first reached the intake: taken (2xx, or unanswered), or
        # refused for good (400, 422: dead-lettered, in its place in the order).
        self.arrivals: list[int] = []
        self.arrived: set[int] = set()
        self.took_events = 0  # events in 2xx answers: what delivered_events may say at most
        self.booms = 0
        self.dropped = {reason: 0 for reason in DROP_REASONS}  # what the model counts
        self.restarts = 0  # restarts and crashes
        self.acks = AckGauge()
        # The current delivery's sinks, with the time a reload replaced it (None: current).
        self.sinks: dict[int, tuple[IntakeSink, float | None]] = {}
        self.sink_tags = itertools.count()
        self.sink_idle: dict[int, float] = {}  # when the last request on it ended
        self.sending: list[list[int]] = []  # the events of each sink.send in progress
        self.ordered = True  # one worker only, ever: order is checked
        self.auto_ok = False  # the final drain: every request answered 200 at once
        self.d: Delivery | None = None
        self.settings: dict[str, Any] = {}
        # The first broken promise seen where raising would hit the code under test (the
        # intake's handler, the dead-letter store): raised by the next invariant check.
        self.violation: str | None = None

    def _expect(self, ok: bool, message: Callable[[], str]) -> None:
        if not ok and self.violation is None:
            self.violation = message()

    # -- set-up -----------------------------------------------------------------------------

    @initialize(workers=st.integers(1, 3), write_ahead=st.booleans(),
                max_in_flight=st.integers(1, 6), per_body=st.sampled_from(sorted(BODY_LIMITS)))
    def start(self, workers: int, write_ahead: bool, max_in_flight: int, per_body: int) -> None:
        self.settings = {"workers": workers, "write_ahead": write_ahead,
                         "max_in_flight": max_in_flight, "per_body": per_body}
        self.ordered = workers == 1
        self._open()

    def _sink(self) -> IntakeSink:
        s = self.settings
        cfg = IntakeConfig(url="https://127.0.0.1:9", key=KEY, gzip=False, timeout=TIMEOUT,
                           concurrency=s["workers"], retry_max=RETRY_MAX, auth_retry=AUTH_RETRY)
        n = next(self.sink_tags)
        client = IntakeClient(cfg, transport=OnTheLoop(httpx.MockTransport(
            lambda request: self._handle(request, n))))
        sink = IntakeSink(client, cfg.endpoint, False, max_body=BODY_LIMITS[s["per_body"]],
                          encoder=InlineExecutor())
        self.sinks[n] = (sink, None)
        send = sink.send

        async def watched(batch: Batch) -> list[tuple[Batch, Outcome]]:
            events = [seq(x) for x in batch.events()]
            self.sending.append(events)  # the attempt a stop may cut: what it may repeat
            try:
                return await send(batch)
            finally:
                self.sending.remove(events)

        sink.send = watched  # type: ignore[method-assign]
        return sink

    def _open(self) -> None:
        s = self.settings
        self.sinks.clear()  # those of the delivery before: stopped (closed) or crashed
        sink = self._sink()
        d = Delivery(sink, self.spool, self.dead, self.counters, self.log,  # type: ignore[arg-type]
                     workers=s["workers"], backoff=Backoff(RETRY_MAX, AUTH_RETRY,
                                                           random.Random(0)),
                     max_in_flight=s["max_in_flight"], write_ahead=s["write_ahead"],
                     on_pressure=lambda on: None, clock=self.loop.time)
        # Spool reads, appends, acks and dead letters run inline (Delivery has no executor
        # parameter): deterministic steps. Checked, so that a rename fails here loudly.
        assert isinstance(d._spool_reads, ThreadPoolExecutor)
        assert isinstance(d._spool_acks, ThreadPoolExecutor)
        assert d._appends is not None and isinstance(d._appends.pool, ThreadPoolExecutor)
        assert d._dead._pool is None  # made at the first write unless set
        inline = InlineExecutor()
        d._spool_reads = d._spool_acks = d._appends.pool = inline  # type: ignore[assignment]
        d._dead._pool = inline  # type: ignore[assignment]
        self.d = d
        self._call(d.start)

    def _call(self, fn: Callable[[], Any]) -> None:
        async def go() -> None:
            fn()

        self.loop.run(go())
        self.loop.settle()

    # -- the intake -------------------------------------------------------------------------

    async def _handle(self, request: httpx.Request, sink: int) -> httpx.Response:
        items = orjson.loads(request.content)
        self._expect(all(x["intake_key"] == KEY for x in items), lambda: "key missing")
        req = Request(next(self.requests), [seq(x["json"]) for x in items],
                      asyncio.get_running_loop().create_future(), sink=sink)
        for e in req.events:
            self.fates[e].carried.append(req)
        self.open.append(req)
        if self.auto_ok:
            self._answer(req, OK)
        else:
            self.pending.append(req)
        try:
            answer = await req.answer
        finally:
            self.open.remove(req)
            self.sink_idle[sink] = self.loop.now
            if req in self.pending:  # cut by the client's deadline or a stop
                self.pending.remove(req)
        if answer.error == "connect":
            raise httpx.ConnectError("connection refused")
        if answer.error == "reset":
            raise httpx.ReadError("connection reset by peer")
        if answer.error == "boom":
            raise RuntimeError("a bug below the sink")
        status = answer.status
        assert status is not None
        headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None \
            else None

        async def body() -> Any:
            yield b"{}" if status < 300 else b'{"message": "no"}'

        return httpx.Response(status, headers=headers, content=body())

    def _answer(self, req: Request, answer: Answer) -> None:
        req.given = answer
        if answer.status is not None and answer.status < 300:
            self.took_events += len(req.events)
            for e in req.events:
                self._took(e, sure=True)
        elif answer.taken:
            for e in req.events:
                self._took(e, sure=False)
        if (answer.status is not None and answer.status < 300) or answer.taken \
                or answer.status in (400, 422):
            for e in req.events:
                self._arrived(e)
        if answer.error == "boom":
            self.booms += 1
            assert self.d is not None
            for entry in self.d.router.held.values():
                events = {seq(x) for x in entry.batch.events()}
                if set(req.events) <= events:
                    for e in events:
                        self.fates[e].bug = True
        if answer.error != "hang":
            req.answer.set_result(answer)
        # hang: never answered; the client's deadline (TIMEOUT) cuts it

    def _spool_dropped(self, rid: int, events: list[int], handed_out: bool) -> None:
        """drop_oldest deleted a record. Not handed out: its events are lost, counted
        (spool_full) by the append that deleted it. Handed out: its worker keeps it in memory
        (written again at a failure or a stop), or, its holder gone (a stop, the bug path),
        it is lost and counted at the stop."""
        for e in events:
            fate = self.fates[e]
            # Acknowledged (RELP) and deleted: a loss the design owns (check-config warns
            # against drop_oldest with RELP); its sender will not send it again.
            fate.acked = False
            if handed_out:
                fate.evicted = fate.unordered = True
                w = fate.waiter
                if w is not None and w.callback is not None and not self._share_held(e, w):
                    fate.deleted_before_ack = True
            elif not fate.settled:
                fate.dropped = True
        if not handed_out:
            self.dropped["spool_full"] += len(events)

    # The known order bug of a held batch too large for the spool (the strict xfail
    # test_one_worker_keeps_the_order_of_a_held_batch_too_large_for_the_spool, which turns
    # this off): its events' order is not checked, so the machine goes on finding others.
    exempt_known_order_bug = True

    def _claim_refused(self, events: list[int]) -> None:
        if self.exempt_known_order_bug:
            for e in events:
                self.fates[e].unordered = True

    def _share_held(self, e: int, waiter: Waiter) -> bool:
        """A batch delivery still has holds `waiter` for event `e`: it releases it only once
        `e` is durable again (written anew) or settled, which `_acked` checks as usual."""
        d = self.d
        if d is None or d.router.closed:
            return False  # stopped: a batch still holding it gives it up (lost) at the stop
        r = d.router
        spooling = [r.spooling] if r.spooling is not None else []
        return any(x.acks is not None and waiter in x.acks
                   and e in {seq(y) for y in x.batch.events()}
                   for x in [*r.held.values(), *r.memory, *r.to_spool, *spooling])

    def _took(self, e: int, sure: bool) -> None:
        fate = self.fates[e]
        if sure:
            fate.sure += 1
        else:
            fate.maybe += 1
            fate.may_repeat = True

    def _arrived(self, e: int) -> None:
        if e not in self.arrived:
            self._check_order(e)
            self.arrived.add(e)
            self.arrivals.append(e)

    def _check_order(self, e: int) -> None:
        if not self.ordered:
            return  # several requests at once may be answered in any order
        fate = self.fates[e]
        if fate.bug or fate.unordered:
            return
        later = [x for x in self.arrivals if x > e and not self.fates[x].bug]
        self._expect(not later, lambda: f"event {e} reached the intake after {later}")

    def _dead_lettered(self, e: int, reason: str, status: int | None,
                       trouble: str | None) -> None:
        fate = self.fates[e]
        if trouble is None:
            fate.dead.append((reason, status))
        else:  # dropped, counted: dead_letter_full / dead_letter_failed
            fate.dropped = True
            self.dropped["dead_letter_full" if trouble == "full" else "dead_letter_failed"] += 1
        if reason == INTERNAL:
            self._expect(bool(self.booms), lambda: f"event {e} dead-lettered for an internal "
                                                   "error, with no request raising")
            return
        answers = {r.given.status for r in fate.carried if r.given is not None}
        self._expect(reason == f"intake answered {status}" and status in answers, lambda: (
            f"event {e} dead-lettered as {reason!r}; its requests were answered "
            f"{sorted(answers, key=str)}"))

    # -- rules ------------------------------------------------------------------------------

    @rule(n=st.integers(1, 4))
    def submit(self, n: int) -> None:
        first = len(self.fates)
        for e in range(first, first + n):
            self.fates[e] = Fate()
        batch = Batch.from_events([text(e) for e in range(first, first + n)], [TS] * n)
        d = self.d
        assert d is not None
        self._call(lambda: d.submit(batch))

    @rule(n=st.integers(1, 4), parts=st.integers(1, 2), shared=st.booleans())
    def submit_acked(self, n: int, parts: int, shared: bool) -> None:
        """RELP takes, handed over as Collector.take does: the take's waiter is given to
        every batch holding some of its n events before that batch is submitted; `parts`: in
        two batches (the take closed the open batch and left the rest in the next one), or
        one; `shared`: the last batch also holds one event of a second take, with a waiter
        of its own (several messages in one batch). The last batch is the open one: its
        take's hold is released first, and it is submitted later (closed by a timer)."""
        first = len(self.fates)
        events = range(first, first + n)
        w = Waiter(lambda: self._acked(events), self.acks, lambda: None)
        for e in events:
            self.fates[e] = Fate(waiter=w)
        cut = first + n // 2 if parts == 2 and n > 1 else first
        groups = [range(first, cut), range(cut, first + n)] if cut > first else [events]
        batches = [Batch.from_events([text(e) for e in g], [TS] * len(g)) for g in groups]
        takes = [w]
        if shared:
            e2 = first + n
            w2 = Waiter(lambda: self._acked(range(e2, e2 + 1)), self.acks, lambda: None)
            self.fates[e2] = Fate(waiter=w2)
            last = batches[-1]
            batches[-1] = Batch.join([last, Batch.from_events([text(e2)], [TS])])
            takes.append(w2)
        d = self.d
        assert d is not None

        def give(batch: Batch, waiter: Waiter) -> None:
            waiter.hold()
            batch.acks = [*(batch.acks or ()), waiter]

        def take() -> None:
            for batch in batches:
                give(batch, w)
            if shared:
                give(batches[-1], takes[1])
            for batch in batches[:-1]:
                d.submit(batch)  # closed by the take
            for waiter in takes:
                waiter.release()  # the end of each take: its creator's hold
            d.submit(batches[-1])  # the open batch, closed later

        self._call(take)

    def _acked(self, events: range) -> None:
        on_disk = {e for es in self.spool.events().values() for e in es}
        for e in events:
            fate = self.fates[e]
            if fate.deleted_before_ack:
                continue  # acked, then deleted: like _spool_dropped's, a loss the design owns
            fate.acked = True
            self._expect(e in on_disk or fate.settled,
                         lambda e=e, f=fate: f"event {e} acknowledged before durable: {f}")

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 7), answer=ANSWERS)
    def answer(self, pick: int, answer: Answer) -> None:
        req = self.pending.pop(pick % len(self.pending))
        self._answer(req, answer)
        self.loop.settle()

    @precondition(lambda self: self.pending)
    @rule(answer=ANSWERS)
    def answer_all(self, answer: Answer) -> None:
        """The same answer to every request waiting (an outage, a recovery)."""
        for req in list(self.pending):
            self.pending.remove(req)
            self._answer(req, answer)
        self.loop.settle()

    @rule(dt=st.sampled_from([0.1, 0.6, 1.1, 2.5, TIMEOUT + 0.5, 15.0]))
    def wait(self, dt: float) -> None:
        self.loop.advance(dt)

    @rule(workers=st.integers(1, 3))
    def reload(self, workers: int) -> None:
        """SIGHUP: a new sink for every request from now on; intake.concurrency changed."""
        d = self.d
        assert d is not None
        self.settings["workers"] = workers
        self.ordered = self.ordered and workers == 1
        sink = self._sink()
        self.sinks = {n: (old, self.loop.now if t is None and old is not sink else t)
                      for n, (old, t) in self.sinks.items()}

        def apply() -> None:
            d.replace_sink(sink)
            d.set_workers(workers)

        self._call(apply)

    @invariant()
    def a_replaced_sink_is_closed_once_idle(self) -> None:
        busy = {req.sink for req in self.open}
        for n, (sink, replaced) in self.sinks.items():
            since = max(replaced or 0.0, self.sink_idle.get(n, 0.0))
            if replaced is not None and n not in busy and self.loop.now - since >= 0.1:
                assert sink.client._client.is_closed, f"sink {n} replaced but not closed"

    @rule(trouble=st.sampled_from([None, "full", "failing", "tiny", "drop_oldest"]))
    def spool_trouble(self, trouble: str | None) -> None:
        """tiny: a spool too small for batches of over 2 events (RecordTooLarge);
        drop_oldest: full at DROP_OLDEST_ROOM events, the oldest records deleted for room."""
        self.spool.trouble = trouble

    @rule(trouble=st.sampled_from([None, "full", "failing"]))
    def dead_letter_trouble(self, trouble: str | None) -> None:
        self.dead.trouble = trouble

    @rule(grace=st.sampled_from([0.0, 0.5, 3.0]), taken=st.booleans())
    def restart(self, grace: float, taken: bool) -> None:
        """SIGTERM and start again: drain for `grace` s, stop (spool what is only in memory),
        replay the spool. `taken`: the requests the stop cuts had reached the intake."""
        d = self.d
        assert d is not None
        self.loop.run(d.drain(grace))
        if taken:
            for req in self.open:
                if req.given is None:  # not answered yet (a hung one was decided already)
                    for e in req.events:
                        self._took(e, sure=False)
                        self._arrived(e)
        # What a worker holds may be partly settled: its record is replayed whole, and so is
        # the batch of a request the stop cuts (spooled now).
        held = {e.record for e in d.router.held.values() if e.record is not None}
        cut = {e for events in self.sending for e in events}
        # Records are replayed (or, deleted in flight, counted) whole, settled parts included.
        on_disk = self.spool.events()
        records = {x for r in held for x in on_disk.get(r, ())}
        # drop_oldest's deletions of records not handed out are counted as they happen (and
        # by the model, _spool_dropped); the rest of spool_full at a stop is in flight.
        full_before = self.counters.drop_reasons["spool_full"] - self.dropped["spool_full"]
        _, dropped = self.loop.run(d.stop())
        self.loop.settle()
        in_flight = self.counters.drop_reasons["spool_full"] - self.dropped["spool_full"] \
            - full_before
        self._check_stop(held, cut, records, dropped, in_flight)
        self.spool.reopen()
        self._open()

    @rule()
    def crash(self) -> None:
        """kill -9 and start again: memory is gone, the spool (fsync'd) replays."""
        d = self.d
        assert d is not None
        for t in [*d._tasks, *d._retiring]:
            t.cancel()
        self.loop.settle()
        for sink, _ in self.sinks.values():
            self.loop.run(sink.aclose())
        self.restarts += 1
        on_disk = self.spool.events()
        kept = {e for events in on_disk.values() for e in events}
        for e, fate in self.fates.items():
            if e in kept:
                if fate.outcomes:
                    fate.may_repeat = True  # between the intake's 2xx and the ack
            elif not fate.settled:
                fate.crashed = True
                self._expect(not fate.acked, lambda e=e: f"acknowledged event {e} lost at a crash")
            if fate.waiter is not None and fate.waiter.callback is not None:
                fate.waiter = None  # nothing at all at a crash (see acks.Ack)
            fate.evicted = False
        self.spool.reopen()
        self._open()

    def _check_stop(self, held: set[int], cut: set[int], records: set[int], dropped: int,
                    in_flight: int) -> None:
        """After a stop: what a worker held, or a request the stop cut, may come back from
        the spool although settled; what is neither settled nor on the spool is counted:
        `dropped` at shutdown (memory-only, the spool refusing), `in_flight` as spool_full
        (deleted by drop_oldest while handed out, its holder gone)."""
        self.restarts += 1
        on_disk = self.spool.events()
        kept = {e for events in on_disk.values() for e in events}
        for rid, events in on_disk.items():
            for e in events:
                fate = self.fates[e]
                if fate.settled and not fate.may_repeat:
                    assert rid in held or e in cut or self.booms, (
                        f"event {e} settled ({fate}) but its record {rid} was not acked")
                    fate.may_repeat = True  # replayed whole
        lost = [e for e, f in self.fates.items() if not f.settled and e not in kept]
        # What the stop writes or counts may hold settled events: the bodies of a send it cut
        # (its batch is written whole), a record partly delivered, a replay.
        also = len([e for e, f in self.fates.items() if f.settled and e not in kept and (
            e in records or e in cut or f.may_repeat)])
        assert len(lost) <= dropped + in_flight <= len(lost) + also, (
            f"{dropped} + {in_flight} events counted dropped at stop; neither settled nor "
            f"spooled: {lost}")
        for e in lost:
            fate = self.fates[e]
            fate.dropped = True
            assert not fate.acked, f"acknowledged event {e} dropped at stop"
        for fate in self.fates.values():
            fate.evicted = False
        self.dropped["shutdown"] += dropped
        self.dropped["spool_full"] += in_flight

    # -- invariants -------------------------------------------------------------------------

    def _held(self) -> set[int]:
        assert self.d is not None
        held = {seq(x) for entry in self.d.router.memory_only() for x in entry.batch.events()}
        return held | {e for events in self.spool.events().values() for e in events}

    @invariant()
    def no_promise_broken_in_a_callback(self) -> None:
        assert self.violation is None, self.violation
        assert self.spool.violation is None, self.spool.violation

    @invariant()
    def every_event_settled_once_or_held(self) -> None:
        if self.d is None:
            return
        held = self._held()
        for e, fate in self.fates.items():
            assert fate.settled or e in held or fate.evicted, f"event {e} is gone: {fate}"
            assert fate.outcomes <= 1 or fate.may_repeat, f"event {e} settled twice: {fate}"

    @invariant()
    def counters_agree(self) -> None:
        c = self.counters
        # A multi-body send cut by a stop never counts its delivered bodies: at most.
        assert c.delivered_events <= self.took_events
        assert c.dead_lettered_events == len(self.dead.lines)
        assert c.drop_reasons == self.dropped
        assert c.dropped_events == sum(self.dropped.values())
        bugs = self.log.named("delivery_bug")
        assert not bugs or self.booms, bugs[0]

    # -- the end: everything leaves ---------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.d is not None and sys.exc_info()[0] is None:
                self._finish()
        finally:
            if self.d is not None and self.d._tasks:
                # Only cleaning up after a failure already reported.
                with contextlib.suppress(Exception):
                    self.loop.run(self.d.stop())
            self.loop.close()

    def _finish(self) -> None:
        """A healthy intake and disk from now on: every event must end delivered or
        dead-lettered (or dropped, counted), and nothing stay on the spool."""
        self.spool.trouble = self.dead.trouble = None
        self.auto_ok = True
        for req in list(self.pending):
            self.pending.remove(req)
            self._answer(req, OK)
        for _ in range(2):  # the second pass replays records a failed send left handed out
            for _ in range(30):  # waits here are at most AUTH_RETRY (10 s)
                self.loop.advance(5.0)
                if self._done():
                    break
            self.restart(grace=0.0, taken=False)
        self.loop.advance(10.0)
        self.no_promise_broken_in_a_callback()
        self.every_event_settled_once_or_held()
        self.counters_agree()
        waiting = [e for e, f in self.fates.items()
                   if f.waiter is not None and f.waiter.callback is not None]
        assert not waiting, f"their senders still wait for an answer: {waiting}"
        unsettled = [e for e, f in self.fates.items() if not f.settled]
        assert not unsettled, f"never delivered with a healthy intake: {unsettled}"
        assert not self.spool.records, f"left on the spool: {self.spool.events()}"
        c = self.counters
        if self.restarts == 2 and not any(f.maybe for f in self.fates.values()):
            assert c.delivered_events == self.took_events  # nothing cut: every 2xx counted

    def _done(self) -> bool:
        return all(f.settled for f in self.fates.values()) and not self.spool.records


DeliveryMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_delivery_model = DeliveryMachine.TestCase


# -- the examples it found, kept ------------------------------------------------------------


def check(state: DeliveryMachine) -> None:
    state.no_promise_broken_in_a_callback()
    state.every_event_settled_once_or_held()
    state.counters_agree()


def steps(state: DeliveryMachine, *calls: Callable[[], None]) -> None:
    """Run the calls as the machine would (invariants after each), then its teardown."""
    try:
        for call in calls:
            call()
            check(state)
    finally:
        state.teardown()


def test_a_body_delivered_before_another_raised_is_not_dead_lettered() -> None:
    # Found by the machine: body 1 answered 200, body 2's request raised (a bug below the
    # sink): the whole batch was dead-lettered as an internal error, event 0 included.
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.submit(n=2),
          lambda: s.answer(answer=Answer(200), pick=0),
          lambda: s.answer(answer=Answer(error="boom"), pick=0))


def test_a_stop_spools_only_what_a_batch_has_left() -> None:
    # Found by the machine: 400 on the first body (event 0 dead-lettered), the others sent
    # next and cut by a stop: the whole batch was spooled, and event 0 sent again after
    # its dead letter (and ahead of events 1-3 already taken).
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.submit(n=4),
          lambda: s.answer(answer=Answer(400), pick=0),
          lambda: s.restart(grace=0.0, taken=True),
          lambda: s.answer(answer=Answer(200), pick=0))


def test_a_sink_replaced_after_a_request_raised_is_closed() -> None:
    # Issue 17: `sending_on` stayed set when send raised; the replaced sink stayed open
    # until that worker sent again (the machine's invariant finds it too).
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=100),
          lambda: s.submit(n=1),
          lambda: s.answer(answer=Answer(error="boom"), pick=0),
          lambda: s.reload(workers=1),
          lambda: s.wait(dt=0.6),
          s.a_replaced_sink_is_closed_once_idle)


# Four order bugs the machine found, fixed in be969b6 and 248c56b (router.py): the spool
# replays in append order, and appends did not always follow submission order.


def test_one_worker_keeps_the_order_across_a_crash() -> None:
    # Event 0 is on the wire; event 1 waits in memory, is spilled to the spool after 1 s
    # (record 1); event 0's request times out, it was claimed then (record 2); a crash: the
    # spool replayed record 1 (event 1), then record 2 (event 0).
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.submit(n=1),
          lambda: s.submit(n=1),
          lambda: s.wait(dt=TIMEOUT + 0.5),
          lambda: s.crash())


def test_one_worker_keeps_the_order_across_a_restart() -> None:
    # The machine's first find. Event 0 on the wire; event 1 spilled during the drain; the
    # stop spooled event 0 behind it.
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.submit(n=1),
          lambda: s.submit(n=1),
          lambda: s.restart(grace=3.0, taken=False))


def test_one_worker_keeps_the_order_of_a_relp_batch_and_older_ones() -> None:
    # Event 0 on the wire, event 1 in memory, event 2 (RELP, with a waiter) written ahead to
    # the spool at once; a 429 for event 0: event 1 followed to the spool, behind event 2,
    # which was then sent first.
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.submit(n=1),
          lambda: s.submit(n=1),
          lambda: s.submit_acked(n=1, parts=1, shared=False),
          lambda: s.answer_all(answer=Answer(429)))


def test_a_stop_right_after_the_writer_is_woken_returns() -> None:
    # Seen as a 1-in-10 hang of test_delivery.py's
    # test_a_retrying_batch_already_claimed_is_not_spooled_again_at_stop (a worker retrying
    # every millisecond wakes the writer each time); here made deterministic. The writer
    # waited with asyncio.wait_for, which on Python 3.11 swallows a cancellation that comes
    # once the wait is over (CPython gh-86296): it ran on, and Delivery.stop() for ever.
    s = DeliveryMachine()
    s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1)
    d = s.d
    assert d is not None

    async def wake_then_stop() -> tuple[int, int]:
        d.wake_writer.set()  # a batch queued for the disk, a worker's first failure...
        await asyncio.sleep(0)  # the writer's wait is over; the writer has not run yet
        return await d.stop()

    try:
        assert s.loop.run(wake_then_stop(), limit=60) == (0, 0)
    finally:
        s.d = None
        s.loop.close()


def test_one_worker_keeps_the_order_of_a_batch_too_large_for_the_spool() -> None:
    # Events 0 and 1 spooled at a stop; after the restart, a batch of 3 events too large for
    # the (tiny) spool was sent from memory ahead of them.
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.submit(n=1),
          lambda: s.spool_trouble(trouble="tiny"),
          lambda: s.submit(n=1),
          lambda: s.restart(grace=0.0, taken=False),
          lambda: s.submit(n=3))


def test_a_record_evicted_after_a_part_was_dead_lettered_is_spooled_without_it() -> None:
    # Found by the machine (about 1 run in 9): record 1 holds events 0 and 1 (a RELP take
    # and a second one sharing its batch); 400 on event 0's body (dead-lettered), event 1's
    # body sent next. The worker kept Entry.batch whole, as the record stays on disk until
    # acked; then drop_oldest deleted the record to make room for the batches spilled
    # during the drain (the batch only in the worker's memory from then on), and the stop
    # spooled the whole batch: event 0 was sent again after its dead letter.
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.spool_trouble(trouble="drop_oldest"),
          lambda: s.submit_acked(n=1, parts=1, shared=True),
          lambda: s.submit(n=1),
          lambda: s.submit(n=4),
          lambda: s.answer(answer=Answer(status=400), pick=0),
          lambda: s.restart(grace=3.0, taken=False))


def _relp_take_then_drop_oldest(workers: int) -> None:
    s = DeliveryMachine()
    steps(s, lambda: s.start(workers=workers, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.spool_trouble(trouble="full"),
          lambda: s.submit_acked(n=4, parts=2, shared=False),
          lambda: s.spool_trouble(trouble="drop_oldest"),
          lambda: s.submit(n=3),
          lambda: s.wait(dt=2.5),
          lambda: s.restart(grace=3.0, taken=False))


def test_a_take_answered_after_drop_oldest_deleted_a_part_of_it_is_its_loss() -> None:
    # Found by the machine (the model was wrong): a RELP take in batches [0, 1] and [2, 3],
    # each sent from memory by a worker of its own (the spool full), then claimed. [2, 3]
    # released its share of the take's waiter at its retry (on disk, record 2); drop_oldest
    # deleted record 2 for [0, 1]'s claim, whose release then answered the take. The model
    # said "acknowledged before durable"; it is drop_oldest deleting answered RELP data
    # (design.md), only answered later because the take's other batch was not durable yet.
    _relp_take_then_drop_oldest(workers=2)


def test_a_take_answered_at_a_stop_after_drop_oldest_deleted_a_part_of_it_is_its_loss() -> None:
    # The same with three workers: the stop's append of [0, 1] deleted record 2 ([2, 3],
    # its share released at its retry), then answered the take; [2, 3] is counted lost
    # (spool_full, in flight). The model said "acknowledged event 2 dropped at stop".
    _relp_take_then_drop_oldest(workers=3)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known order bug, not fixed yet: a held batch too large for the spool")
def test_one_worker_keeps_the_order_of_a_held_batch_too_large_for_the_spool() -> None:
    # Found by the machine (also on 58e78b4): batch [0, 1, 2] goes from memory to the worker;
    # a RELP batch [3] is queued for the disk, the writer tries to claim the older held batch
    # first, the tiny spool refuses it as too large (never_fits), and [3] is written (record
    # 1). A 400 on event 1 leaves [2] to send; the stop spools it behind record 1, and the
    # restart sends 3 before 2. Only with spool.max_size under a batch's size.
    s = DeliveryMachine()
    s.exempt_known_order_bug = False
    steps(s, lambda: s.start(workers=1, write_ahead=False, max_in_flight=1, per_body=1),
          lambda: s.spool_trouble(trouble="tiny"),
          lambda: s.submit(n=3),
          lambda: s.answer(answer=Answer(status=200), pick=0),
          lambda: s.submit_acked(n=1, parts=1, shared=False),
          lambda: s.answer(answer=Answer(status=400), pick=0),
          lambda: s.restart(grace=0.0, taken=False))
