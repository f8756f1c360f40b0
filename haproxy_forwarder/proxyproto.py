"""A sans-IO parser of the PROXY protocol header (HAProxy's doc/proxy-protocol.txt, v1 and v2).

A load balancer that speaks the PROXY protocol sends one header before the proxied bytes;
it tells the receiver who the real client was.  This module only decides, from the first
bytes of a connection, whether they are such a header and what it says: no IO, no asyncio,
no logging, so the listener owns the socket, the timeout, the counters and the log line.

    parser = ProxyParser()
    result = parser.feed(chunk)        # Pending | Parsed | Refused
    result = parser.close()            # at end of stream: Refused("truncated") if still Pending

Lifecycle: the parser is incremental until it reaches a final result (Parsed or Refused);
then it is done.  After Parsed, every later ``feed(data)`` answers ``Parsed(header, data)``:
the bytes pass through untouched, so a caller that keeps feeding still sees the stream in
order, but they are not the parser's business (nothing is buffered or looked at).  After
Refused, ``feed`` and ``close`` answer the same Refused.  ``close`` after Parsed answers
``Parsed(header, b"")``.

Decisions (why they are so):
  * The outcome depends only on the bytes, never on how they were split into reads: every
    check is made at the offset it concerns, in offset order, and a final decision is never
    revised by later bytes.  So a sender is treated the same whatever its segmentation.
  * A refusal comes at the first byte that settles it.  A byte that cannot continue either
    signature refuses at once: a client sending syslog directly ("<13>..." or "12 <13>...")
    is refused on its first byte, not after 107 of them.  A v1 line is refused at its first
    byte outside printable ASCII, and v2 fields at the byte that holds them.
  * ``local`` is True for v2 LOCAL and v1 UNKNOWN: the balancer's own connection (a health
    check) or one it cannot describe; both carry no address and the spec says to use the
    real connection's endpoints.  Their ``family`` is "unspec" whatever a LOCAL header
    declared, since the declared family describes nothing.
  * v2 PROXY with AF_UNIX is accepted with ``family="unix"`` and no addresses (a socket path
    is no client address to log); v2 PROXY with AF_UNSPEC is accepted with
    ``family="unspec"``, ``local=False`` (a proxied client the balancer could not describe).
    The caller's rule is simply: ``source is None`` -> use the socket's peer.
  * DGRAM is refused ("unsupported") under any command: this is a stream listener.
  * What follows "PROXY UNKNOWN" is ignored, as the spec says, but must still be printable
    ASCII like any v1 line: binary bytes there are no v1 sender's output, and checking the
    whole line alike is what lets a v1 refusal come before its CRLF.
  * A stream that ends before its first byte is "truncated" too (detail says so): for a
    listener that requires the header, a bare TCP health check sent nothing valid.
  * Bounds: a v1 line is at most 107 bytes with its CRLF (the spec's maximum); a v2 header
    at most ``limit`` bytes in all (4096 by default).  A v2 header that declares more is
    refused "too_long" on its 16th byte, before any of it is buffered.  TLVs are skipped,
    not parsed.  The buffer therefore never holds more than ``limit`` bytes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

__all__ = [
    "MAX_V1_LINE",
    "MAX_V2_HEADER",
    "REASONS",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "Family",
    "Parsed",
    "Pending",
    "ProxyHeader",
    "ProxyParser",
    "Reason",
    "Refused",
    "Result",
]

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses).
MAX_V1_LINE: Final = 107
V2_FIXED: Final = 16  # signature, version/command, family/transport, 2-byte length
# The largest v2 header accepted by default: addresses and the TLVs HAProxy sends (ALPN,
# authority, SSL, unique id...) fit many times over, and a balancer sending more is
# misconfigured or hostile.
MAX_V2_HEADER: Final = 4096
# The smallest limit that still admits every address block (AF_UNIX: 2 x 108 bytes).
_MIN_LIMIT: Final = V2_FIXED + 216

# Every `Refused.reason`: a closed set, so a counter labelled by reason has bounded
# cardinality and mypy catches a label spelled differently in one place.
Reason = Literal[
    "bad_signature", "truncated", "too_long", "bad_v1", "bad_v2", "bad_address", "unsupported"
]
REASONS: Final[frozenset[str]] = frozenset(get_args(Reason))

Family = Literal["inet", "inet6", "unix", "unspec"]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the header says.  `source`/`destination` are (host text, port), set only for
    inet/inet6 (host text in Python's canonical form, e.g. "2001:db8::1")."""

    version: int
    local: bool
    family: Family
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    """More bytes are needed; what came so far is buffered (at most the parser's limit)."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """A complete header; `rest` is what followed it in the data fed (handed on untouched)."""

    header: ProxyHeader
    rest: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """Not a valid PROXY header: `reason` is one of REASONS, `detail` one human line."""

    reason: Reason
    detail: str


Result = Pending | Parsed | Refused

PENDING: Final = Pending()

_CR: Final = 0x0D
_LF: Final = 0x0A
# Anything but printable ASCII in a v1 line; CR is allowed only as the start of its CRLF.
_V1_NOT_PRINTABLE: Final = re.compile(rb"[^\x20-\x7e]")
# Decimal without sign, spaces or heading zeroes (the spec forbids them: octal confusion).
_V1_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")

_V2_COMMANDS: Final = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_FAMILIES: Final[dict[int, Family]] = {0x0: "unspec", 0x1: "inet", 0x2: "inet6", 0x3: "unix"}
_V2_AF_NAMES: Final = {0x0: "AF_UNSPEC", 0x1: "AF_INET", 0x2: "AF_INET6", 0x3: "AF_UNIX"}
# Address block per family: two addresses and, for inet/inet6, two ports.
_V2_BLOCK: Final = {0x0: 0, 0x1: 4 + 4 + 2 + 2, 0x2: 16 + 16 + 2 + 2, 0x3: 108 + 108}
_STREAM: Final = 0x1
_DGRAM: Final = 0x2

_LOCAL_HEADER_V1: Final = ProxyHeader(version=1, local=True, family="unspec")
_LOCAL_HEADER_V2: Final = ProxyHeader(version=2, local=True, family="unspec")


class ProxyParser:
    """Incremental parser of one connection's PROXY header (see the module docstring)."""

    __slots__ = ("_buf", "_done", "_header", "_limit")

    def __init__(self, limit: int = MAX_V2_HEADER) -> None:
        if limit < _MIN_LIMIT:
            raise ValueError(f"limit {limit} is below {_MIN_LIMIT}, the largest address block")
        self._limit = limit
        self._buf = b""
        self._header: ProxyHeader | None = None
        self._done: Refused | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while Pending (never more than the limit; 0 once final)."""
        return len(self._buf)

    def feed(self, data: bytes) -> Result:
        if self._header is not None:
            return Parsed(self._header, bytes(data))
        if self._done is not None:
            return self._done
        data = bytes(data)
        held = len(self._buf)
        # No header is longer than the limit, so bytes past it cannot change the decision:
        # look at no more than that, and never copy a large read whole.
        probe = self._buf + data[: self._limit - held]
        outcome = _classify(probe, self._limit)
        if isinstance(outcome, Pending):
            self._buf = probe
            return outcome
        self._buf = b""
        if isinstance(outcome, Refused):
            self._done = outcome
            return outcome
        header, used = outcome
        self._header = header
        return Parsed(header, data[used - held :])

    def close(self) -> Parsed | Refused:
        if self._header is not None:
            return Parsed(self._header, b"")
        if self._done is None:
            held = len(self._buf)
            if held == 0:
                detail = "stream ended before any byte of a PROXY header"
            else:
                kind = "v1" if self._buf[0] == V1_SIGNATURE[0] else "v2"
                detail = f"stream ended after {held} bytes of an incomplete {kind} header"
            self._done = Refused("truncated", detail)
            self._buf = b""
        return self._done


def _classify(buf: bytes, limit: int) -> Pending | Refused | tuple[ProxyHeader, int]:
    """Decide on the bytes so far: Pending, Refused, or (header, bytes it used).

    A pure function of `buf` whose final answers are stable under appending bytes, which is
    what makes the parser's outcome independent of how the stream was split."""
    if not buf:
        return PENDING
    if buf[0] == V1_SIGNATURE[0]:
        sig = V1_SIGNATURE
    elif buf[0] == V2_SIGNATURE[0]:
        sig = V2_SIGNATURE
    else:
        return Refused(
            "bad_signature", f"byte 0x{buf[0]:02x} at offset 0 starts no PROXY signature"
        )
    for i in range(1, min(len(buf), len(sig))):
        if buf[i] != sig[i]:
            return Refused(
                "bad_signature", f"byte 0x{buf[i]:02x} at offset {i} breaks the PROXY signature"
            )
    if len(buf) < len(sig):
        return PENDING
    if sig is V1_SIGNATURE:
        return _classify_v1(buf)
    return _classify_v2(buf, limit)


def _classify_v1(buf: bytes) -> Pending | Refused | tuple[ProxyHeader, int]:
    seen = min(len(buf), MAX_V1_LINE)
    bad = _V1_NOT_PRINTABLE.search(buf, len(V1_SIGNATURE), seen)
    if bad is None:
        if seen >= MAX_V1_LINE:
            return Refused("too_long", f"no CRLF in the first {MAX_V1_LINE} bytes of a v1 line")
        return PENDING
    at = bad.start()
    if buf[at] != _CR:
        return Refused("bad_v1", f"byte 0x{buf[at]:02x} at offset {at} in a v1 line")
    if at + 2 > MAX_V1_LINE:
        # Even if LF follows, the line would be 108 bytes: decided now, whatever comes next.
        return Refused("too_long", f"no CRLF in the first {MAX_V1_LINE} bytes of a v1 line")
    if at + 1 >= len(buf):
        return PENDING
    if buf[at + 1] != _LF:
        return Refused("bad_v1", f"CR not followed by LF at offset {at} in a v1 line")
    return _parse_v1_line(buf[:at], at + 2)


def _parse_v1_line(line: bytes, used: int) -> Refused | tuple[ProxyHeader, int]:
    # The line is printable ASCII (checked above), so decoding cannot fail.
    text = line.decode("ascii")
    fields = text.split(" ")
    proto = fields[1]
    if proto == "UNKNOWN":
        # The spec: the receiver must ignore anything after UNKNOWN up to the CRLF.
        return _LOCAL_HEADER_V1, used
    if proto not in ("TCP4", "TCP6"):
        return Refused("bad_v1", f"unknown v1 protocol {proto[:16]!r}")
    if len(fields) != 6 or "" in fields:
        return Refused("bad_v1", f"a {proto} line is 'PROXY {proto} SRC DST SPORT DPORT', "
                                 "single spaces")
    version: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    family: Family
    version, family = (
        (ipaddress.IPv4Address, "inet") if proto == "TCP4" else (ipaddress.IPv6Address, "inet6")
    )
    hosts: list[str] = []
    for name, raw in (("source", fields[2]), ("destination", fields[3])):
        # ipaddress accepts IPv6 scope ids ("fe80::1%eth0"): not an address on the wire.
        try:
            if "%" in raw:
                raise ValueError("scope id")
            hosts.append(str(version(raw)))
        except ValueError:
            return Refused("bad_address", f"v1 {name} {raw[:45]!r} is not an {family} address")
    ports: list[int] = []
    for name, raw in (("source", fields[4]), ("destination", fields[5])):
        if _V1_PORT.fullmatch(raw.encode()) is None or int(raw) > 0xFFFF:
            return Refused("bad_v1", f"v1 {name} port {raw[:8]!r} is not a decimal in 0-65535")
        ports.append(int(raw))
    header = ProxyHeader(
        version=1,
        local=False,
        family=family,
        source=(hosts[0], ports[0]),
        destination=(hosts[1], ports[1]),
    )
    return header, used


def _classify_v2(buf: bytes, limit: int) -> Pending | Refused | tuple[ProxyHeader, int]:
    # Each field is judged as soon as its byte is here, in offset order (see _classify).
    if len(buf) < 13:
        return PENDING
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        return Refused("bad_v2", f"v2 version nibble is {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command not in _V2_COMMANDS:
        return Refused("bad_v2", f"v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    if len(buf) < 14:
        return PENDING
    fam_proto = buf[13]
    fam, proto = fam_proto >> 4, fam_proto & 0x0F
    if fam not in _V2_FAMILIES:
        return Refused("bad_v2", f"v2 address family {fam} is unassigned")
    if proto > _DGRAM:
        return Refused("bad_v2", f"v2 transport {proto} is unassigned")
    if proto == _DGRAM:
        return Refused("unsupported", "v2 transport DGRAM on a stream listener")
    if command == 1 and fam != 0 and proto != _STREAM:
        # 0x10, 0x20, 0x30: a family with an unspecified transport is no combination the
        # spec lists; a sender of it is confused about what it proxies.
        return Refused("bad_v2", f"v2 PROXY over {_V2_AF_NAMES[fam]} with transport UNSPEC")
    if len(buf) < V2_FIXED:
        return PENDING
    length = int.from_bytes(buf[14:16], "big")
    total = V2_FIXED + length
    if total > limit:
        return Refused("too_long", f"v2 header of {total} bytes, over the {limit}-byte limit")
    block = _V2_BLOCK[fam]
    if length < block:
        return Refused(
            "bad_v2",
            f"v2 length {length} is below the {block}-byte {_V2_AF_NAMES[fam]} address block",
        )
    if len(buf) < total:
        return PENDING
    # Whatever follows the address block, up to `total`, is TLVs: skipped, not parsed.
    if command == 0:
        # LOCAL: the spec says to ignore the addresses and use the real endpoints.
        return _LOCAL_HEADER_V2, total
    family = _V2_FAMILIES[fam]
    body = buf[V2_FIXED:total]
    if fam == 0x1:
        src4 = ipaddress.IPv4Address(body[0:4])
        dst4 = ipaddress.IPv4Address(body[4:8])
        sport, dport = int.from_bytes(body[8:10], "big"), int.from_bytes(body[10:12], "big")
        header = ProxyHeader(2, False, family, (str(src4), sport), (str(dst4), dport))
    elif fam == 0x2:
        src6 = ipaddress.IPv6Address(body[0:16])
        dst6 = ipaddress.IPv6Address(body[16:32])
        sport, dport = int.from_bytes(body[32:34], "big"), int.from_bytes(body[34:36], "big")
        header = ProxyHeader(2, False, family, (str(src6), sport), (str(dst6), dport))
    else:
        # AF_UNIX (socket paths) and AF_UNSPEC carry no client address to report.
        header = ProxyHeader(2, False, family)
    return header, total
