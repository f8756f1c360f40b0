"""RFC 6587 de-framing: the shared conformance vectors, split reads and the peers' old bugs.
Vectors are read from tests/conformance (the project's copy, its README names each source)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools import conformance
from haproxy_forwarder.syslog.framing import FrameDecoder

VECTORS = conformance.path(conformance.FRAMING_VECTORS)

FRAMING = {"octet-counting": "octet-counted", "non-transparent": "lf", "auto": "auto"}


def _rows() -> list[Any]:
    if not VECTORS.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{VECTORS} missing"))]
    return [pytest.param(r, id=r["id"]) for r in conformance.rows(conformance.FRAMING_VECTORS)]


# Rows where we deliberately do not give `expected`: id -> (messages, error?, oversized, why).
DIVERGES: dict[str, tuple[list[str], bool, int, str]] = {
    # The vectors report oversize as a connection error; we skip the frame as it streams
    # past, count it and carry on (rsyslog keeps the connection too).  016 still ends
    # with an error because the stream stops inside the announced 1005 octets.
    "frame-012": ([], False, 1, "oversize skipped and resynced, not fatal"),
    "frame-016": ([], True, 1, "oversize skipped; EOF inside the skipped frame"),
    "frame-031": ([], False, 1, "over-long LF line dropped up to its LF, not fatal"),
    # The de-framer is transparent: CR stays in the frame (alt_expected, "strict") and
    # event_text() removes it, so it is stripped once, in one place.
    "frame-028": (
        ["<13>1 - - - - - - hello\r", "<13>1 - - - - - - world\r"],
        False,
        0,
        "CR kept by framing, stripped by event_text",
    ),
    # The vectors pick the framing per frame (rsyslog/HAProxy).  We decide once per
    # connection from its first byte, because per-frame detection is what broke Vector
    # (#4852: LF messages starting with a digit read as a count).  A sender that mixes
    # both framings on one connection is therefore cut off at the first LF frame.
    "frame-037": (["<1>1 - - - - - -"], True, 0, "framing is per connection (Vector #4852)"),
    "frame-038": (["<1>1 - - - - - -"], True, 0, "framing is per connection (Vector #4852)"),
}


def _run(dec: FrameDecoder, stream: bytes, splits: list[int]) -> list[bytes]:
    out: list[bytes] = []
    last = 0
    for cut in [*splits, len(stream)]:
        out += dec.feed(stream[last:cut])
        last = cut
    out += dec.close()
    return out


@pytest.mark.parametrize("row", _rows())
def test_vector(row: dict[str, Any]) -> None:
    # Every row applies: "udp" rows are one datagram, which we de-frame like an LF stream.
    stream = row["stream"].encode(row.get("stream_encoding") or "utf-8")
    kwargs: dict[str, Any] = {"framing": FRAMING[row["framing"]]}
    if row.get("max_msg_len"):
        kwargs["max_message_size"] = row["max_msg_len"]
    if row.get("trailer") == "\u0000":
        kwargs["nul_delimiter"] = True
    dec = FrameDecoder(**kwargs)
    got = _run(dec, stream, row.get("split_at") or [])
    exp = row["expected"]
    if row["id"] in DIVERGES:
        messages, has_error, oversized, _why = DIVERGES[row["id"]]
        assert got == [m.encode() for m in messages]
        assert (dec.error is not None) == has_error, dec.error
        assert dec.oversized == oversized
        return
    assert got == [m.encode() for m in exp["messages"]]
    # Our messages use the vectors' wording, so compare them exactly.
    assert dec.error == exp["error"]
    assert dec.oversized == 0


def test_vector_rows_all_seen() -> None:
    if not VECTORS.is_file():
        pytest.skip(f"{VECTORS} missing")
    ids = {r["id"] for r in conformance.rows(conformance.FRAMING_VECTORS)}
    assert set(DIVERGES) <= ids


# -- regressions named after the peers' bugs ------------------------------------------


def test_vector_4852_lf_message_starting_with_digit_is_not_a_count() -> None:
    stream = b"<13>Nov 26 21:58:51 h t: first\n2026 starts with a digit\n42 0 also\n"
    for size in (1, 2, 7, len(stream)):
        dec = FrameDecoder()
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        got = [f for c in chunks for f in dec.feed(c)] + dec.close()
        assert dec.mode == "lf"
        assert got == [
            b"<13>Nov 26 21:58:51 h t: first",
            b"2026 starts with a digit",
            b"42 0 also",
        ]
        assert dec.error is None


@pytest.mark.parametrize(
    "stream",
    [b"1 <23>4" * 2, b"1 <23>4\n" * 2, b"1 <23>41 <23>4\n"],
    ids=["bare", "lf", "mixed"],
)
@pytest.mark.timeout(10)
def test_vector_4895_one_octet_frame_twice_terminates(stream: bytes) -> None:
    # "1 <" is a valid 1-octet frame; what follows ("23>4...") is not a MSG-LEN SP.
    for size in (1, 3, len(stream)):
        dec = FrameDecoder()
        got: list[bytes] = []
        for i in range(0, len(stream), size):
            got += dec.feed(stream[i : i + size])
        got += dec.close()
        assert got == [b"<"]
        assert dec.error == "expected SP after MSG-LEN, found '>'"
        assert dec.feed(b"5 hello") == []


def _oversize_stream() -> tuple[bytes, list[bytes]]:
    big = b"<13>" + b"x" * 20
    frames = [b"<13>ok", b"<14>two"]
    stream = b"%d %s" % (len(big), big) + b"".join(b"%d %s" % (len(f), f) for f in frames)
    return stream, frames


def test_vector_pr25657_oversized_frame_split_at_every_byte_resyncs() -> None:
    stream, frames = _oversize_stream()
    for cut in range(len(stream) + 1):
        dec = FrameDecoder(max_message_size=10)
        got = _run(dec, stream, [cut])
        assert got == frames, cut
        assert dec.oversized == 1
        assert dec.error is None


def test_oversized_octet_frame_byte_by_byte_and_every_pair_of_cuts() -> None:
    stream, frames = _oversize_stream()
    dec = FrameDecoder(max_message_size=10)
    assert _run(dec, stream, list(range(1, len(stream)))) == frames
    assert dec.oversized == 1
    for a in range(len(stream)):
        for b in range(a, len(stream) + 1):
            dec = FrameDecoder(max_message_size=10)
            assert _run(dec, stream, [a, b]) == frames, (a, b)
            assert dec.buffered <= 10 + 4


def test_oversized_lf_line_split_at_every_byte_resyncs() -> None:
    stream = b"<13>a\n<13>" + b"y" * 30 + b"\n<13>b\n<13>" + b"z" * 30 + b"\n<13>c"
    for cut in range(len(stream) + 1):
        dec = FrameDecoder(max_message_size=10)
        assert _run(dec, stream, [cut]) == [b"<13>a", b"<13>b", b"<13>c"], cut
        assert dec.oversized == 2
        assert dec.error is None


def test_lf_line_of_exactly_max_is_kept() -> None:
    dec = FrameDecoder(max_message_size=5, framing="lf")
    assert _run(dec, b"abcde\nabcdef\nab", [3, 8]) == [b"abcde", b"ab"]
    assert dec.oversized == 1


def test_octet_frame_of_exactly_max_is_kept() -> None:
    dec = FrameDecoder(max_message_size=5)
    assert _run(dec, b"5 abcde6 abcdef2 ab", [4, 9]) == [b"abcde", b"ab"]
    assert dec.oversized == 1


def test_length_prefix_with_too_many_digits_is_an_error() -> None:
    dec = FrameDecoder(max_message_size=100)  # up to 5 digits are skippable
    assert dec.feed(b"99999 ") == []
    assert dec.error is None
    dec = FrameDecoder(max_message_size=100)
    assert dec.feed(b"100000") == []
    assert dec.error is not None and "MSG-LEN longer" in dec.error
    dec = FrameDecoder(max_message_size=100)
    for b in b"1000000":
        dec.feed(bytes([b]))
    assert dec.error is not None


def test_nul_is_data_unless_configured() -> None:
    stream = b"<1>a\x00<2>b\x00\n"
    assert _run(FrameDecoder(), stream, []) == [b"<1>a\x00<2>b\x00"]
    assert _run(FrameDecoder(nul_delimiter=True), stream, [5]) == [b"<1>a", b"<2>b"]


def test_mode_is_decided_by_first_byte_and_kept() -> None:
    dec = FrameDecoder()
    assert dec.mode is None
    assert dec.feed(b"") == []
    assert dec.mode is None
    dec.feed(b"3 ")
    assert dec.mode == "octet-counted"
    assert dec.feed(b"abc") == [b"abc"]
    assert FrameDecoder(framing="lf").mode == "lf"
    with pytest.raises(ValueError):
        FrameDecoder(framing="per-frame")


def test_close_reports_truncation_and_is_idempotent() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"10 <1>") == []
    assert dec.close() == []
    assert dec.error == "EOF inside frame (3 of 10 octets)"
    assert dec.close() == []
    assert dec.feed(b"1 x") == []
    dec = FrameDecoder(max_message_size=4)
    dec.feed(b"10 <1>")
    dec.close()
    assert dec.error is not None and dec.oversized == 1
    clean = FrameDecoder()
    assert clean.feed(b"3 abc") == [b"abc"]
    assert clean.close() == [] and clean.error is None


def test_many_frames_in_one_read() -> None:
    frames = [b"<134>1 - - haproxy %d - - msg %d" % (i, i) for i in range(10_000)]
    stream = b"".join(b"%d %s" % (len(f), f) for f in frames)
    dec = FrameDecoder()
    assert dec.feed(stream) == frames
    assert dec.buffered == 0
    lf = FrameDecoder()
    assert lf.feed(b"\n".join(frames) + b"\n") == frames


# -- properties ----------------------------------------------------------------------

frame_bytes = st.binary(min_size=1, max_size=60)


@st.composite
def split_points(draw: st.DrawFn, length: int) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, length), max_size=12)))


@given(st.lists(frame_bytes, max_size=15), st.data())
def test_any_split_of_an_octet_stream_gives_the_same_frames(
    frames: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(b"%d %s" % (len(f), f) for f in frames)
    dec = FrameDecoder(max_message_size=60)
    assert _run(dec, stream, data.draw(split_points(len(stream)))) == frames
    assert dec.error is None and dec.oversized == 0


@given(
    st.lists(frame_bytes.map(lambda b: b.replace(b"\n", b"")).filter(bool), max_size=15),
    st.data(),
    st.booleans(),
)
def test_any_split_of_an_lf_stream_gives_the_same_frames(
    frames: list[bytes], data: st.DataObject, trailer: bool
) -> None:
    # "<" first, as every syslog frame has, so that auto detection picks LF.
    frames = [b"<" + f for f in frames]
    stream = b"\n".join(frames) + (b"\n" if trailer else b"")
    dec = FrameDecoder(max_message_size=61)
    assert _run(dec, stream, data.draw(split_points(len(stream)))) == frames
    assert dec.error is None and dec.oversized == 0


@given(
    st.lists(st.binary(max_size=40), max_size=20),
    st.sampled_from(["auto", "octet-counted", "lf"]),
    st.booleans(),
)
@settings(max_examples=300)
def test_random_bytes_never_raise_and_stay_bounded(
    chunks: list[bytes], framing: str, nul: bool
) -> None:
    maxlen = 16
    dec = FrameDecoder(max_message_size=maxlen, framing=framing, nul_delimiter=nul)
    for chunk in chunks:
        for frame in dec.feed(chunk):
            assert 0 < len(frame) <= maxlen
        # the limit, plus at most a length prefix's digits
        assert dec.buffered <= maxlen + len(str(maxlen)) + 2
    for frame in dec.close():
        assert 0 < len(frame) <= maxlen
    assert dec.buffered == 0 or dec.error is not None or dec.mode == "lf"


@given(st.binary(max_size=400), st.data())
def test_random_stream_is_split_independent(stream: bytes, data: st.DataObject) -> None:
    whole = FrameDecoder(max_message_size=32)
    ref = _run(whole, stream, [])
    parts = FrameDecoder(max_message_size=32)
    assert _run(parts, stream, data.draw(split_points(len(stream)))) == ref
    assert (parts.error, parts.oversized) == (whole.error, whole.oversized)
