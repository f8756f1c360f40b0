"""ChunkReader, every implementation: conformance vectors, filter, timestamps, caps, splits.
Vectors are read from tests/conformance (the project's copy, its README names each source)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools import conformance
from haproxy_forwarder.config import MAX_EVENT_BYTES
from haproxy_forwarder.ingest import (
    AUTO,
    DATAGRAM,
    IMPLEMENTATION,
    LF,
    OCTET,
    ChunkResult,
    ProgramFilter,
    new_reader,
)
from haproxy_forwarder.syslog.header import read_header
from tests.ingest_contract import (
    EXPECT_COMPILED,
    RECEIVED,
    Factory,
    Outcome,
    implementation_params,
    load,
    octet,
    reference,
    reference_stream,
    run,
    split,
)

# Every ChunkReader under test, as (id, "module:Class").  The compiled reader is one more line;
# a line whose module is not built is skipped, unless HAPROXY_FORWARDER_EXPECT_COMPILED=1.
IMPLEMENTATIONS: list[tuple[str, str]] = [
    ("python", "haproxy_forwarder.ingest._py:PyChunkReader"),
    ("native", "haproxy_forwarder.ingest._native:NativeChunkReader"),
]

HAPROXY = ProgramFilter(["haproxy", "hapee"])
MAX = 262144


@pytest.fixture(scope="module", params=implementation_params(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> Factory:
    factory: Factory = request.param
    return factory


def test_compiled_implementation_is_there_when_expected() -> None:
    # Like aiohttp's CI: a build that silently fell back to pure Python must not pass.
    compiled = [spec for name, spec in IMPLEMENTATIONS if name != "python"]
    loaded = [spec for spec in compiled if load(spec) is not None]
    if EXPECT_COMPILED:
        assert loaded, f"HAPROXY_FORWARDER_EXPECT_COMPILED=1 but none loaded of {compiled}"


def test_new_reader_gives_a_working_reader() -> None:
    # What the daemon runs is one of the implementations tested here.
    assert IMPLEMENTATION in {name for name, _spec in IMPLEMENTATIONS}
    for framing in (AUTO, OCTET, LF, DATAGRAM):
        r = new_reader(HAPROXY, MAX, framing)
        out = run(r, [b"<134>Feb  6 12:14:14 haproxy[1]: x\n"])
        # "<" is no MSG-LEN: only a reader forced to octet counting refuses the stream.
        assert (out.events, out.framing_errors) == (([], 1) if framing == OCTET else (["x"], 0))


def feed1(impl: Factory, chunk: bytes, filt: ProgramFilter = HAPROXY, framing: str = AUTO,
          max_message_size: int = MAX) -> Outcome:
    return run(impl(filt, max_message_size, framing), [chunk])


# -- RFC 5424 / RFC 3164 parse vectors -----------------------------------------------------------


def _rows(name: str, valid: bool | None = None) -> list[Any]:
    return [pytest.param(r, id=r["id"]) for r in conformance.rows(name)
            if valid is None or r["valid"] is valid]


_wire = conformance.wire


def _event_of(msg: str | None, encoding: str) -> str:
    """The vector's MSG as we forward it: the wire bytes read as UTF-8 (U+FFFD), leading SPs
    and BOM dropped (the intake wants HAProxy's payload without the SP some formats put first),
    trailing CR/LF/NUL dropped (rsyslog's parser-drop-trailing-cr; HAProxy ends lines so)."""
    raw = (msg or "").encode(encoding).decode("utf-8", "replace")
    return raw.lstrip(" \ufeff").rstrip("\r\n\x00")


RFC3339_ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")


def _time_of(timestamp: str | None) -> bytes:
    # The intake takes an RFC 3339 time with a zone as is; anything else (BSD time without a
    # year or zone, NILVALUE, 7+ fraction digits) would need guessing: reception time instead.
    m = RFC3339_ZONED.fullmatch(timestamp) if timestamp else None
    if m is None:
        return RECEIVED
    # RFC 3339's grammar allows offsets to -23:59 (vectors 5424-080/081); real zones stop at
    # +-14:00, and a time beyond is a sender's error: reception time too.
    if m.group(2) != "Z" and int(m.group(2)[1:3]) * 60 + int(m.group(2)[4:]) > 14 * 60:
        return RECEIVED
    return m.group(0).encode("ascii")


# Where our reading of a 3164 row is not `expected`: id -> (fields, why).
OURS_3164: dict[str, tuple[dict[str, Any], str]] = {
    # rsyslog's default: the word after HOSTNAME is the TAG even without ":" (alt_expected).
    "3164-004": ({"appname": "Some", "msg": "message here"}, "alt_expected: rsyslog TAG"),
    "3164-006": ({"appname": "Use", "msg": "the BFG!"}, "alt_expected: rsyslog TAG"),
    "3164-068": ({"appname": "tag", "msg": "msgnum:3"}, "alt_expected: rsyslog default"),
    # No TIMESTAMP: no HOSTNAME and only "name:" / "name[pid]:" is a TAG (alt_expected
    # "headerless"), so HAProxy's short/priority/raw lines keep their leading "IP:port".
    "3164-061": ({"appname": None, "msg": "This is a message!"}, "alt_expected: headerless"),
    # Cisco IOS "seq: host: time:" needs vendor handling we do not have; nothing is lost.
    "3164-015": (
        {
            "appname": "269614",
            "timestamp": None,
            "msg": "myhostname: Apr 11 10:02:08: %LINEPROTO-5-UPDOWN: Line protocol on "
            "Interface GigabitEthernet7/0/34, changed state to up",
        },
        "no Cisco IOS sequence numbers",
    ),
}


def _check_valid_row(impl: Factory, row: dict[str, Any], exp: dict[str, Any]) -> None:
    enc = row.get("input_encoding") or "utf-8"
    stream = octet(_wire(row))
    app = exp["appname"]
    if app is None:
        # No program: the filter cannot name it, so it is never forwarded.
        out = feed1(impl, stream, ProgramFilter(["haproxy", "hapee", "su"]), OCTET)
        assert (out.frames, out.accepted, out.filtered, out.fragments) == (1, 0, 1, [])
        return
    # keep_tag=() so the event is the bare MSG; tags are tested below.
    out = feed1(impl, stream, ProgramFilter([app], keep_tag=()), OCTET)
    assert (out.frames, out.accepted, out.filtered, out.errors) == (1, 1, 0, [])
    assert out.fragments == [orjson.dumps(_event_of(exp["msg"], enc))]
    assert out.times == [_time_of(exp["timestamp"])]
    other = feed1(impl, stream, ProgramFilter([app + "-not-this"]), OCTET)
    assert (other.accepted, other.filtered, other.fragments) == (0, 1, [])


@pytest.mark.parametrize("row", _rows(conformance.RFC5424_VECTORS, valid=True))
def test_rfc5424_valid_vector(impl: Factory, row: dict[str, Any]) -> None:
    _check_valid_row(impl, row, row["expected"])


@pytest.mark.parametrize("row", _rows(conformance.RFC3164_VECTORS, valid=True))
def test_rfc3164_valid_vector(impl: Factory, row: dict[str, Any]) -> None:
    exp = dict(row["expected"])
    if row["id"] in OURS_3164:
        ours, _why = OURS_3164[row["id"]]
        alt = row.get("alt_expected") or {}
        # Where a row names our reading as its alternative, hold us to its text.
        assert all(alt[k] == v for k, v in ours.items() if k in alt), row["id"]
        exp.update(ours)
    _check_valid_row(impl, row, exp)


# rsyslog_observed rows we read otherwise, and why (see OURS_3164).
RSYSLOG_DIFFERS = {
    "3164-061": "headerless line is all MSG, not 'HOSTNAME TAG'",
    "3164-068": "observed with force.tagEndingByColon=on; we follow rsyslog's default",
}


@pytest.mark.parametrize("row", [r for r in _rows(conformance.RFC3164_VECTORS)
                                 if "rsyslog_observed" in r.values[0]])
def test_rfc3164_rsyslog_observed(impl: Factory, row: dict[str, Any]) -> None:
    obs = row["rsyslog_observed"]
    enc = row.get("input_encoding") or "utf-8"
    # rsyslog's %msg% keeps the SP after the tag; _event_of drops leading SPs as we do.
    msg = obs.get("msg", obs.get("msg_with_remove.msgFirstSpace"))
    ours: dict[str, Any] = {"appname": obs.get("programname") or None, "msg": msg}
    if row["id"] in RSYSLOG_DIFFERS:
        ours = OURS_3164[row["id"]][0]
    elif ours["appname"] is None:
        # rsyslog names no program here; take the one we read, to look at the text.
        wire = _wire(row)
        h = read_header(wire)
        ours["appname"] = wire[h.prog_start : h.prog_end].decode(enc) or None
    if ours["appname"] is None:
        out = feed1(impl, octet(_wire(row)), framing=OCTET)
        assert (out.accepted, out.filtered) == (0, 1)
        return
    out = feed1(impl, octet(_wire(row)), ProgramFilter([ours["appname"]], keep_tag=()), OCTET)
    assert out.accepted == 1
    if ours["msg"] is not None:
        assert out.events == [_event_of(ours["msg"], enc)]


@pytest.mark.parametrize(
    "row", _rows(conformance.RFC5424_VECTORS, valid=False)
    + _rows(conformance.RFC3164_VECTORS, valid=False)
)
def test_invalid_vector_is_forwarded_as_the_old_path_did(
    impl: Factory, row: dict[str, Any]
) -> None:
    # Deliberate: a forwarder does not drop what it cannot validate; whatever the header
    # reader did not understand is MSG.  So invalid rows must equal the old path, byte for byte.
    wire = _wire(row)
    h = read_header(wire)
    prog = wire[h.prog_start : h.prog_end]
    name = prog.decode("utf-8", "replace") if prog else "haproxy"
    for keep in ((), (name,)):
        filt = ProgramFilter([name], keep_tag=keep)
        for framing, chunks in ((OCTET, [octet(wire)]), (DATAGRAM, [wire])):
            got = run(impl(filt, MAX, framing), chunks)
            assert got == reference_stream(chunks, filt, MAX, framing)


# -- RFC 6587 framing vectors ----------------------------------------------------------------------

FRAMING = {"octet-counting": OCTET, "non-transparent": LF, "auto": AUTO}

# Rows where we deliberately differ from `expected`: id -> (frames, error?, oversized, why).
FRAMING_DIFFERS: dict[str, tuple[list[str], bool, int, str]] = {
    # Oversize: skipped as it streams past, counted, connection kept (rsyslog keeps it too).
    "frame-012": ([], False, 1, "oversize skipped and resynced, not fatal"),
    "frame-016": ([], True, 1, "oversize skipped; EOF inside the skipped frame"),
    "frame-031": ([], False, 1, "over-long LF line dropped up to its LF"),
    # Framing is decided once per connection (Vector #4852), not per frame.
    "frame-037": (["<1>1 - - - - - -"], True, 0, "framing is per connection"),
    "frame-038": (["<1>1 - - - - - -"], True, 0, "framing is per connection"),
    # NUL is data, as with rsyslog's default (AddtlFrameDelimiter off) and the old listener:
    # the stream is one unterminated line, flushed at close; event_text drops the last NUL.
    "frame-026": (["<1>1 - - - - - -\x00<2>1 - - - - - -\x00"], False, 0, "NUL is not a trailer"),
    "frame-027": (
        ["<129>Mar  1 01:00:00 172.20.245.8 tag msgnum:00000000:\x00"
         "<129>Mar  1 01:00:00 172.20.245.8 tag msgnum:00000001:\x00"],
        False, 0, "NUL is not a trailer",
    ),
}
# frame-028 (CR before LF) needs no entry: framing keeps the CR, event_text drops it.


def _programs_of(frames: list[bytes]) -> ProgramFilter:
    names = {f[h.prog_start : h.prog_end] for f in frames for h in [read_header(f)]}
    names = {n for n in names if n}
    return ProgramFilter(sorted(n.decode("utf-8", "replace") for n in names) or ["haproxy"])


@pytest.mark.parametrize("row", _rows(conformance.FRAMING_VECTORS))
def test_framing_vector(impl: Factory, row: dict[str, Any]) -> None:
    stream = row["stream"].encode(row.get("stream_encoding") or "utf-8")
    framing = DATAGRAM if row["transport"] == "udp" else FRAMING[row["framing"]]
    max_size = row.get("max_msg_len") or MAX
    chunks = [stream] if framing == DATAGRAM else split(stream, row.get("split_at") or [])
    exp = row["expected"]
    if row["id"] in FRAMING_DIFFERS:
        messages, has_error, oversized, _why = FRAMING_DIFFERS[row["id"]]
    else:
        messages, has_error, oversized = exp["messages"], exp["error"] is not None, 0
    frames = [m.encode() for m in messages]
    filt = _programs_of(frames)
    got = run(impl(filt, max_size, framing), chunks)
    want = reference(frames, filt)
    assert (got.fragments, got.times, got.too_large) == (want.fragments, want.times, [])
    assert (got.frames, got.accepted, got.filtered) == (want.frames, want.accepted, want.filtered)
    assert got.oversized == oversized
    assert got.framing_errors == int(has_error)
    if has_error and row["id"] not in FRAMING_DIFFERS:
        assert got.errors == [exp["error"]]  # our wording is the vectors'


def test_framing_vector_rows_all_exist() -> None:
    ids = {r.values[0]["id"] for r in _rows(conformance.FRAMING_VECTORS)}
    assert set(FRAMING_DIFFERS) <= ids


# -- HAProxy lines and Sekoia's samples: the payload must come out byte-identical -----------------

RAW = (
    b'10.0.1.2:33317 [06/Feb/2009:12:14:14.655] http-in static/srv1 10/0/30/69/109 200 2750'
    b' - - ---- 1/1/1/1/0 0/0 {1wt.eu} {} "GET /index.html HTTP/1.1"'
)
HA_TS = b"2009-02-06T12:14:14.655000+01:00"
# HAProxy's "log ... format" headers, and rsyslog's forward format, for (program, pid):
# (template, the time the event must carry).
WIRE_FORMATS: dict[str, tuple[bytes, bytes]] = {
    "local": (b"<134>Feb  6 12:14:14 %(prog)s[%(pid)s]: ", RECEIVED),
    "rfc3164": (b"<134>Feb  6 12:14:14 localhost %(prog)s[%(pid)s]: ", RECEIVED),
    "rfc5424": (b"<134>1 " + HA_TS + b" - %(prog)s %(pid)s - - ", HA_TS),
    "rfc5424+sd": (b"<134>1 " + HA_TS + b' lb1 %(prog)s %(pid)s - [a@1 b="]"] ', HA_TS),
    "forward": (b"<134>" + HA_TS + b" lb1 %(prog)s[%(pid)s]: ", HA_TS),
}


def _header(fmt: str, prog: bytes, pid: bytes) -> bytes:
    return WIRE_FORMATS[fmt][0] % {b"prog": prog, b"pid": pid}


def _haproxy_lines() -> list[Any]:
    out: list[Any] = []
    section = "?"
    lines = conformance.path(conformance.HAPROXY_LINES).read_bytes().split(b"\n")
    for no, line in enumerate(lines, 1):
        if line.startswith(b"# ----"):
            section = line.split(b".")[0][-1:].decode()
        elif line and not line.startswith(b"#"):
            out.append(pytest.param(line, id=f"{section}-L{no}"))
    return out


TAG_3164 = re.compile(rb"(?:^|\s)((hapee-lb|haproxy)(\[\d+\])?: ?)")


def _payload(line: bytes) -> tuple[bytes, bytes | None]:
    """(HAProxy's payload, the event the line must give as it is), per the file's header:
    None when the line carries no haproxy / hapee program, so the filter drops it."""
    if line.startswith((b"<134>1 ", b"<129>1 ")):  # section F, format rfc5424
        payload = RAW if RAW in line else line.split(b" - - ", 1)[1]
        return payload, payload
    m = TAG_3164.search(line)
    if m is None:
        return line, None  # payload only (D), raw / stderr output (E), tagless formats (F)
    payload = line[m.end() :]
    if m.group(2) == b"hapee-lb":  # keep_tag default: "name[pid]: " and MSG as on the wire
        return payload, m.group(1) + payload
    return payload, payload.lstrip(b" ")  # the intake wants no leading SP


@pytest.mark.parametrize("line", _haproxy_lines())
def test_haproxy_line_as_sent(impl: Factory, line: bytes) -> None:
    event = _payload(line)[1]
    for framing, chunks in ((OCTET, [octet(line)]), (LF, [line + b"\n"]),
                            (DATAGRAM, [line + b"\n"])):
        got = run(impl(HAPROXY, MAX, framing), chunks)
        assert got.fragments == ([] if event is None else [orjson.dumps(event.decode())])
        assert (got.frames, got.accepted) == (1, int(event is not None))
        assert got == reference_stream(chunks, HAPROXY, MAX, framing)


@pytest.mark.parametrize("fmt", sorted(WIRE_FORMATS))
@pytest.mark.parametrize("line", _haproxy_lines())
def test_haproxy_payload_in_every_wire_format(impl: Factory, line: bytes, fmt: str) -> None:
    payload, _event = _payload(line)
    ts = WIRE_FORMATS[fmt][1]
    # Byte-identical but for leading SPs, which the intake does not want (Sekoia samples).
    want = payload.lstrip(b" ").decode()
    frame = _header(fmt, b"haproxy", b"14389") + payload
    got = run(impl(HAPROXY, MAX, OCTET), [octet(frame)])
    assert (got.fragments, got.times) == ([orjson.dumps(want)], [ts])
    frame = _header(fmt, b"hapee-lb", b"14389") + payload
    got = run(impl(HAPROXY, MAX, DATAGRAM), [frame + b"\n"])
    # A kept 3164 tag is forwarded as on the wire, so SPs after it stay; the 5424 tag is
    # rebuilt in front of the stripped MSG (syslog/header.py event_text; the old path did so).
    rest = want if fmt.startswith("rfc5424") else payload.decode()
    assert (got.fragments, got.times) == ([orjson.dumps("hapee-lb[14389]: " + rest)], [ts])


def _sekoia_samples() -> list[Any]:
    return [pytest.param(x, id=f"sample{i}")
            for i, x in enumerate(conformance.rows(conformance.SEKOIA_SAMPLES))]


@pytest.mark.parametrize("sample", _sekoia_samples())
@pytest.mark.parametrize("fmt", sorted(WIRE_FORMATS))
def test_sekoia_sample_comes_out_as_the_intake_expects(
    impl: Factory, sample: str, fmt: str
) -> None:
    # The intake wants the MSG (leading SPs and the trailing LF gone, an inner LF kept),
    # except HAProxy Enterprise's JSON log, which it wants with its "name[pid]: ".
    raw = sample.encode()
    m = re.match(rb"(hapee-lb)\[(\d+)\]: ", raw)
    if m:
        frame = _header(fmt, m.group(1), m.group(2)) + raw[m.end() :]
    else:
        frame = _header(fmt, b"haproxy", b"1") + raw
    want = [orjson.dumps(sample.lstrip(" ").rstrip("\n"))]
    for framing, chunks in ((OCTET, [octet(frame)]), (DATAGRAM, [frame + b"\n"])):
        got = run(impl(HAPROXY, MAX, framing), chunks)
        assert (got.fragments, got.times) == (want, [WIRE_FORMATS[fmt][1]]), framing


# -- the program filter and keep_tag ---------------------------------------------------------------

BODY = b"10.0.1.2:33317 [06/Feb/2009:12:14:14.655] fe be/s1 0/0/1/2/3 200 5 - - ---- 1/1/0/0/0 0/0"


@pytest.mark.parametrize(
    ("programs", "tag", "kept"),
    [
        (["haproxy"], b"haproxy[1]: ", True),
        (["haproxy"], b"haproxy-ingress[1]: ", True),  # a prefix, not a name
        (["haproxy"], b"hapee-lb[1]: ", False),
        (["haproxy"], b"sshd[1]: ", False),
        (["haproxy"], b"", False),  # no program: never forwarded
        (["haproxy"], b"HAPROXY[1]: ", False),  # prefixes are case-sensitive
        (["haproxy", "hapee"], b"hapee-lb[1]: ", True),
        (["sshd"], b"sshd[1]: ", True),
    ],
)
def test_program_filter(impl: Factory, programs: list[str], tag: bytes, kept: bool) -> None:
    filt = ProgramFilter(programs, keep_tag=())
    out = feed1(impl, b"<134>Feb  6 12:14:14 lb1 " + tag + BODY + b"\n", filt)
    assert (out.frames, out.accepted, out.filtered) == (1, int(kept), int(not kept))
    assert out.events == ([BODY.decode()] if kept else [])


def test_program_filter_refuses_no_program() -> None:
    for programs in ([], [""], ["haproxy", ""]):
        with pytest.raises(ValueError):
            ProgramFilter(programs)


TS5424 = b"2026-11-26T21:58:51.123456+01:00"


@pytest.mark.parametrize(
    ("keep_tag", "frame", "event"),
    [
        # default keep_tag = ["hapee"]
        (None, b"<134>Feb  6 12:14:14 lb1 hapee-lb[12]: msg", "hapee-lb[12]: msg"),
        (None, b"<134>Feb  6 12:14:14 hapee-lb[12]: msg", "hapee-lb[12]: msg"),  # format local
        (None, b"<134>Feb  6 12:14:14 lb1 hapee-lb: msg", "hapee-lb: msg"),
        (None, b"<134>1 " + TS5424 + b" - hapee-lb 12 - - msg", "hapee-lb[12]: msg"),  # rebuilt
        (None, b"<134>1 " + TS5424 + b" lb1 hapee-lb - - [a@1 b=\"c\"] msg", "hapee-lb: msg"),
        (None, b"<134>Feb  6 12:14:14 lb1 haproxy[12]: msg", "msg"),
        (None, b"<134>1 " + TS5424 + b" - haproxy 12 - - msg", "msg"),
        # keep_tag = []: nobody keeps it
        ([], b"<134>Feb  6 12:14:14 lb1 hapee-lb[12]: msg", "msg"),
        ([], b"<134>1 " + TS5424 + b" - hapee-lb 12 - - msg", "msg"),
        # keep_tag = ["haproxy"]
        (["haproxy"], b"<134>Feb  6 12:14:14 lb1 haproxy[12]: msg", "haproxy[12]: msg"),
        (["haproxy"], b"<134>1 " + TS5424 + b" - haproxy 12 - - msg", "haproxy[12]: msg"),
        (["haproxy"], b"<134>Feb  6 12:14:14 lb1 hapee-lb[12]: msg", "msg"),
    ],
)
def test_keep_tag(impl: Factory, keep_tag: list[str] | None, frame: bytes, event: str) -> None:
    filt = (ProgramFilter(["haproxy", "hapee"]) if keep_tag is None
            else ProgramFilter(["haproxy", "hapee"], keep_tag=keep_tag))
    for framing, chunks in ((OCTET, [octet(frame)]), (LF, [frame + b"\n"]), (DATAGRAM, [frame])):
        out = run(impl(filt, MAX, framing), chunks)
        assert out.fragments == [orjson.dumps(event)]
        assert out == reference_stream(chunks, filt, MAX, framing)


# -- timestamps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "ts"),
    [
        (b"<134>1 " + TS5424 + b" - haproxy 1 - - m", TS5424),
        (b"<134>1 2026-11-26T21:58:51Z - haproxy 1 - - m", b"2026-11-26T21:58:51Z"),
        (b"<134>1 2026-11-26T21:58:51.1-05:00 - haproxy 1 - - m", b"2026-11-26T21:58:51.1-05:00"),
        (b"<134>" + TS5424 + b" lb1 haproxy[1]: m", TS5424),  # rsyslog forward format
        (b"<6>" + TS5424 + b" haproxy[1]: m", TS5424),  # HAProxy "timed"
        (TS5424 + b" haproxy[1]: m", TS5424),  # HAProxy "iso"
        # no zone, no year, no time, too fine: the reception time
        (b"<134>1 2026-11-26T21:58:51 - haproxy 1 - - m", RECEIVED),
        (b"<134>1 2026-11-26T21:58:51.1234567Z - haproxy 1 - - m", RECEIVED),
        (b"<134>1 2026-11-26T21:58:51+0100 - haproxy 1 - - m", RECEIVED),
        (b"<134>1 - - haproxy 1 - - m", RECEIVED),
        (b"<134>Feb  6 12:14:14 lb1 haproxy[1]: m", RECEIVED),
        (b"haproxy[1]: m", RECEIVED),
    ],
)
def test_timestamp(impl: Factory, frame: bytes, ts: bytes) -> None:
    out = feed1(impl, frame, framing=DATAGRAM)
    assert out.events == ["m"]
    assert out.times == [ts]


# Header times that are real: forwarded as they are.
REAL_TIMES = [
    b"2024-02-29T12:00:00Z",  # leap day (divisible by 4)
    b"2000-02-29T12:00:00Z",  # leap day (divisible by 400)
    b"1970-01-01T00:00:00Z",  # the first year allowed
    b"9999-12-31T23:59:59.999999Z",  # the last instant with four digits
    b"2026-12-31T23:59:60Z",  # a leap second
    b"2026-01-31T00:00:00+14:00",  # the widest offsets in use (Kiribati, Baker Island)
    b"2026-04-30T00:00:00-12:00",
    b"2026-06-30T00:00:00.5-14:00",
    b"2026-11-26T21:58:51-00:00",
]
# Header times of the RFC 3339 shape that are no real time: the reception time, counted.
IMPOSSIBLE_TIMES = [
    b"9999-99-99T99:99:99Z",
    b"2026-11-26T21:58:51+99:99",
    b"2023-02-29T12:00:00Z",  # not a leap year
    b"1900-02-29T12:00:00Z",  # divisible by 100, not by 400 (and before 1970)
    b"2026-00-10T12:00:00Z",  # month 0
    b"2026-13-10T12:00:00Z",  # month 13
    b"2026-04-31T12:00:00Z",  # April has 30 days
    b"2026-01-00T12:00:00Z",  # day 0
    b"2026-01-32T12:00:00Z",
    b"2026-01-10T24:00:00Z",
    b"2026-01-10T23:60:00Z",
    b"2026-01-10T23:59:61Z",
    b"2026-01-10T23:59:59+14:01",  # beyond the widest offset
    b"2026-01-10T23:59:59-15:00",
    b"2026-01-10T23:59:59+01:60",
    b"1969-12-31T23:59:59Z",  # before the epoch
    b"0000-01-01T00:00:00Z",
    b"2026-11-26T21:58:Z12",  # the zone inside the token, digits after it
    b"2026-11-26T21:58:5Z1",
    b"2026-11-26T21:58:51.1Z23",
    b"2026-11-26T21:58:+1234:56",
]


@pytest.mark.parametrize("ts", REAL_TIMES + IMPOSSIBLE_TIMES)
@pytest.mark.parametrize("wire", ["5424", "3164", "iso"])
def test_header_time_is_forwarded_only_when_real(impl: Factory, ts: bytes, wire: str) -> None:
    frame = {"5424": b"<134>1 " + ts + b" lb1 haproxy 1 - - m",
             "3164": b"<134>" + ts + b" lb1 haproxy[1]: m",
             "iso": ts + b" haproxy[1]: m"}[wire]
    assert read_header(frame).ts_zoned  # the shape passes: only the date and time are wrong
    real = ts in REAL_TIMES
    for framing, chunks in ((OCTET, [octet(frame)]), (LF, [frame + b"\n"]), (DATAGRAM, [frame])):
        out = run(impl(HAPROXY, MAX, framing), chunks)
        assert out.events == ["m"]
        assert out.times == [ts if real else RECEIVED]
        assert out.bad_times == (0 if real else 1)
        assert out == reference_stream(chunks, HAPROXY, MAX, framing)


def test_impossible_times_are_counted_per_event_and_filtered_ones_not(impl: Factory) -> None:
    bad, good = IMPOSSIBLE_TIMES[0], REAL_TIMES[0]
    stream = b"".join(b"<134>1 %s - %s 1 - - m%d\n" % (t, prog, i) for i, (t, prog) in enumerate(
        [(bad, b"haproxy"), (good, b"haproxy"), (bad, b"sshd"), (bad, b"hapee")]))
    out = run(impl(HAPROXY, MAX, LF), [stream])
    assert out.events == ["m0", "m1", "hapee[1]: m3"]  # hapee keeps its tag
    assert out.times == [RECEIVED, good, RECEIVED]
    assert (out.bad_times, out.filtered) == (2, 1)


def test_reception_time_is_the_one_of_the_chunk_that_completed_the_frame(impl: Factory) -> None:
    r = impl(HAPROXY, MAX, LF)
    a = r.feed(b"<134>Feb  6 12:14:14 haproxy[1]: one\n<134>Feb  6 12:14:14 haproxy[1]: tw", b"T1")
    b = r.feed(b"o\n", b"T2")
    assert (a.times, b.times) == ([b"T1"], [b"T2"])


# -- the 250 KiB cap -------------------------------------------------------------------------------

HEAD = b"<134>Feb  6 12:14:14 lb1 haproxy[1]: "
HAPEE_HEAD = b"<134>Feb  6 12:14:14 lb1 hapee-lb[1]: "
TAG = len(b"hapee-lb[1]: ")


@pytest.mark.parametrize(
    ("frame", "too_large"),
    [
        (HEAD + b"a" * MAX_EVENT_BYTES, False),
        (HEAD + b"a" * (MAX_EVENT_BYTES + 1), True),
        (HEAD + "é".encode() * (MAX_EVENT_BYTES // 2) + b"a", True),  # counted in UTF-8 bytes
        # invalid UTF-8 triples (U+FFFD): small on the wire, too large as text
        (HEAD + b"\xff" * (MAX_EVENT_BYTES // 3), False),
        (HEAD + b"\xff" * (MAX_EVENT_BYTES // 3 + 1), True),
        # the kept tag counts: the intake receives "hapee-lb[1]: " + MSG
        (HAPEE_HEAD + b"a" * (MAX_EVENT_BYTES - TAG), False),
        (HAPEE_HEAD + b"a" * (MAX_EVENT_BYTES - TAG + 1), True),
        (HAPEE_HEAD + b"\xff" * ((MAX_EVENT_BYTES - TAG) // 3 + 1), True),
        # JSON escapes do not count: the limit is on the event, not on its literal
        (HEAD + b'"' * MAX_EVENT_BYTES, False),
        (HEAD + b"\x01" * MAX_EVENT_BYTES, False),
    ],
)
def test_too_large_goes_aside(impl: Factory, frame: bytes, too_large: bool) -> None:
    small = HEAD + b"next"
    out = run(impl(HAPROXY, 4 * MAX, OCTET), [octet(frame, small)])
    assert (out.frames, out.accepted, out.filtered) == (2, 2, 0)
    assert out == reference([frame, small], HAPROXY)
    assert len(out.too_large) == int(too_large)
    assert out.fragments[-1] == b'"next"'
    assert len(out.fragments) == 2 - int(too_large)
    for frag, ts in out.too_large:
        assert len(orjson.loads(frag).encode()) > MAX_EVENT_BYTES
        assert ts == RECEIVED


# -- counts and framing errors ---------------------------------------------------------------------


def test_counts_of_an_lf_stream(impl: Factory) -> None:
    lines = [
        HEAD + b"kept 1",
        b"<134>Feb  6 12:14:14 lb1 sshd[1]: filtered",
        HEAD + b"x" * 200,  # over max_message_size
        b"no header at all",
        HEAD + b"kept 2",
    ]
    out = run(impl(HAPROXY, 100, LF), [b"\n".join(lines) + b"\n\n\n"])
    assert out.events == ["kept 1", "kept 2"]
    assert (out.frames, out.accepted, out.filtered, out.oversized) == (4, 2, 2, 1)
    assert (out.framing_errors, out.errors) == (0, [])


def test_framing_error_is_reported_once_then_nothing(impl: Factory) -> None:
    r = impl(HAPROXY, MAX, OCTET)
    first = r.feed(octet(HEAD + b"one", HEAD + b"two") + b"x" + octet(HEAD + b"three"), RECEIVED)
    assert [orjson.loads(f) for f in split_data(first)] == ["one", "two"]
    assert (first.frames, first.framing_errors, first.error) == (
        2, 1, "expected MSG-LEN, found 'x'"
    )
    for later in (r.feed(octet(HEAD + b"four"), RECEIVED), r.close(RECEIVED), r.close(RECEIVED)):
        assert later == ChunkResult()


def split_data(r: ChunkResult) -> list[bytes]:
    return [r.data[a:b] for a, b in zip([0, *r.ends], r.ends, strict=False)]


def test_oversized_octet_frames_are_counted_and_skipped(impl: Factory) -> None:
    stream = octet(HEAD + b"a", HEAD + b"b" * 100, HEAD + b"c", HEAD + b"d" * 100)
    out = run(impl(HAPROXY, 60, OCTET), split(stream, range(0, len(stream), 7)))
    assert out.events == ["a", "c"]
    assert (out.frames, out.oversized, out.framing_errors) == (2, 2, 0)


# -- close() ---------------------------------------------------------------------------------------


def test_close_flushes_an_unterminated_lf_line(impl: Factory) -> None:
    r = impl(HAPROXY, MAX, AUTO)
    first = r.feed(HEAD + b"done\n" + HEAD + b"last", RECEIVED)
    assert [orjson.loads(f) for f in split_data(first)] == ["done"]
    assert r.buffered == len(HEAD + b"last")
    last = r.close(b"T-close")
    assert (last.data, last.times, last.frames, last.error) == (b'"last"', [b"T-close"], 1, None)
    assert r.close(RECEIVED) == ChunkResult()


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"50 " + HEAD + b"cut", f"EOF inside frame ({len(HEAD) + 3} of 50 octets)"),
        (b"5", "EOF inside MSG-LEN"),
        (b"900 " + HEAD, f"EOF inside oversized frame ({900 - len(HEAD)} octets missing)"),
    ],
)
def test_close_inside_an_octet_frame_is_an_error(impl: Factory, stream: bytes, error: str) -> None:
    r = impl(HAPROXY, 200, AUTO)
    assert r.feed(octet(HEAD + b"ok") + stream, RECEIVED).data == b'"ok"'
    end = r.close(RECEIVED)
    assert (end.frames, end.data, end.framing_errors, end.error) == (0, b"", 1, error)
    assert r.buffered == 0
    assert r.close(RECEIVED) == ChunkResult()


# -- datagram mode (UDP) ---------------------------------------------------------------------------


def test_datagram_is_one_message_each(impl: Factory) -> None:
    r = impl(HAPROXY, MAX, DATAGRAM)
    datagrams = [
        HEAD + b"one\n",  # HAProxy's trailing LF
        HEAD + b"two",
        HEAD + b"multi\nline\n",  # no de-framing inside a datagram
        b"%d " % len(HEAD + b"x") + HEAD + b"x",  # digits are not a MSG-LEN here
        b"\n",  # empty once its LF is gone: no frame
        b"",
        b"<134>Feb  6 12:14:14 lb1 sshd[1]: filtered\n",
    ]
    out = run(r, datagrams)
    assert out.events == ["one", "two", "multi\nline"]
    assert (out.frames, out.accepted, out.filtered, out.framing_errors) == (5, 3, 2, 0)
    assert r.buffered == 0
    assert out == reference_stream(datagrams, HAPROXY, MAX, DATAGRAM)


def test_datagram_drops_one_lf_only(impl: Factory) -> None:
    # The second LF is the message's own (event_text drops it): one frame, one event.
    out = feed1(impl, HEAD + b"x\n\n", framing=DATAGRAM)
    assert (out.frames, out.events) == (1, ["x"])
    out = feed1(impl, b"\n\n", framing=DATAGRAM)
    assert (out.frames, out.filtered) == (1, 1)


def test_datagram_over_max_message_size_is_oversized(impl: Factory) -> None:
    d = HEAD + b"12345\n"
    assert feed1(impl, d, framing=DATAGRAM, max_message_size=len(d)).events == ["12345"]
    out = feed1(impl, d, framing=DATAGRAM, max_message_size=len(d) - 1)
    assert (out.frames, out.oversized, out.fragments) == (0, 1, [])


# -- properties ------------------------------------------------------------------------------------

ODD = [b"\xff", b"\x00", b"\r", b'"', b"\\", b"\x1f", b"\xef\xbb\xbf", "\u2028".encode(),
       "é".encode(), "😀".encode(), "😀".encode()[:2], b"\xed\xa0\x80", b" ", b"a", b"[", b"]",
       b":", b"<134>", b"12 ", b"\t"]
PROGRAMS = [b"haproxy", b"hapee-lb", b"haproxyx", b"sshd", b"kernel"]


@st.composite
def frames(draw: st.DrawFn, lf: bool) -> bytes:
    shape = draw(st.sampled_from(["3164", "local", "5424", "forward", "bare"]))
    prog = draw(st.sampled_from(PROGRAMS))
    body = b"".join(draw(st.lists(st.sampled_from(ODD + ([] if lf else [b"\n"])), max_size=12)))
    pid = draw(st.integers(0, 99999))
    if shape == "3164":
        head = b"<134>Feb  6 12:14:14 lb1 %s[%d]: " % (prog, pid)
    elif shape == "local":
        head = b"<134>Feb 16 12:14:14 %s: " % prog
    elif shape == "5424":
        ts = draw(st.sampled_from([TS5424, b"-", b"2026-11-26T21:58:51"]))
        head = b"<134>1 %s - %s %d - - " % (ts, prog, pid)
    elif shape == "forward":
        head = b"<134>" + TS5424 + b" lb1 %s[%d]: " % (prog, pid)
    else:
        head = b""
    return head + body


@given(data=st.data(), octet_framed=st.booleans())
@settings(max_examples=300, deadline=None)
def test_any_split_gives_the_same_events(impl: Factory, data: st.DataObject,
                                         octet_framed: bool) -> None:
    msgs = data.draw(st.lists(frames(lf=not octet_framed), min_size=1, max_size=8))
    if octet_framed:
        stream, framing = octet(*[m or b"x" for m in msgs]), OCTET
    else:
        stream, framing = b"".join(m + b"\n" for m in msgs), data.draw(st.sampled_from([LF, AUTO]))
    max_size = data.draw(st.sampled_from([40, 80, MAX]))
    whole = run(impl(HAPROXY, max_size, framing), [stream])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    parts = run(impl(HAPROXY, max_size, framing), split(stream, cuts))
    assert parts == whole
    byte_by_byte = run(impl(HAPROXY, max_size, framing), split(stream, range(len(stream))))
    assert byte_by_byte == whole
    assert whole == reference_stream([stream], HAPROXY, max_size, framing)


PIECES = [*ODD, b"\n", b"1", b"0", b"9 ", b"100 ", b"haproxy[1]: ", b"<134>1 ", TS5424,
          b"Feb  6 12:14:14 ", b"hapee-lb: "]


@given(
    data=st.data(),
    stream=st.one_of(st.binary(max_size=400),
                     st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)),
    framing=st.sampled_from([AUTO, LF, OCTET, DATAGRAM]),
    max_size=st.sampled_from([1, 8, 30, 300]),
)
@settings(max_examples=400, deadline=None)
def test_random_bytes_never_raise_and_stay_bounded(
    impl: Factory, data: st.DataObject, stream: bytes, framing: str, max_size: int
) -> None:
    chunks = split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    r = impl(HAPROXY, max_size, framing)
    out = Outcome()
    for chunk in chunks:
        out.add(r.feed(chunk, RECEIVED))
        # a partial frame plus at most an unfinished MSG-LEN: never more than the limit allows
        assert r.buffered <= max_size + 8
    out.add(r.close(RECEIVED))
    assert r.buffered <= max_size + 8
    assert len(out.errors) <= 1
    assert out == reference_stream(chunks, HAPROXY, max_size, framing)


@given(st.lists(st.binary(max_size=60) | st.lists(st.sampled_from(ODD), max_size=20).map(b"".join),
                min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_every_fragment_is_the_json_literal_of_its_event(
    impl: Factory, bodies: list[bytes]
) -> None:
    datagrams = [b"<134>1 - - hapee-lb 7 - - " + b if i % 2 else HEAD + b
                 for i, b in enumerate(bodies)]
    out = run(impl(HAPROXY, MAX, DATAGRAM), datagrams)
    assert len(out.fragments) == len(bodies)
    for frag in out.fragments:
        text = orjson.loads(frag)
        assert isinstance(text, str)
        assert json.loads(frag) == text  # a second, independent JSON parser agrees
        assert orjson.dumps(text) == frag
        text.encode("utf-8")  # no lone surrogate: valid UTF-8 on the wire
        assert frag.startswith(b'"') and frag.endswith(b'"')
