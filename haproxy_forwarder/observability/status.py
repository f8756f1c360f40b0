"""Status endpoint: GET /metrics (Prometheus), /healthz (liveness) and /readyz (readiness).

Health means "making progress", not "process alive": a backlog with no delivery for
`status.stall_after` seconds, a spool that refuses writes, or a listener that closed under us
is unhealthy (the failure mode of Sekoia's rsyslog concentrator was an output stalled silently
while the process stayed up). Ready means "send me traffic": every listener bound and the
spool recovered; not ready again from the moment shutdown starts, while it drains.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from .counters import Registry
from .prometheus import exposition, metrics_registry
from .quiet import QuietLog

MAX_REQUEST = 8192
# The whole request head must come within this, however it trickles.
READ_TIMEOUT = 5.0
# A client that does not read its answer is closed after this.
WRITE_TIMEOUT = 10.0
# Connections served at once. Scrapers and probes need a few; idle connections past it would
# only take descriptors the syslog listeners need. At the cap a new connection takes the
# place of the oldest one (one still sending its request first: idle or trickling; then one
# not reading its answer): a probe answers in a millisecond, so sockets held open by a slow
# or idle client can no longer lock /healthz out and have a health check kill a daemon that
# works.
MAX_CONNECTIONS = 16

Check = Callable[[], tuple[bool, dict[str, Any]]]

_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed",
            503: b"Service Unavailable"}


def _header(head: bytes, name: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""


class StatusServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: Registry,
        health: Check,
        log: Any,
        ready: Check | None = None,
        live: Check | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.health = health
        self.ready = ready or health
        self.live = live or health
        self.log = log
        self.metrics = metrics_registry(registry)
        self.server: asyncio.Server | None = None
        # Connections being served, oldest first -> True while their request is still coming.
        self.clients: dict[asyncio.StreamWriter, bool] = {}
        self.quiet = QuietLog(log)

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, self.host, self.port,
                                                 reuse_address=True, limit=MAX_REQUEST)
        addr = self.server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(self.clients) >= MAX_CONNECTIONS:
            self._evict()
        self.clients[writer] = True
        try:
            await self._serve(reader, writer)
        finally:
            self.clients.pop(writer, None)

    def _evict(self) -> None:
        """Make room for a new connection: close the oldest one still sending its request, or
        else the oldest one being answered (rate-limited warning: a flood repeats it)."""
        victim = next((w for w, reading in self.clients.items() if reading),
                      next(iter(self.clients)))
        reading = self.clients.pop(victim)
        peer = victim.get_extra_info("peername")
        self.quiet.warning("status_connection_evicted",
                           peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
                           state="sending its request" if reading else "not reading its answer",
                           reason=f"status endpoint at {MAX_CONNECTIONS} connections",
                           action="closed for a new connection")
        # Its handler sees the connection lost and ends (its finally finds it gone already).
        victim.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            parts = head.split(b" ", 2)
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            status, ctype, body = self._route(method, path, head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        if writer in self.clients:
            self.clients[writer] = False  # answered: evicted after those still asking
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n"
            % (status, _REASONS.get(status, b"Error"), ctype, len(body))
            + body
        )
        try:
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except TimeoutError:
            writer.transport.abort()
            return
        except ConnectionError:
            pass
        writer.close()

    def _route(self, method: bytes, path: bytes, head: bytes) -> tuple[int, bytes, bytes]:
        if method != b"GET":
            return 405, b"text/plain", b"only GET\n"
        if path == b"/metrics":
            body, ctype = exposition(self.metrics, _header(head, b"accept"))
            return 200, ctype.encode(), body
        if path in (b"/healthz", b"/health"):
            return self._json(self.health)
        if path == b"/readyz":
            return self._json(self.ready)
        if path == b"/livez":
            return self._json(self.live)
        return 404, b"text/plain", b"try /metrics, /healthz, /readyz or /livez\n"

    @staticmethod
    def _json(check: Check) -> tuple[int, bytes, bytes]:
        ok, detail = check()
        return (200 if ok else 503), b"application/json", orjson.dumps(detail) + b"\n"
