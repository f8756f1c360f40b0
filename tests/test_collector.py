"""The collector in-process, on a virtual clock (tests/vclock.py): reader results become
batches, closed by count, by age (batch.max_delay) or when input pauses (idle_flush), in
order, too-large events apart; a take's acknowledgement rides on the batches holding its
events (and on its dead-letter writes), given to each before delivery has it.

Time is the loop's: a read every 13 ms is exactly that, so a batch closes when its timer says,
never a sleep that stretched later.
"""

from __future__ import annotations

import asyncio

import pytest

from haproxy_forwarder.acks import Ack, Waiter, release_all
from haproxy_forwarder.batching import Batch, Batcher
from haproxy_forwarder.collector import IDLE_FLUSH, Collector
from haproxy_forwarder.config import BatchConfig
from haproxy_forwarder.ingest import ProgramFilter, new_reader
from haproxy_forwarder.observability.counters import Counters
from tests import vclock

TS = b"2026-12-01T00:00:00.000Z"
BIG = b"<134>Dec  1 00:00:00 lb1 haproxy[1]: " + b"x" * 300_000  # over the intake's limit


class FakeDelivery:
    """Records what it is handed, when (loop time), and the waiters each batch carried then."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.closed_at: list[float] = []
        self.acks: list[list[Waiter]] = []  # Batch.acks of each batch when it was submitted
        self.dead: list[tuple[Batch, str]] = []
        self.dead_futures: list[asyncio.Future[bool]] | None = None  # None: no future

    def submit(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.closed_at.append(asyncio.get_running_loop().time())
        self.acks.append(list(batch.acks or ()))

    def dead_letter(self, batch: Batch, reason: str) -> asyncio.Future[bool] | None:
        self.dead.append((batch, reason))
        if self.dead_futures is None:
            return None
        fut = asyncio.get_running_loop().create_future()
        self.dead_futures.append(fut)
        return fut


def frame(i: int) -> bytes:
    msg = b"<134>Dec  1 00:00:00 lb1 haproxy[1]: event %d" % i
    return b"%d %s" % (len(msg), msg)


def make(max_events: int = 1000, max_delay: float = 1.0,
         idle_flush: float = IDLE_FLUSH) -> tuple[Collector, FakeDelivery]:
    d = FakeDelivery()
    return Collector(Batcher(max_events, 1 << 20), d, Counters(), max_delay, idle_flush), d


def texts(batches: list[Batch]) -> list[str]:
    return [e for b in batches for e in b.events()]


def first_event(batch: Batch) -> int:
    return int(batch.events()[0].split()[1])


class Calls:
    """An Ack whose callbacks note what ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def ack(self, name: str) -> Ack:
        return Ack(lambda: self.calls.append(name), lambda: self.calls.append(f"lost {name}"))


# -- closed by age, by a pause, by count ------------------------------------------------------


def test_a_pause_in_input_closes_the_batch_after_idle_flush_not_before() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        col, d = make(max_delay=30.0)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        t0 = loop.time()
        col.take(reader.feed(b"".join(frame(i) for i in range(10)), TS))
        assert d.batches == []  # not at once: more may follow in the next read
        await asyncio.sleep(IDLE_FLUSH * 0.99)
        assert d.batches == []
        await asyncio.sleep(IDLE_FLUSH * 10)
        assert texts(d.batches) == [f"event {i}" for i in range(10)] and len(d.batches) == 1
        assert d.closed_at[0] - t0 == pytest.approx(IDLE_FLUSH, abs=1e-9)

    vclock.run(main())


def test_the_last_read_restarts_the_pause() -> None:
    """Idle means no event for idle_flush: a read 40 ms after the first pushes the close to
    40 + 50 ms, one timer re-arming itself, not one per read."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        col, d = make(max_delay=30.0)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        t0 = loop.time()
        col.take(reader.feed(frame(0), TS))
        await asyncio.sleep(0.04)
        col.take(reader.feed(frame(1), TS))
        await asyncio.sleep(1.0)
        assert texts(d.batches) == ["event 0", "event 1"]
        assert d.closed_at[0] - t0 == pytest.approx(0.04 + IDLE_FLUSH, abs=1e-9)

    vclock.run(main())


@pytest.mark.parametrize("period", [0.001, 0.013, 0.049])
def test_steady_input_closes_batches_at_max_delay_never_early_or_late(period: float) -> None:
    """Reads closer together than idle_flush: no pause ever closes the batch; each closes
    max_delay after its first event, the last one idle_flush after the last read."""
    max_delay = 0.4
    took: dict[int, float] = {}  # event -> loop time of its read

    async def main() -> FakeDelivery:
        loop = asyncio.get_running_loop()
        col, d = make(max_delay=max_delay)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        n = 0
        start = loop.time()
        while loop.time() - start < 1.5:
            col.take(reader.feed(frame(n) + frame(n + 1), TS))
            took[n] = took[n + 1] = loop.time()
            n += 2
            await asyncio.sleep(period)
        await asyncio.sleep(1.0)
        assert texts(d.batches) == [f"event {i}" for i in range(n)]
        return d

    d = vclock.run(main())
    *aged, last = d.batches
    assert len(aged) >= 3  # 1.5 s of input: three by age, then the end of it
    for batch, at in zip(aged, d.closed_at, strict=False):
        assert at - took[first_event(batch)] == pytest.approx(max_delay, abs=1e-9)
    assert d.closed_at[-1] - max(took.values()) == pytest.approx(IDLE_FLUSH, abs=1e-9)
    assert d.closed_at[-1] - took[first_event(last)] <= max_delay + 1e-9


def test_a_batch_opened_by_a_count_close_ages_from_its_own_first_event() -> None:
    """A read that fills the open batch and leaves events in a new one: the new batch closes
    max_delay after that read, not after the first event of the batch it closed."""
    max_delay = 0.4

    async def main() -> tuple[float, FakeDelivery]:
        loop = asyncio.get_running_loop()
        col, d = make(max_events=40, max_delay=max_delay)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        for i in range(10):  # a read every 13 ms: no pause
            col.take(reader.feed(frame(i), TS))
            await asyncio.sleep(0.013)
        opened = loop.time()
        col.take(reader.feed(b"".join(frame(i) for i in range(10, 45)), TS))  # 40 + 5
        assert [len(b) for b in d.batches] == [40]
        for i in range(45, 100):
            await asyncio.sleep(0.013)
            col.take(reader.feed(frame(i), TS))
            if len(d.batches) > 1:
                break
        return opened, d

    opened, d = vclock.run(main())
    assert [first_event(b) for b in d.batches] == [0, 40] and len(d.batches[1]) < 40
    assert d.closed_at[1] - opened == pytest.approx(max_delay, abs=1e-9)


def test_count_limit_and_too_large_events() -> None:
    async def main() -> FakeDelivery:
        col, d = make(max_events=4)
        reader = new_reader(ProgramFilter(["haproxy"]), 1 << 20)
        stream = b"".join(frame(i) for i in range(9)) + b"%d %s" % (len(BIG), BIG)
        col.take(reader.feed(stream, TS))
        assert [len(b) for b in d.batches] == [4, 4]  # closed by count: handed over at once
        await asyncio.sleep(IDLE_FLUSH)
        return d

    d = vclock.run(main())
    assert [len(b) for b in d.batches] == [4, 4, 1]
    assert texts(d.batches) == [f"event {i}" for i in range(9)]
    [(dead, reason)] = d.dead
    assert len(dead) == 1 and "250 KiB" in reason


def test_reconfigure_closes_the_open_batch_under_the_old_limits_then_applies_the_new() -> None:
    async def main() -> None:
        col, d = make(max_events=10, max_delay=1.0)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        col.take(reader.feed(b"".join(frame(i) for i in range(5)), TS))
        col.reconfigure(BatchConfig(max_events=2, max_bytes=2048, max_delay=0.2,
                                    idle_flush=0.5))
        assert [len(b) for b in d.batches] == [5]  # over the new max_events, closed first
        assert (col.batcher.max_events, col.batcher.max_bytes) == (2, 2048)
        assert (col.max_delay, col.idle_flush) == (0.2, 0.2)  # idle_flush <= max_delay
        col.take(reader.feed(b"".join(frame(i) for i in range(5, 8)), TS))
        assert [len(b) for b in d.batches] == [5, 2]
        await asyncio.sleep(1.0)
        assert [len(b) for b in d.batches] == [5, 2, 1]
        col.reconfigure(BatchConfig(max_delay=5.0, idle_flush=0.01))
        assert (col.max_delay, col.idle_flush) == (5.0, 0.01)

    vclock.run(main())
    col, _ = make(max_delay=0.2, idle_flush=0.5)  # the constructor's rule is the same
    assert (col.max_delay, col.idle_flush) == (0.2, 0.2)


# -- acknowledgements ---------------------------------------------------------------------------


def test_a_take_s_ack_is_on_every_batch_holding_its_events_before_delivery_has_it() -> None:
    async def main() -> None:
        col, d = make(max_events=2)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        calls = Calls()
        col.take(reader.feed(frame(0), TS), calls.ack("first"))  # in the open batch
        col.take(reader.feed(frame(1) + frame(2) + frame(3), TS), calls.ack("second"))
        # [0, 1] closed by the second take: both waiters were on it when it was submitted.
        [_, w2] = d.acks[0]
        assert [len(b) for b in d.batches] == [2, 2] and d.acks[1] == [w2]
        assert col.batcher.current.acks is None  # nothing of either is open
        assert col.acks_pending == 2 and calls.calls == []
        release_all(d.acks[0])  # delivery: [0, 1] durable
        assert calls.calls == ["first"] and col.acks_pending == 1
        release_all(d.acks[1])
        assert calls.calls == ["first", "second"] and col.acks_pending == 0

    vclock.run(main())


def test_the_open_batch_holds_the_ack_of_the_take_that_left_events_in_it() -> None:
    async def main() -> None:
        col, d = make(max_events=2)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        calls = Calls()
        col.take(reader.feed(frame(0) + frame(1) + frame(2), TS), calls.ack("take"))
        [w] = d.acks[0]
        assert col.batcher.current.acks == [w]
        release_all(d.acks[0])
        assert calls.calls == []  # event 2 is only in the open batch
        col.flush()
        assert d.acks[1] == [w] and calls.calls == []
        release_all(d.acks[1])
        assert calls.calls == ["take"]

    vclock.run(main())


def test_a_take_with_no_event_is_acknowledged_at_once() -> None:
    async def main() -> None:
        col, d = make()
        calls = Calls()
        col.take(new_reader(ProgramFilter(["sshd"]), 65536).feed(frame(0), TS),
                 calls.ack("filtered"))
        assert calls.calls == ["filtered"]  # synchronously
        assert col.counters.filtered_out == 1 and col.acks_pending == 0 and d.batches == []

    vclock.run(main())


def test_too_large_events_hold_the_ack_until_their_dead_letters_are_settled() -> None:
    async def main() -> None:
        col, d = make()
        d.dead_futures = []
        reader = new_reader(ProgramFilter(["haproxy"]), 1 << 20)
        calls = Calls()
        both = b"%d %s" % (len(BIG), BIG) + b"%d %s" % (len(BIG), BIG)
        col.take(reader.feed(both, TS), calls.ack("written"))
        col.take(reader.feed(b"%d %s" % (len(BIG), BIG), TS), calls.ack("failed"))
        written, dropped, failed = d.dead_futures
        written.set_result(True)
        await asyncio.sleep(0)
        assert calls.calls == []  # the second of its events is not settled yet
        dropped.set_result(False)  # dead letters full: dropped and counted, settled
        await asyncio.sleep(0)
        assert calls.calls == ["written"]
        failed.set_exception(RuntimeError("never expected"))
        await asyncio.sleep(0)
        assert calls.calls == ["written", "lost failed"] and col.acks_pending == 0

    vclock.run(main())


def test_a_delivery_that_cannot_tell_when_a_dead_letter_is_on_disk_loses_the_ack() -> None:
    async def main() -> None:
        col, d = make()
        reader = new_reader(ProgramFilter(["haproxy"]), 1 << 20)
        calls = Calls()
        col.take(reader.feed(frame(0) + b"%d %s" % (len(BIG), BIG), TS), calls.ack("take"))
        assert calls.calls == ["lost take"] and col.acks_pending == 0
        col.flush()
        release_all(d.acks[0])  # its batch settles later: nothing more
        assert calls.calls == ["lost take"]

    vclock.run(main())


def test_a_batch_with_acks_closes_idle_flush_after_their_last_take_despite_other_input() -> None:
    """Steady TCP input every 10 ms would keep the batch open up to max_delay; a RELP sender
    waits for its answer: idle_flush after its message, the batch closes."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        col, d = make(max_delay=10.0)
        tcp = new_reader(ProgramFilter(["haproxy"]), 65536)
        relp = new_reader(ProgramFilter(["haproxy"]), 65536)
        calls = Calls()
        col.take(tcp.feed(frame(0), TS))
        await asyncio.sleep(0.01)
        acked_at = loop.time()
        col.take(relp.feed(frame(1), TS), calls.ack("relp"))
        for i in range(2, 30):
            await asyncio.sleep(0.01)
            col.take(tcp.feed(frame(i), TS))
            if d.batches:
                break
        assert d.closed_at[0] - acked_at == pytest.approx(IDLE_FLUSH, abs=1e-9)
        assert len(d.acks[0]) == 1

    vclock.run(main())
