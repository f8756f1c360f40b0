"""CPU and memory of one intake POST, per way of making it (issue 21, item 2).

    .venv/bin/python -m bench.request [--requests 300] [--events 5000] [--concurrency 4]
                                      [--rounds 5] [--identity] [--only NAME,...]

Posts gzip'd `/array` bodies of `--events` benchmark events (devtools.traffic.httplog_line,
~300 bytes each) to the lean bench intake (bench.intake: HTTPS on 127.0.0.1 with a trustme CA,
in its own process), `--concurrency` requests at a time, driven from a uvloop event loop as
the delivery workers do. Each variant runs in a fresh child process per round (rounds
interleaved, order rotated); per run it prints the process CPU per request (user + system of
all its threads: time.process_time, not wall time) and the peak RSS through the requests (VmHWM,
reset through /proc/self/clear_refs once the bodies are loaded and the client made) with its
rise over the RSS at that point: what the way of posting holds in memory.
Then the median and the range over the rounds.

Variants:
  intake        haproxy_forwarder's IntakeClient.post as shipped
  async-pieces  httpx.AsyncClient on the loop, the body in 64 KiB pieces (the client until
                issue 21), whole-request deadline by asyncio.timeout
  async-whole   the same with the body as one buffer
  sync-pieces   httpx.Client in `concurrency` threads (run_in_executor), 64 KiB pieces
  sync-whole    the same with the body as one buffer
  h11-sync      a bare h11 connection on a blocking TLS socket per thread: a floor for what
                a custom transport could save (not a candidate as such)
  h11-transport httpx.Client in threads over a minimal h11 transport (option b's prototype:
                no proxy, no deadline; what httpx's client layer adds to the floor)
`--identity` posts the same bodies uncompressed (~1.5 MB per 5,000 events), where the cost
of a whole-buffer write in memory shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from devtools.keys import INTAKE_KEY
from devtools.traffic import httplog_line

VARIANTS = ("intake", "async-pieces", "async-whole", "sync-pieces", "sync-whole", "h11-sync",
            "h11-transport")
PIECE = 64 * 1024
CAP = 64 * 1024
TS = "2026-11-26T21:58:51.000Z"
HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity",
           "User-Agent": "bench"}


def make_bodies(count: int, events: int, use_gzip: bool) -> list[bytes]:
    from haproxy_forwarder.batching import Batch
    from haproxy_forwarder.sinks.encoding import bodies_bounded

    rng = random.Random(2121)
    out = []
    for b in range(count):
        texts = [httplog_line(rng, b * events + i, 3600 + i // 1000) for i in range(events)]
        batch = Batch.from_events(texts, [TS] * events)
        [(_, body)] = bodies_bounded(batch, "array", INTAKE_KEY, use_gzip)
        out.append(body)
    return out


# -- the child: one variant, one run ---------------------------------------------------------

def cpu() -> float:
    # CLOCK_PROCESS_CPUTIME_ID: every thread of the process, to the nanosecond (os.times()
    # counts in 10 ms ticks).
    return time.process_time()


def vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def ssl_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=ca)
    return ctx


async def async_pieces(body: bytes) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(view), PIECE):
        yield view[start : start + PIECE]  # type: ignore[misc]


def sync_pieces(body: bytes) -> Iterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(view), PIECE):
        yield view[start : start + PIECE]  # type: ignore[misc]


Post = Callable[[bytes], Awaitable[None]]


def async_variant(url: str, ca: str, concurrency: int, whole: bool) -> tuple[Post, Any]:
    import httpx

    client = httpx.AsyncClient(
        headers=HEADERS, verify=ssl_context(ca), timeout=httpx.Timeout(30.0, connect=10.0),
        limits=httpx.Limits(max_connections=concurrency,
                            max_keepalive_connections=concurrency))

    async def post(body: bytes) -> None:
        content: Any = body if whole else async_pieces(body)
        async with asyncio.timeout(30.0):
            request = client.build_request("POST", url, content=content,
                                           headers={"Content-Length": str(len(body))})
            resp = await client.send(request, stream=True)
            answer = bytearray()
            try:
                async for chunk in resp.aiter_raw():
                    answer += chunk[: CAP - len(answer)]
                    if len(answer) >= CAP:
                        break
            finally:
                await resp.aclose()
        assert resp.status_code == 200, resp.status_code

    return post, client.aclose


def read_capped(resp: Any, deadline: float = float("inf")) -> int:
    """Read an answer up to CAP bytes (or the deadline), as the client does; its status."""
    answer = bytearray()
    try:
        for chunk in resp.iter_raw():
            answer += chunk[: CAP - len(answer)]
            if len(answer) >= CAP or time.monotonic() > deadline:
                break
    finally:
        resp.close()
    return int(resp.status_code)


def in_threads(pool: ThreadPoolExecutor, blocking: Callable[[bytes], int]) -> Post:
    """A `post` that runs the blocking one in `pool`, awaited under a 30 s deadline."""

    async def post(body: bytes) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30.0):
            status = await loop.run_in_executor(pool, blocking, body)
        assert status == 200, status

    return post


def sync_variant(url: str, ca: str, concurrency: int, whole: bool) -> tuple[Post, Any]:
    import httpx

    client = httpx.Client(
        headers=HEADERS, verify=ssl_context(ca), timeout=httpx.Timeout(30.0, connect=10.0),
        limits=httpx.Limits(max_connections=concurrency,
                            max_keepalive_connections=concurrency))
    pool = ThreadPoolExecutor(concurrency)

    def blocking(body: bytes) -> int:
        content: Any = body if whole else sync_pieces(body)
        deadline = time.monotonic() + 30.0
        request = client.build_request("POST", url, content=content,
                                       headers={"Content-Length": str(len(body))})
        return read_capped(client.send(request, stream=True), deadline)

    async def close() -> None:
        client.close()
        pool.shutdown()

    return in_threads(pool, blocking), close


def h11_variant(url: str, ca: str, concurrency: int) -> tuple[Post, Any]:
    import threading
    import urllib.parse

    import h11

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = ssl_context(ca)
    local = threading.local()
    pool = ThreadPoolExecutor(concurrency)
    head = [(k.encode(), v.encode()) for k, v in HEADERS.items()]

    def blocking(body: bytes) -> int:
        if getattr(local, "sock", None) is None:
            raw = socket.create_connection((host, port), timeout=10.0)
            local.sock = ctx.wrap_socket(raw, server_hostname=host)
            local.sock.settimeout(30.0)
            local.conn = h11.Connection(h11.CLIENT)
        sock, conn = local.sock, local.conn
        headers = [(b"Host", f"{host}:{port}".encode()), *head,
                   (b"Content-Length", str(len(body)).encode())]
        sock.sendall(conn.send(h11.Request(method="POST", target=parts.path or "/",
                                           headers=headers)))
        for piece in conn.send_with_data_passthrough(h11.Data(data=body)) or ():
            sock.sendall(piece)  # Content-Length framing: the body itself, not a copy
        conn.send(h11.EndOfMessage())
        status = 0
        answer = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer += event.data[: CAP - len(answer)]
            elif isinstance(event, h11.EndOfMessage):
                conn.start_next_cycle()
                return status

    async def post(body: bytes) -> None:
        loop = asyncio.get_running_loop()
        status = await loop.run_in_executor(pool, blocking, body)
        assert status == 200, status

    async def close() -> None:
        pool.shutdown()

    return post, close


def h11_transport_variant(url: str, ca: str, concurrency: int) -> tuple[Post, Any]:
    """httpx.Client over a minimal h11 transport (one kept-alive TLS socket per thread): what
    option (b) would cost with httpx's client layer kept on top. A prototype: no proxy, no
    pool across threads, no deadline."""
    import threading

    import h11
    import httpx

    ctx = ssl_context(ca)
    local = threading.local()

    class Answer(httpx.SyncByteStream):
        def __init__(self, sock: ssl.SSLSocket, conn: h11.Connection) -> None:
            self.sock, self.conn, self.done = sock, conn, False

        def __iter__(self) -> Iterator[bytes]:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(self.sock.recv(65536))
                elif isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self.done = True
                    return

        def close(self) -> None:
            if self.done:
                self.conn.start_next_cycle()
            else:
                self.sock.close()
                local.sock = None

    class H11Transport(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            url = request.url
            if getattr(local, "sock", None) is None:
                raw = socket.create_connection((url.host, url.port or 443), timeout=10.0)
                local.sock = ctx.wrap_socket(raw, server_hostname=url.host)
                local.sock.settimeout(30.0)
                local.conn = h11.Connection(h11.CLIENT)
            sock, conn = local.sock, local.conn
            sock.sendall(conn.send(h11.Request(method=request.method, target=url.raw_path,
                                               headers=request.headers.raw)))
            for chunk in request.stream:  # type: ignore[union-attr]
                for piece in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():
                    sock.sendall(piece)
            conn.send(h11.EndOfMessage())
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    return httpx.Response(event.status_code, headers=event.headers,
                                          stream=Answer(sock, conn))

    client = httpx.Client(headers=HEADERS, transport=H11Transport())
    pool = ThreadPoolExecutor(concurrency)

    def blocking(body: bytes) -> int:
        request = client.build_request("POST", url, content=body)
        return read_capped(client.send(request, stream=True))

    async def close() -> None:
        pool.shutdown()

    return in_threads(pool, blocking), close


def intake_variant(url: str, ca: str, concurrency: int) -> tuple[Post, Any]:
    from haproxy_forwarder.config import IntakeConfig
    from haproxy_forwarder.sinks.intake import IntakeClient, Kind

    client = IntakeClient(IntakeConfig(url=url, key=INTAKE_KEY, ca_file=Path(ca),
                                       concurrency=concurrency,
                                       gzip="Content-Encoding" in HEADERS))

    async def post(body: bytes) -> None:
        outcome = await client.post(body)
        assert outcome.kind is Kind.DELIVERED, outcome

    return post, client.aclose


async def child_run(variant: str, url: str, ca: str, bodies: list[bytes], requests: int,
                    concurrency: int) -> dict[str, float]:
    if variant == "intake":
        post, close = intake_variant(url, ca, concurrency)
    elif variant.startswith("async-"):
        post, close = async_variant(url + "/array", ca, concurrency, variant.endswith("whole"))
    elif variant.startswith("sync-"):
        post, close = sync_variant(url + "/array", ca, concurrency, variant.endswith("whole"))
    elif variant == "h11-transport":
        post, close = h11_transport_variant(url + "/array", ca, concurrency)
    else:
        post, close = h11_variant(url + "/array", ca, concurrency)
    todo = iter(range(requests))

    async def worker() -> None:
        for i in todo:
            await post(bodies[i % len(bodies)])

    # The memory a way of posting costs: the peak over the RSS before any request (the
    # bodies are loaded, the client made), warm-up included (freed buffers stay resident).
    reset_peak()
    rss0 = vm("VmRSS")
    # Connections open and code warm outside the measured CPU.
    await asyncio.gather(*(post(bodies[i % len(bodies)]) for i in range(2 * concurrency)))
    c0, t0 = cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    spent, wall = cpu() - c0, time.perf_counter() - t0
    out = {"cpu_ms": 1000 * spent / requests, "wall_ms": 1000 * wall / requests,
           "hwm_mib": vm("VmHWM"), "rise_mib": vm("VmHWM") - rss0}
    await close()
    return out


def child(argv: list[str]) -> None:
    import uvloop

    variant, url, ca, bodies_file, requests, concurrency, encoding = argv
    if encoding == "gzip":
        HEADERS["Content-Encoding"] = "gzip"
    with open(bodies_file, "rb") as f:
        bodies: list[bytes] = pickle.load(f)
    result = uvloop.run(child_run(variant, url, ca, bodies, int(requests), int(concurrency)))
    print(json.dumps(result))


# -- the driver --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(prog="python -m bench.request", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--bodies", type=int, default=8, help="distinct bodies, posted in turn")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--identity", action="store_true", help="bodies not gzip'd")
    p.add_argument("--only", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    variants = [v for v in args.only.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (one of {', '.join(VARIANTS)})")

    from .control import Intake

    with tempfile.TemporaryDirectory(prefix="bench-request-") as tmpdir:
        tmp = Path(tmpdir)
        bodies = make_bodies(args.bodies, args.events, not args.identity)
        bodies_file = tmp / "bodies.pickle"
        with open(bodies_file, "wb") as f:
            pickle.dump(bodies, f)
        size = statistics.mean(len(b) for b in bodies)
        print(f"{args.requests} requests per run, {args.events} events per body "
              f"({'identity' if args.identity else 'gzip'}, {size / 1024:,.0f} KiB on the "
              f"wire), concurrency {args.concurrency}, {args.rounds} rounds, "
              f"{os.cpu_count()} CPUs")
        intake = Intake(tmp).start()
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        try:
            for r in range(args.rounds):
                order = variants[r % len(variants):] + variants[: r % len(variants)]
                for v in order:
                    out = subprocess.run(
                        [sys.executable, "-m", "bench.request", "--child", v, intake.url,
                         str(intake.ca_file), str(bodies_file), str(args.requests),
                         str(args.concurrency), "identity" if args.identity else "gzip"],
                        check=False, capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"{v} failed:\n{out.stderr}")
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    runs[v].append(res)
                    print(f"  round {r + 1} {v:13} {res['cpu_ms']:6.3f} CPU-ms/request  "
                          f"peak {res['hwm_mib']:5.1f} MiB (+{res['rise_mib']:4.1f})",
                          flush=True)
        finally:
            intake.stop()
    print(f"\n{'variant':13} {'CPU-ms/request':>26} {'peak RSS MiB':>22} {'rise MiB':>18}")
    for v in variants:
        cols = []
        for key in ("cpu_ms", "hwm_mib", "rise_mib"):
            xs = [x[key] for x in runs[v]]
            cols.append(f"{statistics.median(xs):7.2f} ({min(xs):.2f}-{max(xs):.2f})")
        print(f"{v:13} {cols[0]:>26} {cols[1]:>22} {cols[2]:>18}")
    print("(median of the rounds, range in brackets; peak RSS is VmHWM through the requests, "
          "rise its excess over VmRSS before the first)")


if __name__ == "__main__":
    main()
