"""Request bodies: the shapes of sekoia-intake.md, gzip (isal and the zlib fallback), and the
request size bound."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator

import httpx
import orjson
import pytest

from haproxy_forwarder.batching import Batch
from haproxy_forwarder.config import MAX_REQUEST_BYTES
from haproxy_forwarder.sinks import encoding
from haproxy_forwarder.sinks.dryrun import dry_run_lines
from haproxy_forwarder.sinks.encoding import bodies_bounded, body
from tests.fake_intake import VALID_KEY, FakeIntake

KEY = "K" * 32
ODD = ['a "quoted" \\ back', "line one\nline two", "nul \x00 and \ufffd", "emoji \U0001f600", ""]


def texts(n: int, text: str = "ev") -> list[str]:
    return [f"{text}{i}" for i in range(n)]


def stamps(n: int) -> list[str]:
    return [f"2026-11-26T00:00:{i % 60:02d}.000Z" for i in range(n)]


def batch(n: int, text: str = "ev") -> Batch:
    return Batch.from_events(texts(n, text), stamps(n))


@pytest.mark.parametrize("n", [0, 1, encoding.CHUNK - 1, encoding.CHUNK, encoding.CHUNK + 1,
                               3 * encoding.CHUNK + 7])
@pytest.mark.parametrize("use_gzip", [True, False])
def test_array_body_is_the_documented_list(n: int, use_gzip: bool) -> None:
    events = texts(n)
    events[: len(ODD)] = ODD[:n]
    b = Batch.from_events(events, stamps(n))
    data, size = body(b, "array", KEY, use_gzip)
    raw = gzip.decompress(data) if use_gzip else data
    assert size == len(raw)
    expected = [{"intake_key": KEY, "json": e, "timestamp": t}
                for e, t in zip(events, stamps(n), strict=True)]
    # Byte for byte what orjson writes for the documented list, not only the same JSON.
    assert raw == orjson.dumps(expected)


def test_other_endpoints() -> None:
    b = Batch.from_events(ODD, ["t"] * len(ODD))
    assert orjson.loads(gzip.decompress(body(b, "batch", KEY, True)[0])) == {
        "intake_key": KEY, "jsons": ODD}
    assert orjson.loads(body(b, "jsons", KEY, False)[0]) == ODD
    # /plain/batch splits on LF: an event holding one arrives in two (documented).
    assert body(b, "plain-batch", KEY, False)[0].decode().split("\n")[1:3] == ["line one",
                                                                               "line two"]


def test_bodies_stay_under_the_request_limit() -> None:
    # Control characters are escaped six-fold by JSON: 4 MiB of text would become 24 MiB.
    big = Batch.from_events(["\x01" * 100_000 for _ in range(40)], ["t"] * 40)
    parts = bodies_bounded(big, "array", KEY, True)
    assert len(parts) > 1
    assert [e for b, _ in parts for e in b.events()] == big.events()  # order kept, none lost
    for _, data in parts:
        assert len(gzip.decompress(data)) <= MAX_REQUEST_BYTES


def test_small_batch_is_one_body() -> None:
    b = batch(10)
    [(same, data)] = bodies_bounded(b, "array", KEY, True)
    assert same is b and len(orjson.loads(gzip.decompress(data))) == 10


def test_batch_split_and_join_keep_every_fragment() -> None:
    b = Batch.from_events(ODD, stamps(len(ODD)))
    left, right = b.split()
    assert left.events() + right.events() == ODD
    assert left.times + right.times == b.times
    joined = Batch.join([left, right])
    assert bytes(joined.data) == bytes(b.data) and joined.ends == b.ends


def test_dry_run_lines_are_the_old_json_lines() -> None:
    b = Batch.from_events(ODD, ["t"] * len(ODD))
    assert dry_run_lines(b) == b"".join(
        orjson.dumps({"timestamp": "t", "event": e}) + b"\n" for e in ODD)


def test_batcher_closes_on_count_and_bytes() -> None:
    from haproxy_forwarder.batching import Batcher

    src = Batch.from_events(texts(25), stamps(25))
    by_count = Batcher(max_events=10, max_bytes=1 << 20)
    closed = by_count.add(bytes(src.data), src.lens, bytes(src.tdata), src.tlens)
    assert [len(c) for c in closed] == [10, 10] and len(by_count.current) == 5
    rest = by_count.take()
    assert rest is not None
    assert [e for c in [*closed, rest] for e in c.events()] == texts(25)
    # Each event is 5 or 6 bytes encoded: the batch closes on the event crossing 20 bytes.
    by_size = Batcher(max_events=1000, max_bytes=20)
    closed = by_size.add(bytes(src.data), src.lens, bytes(src.tdata), src.tlens)
    assert all(c.nbytes >= 20 and c.nbytes - len(c.fragments()[-1]) < 20 for c in closed)
    assert [e for c in closed for e in c.events()] == texts(25)[: sum(map(len, closed))]


# -- gzip: ISA-L by default, zlib as the fallback ------------------------------------------------

ENDPOINTS = ["array", "batch", "jsons", "plain-batch"]


def odd_batch(n: int) -> Batch:
    events = texts(n, "événement ")
    events[: len(ODD)] = ODD
    return Batch.from_events(events, stamps(n))


def test_isal_is_what_runs() -> None:
    # isal is a declared dependency with wheels for every platform we ship: the fallback is for
    # an install without it, not a silent default.
    assert encoding.GZIP_IMPLEMENTATIONS == ("isal", "zlib")
    assert encoding.GZIP_IMPLEMENTATION == "isal"
    from isal import isal_zlib

    assert isinstance(encoding.compressor(), type(isal_zlib.compressobj()))


def test_the_fallback_is_zlib() -> None:
    assert isinstance(encoding.compressor("zlib"), type(zlib.compressobj()))
    with pytest.raises(ValueError, match="brotli"):
        encoding.compressor("brotli")


@pytest.mark.parametrize("impl", ["isal", "zlib"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_gzip_bodies_inflate_to_the_plain_body(impl: str, endpoint: str) -> None:
    # Several 512-event chunks, each compressed as it is built: one gzip member in the end.
    b = odd_batch(3 * encoding.CHUNK + 7)
    plain, plain_size = body(b, endpoint, KEY, False)
    data, size = body(b, endpoint, KEY, True, gzip_impl=impl)
    assert data[:3] == b"\x1f\x8b\x08"  # a gzip member, deflate: what Content-Encoding says
    assert gzip.decompress(data) == plain and size == plain_size == len(plain)
    # zlib's own reader, as the fake intake and most servers use it, agrees and sees one member.
    d = zlib.decompressobj(31)
    assert d.decompress(data) == plain and d.eof and d.unused_data == b""


@pytest.mark.parametrize("impl", ["isal", "zlib"])
def test_split_bodies_are_each_a_gzip_body(impl: str) -> None:
    big = Batch.from_events(["\x01" * 100_000 for _ in range(40)], ["t"] * 40)
    parts = bodies_bounded(big, "array", KEY, True, gzip_impl=impl)
    assert len(parts) > 1
    for part, data in parts:
        assert gzip.decompress(data) == body(part, "array", KEY, False)[0]


def test_gzip_of_an_empty_batch() -> None:
    for impl in ("isal", "zlib"):
        assert gzip.decompress(body(Batch.from_events([], []), "array", KEY, True, impl)[0]) == (
            b"[]")


@pytest.fixture
def intake() -> Iterator[FakeIntake]:
    with FakeIntake() as fi:
        yield fi


@pytest.mark.parametrize("impl", ["isal", "zlib"])
def test_fake_intake_inflates_the_bodies(intake: FakeIntake, impl: str) -> None:
    b = odd_batch(2 * encoding.CHUNK + 3)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    with httpx.Client(base_url=intake.url, verify=intake.client_ssl_context(), timeout=10) as c:
        r = c.post("/array", content=body(b, "array", VALID_KEY, True, impl)[0], headers=headers)
    assert r.status_code == 200, r.text
    assert intake.event_texts() == b.events()
    assert [e.timestamp for e in intake.events] == stamps(len(b))
    assert intake.requests[0]["content_encoding"] == "gzip"
