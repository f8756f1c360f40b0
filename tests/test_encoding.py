"""Request bodies: the shapes of sekoia-intake.md, gzip, and the request size bound."""

from __future__ import annotations

import gzip

import orjson
import pytest

from haproxy_forwarder import encoding
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.config import MAX_REQUEST_BYTES
from haproxy_forwarder.encoding import bodies_bounded, body

KEY = "K" * 32
ODD = ['a "quoted" \\ back', "line one\nline two", "nul \x00 and \ufffd", "emoji \U0001f600", ""]


def batch(n: int, text: str = "ev") -> Batch:
    return Batch([f"{text}{i}" for i in range(n)], [f"2026-11-26T00:00:{i % 60:02d}.000Z"
                                                    for i in range(n)])


@pytest.mark.parametrize("n", [0, 1, encoding.CHUNK - 1, encoding.CHUNK, encoding.CHUNK + 1,
                               3 * encoding.CHUNK + 7])
@pytest.mark.parametrize("use_gzip", [True, False])
def test_array_body_is_the_documented_list(n: int, use_gzip: bool) -> None:
    b = batch(n)
    b.events[: len(ODD)] = ODD[: n]
    data, size = body(b, "array", KEY, use_gzip)
    raw = gzip.decompress(data) if use_gzip else data
    assert size == len(raw)
    assert orjson.loads(raw) == [
        {"intake_key": KEY, "json": e, "timestamp": t}
        for e, t in zip(b.events, b.times, strict=True)
    ]


def test_other_endpoints() -> None:
    b = Batch(list(ODD), ["t"] * len(ODD))
    assert orjson.loads(gzip.decompress(body(b, "batch", KEY, True)[0])) == {
        "intake_key": KEY, "jsons": ODD}
    assert orjson.loads(body(b, "jsons", KEY, False)[0]) == ODD
    # /plain/batch splits on LF: an event holding one arrives in two (documented).
    assert body(b, "plain-batch", KEY, False)[0].decode().split("\n")[1:3] == ["line one",
                                                                               "line two"]


def test_bodies_stay_under_the_request_limit() -> None:
    # Control characters are escaped six-fold by JSON: 4 MiB of text would become 24 MiB.
    big = Batch(["\x01" * 100_000 for _ in range(40)], ["t"] * 40)
    parts = bodies_bounded(big, "array", KEY, True)
    assert len(parts) > 1
    assert [e for b, _ in parts for e in b.events] == big.events  # order kept, nothing lost
    for _, data in parts:
        assert len(gzip.decompress(data)) <= MAX_REQUEST_BYTES


def test_small_batch_is_one_body() -> None:
    b = batch(10)
    [(same, data)] = bodies_bounded(b, "array", KEY, True)
    assert same is b and len(orjson.loads(gzip.decompress(data))) == 10
