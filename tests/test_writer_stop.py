"""The spool writer ends when it is cancelled, whenever the cancellation comes.

On Python 3.11 `asyncio.wait_for` swallows a cancellation that arrives once the awaited thing
is done but before the waiting task resumed (CPython gh-86296). The writer used it for its
idle wait: a stop right after something woke it left the writer running, and
`Delivery.stop()` waited for it for ever (a SIGTERM that never ended).

On a virtual clock (tests/vclock.py): a writer that failed to end would run its LOSS_POLL
rounds in no real time, and the polls are timed exactly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from haproxy_forwarder.batching import Batch
from haproxy_forwarder.delivery import SPOOL_RETRY, Delivery
from haproxy_forwarder.delivery.router import Router
from haproxy_forwarder.delivery.writer import LOSS_POLL, SpoolAppends, SpoolWriter
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sinks.deadletter import DeadLetters
from haproxy_forwarder.spool import AppendResult, Losses
from tests import vclock
from tests.test_delivery import FakeSink, FakeSpool, Log, NoWait, events, until

# Long enough for several LOSS_POLL rounds of a writer that failed to end.
DEADLINE = 4 * LOSS_POLL


def router(spool: FakeSpool) -> Router:
    return Router(now=lambda: 0.0, spool_ready=lambda: spool.has_ready, write_ahead=False,
                  max_in_flight=100, on_pressure=lambda on: None)


async def ends_within(task: asyncio.Task[None], seconds: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return task in done


def test_a_writer_cancelled_right_after_it_was_woken_ends() -> None:
    async def main() -> bool:
        spool = FakeSpool()
        r = router(spool)
        wake, wake_workers = asyncio.Event(), asyncio.Event()
        writer = SpoolWriter(r, SpoolAppends(spool, r, Log()), wake, wake_workers)
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.01)  # idle: waiting to be woken
        wake.set()
        await asyncio.sleep(0)  # the wait is over, the writer has not resumed yet
        task.cancel()
        return await ends_within(task, DEADLINE)

    assert vclock.run(main()), "the writer ran on after it was cancelled"


def test_delivery_stop_right_after_the_writer_is_woken_returns(tmp_path: Path) -> None:
    async def main() -> tuple[bool, tuple[int, int] | None]:
        d = Delivery(FakeSink(), FakeSpool(), DeadLetters(tmp_path / "dl"), Counters(), Log(),
                     workers=1, backoff=NoWait(), max_in_flight=10, write_ahead=False,
                     on_pressure=lambda on: None)
        d.start()
        await asyncio.sleep(0.01)
        d.wake_writer.set()  # a batch queued for the disk, a worker's first failure...
        await asyncio.sleep(0)
        stop = asyncio.create_task(d.stop())
        done, _ = await asyncio.wait({stop}, timeout=DEADLINE)
        if stop not in done:
            for t in d._tasks:  # clean up after the failure: let the loop close
                t.cancel()
                t.cancel()
            return False, None
        return True, stop.result()

    returned, result = vclock.run(main())
    assert returned, "Delivery.stop() still waiting for the spool writer"
    assert result == (0, 0)


def test_the_idle_writer_still_polls_for_losses_every_loss_poll() -> None:
    """What the timed wait is for: losses the spool's reader threads found are said."""

    class Polled(FakeSpool):
        def __init__(self) -> None:
            super().__init__()
            self.polls: list[float] = []

        def take_losses(self) -> Losses:
            self.polls.append(asyncio.get_running_loop().time())
            return Losses()

    async def main() -> tuple[float, list[float]]:
        spool = Polled()
        r = router(spool)
        wake, wake_workers = asyncio.Event(), asyncio.Event()
        writer = SpoolWriter(r, SpoolAppends(spool, r, Log()), wake, wake_workers)
        spool.polls.clear()  # SpoolAppends' own call when created
        start = asyncio.get_running_loop().time()
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(3.5 * LOSS_POLL)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return start, spool.polls

    start, polls = vclock.run(main())
    # Never woken, it still asks the spool every LOSS_POLL; once more as it ends (cancelled).
    assert [round(t - start, 6) for t in polls] == [LOSS_POLL, 2 * LOSS_POLL, 3 * LOSS_POLL,
                                                    3.5 * LOSS_POLL]


def test_a_refused_write_is_tried_again_every_spool_retry(tmp_path: Path) -> None:
    """A full disk: the writer does not spin on it, it tries again every SPOOL_RETRY (the
    write of 0, then the claim of 0, which a worker took from memory meanwhile and which must
    land before 1 is written) until it lands."""
    sink = FakeSink()
    gate = sink.gate = asyncio.Event()  # the intake does not answer yet

    class Full(FakeSpool):
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            super().__init__()
            self.loop = loop
            self.tries: list[tuple[str, float]] = []

        def append(self, batch: Batch, claim: bool = False) -> AppendResult:
            # (In the append thread: the loop's clock stands still while it waits for it.)
            self.tries.append(("claim" if claim else "write", self.loop.time()))
            return super().append(batch, claim)

    async def main() -> tuple[float, list[tuple[str, float]]]:
        loop = asyncio.get_running_loop()
        spool = Full(loop)
        spool.full = True
        d = Delivery(sink, spool, DeadLetters(tmp_path), Counters(), Log(), workers=1,
                     backoff=NoWait(), max_in_flight=10, write_ahead=True,
                     on_pressure=lambda on: None, clock=loop.time)
        d.start()
        start = loop.time()
        d.submit(events(0, 1))
        d.submit(events(1, 1))
        await asyncio.sleep(3.5 * SPOOL_RETRY)
        assert sink.attempts == [["event 0"]]  # sent from memory after the first refusal
        spool.full = False
        await until(lambda: len(spool.ops) == 2)
        # 0 is claimed before 1 is written (the order a restart replays them in).
        assert spool.ops == [("claim", ["event 0"]), ("append", ["event 1"])]
        gate.set()
        await until(lambda: sink.accepted == ["event 0", "event 1"] and not spool.records)
        await d.stop()
        return start, spool.tries

    start, tries = vclock.run(main())
    assert [kind for kind, _ in tries] == ["write", "claim", "claim", "claim", "claim", "write"]
    at = [t - start for _, t in tries]
    # SPOOL_RETRY apart, plus what the refused appends took in their thread (the clock follows
    # real time while a thread works): never sooner, never a pause more.
    pauses = [at[i + 1] - at[i] for i in range(4)]
    assert at[0] < 0.05 and all(SPOOL_RETRY - 1e-6 < p < SPOOL_RETRY + 0.05 for p in pauses), at
    assert at[5] - at[4] < 0.05  # the claim landed: 1 is written at once
