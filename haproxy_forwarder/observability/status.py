"""Status endpoint: GET /metrics (Prometheus text) and GET /healthz (JSON, 200 or 503).

Health means "making progress", not "process alive": a backlog with no delivery for
`status.stall_after` seconds, or a spool that refuses writes, is unhealthy (the failure mode
of Sekoia's rsyslog concentrator was an output stalled silently while the process stayed up).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson

from .counters import Registry

MAX_REQUEST = 8192
READ_TIMEOUT = 5.0



def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(
    counters: dict[str, int], gauges: dict[str, float], info: dict[str, str] | None = None
) -> bytes:
    """Counters (they only go up) get the suffix _total; gauges keep their name; `info` is
    the constant 1 of haproxy_forwarder_build_info with its labels."""
    lines: list[str] = []
    if info:
        labels = ",".join(f'{k}="{_label(v)}"' for k, v in info.items())
        lines += ["# TYPE haproxy_forwarder_build_info gauge",
                  f"haproxy_forwarder_build_info{{{labels}}} 1"]
    for name, value in counters.items():
        metric = f"haproxy_forwarder_{name}_total"
        lines += [f"# TYPE {metric} counter", f"{metric} {value}"]
    for name, fvalue in gauges.items():
        lines += [f"# TYPE haproxy_forwarder_{name} gauge", f"haproxy_forwarder_{name} {fvalue:g}"]
    return ("\n".join(lines) + "\n").encode()


class StatusServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: Registry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        log: Any,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.health = health
        self.log = log
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, self.host, self.port,
                                                 reuse_address=True)
        addr = self.server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            parts = head.split(b" ", 2)
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            status, ctype, body = self._route(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n"
            % (status, b"OK" if status == 200 else b"Error", ctype, len(body))
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _route(self, method: bytes, path: bytes) -> tuple[int, bytes, bytes]:
        if method != b"GET":
            return 405, b"text/plain", b"only GET\n"
        if path == b"/metrics":
            r = self.registry
            text = prometheus(r.counters.snapshot(), r.gauges(), r.info)
            return 200, b"text/plain; version=0.0.4", text
        if path in (b"/healthz", b"/health"):
            ok, detail = self.health()
            return (200 if ok else 503), b"application/json", orjson.dumps(detail) + b"\n"
        return 404, b"text/plain", b"try /metrics or /healthz\n"


