"""The intake client's pure parts: answer classification, Retry-After, backoff; and the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devtools.daemon import Daemon
from devtools.traffic import octet_counted, send_tcp, traditional
from haproxy_forwarder.delivery import Backoff
from haproxy_forwarder.sinks.intake import Kind, Outcome, classify, parse_retry_after
from tests.fake_intake import FakeIntake


@pytest.mark.parametrize(
    ("status", "kind"),
    [(200, Kind.DELIVERED), (202, Kind.DELIVERED), (204, Kind.DELIVERED),
     (408, Kind.RETRY), (429, Kind.RETRY), (500, Kind.RETRY), (502, Kind.RETRY),
     (503, Kind.RETRY), (504, Kind.RETRY), (413, Kind.TOO_LARGE), (400, Kind.REJECTED),
     (422, Kind.REJECTED), (401, Kind.AUTH), (403, Kind.AUTH), (404, Kind.AUTH),
     (405, Kind.AUTH)],
)
def test_classify(status: int, kind: Kind) -> None:
    assert classify(status, "", None).kind is kind


def test_retry_after_seconds_date_and_garbage() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("999999") == 600.0  # capped: a bogus header cannot park us for days
    now = time.time()
    in_30s = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(in_30s, now=now) == pytest.approx(30, abs=1)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert classify(429, "", "3").retry_after == 3.0


def test_backoff_full_jitter_bounds_and_retry_after() -> None:
    wait = Backoff(retry_max=60.0, auth_retry=60.0)
    transient = Outcome(Kind.RETRY, 503)
    for attempt, cap in [(1, 0.5), (2, 1.0), (4, 4.0), (20, 60.0)]:
        samples = [wait.delay(attempt, transient) for _ in range(300)]
        assert min(samples) >= 0.5 and max(samples) <= cap
    assert max(wait.delay(20, transient) for _ in range(300)) > 30  # jitter spans the range
    # Retry-After replaces the jittered wait.
    assert wait.delay(10, Outcome(Kind.RETRY, 429, retry_after=2.0)) == 2.0
    # A refused key is retried slowly (auth_retry, +-20 %), never given up.
    auth = [wait.delay(1, Outcome(Kind.AUTH, 401)) for _ in range(100)]
    assert min(auth) >= 48 and max(auth) <= 72
    # A Retry-After on an auth answer can only lengthen the slow wait, never shorten it.
    assert wait.delay(1, Outcome(Kind.AUTH, 403, retry_after=500.0)) == 500.0
    assert wait.delay(1, Outcome(Kind.AUTH, 403, retry_after=1.0)) >= 48


@contextlib.contextmanager
def connect_proxy() -> Iterator[tuple[int, list[str]]]:
    """A minimal HTTP CONNECT proxy on loopback, recording the targets it tunnelled to."""
    seen: list[str] = []
    ready = threading.Event()
    port: list[int] = []
    loop = asyncio.new_event_loop()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            w.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            w.close()
            return
        seen.append(target)
        host, _, p = target.rpartition(":")
        ur, uw = await asyncio.open_connection(host, int(p))
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await stop[0].wait()
        server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(5)
    try:
        yield port[0], seen
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(5)


def test_intake_proxy_is_used(intake: FakeIntake, daemon: Callable[..., Daemon]) -> None:
    with connect_proxy() as (port, seen):
        d = daemon(intake, intake={"proxy": f"http://127.0.0.1:{port}"})
        send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "through the proxy")]))
        assert intake.wait_for(1, 20)
        assert [e.event for e in intake.events] == ["through the proxy"]
        assert seen and seen[0] == f"127.0.0.1:{intake.port}"


def test_https_proxy_environment_is_honoured(intake: FakeIntake,
                                             daemon: Callable[..., Daemon]) -> None:
    with connect_proxy() as (port, seen):
        env: dict[str, Any] = {"HTTPS_PROXY": f"http://127.0.0.1:{port}", "NO_PROXY": ""}
        d = daemon(intake, env=env)
        send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "env proxy")]))
        assert intake.wait_for(1, 20)
        assert seen and seen[0] == f"127.0.0.1:{intake.port}"


@pytest.mark.parametrize("endpoint", ["plain-batch", "array"])
def test_large_bodies_are_streamed_with_a_content_length(intake: FakeIntake,
                                                         endpoint: str) -> None:
    """Large bodies (several TLS records, several socket writes) are framed as one
    Content-Length body, never chunked; what arrives is the whole body, and small bodies are
    unchanged."""
    from haproxy_forwarder.batching import Batch
    from haproxy_forwarder.config import IntakeConfig
    from haproxy_forwarder.sinks.intake import IntakeClient, IntakeSink
    from tests.conftest import intake_section

    cfg = IntakeConfig(**intake_section(intake, endpoint=endpoint, gzip=False))
    texts = [f"event {i} " + "x" * 300 for i in range(1000)]
    big = Batch.from_events(texts, ["2026-12-01T00:00:00.000Z"] * len(texts))
    small = Batch.from_events(["small one"], ["2026-12-01T00:00:00.000Z"])

    async def go() -> list[Kind]:
        sink = IntakeSink(IntakeClient(cfg), endpoint, False)
        try:
            kinds = [o.kind for b in (big, small) for _, o in await sink.send(b)]
        finally:
            await sink.aclose()
        return kinds

    assert asyncio.run(go()) == [Kind.DELIVERED, Kind.DELIVERED]
    assert intake.event_texts() == [*texts, "small one"]
    reqs = intake.requests
    assert reqs[0]["body_size"] > 4 * 65536 > reqs[1]["body_size"]
    for r in reqs:
        assert "transfer-encoding" not in r["headers"]
        assert int(r["headers"]["content-length"]) == r["body_size"]


def test_a_batch_of_several_bodies_stops_at_the_first_refused_one() -> None:
    """After a body is not accepted the others are not sent, and carry no verdict of its:
    NOT_SENT (delivery sends them again), never the refused body's 400."""
    import httpx
    import orjson

    from haproxy_forwarder.batching import Batch
    from haproxy_forwarder.config import IntakeConfig
    from haproxy_forwarder.sinks.intake import IntakeClient, IntakeSink

    seen: list[list[str]] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append([x["json"] for x in orjson.loads(request.read())])

        def body() -> Any:
            yield b'{"message": "malformed"}'

        return httpx.Response(400, content=body())

    cfg = IntakeConfig(url="https://127.0.0.1:9", key="K3y", gzip=False)
    batch = Batch.from_events(["a", "b", "c"], ["2026-12-01T00:00:00.000Z"] * 3)

    async def go() -> list[tuple[list[str], Kind, int | None]]:
        sink = IntakeSink(IntakeClient(cfg, transport=httpx.MockTransport(refuse)), "array",
                          False, max_body=100)  # one event per body
        try:
            return [(b.events(), o.kind, o.status) for b, o in await sink.send(batch)]
        finally:
            await sink.aclose()

    assert asyncio.run(go()) == [(["a"], Kind.REJECTED, 400), (["b"], Kind.NOT_SENT, None),
                                 (["c"], Kind.NOT_SENT, None)]
    assert seen == [["a"]]


# --- a request that hangs on a real TLS connection: the deadline and shutdown end it -------

@contextlib.contextmanager
def silent_tls_intake(tmp: Any) -> Iterator[tuple[str, Any, list[float]]]:
    """An HTTPS server on loopback that reads the request and never answers; records when
    each connection was closed by the client (its EOF)."""
    import socket
    import ssl

    import trustme

    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    closed: list[float] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            raw, _ = listener.accept()
            with ctx.wrap_socket(raw, server_side=True) as conn:
                while conn.recv(65536):
                    pass
                closed.append(time.monotonic())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}", ca_file, closed
    finally:
        listener.close()
        thread.join(5)


def test_a_hanging_request_lets_go_of_its_connection_at_the_deadline(tmp_path: Any) -> None:
    """The worker gets its retry at intake.timeout, and the thread making the request is not
    left blocked on the socket: the connection is closed then, not at a later read timeout."""
    from haproxy_forwarder.config import IntakeConfig
    from haproxy_forwarder.sinks.intake import IntakeClient

    with silent_tls_intake(tmp_path) as (url, ca_file, closed):
        cfg = IntakeConfig(url=url, key="K3y", ca_file=ca_file, timeout=0.5)
        client = IntakeClient(cfg)

        async def go() -> Outcome:
            try:
                return await client.post(b"[]")
            finally:
                # Not closed before the server saw the connection end: the deadline did it.
                deadline = time.monotonic() + 5
                while not closed and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                await client.aclose()

        start = time.monotonic()
        outcome = asyncio.run(go())
    assert (outcome.kind, outcome.uncertain) == (Kind.RETRY, True)
    assert outcome.detail == "no answer within intake.timeout (0.5 s)"
    assert closed and closed[0] - start < 2.0


def test_shutdown_ends_a_hanging_request_at_once(tmp_path: Any) -> None:
    """The daemon stopping (the worker cancelled, the sink closed) while a request hangs with a
    long intake.timeout: the request's socket is shut down, nothing waits for the timeout."""
    from haproxy_forwarder.config import IntakeConfig
    from haproxy_forwarder.sinks.intake import IntakeClient

    with silent_tls_intake(tmp_path) as (url, ca_file, closed):
        client = IntakeClient(IntakeConfig(url=url, key="K3y", ca_file=ca_file, timeout=60))

        async def go() -> None:
            task = asyncio.create_task(client.post(b"[]"))
            await asyncio.sleep(0.5)  # connected, sent, waiting for the answer
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()

        start = time.monotonic()
        asyncio.run(go())
        assert time.monotonic() - start < 3
        deadline = time.monotonic() + 5
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
    assert closed and closed[0] - start < 3
