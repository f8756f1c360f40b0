"""TCP syslog source (RFC 6587): one ChunkReader per connection, bounded connections.

Thin by design: framing and header reading live in ingest/; here we only move bytes, enforce
the connection limit, apply backpressure (pause_reading) and half-close at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from ..ingest import AUTO, ChunkResult
from ..observability.counters import LF, OCTET, FramingCounters, ListenerCounters
from .base import SourceContext, listener_name


class TcpConnection(asyncio.Protocol):
    def __init__(self, source: TcpSource) -> None:
        self.source = source
        self.ctx = source.ctx
        self.reader = self.ctx.reader(AUTO)
        self.stats = source.stats
        # Set by the first byte, as the reader decides the framing (a digit: octet counting).
        self.framing: FramingCounters | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.oversized_logged = False
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        c = self.stats
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        src = self.source
        if len(src.connections) >= src.max_connections and not src.evict_idle():
            # Refuse instead of buffering: an unbounded number of paused connections is
            # how peers ran out of memory (Vector #8238).
            c.connections_refused += 1
            ctx.log.warning(
                "connection_refused", peer=self.peer, reason="listen.max_connections reached"
            )
            transport.abort()
            return
        self.transport = transport
        src.connections.add(self)
        c.connections_accepted += 1
        if ctx.pressure.on:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        ctx = self.ctx
        fc = self.framing
        if fc is None:
            fc = self.framing = self.stats.framing(OCTET if 48 <= data[0] <= 57 else LF)
        self.stats.received_bytes += len(data)
        result = self.reader.feed(data, ctx.sink.received_at())
        self._handle(result, fc)
        if result.error is not None and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        # No byte ever came: nothing can be counted, in no framing.
        fc = self.framing if self.framing is not None else FramingCounters()
        self._handle(self.reader.close(self.ctx.sink.received_at()), fc)
        return None

    def _handle(self, result: ChunkResult, fc: FramingCounters) -> None:
        ctx = self.ctx
        fc.frames += result.frames
        ctx.sink.take(result)
        if result.oversized:
            self.stats.oversized_frames += result.oversized
            if not self.oversized_logged:  # logged once per connection, counted always
                self.oversized_logged = True
                ctx.log.warning(
                    "frame_too_large",
                    peer=self.peer,
                    max_message_size=ctx.max_message_size,
                    action="discarded, connection kept",
                )
        if result.error is not None:
            fc.framing_errors += result.framing_errors
            ctx.log.warning("framing_error", peer=self.peer, error=result.error,
                            action="connection closed")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.source.connections.discard(self)
            self.transport = None

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def half_close(self) -> None:
        """Shutdown: send FIN but keep reading. rsyslog's omfwd checks for a FIN before each
        write, so it stops sending here and keeps the next message for the next forwarder
        instead of writing it into a socket we would reset (omfwd has no acknowledgements)."""
        t = self.transport
        if t is None or t.is_closing():
            return
        t.resume_reading()
        if t.can_write_eof():
            t.write_eof()


class TcpSource:
    def __init__(self, ctx: SourceContext, host: str, port: int, max_connections: int,
                 evict_idle_after: float) -> None:
        self.ctx = ctx
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.evict_idle_after = evict_idle_after
        self.connections: set[TcpConnection] = set()
        self._server: asyncio.Server | None = None
        self._stopping = False
        # Its `listener` label gets the bound port at start() (port 0 in tests), and it is
        # shown from then on: a listener that failed to bind has no series.
        self.stats = ListenerCounters(listener_name("tcp", host, port))
        ctx.pressure.subscribe(self._on_pressure)

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: TcpConnection(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        addr = self._server.sockets[0].getsockname()
        self.stats.name = listener_name("tcp", addr[0], addr[1])
        self.ctx.counters.add_listener(self.stats)
        return addr[0], addr[1]

    @property
    def name(self) -> str:
        return self.stats.name

    @property
    def listening(self) -> bool:
        """Bound and accepting: False before start(), after stop(), or if the socket closed."""
        return self._server is not None and self._server.is_serving()

    @property
    def down(self) -> bool:
        """Started, not stopped by us, and yet not accepting any more."""
        return self._server is not None and not self._stopping and not self._server.is_serving()

    def evict_idle(self) -> bool:
        """At the connection limit, make room by closing the longest-idle connection.

        Without this, a handful of clients that connect and say nothing would lock real
        senders out. Never while paused: under backpressure every connection looks idle.
        """
        if self.ctx.pressure.on or not self.connections:
            return False
        oldest = min(self.connections, key=lambda conn: conn.last_active)
        idle = time.monotonic() - oldest.last_active
        if idle < self.evict_idle_after or oldest.transport is None:
            return False
        self.stats.connections_evicted += 1
        self.ctx.log.warning("connection_evicted_idle", peer=oldest.peer, idle=round(idle, 1),
                             reason="listen.max_connections reached")
        # A FIN first: rsyslog checks for it before writing, so it reconnects cleanly.
        oldest.half_close()
        oldest.transport.close()
        self.connections.discard(oldest)
        return True

    def _on_pressure(self, on: bool) -> None:
        for conn in self.connections:
            if on:
                conn.pause()
            else:
                conn.resume()

    async def stop(self, grace: float) -> None:
        """Stop accepting, then read what senders already wrote for up to `grace` seconds."""
        self._stopping = True
        # A listener closed by a reload must not stay subscribed (kept alive, called).
        self.ctx.pressure.unsubscribe(self._on_pressure)
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.half_close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
