"""The delivery router's guarantees, driven in-process with a fake clock and a fake spool queue.

No asyncio: every transition the writer and the workers would report is made by hand (or by a
seeded random walk), and the locations are checked after each one.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from haproxy_forwarder.acks import AckGauge, Waiter
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.delivery.router import (
    FROM_SPOOL,
    SPILL_AFTER,
    Entry,
    Location,
    Router,
    RouterError,
    durable,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Queue:
    """The spool's ready order and in-flight set, as the router sees them."""

    records: dict[int, tuple[Batch, bool]] = field(default_factory=dict)  # rid -> (batch, out)
    next_id: int = 1

    @property
    def has_ready(self) -> bool:
        return any(not out for _, out in self.records.values())

    def append(self, batch: Batch, claim: bool = False) -> int:
        rid = self.next_id
        self.next_id += 1
        self.records[rid] = (batch, claim)
        return rid

    def next_batch(self) -> tuple[int, Batch] | None:
        for rid, (batch, out) in self.records.items():
            if not out:
                self.records[rid] = (batch, True)
                return rid, batch
        return None

    def ack(self, rid: int) -> None:
        del self.records[rid]


def batch(n: int) -> Batch:
    return Batch.from_events([f"event {n}"], [b"2024-01-01T00:00:00Z"])


def ident(b: Batch) -> int:
    return int(b.events()[0].split()[1])


def make(
    *, spool: Queue | None = None, write_ahead: bool = False, max_in_flight: int = 100
) -> tuple[Router, Clock, list[bool]]:
    clock = Clock()
    pressure: list[bool] = []
    q = spool
    router = Router(
        now=clock,
        spool_ready=(lambda: q.has_ready) if q is not None else None,
        write_ahead=write_ahead,
        max_in_flight=max_in_flight,
        on_pressure=pressure.append,
    )
    return router, clock, pressure


def take_entry(router: Router, worker: int) -> Entry:
    got = router.take(worker)
    assert isinstance(got, Entry)
    return got


# -- where a submitted batch goes ---------------------------------------------------------------


def test_healthy_intake_and_empty_spool_keep_batches_in_memory() -> None:
    router, _, _ = make(spool=Queue())
    e = router.submit(batch(1))
    assert e.location is Location.MEMORY
    assert router.in_memory == 1 and router.next_write() is None


@pytest.mark.parametrize("why", ["write_ahead", "failing", "queued", "spooling", "ready"])
def test_batches_go_behind_what_is_on_disk_or_going_there(why: str) -> None:
    q = Queue()
    router, _, _ = make(spool=q, write_ahead=why == "write_ahead")
    if why == "failing":
        router.failing = True
    elif why in ("queued", "spooling"):
        router.failing = True
        router.submit(batch(0))
        router.failing = False
        if why == "spooling":
            assert router.next_write() is not None
    elif why == "ready":
        q.append(batch(0))
    e = router.submit(batch(1))
    assert e.location is Location.TO_SPOOL
    assert router.to_spool[-1] is e


def test_without_a_spool_everything_stays_in_memory() -> None:
    router, clock, _ = make(spool=None, write_ahead=True)
    router.failing = True
    e = router.submit(batch(1))
    assert e.location is Location.MEMORY
    clock.t += 10
    assert not router.spill()
    assert router.take(0) is None  # failing: only the retrying workers probe


# -- spill after 1 s ----------------------------------------------------------------------------


def test_spill_after_one_second_not_before_and_all_of_memory_in_order() -> None:
    router, clock, _ = make(spool=Queue())
    a = router.submit(batch(1))
    clock.t += 0.6
    b = router.submit(batch(2))
    clock.t += SPILL_AFTER - 0.6  # a waited exactly SPILL_AFTER: not yet
    assert not router.spill()
    assert [e.location for e in (a, b)] == [Location.MEMORY] * 2
    clock.t += 0.01
    assert router.spill()
    # b waited only 0.41 s but goes too, behind a: order is kept.
    assert list(router.to_spool) == [a, b]
    assert all(e.location is Location.TO_SPOOL for e in (a, b))
    c = router.submit(batch(3))
    assert c.location is Location.TO_SPOOL and list(router.to_spool) == [a, b, c]
    assert not router.spill()  # nothing left in memory


def test_writer_moves_queued_batches_to_the_spool_oldest_first() -> None:
    q = Queue()
    router, _, _ = make(spool=q, write_ahead=True)
    for i in range(3):
        router.submit(batch(i))
    order: list[int] = []
    while (e := router.next_write()) is not None:
        assert e.location.value == "spooling" and router.in_memory == 3 - len(order)
        with pytest.raises(RouterError):
            router.next_write()  # one append at a time
        q.append(e.batch)
        router.written(e)
        assert e.location is Location.SPOOLED
        order.append(ident(e.batch))
    assert order == [0, 1, 2] and router.in_memory == 0 and router.settled()


# -- claim before send: the failing batch is on disk before its retry wait ----------------------


def test_first_failure_claims_the_batch_and_queues_memory_ahead() -> None:
    q = Queue()
    router, _, _ = make(spool=q)
    a, b = router.submit(batch(1)), router.submit(batch(2))
    taken = take_entry(router, 0)
    assert taken is a and a.location is Location.SENDING and a.record is None
    router.failing = False
    claim = router.failed(0, a.batch)
    assert claim is a.batch  # to be appended with claim=True before waiting
    assert router.failing
    assert b.location is Location.TO_SPOOL and list(router.to_spool) == [b]
    # Until the claim lands, the failing batch exists only in memory.
    assert a in router.memory_only() and not router.settled()
    rid = q.append(claim, claim=True)
    router.claimed(a, rid)
    assert a.record == rid and a not in router.memory_only()
    assert not q.has_ready  # claimed: the spool will not hand it out
    # The next failure needs no claim: the record is on disk until acked.
    assert router.failed(0, a.batch) is None
    with pytest.raises(RouterError):
        router.claimed(a, rid)


def test_failed_keeps_only_what_is_not_delivered_yet() -> None:
    router, _, _ = make(spool=Queue())
    router.submit(Batch.from_events(["a", "b", "c"], [b"t"] * 3))
    e = take_entry(router, 0)
    rest = e.batch.slice(1, 3)
    assert router.failed(0, rest) is rest
    assert e.batch is rest  # what stop() would spool: not the delivered event "a"


def test_a_batch_too_large_for_the_spool_is_sent_from_memory_and_never_claimed() -> None:
    router, _, _ = make(spool=Queue(), write_ahead=True)
    e = router.submit(batch(1))
    assert router.next_write() is e
    router.unspoolable(e)
    assert e.location is Location.MEMORY and not e.spoolable
    assert take_entry(router, 0) is e
    assert router.failed(0, e.batch) is None


def test_while_failing_only_the_retrying_workers_probe() -> None:
    router, _, _ = make(spool=None)
    router.submit(batch(1))
    router.submit(batch(2))
    take_entry(router, 0)
    router.failed(0, router.entry(0).batch)
    assert router.take(1) is None  # worker 1 waits instead of joining a retry storm
    assert router.recovered() and not router.recovered()
    router.finished(0)
    assert ident(take_entry(router, 1).batch) == 2


# -- appends in submission order: a restart replays in order ------------------------------------


def test_a_spill_claims_the_batch_being_sent_before_the_spilled_ones() -> None:
    q = Queue()
    router, clock, _ = make(spool=q)
    a = router.submit(batch(0))
    assert take_entry(router, 0) is a  # on the wire, only in memory
    b, c = router.submit(batch(1)), router.submit(batch(2))
    clock.t += SPILL_AFTER + 0.1
    assert router.spill()
    first = router.next_write()
    assert first is a and a.location is Location.SENDING  # to claim: its worker keeps it
    assert router.spooling is None and router.next_write() is a  # until its claim lands
    assert not router.claimed(a, q.append(a.batch, claim=True))
    assert router.next_write() is b
    q.append(b.batch)
    router.written(b)
    assert router.next_write() is c
    q.append(c.batch)
    router.written(c)
    # A crash now replays 0, 1, 2; its failure needs no claim: it is on disk already.
    assert [ident(x) for x, _ in q.records.values()] == [0, 1, 2]
    assert router.failed(0, a.batch) is None
    assert router.settled()  # a stop now has nothing to write


def test_older_memory_batches_are_written_before_a_relp_batch() -> None:
    """A batch carrying waiters (the collector gives them before submitting it, whether the
    take closed it or it was the open batch) is queued for disk at once, behind the older
    memory batches and the one on the wire."""
    q = Queue()
    router, _, _ = make(spool=q)
    gauge = AckGauge()
    a = router.submit(batch(0))
    take_entry(router, 0)
    b = router.submit(batch(1))
    relp = batch(2)
    relp.acks = [Waiter(lambda: None, gauge)]
    c = router.submit(relp)
    assert relp.acks is None and c.acks is not None  # the entry's from now on
    assert list(router.memory) == [b] and list(router.to_spool) == [c]
    order = []
    while (e := router.next_write()) is not None:
        order.append(ident(e.batch))
        if e is a:
            router.claimed(a, q.append(a.batch, claim=True))
        else:
            q.append(e.batch)
            router.written(e)
    assert order == [0, 1, 2]
    assert [ident(x) for x, _ in q.records.values()] == [0, 1, 2]


def test_nothing_older_in_memory_nothing_claimed() -> None:
    q = Queue()
    router, _, _ = make(spool=q, write_ahead=True)
    a = router.submit(batch(0))
    assert router.next_write() is a
    q.append(a.batch)
    router.written(a)
    assert router.take(0) is FROM_SPOOL
    held = router.took_record(0, *(q.next_batch() or (0, Batch())))
    b = router.submit(batch(1))
    assert router.next_write() is b  # the batch being sent is on disk: written straight
    assert held.record is not None


def test_a_claim_landing_after_its_batch_was_delivered_asks_for_its_ack() -> None:
    q = Queue()
    router, clock, _ = make(spool=q)
    a = router.submit(batch(0))
    take_entry(router, 0)
    router.submit(batch(1))
    clock.t += SPILL_AFTER + 0.1
    router.spill()
    assert router.next_write() is a
    router.finished(0)  # the intake took it while its claim was being written
    rid = q.append(a.batch, claim=True)
    assert router.claimed(a, rid)  # ack it now, or the next start sends it again
    assert a.record is None and a.location is Location.DONE


def test_an_evicted_batch_is_not_claimed_again_by_the_writer() -> None:
    """drop_oldest deleted the record of a batch being sent: claiming it again to keep order
    would make drop_oldest delete other batches for one that is in memory anyway."""
    q = Queue()
    q.append(batch(0))
    router, _, _ = make(spool=q, write_ahead=True)
    assert router.take(0) is FROM_SPOOL
    held = router.took_record(0, *(q.next_batch() or (0, Batch())))
    router.evicted([(held.record or 0, 1)])
    b = router.submit(batch(1))
    assert held.evicted and router.next_write() is b
    # Its failure still claims it again, and a stop writes it again (as before).
    assert router.failed(0, held.batch) is held.batch


def test_a_batch_too_large_for_the_spool_is_written_in_halves_in_its_place() -> None:
    q = Queue()
    q.append(batch(0))  # older, on the spool
    router, _, _ = make(spool=q)
    gauge = AckGauge()
    fired: list[int] = []
    big = Batch.from_events(["event 1", "event 2", "event 3"], [b"t"] * 3)
    w = Waiter(lambda: fired.append(len(q.records)), gauge)
    w.hold()
    big.acks = [w]
    x = router.submit(big)
    w.release()
    assert router.next_write() is x
    router.unspoolable(x)  # RecordTooLarge: not sent from memory ahead of record 0
    assert router.memory == deque() and x.location is Location.DONE
    halves = list(router.to_spool)
    assert [h.batch.events() for h in halves] == [["event 1"], ["event 2", "event 3"]]
    assert {h.seq for h in halves} == {x.seq} and router.in_memory == 2
    for h in halves:
        assert router.next_write() is h
        q.append(h.batch)
        router.written(h)
        durable(h)
    assert fired == [3] and gauge.pending == 0  # answered once, when both are on disk
    assert [b.events() for b, _ in q.records.values()] == [
        ["event 0"], ["event 1"], ["event 2", "event 3"]]


# -- no double send -----------------------------------------------------------------------------


def test_a_batch_is_never_handed_to_two_workers() -> None:
    router, _, _ = make(spool=Queue())
    router.submit(batch(1))
    router.submit(batch(2))
    a, b = take_entry(router, 0), take_entry(router, 1)
    assert a is not b and {ident(a.batch), ident(b.batch)} == {1, 2}
    assert router.take(2) is None
    with pytest.raises(RouterError):
        router.take(0)  # still holding a
    assert router.finished(0) is a and a.location is Location.DONE
    with pytest.raises(RouterError):
        router.finished(0)


def test_a_spooled_record_is_never_handed_out_twice() -> None:
    q = Queue()
    q.append(batch(1))
    router, _, _ = make(spool=q)
    assert router.take(0) is FROM_SPOOL
    rid, b = q.next_batch() or (0, Batch())
    e = router.took_record(0, rid, b)
    assert e.location is Location.SENDING and e.record == rid
    assert e not in router.memory_only() and router.settled()
    with pytest.raises(RouterError):
        router.took_record(1, rid, b)  # the same record to a second worker
    assert router.take(1) is None  # nothing ready any more


def test_refused_writes_go_back_to_the_head_and_may_be_sent_from_memory() -> None:
    q = Queue()
    router, _, _ = make(spool=q, write_ahead=True)
    a, b = router.submit(batch(1)), router.submit(batch(2))
    assert router.take(0) is None  # queued for the writer: not sent while the disk takes them
    assert router.next_write() is a
    router.write_refused(a)
    assert router.spool_blocked and list(router.to_spool) == [a, b]
    assert take_entry(router, 0) is a  # the disk refuses, a healthy intake may take it
    c = router.submit(batch(3))
    # Sent from memory, so it is claimed before anything newer is written (order at a
    # restart); the disk refuses that too, and the intake takes it meanwhile.
    assert router.next_write() is a and a.location is Location.SENDING
    router.finished(0)
    assert router.next_write() is b  # the writer tries again with the oldest
    assert router.take(1) is None  # c waits: sent before b lands on disk, order would break
    router.write_refused(b)
    assert take_entry(router, 1) is b
    router.finished(1)
    assert router.next_write() is c
    q.append(c.batch)
    router.written(c)
    assert router.unblock_spool() and not router.unblock_spool()
    assert router.take(1) is FROM_SPOOL  # writable again: batches go through the writer


def test_draining_does_not_take_from_the_spool() -> None:
    q = Queue()
    q.append(batch(1))
    router, _, _ = make(spool=q)
    router.begin_drain()
    assert router.take(0) is None
    assert router.settled()


# -- SIGTERM leftovers --------------------------------------------------------------------------


def test_stop_returns_every_batch_only_in_memory_oldest_first() -> None:
    q = Queue()
    router, clock, _ = make(spool=q)
    entries = [router.submit(batch(i)) for i in range(4)]
    sending = take_entry(router, 0)  # 0: held, no record
    sending.on_wire = True
    assert not router.settled()
    q.append(batch(9))
    router.submit(batch(4))  # behind the ready record: queued for the writer
    recorded = router.took_record(1, *(q.next_batch() or (0, Batch())))
    clock.t += 2
    assert router.spill()  # 1..3 queued ahead of 4
    assert router.next_write() is sending  # older and only in memory: claimed first
    assert [ident(e.batch) for e in router.memory_only()] == [0, 1, 2, 3, 4]
    router.claimed(sending, q.append(sending.batch, claim=True))
    assert router.next_write() is entries[1]
    left = router.stop()
    assert [ident(e.batch) for e in left] == [1, 2, 3, 4]  # the one being written included
    assert sending not in left and recorded not in left  # on disk: replayed at the next start
    assert all(e.location is Location.DONE for e in left)
    assert router.in_memory == 0 and router.closed


# -- drop_oldest deletes records workers hold ------------------------------------------------------


def test_an_evicted_record_makes_its_batch_memory_only() -> None:
    """Issue 17: the router believed a record drop_oldest had deleted was still on disk, so a
    shutdown neither spooled its batch again nor counted it."""
    q = Queue()
    q.append(batch(1))
    q.append(batch(2))
    router, _, _ = make(spool=q)
    assert router.take(0) is FROM_SPOOL
    held = router.took_record(0, *(q.next_batch() or (0, Batch())))
    assert router.settled() and router.in_memory == 0
    other = q.next_batch() or (0, Batch())  # handed out too, its worker not known yet
    router.evicted([(held.record or 0, 1), (other[0], 1), (999, 1)])
    assert held.record is None  # the spool deleted it: only this worker's memory has it
    assert held in router.memory_only() and router.in_memory == 1 and not router.settled()
    assert router.gone == {other[0]: 1, 999: 1}
    # Its worker learns of it after the report: it holds it in memory only, too.
    late = router.took_record(1, *other)
    assert late.record is None and other[0] not in router.gone
    # A failure claims what is left again, as for any batch only in memory.
    assert router.failed(0, held.batch) is held.batch
    left = router.stop()
    assert set(map(id, left)) == {id(held), id(late)}  # written to the spool again at stop


def test_a_claim_deleted_before_its_report_leaves_the_batch_memory_only() -> None:
    q = Queue()
    router, _, _ = make(spool=q)
    e = router.submit(batch(1))
    take_entry(router, 0)
    claim = router.failed(0, e.batch)
    assert claim is not None
    rid = q.append(claim, claim=True)
    router.evicted([(rid, 1)])  # the next append's report came first (another thread)
    router.claimed(e, rid)
    assert e.record is None and e in router.memory_only() and router.gone == {}
    assert router.failed(0, e.batch) is e.batch  # claimed again at the next failure


def test_a_retried_record_keeps_only_what_is_left_for_a_shutdown() -> None:
    q = Queue()
    q.append(Batch.from_events(["a", "b", "c"], [b"t"] * 3))
    router, _, _ = make(spool=q)
    assert router.take(0) is FROM_SPOOL
    e = router.took_record(0, *(q.next_batch() or (0, Batch())))
    rest = e.batch.slice(1, 3)
    assert router.failed(0, rest) is None  # on disk: nothing to claim
    router.evicted([(e.record or 0, 3)])
    assert [x.batch.events() for x in router.stop()] == [["b", "c"]]  # not "a" again


# -- backpressure -------------------------------------------------------------------------------


def test_backpressure_on_at_max_in_flight_off_below_half() -> None:
    router, _, pressure = make(spool=None, max_in_flight=4)
    for i in range(3):
        router.submit(batch(i))
    assert pressure == []
    router.submit(batch(3))
    assert pressure == [True]
    take_entry(router, 0)
    take_entry(router, 1)  # 2 waiting: not below half yet
    assert pressure == [True]
    take_entry(router, 2)  # 1 waiting < 2
    assert pressure == [True, False]
    router.submit(batch(4))
    assert pressure == [True, False]


def test_backpressure_counts_batches_queued_for_and_being_written_to_the_spool() -> None:
    router, _, pressure = make(spool=Queue(), write_ahead=True, max_in_flight=2)
    a = router.submit(batch(1))
    router.submit(batch(2))
    assert pressure == [True]
    assert router.next_write() is a
    assert pressure == [True]  # the batch being written still waits
    router.written(a)
    assert pressure == [True]  # b still waits: off only below max(1, 2 // 2)
    b = router.next_write()
    assert b is not None
    router.written(b)
    assert pressure == [True, False]


def test_a_new_max_in_flight_switches_backpressure_at_once() -> None:
    router, _, pressure = make(spool=None, max_in_flight=4)
    for i in range(2):
        router.submit(batch(i))
    router.set_max_in_flight(2)  # a reload
    assert pressure == [True] and router.max_in_flight == 2
    router.set_max_in_flight(8)
    assert pressure == [True, False]


def test_max_in_flight_one_turns_off_when_nothing_waits() -> None:
    router, _, pressure = make(spool=None, max_in_flight=1)
    router.submit(batch(1))
    assert pressure == [True]
    take_entry(router, 0)
    assert pressure == [True, False]


# -- order with concurrency 1: a random walk over every transition ------------------------------


def walk(seed: int, steps: int = 400) -> None:
    """One worker, a writer and the ager interleaved at random, with failures, refusals and
    batches with RELP waiters (written ahead).

    Whatever happens, the batches reach the intake once each, in the order submitted; and at
    every step the spool holds them in that order too, so that a crash or a stop (which
    appends what is only in memory after them) replays them in order.
    """
    rng = random.Random(seed)
    q = Queue()
    router, clock, _ = make(spool=q, write_ahead=rng.random() < 0.2)
    gauge = AckGauge()
    submitted = 0
    delivered: list[int] = []
    writing: Entry | None = None
    claiming = False  # `writing` is a held batch the writer claims
    held: Entry | None = None

    def step(healthy: bool) -> None:
        nonlocal submitted, writing, claiming, held
        r = rng.random()
        if r < 0.25 and healthy is False:
            b = batch(submitted)
            # RELP, written ahead: the open batch (0.15) or one a take closed (0.1), both
            # given their waiters before they are submitted.
            relp, closed_by_take = rng.random() < 0.15, rng.random() < 0.1
            if relp or closed_by_take:
                b.acks = [Waiter(lambda: None, gauge)]
            router.submit(b)
            submitted += 1
        elif r < 0.35:
            clock.t += rng.uniform(0, 0.8)
            router.spill()
        elif r < 0.6:
            if writing is None:
                writing = router.next_write()
                claiming = writing is not None and writing.location is Location.SENDING
            elif claiming:
                if healthy or rng.random() < 0.7:
                    rid = q.append(writing.batch, claim=True)
                    if router.claimed(writing, rid):
                        q.ack(rid)  # delivered while the claim was written
                    router.unblock_spool()
                else:
                    router.block_spool()  # SpoolAppends.refused
                writing = None
            elif healthy or rng.random() < 0.7:
                q.append(writing.batch)
                router.written(writing)
                router.unblock_spool()
                writing = None
            else:
                router.write_refused(writing)
                writing = None
        elif held is None:
            got = router.take(0)
            if got is FROM_SPOOL:
                rec = q.next_batch()
                if rec is not None:
                    held = router.took_record(0, *rec)
            elif isinstance(got, Entry):
                held = got
        elif healthy or rng.random() < 0.6:
            delivered.extend(ident(b) for b in [held.batch])
            router.recovered()
            if held.record is not None:
                q.ack(held.record)
            router.finished(0)
            held = None
        else:
            claim = router.failed(0, held.batch)
            # (While the writer claims it, the worker waits for that claim: SpoolAppends.)
            if claim is not None and not (claiming and writing is held) and rng.random() < 0.8:
                router.claimed(held, q.append(claim, claim=True))

    def replayed() -> list[int]:
        """What a crash would replay, then what a stop would append after it."""
        on_disk = [ident(b) for b, _ in q.records.values()]
        return on_disk + [ident(e.batch) for e in router.memory_only()]

    for _ in range(steps):
        step(healthy=False)
        assert replayed() == sorted(replayed()), (seed, replayed())
    for _ in range(20 * steps):  # the intake and the disk recover: everything drains
        step(healthy=True)
        assert replayed() == sorted(replayed()), (seed, replayed())
        if not router.memory_only() and not q.records and held is None and writing is None:
            break
    assert delivered == list(range(submitted)), seed
    assert submitted > 0


@pytest.mark.parametrize("seed", range(60))
def test_order_with_concurrency_one(seed: int) -> None:
    walk(seed)
