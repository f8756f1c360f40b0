"""What every source is given: where results go, the counters, the log, the reader settings.

The `Source → ingest` protocol is `IngestSink.take(ChunkResult)`; backpressure comes back the
other way through `Backpressure`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..ingest import ChunkReader, ChunkResult, ProgramFilter, new_reader
from ..observability.counters import Counters
from ..observability.quiet import QuietLog
from .guard import BufferBudget


class IngestSink(Protocol):
    """The collector: takes what a reader produced (events, counts)."""

    def take(self, result: ChunkResult) -> None: ...

    def on_durable(self, callback: Callable[[], None],
                   on_lost: Callable[[], None] | None = None) -> None:
        """Call `callback` once every event of the last take() is durable (RELP acks).

        Durable: fsync'd on the spool, accepted by the intake (no spool), or (too large) in
        the dead-letter store, or dropped and counted because it could not be written there
        (dead letters full or failing: resending would not help). Exactly once, from the
        event loop. If some of them were lost instead (a delivery bug, the spool refusing
        them while the intake does too, shutdown without a spool), `on_lost` is called once
        (maybe synchronously, from this call) and `callback` never: the source stops waiting
        for that answer and the sender resends. Neither at a crash. No event in the last
        take() (all filtered): `callback` at once, synchronously. Call it right after take(),
        with no await in between. Sources that never call it pay nothing.
        """
        ...

    def flush(self) -> None:
        """Close the open batch now. Optional: for a source whose sender can send no more
        until answered (a RELP session at its window), so the answers come after one fsync
        instead of after batch.idle_flush. Call it when that happens, not per message."""
        ...

    def received_at(self) -> bytes:
        """Reception time as the intake wants it (UTC, ms, RFC 3339)."""
        ...


@dataclass(eq=False)
class Backpressure:
    """On while delivery lags: TCP sources stop reading, UDP drops (counted)."""

    on: bool = False
    _listeners: list[Callable[[bool], None]] = field(default_factory=list)

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[bool], None]) -> None:
        """A listener closed by a reload: it must not be kept alive (nor called) any more."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def set(self, on: bool) -> None:
        self.on = on
        for listener in self._listeners:
            listener(on)


@dataclass(eq=False)
class SourceContext:
    sink: IngestSink
    counters: Counters
    log: Any  # a structlog BoundLogger
    filter: ProgramFilter
    pressure: Backpressure
    max_message_size: int
    # Shared by every TCP listener: listen.max_buffered_bytes is a total over all of them.
    budget: BufferBudget = field(default_factory=BufferBudget)
    # Warnings a flood repeats (refused, evicted, denied...): rate-limited, with a count.
    quiet: QuietLog = field(init=False)

    def __post_init__(self) -> None:
        self.quiet = QuietLog(self.log)

    def reader(self, framing: str) -> ChunkReader:
        return new_reader(self.filter, self.max_message_size, framing)


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def listener_name(proto: str, host: str, port: int) -> str:
    """A listener as its `listener` label shows it: tcp://127.0.0.1:1514, udp://[::1]:514."""
    return f"{proto}://[{host}]:{port}" if ":" in host else f"{proto}://{host}:{port}"
