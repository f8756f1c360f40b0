"""UDP syslog source: one message per datagram, dropped (and counted) under backpressure.

Each sender address has its `Inlet` (its reader, where its events go, whether they must
wait), made at its first datagram and kept in a bounded cache: an inlet follows a reload of
the routes by itself, so the cache is never invalidated, only cleared when full. A datagram
whose inlet is held (its intake's delivery lags) is dropped, counted as udp_dropped."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from ..config import ListenConfig, Settings
from ..ingest import DATAGRAM
from ..observability import counters
from ..observability.counters import ListenerCounters
from ..routing import Origin
from .base import Inlet, SourceContext, listener_name, split_hostport
from .guard import Allow
from .udp_drops import kernel_drops, socket_inode

RMEM_MAX = "/proc/sys/net/core/rmem_max"
# Sender addresses whose inlet is kept; past it the cache is cleared (spoofed sources must
# not grow it without end; a sender seen again just gets a new inlet).
INLETS_MAX = 4096


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, source: UdpSource) -> None:
        self.ctx = source.ctx
        self.stats = source.stats
        self.framing = source.stats.framing(counters.DATAGRAM)
        self.source = source
        self.inlets: dict[str, Inlet] = {}

    def inlet(self, host: str) -> Inlet:
        """The inlet of the sender `host`: cached, made at its first datagram."""
        inlet = self.inlets.get(host)
        if inlet is None:
            if len(self.inlets) >= INLETS_MAX:
                self.inlets.clear()
            src = self.source
            origin = Origin(listener=self.stats.name, address=src.address, source=host)
            inlet = self.inlets[host] = self.ctx.inlet(origin, DATAGRAM)
        return inlet

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        ctx = self.ctx
        c = self.stats
        host = str(addr[0])
        if not self.source.allow.permits(host):
            c.access_denied += 1
            ctx.quiet.warning("datagram_denied", listener=c.name, peer=f"{addr[0]}:{addr[1]}",
                              reason="not in listen.allow")
            return
        c.received_bytes += len(data)
        inlet = self.inlet(host)
        if inlet.held:
            # A datagram cannot be held back: dropping it is the only bounded choice, and
            # it is counted so the loss is visible.
            c.udp_dropped += 1
            return
        result = inlet.reader.feed(data, inlet.received_at())
        c.oversized_frames += result.oversized
        self.framing.frames += result.frames
        inlet.take(result)

    def error_received(self, exc: Exception) -> None:
        self.ctx.log.warning("udp_error", error=str(exc))


class UdpSource:
    """listen.udp."""

    kind = "udp"
    # A datagram is no connection: the connections_open gauge leaves UDP out.
    open_connections = None

    def __init__(self, ctx: SourceContext, address: str, listen: ListenConfig) -> None:
        self.ctx = ctx
        self.rcvbuf = listen.udp_rcvbuf
        self._inode = 0
        self._family = 0
        self._drops_base = 0  # what earlier sockets of these counters dropped
        self.address = address  # as the config lists it: the ListenerSet's key
        self.host, self.port = split_hostport(address)
        self.allow = Allow(listen.allow)
        self._transport: asyncio.DatagramTransport | None = None
        self._stopping = False
        # Its `listener` label gets the bound port at start() (port 0 in tests), and it is
        # shown from then on: a listener that failed to bind has no series.
        self.stats = ListenerCounters(listener_name("udp", self.host, self.port))

    def configure(self, settings: Settings) -> None:
        """SIGHUP: listen.allow (the receive buffer is set once, at bind)."""
        self.allow = Allow(settings.listen.allow)

    def describe(self, settings: Settings) -> dict[str, Any]:
        return {}

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        sock = transport.get_extra_info("socket")
        addr = transport.get_extra_info("sockname")
        self.stats.name = listener_name("udp", addr[0], addr[1])
        self._set_rcvbuf(sock)
        self._inode, self._family = socket_inode(sock), sock.family
        self._drops_base = self.stats.udp_kernel_dropped
        self.stats.refresh = self._read_drops
        self.ctx.counters.add_listener(self.stats)
        return addr[0], addr[1]

    def _set_rcvbuf(self, sock: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        effective = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Linux doubles the request (its bookkeeping) after capping it at rmem_max: less than
        # twice the request means the cap cut it, and bursts are lost sooner than configured.
        extra: dict[str, Any] = {}
        if effective < 2 * self.rcvbuf:
            extra["capped"] = True
            with contextlib.suppress(OSError, ValueError), open(RMEM_MAX) as f:
                extra["rmem_max"] = int(f.read())
            extra["hint"] = "raise net.core.rmem_max (sysctl) for a larger buffer"
        self.ctx.log.info("udp_rcvbuf", listener=self.stats.name, requested=self.rcvbuf,
                          effective=effective, **extra)

    def _read_drops(self) -> None:
        # At scrape time; a socket already closed is gone from the table: the last count stays.
        n = kernel_drops(self._inode, self._family)
        if n is not None:
            self.stats.udp_kernel_dropped = self._drops_base + n

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

    async def stop(self, grace: float = 0.0) -> None:
        """Closed at once: a datagram socket has nothing in flight to wait for (`grace` is
        the stream listeners')."""
        self._stopping = True
        self.ctx.quiet.flush()
        if self._transport is not None:
            if self.stats.refresh is not None:
                self._read_drops()  # the last count, before the socket (and its row) goes
                self.stats.refresh = None
            self._transport.close()
