"""Body assembly: the compiled functions and their pure-Python twins give the same bytes,
and hostile offsets (a batch is data read back from disk) raise instead of reading past."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from itertools import accumulate
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_forwarder.sinks import assemble

try:
    native: Any = importlib.import_module("haproxy_forwarder.sinks._assemble")
except ImportError:  # pragma: no cover - depends on the build
    native = None
    if os.environ.get("HAPROXY_FORWARDER_EXPECT_COMPILED") == "1":
        raise

needs_native = pytest.mark.skipif(native is None, reason="compiled assembly not built")

MID, SEP, LAST = b',"timestamp":"', b'"},{"intake_key":"K","json":', b'"}'

texts = st.lists(st.text(max_size=40), max_size=30)


def encoded(events: list[str]) -> tuple[bytes, list[int], list[bytes]]:
    frags = [orjson.dumps(e) for e in events]
    times = [f"2026-12-01T00:00:{i % 60:02d}.000Z".encode() for i in range(len(events))]
    return b"".join(frags), list(accumulate(map(len, frags))), times


@needs_native
@settings(max_examples=300, deadline=None)
@given(texts, st.data())
def test_array_chunk_agrees(events: list[str], data: st.DataObject) -> None:
    raw, ends, times = encoded(events)
    n = len(ends)
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    for buf in (raw, bytearray(raw)):
        assert native.array_chunk(buf, ends, times, lo, hi, MID, SEP, LAST) == \
            assemble.py_array_chunk(buf, ends, times, lo, hi, MID, SEP, LAST)


@needs_native
@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from([b",", b"", b"\n", b"--sep--"]))
def test_join_fragments_agrees(events: list[str], sep: bytes) -> None:
    raw, ends, _ = encoded(events)
    got = native.join_fragments(bytearray(raw), ends, sep)
    assert got == assemble.py_join_fragments(raw, ends, sep)
    if sep == b",":
        assert orjson.loads(b"[" + got + b"]") == events


@needs_native
@pytest.mark.parametrize("ends", [[5, 3], [-1], [999], [2, 2, 1000]])
def test_bad_offsets_raise_instead_of_reading_past(ends: list[int]) -> None:
    data = b'"ab""c"'
    times = [b"t"] * len(ends)
    calls: list[Callable[[], bytes]] = [
        lambda: native.array_chunk(data, ends, times, 0, len(ends), MID, SEP, LAST),
        lambda: native.join_fragments(data, ends, b","),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_the_chosen_implementation_is_named() -> None:
    assert assemble.IMPLEMENTATION in ("native", "python")
    if native is not None and not os.environ.get("HAPROXY_FORWARDER_NO_EXTENSIONS"):
        assert assemble.IMPLEMENTATION == "native"
