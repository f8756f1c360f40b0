"""The collector in-process: reader results become batches, closed by count, by age
(batch.max_delay) or when input pauses (IDLE_FLUSH), in order, too-large events apart."""

from __future__ import annotations

import asyncio

from haproxy_forwarder.batching import Batch, Batcher
from haproxy_forwarder.collector import IDLE_FLUSH, Collector
from haproxy_forwarder.ingest import ProgramFilter, new_reader
from haproxy_forwarder.observability.counters import Counters

TS = b"2026-12-01T00:00:00.000Z"


class FakeDelivery:
    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.dead: list[tuple[Batch, str]] = []

    def submit(self, batch: Batch) -> None:
        self.batches.append(batch)

    def dead_letter(self, batch: Batch, reason: str) -> None:
        self.dead.append((batch, reason))


def frame(i: int) -> bytes:
    msg = b"<134>Dec  1 00:00:00 lb1 haproxy[1]: event %d" % i
    return b"%d %s" % (len(msg), msg)


def make(max_events: int = 1000, max_delay: float = 1.0) -> tuple[Collector, FakeDelivery]:
    d = FakeDelivery()
    return Collector(Batcher(max_events, 1 << 20), d, Counters(), max_delay), d


def texts(batches: list[Batch]) -> list[str]:
    return [e for b in batches for e in b.events()]


def test_a_pause_in_input_closes_the_batch_before_max_delay() -> None:
    async def run() -> list[Batch]:
        col, d = make(max_delay=30.0)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        col.take(reader.feed(b"".join(frame(i) for i in range(10)), TS))
        assert d.batches == []  # not at once: more may follow in the next read
        await asyncio.sleep(IDLE_FLUSH * 6)
        return d.batches

    batches = asyncio.run(run())
    assert texts(batches) == [f"event {i}" for i in range(10)] and len(batches) == 1


def test_steady_input_fills_batches_up_to_max_delay() -> None:
    async def run() -> tuple[list[Batch], int]:
        col, d = make(max_delay=0.4)
        reader = new_reader(ProgramFilter(["haproxy"]), 65536)
        n = 0
        for _ in range(60):  # 0.6 s of reads every 10 ms, never a pause of IDLE_FLUSH
            col.take(reader.feed(frame(n) + frame(n + 1), TS))
            n += 2
            await asyncio.sleep(0.01)
        during = len(d.batches)
        await asyncio.sleep(IDLE_FLUSH * 6)
        return d.batches, during

    batches, during = asyncio.run(run())
    assert texts(batches) == [f"event {i}" for i in range(120)]
    # The age limit closed one batch while input kept coming; the pause at the end the other.
    assert during >= 1 and len(batches) >= 2
    assert len(batches[0]) > 20  # not closed by a pause: there was none


def test_count_limit_and_too_large_events() -> None:
    async def run() -> FakeDelivery:
        col, d = make(max_events=4)
        reader = new_reader(ProgramFilter(["haproxy"]), 1 << 20)
        big = b"<134>Dec  1 00:00:00 lb1 haproxy[1]: " + b"x" * 300_000
        stream = b"".join(frame(i) for i in range(9)) + b"%d %s" % (len(big), big)
        col.take(reader.feed(stream, TS))
        await asyncio.sleep(IDLE_FLUSH * 6)
        return d

    d = asyncio.run(run())
    assert [len(b) for b in d.batches] == [4, 4, 1]
    assert texts(d.batches) == [f"event {i}" for i in range(9)]
    [(dead, reason)] = d.dead
    assert len(dead) == 1 and "250 KiB" in reason
