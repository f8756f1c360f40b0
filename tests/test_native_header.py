"""The compiled header reader (ingest/_header.pxi) against syslog.header.read_header.
Differential only: both must give the same 15 fields for every input, conformance or random."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools import conformance
from devtools.traffic import httplog_line, other_program_line, rfc5424, syslog_time, traditional
from haproxy_forwarder.syslog.header import read_header, valid_time

try:
    from haproxy_forwarder.ingest._header import read_header as native_read_header
    from haproxy_forwarder.ingest._header import valid_time as native_valid_time
except ImportError as exc:  # pragma: no cover - depends on the build
    if os.environ.get("HAPROXY_FORWARDER_EXPECT_COMPILED") == "1":
        raise ImportError(
            "HAPROXY_FORWARDER_EXPECT_COMPILED=1 but haproxy_forwarder.ingest._header "
            f"does not import: {exc}"
        ) from exc
    pytest.skip(f"compiled header reader not built: {exc}", allow_module_level=True)


def _vector_inputs() -> list[bytes]:
    out: list[bytes] = []
    for name in (conformance.RFC5424_VECTORS, conformance.RFC3164_VECTORS):
        for row in conformance.rows(name):
            if row.get("input_hex"):
                out.append(bytes.fromhex(row["input_hex"]))
            else:
                out.append(row["input"].encode("utf-8"))
    return out


def _payloads() -> list[bytes]:
    """HAProxy lines and Sekoia samples as they appear on the wire, unwrapped."""
    out: list[bytes] = []
    out += conformance.text_lines(conformance.HAPROXY_LINES)
    out += [x.encode() for x in conformance.rows(conformance.SEKOIA_SAMPLES)]
    return out


WRAPPERS = (
    b"",
    b"<134>",
    b"<134>Feb  6 12:14:14 ",
    b"<134>Feb  6 12:14:14 localhost ",
    b"<134>Feb  6 12:14:14 lb1 haproxy[1]: ",
    b"<134>2026-11-26T21:58:51.123456+01:00 lb1 haproxy[1]: ",
    b"<134>1 2026-11-26T21:58:51.123456+01:00 lb1 haproxy 14389 - - ",
    b'<134>1 2026-11-26T21:58:51.123456+01:00 - haproxy 14389 - [a@1 b="]\\""] ',
)

VECTORS = _vector_inputs()
PAYLOADS = _payloads()
BENCH_LIKE = [
    traditional("haproxy", httplog_line(random.Random(i), i, 79080 + i), ts=syslog_time(79080 + i))
    for i in range(20)
] + [
    traditional(prog, msg, pri=86, pid=300 + i)
    for i, (prog, msg) in enumerate(other_program_line(random.Random(i)) for i in range(20))
] + [rfc5424("haproxy", httplog_line(random.Random(i), i, 79080)) for i in range(5)]
CORPUS = VECTORS + [w + p for w in WRAPPERS for p in PAYLOADS] + BENCH_LIKE


def same(frame: bytes) -> None:
    assert native_read_header(frame) == tuple(read_header(frame)), frame


def test_corpus_is_there() -> None:
    assert len(VECTORS) > 200
    assert len(PAYLOADS) > 50


@pytest.mark.parametrize("frame", CORPUS)
def test_corpus_agrees(frame: bytes) -> None:
    same(frame)


@pytest.mark.parametrize("frame", VECTORS + BENCH_LIKE + [WRAPPERS[-1] + b"m", WRAPPERS[-3]])
def test_every_truncation_agrees(frame: bytes) -> None:
    for k in range(len(frame) + 1):
        same(frame[:k])


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b" ",
        b"<",
        b"<>",
        b"<1>",
        b"<999>x",
        b"  <13>1 - - - - - -",
        b"<13>1 -",
        b"<13>1 - ",
        b"<13>12 2026-",
        b"Jan 12 06:30:0",  # 14 bytes: the reference reports ts_end == 15 (see the report)
        b"Jan 12 06:30:00",
        b"JAN 12 06:30:00 h t: m",
        b"jAn 12 06:30:00 h t: m",
        b"Oct 16 2009 23:47:31: host t[1] m",
        b"Oct  6 23:47:31.123: host t[1] m",
        b"<13>2026-11-26T21:58:51Z h  IP6[015]: x",
        b"<13>2026-11-26T21:58:51.123-01:00 fe80::1:2 t: x",
        b"<13>2026-11-26T21:58:51+01:00 10.0.1.2:33317 [06/Feb/2009:12:14:14.655] x",
        b'<13>1 - - - - - [a b="\\\\"][c d="x\\"]"] m',
        b'<13>1 - - - - - [a b="unterminated] m',
        b"<13>1 - - - - - [a][b]x",
        b"<13>Nov 26 21:58:51 host  tag: msg",
        b"<13>Nov 26 21:58:51 host  tag:",
        b"<13>Nov 26 21:58:51 host  t[1]x: m",
        b"<13>Nov 26 21:58:51 host  t[1]",
        b"<13>Nov 26 21:58:51 host  t[1 m",
        b"<13>Nov 26 21:58:51 host  plain words",
    ],
)
def test_edges_agree(frame: bytes) -> None:
    same(frame)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120))
def test_random_bytes_agree(frame: bytes) -> None:
    same(frame)


# Bytes that move the reader between branches: PRI, VERSION, separators, SD, BOM, non-ASCII.
TOKENS = [b" ", b"[", b"]", b":", b"-", b"<", b">", b'"', b"\\", b".", b"T", b"Z", b"+",
          b"\xef\xbb\xbf", b"\xff", b"\x00", b"\n", b"0", b"1", b"9", b"Jan", b"jan", b"JAN"]
SEEDS = VECTORS[::3] + BENCH_LIKE[::5] + [w + b"haproxy[1]: x" for w in WRAPPERS]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(frame)))
        op = draw(st.integers(0, 2))
        if op == 0 and at < len(frame):
            frame[at] = draw(st.integers(0, 255))
        elif op == 1:
            frame[at:at] = draw(st.sampled_from(TOKENS))
        else:
            del frame[at : at + draw(st.integers(1, 4))]
    return bytes(frame)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_frames_agree(frame: bytes) -> None:
    same(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_frames_agree_at_every_length(frame: bytes) -> None:
    for k in range(len(frame) + 1):
        same(frame[:k])


def test_types_are_the_references() -> None:
    got: tuple[Any, ...] = native_read_header(b"<134>1 2026-11-26T21:58:51Z h a p m - x")
    assert got == tuple(read_header(b"<134>1 2026-11-26T21:58:51Z h a p m - x"))
    assert got[6] is True
    assert [type(x) for i, x in enumerate(got) if i != 6] == [int] * 14


# -- valid_time: the calendar check of a zoned header time --------------------------------------

TIMES = [
    b"2024-02-29T12:00:00Z", b"2023-02-29T12:00:00Z", b"2000-02-29T00:00:00Z",
    b"1900-02-29T00:00:00Z", b"2100-02-29T00:00:00Z", b"2400-02-29T00:00:00Z",
    b"1970-01-01T00:00:00Z", b"1969-12-31T23:59:59Z", b"9999-12-31T23:59:60.999999Z",
    b"9999-99-99T99:99:99Z", b"2026-11-26T21:58:51+99:99", b"2026-11-26T21:58:51.123456+14:00",
    b"2026-11-26T21:58:51.1234567+14:00", b"2026-11-26T21:58:51.+14:00",
    b"2026-11-26T21:58:51-14:01", b"2026-11-26T21:58:51-13:59", b"2026-04-31T00:00:00Z",
    b"2026-11-26T21:58:Z12", b"2026-11-26T21:58:+1234:56", b"2026-11-26T21:58:51.1Z23",
    b"2026-11-26t21:58:51z", b"\xd9\xa0026-11-26T21:58:51Z",  # Arabic-Indic zero: not ASCII
] + [b"2026-%02d-%02dT%02d:%02d:%02dZ" % (m, d, d % 25, d * 2, d * 2) for m in range(14)
     for d in range(33)]


def same_time(token: bytes) -> None:
    assert native_valid_time(token) is valid_time(token), token


@pytest.mark.parametrize("token", TIMES)
def test_valid_time_agrees_at_every_length(token: bytes) -> None:
    for k in range(len(token) + 1):
        same_time(token[:k])
        same_time(token[k:])


def test_valid_time_cases_cover_both_answers() -> None:
    answers = [valid_time(t) for t in TIMES]
    assert answers.count(True) > 100 and answers.count(False) > 100


TIME_TOKENS = [b"0", b"1", b"2", b"3", b"9", b"-", b":", b"T", b"Z", b"+", b".", b"\xff"]


@st.composite
def mutated_time(draw: st.DrawFn) -> bytes:
    token = bytearray(draw(st.sampled_from(TIMES[:16])))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(token)))
        op = draw(st.integers(0, 2))
        if op == 0 and at < len(token):
            token[at : at + 1] = draw(st.sampled_from(TIME_TOKENS))
        elif op == 1:
            token[at:at] = draw(st.sampled_from(TIME_TOKENS))
        else:
            del token[at : at + draw(st.integers(1, 3))]
    return bytes(token)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_time())
def test_mutated_times_agree(token: bytes) -> None:
    same_time(token)
