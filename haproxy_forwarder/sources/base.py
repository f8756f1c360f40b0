"""What every source is given: where results go, the counters, the log, the reader settings.

The `Source → collector` protocol is `CollectorInput.take(ChunkResult, Ack)`; backpressure
comes back the other way through `Backpressure`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..acks import Ack
from ..ingest import ChunkReader, ChunkResult, ProgramFilter, new_reader
from ..observability.counters import Counters
from ..observability.quiet import QuietLog
from ..routing import Origin
from ..tlscontext import ServerTls
from .guard import BufferBudget


class CollectorInput(Protocol):
    """The collector, as a source sees it: where reader results go."""

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        """Count and batch what a reader produced. With `ack`, its `durable` (or `lost`) is
        called once every event of this result is durable (RELP answers): see acks.Ack.
        Sources that pass none pay nothing."""
        ...

    def flush(self) -> None:
        """Close the open batch now. Optional: for a source whose sender can send no more
        until answered (a RELP session at its window), so the answers come after one fsync
        instead of after batch.idle_flush. Call it when that happens, not per message."""
        ...

    def received_at(self) -> bytes:
        """Reception time as the intake wants it (UTC, ms, RFC 3339)."""
        ...


class Inlet(CollectorInput, Protocol):
    """Where one connection's (or one sender's datagrams') events go, as the routes decide
    for its origin: its own reader, the collector input(s) behind it, and whether input to
    it must wait (its intake's delivery is full: `when_full = "block"`)."""

    reader: ChunkReader

    @property
    def held(self) -> bool:
        """True: stop reading this connection (TCP, TLS, RELP) or drop its datagrams (UDP,
        counted as udp_dropped), until `Backpressure` announces a change and it is False."""
        ...


class DirectInlet:
    """One intake, no routes: every event to the one collector, held by the one pressure."""

    __slots__ = ("pressure", "reader", "sink")

    def __init__(self, reader: ChunkReader, sink: CollectorInput,
                 pressure: Backpressure) -> None:
        self.reader = reader
        self.sink = sink
        self.pressure = pressure

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        self.sink.take(result, ack)

    def flush(self) -> None:
        self.sink.flush()

    def received_at(self) -> bytes:
        return self.sink.received_at()

    @property
    def held(self) -> bool:
        return self.pressure.on


class Inlets(Protocol):
    """The route table in force (routing.py), as sources use it."""

    def inlet(self, origin: Origin, framing: str) -> Inlet:
        """The inlet of a connection (once its origin is known: after the PROXY header and
        the TLS handshake) or of a datagram's sender. It follows a reload of the routes by
        itself, from its next take."""
        ...


@dataclass(eq=False)
class Backpressure:
    """On while delivery lags: TCP sources stop reading, UDP drops (counted).

    With several intakes, `on` is true while any intake's delivery lags, and every change of
    any of them is announced: a source then asks each connection's `Inlet.held`, so only the
    senders routed to the lagging intake wait."""

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
    sink: CollectorInput
    counters: Counters
    log: Any  # a structlog BoundLogger
    filter: ProgramFilter
    pressure: Backpressure
    max_message_size: int
    # Shared by every TCP listener: listen.max_buffered_bytes is a total over all of them.
    budget: BufferBudget = field(default_factory=BufferBudget)
    # The TLS settings in force for every listener that speaks TLS (listen.tls, RELP with
    # relp.tls): one certificate and one handshake cap per process, swapped whole on SIGHUP.
    server_tls: ServerTls = field(default_factory=ServerTls)
    # The route table (several intakes); None: every event goes to `sink`.
    routes: Inlets | None = None
    # Warnings a flood repeats (refused, evicted, denied...): rate-limited, with a count.
    quiet: QuietLog = field(init=False)

    def __post_init__(self) -> None:
        self.quiet = QuietLog(self.log)

    def reader(self, framing: str) -> ChunkReader:
        return new_reader(self.filter, self.max_message_size, framing)

    def inlet(self, origin: Origin, framing: str) -> Inlet:
        """Where the events of `origin` go: see `Inlets.inlet`."""
        if self.routes is not None:
            return self.routes.inlet(origin, framing)
        return DirectInlet(self.reader(framing), self.sink, self.pressure)


def peer_of(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """("host:port", "host") of the peer, as log lines and the per-address limits use them."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}", str(peer[0])
    return str(peer), str(peer)


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def listener_name(proto: str, host: str, port: int) -> str:
    """A listener as its `listener` label shows it: tcp://127.0.0.1:1514, udp://[::1]:514."""
    return f"{proto}://[{host}]:{port}" if ":" in host else f"{proto}://{host}:{port}"
