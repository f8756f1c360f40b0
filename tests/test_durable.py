"""Collector.take(result, Ack): the acknowledgements RELP gives only once its messages are
durable.

A real Spool in tmp_path (behind a Filesystem that records, or holds, its writes and fsyncs),
the real Delivery and Collector, a scripted sink. What is checked is when each callback runs,
and what is on disk (spool segments, dead letters) or at the sink at that moment.

On a virtual clock (tests/vclock.py): the collector's timers and delivery's pauses take no
real time; the spool's and the dead letters' threads run as they do (the clock follows real
time while they work).
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from devtools.probe import until
from haproxy_forwarder.acks import Ack, AckGauge, Waiter
from haproxy_forwarder.batching import Batch, Batcher
from haproxy_forwarder.collector import Collector
from haproxy_forwarder.delivery import Delivery
from haproxy_forwarder.delivery.router import Router, durable
from haproxy_forwarder.ingest import ChunkResult, ProgramFilter, new_reader
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sinks.deadletter import DeadLetters, read_dead_letters
from haproxy_forwarder.spool import Spool
from haproxy_forwarder.spool.segments import Filesystem
from tests import vclock
from tests.test_delivery import (
    BAD_REQUEST,
    OK,
    TOO_LARGE,
    UNAVAILABLE,
    FakeSink,
    Log,
    NoWait,
)

TS = b"2026-12-01T00:00:00.000Z"


class DiskLog(Filesystem):
    """Records (op, fd) of every segment write and fsync; `hold` keeps fsyncs waiting."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, int]] = []
        self.hold: threading.Event | None = None
        self.in_fsync = threading.Event()
        self.fail_writes = False

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if self.fail_writes:
            raise OSError(errno.EIO, "Input/output error")
        self.ops.append(("pwrite", fd))
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        if self.hold is not None and ("pwrite", fd) in self.ops:  # a segment, not a folder
            self.in_fsync.set()
            self.hold.wait(10)
        super().fsync(fd)
        self.ops.append(("fsync", fd))

    def synced(self) -> bool:
        """Every segment write so far was followed by an fsync of its file."""
        last: dict[int, str] = {}
        for op, fd in self.ops:
            last[fd] = op
        return "pwrite" in {op for op, _ in self.ops} and all(
            op == "fsync" for fd, op in last.items()
            if any(o == "pwrite" and f == fd for o, f in self.ops))


def frame(text: str, program: str = "haproxy") -> bytes:
    msg = f"<134>Dec  1 00:00:00 lb1 {program}[1]: {text}".encode()
    return b"%d %s" % (len(msg), msg)


class Rig:
    """Collector -> Delivery -> (Spool | nothing) -> sink, with one RELP-like reader."""

    def __init__(self, tmp_path: Path, sink: FakeSink, *, spool: bool = True,
                 max_events: int = 1000, max_delay: float = 5.0, idle_flush: float = 0.02,
                 dead_max: int = 1 << 20, fs: Filesystem | None = None) -> None:
        self.counters = Counters()
        self.log = Log()
        self.spool: Spool | None = None
        if spool:
            self.spool = Spool(tmp_path / "spool", fs=fs, counters=self.counters.spool)
            self.spool.open()
        self.dead = DeadLetters(tmp_path, dead_max)
        self.delivery = Delivery(sink, self.spool, self.dead, self.counters, self.log,
                                 workers=1, backoff=NoWait(), max_in_flight=100,
                                 write_ahead=False, on_pressure=lambda on: None)
        self.collector = Collector(Batcher(max_events, 1 << 20), self.delivery, self.counters,
                                   max_delay, idle_flush)
        self.reader = new_reader(ProgramFilter(["haproxy"]), 1 << 20)
        self.calls: list[str] = []
        self.lost: list[str] = []  # the on_lost callbacks that ran
        self.delivery.start()

    def send(self, *texts: str, program: str = "haproxy",
             check: Callable[[str], None] = lambda name: None) -> str:
        """One take() of these messages with its Ack; returns the callback's name."""
        name = texts[0] if texts else "nothing"
        result = self.reader.feed(b"".join(frame(t, program) for t in texts), TS)
        self.take(result, name, check)
        return name

    def take(self, result: ChunkResult, name: str,
             check: Callable[[str], None] = lambda name: None) -> None:
        def callback() -> None:
            check(name)
            self.calls.append(name)

        self.collector.take(result, Ack(callback, lambda: self.lost.append(name)))

    def on_disk(self) -> list[str]:
        """The events a new process would find in the spool now (read-only open)."""
        assert self.spool is not None
        other = Spool(self.spool.directory)
        other.open(readonly=True)
        try:
            out = []
            while (got := other.next_batch()) is not None:
                out += got[1].events()
            return out
        finally:
            other.close()

    async def stop(self) -> tuple[int, int]:
        got = await self.delivery.stop()
        if self.spool is not None:
            self.spool.close()
        return got


def run(coro: Coroutine[Any, Any, None]) -> None:
    vclock.run(coro, limit=20)


# -- the spool path --------------------------------------------------------------------------


def test_acknowledged_only_after_the_batch_is_fsynced_in_the_spool(tmp_path: Path) -> None:
    fs = DiskLog()
    fs.hold = threading.Event()
    sink = FakeSink()
    sink.gate = asyncio.Event()  # the intake never answers: only the spool can acknowledge

    async def main() -> None:
        rig = Rig(tmp_path, sink, fs=fs)
        seen: dict[str, Any] = {}

        def check(name: str) -> None:
            seen["disk"] = rig.on_disk()
            seen["synced"] = fs.synced()
            seen["pending"] = rig.collector.acks_pending

        rig.send("relp 1", check=check)
        assert rig.collector.acks_pending == 1
        await asyncio.to_thread(fs.in_fsync.wait, 5)  # written, its fsync under way
        await asyncio.sleep(0.05)
        assert rig.calls == []
        fs.hold.set()
        await until(lambda: rig.calls == ["relp 1"])
        assert seen == {"disk": ["relp 1"], "synced": True, "pending": 0}
        assert rig.collector.acks_pending == 0
        sink.gate.set()
        await rig.stop()

    run(main())


def test_intake_down_acknowledged_once_spooled_delivered_later(tmp_path: Path) -> None:
    healthy = False
    sink = FakeSink(respond=lambda b: OK if healthy else UNAVAILABLE)

    async def main() -> None:
        nonlocal healthy
        rig = Rig(tmp_path, sink)
        rig.send("m1")
        rig.send("m2")
        await until(lambda: rig.calls == ["m1", "m2"])
        assert rig.on_disk() == ["m1", "m2"] and sink.accepted == []
        healthy = True
        await until(lambda: sink.accepted == ["m1", "m2"])
        assert rig.calls == ["m1", "m2"]  # never twice
        await rig.stop()

    run(main())


def test_only_batches_with_waiters_are_written_ahead(tmp_path: Path) -> None:
    sink = FakeSink()

    async def main() -> None:
        rig = Rig(tmp_path, sink)
        rig.collector.take(rig.reader.feed(frame("tcp 1"), TS))  # a TCP source: no Ack
        await until(lambda: sink.accepted == ["tcp 1"])
        assert rig.counters.spool.appended_batches == 0
        rig.send("relp 1")
        await until(lambda: rig.calls == ["relp 1"] and sink.accepted == ["tcp 1", "relp 1"])
        assert rig.counters.spool.appended_batches == 1
        await rig.stop()

    run(main())


def test_many_waiters_on_one_batch_one_append_each_called_once_in_order(
        tmp_path: Path) -> None:
    sink = FakeSink()

    async def main() -> None:
        rig = Rig(tmp_path, sink, idle_flush=5.0)
        names = [rig.send(f"m{i}") for i in range(300)]
        assert rig.collector.acks_pending == 300
        rig.collector.flush()
        await until(lambda: len(rig.calls) == 300)
        assert rig.calls == names
        assert rig.counters.spool.appended_batches == 1  # one record, one fsync for all
        await until(lambda: len(sink.accepted) == 300)
        assert rig.calls == names and rig.collector.acks_pending == 0
        await rig.stop()

    run(main())


def test_take_that_closes_batches_waits_for_each_of_them(tmp_path: Path) -> None:
    """Events of one take() in a batch closed by it (already submitted) and in the open one."""
    fs = DiskLog()
    fs.hold = threading.Event()
    sink = FakeSink()

    async def main() -> None:
        rig = Rig(tmp_path, sink, max_events=2, idle_flush=5.0, fs=fs)
        appended: list[int] = []

        def check(name: str) -> None:
            appended.append(rig.counters.spool.appended_events)

        rig.send("a", "b", "c", check=check)  # closes [a, b] (submitted at once); c stays open
        await asyncio.to_thread(fs.in_fsync.wait, 5)
        fs.hold.set()
        await until(lambda: rig.counters.spool.appended_batches == 1)
        await asyncio.sleep(0.05)
        assert rig.calls == []  # c is only in memory
        rig.collector.flush()
        await until(lambda: rig.calls == ["a"])
        assert appended == [3]  # both batches were on disk when it ran
        # A take whose last event fills the batch: nothing open, the closed batch (routed to
        # memory for a healthy intake) is sent to the spool first.
        rig.send("d", "e", check=check)
        await until(lambda: rig.calls == ["a", "d"])
        assert rig.counters.spool.appended_batches == 3 and appended == [3, 5]
        await until(lambda: sink.accepted == ["a", "b", "c", "d", "e"])
        await rig.stop()

    run(main())


# -- without a spool, filtered, too large ------------------------------------------------------


def test_dry_run_acknowledged_on_delivery(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate = asyncio.Event()

    async def main() -> None:
        rig = Rig(tmp_path, sink, spool=False)
        rig.send("m1")
        await until(lambda: sink.attempts == [["m1"]])
        await asyncio.sleep(0.05)
        assert rig.calls == []
        sink.gate.set()
        await until(lambda: rig.calls == ["m1"])
        assert sink.accepted == ["m1"]
        await rig.stop()

    run(main())


def test_filtered_or_empty_take_is_acknowledged_at_once(tmp_path: Path) -> None:
    sink = FakeSink()

    async def main() -> None:
        rig = Rig(tmp_path, sink)
        rig.send("not ours", program="sshd")
        assert rig.calls == ["not ours"]  # synchronously, before any await
        rig.send()  # nothing read yet (an empty chunk)
        assert rig.calls == ["not ours", "nothing"]
        assert rig.collector.acks_pending == 0
        await rig.stop()

    run(main())


def test_too_large_event_acknowledged_once_in_the_dead_letters(tmp_path: Path) -> None:
    sink = FakeSink()
    big = "x" * (260 * 1024)

    async def main() -> None:
        rig = Rig(tmp_path, sink)
        seen: list[list[str]] = []

        def check(name: str) -> None:
            seen.append([e for p in rig.dead.files() for e, _ in read_dead_letters(p)])

        rig.send(big, check=check)
        await until(lambda: len(rig.calls) == 1)
        assert seen == [[big]]
        await rig.stop()

    run(main())


def test_too_large_event_dropped_by_full_dead_letters_is_settled(tmp_path: Path) -> None:
    """Dead letters full: the event is dropped (counted, logged), which no resend can undo.
    Its waiter is settled, not lost: the sender would resend it forever (and a RELP session
    would hold every later answer behind it)."""
    sink = FakeSink()

    async def main() -> None:
        rig = Rig(tmp_path, sink, dead_max=1000)
        seen: list[int] = []
        rig.send("y" * (260 * 1024),
                 check=lambda name: seen.append(rig.counters.drop_reasons["dead_letter_full"]))
        rig.send("next")  # durable: answered as well
        await until(lambda: rig.calls == ["y" * (260 * 1024), "next"])
        assert seen == [1]  # settled once the drop was counted
        assert rig.lost == [] and rig.collector.acks_pending == 0
        assert any(e == "dead_letter_full" for e, _ in rig.log.lines)
        await rig.stop()

    run(main())


def test_event_refused_by_the_intake_with_dead_letters_full_is_settled(tmp_path: Path) -> None:
    """The spool refuses writes, so the batch goes from memory; the intake refuses it for good
    (400) and the dead letters are full: dropped, counted, and settled, not lost (a resend
    would be refused the same way)."""
    fs = DiskLog()
    sink = FakeSink(respond=lambda b: BAD_REQUEST)

    async def main() -> None:
        rig = Rig(tmp_path, sink, fs=fs, dead_max=100)
        fs.fail_writes = True
        rig.send("x" * 300)
        await until(lambda: rig.calls == ["x" * 300])
        assert rig.lost == [] and rig.collector.acks_pending == 0
        assert rig.counters.drop_reasons["dead_letter_full"] == 1
        await rig.stop()

    run(main())


def test_too_large_event_whose_dead_letter_write_fails_is_settled(tmp_path: Path) -> None:
    sink = FakeSink()

    async def main() -> None:
        rig = Rig(tmp_path, sink)

        def fail(*a: Any, **kw: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        rig.dead.write = fail  # type: ignore[method-assign]
        rig.send("w" * (260 * 1024))
        await until(lambda: len(rig.calls) == 1)
        assert rig.counters.drop_reasons["dead_letter_failed"] == 1
        assert rig.lost == [] and rig.collector.acks_pending == 0
        await rig.stop()

    run(main())


def test_413_split_acknowledged_once_after_both_halves(tmp_path: Path) -> None:
    second_half = asyncio.Event()

    def respond(b: Any) -> Any:
        return TOO_LARGE if len(b) > 1 else OK

    sink = FakeSink(respond=respond)

    async def gated_send(batch: Any) -> Any:
        if batch.events() == ["m2"]:
            await second_half.wait()
        return await FakeSink.send(sink, batch)

    sink.send = gated_send  # type: ignore[method-assign]

    async def main() -> None:
        rig = Rig(tmp_path, sink, spool=False, idle_flush=5.0)
        rig.send("m1")
        rig.send("m2")
        rig.collector.flush()  # one batch of two: 413, then each half
        await until(lambda: sink.accepted == ["m1"])
        await asyncio.sleep(0.05)
        assert rig.calls == []  # m1 delivered, but its batch is not whole yet
        second_half.set()
        await until(lambda: rig.calls == ["m1", "m2"])
        await asyncio.sleep(0.05)
        assert rig.calls == ["m1", "m2"] and sink.accepted == ["m1", "m2"]
        await rig.stop()

    run(main())


def test_spool_refusing_writes_acknowledged_on_delivery_from_memory(tmp_path: Path) -> None:
    fs = DiskLog()
    sink = FakeSink()
    sink.gate = asyncio.Event()

    async def main() -> None:
        rig = Rig(tmp_path, sink, fs=fs)
        fs.fail_writes = True
        rig.send("m1")
        await until(lambda: rig.counters.spool.write_errors >= 1 and sink.attempts == [["m1"]])
        assert rig.calls == []
        sink.gate.set()
        await until(lambda: rig.calls == ["m1"])
        await rig.stop()

    run(main())


# -- what is lost is never acknowledged ---------------------------------------------------------


def test_batch_never_spooled_is_never_acknowledged(tmp_path: Path) -> None:
    """Disk failing and intake down: nothing durable, nothing acknowledged, even at stop."""
    fs = DiskLog()
    sink = FakeSink(respond=lambda b: UNAVAILABLE)

    async def main() -> None:
        rig = Rig(tmp_path, sink, fs=fs)
        fs.fail_writes = True
        rig.send("m1")
        await until(lambda: rig.counters.spool.write_errors >= 1 and len(sink.attempts) >= 2)
        assert rig.calls == []
        assert rig.lost == []  # not lost yet: the intake may come back
        assert await rig.stop() == (0, 1)  # the shutdown append fails too: lost
        assert rig.calls == [] and rig.collector.acks_pending == 0
        assert rig.lost == ["m1"]  # the source is told (RELP aborts the session)

    run(main())


def test_open_batch_at_a_crash_or_a_dry_run_stop_is_never_acknowledged(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate = asyncio.Event()

    async def main() -> None:
        rig = Rig(tmp_path, sink, spool=False)
        rig.send("in flight")
        await until(lambda: sink.attempts == [["in flight"]])
        rig.collector.max_delay = rig.collector.idle_flush = 30.0
        rig.send("still open")  # a crash now: both only in memory
        assert await rig.stop() == (0, 1)
        assert rig.calls == [] and rig.collector.acks_pending == 1  # the open one never ends

    run(main())


def test_clean_shutdown_acknowledges_what_reaches_the_spool(tmp_path: Path) -> None:
    sink = FakeSink()
    sink.gate = asyncio.Event()

    async def main() -> None:
        rig = Rig(tmp_path, sink, idle_flush=30.0)
        rig.send("last")
        rig.collector.flush()  # what Daemon.shutdown does; then delivery stops at once
        assert await rig.stop() == (1, 0)
        assert rig.calls == ["last"]
        again = Spool(tmp_path / "spool")
        again.open()
        got = again.next_batch()
        assert got is not None and got[1].events() == ["last"]
        again.close()

    run(main())


# -- latency -----------------------------------------------------------------------------------


def test_latency_bounded_by_max_delay_under_steady_input(tmp_path: Path) -> None:
    sink = FakeSink()
    max_delay = 0.3

    async def main() -> None:
        rig = Rig(tmp_path, sink, max_delay=max_delay, idle_flush=max_delay)
        sent: dict[str, float] = {}
        acked: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        rig.calls = _Stamped(acked, loop)  # type: ignore[assignment]
        for i in range(80):  # a message every 15 ms (1.2 s): the batch never idles
            sent[rig.send(f"m{i}")] = loop.time()
            await asyncio.sleep(0.015)
        await until(lambda: len(acked) == 80)
        worst = max(acked[k] - sent[k] for k in sent)
        assert worst <= max_delay + 0.45, worst  # max_delay + one fsync (and CI's slack)
        assert rig.counters.spool.appended_batches >= 2  # closed by age, not at the end
        await rig.stop()

    run(main())


def test_steady_tcp_traffic_does_not_hold_back_a_waiting_message(tmp_path: Path) -> None:
    """The open batch carries waiters: no RELP message for idle_flush closes it, TCP or not."""
    sink = FakeSink()

    async def main() -> None:
        rig = Rig(tmp_path, sink, max_delay=10.0, idle_flush=0.05)
        loop = asyncio.get_running_loop()
        tcp = new_reader(ProgramFilter(["haproxy"]), 1 << 20)
        t0 = loop.time()
        rig.send("relp")
        acked_at: list[float] = []
        rig.calls = _Stamped({}, loop, acked_at)  # type: ignore[assignment]
        for i in range(60):
            rig.collector.take(tcp.feed(frame(f"tcp {i}"), TS))
            await asyncio.sleep(0.01)
            if acked_at:
                break
        assert acked_at and acked_at[0] - t0 < 1.0
        await rig.stop()

    run(main())


class _Stamped(list[str]):
    """A `calls` list that also notes when each callback ran (loop time)."""

    def __init__(self, into: dict[str, float], loop: asyncio.AbstractEventLoop,
                 times: list[float] | None = None) -> None:
        super().__init__()
        self.into, self.loop, self.times = into, loop, times

    def append(self, name: str) -> None:
        super().append(name)
        self.into[name] = self.loop.time()
        if self.times is not None:
            self.times.append(self.loop.time())


def test_router_queues_the_take_s_batches_for_the_spool_behind_older_ones() -> None:
    """What the collector hands over for a take that closed b and c (each given the take's
    waiter before it is submitted) goes to the spool queue at once, behind the older memory
    batch, which is written first; the waiter is released once both are on disk."""
    pressure: list[bool] = []
    router = Router(now=lambda: 0.0, spool_ready=lambda: False, write_ahead=False,
                    max_in_flight=100, on_pressure=pressure.append)
    gauge = AckGauge()
    a, b, c = (Batch.from_events([t], [TS]) for t in "abc")
    router.submit(a)  # a healthy intake: in memory
    fired: list[str] = []
    w = Waiter(lambda: fired.append("w"), gauge)
    for batch in (b, c):
        w.hold()
        batch.acks = [w]
        router.submit(batch)
    assert [e.batch for e in router.memory] == [a]
    assert [e.batch for e in router.to_spool] == [b, c]
    w.release()  # its creator's hold
    # Disk order is submission order: the older batch still in memory is written first.
    older = router.next_write()
    assert older is not None and older.batch is a and older.acks is None
    router.written(older)
    for _ in range(2):
        entry = router.next_write()
        assert entry is not None and entry.acks == [w]
        router.written(entry)
        assert fired == []
        durable(entry)
    assert fired == ["w"] and gauge.pending == 0


def test_a_lost_waiter_calls_on_lost_at_once_and_once() -> None:
    """A place whose events were lost gives up the waiter: never acknowledged rather than
    acknowledged wrongly; what its other holders do later changes nothing."""
    gauge = AckGauge()
    fired: list[str] = []
    lost_one = Waiter(lambda: fired.append("called"), gauge, lambda: fired.append("lost"))
    lost_one.hold()  # a second place holds it
    lost_one.lose()
    assert fired == ["lost"] and gauge.pending == 0  # on_lost at once, exactly once
    lost_one.release()
    lost_one.release()
    lost_one.lose()
    assert fired == ["lost"] and gauge.pending == 0


def test_one_take_across_a_closed_batch_and_a_dead_letter(tmp_path: Path) -> None:
    sink = FakeSink()
    big = "z" * (260 * 1024)

    async def main() -> None:
        rig = Rig(tmp_path, sink, max_events=1)
        seen: list[tuple[int, list[str]]] = []

        def check(name: str) -> None:
            seen.append((rig.counters.spool.appended_events,
                         [e for p in rig.dead.files() for e, _ in read_dead_letters(p)]))

        rig.send("small", big, check=check)
        await until(lambda: len(rig.calls) == 1)
        assert seen == [(1, [big])]
        await rig.stop()

    run(main())


def test_relp_message_refused_once_the_dead_letters_were_replayed_is_dead_lettered(
    tmp_path: Path,
) -> None:
    """Issue 17: the dead letters were full, then `spool replay-dead-letter` moved the files
    away. A RELP message the intake refuses (400) is dead-lettered into the emptied folder, not
    dropped as dead_letter_full on a stale count ("answered, dropped, counted" is for a store
    really full)."""
    sink = FakeSink(respond=lambda b: BAD_REQUEST)
    first, second = "first " + "x" * 600, "second " + "y" * 600

    async def main() -> None:
        rig = Rig(tmp_path, sink, dead_max=1500)  # room for one of them, not two
        rig.send(first)
        await until(lambda: rig.counters.dead_lettered_events == 1)
        assert [e for p in rig.dead.files() for e, _ in read_dead_letters(p)] == [first]
        requeue = tmp_path / "requeue"
        requeue.mkdir()
        for p in rig.dead.files():  # what `spool replay-dead-letter` does
            p.rename(requeue / f"{p.stem}-1.jsonl")
        rig.send(second)
        await until(lambda: rig.calls == [first, second])
        await until(lambda: rig.counters.dead_lettered_events == 2)
        assert [e for p in rig.dead.files() for e, _ in read_dead_letters(p)] == [second]
        assert rig.counters.drop_reasons["dead_letter_full"] == 0
        assert rig.counters.dropped_events == 0
        assert not any(e == "dead_letter_full" for e, _ in rig.log.lines)
        assert rig.lost == [] and rig.collector.acks_pending == 0
        await rig.stop()

    run(main())
