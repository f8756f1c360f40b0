"""TCP syslog source (RFC 6587): one ChunkReader per connection, bounded connections.

Thin by design: framing and header reading live in ingest/; here we only move bytes, enforce
the connection limit, apply backpressure (pause_reading) and half-close at shutdown. Each
connection's reader and the collector input its events go to are its `Inlet`, made once it
is admitted; it is paused while that inlet is held.

listen.tls is this listener given the daemon's ServerTls: each connection behind the TLS
layer of tls.py. TcpConnection only sees a transport, plain or decrypted, and never knows
which.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from ..ingest import AUTO, ChunkResult
from ..observability.counters import LF, OCTET, FramingCounters
from ..routing import Origin
from .base import Inlet, peer_of
from .proxylayer import via_of
from .stream import StreamSource


class TcpConnection(asyncio.Protocol):
    def __init__(self, source: TcpSource) -> None:
        self.source = source
        self.ctx = source.ctx
        # Set once admitted (its origin is known then): its reader, where its events go.
        self.inlet: Inlet | None = None
        self.origin: Origin | None = None
        self.stats = source.stats
        # Set by the first byte, as the reader decides the framing (a digit: octet counting).
        self.framing: FramingCounters | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.address = "?"
        self.via: dict[str, str] = {}
        # Paused because its inlet was held; resumed (with idle credit) once it is not.
        self.paused = False
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
        self.via = via_of(transport)
        src = self.source
        if not src.admit(transport, self.peer, self.address):
            transport.abort()
            return
        self.transport = transport
        self.origin = src.origin(transport, self.address)
        self.inlet = self.ctx.inlet(self.origin, AUTO)
        src.add(self)
        self.stats.connections_accepted += 1
        if self.inlet.held:
            self.pause()
            # uvloop starts reading right after connection_made, whatever was asked in it
            # (asyncio does not): pause again once it has.
            asyncio.get_running_loop().call_soon(self._repause)

    def data_received(self, data: bytes) -> None:
        inlet = self.inlet
        if inlet is None:  # never admitted: nothing of it is read
            return
        fc = self.framing
        if fc is None:
            fc = self.framing = self.stats.framing(OCTET if 48 <= data[0] <= 57 else LF)
        self.stats.received_bytes += len(data)
        result = inlet.reader.feed(data, inlet.received_at())
        if result.frames:
            self.last_frame = time.monotonic()
            if not self.framed:
                self.framed = True
                self.source.frameless.pop(self, None)
        self._handle(result, fc)
        if result.error is not None and self.transport is not None:
            self.transport.close()
        if self.transport is not None:
            self.ctx.budget.update(self, inlet.reader.buffered)
        # Its inlet may be held without a change announced (a reload moved it to a lagging
        # intake), or a pause asked in connection_made may not have held (uvloop): pause
        # (again; it costs nothing when paused). At shutdown it is read on (half_close)
        # whatever the pressure.
        if self.transport is not None and not self.source.stopping and self.inlet_held:
            self.pause()

    def eof_received(self) -> bool | None:
        inlet = self.inlet
        if inlet is None:
            return None
        # No byte ever came: nothing can be counted, in no framing.
        fc = self.framing if self.framing is not None else FramingCounters()
        self._handle(inlet.reader.close(inlet.received_at()), fc)
        return None

    def _handle(self, result: ChunkResult, fc: FramingCounters) -> None:
        ctx = self.ctx
        fc.frames += result.frames
        assert self.inlet is not None
        self.inlet.take(result)
        if result.oversized:
            self.stats.oversized_frames += result.oversized
            if not self.oversized_logged:  # logged once per connection, counted always
                self.oversized_logged = True
                # and rate-limited across connections: a sender reconnecting repeats it.
                ctx.quiet.warning("frame_too_large", listener=self.stats.name, peer=self.peer,
                                  **self.via, max_message_size=ctx.max_message_size,
                                  action="discarded, connection kept")
        if result.error is not None:
            fc.framing_errors += result.framing_errors
            # Rate-limited like every warning a flood repeats (one bad sender reconnecting).
            ctx.quiet.warning("framing_error", listener=self.stats.name, peer=self.peer,
                              **self.via, error=result.error, action="connection closed")

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
                               **self.via, buffered=self.buffered,
                               reason="listen.max_buffered_bytes reached")
        if self.transport is not None:
            # Abort, not FIN: reading on while half-closed would buffer again.
            self.transport.abort()
            self.source.remove(self)
            self.transport = None  # nothing it still reads counts (nor is read)
        # Free what its reader held now, not when the transport lets go of this protocol:
        # a new inlet (a new reader of the kind its routes want).
        if self.origin is not None:
            self.inlet = self.ctx.inlet(self.origin, AUTO)

    @property
    def inlet_held(self) -> bool:
        return self.inlet is not None and self.inlet.held

    def pressure_changed(self, now: float) -> None:
        if self.transport is None:
            return
        if self.inlet_held:
            if not self.paused:
                self.pause()
        elif self.paused:
            # Time spent paused is not idleness; a peer that never framed gets no credit.
            if self.framed:
                self.last_frame = max(self.last_frame, now)
            self.resume()

    def pause(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _repause(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
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


class TcpSource(StreamSource[TcpConnection]):
    """listen.tcp, and listen.tls (given a ServerTls)."""

    plain_kind = "tcp"
    tls_kind = "tls"

    def connection(self) -> asyncio.Protocol:
        return TcpConnection(self)

    def evict_one(self) -> bool:
        """At max_connections, make room by closing the connection whose last complete frame
        is oldest; one that never completed a frame goes first (oldest connect first).

        Without this, connections that say nothing, or trickle bytes, lock real senders out.
        A held connection (paused for its inlet) cannot complete a frame: of the framed
        ones, only those whose inlet is not held may go.
        """
        if not self.connections:
            return False
        if self.frameless:
            oldest = next(iter(self.frameless))
        else:
            free = [c for c in self.connections if not c.inlet_held]
            if not free:
                return False
            oldest = min(free, key=lambda conn: conn.last_frame)
        if oldest.transport is None:
            return False
        return self.evict(oldest)

    def _sweep(self) -> None:
        """listen.idle_timeout: close connections with no complete frame for that long.
        Not the held ones: paused connections cannot complete one."""
        if self.stopping:
            return
        limit = time.monotonic() - self.idle_timeout
        for conn in [c for c in self.connections
                     if c.last_frame < limit and not c.inlet_held]:
            self.idle_close(conn)
        self._schedule_sweep()

    async def stop(self, grace: float) -> None:
        """Stop accepting, then read what senders already wrote for up to `grace` seconds."""
        self._stop_accepting()
        for conn in list(self.connections):
            conn.half_close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        self.ctx.quiet.flush()
