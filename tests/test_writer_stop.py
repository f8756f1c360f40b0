"""The spool writer ends when it is cancelled, whenever the cancellation comes.

On Python 3.11 `asyncio.wait_for` swallows a cancellation that arrives once the awaited thing
is done but before the waiting task resumed (CPython gh-86296). The writer used it for its
idle wait: a stop right after something woke it left the writer running, and
`Delivery.stop()` waited for it for ever (a SIGTERM that never ended).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from haproxy_forwarder.delivery import Delivery
from haproxy_forwarder.delivery import writer as writer_module
from haproxy_forwarder.delivery.router import Router
from haproxy_forwarder.delivery.writer import LOSS_POLL, SpoolAppends, SpoolWriter
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sinks.deadletter import DeadLetters
from haproxy_forwarder.spool import Losses
from tests.test_delivery import FakeSink, FakeSpool, Log, NoWait

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

    assert asyncio.run(main()), "the writer ran on after it was cancelled"


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

    returned, result = asyncio.run(main())
    assert returned, "Delivery.stop() still waiting for the spool writer"
    assert result == (0, 0)


def test_the_idle_writer_still_polls_for_losses_every_loss_poll(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the timed wait is for: losses the spool's reader threads found are said."""
    poll = 0.05
    monkeypatch.setattr(writer_module, "LOSS_POLL", poll)

    class Polled(FakeSpool):
        def __init__(self) -> None:
            super().__init__()
            self.polls: list[float] = []

        def take_losses(self) -> Losses:
            self.polls.append(time.monotonic())
            return Losses()

    async def main() -> tuple[float, list[float]]:
        spool = Polled()
        r = router(spool)
        wake, wake_workers = asyncio.Event(), asyncio.Event()
        writer = SpoolWriter(r, SpoolAppends(spool, r, Log()), wake, wake_workers)
        spool.polls.clear()  # SpoolAppends' own call when created
        start = time.monotonic()
        task = asyncio.create_task(writer.run())
        deadline = start + 40 * poll
        while len(spool.polls) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(poll / 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return start, spool.polls

    start, polls = asyncio.run(main())
    assert len(polls) >= 3, polls  # never woken, it still asks the spool
    assert polls[0] - start >= poll * 0.9 and polls[1] - polls[0] >= poll * 0.9
