"""The Sekoia.io intake sink: bodies encoded off the loop, one POST each, answers classified.

Requests are made by a synchronous httpx.Client in threads of the client's own, the event loop
awaiting each: measured (bench/request.py) at 0.3-0.4 ms less CPU per request than
httpx.AsyncClient on the loop, whose anyio locks and cancel scopes per request cost more than a
thread hand-off. No httpx exception leaves this module; the delivery loop only sees Outcome
values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import enum
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from .. import __version__
from ..batching import Batch
from ..config import MAX_REQUEST_BYTES, IntakeConfig
from ..observability import logs
from ..observability.logs import MASK
from .encoding import bodies_bounded

# Cap what a Retry-After may impose, so a bogus header cannot park delivery for days.
MAX_RETRY_AFTER = 600.0
# A body is written whole, in one call: on a blocking TLS socket OpenSSL encrypts it record by
# record straight into the kernel (no memory BIO, so no copy of the body as on the event
# loop's TLS, which is why it went in 64 KiB pieces there). Measured with 1.5 MB bodies,
# 4 at a time: +1.3 MiB peak RSS, against +3.4 MiB in 64 KiB pieces on the loop and +15.7 MiB
# whole on the loop.
# At most this much of an answer is read: enough to classify it and log a detail. The rest is
# not read (the connection is closed instead), so a huge or endless answer costs nothing.
ANSWER_CAP = 64 * 1024


class Kind(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # transient: network, timeout, 408, 429, 5xx
    AUTH = "auth"  # 401/403/404...: configuration problem, retried slowly and loudly
    TOO_LARGE = "too_large"  # 413: split and retry the halves
    REJECTED = "rejected"  # 400: never retried, dead-lettered
    # A body of the batch never sent (an earlier body was not accepted): no verdict on its
    # events, which are sent again (worker.judge), never judged by another body's answer.
    NOT_SENT = "not_sent"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    status: int | None = None
    detail: str = ""
    retry_after: float | None = None
    # True when the request may have been processed although we got no answer: a retry
    # can then duplicate events (a timeout after sending).
    uncertain: bool = False
    # Seconds the request took; None for parts never sent (skipped after a failed part):
    # delivery records one latency and one status class per request from it.
    elapsed: float | None = field(default=None, compare=False)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    # isdigit() alone is true of '²' (a latin-1 byte from a proxy), which float() refuses.
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(delay, 0.0), MAX_RETRY_AFTER)


def classify(status: int, body: str, retry_after: str | None) -> Outcome:
    detail = body[:500]
    if 200 <= status < 300:
        return Outcome(Kind.DELIVERED, status)
    if status in (408, 429) or status >= 500:
        return Outcome(Kind.RETRY, status, detail, parse_retry_after(retry_after))
    if status == 413:
        return Outcome(Kind.TOO_LARGE, status, detail)
    if status in (400, 422):
        return Outcome(Kind.REJECTED, status, detail)
    # 401/403 (wrong key), 404/405 (wrong URL) and the rest: fixing the config lets it flow,
    # so the data is kept and retried rather than discarded (rsyslog #4636).
    return Outcome(Kind.AUTH, status, detail, parse_retry_after(retry_after))


class _Aborted(OSError):
    """The request's deadline passed, or the client closed: its socket is shut down."""


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity (IntakeClient._in_flight)
class _Exchange:
    """How far one request got, for classifying it when the deadline cuts it short.

    Written by the thread making the request, read by the loop; `abort` (from the loop) shuts
    down the socket the request is using, which wakes a thread blocked on it at once."""

    sent: bool = False  # the whole body was handed to the connection
    status: int | None = None
    retry_after: str | None = None
    answer: bytearray = field(default_factory=bytearray)
    aborted: bool = False
    sock: socket.socket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def uses(self, sock: socket.socket) -> None:
        # Under the lock: an abort either sees this socket, or this sees the abort.
        with self.lock:
            if self.aborted:
                raise _Aborted("request aborted (intake.timeout or shutdown)")
            self.sock = sock

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            sock = self.sock
        if sock is not None:
            # socket.socket's own: SSLSocket.shutdown would drop the TLS object under a
            # thread still inside a read or write of it. Already closed: nothing to end.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


# The exchange of the request the current thread is making (set by the thread's job).
_current = threading.local()


class _TrackedSocket(ssl.SSLSocket):
    """The intake's TLS sockets (through SSLContext.sslsocket_class): each read or write first
    tells the request in flight on this thread which socket it uses, so that its deadline
    can shut it down."""

    def _note(self) -> None:
        exchange: _Exchange | None = getattr(_current, "exchange", None)
        if exchange is not None:
            exchange.uses(self)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        self._note()
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self._note()
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._note()
        return super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._note()
        super().sendall(data, flags)


def _whole(body: bytes, progress: _Exchange) -> Iterator[bytes]:
    yield body
    # Resumed only once the transport wrote it.
    progress.sent = True


class _Threads:
    """Daemon threads making blocking requests, up to `size`, started as needed and kept.

    Not a ThreadPoolExecutor: its threads are joined at the interpreter's exit, so a request
    hanging where no abort reaches it (a connect, a proxy's CONNECT) would hold the exit."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any],
                                            Callable[[], Any]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._size:
                t = threading.Thread(target=self._run, daemon=True,
                                     name=f"{self._name}-{len(self._threads)}")
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1
        self._jobs.put((fut, fn))
        return fut

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the awaiting coroutine
                    fut.set_exception(exc)
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def key_forms(key: str) -> list[str]:
    """The key as it can come back in an answer: as is, URL-encoded, JSON-escaped."""
    if not key:
        return []
    forms = {key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key),
             orjson.dumps(key).decode()[1:-1]}
    return sorted(forms, key=len, reverse=True)


def scrub(text: str, key: str) -> str:
    """`text` without the key in any form (an intake or proxy may echo the request)."""
    for form in key_forms(key):
        text = text.replace(form, MASK)
    return logs.redact(text)


def _ssl_context(cfg: IntakeConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.sslsocket_class = _TrackedSocket
    if cfg.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
    if cfg.insecure_skip_verify:
        # Asked for explicitly (intake.insecure_skip_verify); the daemon warns at each start.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class IntakeClient:
    """Keep-alive HTTPS client for one intake endpoint.

    `transport` replaces the network (tests: httpx.MockTransport); None in the daemon. A
    synchronous one (httpx.BaseTransport, MockTransport included) is called in the client's
    threads, as the network is; one only asynchronous (httpx.AsyncBaseTransport alone) by an
    httpx.AsyncClient on the loop instead: for tests that step the event loop themselves
    (tests/test_delivery_model.py, a virtual clock, no thread).
    """

    def __init__(
        self, cfg: IntakeConfig,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.url = cfg.endpoint_url
        self.key = cfg.key.get_secret_value() if cfg.key is not None else ""
        # identity: an answer is read raw up to ANSWER_CAP, never inflated (no gzip bomb).
        headers = {"User-Agent": f"haproxy-forwarder/{__version__}",
                   "Accept-Encoding": "identity"}
        if cfg.endpoint in ("jsons", "plain-batch"):
            headers["X-SEKOIAIO-INTAKE-KEY"] = self.key
        headers["Content-Type"] = (
            "text/plain; charset=utf-8" if cfg.endpoint == "plain-batch" else "application/json"
        )
        if cfg.gzip:
            headers["Content-Encoding"] = "gzip"
        settings: dict[str, Any] = dict(
            headers=headers,
            # A transport of the caller's brings its own TLS (none for a mock): no context,
            # whose loading of the system CAs costs milliseconds per client.
            verify=_ssl_context(cfg) if transport is None else True,
            proxy=cfg.proxy,
            # trust_env keeps HTTPS_PROXY / NO_PROXY working when intake.proxy is unset
            # (not with a transport of the caller's: the environment must not divert it).
            trust_env=transport is None,
            timeout=httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0)),
            limits=httpx.Limits(
                max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
            ),
        )
        self._aclient: httpx.AsyncClient | None = None
        if not isinstance(transport, httpx.BaseTransport | None):
            self._aclient = httpx.AsyncClient(transport=transport, **settings)
            transport = None
        self._client = httpx.Client(transport=transport, **settings)
        # One thread per request in flight: delivery runs `concurrency` workers on a client.
        self._threads = _Threads(cfg.concurrency, "intake")
        self._in_flight: set[_Exchange] = set()

    async def post(self, body: bytes) -> Outcome:
        start = time.monotonic()
        outcome = await self._post(body)
        return dataclasses.replace(outcome, elapsed=time.monotonic() - start)

    async def _post(self, body: bytes) -> Outcome:
        outcome = await self._attempt(body)
        if outcome.detail:
            # An intake or proxy echoing the request would hand the key to logs, dead letters
            # and send-test output: it never leaves this module.
            outcome = dataclasses.replace(outcome, detail=scrub(outcome.detail, self.key))
        return outcome

    async def _attempt(self, body: bytes) -> Outcome:
        progress = _Exchange()
        self._in_flight.add(progress)
        try:
            # intake.timeout bounds the whole request: httpx's timeouts are per read, so an
            # answer trickling a byte at a time would otherwise hold a worker indefinitely.
            async with asyncio.timeout(self.cfg.timeout):
                if self._aclient is not None:
                    await self._aexchange(self._aclient, body, progress)
                else:
                    await asyncio.wrap_future(
                        self._threads.submit(lambda: self._exchange(body, progress)))
        except TimeoutError:
            progress.abort()  # the thread lets go of the connection now, not at its timeout
            if progress.status is not None:
                # The intake gave its verdict; only the rest of its explanation is missing.
                return self._classify(progress)
            return Outcome(Kind.RETRY, None,
                           f"no answer within intake.timeout ({self.cfg.timeout:g} s)",
                           uncertain=progress.sent)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached the intake: retrying cannot duplicate.
            return Outcome(Kind.RETRY, None, f"{type(exc).__name__}: {exc}")
        except httpx.HTTPError as exc:
            if progress.status is not None:  # the answer broke off after its status line
                return self._classify(progress)
            # Read timeouts, resets after sending: the intake may have taken the batch.
            return Outcome(Kind.RETRY, None, f"{type(exc).__name__}: {exc}", uncertain=True)
        except (OSError, ssl.SSLError) as exc:  # pragma: no cover - httpx wraps these
            return Outcome(Kind.RETRY, None, f"{type(exc).__name__}: {exc}")
        except BaseException:
            progress.abort()  # cancelled (shutdown): the thread must not go on sending
            raise
        finally:
            self._in_flight.discard(progress)
        return self._classify(progress)

    def _exchange(self, body: bytes, progress: _Exchange) -> None:
        """One request, in a thread of the client's; `progress` says how far it got."""
        _current.exchange = progress
        try:
            # The body whole, through a one-item iterator that tells when it was written;
            # with an explicit Content-Length httpx frames it as is (no chunked encoding).
            request = self._client.build_request(
                "POST", self.url, content=_whole(body, progress),
                headers={"Content-Length": str(len(body))})
            resp = self._client.send(request, stream=True)
            try:
                progress.sent = True
                progress.status = resp.status_code
                progress.retry_after = resp.headers.get("retry-after")
                # Raw bytes: nothing decoded or inflated beyond the cap.
                for chunk in resp.iter_raw():
                    progress.answer += chunk[: ANSWER_CAP - len(progress.answer)]
                    if len(progress.answer) >= ANSWER_CAP or progress.aborted:
                        break  # the rest is dropped with the connection
            finally:
                # A response not read to its end closes its connection rather than returning
                # it to the pool.
                resp.close()
        finally:
            _current.exchange = None

    async def _aexchange(self, client: httpx.AsyncClient, body: bytes,
                         progress: _Exchange) -> None:
        """_exchange on the loop, for an asynchronous transport of the caller's."""
        request = client.build_request("POST", self.url, content=body)
        resp = await client.send(request, stream=True)
        try:
            progress.sent = True
            progress.status = resp.status_code
            progress.retry_after = resp.headers.get("retry-after")
            async for chunk in resp.aiter_raw():
                progress.answer += chunk[: ANSWER_CAP - len(progress.answer)]
                if len(progress.answer) >= ANSWER_CAP:
                    break
        finally:
            await resp.aclose()

    def _classify(self, progress: _Exchange) -> Outcome:
        assert progress.status is not None
        # Scrubbed whole, before classify() shortens it: a cut could split a key in two. A copy
        # first: after a deadline the thread may still be adding to it.
        text = scrub(bytes(progress.answer[:ANSWER_CAP]).decode("utf-8", "replace"), self.key)
        return classify(progress.status, text, progress.retry_after)

    async def aclose(self) -> None:
        # Requests still in flight (their workers cancelled or not) end now: their sockets
        # are shut down, whatever their threads were blocked on.
        for progress in list(self._in_flight):
            progress.abort()
        self._threads.shutdown()
        self._client.close()
        if self._aclient is not None:
            await self._aclient.aclose()


NOT_SENT = Outcome(Kind.NOT_SENT, None, "not sent: an earlier body of the batch failed")


class IntakeSink:
    """Encodes a batch for the configured endpoint and POSTs it (the key is inserted here).

    `max_body`: bodies are halved until under it (the intake's request limit; tests lower it).
    `encoder`: where bodies are encoded; by default a thread of the sink's own (tests: inline).
    """

    def __init__(self, client: IntakeClient, endpoint: str, use_gzip: bool, *,
                 max_body: int = MAX_REQUEST_BYTES, encoder: Executor | None = None) -> None:
        self.client = client
        self.endpoint = endpoint
        self.use_gzip = use_gzip
        self.max_body = max_body
        # One thread encodes for every worker, not one each: glibc gives each thread that
        # allocates its own arena, which keeps the freed bodies of its busiest moment resident
        # (measured: ~2.5 MiB per thread through a burst). Assembly and gzip of a 10,000-event
        # batch take ~5 ms, so one thread keeps up with several event loops' worth of input.
        self._encoder = encoder or ThreadPoolExecutor(1, thread_name_prefix="encode")

    def _bodies(self, batch: Batch) -> list[tuple[Batch, bytes]]:
        return bodies_bounded(batch, self.endpoint, self.client.key, self.use_gzip,
                              limit=self.max_body)

    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        # Off the event loop: gzip releases the GIL, so listeners keep reading meanwhile.
        loop = asyncio.get_running_loop()
        parts = await loop.run_in_executor(self._encoder, self._bodies, batch)
        out: list[tuple[Batch, Outcome]] = []
        for b, body in parts:
            try:
                outcome = await self.client.post(body)
            except Exception as exc:
                if not out:
                    raise  # nothing answered yet: the worker's bug path takes the whole batch
                # The bodies before were answered: their verdicts must not be lost with this
                # one's (a delivered body would be dead-lettered as an internal error too).
                error = scrub(f"internal error: {type(exc).__name__}: {exc}", self.client.key)
                outcome = Outcome(Kind.RETRY, None, error, uncertain=True)
            out.append((b, outcome))
            if outcome.kind is not Kind.DELIVERED:
                # Don't push the other parts at an intake that just failed, nor ahead of the
                # halves of a 413 (order): they are sent again, and their events judged only
                # by an answer to a request that carried them (never dead-lettered for this
                # body's 400, nor split for its 413).
                out += [(rest, NOT_SENT) for rest, _ in parts[len(out) :]]
                break
        return out

    async def aclose(self) -> None:
        self._encoder.shutdown(wait=False)
        await self.client.aclose()
