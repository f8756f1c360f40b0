"""The compiled ChunkReader against the pure-Python one: identical ChunkResults, call by call.
Differential (Hypothesis: random and mutated syslog streams, random splits) and exhaustive."""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.stream import write_stream
from devtools.traffic import haproxy_line, lf_framed, octet_counted, rfc5424, traditional
from haproxy_forwarder.config import MAX_EVENT_BYTES
from haproxy_forwarder.ingest import AUTO, DATAGRAM, LF, OCTET, ChunkResult, ProgramFilter
from haproxy_forwarder.ingest._py import PyChunkReader
from tests.ingest_contract import EXPECT_COMPILED

try:
    from haproxy_forwarder.ingest._native import NativeChunkReader
except ImportError:
    if EXPECT_COMPILED:
        raise
    pytest.skip("haproxy_forwarder.ingest._native is not built", allow_module_level=True)

FRAMINGS = [AUTO, OCTET, LF, DATAGRAM]
HAPROXY = ProgramFilter(["haproxy", "hapee"])
FILTERS = [
    HAPROXY,
    ProgramFilter(["haproxy", "hapee"], keep_tag=["haproxy", "hapee"]),
    ProgramFilter(["haproxy"], keep_tag=()),
    # One-letter prefixes: most frames pass and keep their tag, whatever the header shape.
    ProgramFilter(["h", "s", "<", "\ufffd", "1"], keep_tag=["h", "s", "1"]),
]
MAX = 262144
T1 = b"2026-01-02T03:04:05.678Z"
T2 = b"2026-01-02T03:04:06.000Z"


def both(chunks: Sequence[bytes], filt: ProgramFilter = HAPROXY, max_size: int = MAX,
         framing: str = AUTO) -> list[ChunkResult]:
    """Feed both readers the same calls; every ChunkResult and `buffered` must be equal."""
    py = PyChunkReader(filt, max_size, framing)
    nat = NativeChunkReader(filt, max_size, framing)
    results: list[ChunkResult] = []
    for i, chunk in enumerate(chunks):
        at = T1 if i % 3 else T2
        want, got = py.feed(chunk, at), nat.feed(chunk, at)
        assert got == want, (i, chunk)
        assert nat.buffered == py.buffered
        results.append(got)
    for _ in range(2):
        want, got = py.close(T2), nat.close(T2)
        assert got == want
        assert nat.buffered == py.buffered
        results.append(got)
    assert nat.fallbacks == 0  # the compiled header reader always gives usable spans
    return results


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# -- generated syslog traffic ------------------------------------------------------------------

ODD = [
    b'"', b"\\", b"\\\\", b'\\"', b"\x00", b"\x01", b"\x07", b"\x08", b"\t", b"\n", b"\x0b",
    b"\x0c", b"\r", b"\r\n", b"\x1f", b"\x7f", b" ", b"  ", b"a", b"0", b"[", b"]", b":", b"-",
    b"=", b"@",
    b"\xef\xbb\xbf", b"\xef\xbb", b"\xef", "\u2028".encode(), "é".encode(), "€".encode(),
    "😀".encode(), "😀".encode()[:3], "😀".encode()[:2], b"\xed\xa0\x80", b"\xed\x9f\xbf",
    b"\xc0\x80", b"\xc1\xbf", b"\xc2", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xe0\xa0\x80",
    b"\xf0\x80\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xfe", b"\x80", b"\xbf",
    b"abcdefghijklmnop", b"GET /index.html HTTP/1.1",
]
PROGRAMS = [b"haproxy", b"hapee-lb", b"haproxyx", b"sshd", b"h\xff", b"hap\xc3", b"h\x01",
            b"h\"q", b"\xef\xbb\xbfhaproxy"]
TIMES = [b"2026-11-26T21:58:51.123456+01:00", b"2026-11-26T21:58:51Z", b"-",
         b"2026-11-26T21:58:51", b"2026-11-26T21:58:51.1234567Z", b"2026-11-26T21:58:51.1-05:00"]
PIECES = [*ODD, b"<134>", b"<13>1 ", b"<134>1 ", b"Feb  6 12:14:14 ", b"Oct 16 2009 23:47:31 ",
          b"haproxy[1]: ", b"hapee-lb: ", b"lb1 ", b"- - ", b'[a@1 b="]"] ', b"12 ", b"1",
          b"9 ", b"0 ", TIMES[0]]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    return b"".join(draw(st.lists(st.sampled_from(ODD), max_size=16)))


@st.composite
def syslog_frames(draw: st.DrawFn) -> bytes:
    """One frame as rsyslog / HAProxy write them (every header shape), with an odd MSG."""
    prog = draw(st.sampled_from(PROGRAMS))
    pid = b"%d" % draw(st.integers(0, 99999))
    body = draw(bodies())
    ts = draw(st.sampled_from(TIMES))
    shape = draw(st.sampled_from(
        ["3164", "3164-nopid", "local", "5424", "5424-sd", "5424-nil", "forward", "iso",
         "priority", "bare", "haproxy-raw"]))
    if shape == "3164":
        head = b"<134>Feb  6 12:14:14 lb1 %s[%s]: " % (prog, pid)
    elif shape == "3164-nopid":
        head = b"<134>Oct 16 2009 23:47:31 lb1 %s: " % prog
    elif shape == "local":
        head = b"<134>Feb 16 12:14:14 %s[%s]: " % (prog, pid)
    elif shape == "5424":
        head = b"<134>1 %s lb1 %s %s - - " % (ts, prog, pid)
    elif shape == "5424-sd":
        sd = draw(st.sampled_from([b'[a@1 b="\\"]"]', b'[a@1 b="x"][c@2 d="\\\\"]', b"[x]",
                                   b'[a@1 b="unterminated', b"[]"]))
        head = b"<134>1 %s - %s - MSGID %s " % (ts, prog, sd)
    elif shape == "5424-nil":
        head = b"<134>1 %s - %s - - - " % (ts, prog)
    elif shape == "forward":
        head = b"<134>%s lb1 %s[%s]: " % (ts, prog, pid)
    elif shape == "iso":
        head = b"%s %s[%s]: " % (ts, prog, pid)
    elif shape == "priority":
        head = b"<134>%s: " % prog
    elif shape == "haproxy-raw":
        head = b""
        body = haproxy_line(draw(st.integers(0, 10**6))).encode() + body
    else:
        head = b""
    return head + body


@st.composite
def mutated(draw: st.DrawFn, frame: bytes) -> bytes:
    """`frame` with a few bytes replaced, inserted or deleted anywhere (header included)."""
    data = bytearray(frame)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        piece = draw(st.sampled_from([*ODD, bytes([draw(st.integers(0, 255))])]))
        if op == "insert" or not data:
            data[at:at] = piece
        elif op == "replace":
            data[at : at + len(piece)] = piece
        else:
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], str, int]:
    """(chunks, framing, max_message_size): valid-looking traffic, mutated, randomly cut."""
    framing = draw(st.sampled_from(FRAMINGS))
    frames = [draw(mutated(draw(syslog_frames())))
              for _ in range(draw(st.integers(1, 8)))]
    max_size = draw(st.sampled_from([1, 10, 40, 90, 300, MAX]))
    if framing == DATAGRAM:
        return [f + b"\n" if draw(st.booleans()) else f for f in frames], framing, max_size
    if framing == LF or (framing == AUTO and draw(st.booleans())):
        stream = b"".join(f.replace(b"\n", b"") + b"\n" for f in frames)
    else:
        stream = octet_counted(f or b"x" for f in frames)
    stream = draw(mutated(stream)) if draw(st.integers(0, 4)) == 0 else stream
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=10))
    return split(stream, cuts), framing, max_size


@given(case=streams(), filt=st.sampled_from(FILTERS))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_syslog_streams_give_identical_results(
    case: tuple[list[bytes], str, int], filt: ProgramFilter
) -> None:
    chunks, framing, max_size = case
    both(chunks, filt, max_size, framing)


@given(
    data=st.data(),
    stream=st.one_of(st.binary(max_size=600),
                     st.lists(st.sampled_from([*PIECES, b"\n"]), max_size=80).map(b"".join)),
    framing=st.sampled_from(FRAMINGS),
    max_size=st.sampled_from([1, 2, 8, 30, 300, MAX]),
    filt=st.sampled_from(FILTERS),
)
@settings(max_examples=1500, deadline=None)
def test_random_bytes_give_identical_results(
    data: st.DataObject, stream: bytes, framing: str, max_size: int, filt: ProgramFilter
) -> None:
    chunks = ([stream] if framing == DATAGRAM
              else split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=12))))
    both(chunks, filt, max_size, framing)


@given(frames=st.lists(syslog_frames(), min_size=1, max_size=6), octet_framed=st.booleans())
@settings(max_examples=200, deadline=None)
def test_byte_by_byte_feeding_gives_identical_results(
    frames: list[bytes], octet_framed: bool
) -> None:
    if octet_framed:
        stream = octet_counted(f or b"x" for f in frames)
    else:
        stream = b"".join(f.replace(b"\n", b"") + b"\n" for f in frames)
    both([stream[i : i + 1] for i in range(len(stream))], FILTERS[1], 120)


# -- exhaustive: UTF-8 replacement, JSON escapes, strips ----------------------------------------

HEAD = b"<134>Feb  6 12:14:14 lb1 haproxy[1]: "
KEEP = ProgramFilter(["haproxy"], keep_tag=())


def _datagrams(pieces: list[bytes], per: int = 4000) -> list[bytes]:
    # "|" between pieces: ASCII is never part of an invalid sequence, so each piece is decoded
    # on its own, as if alone, and one frame carries thousands of cases.
    return [HEAD + b"|".join(pieces[i : i + per]) for i in range(0, len(pieces), per)]


def test_every_utf8_sequence_is_decoded_as_cpython_does() -> None:
    tails = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xE0, 0xF0, 0xFF]
    pieces = [bytes([a]) for a in range(256)]
    pieces += [bytes([a, b]) for a in range(0x80, 0x100) for b in range(256)]
    pieces += [bytes([a, b, c]) for a in range(0xE0, 0x100) for b in range(0x80, 0xC0)
               for c in tails]
    pieces += [bytes([a, b, c, d]) for a in range(0xF0, 0x100) for b in (0x80, 0x8F, 0x90, 0xBF)
               for c in (0x80, 0xBF, 0x41) for d in tails]
    # and cut at the end of the frame (CPython's "unexpected end of data")
    ends = [bytes([a, b]) for a in range(0xE0, 0x100) for b in range(0x80, 0xC0)]
    out = both(_datagrams(pieces) + [HEAD + p for p in ends], KEEP, MAX, DATAGRAM)
    assert sum(len(r) for r in out) == len(_datagrams(pieces)) + len(ends)


def test_every_byte_is_escaped_as_orjson_does_at_every_alignment() -> None:
    # The compiled escaper copies 8 bytes at a time: put each byte at each offset of a word.
    frames = [HEAD + b"p" * k + bytes([c]) + b"q" * (17 - k)
              for c in range(256) for k in range(18)]
    frames += [HEAD + bytes(range(k, 256)) + bytes(range(k)) for k in range(0, 256, 7)]
    both(frames, KEEP, MAX, DATAGRAM)


@pytest.mark.parametrize("framing", [LF, OCTET, DATAGRAM])
def test_leading_sp_bom_and_trailing_cr_lf_nul_mixes(framing: str) -> None:
    lead = [b"", b" ", b"  ", b"\xef\xbb\xbf", b" \xef\xbb\xbf ", b"\xef\xbb\xbf\xef\xbb\xbf",
            b"\xef\xbb", b"\xef\xbb\xbf\xef", b"\t", b"\xc2\xa0"]
    trail = [b"", b"\r", b"\x00", b"\r\x00\r", b" \r", b"\x00 ", b"\xe2\x82", b"\xe2\x82\r",
             b"\xef\xbb\xbf", b"\xf0\x9f\x98"]
    frames = [head + a + m + z for head in (HEAD, b"<134>1 - - hapee-lb 7 - - ", b"")
              for a in lead for m in (b"", b"x", b"\xff") for z in trail]
    if framing == LF:
        chunks = [b"".join(f.replace(b"\n", b"") + b"\n" for f in frames)]
    elif framing == OCTET:
        chunks = [octet_counted(f or b"x" for f in frames)]
    else:
        chunks = frames
    both(chunks, FILTERS[3], MAX, framing)


@pytest.mark.parametrize(
    ("prog", "proc"),
    [(b"hapee-lb", b"12"), (b"hapee-lb", b"-"), (b"hapee\xff\xfe", b"1\xe2\x82"),
     (b'hapee"\\', b"\x01\t"), (b"hapee\xef\xbb\xbf", b" ")],
)
def test_rebuilt_rfc5424_tag(prog: bytes, proc: bytes) -> None:
    # prog and pid are decoded on their own, with replacement, and not stripped.
    frames = [b"<134>1 - lb1 %s %s - - %s" % (prog, proc, m)
              for m in (b"msg", b"", b" \xef\xbb\xbfmsg\r\n", b"\xc3")]
    both(frames, ProgramFilter(["hapee"]), MAX, DATAGRAM)


# -- the 250 KiB rule --------------------------------------------------------------------------

HAPEE_5424 = b"<134>1 - - hapee-lb 1234 - - "


@pytest.mark.parametrize("delta", [-3, -2, -1, 0, 1, 2, 3])
@pytest.mark.parametrize(
    ("head", "fill"),
    [(HEAD, b"a"), (HEAD, "é".encode()), (HEAD, b"\xff"), (HEAD, b"\xe2\x82"), (HEAD, b'"'),
     (HEAD, b"\x01"), (HAPEE_5424, b"a"), (HAPEE_5424, b"\xf0\x9f\x98\x80"),
     (b"<134>Feb  6 12:14:14 lb1 hapee-lb[1]: ", b"\xc3")],
)
def test_events_around_the_size_limit(head: bytes, fill: bytes, delta: int) -> None:
    # Enough fill to land just around MAX_EVENT_BYTES of UTF-8 text, however `fill` decodes.
    per = len(fill.decode("utf-8", "replace").encode())
    count = MAX_EVENT_BYTES // per + delta
    frames = [head + fill * count + b"\r\n", head + b"next"]
    out = both([octet_counted(frames)], HAPROXY, 8 * MAX, OCTET)
    assert out[0].accepted == 2


# -- the bench stream ------------------------------------------------------------------------


def test_bench_stream_gives_identical_results_and_no_fallback(tmp_path: Path) -> None:
    stream = write_stream(tmp_path / "stream.bin", 20_000)
    data = stream.path.read_bytes()
    chunks = [data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
    out = both(chunks, HAPROXY, MAX, AUTO)
    assert sum(r.frames for r in out) == stream.count
    assert sum(len(r) for r in out) == stream.haproxy


@pytest.mark.parametrize("fmt", ["traditional", "rfc5424"])
@pytest.mark.parametrize("framing", [LF, OCTET])
def test_generated_traffic_every_read_size(fmt: str, framing: str) -> None:
    rng = random.Random(7)
    frames = []
    for i in range(3000):
        prog = rng.choice(["haproxy", "hapee-lb", "sshd"])
        frames.append(traditional(prog, haproxy_line(i), pid=i) if fmt == "traditional"
                      else rfc5424(prog, haproxy_line(i)))
    data = lf_framed(frames) if framing == LF else octet_counted(frames)
    for size in (1000, 4096, 65536, 256 * 1024):
        both([data[i : i + size] for i in range(0, len(data), size)], HAPROXY, 1000, framing)


# -- the rest of the interface ---------------------------------------------------------------


def test_constructor_refuses_what_the_python_reader_refuses() -> None:
    for args in ((HAPROXY, 0, AUTO), (HAPROXY, MAX, "tcp"), (HAPROXY, -1, LF)):
        with pytest.raises(ValueError) as py:
            PyChunkReader(*args)
        with pytest.raises(ValueError) as nat:
            NativeChunkReader(*args)
        assert str(nat.value) == str(py.value)


def test_a_datagram_reader_takes_any_limit_as_the_python_one() -> None:
    for limit in (-5, 0, 3, 10**30):
        both([b"", b"\n", b"haproxy: x", HEAD + b"y\n"], HAPROXY, limit, DATAGRAM)


def test_bytes_like_chunks_are_read_as_bytes() -> None:
    frame = octet_counted([HEAD + b"one", HEAD + b"two"])
    r = NativeChunkReader(HAPROXY, MAX, AUTO)
    got = r.feed(bytearray(frame), T1)
    assert got == PyChunkReader(HAPROXY, MAX, AUTO).feed(frame, T1)
    assert got.data == b'"one""two"'


def test_no_python_object_per_event_in_a_result() -> None:
    """The events of a chunk are four buffers: holding 20,000 of them holds a few blocks."""
    ts = b"2026-11-26T21:58:51.123456+01:00"
    frames = [b"<134>1 %s - haproxy 1 - - m%d" % (ts, i) for i in range(20_000)]
    chunk = octet_counted(frames)
    reader = NativeChunkReader(HAPROXY, MAX, OCTET)
    reader.feed(chunk, T1)  # warm: the shared output buffers, the reader's own
    before = sys.getallocatedblocks()
    out = reader.feed(chunk, T1)
    held = sys.getallocatedblocks() - before
    assert len(out) == 20_000 and out.times[:2] == [ts, ts]
    assert held < 50, f"{held} blocks held by a result of 20,000 events"
