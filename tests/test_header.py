"""Header reader and event text: RFC 5424/3164 vectors, HAProxy's wire formats, Sekoia samples.
Vectors are read from tests/conformance (the project's copy, its README names each source)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools import conformance
from haproxy_forwarder.syslog.header import Header, event_text, read_header


def _rows(name: str, valid: bool) -> list[Any]:
    return [pytest.param(r, id=r["id"]) for r in conformance.rows(name) if r["valid"] is valid]


_wire = conformance.wire


def _span(frame: bytes, start: int, end: int) -> bytes | None:
    return frame[start:end] if end > start else None


def check_invariants(frame: bytes, h: Header) -> None:
    n = len(frame)
    for start, end in (
        (h.prog_start, h.prog_end),
        (h.ts_start, h.ts_end),
        (h.host_start, h.host_end),
        (h.proc_start, h.proc_end),
        (h.sd_start, h.sd_end),
    ):
        assert 0 <= start <= end <= n, h
    assert 0 <= h.tag_start <= h.msg_start <= n, h
    assert h.prog_end <= h.msg_start, h
    assert -1 <= h.pri <= 191
    assert h.version >= 0
    if h.ts_zoned:
        frame[h.ts_start : h.ts_end].decode("ascii")  # what the pipeline relies on


def fields(frame: bytes, h: Header) -> dict[str, Any]:
    """The reader's view in the vectors' terms (msg minus trailing CR/LF, as event_text)."""
    return {
        "pri": 13 if h.pri < 0 else h.pri,
        "timestamp": _span(frame, h.ts_start, h.ts_end),
        "hostname": _span(frame, h.host_start, h.host_end),
        "appname": _span(frame, h.prog_start, h.prog_end),
        "procid": _span(frame, h.proc_start, h.proc_end),
        "msg": frame[h.msg_start :].rstrip(b"\r\n") or None,
    }


def expected_fields(row: dict[str, Any], exp: dict[str, Any]) -> dict[str, Any]:
    enc = row.get("input_encoding") or "utf-8"
    return {
        k: (exp[k].encode(enc) if isinstance(exp[k], str) else exp[k])
        for k in ("pri", "timestamp", "hostname", "appname", "procid", "msg")
    }


# -- RFC 5424 ------------------------------------------------------------------------


@pytest.mark.parametrize("row", _rows(conformance.RFC5424_VECTORS, True))
def test_rfc5424_valid(row: dict[str, Any]) -> None:
    frame = _wire(row)
    h = read_header(frame)
    check_invariants(frame, h)
    exp = row["expected"]
    assert h.version == exp["version"]
    assert fields(frame, h) == expected_fields(row, exp)
    sd = exp["structured_data_raw"]
    assert _span(frame, h.sd_start, h.sd_end) == (sd.encode() if sd else None)
    assert h.tag_start == h.prog_start
    # Every vector timestamp with a zone is zoned; NILVALUE is not.
    assert h.ts_zoned == bool(exp["timestamp"])


@pytest.mark.parametrize("row", _rows(conformance.RFC5424_VECTORS, False))
def test_rfc5424_invalid_still_gives_a_header(row: dict[str, Any]) -> None:
    # Deliberate: a forwarder must not drop what it cannot validate.  Invalid rows only
    # have to produce some consistent Header; whatever is not understood is MSG.
    frame = _wire(row)
    h = read_header(frame)
    check_invariants(frame, h)
    event_text(frame, h, keep_tag=False)
    event_text(frame, h, keep_tag=True)


def test_rfc5424_invalid_sd_is_kept_as_msg() -> None:
    frame = b'<161>1 2003-03-01T01:00:00.000Z h tcpflood - tag [x@1 MSGNUM="unterminated'
    h = read_header(frame)
    assert frame[h.msg_start :] == b'[x@1 MSGNUM="unterminated'
    assert h.sd_start == h.sd_end


# -- RFC 3164 ------------------------------------------------------------------------

# Rows where the reader gives something other than `expected`, and why.
OURS_3164: dict[str, tuple[dict[str, Any], str]] = {
    # rsyslog's default (the brief: tolerant like rsyslog): the word after HOSTNAME is
    # the TAG even without ":".  These rows carry that reading as alt_expected.
    "3164-004": ({"appname": "Some", "msg": "message here"}, "rsyslog TAG without ':'"),
    "3164-006": ({"appname": "Use", "msg": "the BFG!"}, "rsyslog TAG without ':'"),
    "3164-068": ({"appname": "tag", "msg": "msgnum:3"}, "rsyslog TAG without ':'"),
    # No TIMESTAMP: no HOSTNAME either, and only "name:"/"name[pid]:" is a TAG
    # (RFC 3164 4.3.2, alt_expected "headerless").  Taking "This" as host and "is" as
    # tag, as rsyslog does, would eat the "IP:port" of HAProxy short/priority/raw lines.
    "3164-061": (
        {"pri": 13, "hostname": None, "appname": None, "msg": "This is a message!"},
        "headerless line is all MSG",
    ),
    # Expected is rsyslog with force.tagEndingByColon=on; by default rsyslog sees an
    # empty TAG and drops one SP, as we do.  event_text strips leading SPs anyway.
    "3164-067": ({"msg": "msgnum:1"}, "empty TAG then one SP removed"),
    # Cisco IOS "seq: host: timestamp:" needs vendor handling we do not have: the
    # whole line after "269614:" becomes MSG, nothing is lost.
    "3164-015": (
        {
            "timestamp": None,
            "hostname": None,
            "appname": "269614",
            "msg": "myhostname: Apr 11 10:02:08: %LINEPROTO-5-UPDOWN: Line protocol on "
            "Interface GigabitEthernet7/0/34, changed state to up",
        },
        "no Cisco IOS sequence-number support",
    ),
}


@pytest.mark.parametrize("row", _rows(conformance.RFC3164_VECTORS, True))
def test_rfc3164_valid(row: dict[str, Any]) -> None:
    frame = _wire(row)
    h = read_header(frame)
    check_invariants(frame, h)
    exp = dict(row["expected"])
    if row["id"] in OURS_3164:
        exp.update(OURS_3164[row["id"]][0])
    assert h.version == 0
    assert fields(frame, h) == expected_fields(row, exp)
    if exp["appname"] is not None:
        assert h.tag_start == h.prog_start


@pytest.mark.parametrize("row", _rows(conformance.RFC3164_VECTORS, False))
def test_rfc3164_invalid_still_gives_a_header(row: dict[str, Any]) -> None:
    frame = _wire(row)
    h = read_header(frame)
    check_invariants(frame, h)
    event_text(frame, h, keep_tag=False)


ISO6 = b"2026-11-26T21:58:51.123456+01:00"


@pytest.mark.parametrize(
    ("frame", "token", "zoned"),
    [
        (b"<13>" + ISO6 + b" host tag: m", ISO6, True),
        (b"<13>2026-11-26T21:58:51Z host tag: m", b"2026-11-26T21:58:51Z", True),
        (b"<13>2026-11-26T21:58:51 host tag: m", b"2026-11-26T21:58:51", False),
        (b"<13>Nov 26 21:58:51 host tag: m", b"Nov 26 21:58:51", False),
        (b"<13>Nov  6 21:58:51 host tag: m", b"Nov  6 21:58:51", False),
        (b"<134>1 " + ISO6 + b" - haproxy 1 - - m", ISO6, True),
        (b"<134>1 - - haproxy 1 - - m", None, False),
        # ts_zoned promises an ASCII RFC 3339 token with 1-6 fraction digits and a zone
        (b"<13>1 2026-11-26T21:58:51.Z h a - - -", b"2026-11-26T21:58:51.Z", False),
        (b"<13>1 2026-11-26T21:58:51.1234567Z h a - - -", b"2026-11-26T21:58:51.1234567Z", False),
        (b"<13>1 2026-11-26T21:58:51z h a - - -", b"2026-11-26T21:58:51z", False),
        (b"<13>1 2026-11-26T21:58:51+0100 h a - - -", b"2026-11-26T21:58:51+0100", False),
        (b"<13>1 2026-11-26T21:58:5\xff+01:00 h", b"2026-11-26T21:58:5\xff+01:00", False),
        (b"<13>1 2026-1x-26T21:58:51.1+01:00 h", b"2026-1x-26T21:58:51.1+01:00", False),
        (b"<13>1 2026-11-26T21:58:51.1-01:00 h", b"2026-11-26T21:58:51.1-01:00", True),
    ],
)
def test_timestamp_token_and_zone(frame: bytes, token: bytes | None, zoned: bool) -> None:
    h = read_header(frame)
    assert _span(frame, h.ts_start, h.ts_end) == token
    assert h.ts_zoned is zoned
    if zoned:
        assert token is not None
        datetime.fromisoformat(token.decode("ascii"))


# -- HAProxy on the wire (haproxy_lines.txt) -------------------------------------------


def _haproxy_lines() -> list[Any]:
    path = conformance.path(conformance.HAPROXY_LINES)
    if not path.is_file():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"{path} missing"))]
    out: list[Any] = []
    section = "?"
    label = ""
    for no, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if line.startswith(b"# ----"):
            section = line.split(b".")[0][-1:].decode()
        elif line.startswith(b"#"):
            label = line.decode()
        elif line:
            out.append(pytest.param(line, f"{section} {label}", id=f"{section}-L{no}"))
    return out


RAW = (
    b'10.0.1.2:33317 [06/Feb/2009:12:14:14.655] http-in static/srv1 10/0/30/69/109 200 2750'
    b' - - ---- 1/1/1/1/0 0/0 {1wt.eu} {} "GET /index.html HTTP/1.1"'
)


def _expected_payload(line: bytes) -> bytes:
    """What the intake must receive, from how the line was written (see the file header)."""
    if RAW in line:  # section F: one event in every "log ... format"
        return RAW
    if line.startswith(b"<129>1 "):
        return line.split(b" - - ", 1)[1]
    for sep in (b"]: ", b"]:", b" haproxy: "):
        if sep in line and (b"haproxy[" in line or b"hapee-lb[" in line or sep == b" haproxy: "):
            return line.split(sep, 1)[1]
    return line.lstrip(b" ")  # payload only (D), raw/stderr output (E)


@pytest.mark.parametrize(("line", "where"), _haproxy_lines())
def test_haproxy_line_event_text(line: bytes, where: str) -> None:
    h = read_header(line)
    check_invariants(line, h)
    assert event_text(line, h, keep_tag=False).encode() == _expected_payload(line), where
    if line.startswith(b"hapee-lb["):
        assert event_text(line, h, keep_tag=True).encode() == line


HA_TS = b"2009-02-06T12:14:14.655000+01:00"
BSD = b"<134>Feb  6 12:14:14 "
HA = b"haproxy"


@pytest.mark.parametrize(
    ("fmt", "wire", "prog", "host", "zoned"),
    [
        ("local", BSD + b"haproxy[14389]: ", HA, None, False),
        ("rfc3164", BSD + b"localhost haproxy[14389]: ", HA, b"localhost", False),
        ("rfc5424", b"<134>1 " + HA_TS + b" - haproxy 14389 - - ", HA, None, True),
        ("rfc5424+sd", b"<134>1 " + HA_TS + b' lb1 haproxy 14389 - [a@1 b="]"] ', HA, b"lb1", True),
        ("priority", b"<134>", None, None, False),
        ("short", b"<6>", None, None, False),
        ("timed", b"<6>" + HA_TS + b" ", None, None, True),
        ("iso", HA_TS + b" ", None, None, True),
        ("raw", b"", None, None, False),
        ("rsyslog-forward", b"<134>" + ISO6 + b" lb1 haproxy[1]: ", HA, b"lb1", True),
        ("rsyslog-traditional", b"<134>Nov 26 21:58:51 lb1 haproxy[1]: ", HA, b"lb1", False),
        ("udp-datagram", BSD + b"haproxy[14389]: ", HA, None, False),
    ],
)
def test_haproxy_formats(
    fmt: str, wire: bytes, prog: bytes | None, host: bytes | None, zoned: bool
) -> None:
    frame = wire + RAW + (b"\n" if fmt == "udp-datagram" else b"")
    h = read_header(frame)
    check_invariants(frame, h)
    assert event_text(frame, h, keep_tag=False).encode() == RAW
    assert _span(frame, h.prog_start, h.prog_end) == prog
    assert _span(frame, h.host_start, h.host_end) == host
    assert h.ts_zoned is zoned


def _sekoia_samples() -> list[Any]:
    path = conformance.path(conformance.SEKOIA_SAMPLES)
    if not path.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} missing"))]
    return [pytest.param(s, id=f"sample{i}")
            for i, s in enumerate(conformance.rows(conformance.SEKOIA_SAMPLES))]


@pytest.mark.parametrize("sample", _sekoia_samples())
@pytest.mark.parametrize(
    "header",
    [
        b"<134>Feb  6 12:14:14 localhost ",
        b"<134>Feb  6 12:14:14 ",
        b"<134>2026-11-26T21:58:51.123456+01:00 lb1 ",
    ],
    ids=["rfc3164", "local", "forward"],
)
def test_sekoia_samples_come_out_as_the_intake_expects(sample: str, header: bytes) -> None:
    # The intake wants the MSG only (leading SPs and trailing LF gone, inner LF kept),
    # except the HAProxy Enterprise JSON log, which it wants with its "name[pid]: ".
    hapee = sample.startswith("hapee-lb[")
    payload = sample.encode()
    frame = header + (payload if hapee else b"haproxy[1]: " + payload)
    h = read_header(frame)
    assert event_text(frame, h, keep_tag=hapee) == sample.lstrip(" ").rstrip("\n")


# -- event_text ----------------------------------------------------------------------


def _text(frame: bytes, keep_tag: bool = False) -> str:
    return event_text(frame, read_header(frame), keep_tag)


def test_event_text_strips_edges_only() -> None:
    assert _text(b"<13>Nov 26 21:58:51 h t:   a\nb \r\n\x00") == "a\nb "
    assert _text(b"<13>1 - - - - - -  \xef\xbb\xbf  x\r") == "x"
    assert _text(b"<13>1 - - - - - - \xef\xbb\xbfBOM kept once\xef\xbb\xbf") == (
        "BOM kept once\ufeff"
    )
    assert _text(b"<13>1 - - - - - - \tx") == "\tx"


def test_event_text_replaces_invalid_utf8() -> None:
    assert _text(b"<13>Nov 26 21:58:51 h t: caf\xe9 \xff ok") == "caf\ufffd \ufffd ok"
    assert _text(b"<13>1 - - - - - - \xef\xbb\xbf\xc3(") == "\ufffd("


def test_event_text_empty_msg() -> None:
    assert _text(b"<13>1 - - - - - -") == ""
    assert _text(b"<13>Nov 26 21:58:51 h t:") == ""
    assert _text(b"") == ""


def test_event_text_keeps_hapee_tag() -> None:
    body = b'[ACCESS] 2022 {"ctn":"html"}'
    rfc3164 = b"<134>Nov 26 21:58:51 lb1 hapee-lb[16320]: " + body
    assert _text(rfc3164, keep_tag=True) == "hapee-lb[16320]: " + body.decode()
    assert _text(rfc3164) == body.decode()
    local = b"<134>Nov 26 21:58:51 hapee-lb[16320]: " + body
    assert _text(local, keep_tag=True) == "hapee-lb[16320]: " + body.decode()
    # RFC 5424 has no such tag: it is rebuilt from APP-NAME and PROCID.
    rfc5424 = b"<134>1 2026-11-26T21:58:51.123456+01:00 - hapee-lb 16320 - - " + body
    assert _text(rfc5424, keep_tag=True) == "hapee-lb[16320]: " + body.decode()
    nopid = b"<134>1 2026-11-26T21:58:51.123456+01:00 - hapee-lb - - - " + body
    assert _text(nopid, keep_tag=True) == "hapee-lb: " + body.decode()
    untagged = b"<134>" + body
    assert _text(untagged, keep_tag=True) == body.decode()


# -- properties ----------------------------------------------------------------------


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_never_raise(frame: bytes) -> None:
    h = read_header(frame)
    check_invariants(frame, h)
    event_text(frame, h, keep_tag=False)
    event_text(frame, h, keep_tag=True)


PIECES = [
    b"<", b">", b"<134>", b"<13>", b"1 ", b"12", b"-", b" ", b"  ", b"[", b"]", b'"', b"\\",
    b":", b"=", b"Feb", b" 6 ", b"12:14:14", b".655", b"2026-11-26T21:58:51", b"Z",
    b"+01:00", b"host", b"haproxy", b"[123]", b"2009", b"\n", b"\xef\xbb\xbf", b"\xff",
]


@given(st.lists(st.sampled_from(PIECES), max_size=30))
@settings(max_examples=1000)
def test_syslog_looking_garbage_never_raises(pieces: list[bytes]) -> None:
    frame = b"".join(pieces)
    h = read_header(frame)
    check_invariants(frame, h)
    event_text(frame, h, keep_tag=True)
