"""A fake Sekoia.io HTTPS intake for the end-to-end tests.

It follows /work/shared/sekoia-intake.md: the endpoints ``/plain``, ``/plain/batch``, ``/jsons``,
``/batch`` and ``/array`` (all POST, under an optional path ``prefix`` as regional URLs keep one),
the intake key in a header / Basic-auth password / ``?intake_key=`` (plain and jsons) or in the
body (batch, array), gzip request bodies, string-only events and the 250 KiB event limit.
Where the contract is silent the choices made here are marked "undocumented" below: the
forwarder must not depend on them.

It is a real HTTPS server (HTTP/1.1, keep-alive, one thread per connection) with its own CA made
by ``trustme``, listening on 127.0.0.1 only, on a port chosen by the OS.

Usage::

    with FakeIntake(prefix="/api/v1/intake-http") as intake:
        ...  # configure the forwarder with intake.url, intake.ca_file and VALID_KEY
        assert intake.wait_for(100)
        assert [e.event for e in intake.events] == [...]

A fixture (kept out of conftest.py on purpose) is a one-liner::

    @pytest.fixture
    def intake() -> Iterator[FakeIntake]:
        with FakeIntake() as fi:
            yield fi

``fake_intake_factory()`` helps when a test needs several intakes (several keys or regions).

httpx 0.28 deprecates ``verify=<path>``: use ``verify=intake.client_ssl_context()``
(or ``ssl.create_default_context(cafile=intake.ca_file)``).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import trustme

from devtools.keys import INTAKE_KEY

#: The key this intake accepts (32 alphanumeric characters, like Sekoia's examples).
VALID_KEY = INTAKE_KEY

#: 250 KiB: an event strictly larger than this (UTF-8 encoded) is rejected.
MAX_EVENT_BYTES = 250 * 1024

ENDPOINTS = ("/plain", "/plain/batch", "/jsons", "/batch", "/array")
KEY_HEADER = "x-sekoiaio-intake-key"
TIMESTAMP_HEADER = "x-sekoiaio-event-timestamp"

# The real intake's status for a wrong or missing intake key is undocumented; 401 is our choice.
UNAUTHORIZED = 401


@dataclass
class Received:
    """One event seen by the intake (accepted, or rejected when in ``FakeIntake.rejected``)."""

    event: str
    timestamp: str | None  # /array per-event time, or X-SEKOIAIO-EVENT-TIMESTAMP, else None
    endpoint: str  # "/plain", "/plain/batch", "/jsons", "/batch" or "/array" (without prefix)
    request_no: int  # index of the request in FakeIntake.requests


@dataclass
class _Forced:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trickle: float = 0.0  # > 0: the body is written one byte every `trickle` seconds
    size: int = 0  # > 0: a body of this many bytes, written in 1 MiB pieces (a huge answer)
    echo: bool = False  # the body repeats the request: its headers and its body


class _Reject(Exception):
    """Answer the request with ``status`` and a small JSON message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, port: int, intake: FakeIntake) -> None:
        self.intake = intake
        super().__init__(("127.0.0.1", port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients going away (timeouts, set_down, bad TLS) are expected: stay quiet.
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeSekoiaIntake/1.0"
    server: _Server

    def setup(self) -> None:
        intake = self.server.intake
        raw: socket.socket = self.request
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(10)  # TLS handshake
        self.request = intake._ssl_server_ctx.wrap_socket(raw, server_side=True)
        self.request.settimeout(intake.keepalive_timeout)
        self.timeout = None  # already applied above
        intake._track(self.request, True)
        self.conn_id = intake._next_conn_id()
        super().setup()

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError, ValueError):
                super().finish()
        finally:
            self.server.intake._track(self.request, False)
            self.request.close()  # the server only closes the raw (detached) socket

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.intake._handle(self, "POST")

    def do_GET(self) -> None:
        self.server.intake._handle(self, "GET")

    do_PUT = do_GET
    do_DELETE = do_GET
    do_PATCH = do_GET

    # -- helpers used by FakeIntake._handle ---------------------------------------------------
    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status: int, body: bytes, headers: dict[str, str],
               forced: _Forced | None = None) -> None:
        size = forced.size if forced is not None and forced.size else len(body)
        self.send_response(status)
        lower = {k.lower() for k in headers}
        if "content-type" not in lower and body:
            self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if forced is not None and forced.size:
            piece = b"x" * (1 << 20)
            for start in range(0, size, len(piece)):
                self.wfile.write(piece[: size - start])
        elif forced is not None and forced.trickle > 0:
            self.wfile.flush()
            for i in range(len(body)):
                if self.server.intake._wake.wait(forced.trickle):
                    return  # stopping or going down
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
        elif body:
            self.wfile.write(body)
        self.wfile.flush()


class FakeIntake:
    """Fake Sekoia intake. See the module docstring."""

    def __init__(
        self,
        key: str = VALID_KEY,
        prefix: str = "",
        *,
        success_status: int = 200,
        keepalive_timeout: float | None = None,
    ) -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError("prefix must start with '/' and not end with '/'")
        self.key = key
        self.prefix = prefix
        # The real success code may be another 2xx (see ?status_code=): tests can set e.g. 202.
        self.success_status = success_status
        # Close keep-alive connections idle for this long (None: never), like real servers do.
        self.keepalive_timeout = keepalive_timeout
        self.ca = trustme.CA()
        self._server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self._ssl_server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl_server_ctx.set_alpn_protocols(["http/1.1"])
        self._server_cert.configure_cert(self._ssl_server_ctx)
        self._tmpdir: str | None = None
        self.ca_file = ""
        self._write_ca()

        self._lock = threading.Condition()
        self._events: list[Received] = []
        self._rejected: list[Received] = []
        self._requests: list[dict[str, Any]] = []
        self._forced: deque[_Forced] = deque()
        self._delay = 0.0
        self._wake = threading.Event()  # interrupts delays on stop / set_down
        self._conns: set[ssl.SSLSocket] = set()
        self._conn_counter = 0
        self._generation = 0  # bumped when connections are dropped (set_down / stop)

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._down = False
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------
    def _write_ca(self) -> None:
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="fake-intake-")
            self.ca_file = f"{self._tmpdir}/ca.pem"
            self.ca.cert_pem.write_to_path(self.ca_file)

    def start(self) -> None:
        if self._started:
            return
        self._write_ca()
        self._started = True
        self._down = False
        self._listen()

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._close_listener(drop_connections=True)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> FakeIntake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        self._wake.clear()
        server = _Server(self._port, self)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"fake-intake-{self._port}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()

    def _close_listener(self, drop_connections: bool) -> None:
        if drop_connections:
            with self._lock:
                self._generation += 1  # before waking delayed handlers: they must not answer
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)
        if drop_connections:
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                # socket.socket.shutdown, not SSLSocket.shutdown: do not touch the SSL object
                # another thread may be using; this just makes its reads/writes fail.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(conn, socket.SHUT_RDWR)
        self._wake.set()

    def set_down(self, down: bool) -> None:
        """Down: close the listening socket and drop open connections (connection refused).
        Up: listen again on the same port."""
        if not self._started:
            raise RuntimeError("FakeIntake not started")
        if down == self._down:
            return
        self._down = down
        if down:
            self._close_listener(drop_connections=True)
        else:
            self._listen()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("FakeIntake not started")
        return f"https://127.0.0.1:{self._port}{self.prefix}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context trusting this intake's CA (for httpx ``verify=``)."""
        return ssl.create_default_context(cafile=self.ca_file)

    # -- controls -------------------------------------------------------------------------------
    def inject(
        self,
        status: int,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        *,
        trickle: float = 0.0,
        size: int = 0,
        echo: bool = False,
    ) -> None:
        """Queue ``times`` forced answers (FIFO across calls). A request given a forced answer is
        not ingested. ``status=0`` closes the connection without answering (a network error).
        Hostile answers: ``trickle`` writes ``body`` one byte every ``trickle`` seconds;
        ``size`` sends a body of that many bytes (``body`` ignored); ``echo`` answers with
        the request's headers and body (as a proxy echoing it in an error page would)."""
        with self._lock:
            for _ in range(times):
                self._forced.append(
                    _Forced(status, dict(headers or {}), body, trickle, size, echo))

    def pending_injections(self) -> int:
        with self._lock:
            return len(self._forced)

    def set_delay(self, seconds: float) -> None:
        """Sleep this long before answering each request (slow intake)."""
        self._delay = seconds

    def reset(self) -> None:
        """Forget recorded events/requests, queued forced answers and the delay."""
        with self._lock:
            self._events.clear()
            self._rejected.clear()
            self._requests.clear()
            self._forced.clear()
            self._delay = 0.0

    # -- observations (snapshots, safe to use from any thread) ----------------------------------
    @property
    def events(self) -> list[Received]:
        with self._lock:
            return list(self._events)

    @property
    def rejected(self) -> list[Received]:
        with self._lock:
            return list(self._rejected)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request, in arrival order, as dicts with: method, path (without query), query,
        endpoint (path without prefix, None if unknown), status (None while being handled; 0 when
        no answer was sent: inject(0) or dropped by set_down/stop), n_events, n_rejected,
        content_encoding, body_size (as received), headers (lower-cased names), connection
        (id of the TLS connection: equal ids = keep-alive reuse), time (monotonic), forced
        (answered by inject), dropped."""
        with self._lock:
            return [dict(r) for r in self._requests]

    def event_texts(self) -> list[str]:
        with self._lock:
            return [e.event for e in self._events]

    def wait_for(self, n: int, timeout: float = 30.0) -> bool:
        """Wait until at least ``n`` events were accepted; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._events) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def wait_for_requests(self, n: int, timeout: float = 30.0) -> bool:
        """Wait until at least ``n`` requests were answered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(1 for r in self._requests if r["status"] is not None) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    # -- internals ------------------------------------------------------------------------------
    def _track(self, conn: ssl.SSLSocket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _next_conn_id(self) -> int:
        with self._lock:
            self._conn_counter += 1
            return self._conn_counter

    def _handle(self, h: _Handler, method: str) -> None:
        split = urlsplit(h.path)
        body = h.read_body()
        headers = {k.lower(): v for k, v in h.headers.items()}
        record: dict[str, Any] = {
            "method": method,
            "path": split.path,
            "query": split.query,
            "endpoint": None,
            "status": None,
            "n_events": 0,
            "n_rejected": 0,
            "content_encoding": headers.get("content-encoding"),
            "body_size": len(body),
            "headers": headers,
            "connection": h.conn_id,
            "time": time.monotonic(),
            "forced": False,
            "dropped": False,
        }
        with self._lock:
            generation = self._generation
            request_no = len(self._requests)
            self._requests.append(record)
            forced = self._forced.popleft() if self._forced else None
            delay = self._delay

        if delay > 0:
            self._wake.wait(delay)

        endpoint = None
        if split.path.startswith(self.prefix):
            rest = split.path[len(self.prefix) :]
            endpoint = rest if rest in ENDPOINTS else None
        record["endpoint"] = endpoint

        accepted: list[Received] = []
        rejected: list[Received] = []
        resp_headers: dict[str, str] = {}
        if forced is not None:
            record["forced"] = True
            status, resp_body, resp_headers = forced.status, forced.body, forced.headers
            if forced.echo:
                resp_body = orjson.dumps({"message": "Bad request",
                                          "body": body.decode("utf-8", "replace"),
                                          "headers": headers})
        elif endpoint is None:
            status, resp_body = 404, orjson.dumps({"message": "Not Found"})
        elif method != "POST":
            status, resp_body = 405, orjson.dumps({"message": "Method Not Allowed"})
            resp_headers = {"Allow": "POST"}
        else:
            try:
                status, resp_body, accepted, rejected = self._ingest(
                    endpoint, body, headers, split.query, request_no
                )
            except _Reject as exc:
                status, resp_body = exc.status, orjson.dumps({"message": exc.message})

        with self._lock:
            if generation != self._generation:
                # The intake went down (or stopped) while this request was being handled: its
                # connection is gone, so nothing is ingested and nothing is answered.
                record["dropped"] = True
                status, accepted, rejected = 0, [], []
            record["status"] = status
            record["n_events"] = len(accepted)
            record["n_rejected"] = len(rejected)
            self._events.extend(accepted)
            self._rejected.extend(rejected)
            self._lock.notify_all()

        if status == 0:  # injected network error: drop the connection without an answer
            h.close_connection = True
            with contextlib.suppress(OSError):
                socket.socket.shutdown(h.request, socket.SHUT_RDWR)
            return
        h.answer(status, resp_body, resp_headers, forced)

    def _check_header_key(self, headers: dict[str, str], query: str) -> None:
        candidates = []
        if KEY_HEADER in headers:
            candidates.append(headers[KEY_HEADER])
        auth = headers.get("authorization", "")
        if auth[:6].lower() == "basic ":
            with contextlib.suppress(ValueError):
                decoded = base64.b64decode(auth[6:].strip(), validate=True).decode()
                candidates.append(decoded.partition(":")[2])
        candidates.extend(parse_qs(query).get("intake_key", []))
        if self.key not in candidates:
            raise _Reject(UNAUTHORIZED, "Invalid intake key")

    def _ingest(
        self,
        endpoint: str,
        body: bytes,
        headers: dict[str, str],
        query: str,
        request_no: int,
    ) -> tuple[int, bytes, list[Received], list[Received]]:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error) as exc:
                raise _Reject(400, "Invalid gzip body") from exc
        elif encoding not in ("", "identity"):
            # Undocumented: only gzip is documented as supported.
            raise _Reject(415, f"Unsupported Content-Encoding {encoding}")

        items: list[tuple[str, str | None]]  # (event, timestamp)
        if endpoint in ("/plain", "/plain/batch", "/jsons"):
            self._check_header_key(headers, query)
            ts = headers.get(TIMESTAMP_HEADER)
            if endpoint == "/jsons":
                data = _loads(body)
                if not isinstance(data, list) or not all(isinstance(e, str) for e in data):
                    raise _Reject(400, "Expected a JSON list of strings")
                items = [(e, ts) for e in data]
            else:
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _Reject(400, "Body is not UTF-8") from exc
                if endpoint == "/plain":
                    if not text:
                        raise _Reject(400, "Empty event")  # undocumented
                    items = [(text, ts)]
                else:
                    # Empty lines (e.g. after a trailing LF) are skipped: undocumented.
                    items = [(line, ts) for line in text.split("\n") if line]
        elif endpoint == "/batch":
            data = _loads(body)
            if not isinstance(data, dict):
                raise _Reject(400, "Expected a JSON object")
            if data.get("intake_key") != self.key:
                raise _Reject(UNAUTHORIZED, "Invalid intake key")
            jsons = data.get("jsons")
            if not isinstance(jsons, list) or not all(isinstance(e, str) for e in jsons):
                raise _Reject(400, "'jsons' must be a list of strings")
            items = [(e, None) for e in jsons]
        else:  # /array
            data = _loads(body)
            if not isinstance(data, list):
                raise _Reject(400, "Expected a JSON list")
            items = []
            for element in data:
                if not isinstance(element, dict):
                    raise _Reject(400, "Array elements must be objects")
                # Undocumented what one bad key among good ones does: reject the whole request.
                if element.get("intake_key") != self.key:
                    raise _Reject(UNAUTHORIZED, "Invalid intake key")
                event, ts = element.get("json"), element.get("timestamp")
                if not isinstance(event, str):
                    raise _Reject(400, "'json' must be a string")
                if ts is not None and not isinstance(ts, str):
                    raise _Reject(400, "'timestamp' must be a string")
                items.append((event, ts))

        accepted: list[Received] = []
        rejected: list[Received] = []
        results: list[dict[str, Any]] = []
        for index, (event, ts) in enumerate(items):
            received = Received(event, ts, endpoint, request_no)
            if len(event.encode("utf-8")) > MAX_EVENT_BYTES:
                rejected.append(received)
                results.append({"index": index, "status": 413, "message": "Event too large"})
            else:
                accepted.append(received)
        ids = [str(uuid.uuid4()) for _ in accepted]

        if endpoint == "/plain":
            if rejected:
                return 413, orjson.dumps({"message": "Event too large"}), [], rejected
            return self.success_status, orjson.dumps({"event_id": ids[0]}), accepted, []
        if rejected and not accepted:
            payload = {"message": "All events rejected", "rejected": results}
            return 413, orjson.dumps(payload), [], rejected
        answer: dict[str, Any] = {"event_ids": ids}
        if rejected:
            # The real per-event status shape is undocumented; this one is invented.
            answer["rejected"] = results
        return self.success_status, orjson.dumps(answer), accepted, rejected


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Reject(400, "Malformed JSON") from exc


@contextlib.contextmanager
def fake_intake_factory() -> Iterator[Callable[..., FakeIntake]]:
    """Yield a function creating started FakeIntake instances (same arguments as FakeIntake);
    all of them are stopped on exit. For a pytest fixture::

        @pytest.fixture
        def make_intake():
            with fake_intake_factory() as make:
                yield make
    """
    created: list[FakeIntake] = []

    def make(*args: Any, **kwargs: Any) -> FakeIntake:
        intake = FakeIntake(*args, **kwargs)
        intake.start()
        created.append(intake)
        return intake

    try:
        yield make
    finally:
        for intake in created:
            intake.stop()
