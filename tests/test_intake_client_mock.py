"""The intake client in process, through httpx.MockTransport: every Outcome kind, Retry-After,
the answer cap, the request as sent per endpoint, NOT_SENT parts, and the key kept out of every
outcome. No socket (tests/fake_intake.py stays for the end-to-end tests); the handlers run in
the client's request threads, as its transport does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import gzip
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pytest

from haproxy_forwarder import __version__
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.config import DEFAULT_URL, IntakeConfig
from haproxy_forwarder.observability import logs
from haproxy_forwarder.sinks import intake
from haproxy_forwarder.sinks.intake import (
    ANSWER_CAP,
    MASK,
    NOT_SENT,
    IntakeClient,
    IntakeSink,
    Kind,
    Outcome,
)

# Alphanumeric (the config's rule) and found nowhere else: any occurrence is a leak.
KEY = "Zq7vKeyMustNotLeak4Xw9"
URL = "https://intake.example.test"
TS = "2026-12-01T00:00:00.000Z"

Handler = Callable[[httpx.Request], httpx.Response]
# What a stalled handler or answer waits for: set when the test ends (a blocked thread cannot
# be cancelled; its socket would be shut down, and a mock has none).
RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _release_stalls() -> Iterator[None]:
    RELEASE.clear()
    yield
    RELEASE.set()


def stall_until_aborted(error: type[httpx.TransportError] = httpx.ReadError) -> None:
    """Block, as a read on a silent connection does, until the client shuts the request's
    socket down (its deadline, its close): a mock has no socket, so the request's abort flag
    stands for it, and the read then fails as on a shut-down socket."""
    exchange = intake._current.exchange
    while not exchange.aborted:
        if RELEASE.wait(0.005):
            raise AssertionError("the request was never aborted")
    raise error("socket shut down")


def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    """The client thread ends its request after the deadline gave the worker its outcome."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def config(**settings: Any) -> IntakeConfig:
    return IntakeConfig(**{"url": URL, "key": KEY, "gzip": False, "timeout": 5.0, **settings})


async def post_with(handler: Handler, body: bytes = b"[]", **settings: Any) -> Outcome:
    client = IntakeClient(config(**settings), transport=httpx.MockTransport(handler))
    try:
        return await client.post(body)
    finally:
        await client.aclose()


def post(handler: Handler, body: bytes = b"[]", **settings: Any) -> Outcome:
    return asyncio.run(post_with(handler, body, **settings))


def answer(status: int, content: bytes = b"", headers: dict[str, str] | None = None,
           stream: httpx.SyncByteStream | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return respond(status, content, headers, stream)

    return handler


def respond(status: int, content: bytes = b"", headers: Any = None,
            stream: httpx.SyncByteStream | None = None) -> httpx.Response:
    # Always a stream, as from a connection: httpx.Response(content=bytes) counts as already
    # read, and the client reads answers raw (iter_raw), which refuses a read response.
    return httpx.Response(status, headers=headers,
                          stream=stream if stream is not None else AnswerStream([content]))


def raising(exc: BaseException) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


class AnswerStream(httpx.SyncByteStream):
    """An answer body handed over piece by piece; records how much of it the client pulled
    and whether it closed it. After the pieces: end, raise `then`, or block on an event that
    nobody sets (an answer that stops coming)."""

    def __init__(self, pieces: Iterable[bytes], then: BaseException | None = None,
                 stall: bool = False) -> None:
        self.pieces = pieces
        self.then = then
        self.stall = stall
        self.pulled = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.pieces:
            self.pulled += len(piece)
            yield piece
        if self.then is not None:
            raise self.then
        if self.stall:
            stall_until_aborted()

    def close(self) -> None:
        self.closed = True


def string_fields(outcome: Outcome) -> list[str]:
    return [v for f in dataclasses.fields(outcome)
            if isinstance(v := getattr(outcome, f.name), str)] + [repr(outcome), str(outcome)]


def assert_no_key(outcome: Outcome) -> None:
    for text in string_fields(outcome):
        assert KEY not in text
        assert KEY[:8] not in text  # nor a piece of it (a cut after scrubbing)


@pytest.fixture(autouse=True)
def _key_not_registered() -> None:
    # The masking checked here must be the client's own, not the logger's global redaction
    # (which only knows keys the CLI registered).
    assert logs.redact(KEY) == KEY


# --- every kind an answer can get --------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "kind"),
    [(200, Kind.DELIVERED), (201, Kind.DELIVERED), (202, Kind.DELIVERED),
     (204, Kind.DELIVERED), (299, Kind.DELIVERED),
     (408, Kind.RETRY), (429, Kind.RETRY), (500, Kind.RETRY), (502, Kind.RETRY),
     (503, Kind.RETRY), (504, Kind.RETRY), (599, Kind.RETRY),
     (401, Kind.AUTH), (403, Kind.AUTH), (404, Kind.AUTH), (405, Kind.AUTH),
     (302, Kind.AUTH), (409, Kind.AUTH), (418, Kind.AUTH), (451, Kind.AUTH),
     (413, Kind.TOO_LARGE),
     (400, Kind.REJECTED), (422, Kind.REJECTED)],
)
def test_answers_are_classified_by_status(status: int, kind: Kind) -> None:
    said = b'{"message": "the intake says why"}' if status != 204 else b""
    outcome = post(answer(status, said))
    assert (outcome.kind, outcome.status, outcome.uncertain) == (kind, status, False)
    # The answer is the detail of a failure; a delivery carries none.
    assert outcome.detail == ("" if kind is Kind.DELIVERED else said.decode())
    assert outcome.elapsed is not None and outcome.elapsed >= 0
    assert_no_key(outcome)


def test_a_redirect_is_not_followed() -> None:
    """A 3xx is a wrong URL (AUTH, kept and retried): the body is not posted elsewhere."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return respond(307, headers={"Location": "https://elsewhere.example/array"})

    assert post(handler).kind is Kind.AUTH
    assert seen == [URL + "/array"]


@pytest.mark.parametrize(
    ("exc", "uncertain"),
    [  # Nothing reached the intake: a retry cannot duplicate.
     (httpx.ConnectError("connection refused"), False),
     (httpx.ConnectTimeout("connect timed out"), False),
     (httpx.PoolTimeout("no connection free"), False),
     # Sent, then no answer: the intake may have taken the events.
     (httpx.ReadTimeout("read timed out"), True),
     (httpx.ReadError("connection reset by peer"), True),
     (httpx.WriteError("broken pipe"), True),
     (httpx.RemoteProtocolError("Server disconnected without sending a response."), True)],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_network_errors_are_retried(exc: httpx.HTTPError, uncertain: bool) -> None:
    outcome = post(raising(exc))
    assert (outcome.kind, outcome.status, outcome.uncertain) == (Kind.RETRY, None, uncertain)
    assert outcome.detail == f"{type(exc).__name__}: {exc}"
    assert outcome.retry_after is None
    assert outcome.elapsed is not None


def test_no_exception_of_the_transport_leaves_the_client() -> None:
    """httpx's base class too: whatever the transport raises of httpx's is an Outcome."""
    outcome = post(raising(httpx.UnsupportedProtocol("no h3 here")))
    assert (outcome.kind, outcome.uncertain) == (Kind.RETRY, True)


@pytest.mark.parametrize(
    ("status", "kind", "retry_after"),
    [(503, Kind.RETRY, 9.0), (400, Kind.REJECTED, None), (200, Kind.DELIVERED, None)])
def test_an_answer_broken_off_after_its_status_is_judged_by_the_status(
        status: int, kind: Kind, retry_after: float | None) -> None:
    stream = AnswerStream([b'{"message": "cut sh'],
                          then=httpx.RemoteProtocolError("peer closed connection"))
    outcome = post(answer(status, headers={"Retry-After": "9"}, stream=stream))
    assert (outcome.kind, outcome.status, outcome.retry_after) == (kind, status, retry_after)
    assert outcome.detail == ("" if kind is Kind.DELIVERED else '{"message": "cut sh')
    assert not outcome.uncertain
    assert stream.closed


# --- the whole-request deadline (intake.timeout) -----------------------------------------

def test_no_answer_within_the_deadline_is_an_uncertain_retry() -> None:
    entered: list[bool] = []
    ended: list[bool] = []

    def never(request: httpx.Request) -> httpx.Response:
        entered.append(True)
        try:
            stall_until_aborted()  # the intake took the body and says nothing
        finally:
            ended.append(True)
        raise AssertionError("unreachable")

    outcome = post(never, timeout=0.05)
    assert entered == [True]
    assert eventually(lambda: ended == [True])  # the thread was woken, not left blocked
    assert (outcome.kind, outcome.status, outcome.retry_after) == (Kind.RETRY, None, None)
    assert outcome.detail == "no answer within intake.timeout (0.05 s)"
    assert outcome.uncertain  # the body was handed over: a retry may duplicate
    # Not before the deadline (a timer never fires early), nor held by the blocked thread.
    assert outcome.elapsed is not None and 0.04 <= outcome.elapsed < 5


class StallingTransport(httpx.BaseTransport):
    """Takes the body, but blocks writing it (a peer that stopped reading): MockTransport
    reads the whole body before its handler runs, so it cannot show this."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        for piece in request.stream:
            self.got.append(bytes(piece))
            break  # the write of this piece never completes
        stall_until_aborted(httpx.WriteError)
        raise AssertionError("unreachable")


def test_a_body_not_sent_within_the_deadline_is_a_certain_retry() -> None:
    body = b"x" * (3 * 64 * 1024)
    transport = StallingTransport()

    async def go() -> Outcome:
        client = IntakeClient(config(timeout=0.05), transport=transport)
        try:
            return await client.post(body)
        finally:
            await client.aclose()

    outcome = asyncio.run(go())
    assert transport.got == [body]  # written whole, in one call
    assert (outcome.kind, outcome.status) == (Kind.RETRY, None)
    assert not outcome.uncertain  # the intake never had the whole body: no duplicate


@pytest.mark.parametrize(
    ("status", "kind", "detail", "retry_after"),
    [(503, Kind.RETRY, "overloaded, come back", 4.0),
     (401, Kind.AUTH, "overloaded, come back", 4.0),
     (200, Kind.DELIVERED, "", None)])
def test_an_answer_that_stops_coming_is_judged_by_its_status_at_the_deadline(
        status: int, kind: Kind, detail: str, retry_after: float | None) -> None:
    """A status line, then the body trickles past intake.timeout: the verdict stands (a 200
    is delivered, not sent again), with what came of the explanation."""
    stream = AnswerStream([b"overloaded, ", b"come back"], stall=True)
    outcome = post(answer(status, headers={"Retry-After": "4"}, stream=stream), timeout=0.05)
    assert (outcome.kind, outcome.status, outcome.retry_after) == (kind, status, retry_after)
    assert outcome.detail == detail
    assert not outcome.uncertain
    assert eventually(lambda: stream.closed)


# --- Retry-After ------------------------------------------------------------------------

def _in(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [(429, "7", 7.0), (503, " 12 ", 12.0), (503, "0", 0.0),
     (503, "999999", 600.0),  # capped: a bogus header cannot park delivery for days
     (429, None, None), (503, "soon", None), (503, "", None), (503, "7.5", None),
     (503, "-3", None), (503, "Mon, 32 Foo 2026 99:00:00 GMT", None),
     (401, "30", 30.0),  # a refused key too: it can only lengthen the slow retry
     (413, "30", None), (400, "30", None), (200, "30", None)],
)
def test_retry_after_seconds_absent_and_garbage(status: int, header: str | None,
                                                expected: float | None) -> None:
    headers = {} if header is None else {"Retry-After": header}
    assert post(answer(status, b"busy", headers)).retry_after == expected


@pytest.mark.parametrize(("status", "delay"), [(429, 120.0), (503, 30.0), (503, 10_000.0)])
def test_retry_after_http_date(status: int, delay: float) -> None:
    got = post(answer(status, headers={"Retry-After": _in(delay)})).retry_after
    assert got == pytest.approx(min(delay, intake.MAX_RETRY_AFTER), abs=3)


def test_retry_after_http_date_in_the_past_is_no_wait() -> None:
    assert post(answer(503, headers={"Retry-After": _in(-300)})).retry_after == 0.0


def test_retry_after_of_a_non_ascii_digit_is_garbage() -> None:
    """A header byte 0xB2 (latin-1 '²') from a proxy: str.isdigit() is true of it and float()
    refuses it; it was a ValueError out of post() (the worker's bug path: a batch held only
    in memory dead-lettered), it is now a Retry-After ignored."""
    def handler(request: httpx.Request) -> httpx.Response:
        return respond(429, headers=[(b"Retry-After", b"\xb2")])

    outcome = post(handler)
    assert (outcome.kind, outcome.retry_after) == (Kind.RETRY, None)


# --- the answer is read only up to ANSWER_CAP -------------------------------------------

@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The answer text the client hands to classify (what it kept of the body)."""
    seen: list[str] = []
    real = intake.classify

    def spy(status: int, body: str, retry_after: str | None) -> Outcome:
        seen.append(body)
        return real(status, body, retry_after)

    monkeypatch.setattr(intake, "classify", spy)
    return seen


@pytest.mark.parametrize(("status", "kind"),
                         [(413, Kind.TOO_LARGE), (503, Kind.RETRY), (200, Kind.DELIVERED)])
def test_a_huge_answer_is_not_read_whole(kept: list[str], status: int, kind: Kind) -> None:
    piece = 16 * 1024
    huge = 1 << 30  # 1 GiB, made only as far as it is pulled
    stream = AnswerStream(b"y" * piece for _ in range(huge // piece))
    outcome = post(answer(status, stream=stream))
    assert outcome.kind is kind
    assert stream.pulled <= ANSWER_CAP + piece  # stopped at the cap, not at the end
    assert stream.closed  # the connection is dropped rather than drained
    assert kept == ["y" * ANSWER_CAP]
    assert outcome.detail == ("" if kind is Kind.DELIVERED else "y" * 500)


def test_a_single_huge_piece_is_cut_at_the_cap(kept: list[str]) -> None:
    outcome = post(answer(400, b"z" * (4 * ANSWER_CAP)))
    assert kept == ["z" * ANSWER_CAP]
    assert outcome.detail == "z" * 500


def test_a_gzip_answer_is_not_inflated(kept: list[str]) -> None:
    """Raw bytes: a compressed answer (a bomb) is never inflated beyond what came in."""
    bomb = gzip.compress(b"A" * (50 << 20))
    outcome = post(answer(400, bomb, {"Content-Encoding": "gzip"}))
    assert outcome.kind is Kind.REJECTED
    assert len(kept) == 1 and len(kept[0]) <= len(bomb) < ANSWER_CAP
    assert "AAAAAAAA" not in kept[0]


# --- the request as sent ----------------------------------------------------------------

EVENTS = ["first event", 'quote " backslash \\ é', "x" * 300]


def expected_body(endpoint: str) -> Any:
    if endpoint == "array":
        return [{"intake_key": KEY, "json": e, "timestamp": TS} for e in EVENTS]
    if endpoint == "batch":
        return {"intake_key": KEY, "jsons": EVENTS}
    if endpoint == "jsons":
        return EVENTS
    return "\n".join(EVENTS)


def capture_sent(endpoint: str, use_gzip: bool,
                 **settings: Any) -> tuple[list[httpx.Request], list[Outcome]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return respond(202)

    async def go() -> list[Outcome]:
        cfg = config(endpoint=endpoint, gzip=use_gzip, **settings)
        sink = IntakeSink(IntakeClient(cfg, transport=httpx.MockTransport(handler)), endpoint,
                          use_gzip)
        try:
            return [o for _, o in await sink.send(Batch.from_events(EVENTS, [TS] * 3))]
        finally:
            await sink.aclose()

    return seen, asyncio.run(go())


@pytest.mark.parametrize("use_gzip", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize(
    ("endpoint", "path", "key_header", "content_type"),
    [("array", "/array", False, "application/json"),
     ("batch", "/batch", False, "application/json"),
     ("jsons", "/jsons", True, "application/json"),
     ("plain-batch", "/plain/batch", True, "text/plain; charset=utf-8")])
def test_the_request_as_sent(endpoint: str, path: str, key_header: bool, content_type: str,
                             use_gzip: bool) -> None:
    seen, outcomes = capture_sent(endpoint, use_gzip)
    assert [o.kind for o in outcomes] == [Kind.DELIVERED]
    [req] = seen
    assert req.method == "POST"
    assert str(req.url) == URL + path
    raw = dict(req.headers.raw)
    if key_header:
        # Spelt as Sekoia documents it, and the key as is.
        assert raw[b"X-SEKOIAIO-INTAKE-KEY"] == KEY.encode()
    else:  # the key travels in the body (intake_key), not twice
        assert "x-sekoiaio-intake-key" not in req.headers
    assert req.headers["content-type"] == content_type
    assert req.headers["user-agent"] == f"haproxy-forwarder/{__version__}"
    assert req.headers["accept-encoding"] == "identity"
    assert "transfer-encoding" not in req.headers
    content = req.content
    assert req.headers["content-length"] == str(len(content))
    if use_gzip:
        assert req.headers["content-encoding"] == "gzip"
        assert content[:2] == b"\x1f\x8b"
        content = gzip.decompress(content)
    else:
        assert "content-encoding" not in req.headers
    if endpoint == "plain-batch":
        assert content.decode() == expected_body(endpoint)
    else:
        assert json.loads(content) == expected_body(endpoint)


def test_the_path_is_appended_to_a_region_base_url() -> None:
    seen, _ = capture_sent("jsons", False, url="https://intake.example.test/api/v1/intake-http/")
    assert str(seen[0].url) == "https://intake.example.test/api/v1/intake-http/jsons"
    seen, _ = capture_sent("plain-batch", False, url=DEFAULT_URL, region="fra2")
    assert str(seen[0].url) == "https://intake.fra2.sekoia.io/api/v1/intake-http/plain/batch"


def test_a_large_body_arrives_whole_with_its_length() -> None:
    """Handed to the transport whole, framed as one Content-Length body (never chunked)."""
    body = bytes(range(256)) * (3 * 64 * 1024 // 256 + 7)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return respond(200)

    assert post(handler, body).kind is Kind.DELIVERED
    [req] = seen
    assert req.content == body
    assert req.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in req.headers


# --- NOT_SENT: the bodies after a refused one -------------------------------------------

def several_bodies(handler: Handler, events: list[str]) -> list[tuple[list[str], Outcome]]:
    async def go() -> list[tuple[list[str], Outcome]]:
        sink = IntakeSink(IntakeClient(config(), transport=httpx.MockTransport(handler)),
                          "array", False, max_body=100)  # one event per body
        try:
            batch = Batch.from_events(events, [TS] * len(events))
            return [(b.events(), o) for b, o in await sink.send(batch)]
        finally:
            await sink.aclose()

    return asyncio.run(go())


def answering(*steps: int | BaseException) -> tuple[Handler, list[list[str]]]:
    """A handler giving these answers in turn; and the events of each request it got."""
    seen: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append([x["json"] for x in json.loads(request.content)])
        step = steps[len(seen) - 1]
        if isinstance(step, BaseException):
            raise step
        return respond(step, b"answer %d" % step)

    return handler, seen


@pytest.mark.parametrize(
    ("refusal", "kind"),
    [(503, Kind.RETRY), (429, Kind.RETRY), (413, Kind.TOO_LARGE), (400, Kind.REJECTED),
     (401, Kind.AUTH), (httpx.ConnectError("refused"), Kind.RETRY),
     (httpx.ReadTimeout("timed out"), Kind.RETRY)],
    ids=str)
def test_bodies_after_a_refused_one_are_not_sent(refusal: int | BaseException,
                                                 kind: Kind) -> None:
    handler, seen = answering(200, refusal)
    got = several_bodies(handler, ["a", "b", "c", "d"])
    assert seen == [["a"], ["b"]]  # c and d never pushed at an intake that just failed
    assert [(events, o.kind) for events, o in got] == [
        (["a"], Kind.DELIVERED), (["b"], kind), (["c"], Kind.NOT_SENT), (["d"], Kind.NOT_SENT)]
    for _, o in got[2:]:
        # No verdict of the refused body's: no status, no Retry-After, no request made.
        assert o == NOT_SENT
        assert (o.status, o.retry_after, o.elapsed, o.uncertain) == (None, None, None, False)
    assert got[1][1].elapsed is not None


def test_a_batch_of_bodies_all_accepted_has_no_not_sent() -> None:
    handler, seen = answering(200, 202, 200)
    got = several_bodies(handler, ["a", "b", "c"])
    assert seen == [["a"], ["b"], ["c"]]
    assert [o.kind for _, o in got] == [Kind.DELIVERED] * 3


def test_an_internal_error_after_an_accepted_body_keeps_its_verdict() -> None:
    """A bug below the client (not an httpx error) on the second body: the first stays
    delivered, the second is an uncertain retry whose text has no key, the rest NOT_SENT."""
    handler, seen = answering(200, RuntimeError(f"transport bug with {KEY} in it"))
    got = several_bodies(handler, ["a", "b", "c"])
    assert seen == [["a"], ["b"]]
    assert [o.kind for _, o in got] == [Kind.DELIVERED, Kind.RETRY, Kind.NOT_SENT]
    second = got[1][1]
    assert second.uncertain
    assert second.detail == f"internal error: RuntimeError: transport bug with {MASK} in it"
    for _, o in got:
        assert_no_key(o)


def test_an_internal_error_on_the_first_body_is_raised() -> None:
    handler, _ = answering(RuntimeError("transport bug"))
    with pytest.raises(RuntimeError, match="transport bug"):
        several_bodies(handler, ["a", "b"])


# --- the key never comes back -----------------------------------------------------------

def echo(status: int, **headers: str) -> Handler:
    """An intake (or proxy) answering with the whole request: headers, URL and body, and the
    key again URL- and JSON-encoded."""
    def handler(request: httpx.Request) -> httpx.Response:
        text = (f"{request.method} {request.url}\n"
                + "".join(f"{k}: {v}\n" for k, v in request.headers.items())
                + request.content.decode() + "\n"
                + urllib.parse.quote(KEY) + json.dumps(KEY))
        return respond(status, text.encode(), headers)

    return handler


@pytest.mark.parametrize("endpoint", ["array", "jsons"])
@pytest.mark.parametrize("status", [400, 401, 413, 503])
def test_an_echoed_request_does_not_bring_the_key_back(status: int, endpoint: str) -> None:
    body = (b'[{"intake_key":"%s","json":"e","timestamp":"%s"}]' % (KEY.encode(), TS.encode())
            if endpoint == "array" else b'["e"]')
    outcome = post(echo(status), body, endpoint=endpoint)
    assert outcome.kind is not Kind.DELIVERED
    assert_no_key(outcome)
    assert MASK in outcome.detail  # it was there, and masked


def test_a_key_across_the_detail_cut_is_masked_whole() -> None:
    """Scrubbed before the detail is cut to 500: a cut key would escape a later scrub."""
    outcome = post(answer(400, b"x" * 495 + KEY.encode() + b" trailing"))
    assert outcome.detail == "x" * 495 + MASK[:5]
    assert_no_key(outcome)


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError(f"cannot reach intake?key={KEY}"),
     httpx.ReadTimeout(f"X-SEKOIAIO-INTAKE-KEY: {KEY}"),
     httpx.RemoteProtocolError(f'illegal header {{"intake_key":"{KEY}"}}'),
     httpx.ProxyError(f"proxy refused {KEY}")],
    ids=lambda e: type(e).__name__)
def test_an_error_message_does_not_bring_the_key_back(exc: httpx.HTTPError) -> None:
    outcome = post(raising(exc))
    assert outcome.kind is Kind.RETRY
    assert_no_key(outcome)
    assert MASK in outcome.detail


def test_a_broken_off_or_stalled_answer_does_not_bring_the_key_back() -> None:
    broken = AnswerStream([b"echo " + KEY.encode()[:12], KEY.encode()[12:]],
                          then=httpx.ReadError("reset"))
    stalled = AnswerStream([b"echo " + KEY.encode()], stall=True)
    for stream in (broken, stalled):
        outcome = post(answer(503, stream=stream), timeout=0.05)
        assert outcome.status == 503
        assert outcome.detail == f"echo {MASK}"
        assert_no_key(outcome)
