"""Acknowledgements that travel with the events: what a source wants told about one hand-over.

A source that answers its sender only once the events are durable (RELP) hands the collector
an `Ack` together with the reader's result (`Collector.take(result, ack)`); from there the
acknowledgement rides on the batches that hold those events (and on their dead-letter
writes) through the router, the spool writer and the workers. Nothing is matched by
position or by sequence number: no call order is required of anyone.
"""

from __future__ import annotations

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
