"""asyncio TCP and UDP syslog listeners: bytes from sockets into the pipeline.

Thin by design: framing and header reading are sans-IO modules; here we only move bytes,
enforce connection limits and apply backpressure (pause_reading) when delivery lags.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any, Protocol, cast

from .syslog.framing import FrameDecoder


class Sink(Protocol):
    """What the listeners feed: the pipeline."""

    counters: Any
    log: Any
    paused: bool

    def ingest(self, frames: list[bytes]) -> None: ...


class TcpConnection(asyncio.Protocol):
    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.sink = listener.sink
        self.decoder = FrameDecoder(listener.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.oversized_seen = 0
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        transport = cast(asyncio.Transport, transport)
        c = self.sink.counters
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if (
            len(self.listener.connections) >= self.listener.max_connections
            and not self.listener.evict_idle()
        ):
            # Refuse instead of buffering: an unbounded number of paused connections is
            # how peers ran out of memory (Vector #8238).
            c.connections_refused += 1
            self.sink.log.warning(
                "connection_refused", peer=self.peer, reason="listen.max_connections reached"
            )
            transport.abort()
            return
        self.transport = transport
        self.listener.connections.add(self)
        c.connections_accepted += 1
        c.connections_open += 1
        if self.sink.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        dec = self.decoder
        c = self.sink.counters
        c.received_bytes += len(data)
        frames = dec.feed(data)
        if frames:
            self.sink.ingest(frames)
        if dec.oversized != self.oversized_seen:
            c.oversized_frames += dec.oversized - self.oversized_seen
            if not self.oversized_seen:  # logged once per connection, counted always
                self.sink.log.warning(
                    "frame_too_large",
                    peer=self.peer,
                    max_message_size=self.listener.max_message_size,
                    action="discarded, connection kept",
                )
            self.oversized_seen = dec.oversized
        if dec.error is not None:
            c.framing_errors += 1
            self.sink.log.warning("framing_error", peer=self.peer, error=dec.error,
                                  action="connection closed")
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool | None:
        frames = self.decoder.close()
        if frames:
            self.sink.ingest(frames)
        if self.decoder.error is not None:
            self.sink.counters.framing_errors += 1
            self.sink.log.warning("framing_error", peer=self.peer, error=self.decoder.error,
                                  action="connection closed")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.listener.connections.discard(self)
            self.sink.counters.connections_open -= 1
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


class TcpListener:
    def __init__(self, sink: Sink, host: str, port: int, max_message_size: int,
                 max_connections: int, evict_idle_after: float = 300.0) -> None:
        self.sink = sink
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.max_connections = max_connections
        self.evict_idle_after = evict_idle_after
        self.connections: set[TcpConnection] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: TcpConnection(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        addr = self.server.sockets[0].getsockname()
        return addr[0], addr[1]

    def evict_idle(self) -> bool:
        """At the connection limit, make room by closing the longest-idle connection.

        Without this, a handful of clients that connect and say nothing would lock real
        senders out. Never while paused: under backpressure every connection looks idle.
        """
        if self.sink.paused or not self.connections:
            return False
        oldest = min(self.connections, key=lambda conn: conn.last_active)
        idle = time.monotonic() - oldest.last_active
        if idle < self.evict_idle_after or oldest.transport is None:
            return False
        self.sink.counters.connections_evicted += 1
        self.sink.log.warning("connection_evicted_idle", peer=oldest.peer, idle=round(idle, 1),
                              reason="listen.max_connections reached")
        # A FIN first: rsyslog checks for it before writing, so it reconnects cleanly.
        oldest.half_close()
        oldest.transport.close()
        self.connections.discard(oldest)
        return True

    def pause(self) -> None:
        for conn in self.connections:
            conn.pause()

    def resume(self) -> None:
        for conn in self.connections:
            conn.resume()

    async def stop(self, grace: float) -> None:
        """Stop accepting, then read what senders already wrote for up to `grace` seconds."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.half_close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, listener: UdpListener) -> None:
        self.listener = listener
        self.sink = listener.sink

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        c = self.sink.counters
        c.received_bytes += len(data)
        if self.sink.paused:
            # A datagram cannot be held back: dropping it is the only bounded choice, and
            # it is counted so the loss is visible.
            c.udp_dropped += 1
            return
        if len(data) > self.listener.max_message_size:
            c.oversized_frames += 1
            return
        # One message per datagram; HAProxy and rsyslog end it with a LF.
        if data.endswith(b"\n"):
            data = data[:-1]
        if data:
            self.sink.ingest([data])

    def error_received(self, exc: Exception) -> None:
        self.sink.log.warning("udp_error", error=str(exc))


class UdpListener:
    def __init__(self, sink: Sink, host: str, port: int, max_message_size: int) -> None:
        self.sink = sink
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.transport: asyncio.DatagramTransport | None = None

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: UdpProtocol(self), local_addr=(self.host, self.port)
        )
        self.transport = transport
        sock = transport.get_extra_info("socket")
        # A large receive buffer absorbs bursts while a batch is being encoded.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        addr = transport.get_extra_info("sockname")
        return addr[0], addr[1]

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
