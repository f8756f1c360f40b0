"""The `Delivery` facade under asyncio, with a scripted fake sink and an in-memory fake spool.

What is checked is what comes out: the events the sink accepted (once each, in order), the
records left on the spool, the dead-letter files under tmp_path, the counters and log events.

On a virtual clock (tests/vclock.py): the ager, the writer's pauses, the retry waits and the
polls of `until` take no real time; threads (spool, dead letters) are waited for as they are.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from devtools.probe import until
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.config import IntakeConfig
from haproxy_forwarder.delivery import SPILL_AFTER, Delivery, SpoolLike
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sinks import Kind, Outcome
from haproxy_forwarder.sinks.deadletter import DeadLetters, dead_letter_lines, read_dead_letters
from haproxy_forwarder.sinks.intake import IntakeClient, IntakeSink
from haproxy_forwarder.spool import AppendResult, Spool, SpoolFull, SpoolWriteError
from tests import vclock
from tests.recording import Log

OK = Outcome(Kind.DELIVERED, 200)
UNAVAILABLE = Outcome(Kind.RETRY, 503, "unavailable")
TIMEOUT = Outcome(Kind.RETRY, None, "ReadTimeout: read timed out", uncertain=True)
REFUSED_KEY = Outcome(Kind.AUTH, 401, "bad key")
TOO_LARGE = Outcome(Kind.TOO_LARGE, 413, "too large")
BAD_REQUEST = Outcome(Kind.REJECTED, 400, "malformed")
TS = b"2024-05-01T12:00:00.000Z"


class FakeSink:
    """Answers each send with `respond(batch)` (a scripted list first); records accepted events."""

    def __init__(self, respond: Callable[[Batch], Outcome] = lambda b: OK,
                 script: list[Outcome] | None = None) -> None:
        self.respond = respond
        self.script = list(script or [])
        self.accepted: list[str] = []
        self.attempts: list[list[str]] = []
        self.gate: asyncio.Event | None = None  # when set up, sends wait for it
        self.closed = False
        self.before_send: Callable[[Batch], None] = lambda b: None

    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        self.before_send(batch)
        self.attempts.append(batch.events())
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.script.pop(0) if self.script else self.respond(batch)
        if outcome.kind is Kind.DELIVERED:
            self.accepted += batch.events()
        return [(batch, outcome)]

    async def aclose(self) -> None:
        self.closed = True


class FakeSpool:
    """The spool API delivery relies on, in memory; can be told to be full or to fail."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[Batch, bool]] = {}  # rid -> (batch, handed out)
        self.ids = itertools.count(1)
        self.full = False
        self.fail = False
        self.drop_on_append = 0  # pretend drop_oldest made room by deleting this many events
        self.ops: list[tuple[str, list[str]]] = []
        self.handed_out: list[int] = []

    @property
    def has_ready(self) -> bool:
        return any(not out for _, out in self.records.values())

    @property
    def pending_batches(self) -> int:
        return len(self.records)

    def append(self, batch: Batch, claim: bool = False) -> AppendResult:
        if self.full:
            raise SpoolFull("spool full")
        if self.fail:
            raise SpoolWriteError("append failed", OSError(5, "Input/output error"))
        rid = next(self.ids)
        self.records[rid] = (batch, claim)
        self.ops.append(("claim" if claim else "append", batch.events()))
        dropped, self.drop_on_append = self.drop_on_append, 0
        return AppendResult(rid, 1 if dropped else 0, dropped)

    def next_batch(self) -> tuple[int, Batch] | None:
        for rid, (batch, out) in self.records.items():
            if not out:
                self.records[rid] = (batch, True)
                assert rid not in self.handed_out, "record handed out twice"
                self.handed_out.append(rid)
                return rid, batch
        return None

    def ack(self, record_id: int) -> None:
        del self.records[record_id]

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.records),
                "events": sum(len(b) for b, _ in self.records.values()),
                "bytes": 0, "oldest_age_seconds": 0.0, "segments": 1, "inflight": 0,
                "max_size": 1 << 30}

    def events(self) -> list[str]:
        return [e for b, _ in self.records.values() for e in b.events()]


class NoWait:
    """Retry waits of (nearly) nothing; records the attempts it was asked about."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, Kind]] = []

    def delay(self, attempt: int, outcome: Outcome) -> float:
        self.asked.append((attempt, outcome.kind))
        return 0.001


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def events(first: int, n: int) -> Batch:
    return Batch.from_events([f"event {i}" for i in range(first, first + n)], [TS] * n)


def run(coro: Coroutine[Any, Any, None]) -> None:
    """On a virtual clock; a test still running after 30 (virtual) seconds fails."""
    vclock.run(coro, limit=30)


def make(tmp_path: Path, sink: FakeSink, spool: SpoolLike | None, *, workers: int = 1,
         max_in_flight: int = 100, write_ahead: bool = False, dead_max: int = 1 << 20,
         clock: Callable[[], float] | None = None) -> tuple[Delivery, Counters, Log, list[bool]]:
    counters, log, pressure = Counters(), Log(), list[bool]()
    d = Delivery(sink, spool, DeadLetters(tmp_path, dead_max), counters, log,
                 workers=workers, backoff=NoWait(), max_in_flight=max_in_flight,
                 write_ahead=write_ahead, on_pressure=pressure.append,
                 **({"clock": clock} if clock else {}))
    return d, counters, log, pressure


def dead_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for p in sorted((tmp_path / "dead-letter").glob("*.jsonl"))
            for line in p.read_bytes().splitlines()]


def with_delivery(tmp_path: Path, sink: FakeSink, spool: FakeSpool | None,
                  body: Callable[[Delivery, Counters, Log, list[bool]], Awaitable[None]],
                  **kw: Any) -> None:
    async def main() -> None:
        d, counters, log, pressure = make(tmp_path, sink, spool, **kw)
        d.start()
        await body(d, counters, log, pressure)

    run(main())


# -- the healthy path ---------------------------------------------------------------------------


def test_constructor_starts_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        before = asyncio.all_tasks()
        d, *_ = make(tmp_path, FakeSink(), FakeSpool())
        assert asyncio.all_tasks() == before
        d.start()
        assert len(asyncio.all_tasks()) == len(before) + 3  # a worker, the writer, the ager
        await d.stop()

    run(main())


def test_every_event_delivered_once_in_order_without_touching_the_disk(tmp_path: Path) -> None:
    sink, spool = FakeSink(), FakeSpool()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        for i in range(50):
            d.submit(events(i * 3, 3))
        assert await d.drain(10)
        assert await d.stop() == (0, 0)
        assert sink.accepted == [f"event {i}" for i in range(150)]
        assert spool.ops == []  # a healthy intake: memory only
        assert (c.delivered_events, c.delivered_batches, c.batches_sent) == (150, 50, 50)
        assert sink.closed

    with_delivery(tmp_path, sink, spool, body)


def test_write_ahead_spools_first_then_sends_in_order(tmp_path: Path) -> None:
    sink, spool = FakeSink(), FakeSpool()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        for i in range(10):
            d.submit(events(i, 1))
        await until(lambda: len(sink.accepted) == 10 and not spool.records)
        assert sink.accepted == [f"event {i}" for i in range(10)]
        assert [op for op, _ in spool.ops] == ["append"] * 10
        assert d.backlog == 0
        await d.stop()

    with_delivery(tmp_path, sink, spool, body, write_ahead=True)


# -- retries --------------------------------------------------------------------------------------


def test_retries_claim_the_batch_on_disk_before_waiting_then_deliver_once(tmp_path: Path) -> None:
    sink, spool = FakeSink(script=[UNAVAILABLE, UNAVAILABLE]), FakeSpool()
    on_disk_at_retry: list[list[str]] = []
    sink.before_send = lambda b: on_disk_at_retry.append(spool.events())

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 4))
        await until(lambda: len(sink.accepted) == 4)
        await until(lambda: not spool.records)  # acked once delivered
        assert sink.accepted == [f"event {i}" for i in range(4)]
        # Nothing on disk before the first attempt; the batch is there before each retry.
        four = [f"event {i}" for i in range(4)]
        assert on_disk_at_retry == [[], four, four]
        assert [op for op, _ in spool.ops] == ["claim"]
        assert c.retries == 2 and c.uncertain_deliveries == 0
        assert [f["attempt"] for f in log.named("intake_retry")] == [1, 2]
        assert log.named("intake_retry")[0]["status"] == 503
        assert len(log.named("intake_recovered")) == 1
        assert not d.failing
        await d.stop()

    with_delivery(tmp_path, sink, spool, body)


def test_uncertain_outcome_is_counted_and_retried(tmp_path: Path) -> None:
    sink = FakeSink(script=[TIMEOUT])

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 2))
        await until(lambda: len(sink.accepted) == 2)
        assert c.uncertain_deliveries == 1 and c.retries == 1
        assert log.named("intake_retry")[0]["uncertain"] is True
        await d.stop()

    with_delivery(tmp_path, sink, FakeSpool(), body)


def test_refused_key_is_retried_loudly_never_dropped(tmp_path: Path) -> None:
    sink = FakeSink(script=[REFUSED_KEY] * 3)

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 2))
        await until(lambda: len(sink.accepted) == 2)
        refused = log.named("intake_refused_check_config")
        assert [f["attempt"] for f in refused] == [1, 2, 3]
        assert refused[0]["status"] == 401 and refused[0]["response"] == "bad key"
        assert c.dead_lettered_events == 0 and c.dropped_events == 0
        await d.stop()

    with_delivery(tmp_path, sink, FakeSpool(), body)


# -- 413 and 400 ----------------------------------------------------------------------------------


def test_413_splits_in_halves_until_accepted_in_order(tmp_path: Path) -> None:
    sink = FakeSink(respond=lambda b: TOO_LARGE if len(b) > 2 else OK)

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 8))
        await until(lambda: len(sink.accepted) == 8)
        assert sink.accepted == [f"event {i}" for i in range(8)]
        assert [len(a) for a in sink.attempts] == [8, 4, 2, 2, 4, 2, 2]
        assert [f["events"] for f in log.named("intake_payload_too_large")] == [8, 4, 4]
        assert c.delivered_batches == 4 and c.dead_lettered_events == 0
        await d.stop()

    with_delivery(tmp_path, sink, FakeSpool(), body)


def test_400_and_413_on_one_event_go_to_the_dead_letters(tmp_path: Path) -> None:
    # A 413 on one event dead-letters it only if it is over the intake's limit (a smaller one
    # is a proxy's body limit: kept, see tests/test_hostile_intake.py).
    big = "event 2 " + "x" * (250 * 1024)
    bad = {"event 1": BAD_REQUEST, big: TOO_LARGE}
    sink = FakeSink(respond=lambda b: bad.get(b.events()[0], OK))

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        for i in range(4):
            d.submit(events(i, 1) if i != 2 else Batch.from_events([big], [TS]))
        assert await d.drain(10)
        await d.stop()
        assert sink.accepted == ["event 0", "event 3"]
        lines = dead_lines(tmp_path)
        assert [(x["event"], x["status"], x["reason"], x["response"]) for x in lines] == [
            ("event 1", 400, "intake answered 400", "malformed"),
            (big, 413, "intake answered 413", "too large"),
        ]
        assert all(x["timestamp"] == TS.decode() for x in lines)
        files = sorted((tmp_path / "dead-letter").glob("*.jsonl"))
        assert list(read_dead_letters(files[0])) == [("event 1", TS.decode()),
                                                     (big, TS.decode())]
        assert c.dead_lettered_events == 2
        assert [f["status"] for f in log.named("dead_lettered")] == [400, 413]

    with_delivery(tmp_path, sink, FakeSpool(), body)


def test_dead_letter_of_a_spooled_batch_is_on_disk_before_its_record_is_acked(
    tmp_path: Path,
) -> None:
    spool = FakeSpool()
    spool.append(events(0, 1))
    sink = FakeSink(script=[BAD_REQUEST])

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        await until(lambda: not spool.records)
        assert [x["event"] for x in dead_lines(tmp_path)] == ["event 0"]
        await d.stop()

    with_delivery(tmp_path, sink, spool, body)


def test_dead_letter_from_the_hot_path_is_written_in_order_off_the_loop(tmp_path: Path) -> None:
    async def main() -> None:
        d, c, log, _ = make(tmp_path, FakeSink(), FakeSpool())
        d.start()
        for i in range(5):
            d.dead_letter(events(i, 1), "event over 250 KiB")
        await d.stop()  # waits for the writes
        assert [x["event"] for x in dead_lines(tmp_path)] == [f"event {i}" for i in range(5)]
        assert c.dead_lettered_events == 5
        assert [f["events"] for f in log.named("dead_lettered")] == [1] * 5
        raw = next((tmp_path / "dead-letter").glob("*.jsonl")).read_bytes().splitlines()[0]
        assert list(orjson.loads(raw)) == ["dead_lettered_at", "reason", "status", "response",
                                           "timestamp", "event"]

    run(main())


def test_dead_letters_over_the_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    async def main() -> None:
        d, c, log, _ = make(tmp_path, FakeSink(), FakeSpool(), dead_max=10)
        d.dead_letter(events(0, 3), "refused")
        await d.stop()
        assert c.dropped_events == 3 and c.dead_lettered_events == 0
        assert log.named("dead_letter_full")[0]["events"] == 3
        assert dead_lines(tmp_path) == []

    run(main())


def test_dead_letters_full_is_one_warning_then_a_summary(tmp_path: Path) -> None:
    """A full store refuses every batch that comes: each is counted, the journal gets the
    first at once and the rest in one summary line (said at the latest when delivery stops)."""
    async def main() -> None:
        d, c, log, _ = make(tmp_path, FakeSink(), FakeSpool(), dead_max=10)
        for i in range(20):
            d.dead_letter(events(i, 2), "refused")
        await d.stop()
        assert c.drop_reasons["dead_letter_full"] == 40
        lines = log.named("dead_letter_full")
        assert len(lines) == 2, lines
        assert lines[0]["events"] == 2 and "suppressed" not in lines[0]
        assert lines[1]["suppressed"] == 19

    run(main())


def test_dead_letter_disk_error_is_dropped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "dead-letter").write_text("a file where the directory should be")

    async def main() -> None:
        d, c, log, _ = make(tmp_path, FakeSink(), FakeSpool())
        d.dead_letter(events(0, 2), "refused")
        await d.stop()
        assert c.dropped_events == 2
        assert log.named("dead_letter_write_failed")[0]["events"] == 2

    run(main())


# -- outages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 3])
def test_outage_puts_everything_on_the_spool_and_it_drains_on_recovery(
    tmp_path: Path, workers: int
) -> None:
    healthy = False
    sink = FakeSink(respond=lambda b: OK if healthy else UNAVAILABLE)
    spool = FakeSpool()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        nonlocal healthy
        for i in range(20):
            d.submit(events(i * 2, 2))
        await until(lambda: d.in_memory == 0 and len(spool.events()) == 40)
        assert d.failing and d.backlog == 20
        assert sorted(spool.events()) == sorted(f"event {i}" for i in range(40))
        healthy = True
        await until(lambda: len(sink.accepted) == 40 and not spool.records)
        assert sorted(sink.accepted) == sorted(f"event {i}" for i in range(40))
        if workers == 1:
            assert sink.accepted == [f"event {i}" for i in range(40)]
        assert spool.handed_out == sorted(set(spool.handed_out))
        await d.stop()

    with_delivery(tmp_path, sink, spool, body, workers=workers)


def test_full_spool_holds_input_and_sends_from_memory(tmp_path: Path) -> None:
    sink, spool = FakeSink(), FakeSpool()
    spool.full = True

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        for i in range(3):
            d.submit(events(i, 1))
        await until(lambda: len(sink.accepted) == 3)
        assert sink.accepted == ["event 0", "event 1", "event 2"]
        assert d.spool_blocked and len(log.named("spool_full")) == 1
        assert spool.ops == []
        spool.full = False
        sink.gate = asyncio.Event()
        d.submit(events(3, 1))
        await until(lambda: len(sink.attempts) == 4)  # the worker is busy with it
        d.submit(events(4, 1))  # so this one waits for the writer, whose next try lands
        await until(lambda: not d.spool_blocked)
        assert len(log.named("spool_writable_again")) == 1
        assert spool.ops and {op for op, _ in spool.ops} == {"append"}
        sink.gate.set()
        await until(lambda: len(sink.accepted) == 5 and not spool.records)
        assert sink.accepted == [f"event {i}" for i in range(5)]
        await d.stop()

    with_delivery(tmp_path, sink, spool, body, write_ahead=True)


def test_failing_disk_is_logged_once_and_delivery_goes_on(tmp_path: Path) -> None:
    sink, spool = FakeSink(), FakeSpool()
    spool.fail = True

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 1))
        d.submit(events(1, 1))
        await until(lambda: len(sink.accepted) == 2)
        failed = log.named("spool_write_failed")
        assert len(failed) == 1 and "Input/output error" in failed[0]["error"]
        await d.stop()

    with_delivery(tmp_path, sink, spool, body, write_ahead=True)


# -- spill after 1 s ------------------------------------------------------------------------------


def test_a_batch_waiting_over_a_second_is_spilled_and_order_kept(tmp_path: Path) -> None:
    sink, spool = FakeSink(), FakeSpool()
    sink.gate = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        d, c, log, _ = make(tmp_path, sink, spool, clock=loop.time)  # the virtual clock
        d.start()
        await body(d, c, log, loop)

    async def body(d: Delivery, c: Counters, log: Log, loop: asyncio.AbstractEventLoop) -> None:
        assert sink.gate is not None
        d.submit(events(0, 1))
        await until(lambda: len(sink.attempts) == 1)  # on the wire, held by the only worker
        d.submit(events(1, 1))
        d.submit(events(2, 1))
        submitted = loop.time()
        await asyncio.sleep(SPILL_AFTER)  # the ager looked four times: not old enough
        assert spool.ops == [] and d.in_memory == 3
        await until(lambda: len(spool.ops) == 3)
        # Spilled at the ager's first look after SPILL_AFTER (it looks every SPILL_AFTER / 4).
        assert SPILL_AFTER < loop.time() - submitted <= SPILL_AFTER * 1.25 + 0.05
        # Disk order is submission order: the batch on the wire is claimed first.
        assert spool.ops == [("claim", ["event 0"]), ("append", ["event 1"]),
                             ("append", ["event 2"])]
        # The append returns in a worker thread; the router learns it on the loop just after.
        await until(lambda: d.in_memory == 0)
        sink.gate.set()
        await until(lambda: len(sink.accepted) == 3 and not spool.records)
        assert sink.accepted == ["event 0", "event 1", "event 2"]
        await d.stop()

    run(main())


# -- backpressure ---------------------------------------------------------------------------------


def test_backpressure_on_at_max_in_flight_off_when_drained(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate = asyncio.Event()

    async def body(d: Delivery, c: Counters, log: Log, pressure: list[bool]) -> None:
        assert sink.gate is not None
        d.submit(events(0, 1))
        await until(lambda: len(sink.attempts) == 1)
        for i in range(1, 4):
            d.submit(events(i, 1))
        assert pressure == [True]
        sink.gate.set()
        await until(lambda: len(sink.accepted) == 4)
        assert pressure == [True, False]
        await d.stop()

    with_delivery(tmp_path, sink, None, body, max_in_flight=3)


# -- shutdown -------------------------------------------------------------------------------------


def test_stop_spools_every_batch_only_in_memory_and_counts_the_request_in_doubt(
    tmp_path: Path,
) -> None:
    sink, spool = FakeSink(), FakeSpool()
    sink.gate = asyncio.Event()  # never opened: the intake never answers

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        for i in range(3):
            d.submit(events(i * 2, 2))
        await until(lambda: len(sink.attempts) == 1)
        assert not await d.drain(0.05)
        assert await d.stop() == (6, 0)
        assert spool.events() == [f"event {i}" for i in range(6)]
        assert c.uncertain_deliveries == 1 and c.dropped_events == 0
        assert sink.accepted == [] and sink.closed

    with_delivery(tmp_path, sink, spool, body)


def test_stop_without_a_spool_counts_what_is_lost(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate = asyncio.Event()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 2))
        d.submit(events(2, 3))
        await until(lambda: len(sink.attempts) == 1)
        assert await d.stop() == (0, 5)
        assert c.dropped_events == 5

    with_delivery(tmp_path, sink, None, body)


def test_stop_with_a_full_spool_logs_and_counts_the_loss(tmp_path: Path) -> None:
    sink, spool = FakeSink(), FakeSpool()
    sink.gate = asyncio.Event()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 2))
        await until(lambda: len(sink.attempts) == 1)
        spool.full = True
        assert await d.stop() == (0, 2)
        assert log.named("shutdown_spool_failed")[0]["events"] == 2

    with_delivery(tmp_path, sink, spool, body)


def test_a_retrying_batch_already_claimed_is_not_spooled_again_at_stop(tmp_path: Path) -> None:
    sink, spool = FakeSink(respond=lambda b: UNAVAILABLE), FakeSpool()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        d.submit(events(0, 2))
        d.submit(events(2, 2))
        await until(lambda: len(spool.events()) == 4)
        assert await d.drain(5)  # claimed on disk, the other one spooled: nothing in RAM
        assert await d.stop() == (0, 0)
        assert spool.events() == [f"event {i}" for i in range(4)]

    with_delivery(tmp_path, sink, spool, body)


# -- requeued dead letters ------------------------------------------------------------------------


def test_spool_append_logs_what_drop_oldest_deleted(tmp_path: Path) -> None:
    sink, spool = FakeSink(), FakeSpool()
    spool.drop_on_append = 7

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        sink.gate = asyncio.Event()
        await d.spool_append(events(0, 2))
        assert spool.events() == ["event 0", "event 1"]
        dropped = log.named("spool_full_dropped_oldest")
        assert dropped == [dropped[0]] and dropped[0]["events"] == 7
        sink.gate.set()
        d.poke()
        await until(lambda: len(sink.accepted) == 2 and not spool.records)
        spool.full = True
        with pytest.raises(SpoolFull):
            await d.spool_append(events(2, 1))
        await d.stop()

    with_delivery(tmp_path, sink, spool, body)


# -- with the real spool --------------------------------------------------------------------------


def test_outage_and_shutdown_with_the_real_spool(tmp_path: Path) -> None:
    """The same guarantees against haproxy_forwarder.spool.Spool: what the fake stands for."""
    healthy = False
    sink = FakeSink(respond=lambda b: OK if healthy else UNAVAILABLE)

    async def main() -> None:
        nonlocal healthy
        spool = Spool(tmp_path / "spool")
        spool.open()
        d, c, log, _ = make(tmp_path, sink, spool)
        d.start()
        for i in range(10):
            d.submit(events(i * 2, 2))
        await until(lambda: d.in_memory == 0 and spool.pending_events == 20)
        healthy = True
        await until(lambda: len(sink.accepted) == 20 and spool.pending_batches == 0)
        assert sink.accepted == [f"event {i}" for i in range(20)]
        assert c.delivered_events == 20 and not log.named("delivery_bug")
        # Then an intake that never answers, and a SIGTERM: the leftovers are on disk.
        sink.gate = asyncio.Event()
        for i in range(3):
            d.submit(events(100 + i, 1))
        await until(lambda: len(sink.attempts) > 0 and sink.attempts[-1] == ["event 100"])
        assert await d.stop() == (3, 0)
        spool.close()
        again = Spool(tmp_path / "spool")
        again.open()
        replay = []
        while (got := again.next_batch()) is not None:
            replay += got[1].events()
        assert replay == ["event 100", "event 101", "event 102"]
        again.close()

    run(main())


def test_dead_letter_lines_are_the_json_of_today_built_without_decoding() -> None:
    texts = ['plain', 'quote " and \\ backslash', "tab\tnewline\n", "é ünïcödé 🎉", "\x00\x1f"]
    times = [b"2024-05-01T12:00:00.000Z", b"2024-05-01T12:00:00+02:00", b"odd\"stamp",
             "naïve".encode(), b"\x7f"]
    at = time.gmtime(0)
    out = dead_letter_lines(Batch.from_events(texts, times), "intake answered 400", 400,
                            'said "no"', at)
    expected = b"".join(
        orjson.dumps({"dead_lettered_at": "1970-01-01T00:00:00Z", "reason": "intake answered 400",
                      "status": 400, "response": 'said "no"',
                      "timestamp": t.decode("ascii", "replace"), "event": e}) + b"\n"
        for e, t in zip(texts, times, strict=True)
    )
    assert out == expected


# -- batches of several bodies (the real IntakeSink over httpx.MockTransport) -----------------


def streamed(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """An answer the client reads as from the network (a `content=bytes` answer comes read
    already, and IntakeClient streams it)."""

    def chunks() -> Iterator[bytes]:  # read in the client's thread
        yield body

    return httpx.Response(status, headers=headers, content=chunks())


class Intake:
    """The intake behind an httpx.MockTransport: each request's events (decoded from the
    /array body) and its answer, chosen by `answer(events)`."""

    def __init__(self, answer: Callable[[list[str]], int]) -> None:
        self.answer = answer
        self.requests: list[tuple[list[str], int]] = []
        self.accepted: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        sent = [item["json"] for item in orjson.loads(request.read())]
        status = self.answer(sent)
        self.requests.append((sent, status))
        if status < 300:
            self.accepted += sent
        return streamed(status, b"refused" if status >= 400 else b"")

    def sink(self, max_body: int) -> IntakeSink:
        cfg = IntakeConfig(url="https://127.0.0.1:9", key="K3y", gzip=False)
        client = IntakeClient(cfg, transport=httpx.MockTransport(self.handle))
        return IntakeSink(client, cfg.endpoint, False, max_body=max_body)


# One body per event (each encodes to ~80 bytes), or two per body.
ONE_PER_BODY, TWO_PER_BODY = 100, 180


def test_bodies_after_a_400_are_sent_not_dead_lettered_with_it(tmp_path: Path) -> None:
    # Regression: the bodies not yet sent got the first body's 400 and were dead-lettered as
    # "intake answered 400" without ever reaching the intake.
    intake = Intake(lambda sent: 400 if "event 0" in sent else 200)

    async def main() -> None:
        d, c, log, _ = make(tmp_path, FakeSink(), FakeSpool())
        d.replace_sink(intake.sink(ONE_PER_BODY))
        d.start()
        d.submit(events(0, 3))
        assert await d.drain(10)
        await d.stop()
        assert intake.requests == [(["event 0"], 400), (["event 1"], 200), (["event 2"], 200)]
        assert intake.accepted == ["event 1", "event 2"]
        assert [(x["event"], x["status"]) for x in dead_lines(tmp_path)] == [("event 0", 400)]
        assert (c.dead_lettered_events, c.delivered_events, c.retries) == (1, 2, 0)
        assert [f["events"] for f in log.named("dead_lettered")] == [1]

    run(main())


def test_bodies_after_a_413_are_sent_as_they_are_after_its_halves(tmp_path: Path) -> None:
    # Regression: the untried bodies were split as if they had been refused as too large.
    intake = Intake(lambda sent: 413 if "event 0" in sent and len(sent) > 1 else 200)

    async def main() -> None:
        d, c, log, _ = make(tmp_path, FakeSink(), FakeSpool())
        d.replace_sink(intake.sink(TWO_PER_BODY))
        d.start()
        d.submit(events(0, 4))
        assert await d.drain(10)
        await d.stop()
        assert [sent for sent, _ in intake.requests] == [
            ["event 0", "event 1"], ["event 0"], ["event 1"], ["event 2", "event 3"]]
        assert intake.accepted == [f"event {i}" for i in range(4)]  # in order
        assert [f["events"] for f in log.named("intake_payload_too_large")] == [2]
        assert c.dead_lettered_events == 0 and c.retries == 0

    run(main())


def test_bodies_after_a_failed_one_are_retried_with_it_in_order(tmp_path: Path) -> None:
    answers = iter([200, 503])
    intake = Intake(lambda sent: next(answers, 200))

    async def main() -> None:
        d, c, log, _ = make(tmp_path, FakeSink(), FakeSpool())
        d.replace_sink(intake.sink(ONE_PER_BODY))
        d.start()
        d.submit(events(0, 4))
        await until(lambda: len(intake.accepted) == 4)
        await d.stop()
        assert [sent for sent, _ in intake.requests] == [
            ["event 0"], ["event 1"], ["event 1"], ["event 2"], ["event 3"]]
        assert intake.accepted == [f"event {i}" for i in range(4)]
        assert c.retries == 1 and c.dead_lettered_events == 0
        assert [f["status"] for f in log.named("intake_retry")] == [503]

    run(main())


# -- reload -----------------------------------------------------------------------------------


def test_a_replaced_sink_is_closed_after_a_request_that_raised(tmp_path: Path) -> None:
    # Regression: `sending_on` stayed set when send raised, so the replaced sink was polled
    # for (every 20 ms) until that worker happened to send again, and never closed meanwhile.
    def boom(b: Batch) -> Outcome:
        raise RuntimeError("a bug in the sink")

    old, new = FakeSink(respond=boom), FakeSink()

    async def main() -> None:
        d, _, log, _ = make(tmp_path, old, FakeSpool())
        d.start()
        d.submit(events(0, 1))
        await until(lambda: bool(log.named("delivery_bug")))
        d.replace_sink(new)
        await asyncio.wait_for(until(lambda: old.closed), 2)
        assert new.attempts == [] and not new.closed  # no send was needed to close it
        await d.stop()

    run(main())
