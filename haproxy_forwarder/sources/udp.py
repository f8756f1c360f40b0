"""UDP syslog source: one message per datagram, dropped (and counted) under backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from ..ingest import DATAGRAM
from ..observability import counters
from ..observability.counters import ListenerCounters
from .base import SourceContext, listener_name

# A large receive buffer absorbs bursts while a batch is being encoded.
RCVBUF = 8 * 1024 * 1024


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, source: UdpSource) -> None:
        self.ctx = source.ctx
        self.reader = self.ctx.reader(DATAGRAM)
        self.stats = source.stats
        self.framing = source.stats.framing(counters.DATAGRAM)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        ctx = self.ctx
        c = self.stats
        c.received_bytes += len(data)
        if ctx.pressure.on:
            # A datagram cannot be held back: dropping it is the only bounded choice, and
            # it is counted so the loss is visible.
            c.udp_dropped += 1
            return
        result = self.reader.feed(data, ctx.sink.received_at())
        c.oversized_frames += result.oversized
        self.framing.frames += result.frames
        ctx.sink.take(result)

    def error_received(self, exc: Exception) -> None:
        self.ctx.log.warning("udp_error", error=str(exc))


class UdpSource:
    def __init__(self, ctx: SourceContext, host: str, port: int) -> None:
        self.ctx = ctx
        self.host = host
        self.port = port
        self._transport: asyncio.DatagramTransport | None = None
        self._stopping = False
        # Its `listener` label gets the bound port at start() (port 0 in tests), and it is
        # shown from then on: a listener that failed to bind has no series.
        self.stats = ListenerCounters(listener_name("udp", host, port))

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        addr = transport.get_extra_info("sockname")
        self.stats.name = listener_name("udp", addr[0], addr[1])
        self.ctx.counters.add_listener(self.stats)
        return addr[0], addr[1]

    @property
    def name(self) -> str:
        return self.stats.name

    @property
    def listening(self) -> bool:
        """Bound and reading: False before start(), after stop(), or if the socket closed."""
        return self._transport is not None and not self._transport.is_closing()

    @property
    def down(self) -> bool:
        """Started, not stopped by us, and yet closed (a fatal socket error closes it)."""
        t = self._transport
        return t is not None and not self._stopping and t.is_closing()

    async def stop(self) -> None:
        self._stopping = True
        if self._transport is not None:
            self._transport.close()
