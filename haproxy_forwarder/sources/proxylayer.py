"""The PROXY protocol layer of a stream listener (listen.proxy_protocol: HAProxy `mode tcp`
with send-proxy / send-proxy-v2, or any L4 balancer speaking it, in front of the forwarder).

It is the raw socket's protocol, below the TLS layer: on the wire the PROXY header comes
first, then the TLS handshake (if any), then syslog or RELP. stream.py puts one in front of
every connection while listen.proxy_protocol is not empty; the rest of the listener does not
know it is there, except through two extra names of its transport's get_extra_info:

  * a connection from a balancer (an address in listen.proxy_protocol) must start with a
    PROXY header, v1 or v2 (proxyproto.py parses it). Until it is complete nothing of the
    connection exists above (no TLS handshake, no admission, no slot). It must come within
    PROXY_HEADER_TIMEOUT (or listen.idle_timeout if shorter); a timeout, a stream ended
    before it, or a header the parser refuses closes the connection (reset), counted in
    `proxy_refused[reason]` and logged `proxy_header_refused` (rate-limited). Once read
    (counted in `proxy_headers`), the inner protocol is created and given a `ProxiedTransport`
    whose "peername" is the header's source: the listener's admission (listen.allow, the
    per-address cap), its routes, its log lines and its idle/eviction bookkeeping all see
    the real sender, and the balancer only as `via` (the "proxy_peer" extra info). Bytes that
    came after the header in the same read go on to the inner protocol at once.
  * a header with no client address (v2 LOCAL: HAProxy's health checks; v1 UNKNOWN; v2
    AF_UNSPEC or AF_UNIX) is accepted: the connection then stands for the balancer itself,
    whose address is its source. As the balancer is trusted by listen.proxy_protocol (it may
    claim any source already), listen.allow is not asked about it (see `stands_for_balancer`):
    listing the balancers in listen.allow is not needed for their health checks to pass.
  * a connection from any other address is an ordinary one (its protocol is created at once,
    admitted on its own address, counted against every cap), but its first bytes are looked
    at: if they start a PROXY signature ("PROXY " or the 12-byte v2 one) it is refused
    (`not_allowed`, logged once per address): a client must not choose its own source
    address. Nothing else can be mistaken for one: syslog starts with "<" or a digit, RELP
    with a digit, TLS with 0x16. Up to 11 bytes (a signature's prefix) are held until that is
    decided, however the bytes are split.
  * a connection whose peer address cannot be read (reset before it was accepted) is closed
    at once: it can be judged neither a balancer nor not one.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol, cast, runtime_checkable

from ..observability.counters import ListenerCounters
from ..observability.quiet import QuietLog
from ..proxyproto import V1_SIGNATURE, V2_SIGNATURE, Parsed, ProxyHeader, ProxyParser, Refused
from .base import peer_of
from .guard import Allow

# Seconds a balancer has to send its header, as tls.handshake_timeout for a handshake: a
# balancer sends it with its connect, so this is only reached by a broken or hostile one.
PROXY_HEADER_TIMEOUT = 10.0
# Peer addresses whose `not_allowed` refusal was logged: past this many the oldest is
# forgotten (and may be logged again), so a scan from many addresses cannot grow memory.
REFUSAL_MEMORY = 1024
# The reasons of proxy_refused beside the parser's (proxyproto.REASONS).
NOT_ALLOWED = "not_allowed"
TIMEOUT = "timeout"

Sniffed = Literal["pending", "proxy", "stream"]


@runtime_checkable
class Dismissable(Protocol):
    """An inner protocol with something to undo quietly when the layer below closes the
    connection for a reason of its own, counted and logged there (the TLS layer: its
    handshake in progress is no `closed_in_handshake` of the peer's)."""

    def dismiss(self) -> None: ...


def sniff(data: bytes) -> Sniffed:
    """Whether the first bytes of a connection start a PROXY header ("proxy"), cannot
    ("stream"), or are a proper prefix of a signature so far ("pending")."""
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            return "proxy" if n == len(signature) else "pending"
    return "stream"


def via_of(transport: asyncio.BaseTransport | None) -> dict[str, str]:
    """{"via": "host:port" of the balancer} for a connection behind a PROXY header, else {}:
    extra fields of its log lines, so they name the real sender and the balancer both."""
    if transport is None:
        return {}
    balancer = transport.get_extra_info("proxy_peer")
    if isinstance(balancer, tuple):
        return {"via": f"{balancer[0]}:{balancer[1]}"}
    return {}


def stands_for_balancer(transport: asyncio.BaseTransport | None) -> bool:
    """True for a connection whose PROXY header carried no client address (LOCAL, UNKNOWN,
    AF_UNSPEC, AF_UNIX): it is the balancer's own, trusted by listen.proxy_protocol."""
    if transport is None:
        return False
    header = transport.get_extra_info("proxy_header")
    return isinstance(header, ProxyHeader) and header.source is None


class ProxyGate:
    """What one listener's PROXY layers share: the balancers in force, the header timeout,
    the counters and the log, the connections still waiting for their header."""

    def __init__(self, stats: ListenerCounters, quiet: QuietLog) -> None:
        self.stats = stats
        self.quiet = quiet
        self.balancers = Allow(())
        # PROXY_HEADER_TIMEOUT, lowered to listen.idle_timeout when shorter (a test sets it).
        self.header_timeout = PROXY_HEADER_TIMEOUT
        self.idle_timeout = PROXY_HEADER_TIMEOUT
        self.pending: set[ProxyLayer] = set()
        self._logged: OrderedDict[str, None] = OrderedDict()

    def configure(self, cidrs: Iterable[str], idle_timeout: float) -> None:
        """listen.proxy_protocol and listen.idle_timeout, at start and on SIGHUP: new
        connections follow them (one whose header is awaited keeps its timer)."""
        self.balancers = Allow(cidrs)
        self.idle_timeout = idle_timeout

    @property
    def enabled(self) -> bool:
        return bool(self.balancers.networks)

    @property
    def timeout(self) -> float:
        return min(self.header_timeout, self.idle_timeout)

    def is_balancer(self, address: str) -> bool:
        # Allow permits everyone when empty: here empty means no balancer at all.
        return self.enabled and self.balancers.permits(address)

    def count(self, reason: str) -> None:
        refused = self.stats.proxy_refused
        refused[reason] = refused.get(reason, 0) + 1

    def refused(self, reason: str, peer: str, detail: str) -> None:
        """A balancer's connection closed for its header: counted, logged rate-limited."""
        self.count(reason)
        self.quiet.warning("proxy_header_refused", listener=self.stats.name, peer=peer,
                           reason=reason, detail=detail, action="connection closed")

    def not_allowed(self, peer: str, address: str) -> None:
        """A PROXY header from outside listen.proxy_protocol: counted always, logged once per
        address (within REFUSAL_MEMORY), and rate-limited across addresses."""
        self.count(NOT_ALLOWED)
        if address in self._logged:
            self._logged.move_to_end(address)
            return
        self._logged[address] = None
        if len(self._logged) > REFUSAL_MEMORY:
            self._logged.popitem(last=False)
        self.quiet.warning("proxy_header_refused", listener=self.stats.name, peer=peer,
                           reason=NOT_ALLOWED,
                           detail="a PROXY header from an address not in "
                                  "listen.proxy_protocol",
                           action="connection closed; logged once per address")

    def close_pending(self) -> None:
        """The listener stops: connections still waiting for their header are reset (nothing
        of theirs was read; not counted as refused)."""
        for layer in list(self.pending):
            layer.abort()


class ProxiedTransport(asyncio.Transport):
    """The transport the inner protocol sees behind a PROXY header: the raw socket's, except
    that "peername" is the header's source (the balancer's own address for a header without
    one), "proxy_peer" the balancer's and "proxy_header" the header."""

    def __init__(self, layer: ProxyLayer, raw: asyncio.Transport, header: ProxyHeader) -> None:
        super().__init__()
        self._layer = layer
        self._raw = raw
        self._header = header

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername" and self._header.source is not None:
            return self._header.source
        if name == "proxy_peer":
            return self._raw.get_extra_info("peername", default)
        if name == "proxy_header":
            return self._header
        return self._raw.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._raw.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._raw.writelines(list_of_data)

    def can_write_eof(self) -> bool:
        return self._raw.can_write_eof()

    def write_eof(self) -> None:
        self._raw.write_eof()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def close(self) -> None:
        self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._layer.inner = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._layer.inner)


def _why(outcome: Parsed | Refused) -> tuple[str, str]:
    """(reason, detail) of a header that ended before it was complete."""
    if isinstance(outcome, Refused):
        return outcome.reason, outcome.detail
    return "truncated", "stream ended"  # pragma: no cover - close() in "header" refuses


# What the layer is doing: looking at a non-balancer's first bytes, waiting for a
# balancer's header, passing bytes to the inner protocol, or closed by it.
State = Literal["sniff", "header", "pass", "done"]


class ProxyLayer(asyncio.Protocol):
    """The protocol of the raw socket while listen.proxy_protocol is set (module docstring)."""

    def __init__(self, gate: ProxyGate, inner_factory: Callable[[], asyncio.Protocol]) -> None:
        self.gate = gate
        self.inner_factory = inner_factory
        self.inner: asyncio.Protocol | None = None
        self.raw: asyncio.Transport | None = None
        self.peer = self.address = "?"
        self.state: State = "done"
        self._held = b""  # sniff: a signature's prefix, until decided
        self._parser: ProxyParser | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- the raw socket ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        self.raw = raw
        if not isinstance(raw.get_extra_info("peername"), tuple):
            # Reset before it was accepted (a balancer's health check closes at once; uvloop
            # then cannot read the peer's address): no address, nothing to judge it by, and
            # nobody left to answer. Closed, not counted.
            self.state = "done"
            raw.abort()
            return
        self.peer, self.address = peer_of(raw)
        gate = self.gate
        if not gate.is_balancer(self.address):
            self.state = "sniff"
            self._start_inner(raw)
            return
        self.state = "header"
        self._parser = ProxyParser()
        gate.pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(gate.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == "pass":
            assert self.inner is not None
            self.inner.data_received(data)
        elif state == "sniff":
            self._sniff(data)
        elif state == "header":
            self._header(data)

    def eof_received(self) -> bool | None:
        if self.state == "sniff":
            # Fewer bytes than a signature, then the end: they were the stream's.
            self._pass_held()
        if self.state == "pass":
            assert self.inner is not None
            return self.inner.eof_received()
        if self.state == "header":
            assert self._parser is not None
            self._refuse(*_why(self._parser.close()))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == "header" and self._parser is not None:
            # Reset (or gone) before its header was complete: a truncated one.
            self._refuse(*_why(self._parser.close()), close=False)
        self._end_wait()
        self.state = "done"
        self.raw = None
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- a balancer's header ----------------------------------------------------------------

    def _header(self, data: bytes) -> None:
        assert self._parser is not None
        result = self._parser.feed(data)
        if isinstance(result, Parsed):
            self._accept(result.header, result.rest)
        elif isinstance(result, Refused):
            self._refuse(result.reason, result.detail)

    def _accept(self, header: ProxyHeader, rest: bytes) -> None:
        raw = self.raw
        assert raw is not None
        self._end_wait()
        self._parser = None
        self.gate.stats.proxy_headers += 1
        self.state = "pass"
        self._start_inner(ProxiedTransport(self, raw, header))
        if rest and self.inner is not None and not raw.is_closing():
            self.inner.data_received(rest)

    def _timed_out(self) -> None:
        self._timer = None
        if self.state != "header" or self._parser is None:
            return
        self._refuse(TIMEOUT, f"no complete PROXY header within {self.gate.timeout:g} s "
                              f"({self._parser.buffered} bytes of one)")

    def _refuse(self, reason: str, detail: str, close: bool = True) -> None:
        """The balancer's connection goes for its header (counted, logged)."""
        self._end_wait()
        self.state = "done"
        self._parser = None
        self.gate.refused(reason, self.peer, detail)
        if close and self.raw is not None:
            self.raw.abort()

    def _end_wait(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.gate.pending.discard(self)

    def abort(self) -> None:
        """Closed by the listener (it stops) while waiting for the header: not a refusal."""
        self._end_wait()
        self.state = "done"
        self._parser = None
        if self.raw is not None:
            self.raw.abort()

    # -- anyone else ------------------------------------------------------------------------

    def _sniff(self, data: bytes) -> None:
        head = self._held + data if self._held else data
        verdict = sniff(head[:len(V2_SIGNATURE)])
        if verdict == "pending":
            self._held = head
            return
        self._held = b""
        if verdict == "proxy":
            self._not_allowed()
            return
        self.state = "pass"
        self._deliver(head)

    def _pass_held(self) -> None:
        held, self._held = self._held, b""
        self.state = "pass"
        if held:
            self._deliver(held)

    def _deliver(self, data: bytes) -> None:
        if self.inner is not None and self.raw is not None and not self.raw.is_closing():
            self.inner.data_received(data)

    def _not_allowed(self) -> None:
        """A PROXY header from outside listen.proxy_protocol: the connection goes. Its inner
        protocol was admitted already; a TLS layer still in its handshake is told it is
        closed for a reason of ours (no `closed_in_handshake` counted for it)."""
        self.state = "done"
        self.gate.not_allowed(self.peer, self.address)
        if isinstance(self.inner, Dismissable):
            self.inner.dismiss()
        if self.raw is not None:
            self.raw.abort()

    def _start_inner(self, transport: asyncio.Transport) -> None:
        self.inner = self.inner_factory()
        self.inner.connection_made(transport)
