"""TCP syslog source (RFC 6587): one ChunkReader per connection, bounded connections.

Thin by design: framing and header reading live in ingest/; here we only move bytes, enforce
the connection limit, apply backpressure (pause_reading) and half-close at shutdown.

The TLS source (tls.py) is this one with `protocol()` wrapping each connection in a TLS
layer: TcpConnection only sees a transport, plain or decrypted, and never knows which.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from ..config import ListenConfig
from ..ingest import AUTO, ChunkResult
from ..observability.counters import LF, OCTET, FramingCounters, ListenerCounters
from ..observability.descriptors import Descriptors
from .base import SourceContext, listener_name
from .guard import Allow


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
        self.address = "?"
        self.oversized_logged = False
        # Liveness is the last COMPLETE frame, not the last byte: a peer trickling one byte a
        # second is as idle as a silent one. `framed` stays False until the first frame.
        self.last_frame = time.monotonic()
        self.framed = False
        self.buffered = 0  # what the reader holds, as last reported to the budget

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        transport = cast(asyncio.Transport, transport)
        self.peer, self.address = peer_of(transport)
        src = self.source
        if not src.admit(transport, self.peer, self.address):
            transport.abort()
            return
        self.transport = transport
        src.add(self)
        self.stats.connections_accepted += 1
        if self.ctx.pressure.on:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        ctx = self.ctx
        fc = self.framing
        if fc is None:
            fc = self.framing = self.stats.framing(OCTET if 48 <= data[0] <= 57 else LF)
        self.stats.received_bytes += len(data)
        result = self.reader.feed(data, ctx.sink.received_at())
        if result.frames:
            self.last_frame = time.monotonic()
            if not self.framed:
                self.framed = True
                self.source.frameless.pop(self, None)
        self._handle(result, fc)
        if result.error is not None and self.transport is not None:
            self.transport.close()
        if self.transport is not None:
            ctx.budget.update(self, self.reader.buffered)

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
            # Rate-limited like every warning a flood repeats (one bad sender reconnecting).
            ctx.quiet.warning("framing_error", listener=self.stats.name, peer=self.peer,
                              error=result.error, action="connection closed")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.source.remove(self)
            self.transport = None

    def drop(self) -> None:
        """Close it for the source's own reasons (eviction, idle, memory): a FIN first, as
        rsyslog checks for it before writing and then reconnects cleanly, then the close."""
        if self.transport is None:
            return
        self.half_close()
        self.transport.close()
        self.source.remove(self)

    def shed(self) -> None:
        """Called by the budget: this connection holds the most of listen.max_buffered_bytes."""
        self.stats.connections_shed += 1
        self.ctx.quiet.warning("connection_shed", listener=self.stats.name, peer=self.peer,
                               buffered=self.buffered,
                               reason="listen.max_buffered_bytes reached")
        if self.transport is not None:
            # Abort, not FIN: reading on while half-closed would buffer again.
            self.transport.abort()
            self.source.remove(self)
            self.transport = None  # nothing it still reads counts (nor is read)
        # Free what it held now, not when the transport lets go of this protocol.
        self.reader = self.ctx.reader(AUTO)

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


def peer_of(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """("host:port", "host") of the peer, as log lines and the per-address limits use them."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}", str(peer[0])
    return str(peer), str(peer)


class TcpSource:
    # The scheme of its `listener` label.
    proto = "tcp"

    def __init__(self, ctx: SourceContext, host: str, port: int, listen: ListenConfig) -> None:
        self.ctx = ctx
        self.host = host
        self.port = port
        self.connections: set[TcpConnection] = set()
        self.per_address: dict[str, int] = {}
        # Connections that never completed a frame, oldest first: the first to be evicted,
        # found in O(1) however fast a flood connects.
        self.frameless: dict[TcpConnection, None] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._stopping = False
        # Its `listener` label gets the bound port at start() (port 0 in tests), and it is
        # shown from then on: a listener that failed to bind has no series.
        self.stats = ListenerCounters(listener_name(self.proto, host, port))
        self.configure(listen)
        self.descriptors = Descriptors(ctx.counters, ctx.quiet)
        ctx.pressure.subscribe(self._on_pressure)

    def configure(self, listen: ListenConfig) -> None:
        """The listen.* limits, at start and on SIGHUP."""
        self.max_connections = listen.max_connections
        self.max_connections_per_address = listen.max_connections_per_address
        self.idle_timeout = listen.idle_timeout
        self.allow = Allow(listen.allow)
        self.ctx.budget.cap = listen.max_buffered_bytes
        # A narrowed allow-list also applies to the peers already connected.
        for conn in [c for c in self.connections if not self.allow.permits(c.address)]:
            self.stats.access_denied += 1
            self.ctx.quiet.warning("connection_denied", listener=self.stats.name,
                                   peer=conn.peer, reason="not in listen.allow (reload)")
            conn.drop()

    def screen(self, transport: asyncio.BaseTransport, peer: str, address: str) -> bool:
        """The checks that cost nothing: descriptors left, listen.allow, the per-address cap.
        False: counted and logged; the caller aborts. TLS runs them before its handshake."""
        c = self.stats
        if not self.descriptors.admit(transport, c.name):
            return False
        if not self.allow.permits(address):
            c.access_denied += 1
            self.ctx.quiet.warning("connection_denied", listener=c.name, peer=peer,
                                   reason="not in listen.allow")
            return False
        if self.held(address) >= self.max_connections_per_address:
            c.connections_refused += 1
            self.ctx.quiet.warning("connection_refused", listener=c.name, peer=peer,
                                   reason="listen.max_connections_per_address reached")
            return False
        return True

    def admit(self, transport: asyncio.BaseTransport, peer: str, address: str) -> bool:
        """`screen`, then a slot under listen.max_connections (evicting if need be)."""
        if not self.screen(transport, peer, address):
            return False
        if len(self.connections) >= self.max_connections and not self.evict_one():
            # Refuse instead of buffering: an unbounded number of paused connections is
            # how peers ran out of memory (Vector #8238).
            self.stats.connections_refused += 1
            self.ctx.quiet.warning("connection_refused", listener=self.stats.name, peer=peer,
                                   reason="listen.max_connections reached")
            return False
        return True

    def held(self, address: str) -> int:
        """Connections `address` holds, as listen.max_connections_per_address counts them."""
        return self.per_address.get(address, 0)

    def protocol(self) -> asyncio.Protocol:
        """One accepted connection's protocol (TLS wraps it in its layer)."""
        return TcpConnection(self)

    def add(self, conn: TcpConnection) -> None:
        self.connections.add(conn)
        self.frameless[conn] = None
        self.per_address[conn.address] = self.per_address.get(conn.address, 0) + 1

    def remove(self, conn: TcpConnection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.frameless.pop(conn, None)
        self.ctx.budget.release(conn)
        n = self.per_address.get(conn.address, 0) - 1
        if n > 0:
            self.per_address[conn.address] = n
        else:
            self.per_address.pop(conn.address, None)

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.protocol, self.host, self.port, reuse_address=True, backlog=1024
        )
        addr = self._server.sockets[0].getsockname()
        self.stats.name = listener_name(self.proto, addr[0], addr[1])
        self.ctx.counters.add_listener(self.stats)
        self._schedule_sweep()
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

    def evict_one(self) -> bool:
        """At max_connections, make room by closing the connection whose last complete frame
        is oldest; one that never completed a frame goes first (oldest connect first).

        Without this, connections that say nothing, or trickle bytes, lock real senders out.
        Under backpressure no frame completes anywhere: only frameless ones may go then.
        """
        if not self.connections:
            return False
        if self.frameless:
            oldest = next(iter(self.frameless))
        else:
            oldest = min(self.connections, key=lambda conn: conn.last_frame)
        if oldest.transport is None or (oldest.framed and self.ctx.pressure.on):
            return False
        self.stats.connections_evicted += 1
        self.ctx.quiet.warning("connection_evicted_idle", listener=self.stats.name,
                               peer=oldest.peer,
                               idle=round(time.monotonic() - oldest.last_frame, 1),
                               complete_frames=oldest.framed,
                               reason="listen.max_connections reached")
        oldest.drop()
        return True

    def _schedule_sweep(self) -> None:
        # Often enough that a connection outlives idle_timeout by a tenth at most.
        delay = min(max(self.idle_timeout / 10, 0.05), 5.0)
        self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """listen.idle_timeout: close connections with no complete frame for that long.
        Not under backpressure: paused connections cannot complete one."""
        if self._stopping:
            return
        if not self.ctx.pressure.on:
            limit = time.monotonic() - self.idle_timeout
            for conn in [c for c in self.connections if c.last_frame < limit]:
                self.stats.connections_idle_closed += 1
                self.ctx.quiet.warning("connection_idle_closed", listener=self.stats.name,
                                       peer=conn.peer, idle_timeout=self.idle_timeout)
                conn.drop()
        self._schedule_sweep()

    def _on_pressure(self, on: bool) -> None:
        now = time.monotonic()
        for conn in self.connections:
            if on:
                conn.pause()
            else:
                # Time spent paused is not idleness; a peer that never framed gets no credit.
                if conn.framed:
                    conn.last_frame = max(conn.last_frame, now)
                conn.resume()

    async def stop(self, grace: float) -> None:
        """Stop accepting, then read what senders already wrote for up to `grace` seconds."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        # A listener closed by a reload must not stay subscribed (kept alive, called).
        self.ctx.pressure.unsubscribe(self._on_pressure)
        if self._server is not None:
            self._server.close()
        self._close_pending()
        for conn in list(self.connections):
            conn.half_close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        self.ctx.quiet.flush()

    def _close_pending(self) -> None:
        """Connections accepted but not handed to a TcpConnection yet (TLS handshakes)."""
