"""Acknowledgements that travel with the events: what a source wants told about one hand-over.

A source that answers its sender only once the events are durable (RELP) hands the collector
an `Ack` together with the reader's result (`Collector.take(result, ack)`); from there the
acknowledgement rides on the batches that hold those events (and on their dead-letter
writes) through the router, the spool writer and the workers, as a countdown `Waiter`.
Nothing is matched by position or by sequence number: no call order is required of anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ack:
    """`durable()` once every event of the take is settled; `lost()` instead (once) if one of
    them was lost. Settled: fsync'd on the spool, accepted by the intake (no spool), or (too
    large for the intake) written to the dead letters, or dropped and counted because it
    could not be (dead letters full or failing: resending would not help). Neither is called
    at a crash. A take with no event (all filtered) calls `durable()` at once, synchronously.
    Both run on the event loop."""

    durable: Callable[[], None]
    lost: Callable[[], None] | None = None


class AckGauge:
    """How many `Waiter`s wait (the acks_pending gauge): one object shared by all of them."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = 0


class Waiter:
    """One `Ack` in delivery: its callback runs once every holder has released it.

    A countdown, not a flag: the events of one take may sit in several batches (and dead
    letters); each place holding some of them holds the waiter once. It starts held by its
    creator, so nothing can fire it before every place has it. `lose()` (a place whose
    events were lost) drops the callback for good and calls `on_lost` instead: the source
    must not wait for that answer (a RELP session whose answers leave in order would be
    stuck behind it); an unacknowledged message is resent by its sender, an acknowledged
    lost one is gone.
    """

    __slots__ = ("callback", "gauge", "left", "on_lost")

    def __init__(self, callback: Callable[[], None], gauge: AckGauge,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.callback: Callable[[], None] | None = callback
        self.on_lost = on_lost
        self.left = 1
        self.gauge = gauge
        gauge.pending += 1

    @classmethod
    def of(cls, ack: Ack, gauge: AckGauge) -> Waiter:
        return cls(ack.durable, gauge, ack.lost)

    def hold(self) -> None:
        self.left += 1

    def release(self) -> None:
        cb = self.callback
        if cb is None:
            return
        self.left -= 1
        if self.left > 0:
            return
        self.callback = self.on_lost = None
        self.gauge.pending -= 1
        _call(cb, "Ack.durable callback failed")

    def lose(self) -> None:
        if self.callback is None:
            return
        on_lost = self.on_lost
        self.callback = self.on_lost = None
        self.gauge.pending -= 1
        if on_lost is not None:
            _call(on_lost, "Ack.lost callback failed")


def _call(cb: Callable[[], None], message: str) -> None:
    try:
        cb()
    except Exception as exc:  # a source's bug must not break delivery's bookkeeping
        asyncio.get_running_loop().call_exception_handler(
            {"message": message, "exception": exc})


def release_all(acks: list[Waiter] | None) -> None:
    for w in acks or ():
        w.release()


def lose_all(acks: list[Waiter] | None) -> None:
    for w in acks or ():
        w.lose()


def split(ack: Ack, n: int) -> list[Ack]:
    """`n` acknowledgements standing for `ack`: its `durable` once all `n` are, its `lost`
    (once) as soon as one is. For a take whose events go to several intakes."""
    left = [n]
    done = [False]

    def one_durable() -> None:
        left[0] -= 1
        if left[0] == 0 and not done[0]:
            done[0] = True
            ack.durable()

    def one_lost() -> None:
        if not done[0]:
            done[0] = True
            if ack.lost is not None:
                ack.lost()

    return [Ack(one_durable, one_lost) for _ in range(n)]
