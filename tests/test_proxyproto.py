"""The sans-IO PROXY protocol parser (haproxy_forwarder/proxyproto.py), v1 and v2.

Expectations come from HAProxy's doc/proxy-protocol.txt: the v1 line grammar and its
107-byte maximum, the v2 signature, version/command and family/transport bytes, the address
block sizes.  The headers here are built by hand from that text, not taken from a sender.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_forwarder.proxyproto import (
    MAX_V1_LINE,
    MAX_V2_HEADER,
    REASONS,
    V2_SIGNATURE,
    Family,
    Parsed,
    Pending,
    ProxyHeader,
    ProxyParser,
    Refused,
    Result,
)

SYSLOG = b"<134>1 2024-01-01T00:00:00Z lb haproxy 1 - - GET /\n"


def v2(cmd: int, fam_proto: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header: version 2, `cmd`, `fam_proto`, and `body` (addresses then TLVs)."""
    n = len(body) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | cmd, fam_proto]) + struct.pack("!H", n) + body


def inet_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def feed_all(chunks: list[bytes]) -> tuple[Result, bytes]:
    """Feed `chunks` in order, then close: the final result and every rest concatenated."""
    p = ProxyParser()
    final: Result = Pending()
    rest = b""
    for chunk in chunks:
        got = p.feed(chunk)
        if isinstance(got, Parsed):
            rest += got.rest
        if not isinstance(got, Pending):
            final = got
    closed = p.close()
    if isinstance(final, Pending):
        final = closed
    assert p.buffered == 0
    if isinstance(final, Parsed):
        return Parsed(final.header, b""), rest
    return final, rest


def one(data: bytes) -> Result:
    return ProxyParser().feed(data)


def refused(data: bytes, *, at_close: bool = False) -> Refused:
    p = ProxyParser()
    got = p.feed(data)
    if at_close:
        assert isinstance(got, Pending), got
        got = p.close()
    assert isinstance(got, Refused), got
    assert got.reason in REASONS and got.detail and "\n" not in got.detail
    return got


# --- v1 ----------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    got = one(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 514\r\n" + SYSLOG)
    assert got == Parsed(
        ProxyHeader(1, False, "inet", ("192.0.2.1", 56324), ("198.51.100.2", 514)), SYSLOG
    )


def test_v1_tcp6_hosts_in_canonical_form() -> None:
    got = one(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:192.0.2.1 0 65535\r\n")
    assert got == Parsed(
        ProxyHeader(1, False, "inet6", ("2001:db8::1", 0), ("::ffff:c000:201", 65535)), b""
    )


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
        b"PROXY UNKNOWN anything at all, ignored per the spec\r\n",
    ],
)
def test_v1_unknown_is_local_without_address(line: bytes) -> None:
    assert one(line + SYSLOG) == Parsed(ProxyHeader(1, True, "unspec"), SYSLOG)


def test_v1_longest_line_of_the_spec_is_accepted_and_one_more_byte_is_not() -> None:
    full = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == MAX_V1_LINE
    assert isinstance(one(line), Parsed)
    assert refused(line.replace(b"UNKNOWN ", b"UNKNOWN  ")).reason == "too_long"
    tcp6 = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert isinstance(one(tcp6), Parsed)


def test_v1_without_crlf_is_refused_at_107_bytes_not_later() -> None:
    p = ProxyParser()
    assert p.feed(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LINE - 15)) == Pending()
    assert p.buffered == MAX_V1_LINE - 1
    got = p.feed(b"x")
    assert isinstance(got, Refused) and got.reason == "too_long"
    # CR as the 107th byte: the line cannot end in time, decided without waiting for LF.
    assert refused(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LINE - 15) + b"\r").reason == "too_long"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1x 2\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 99999999999\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", "bad_v1"),
        (b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n", "bad_v1"),
        (b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n", "bad_v1"),
        (b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n", "bad_v1"),
        (b"PROXY \r\n", "bad_v1"),
        (b"PROXY UNKNOWNX\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX", "bad_v1"),
        (b"PROXY UNKNOWN \xff\r\n", "bad_v1"),
        (b"PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 192.0.2.1 2001:db8::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 2001:db8:::1 2001:db8::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 localhost 192.0.2.2 1 2\r\n", "bad_address"),
        (b"PROXYTCP4 192.0.2.1 192.0.2.2 1 2\r\n", "bad_signature"),
        (b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", "bad_signature"),
    ],
)
def test_v1_malformed_lines_are_refused(line: bytes, reason: str) -> None:
    assert refused(line).reason == reason


def test_v1_bad_byte_refuses_before_the_crlf() -> None:
    # A NUL cannot be in any v1 line: no need to wait for a CRLF that would not save it.
    assert refused(b"PROXY TCP4 1\x00").reason == "bad_v1"


# --- v2 ----------------------------------------------------------------------------------


def test_v2_proxy_inet() -> None:
    head = v2(1, 0x11, inet_block("192.0.2.1", "198.51.100.2", 56324, 6514))
    assert one(head + SYSLOG) == Parsed(
        ProxyHeader(2, False, "inet", ("192.0.2.1", 56324), ("198.51.100.2", 6514)), SYSLOG
    )


def test_v2_proxy_inet6() -> None:
    head = v2(1, 0x21, inet_block("2001:db8::1", "::1", 1, 65535))
    assert one(head + SYSLOG) == Parsed(
        ProxyHeader(2, False, "inet6", ("2001:db8::1", 1), ("::1", 65535)), SYSLOG
    )


def test_v2_proxy_unix_has_no_address() -> None:
    body = b"/run/client.sock".ljust(108, b"\0") + b"/run/lb.sock".ljust(108, b"\0")
    assert one(v2(1, 0x31, body) + SYSLOG) == Parsed(ProxyHeader(2, False, "unix"), SYSLOG)


def test_v2_proxy_unspec_is_accepted_without_address() -> None:
    assert one(v2(1, 0x00, b"") + SYSLOG) == Parsed(ProxyHeader(2, False, "unspec"), SYSLOG)


@pytest.mark.parametrize(
    ("fam_proto", "body"),
    [
        (0x00, b""),
        (0x11, inet_block("192.0.2.1", "192.0.2.2", 1, 2)),
        (0x21, inet_block("::1", "::2", 1, 2)),
        (0x10, b"\0" * 12),
        (0x00, tlv(0x04, b"")),
    ],
)
def test_v2_local_is_local_and_ignores_its_addresses(fam_proto: int, body: bytes) -> None:
    # The spec: for LOCAL the receiver uses the real endpoints and ignores the addresses.
    assert one(v2(0, fam_proto, body) + SYSLOG) == Parsed(ProxyHeader(2, True, "unspec"), SYSLOG)


def test_v2_tlvs_are_skipped() -> None:
    tlvs = tlv(0x01, b"h2") + tlv(0x02, b"logs.example") + tlv(0x05, b"\x01" * 32)
    tlvs += tlv(0x20, b"\x07" + b"\0\0\0\0" + tlv(0x21, b"TLSv1.3"))
    head = v2(1, 0x11, inet_block("192.0.2.1", "192.0.2.2", 1, 2) + tlvs)
    got = one(head + SYSLOG)
    assert isinstance(got, Parsed) and got.rest == SYSLOG
    assert got.header.source == ("192.0.2.1", 1)


def test_v2_largest_allowed_header_and_one_byte_more() -> None:
    block = inet_block("192.0.2.1", "192.0.2.2", 1, 2)
    pad = MAX_V2_HEADER - 16 - len(block)
    assert isinstance(one(v2(1, 0x11, block + b"\0" * pad) + b"x"), Parsed)
    # One more is refused on the 16th byte: nothing of the body is waited for or held.
    got = refused(v2(1, 0x11, b"", length=len(block) + pad + 1))
    assert got.reason == "too_long"
    assert refused(v2(1, 0x11, b"", length=0xFFFF)).reason == "too_long"


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (V2_SIGNATURE + b"\x11\x11\x00\x0c", "bad_v2"),  # version 1
        (V2_SIGNATURE + b"\x31\x11\x00\x0c", "bad_v2"),  # version 3
        (V2_SIGNATURE + b"\x01\x11\x00\x0c", "bad_v2"),  # version 0
        (V2_SIGNATURE + b"\x22\x11\x00\x0c", "bad_v2"),  # command 2
        (V2_SIGNATURE + b"\x2f\x11\x00\x0c", "bad_v2"),  # command 15
        (V2_SIGNATURE + b"\x21\x41\x00\x0c", "bad_v2"),  # family 4
        (V2_SIGNATURE + b"\x21\xf1\x00\x0c", "bad_v2"),  # family 15
        (V2_SIGNATURE + b"\x21\x13\x00\x0c", "bad_v2"),  # transport 3
        (V2_SIGNATURE + b"\x21\x10\x00\x0c", "bad_v2"),  # AF_INET, transport UNSPEC
        (V2_SIGNATURE + b"\x21\x12\x00\x0c", "unsupported"),  # DGRAM
        (V2_SIGNATURE + b"\x21\x22\x00\x24", "unsupported"),
        (V2_SIGNATURE + b"\x20\x02\x00\x00", "unsupported"),  # LOCAL over DGRAM too
        (V2_SIGNATURE + b"\x21\x11\x00\x0b", "bad_v2"),  # below the 12-byte inet block
        (V2_SIGNATURE + b"\x21\x21\x00\x0c", "bad_v2"),  # inet6 with an inet length
        (V2_SIGNATURE + b"\x21\x31\x00\xd7", "bad_v2"),  # unix, 215 < 216
        (V2_SIGNATURE + b"\x20\x11\x00\x00", "bad_v2"),  # LOCAL, declared inet, no block
        (V2_SIGNATURE[:11] + b"\x0b", "bad_signature"),
        (b"\r\n\r\n\x00\r\nquit\n", "bad_signature"),
    ],
)
def test_v2_malformed_fixed_headers_are_refused(head: bytes, reason: str) -> None:
    assert refused(head).reason == reason


def test_v2_refuses_a_bad_byte_as_soon_as_it_arrives() -> None:
    # Version/command is byte 13: refused before the family or length are here.
    assert refused(V2_SIGNATURE + b"\x11").reason == "bad_v2"
    assert refused(V2_SIGNATURE + b"\x21\x12").reason == "unsupported"


def test_v2_length_beyond_the_block_waits_for_the_tlvs() -> None:
    block = inet_block("192.0.2.1", "192.0.2.2", 1, 2)
    head = v2(1, 0x11, block + tlv(0x04, b"\0" * 10))
    p = ProxyParser()
    assert p.feed(head[:-1]) == Pending()
    got = p.feed(head[-1:] + SYSLOG)
    assert isinstance(got, Parsed) and got.rest == SYSLOG


# --- hostile and edge inputs -------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [SYSLOG, b"57 <134>1 -", b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\n", b"\0", b" PROXY"],
)
def test_what_is_no_header_is_refused_on_its_first_byte(data: bytes) -> None:
    p = ProxyParser()
    got = p.feed(data[:1])
    assert isinstance(got, Refused) and got.reason == "bad_signature"
    assert p.feed(data[1:]) == got and p.close() == got


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"P",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r",
        V2_SIGNATURE[:5],
        V2_SIGNATURE + b"\x21\x11\x00",
        v2(1, 0x11, inet_block("192.0.2.1", "192.0.2.2", 1, 2))[:-1],
    ],
)
def test_end_of_stream_inside_a_header_is_truncated(data: bytes) -> None:
    assert refused(data, at_close=True).reason == "truncated"


def test_after_parsed_later_bytes_pass_through_untouched() -> None:
    p = ProxyParser()
    got = p.feed(b"PROXY UNKNOWN\r\nfirst")
    assert isinstance(got, Parsed) and got.rest == b"first"
    assert p.feed(b"PROXY TCP4 x\r\n") == Parsed(got.header, b"PROXY TCP4 x\r\n")
    assert p.feed(b"") == Parsed(got.header, b"")
    assert p.close() == Parsed(got.header, b"")
    assert p.buffered == 0


def test_a_large_read_is_not_buffered_whole() -> None:
    p = ProxyParser()
    got = p.feed(V2_SIGNATURE + b"\x21\x11\x00\x0c" + b"\0" * 5 + b"x" * 1_000_000)
    assert isinstance(got, Parsed) and len(got.rest) == 1_000_000 - 7
    assert p.buffered == 0


def test_limit_is_configurable_but_admits_every_address_block() -> None:
    with pytest.raises(ValueError):
        ProxyParser(limit=100)
    p = ProxyParser(limit=300)
    got = p.feed(v2(1, 0x00, b"\0" * 285))
    assert isinstance(got, Refused) and got.reason == "too_long"


CASES = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 514\r\n",
    b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 5140\n",
    v2(1, 0x11, inet_block("192.0.2.1", "192.0.2.2", 1, 2) + tlv(1, b"h2")),
    v2(0, 0x00, b""),
    v2(1, 0x21, b"\0" * 35, length=35),
    SYSLOG,
]


@pytest.mark.parametrize("head", CASES)
def test_byte_by_byte_gives_the_same_result_as_one_chunk(head: bytes) -> None:
    stream = head + SYSLOG
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == feed_all([stream])


# --- properties --------------------------------------------------------------------------


@st.composite
def split_points(draw: st.DrawFn, length: int) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, length), max_size=12)))


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


ports = st.integers(0, 0xFFFF)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        tail = draw(
            st.one_of(
                st.just(""),
                st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=91).map(
                    lambda t: " " + t[:90]
                ),
            )
        )
        return f"PROXY UNKNOWN{tail}\r\n".encode(), ProxyHeader(1, True, "unspec")
    ips = ipv4s if kind == "TCP4" else ipv6s
    src, dst = draw(ips), draw(ips)
    sport, dport = draw(ports), draw(ports)
    # Either spelling is valid on the wire; the header always holds the canonical one.
    exploded = draw(st.booleans())
    shown = (src.exploded, dst.exploded) if exploded else (str(src), str(dst))
    line = f"PROXY {kind} {shown[0]} {shown[1]} {sport} {dport}\r\n".encode()
    family: Family = "inet" if kind == "TCP4" else "inet6"
    return line, ProxyHeader(1, False, family, (str(src), sport), (str(dst), dport))


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    local = draw(st.booleans())
    fam = draw(st.sampled_from([0x0, 0x1, 0x2, 0x3]))
    proto = 0x1 if fam != 0 else draw(st.sampled_from([0x0, 0x1]))
    tlvs = draw(st.binary(max_size=300))
    if fam in (0x1, 0x2):
        ips = ipv4s if fam == 0x1 else ipv6s
        src, dst = draw(ips), draw(ips)
        sport, dport = draw(ports), draw(ports)
        block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        family: Family = "inet" if fam == 0x1 else "inet6"
        header = ProxyHeader(2, False, family, (str(src), sport), (str(dst), dport))
    else:
        block = draw(st.binary(min_size=216, max_size=216)) if fam == 0x3 else b""
        header = ProxyHeader(2, False, "unix" if fam == 0x3 else "unspec")
    if local:
        header = ProxyHeader(2, True, "unspec")
    return v2(0 if local else 1, fam << 4 | proto, block + tlvs), header


valid_headers = st.one_of(v1_headers(), v2_headers())


@given(valid_headers, st.binary(max_size=200), st.data())
@settings(max_examples=400)
def test_any_valid_header_split_anyhow_parses_with_its_trailing_bytes(
    case: tuple[bytes, ProxyHeader], trailing: bytes, data: st.DataObject
) -> None:
    head, header = case
    stream = head + trailing
    got, rest = feed_all(chunked(stream, data.draw(split_points(len(stream)))))
    assert got == Parsed(header, b"")
    assert rest == trailing


def _mutate(draw: st.DrawFn, stream: bytes) -> bytes:
    if not stream:
        return stream
    at = draw(st.integers(0, len(stream) - 1))
    how = draw(st.sampled_from(["flip", "cut", "insert", "drop"]))
    if how == "flip":
        return stream[:at] + bytes([stream[at] ^ draw(st.integers(1, 255))]) + stream[at + 1 :]
    if how == "cut":
        return stream[:at]
    if how == "insert":
        return stream[:at] + draw(st.binary(min_size=1, max_size=8)) + stream[at:]
    return stream[:at] + stream[at + 1 :]


@st.composite
def near_headers(draw: st.DrawFn) -> bytes:
    """Bytes close to a header, where the decisions are: valid ones damaged once or twice."""
    head, _ = draw(valid_headers)
    stream = head + draw(st.binary(max_size=40))
    for _ in range(draw(st.integers(1, 2))):
        stream = _mutate(draw, stream)
    return stream


any_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.text("PROXYTCP46UNKW0123456789.:abcdef \r\n", max_size=120).map(str.encode),
    near_headers(),
)


@given(any_bytes, st.data())
@settings(max_examples=600)
def test_any_bytes_never_raise_and_the_outcome_ignores_the_split(
    stream: bytes, data: st.DataObject
) -> None:
    whole = feed_all([stream])
    assert feed_all(chunked(stream, data.draw(split_points(len(stream))))) == whole
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == whole
    got = whole[0]
    assert isinstance(got, Parsed | Refused)
    if isinstance(got, Refused):
        assert got.reason in REASONS and got.detail and "\n" not in got.detail


@given(st.lists(any_bytes, max_size=8))
@settings(max_examples=300)
def test_the_buffer_never_exceeds_the_limit(chunks: list[bytes]) -> None:
    p = ProxyParser()
    stream = b""
    for chunk in chunks:
        got = p.feed(chunk)
        stream += chunk
        assert p.buffered <= MAX_V2_HEADER
        if not isinstance(got, Pending):
            assert p.buffered == 0
        elif stream.startswith(b"P"):
            # A v1 line is given up at 107 bytes: what waits is always shorter.
            assert p.buffered < MAX_V1_LINE


@given(st.integers(0, 0xFFFF), st.binary(max_size=64), st.data())
def test_a_pending_v2_header_holds_no_more_than_it_declared(
    length: int, body: bytes, data: st.DataObject
) -> None:
    stream = V2_SIGNATURE + b"\x21\x00" + struct.pack("!H", length) + body
    p = ProxyParser()
    for chunk in chunked(stream, data.draw(split_points(len(stream)))):
        if isinstance(p.feed(chunk), Pending):
            assert p.buffered <= min(16 + length, MAX_V2_HEADER)
