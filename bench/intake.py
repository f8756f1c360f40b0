"""A lean HTTPS fake intake for the benchmark, run in its own process.

tests/fake_intake.py validates everything and runs a thread per connection: right for tests,
too costly to sit on the other side of a throughput benchmark on a 2-core machine.  This one
is an asyncio (uvloop) HTTP/1.1 keep-alive server on 127.0.0.1 with a trustme CA; per request
it only gunzips the body (if Content-Encoding: gzip) and counts events with bytes.count:

  /array        one `{"intake_key":` per event
  /plain/batch  LF-separated events

In "latency" mode it also pulls the sequence number embedded in every benchmark event
(`|r000123456}` in the HAProxy captured-headers block) and keeps (receipt time, seqs)
for each request.  Times are time.monotonic(): CLOCK_MONOTONIC is system-wide on Linux,
so they compare with the sender's in another process.

It inflates with isal (python-isal, a dependency of the project): on this 2-core machine the
intake shares the CPU with the system under test, and zlib's inflate made it the ceiling of
the spool replay (about 1M events/s) and a tax on the gzip senders' end-to-end figure that
syslog-ng's plain bodies do not pay. `BENCH_INTAKE_INFLATE=zlib` puts zlib back, to compare.

Control: a multiprocessing Pipe; commands are tuples, answers are picklable values.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
import zlib
from array import array
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol, cast

from isal import isal_zlib

ARRAY_MARK = b'{"intake_key":'
LEAK_MARK = b"Accepted publickey"  # text of an sshd message: must never reach the intake
SEQ_RE = re.compile(rb"\|r(\d{9})\}")
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    b'{"event_ids":[]}'
)
RESPONSE_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
# gzip or zlib, by the header (wbits 32 + 15): what a real intake accepts.
INFLATE: Callable[[bytes, int], bytes] = (
    zlib.decompress if os.environ.get("BENCH_INTAKE_INFLATE") == "zlib" else isal_zlib.decompress)
# isal_zlib.error is the IsalError class; its stub types it as an instance.
INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, cast(type[Exception], isal_zlib.error))


class State:
    def __init__(self) -> None:
        self.reset("count")

    def reset(self, mode: str) -> None:
        self.mode = mode
        self.events = 0
        self.requests = 0
        self.bytes_wire = 0
        self.bytes_plain = 0
        self.leaked = 0
        self.bad = 0
        self.first_t = 0.0
        self.last_t = 0.0
        self.paths: dict[str, int] = {}
        self.gzip_requests = 0
        self.sample = b""
        # latency mode: one receipt time per request, and the seqs it carried
        self.lat_times: list[float] = []
        self.lat_seqs: list[bytes] = []
        # (time, cumulative events) per request, for steady-state rates
        self.timeline: array[float] = array("d")
        self.cpu0 = os.times()

    def snapshot(self) -> dict[str, Any]:
        t = os.times()
        return {
            "events": self.events,
            "requests": self.requests,
            "bytes_wire": self.bytes_wire,
            "bytes_plain": self.bytes_plain,
            "leaked": self.leaked,
            "bad": self.bad,
            "first_t": self.first_t,
            "last_t": self.last_t,
            "paths": dict(self.paths),
            "gzip_requests": self.gzip_requests,
            "sample": self.sample[:400].decode("utf-8", "replace"),
            "cpu": (t.user - self.cpu0.user) + (t.system - self.cpu0.system),
        }


class HttpConn(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.head: tuple[str, int, bool, bool] | None = None  # path, length, gzip, chunked
        self.body_start = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        buf = self.buf
        if self.head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(buf[:end]).split(b"\r\n")
            try:
                _method, target, _ver = lines[0].split(b" ", 2)
            except ValueError:
                self._fail()
                return False
            length, gz, chunked = 0, False, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"content-encoding":
                    gz = b"gzip" in value.lower()
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
            path = target.split(b"?", 1)[0].decode("latin-1")
            self.head = (path, length, gz, chunked)
            self.body_start = end + 4
        path, length, gz, chunked = self.head
        if chunked:
            body, consumed = _dechunk(buf, self.body_start)
            if body is None:
                return False
        else:
            consumed = self.body_start + length
            if len(buf) < consumed:
                return False
            body = bytes(buf[self.body_start : consumed])
        del buf[:consumed]
        self.head = None
        self._request(path, body, gz)
        return True

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.write(RESPONSE_400)
            self.transport.close()

    def _request(self, path: str, body: bytes, gz: bool) -> None:
        st = self.state
        now = time.monotonic()
        st.bytes_wire += len(body)
        if gz:
            st.gzip_requests += 1
            try:
                body = INFLATE(body, 47)
            except INFLATE_ERRORS:
                st.bad += 1
                self._fail()
                return
        st.bytes_plain += len(body)
        if not st.sample:
            st.sample = body[:400]
        if path.endswith("/array"):
            n = body.count(ARRAY_MARK)
        elif body:
            n = body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
        else:
            n = 0
        if LEAK_MARK in body:
            st.leaked += body.count(LEAK_MARK)
        if st.mode == "latency":
            st.lat_times.append(now)
            st.lat_seqs.append(b" ".join(SEQ_RE.findall(body)))
        st.events += n
        st.requests += 1
        st.paths[path] = st.paths.get(path, 0) + 1
        if not st.first_t:
            st.first_t = now
        st.last_t = now
        st.timeline.append(now)
        st.timeline.append(float(st.events))
        assert self.transport is not None
        self.transport.write(RESPONSE)


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes | None, int]:
    out: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0] or b"0", 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # no trailers expected
            if end < 0:
                return None, 0
            return b"".join(out), end + 2
        if len(buf) < pos + size + 2:
            return None, 0
        out.append(bytes(buf[pos : pos + size]))
        pos += size + 2


def serve(conn: Connection, cert_pem: bytes, key_pem: bytes, tmpdir: str) -> None:
    """Process entry point: bind, report the port, then serve until told to stop."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(_main(conn, cert_pem, key_pem, tmpdir))


async def _main(conn: Connection, cert_pem: bytes, key_pem: bytes, tmpdir: str) -> None:
    cert = os.path.join(tmpdir, "intake-cert.pem")
    key = os.path.join(tmpdir, "intake-key.pem")
    with open(cert, "wb") as f:
        f.write(cert_pem)
    with open(key, "wb") as f:
        f.write(key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    state = State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpConn(state), "127.0.0.1", 0, ssl=ctx, backlog=128, reuse_address=True
    )
    conn.send(("port", server.sockets[0].getsockname()[1]))
    await answer_commands(conn, state, latency=lambda: (state.lat_times, state.lat_seqs))
    server.close()


class Counting(Protocol):
    """What a bench server counts, as answer_commands serves it."""

    timeline: array[float]

    def reset(self, mode: str, /) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...


async def answer_commands(conn: Connection, state: Counting,
                          **more: Callable[[], Any]) -> None:
    """The child's side of bench.control.Child: answer reset / stats / timeline (and the
    commands in `more`) on the pipe until `stop` or the driver is gone."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_command() -> None:
        # the loop made the pipe non-blocking; a large answer must not fail with EAGAIN
        os.set_blocking(conn.fileno(), True)
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            done.set()
            return
        op = cmd[0]
        if op == "reset":
            state.reset(cmd[1])
            conn.send("ok")
        elif op == "stats":
            conn.send(state.snapshot())
        elif op == "timeline":
            conn.send(state.timeline.tobytes())
        elif op in more:
            conn.send(more[op]())
        elif op == "stop":
            conn.send("bye")
            done.set()

    loop.add_reader(conn.fileno(), on_command)
    await done.wait()
    loop.remove_reader(conn.fileno())
