"""Body assembly: the compiled functions and their pure-Python twins give the same bytes,
and hostile lengths (a batch is data read back from disk) raise instead of reading past."""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_forwarder.sinks import assemble
from haproxy_forwarder.storage import new_lens, new_tlens, pack_times, pieces
from tests.ingest_contract import compiled_module

native: Any = compiled_module("haproxy_forwarder.sinks._assemble")

needs_native = pytest.mark.skipif(native is None, reason="compiled assembly not built")

MID, SEP, LAST = b',"timestamp":"', b'"},{"intake_key":"K","json":', b'"}'

texts = st.lists(st.text(max_size=40), max_size=30)


def encoded(events: list[str]) -> tuple[bytes, array[int], bytes, array[int]]:
    """storage.py's four parts for `events` (timestamps of varying length)."""
    frags = [orjson.dumps(e) for e in events]
    times = [f"2026-12-01T00:00:{i % 60:02d}.{'0' * (i % 7)}Z".encode()
             for i in range(len(events))]
    tdata, tlens = pack_times(times)
    return b"".join(frags), new_lens(map(len, frags)), tdata, tlens


@needs_native
@settings(max_examples=300, deadline=None)
@given(texts, st.data())
def test_array_chunk_agrees(events: list[str], data: st.DataObject) -> None:
    raw, lens, tdata, tlens = encoded(events)
    n = len(lens)
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    for buf, tbuf in ((raw, tdata), (bytearray(raw), bytearray(tdata))):
        got = native.array_chunk(buf, lens, tbuf, tlens, lo, hi, MID, SEP, LAST)
        assert got == assemble.py_array_chunk(buf, lens, tbuf, tlens, lo, hi, MID, SEP, LAST)
    if hi > lo:  # the reference of the reference: the events and times lo..hi-1, in order
        frags = pieces(raw, lens)[lo:hi]
        times = pieces(tdata, tlens)[lo:hi]
        assert got == SEP.join(f + MID + t for f, t in zip(frags, times, strict=True)) + LAST


@needs_native
@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from([b",", b"", b"\n", b"--sep--"]))
def test_join_fragments_agrees(events: list[str], sep: bytes) -> None:
    raw, lens, _, _ = encoded(events)
    got = native.join_fragments(bytearray(raw), lens, sep)
    assert got == assemble.py_join_fragments(raw, lens, sep)
    if sep == b",":
        assert orjson.loads(b"[" + got + b"]") == events


@pytest.mark.parametrize("impl", ["native", "python"])
@pytest.mark.parametrize(("lengths", "tdata"), [([5, 3], b"tt"), ([999], b"t"),
                                                ([2, 2, 1000], b"ttt"), ([4, 3], b"t")])
def test_bad_lengths_raise_instead_of_reading_past(impl: str, lengths: list[int],
                                                   tdata: bytes) -> None:
    """Lengths past the data, or timestamps past theirs (a batch read back from disk)."""
    if impl == "native" and native is None:
        pytest.skip("compiled assembly not built")
    mod = native if impl == "native" else None
    chunk = mod.array_chunk if mod else assemble.py_array_chunk
    join = mod.join_fragments if mod else assemble.py_join_fragments
    data = b'"ab""c"'
    lens, tlens = new_lens(lengths), new_tlens([1] * len(lengths))
    calls: list[Callable[[], bytes]] = [
        lambda: chunk(data, lens, tdata, tlens, 0, len(lens), MID, SEP, LAST),
    ]
    if sum(lengths) > len(data):
        calls.append(lambda: join(data, lens, b","))
    for call in calls:
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):  # a range past the events
        chunk(data, lens, tdata, tlens, 0, len(lens) + 1, MID, SEP, LAST)


def test_the_chosen_implementation_is_named() -> None:
    assert assemble.IMPLEMENTATION in ("native", "python")
    if native is not None and not os.environ.get("HAPROXY_FORWARDER_NO_EXTENSIONS"):
        assert assemble.IMPLEMENTATION == "native"


# -- /plain/batch: fragments decoded back to their texts ------------------------------------

# Every code point class that matters to the decoder: escapes orjson writes (quote, backslash,
# controls), 2/3/4-byte UTF-8, U+2028, NUL.
plain_texts = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
    | st.sampled_from(['"GET / HTTP/1.1"', "a\\b", "\x00\x1f\x7f", "\u2028\u2029", "😀é€",
                       "line\nnext", ""]),
    max_size=30)


@needs_native
@settings(max_examples=400, deadline=None)
@given(plain_texts, st.sampled_from([b"\n", b"", b"--"]))
def test_plain_lines_agrees(events: list[str], sep: bytes) -> None:
    raw, lens, _, _ = encoded(events)
    want = sep.decode().join(events).encode("utf-8")
    assert assemble.py_plain_lines(raw, lens, sep) == want
    for buf in (raw, bytearray(raw)):
        assert native.plain_lines(buf, lens, sep) == want
        assert assemble.plain_lines(buf, lens, sep) == want


# JSON the decoder accepts although orjson never writes it that way.
@needs_native
@pytest.mark.parametrize("fragment", [b'"\\/"', b'"\\u00e9\\u20AC"', b'"\\ud83d\\ude00"',
                                      b'"\\u0000x"', b'""'])
def test_plain_lines_other_escapes(fragment: bytes) -> None:
    assert native.plain_lines(fragment, new_lens([len(fragment)]), b"\n") == \
        orjson.loads(fragment).encode("utf-8")


# Not a plain JSON string literal: the compiled decoder refuses, the reference one decides.
BAD_FRAGMENTS = [b"x", b'"', b'"a', b'a"', b'"a"b"', b'"\\"', b'"\\x"', b'"\\u12"', b'"\\u12zz"',
                 b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"', b'"\x01"', b'"\xff"',
                 b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"',
                 b'"\xf0\x9f\x98"', b'1', b'']


@needs_native
@pytest.mark.parametrize("fragment", BAD_FRAGMENTS)
def test_plain_lines_refuses_what_is_not_plain(fragment: bytes) -> None:
    data = b'"ok"' + fragment
    ends = new_lens([4, len(fragment)])
    with pytest.raises(ValueError):
        native.plain_lines(data, ends, b"\n")
    try:
        want: bytes | type[Exception] = assemble.py_plain_lines(data, ends, b"\n")
    except Exception as exc:  # whatever the reference raises, the seam must raise
        want = type(exc)
    if isinstance(want, bytes):
        assert assemble.plain_lines(data, ends, b"\n") == want
    else:
        with pytest.raises(want):
            assemble.plain_lines(data, ends, b"\n")


@needs_native
def test_plain_lines_bad_offsets_raise() -> None:
    with pytest.raises(ValueError):
        native.plain_lines(b'"ab""c"', new_lens([5, 3]), b"\n")
