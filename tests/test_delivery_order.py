"""With one worker, batches reach the intake in the order submitted, also across a crash or a
restart (issue 17, 4b): the spool replays in append order, so the appends keep that order.

Before anything is written to the spool, every older batch still only in memory goes first:
the batch a worker is sending is claimed (on disk, not handed out again) before the newer
batches the ager spills or a RELP batch written ahead. What is checked: the spool's records in
append order (what a crash replays, and what a stop appends behind), and what the intake took.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from haproxy_forwarder.acks import AckGauge, Waiter
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.delivery import SPILL_AFTER, Delivery
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.spool import AppendResult, RecordTooLarge
from tests.test_delivery import (
    OK,
    UNAVAILABLE,
    Clock,
    FakeSink,
    FakeSpool,
    Log,
    events,
    until,
    with_delivery,
)


class SlowClaims(FakeSpool):
    """Claims wait in the append thread until `release` is set (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.claims_started = 0

    def append(self, batch: Batch, claim: bool = False) -> AppendResult:
        if claim:
            self.claims_started += 1
            self.release.wait(10)
        return super().append(batch, claim)


def spilled_behind_one_on_the_wire(clock: Clock, sink: FakeSink, d: Delivery) -> asyncio.Event:
    """Batch 0 on the wire (held by the only worker), 1 and 2 spilled after SPILL_AFTER."""
    gate = sink.gate = asyncio.Event()
    d.submit(events(0, 1))
    d.submit(events(1, 1))
    d.submit(events(2, 1))
    clock.t += SPILL_AFTER + 0.1
    return gate


def test_a_spill_claims_the_batch_on_the_wire_first_so_a_crash_replays_in_order(
        tmp_path: Path) -> None:
    """The machine's first crash example: 0 on the wire, 1 and 2 spilled; 0's request fails,
    it was claimed then, behind them: a crash replayed 1, 2, 0."""
    clock, spool = Clock(), FakeSpool()
    sink = FakeSink(script=[UNAVAILABLE])
    at_retry: list[list[str]] = []
    # The second attempt is 0's retry: what the spool held while it waited for it.
    sink.before_send = lambda b: (at_retry.append(spool.events()) if len(sink.attempts) == 1
                                  else None)

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        gate = spilled_behind_one_on_the_wire(clock, sink, d)
        await until(lambda: "event 2" in spool.events())
        assert spool.ops == [("claim", ["event 0"]), ("append", ["event 1"]),
                             ("append", ["event 2"])]
        gate.set()  # 0 fails (503): already on disk, not claimed again; retried
        await until(lambda: len(sink.accepted) == 3 and not spool.records)
        # A crash while 0 waited for its retry would have replayed 0, 1, 2.
        assert at_retry == [["event 0", "event 1", "event 2"]]
        assert sink.accepted == ["event 0", "event 1", "event 2"]
        assert [op for op, _ in spool.ops].count("claim") == 1
        await d.stop()

    with_delivery(tmp_path, sink, spool, body, clock=clock)


def test_a_batch_on_the_wire_at_a_stop_is_replayed_before_the_ones_spilled_after_it(
        tmp_path: Path) -> None:
    """The machine's first find: 0 on the wire, 1 and 2 spilled during the drain; the stop
    appended 0 behind them."""
    clock, sink, spool = Clock(), FakeSink(), FakeSpool()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        spilled_behind_one_on_the_wire(clock, sink, d)
        await until(lambda: "event 2" in spool.events())
        assert not await d.drain(0.05)  # 0's request never ends
        spooled, lost = await d.stop()
        assert (spooled, lost) == (0, 0)  # on disk already (claimed), not written twice
        assert c.uncertain_deliveries == 1  # cut mid-request: the intake may have it
        assert spool.events() == ["event 0", "event 1", "event 2"]  # the next start's order

    with_delivery(tmp_path, sink, spool, body, clock=clock)


def test_a_relp_batch_written_ahead_takes_the_older_ones_to_disk_first(tmp_path: Path) -> None:
    """The machine's RELP example: 0 on the wire, 1 in memory, 2 (RELP) written ahead at once;
    0 failed, 1 followed to the spool behind 2, and 2 was sent before 1."""
    sink, spool, gauge = FakeSink(script=[UNAVAILABLE]), FakeSpool(), AckGauge()
    acked_with: list[list[str]] = []

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        gate = sink.gate = asyncio.Event()
        d.submit(events(0, 1))
        await until(lambda: len(sink.attempts) == 1)
        d.submit(events(1, 1))
        relp = events(2, 1)
        w = Waiter(lambda: acked_with.append(spool.events()), gauge)
        w.hold()
        relp.acks = [w]
        d.submit(relp)
        w.release()  # the creator's hold
        await until(lambda: bool(acked_with))
        # Answered once it is fsync'd, and everything older is on disk ahead of it.
        assert acked_with == [["event 0", "event 1", "event 2"]]
        assert [op for op, _ in spool.ops] == ["claim", "append", "append"]
        gate.set()  # 0: 503, retried, then 1 and 2 from the spool
        await until(lambda: len(sink.accepted) == 3 and not spool.records)
        assert sink.accepted == ["event 0", "event 1", "event 2"]
        await d.stop()

    with_delivery(tmp_path, sink, spool, body)


def test_a_claim_that_lands_after_its_batch_was_delivered_is_acked(tmp_path: Path) -> None:
    """The writer's claim of a batch on the wire is slow; the intake takes the batch first:
    the record is acked as soon as it exists, not replayed after a restart."""
    clock, sink, spool = Clock(), FakeSink(), SlowClaims()

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        gate = spilled_behind_one_on_the_wire(clock, sink, d)
        await until(lambda: spool.claims_started == 1)
        gate.set()
        await until(lambda: sink.accepted == ["event 0"])
        spool.release.set()
        await until(lambda: len(sink.accepted) == 3 and not spool.records)
        assert sink.accepted == ["event 0", "event 1", "event 2"]
        assert [op for op, _ in spool.ops] == ["claim", "append", "append"]
        assert c.delivered_events == 3 and not log.named("delivery_bug")
        await d.stop()
        assert not spool.records  # nothing for the next start to send again

    with_delivery(tmp_path, sink, spool, body, clock=clock)


def test_a_failure_during_the_writer_s_claim_does_not_write_the_batch_twice(
        tmp_path: Path) -> None:
    """The worker's own claim at the first failure waits for the writer's, already running."""
    clock, spool = Clock(), SlowClaims()
    sink = FakeSink(script=[UNAVAILABLE, OK])

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        gate = spilled_behind_one_on_the_wire(clock, sink, d)
        await until(lambda: spool.claims_started == 1)
        gate.set()  # 0 fails while its claim is being written
        await until(lambda: len(sink.attempts) >= 1 and d.router.failing)
        spool.release.set()
        await until(lambda: len(sink.accepted) == 3 and not spool.records)
        assert spool.claims_started == 1
        assert spool.ops == [("claim", ["event 0"]), ("append", ["event 1"]),
                             ("append", ["event 2"])]
        assert sink.accepted == ["event 0", "event 1", "event 2"]
        await d.stop()

    with_delivery(tmp_path, sink, spool, body, clock=clock)


class SmallSpool(FakeSpool):
    """A spool smaller than any batch of over two events (RecordTooLarge)."""

    def append(self, batch: Batch, claim: bool = False) -> AppendResult:
        if len(batch) > 2:
            raise RecordTooLarge("larger than the whole spool")
        return super().append(batch, claim)


def test_a_batch_too_large_for_the_spool_goes_in_halves_behind_the_older_records(
        tmp_path: Path) -> None:
    """The machine's example: records 0 and 1 on the spool, a batch of 3 events too large for
    it was kept in memory, and workers take memory first: it overtook them."""
    sink, spool, gauge = FakeSink(), SmallSpool(), AckGauge()
    spool.append(events(0, 1))
    spool.append(events(1, 1))
    acked_with: list[list[str]] = []

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        gate = sink.gate = asyncio.Event()
        await until(lambda: sink.attempts == [["event 0"]])  # record 0 on the wire
        big = events(2, 3)
        w = Waiter(lambda: acked_with.append(spool.events()), gauge)
        w.hold()
        big.acks = [w]  # (RELP: answered once every event of it is fsync'd)
        d.submit(big)
        w.release()
        await until(lambda: bool(acked_with))
        assert acked_with == [[f"event {i}" for i in range(5)]]
        assert [b for _, b in spool.ops[2:]] == [["event 2"], ["event 3", "event 4"]]
        gate.set()
        await until(lambda: len(sink.accepted) == 5 and not spool.records)
        assert sink.accepted == [f"event {i}" for i in range(5)]
        assert gauge.pending == 0 and not log.named("delivery_bug")
        await d.stop()

    with_delivery(tmp_path, sink, spool, body)


def test_a_relp_batch_the_writer_claimed_is_answered_at_its_next_failure(tmp_path: Path) -> None:
    """A RELP batch the full disk refused is sent from memory; the disk takes writes again and
    the writer claims it (it is older than the next RELP batch): it is on disk, so its sender
    may be answered when its request fails, as after a worker's own claim."""
    sink, spool, gauge = FakeSink(respond=lambda b: UNAVAILABLE), FakeSpool(), AckGauge()
    answered: list[str] = []

    def relp(first: int) -> Batch:
        b = events(first, 1)
        w = Waiter(lambda: answered.append(f"event {first}"), gauge)
        w.hold()
        b.acks = [w]
        w.release()  # (the creator's hold; the batch's own is handed to the router)
        return b

    async def body(d: Delivery, c: Counters, log: Log, _: list[bool]) -> None:
        gate = sink.gate = asyncio.Event()
        spool.full = True
        d.submit(relp(0))
        await until(lambda: sink.attempts == [["event 0"]])  # refused by the disk: from memory
        spool.full = False
        d.submit(relp(1))  # queued for the disk: the writer claims 0 first, then writes 1
        # (Answered from the append's done-callback, on the loop: after the spool has it.)
        await until(lambda: bool(answered))
        assert [op for op, _ in spool.ops] == ["claim", "append"]
        assert answered == ["event 1"] and "event 1" in spool.events()
        gate.set()  # 0 fails: already on disk
        await until(lambda: len(sink.attempts) >= 3)
        assert answered == ["event 1", "event 0"]
        await d.stop()

    with_delivery(tmp_path, sink, spool, body)
