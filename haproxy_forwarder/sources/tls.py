"""The TLS layer any stream listener can run its protocol over (listen.tls: syslog over TLS,
RFC 5425; RELP with relp.tls).

The layer is ours, on ssl.MemoryBIO, rather than `create_server(ssl=...)`: with asyncio's and
uvloop's built-in TLS a failed or timed-out handshake never reaches the protocol
(connection_made is not called), so refused peers could be neither counted nor logged, and
the handshakes in progress could not be capped. Here each accepted socket gets a `TlsLayer`:
it screens the peer (allow-list, per-address cap) before spending a handshake on it, holds a
slot of tls.max_handshakes (every slot taken: the oldest handshake of the address holding the
most is closed for it, so silent sockets cannot lock senders out; tlscontext.HandshakeSlots),
runs the handshake incrementally as bytes come (a slow peer never holds up the loop), arms
tls.handshake_timeout, checks the client certificate's name, and
only then creates the inner protocol and hands it a `TlsTransport`: a Transport that
encrypts what is written and passes decrypted bytes to `data_received`. A refused peer is
closed before any byte of it reaches the inner protocol.

A stream listener (sources/stream.py) given a ServerTls runs every connection over it:

    # at construction; server_tls is the daemon's one ServerTls (SourceContext.server_tls)
    self.gate = TlsGate(server_tls, self.stats, ctx.quiet, ctx.log, screen=self.screen)
    # the protocol factory given to loop.create_server
    def protocol(self): return TlsLayer(self.gate, self.connection)
    # in stop(), with the server closed: handshakes still under way are aborted
    self.gate.close_pending()

`screen(transport, peer, address) -> bool` runs before the handshake (False: the layer
aborts, the screen counted and logged why); `stats` gets a TlsCounters (`stats.tls`), which
/metrics exports for any listener as tls_handshakes_total / tls_handshakes_refused_total.

The inner protocol uses its transport as any asyncio one: write, pause_reading,
resume_reading, close, abort, is_closing, write_eof (close_notify then FIN, reading on),
get_extra_info("peername" / "socket" / "ssl_object" / "peercert"). Behind a PROXY header
(sources/proxylayer.py runs below this layer) the raw transport is the PROXY layer's, so
"peername" is the sender the balancer names, and every line logged here names the balancer
too (`via`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast

from ..observability.counters import ListenerCounters, TlsCounters
from ..observability.quiet import QuietLog
from ..tlscontext import HandshakeSlots, ServerTls, name_allowed, peer_names
from .base import peer_of
from .proxylayer import via_of

# Plaintext taken from the TLS object per call; a record is at most 16 KiB, so a few records.
READ_SIZE = 256 * 1024
# Peer addresses (with reason) whose refusal was logged: past this many, the oldest is
# forgotten (it may be logged again), so a scan from many addresses cannot grow memory.
REFUSAL_MEMORY = 1024
# At most this many refusal lines of new addresses per QuietLog interval; the rest go through
# the rate-limited log (one line and a count): many addresses must not mean many lines.
REFUSAL_LINES = 20

Screen = Callable[[asyncio.BaseTransport, str, str], bool]


def _reason(exc: ssl.SSLError) -> str:
    """The `reason` label of a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "untrusted"
    name = getattr(exc, "reason", "") or ""
    if name in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return "no_certificate"
    if name in ("CERTIFICATE_VERIFY_FAILED", "NO_CERTIFICATE_RETURNED"):
        return "untrusted"
    return "protocol_error"


def _detail(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message)
    return str(getattr(exc, "reason", None) or exc.__class__.__name__)


class TlsGate:
    """What one listener's TLS connections share: the settings in force (ServerTls), its
    counters, the log, and the screen run at accept."""

    def __init__(self, server_tls: ServerTls, stats: ListenerCounters, quiet: QuietLog,
                 log: Any, screen: Screen | None = None) -> None:
        self.server_tls = server_tls
        self.stats = stats
        if stats.tls is None:
            stats.tls = TlsCounters()
        self.counters: TlsCounters = stats.tls
        self.quiet = quiet
        self.log = log
        self.screen = screen
        # Layers still in their handshake: closed by close_pending() when the listener stops;
        # and how many per peer address (listen.max_connections_per_address counts them).
        self.pending: set[TlsLayer] = set()
        self.pending_by_address: dict[str, int] = {}
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lines_until = 0.0
        self._lines = 0

    def refused(self, reason: str, peer: str, address: str, **fields: Any) -> None:
        """Counted always; logged once per (peer address, reason), within bounds."""
        self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1
        key = (address, reason)
        if key in self._logged:
            self._logged.move_to_end(key)
            return
        self._logged[key] = None
        if len(self._logged) > REFUSAL_MEMORY:
            self._logged.popitem(last=False)
        now = time.monotonic()
        if now >= self._lines_until:
            self._lines_until, self._lines = now + self.quiet.interval, 0
        self._lines += 1
        line = dict(listener=self.stats.name, peer=peer, reason=reason, **fields,
                    action="closed before any byte was read; logged once per address")
        if self._lines <= REFUSAL_LINES:
            self.log.warning("tls_refused", **line)
        else:
            self.quiet.warning("tls_refused", **line)

    def start_handshake(self, layer: TlsLayer) -> None:
        self.pending.add(layer)
        a = layer.address
        self.pending_by_address[a] = self.pending_by_address.get(a, 0) + 1

    def end_handshake(self, layer: TlsLayer) -> None:
        if layer not in self.pending:
            return
        self.pending.discard(layer)
        a = layer.address
        n = self.pending_by_address.get(a, 0) - 1
        if n > 0:
            self.pending_by_address[a] = n
        else:
            self.pending_by_address.pop(a, None)

    def close_pending(self) -> None:
        for layer in list(self.pending):
            layer.abort()

    def recheck(self, connections: Iterable[Any]) -> None:
        """After a reload narrowed tls.client_ca_file or tls.allowed_names: close the open
        connections whose certificate would now be refused, as a narrowed listen.allow does.
        (A certificate of a CA no longer trusted is not re-verified: a restart does that.)"""
        tls = self.server_tls
        if tls.context is None:
            return
        required = tls.context.verify_mode == ssl.CERT_REQUIRED
        for conn in list(connections):
            t = conn.transport
            if t is None:
                continue
            cert = t.get_extra_info("peercert")
            if required and not cert:
                why = "no client certificate, and tls.client_ca_file is now set (reload)"
            elif cert and not name_allowed(peer_names(cert), tls.allowed_names):
                why = "certificate name not in tls.allowed_names (reload)"
            else:
                continue
            self.stats.access_denied += 1
            self.quiet.warning("connection_denied", listener=self.stats.name, peer=conn.peer,
                               **getattr(conn, "via", {}), reason=why)
            conn.drop()


class TlsTransport(asyncio.Transport):
    """The transport the inner protocol sees: plaintext both ways over the TLS layer."""

    def __init__(self, layer: TlsLayer) -> None:
        super().__init__()
        self._layer = layer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        layer = self._layer
        if name == "ssl_object":
            return layer.sslobj
        if name == "peercert":
            return layer.sslobj.getpeercert() if layer.sslobj is not None else default
        if name == "sslcontext":
            return layer.context
        return layer.raw.get_extra_info(name, default) if layer.raw is not None else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._layer.write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self._layer.write(b"".join(bytes(d) for d in list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._layer.write_eof()

    def pause_reading(self) -> None:
        self._layer.pause_reading()

    def resume_reading(self) -> None:
        self._layer.resume_reading()

    def is_reading(self) -> bool:
        return not self._layer.paused

    def is_closing(self) -> bool:
        raw = self._layer.raw
        return raw is None or raw.is_closing()

    def close(self) -> None:
        self._layer.close()

    def abort(self) -> None:
        self._layer.abort()

    def get_write_buffer_size(self) -> int:
        raw = self._layer.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._layer.raw is not None:
            self._layer.raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._layer.inner = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._layer.inner)


class TlsLayer(asyncio.Protocol):
    """The protocol of the raw socket: the handshake, then decrypt in, encrypt out."""

    def __init__(self, gate: TlsGate, inner_factory: Callable[[], asyncio.Protocol]) -> None:
        self.gate = gate
        self.inner_factory = inner_factory
        self.inner: asyncio.Protocol | None = None
        self.raw: asyncio.Transport | None = None
        self.sslobj: ssl.SSLObject | None = None
        self.context: ssl.SSLContext | None = None
        self.peer = self.address = "?"
        self.via: dict[str, str] = {}  # the balancer, behind a PROXY header
        self.paused = False
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._timer: asyncio.TimerHandle | None = None
        # The slots of tls.max_handshakes this layer holds one of, until its handshake ends.
        self._slots: HandshakeSlots[TlsLayer] | None = None
        self._started = 0.0  # time.monotonic() when it took its slot
        self._eof = False  # the raw socket's FIN came
        self._eof_told = False  # the inner protocol was told (once)
        self._transport: TlsTransport | None = None

    # -- the raw socket ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        self.raw = raw
        gate = self.gate
        self.peer, self.address = peer_of(raw)
        self.via = via_of(raw)
        if gate.screen is not None and not gate.screen(raw, self.peer, self.address):
            self._drop()
            return
        tls = gate.server_tls
        if tls.context is None:  # config validation makes this unreachable; stay safe
            self._drop()
            return
        if not self._make_room(tls):
            gate.refused("too_many_handshakes", self.peer, self.address, **self.via,
                         max_handshakes=tls.max_handshakes)
            self._drop()
            return
        self._slots = tls.slots
        tls.slots.add(self, self.address)
        self._started = time.monotonic()
        gate.start_handshake(self)
        self.context = tls.context
        self.sslobj = tls.context.wrap_bio(self._in, self._out, server_side=True)
        self._timer = asyncio.get_running_loop().call_later(
            tls.handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.sslobj is None:
            return
        self._in.write(data)
        if self.inner is None:
            self._handshake()
        else:
            self._pump()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self.inner is None:
            if self.sslobj is not None:
                self._refuse("closed_in_handshake", detail="peer closed during the handshake")
            return None
        self._pump()  # what came with the FIN, then the FIN itself (unless paused)
        return True  # _inner_eof closes it, when the inner protocol says so

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None and self.sslobj is not None and self.raw is not None:
            # Reset (or gone) in the middle of its handshake.
            self.gate.refused("closed_in_handshake", self.peer, self.address, **self.via,
                              detail=str(exc) if exc else "connection lost")
        self._end_handshake()
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

    # -- the handshake ----------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert, so the peer learns why
            self._refuse(_reason(exc), detail=_detail(exc))
            return
        except OSError as exc:  # pragma: no cover - MemoryBIO raises no socket errors
            self._refuse("protocol_error", detail=str(exc))
            return
        self._flush()
        tls = self.gate.server_tls
        # Verified by OpenSSL against tls.client_ca_file; {} when no client CA is set.
        cert = self.sslobj.getpeercert()
        if cert and not name_allowed(peer_names(cert), tls.allowed_names):
            self._refuse("name_not_allowed", names=peer_names(cert)[:8],
                         allowed_names=tls.allowed_names)
            return
        self._end_handshake()
        self.gate.counters.handshakes += 1
        self._transport = TlsTransport(self)
        self.inner = self.inner_factory()
        self.inner.connection_made(self._transport)
        if self.raw is None or self.raw.is_closing():
            return
        self._pump()  # application data that came with the client's Finished

    def _make_room(self, tls: ServerTls) -> bool:
        """Under tls.max_handshakes, by closing stalled handshakes if need be (a reload may
        have lowered the cap: then several). False: no slot could be freed."""
        while tls.handshaking >= tls.max_handshakes:
            victim = tls.slots.victim(self.address)
            before = tls.handshaking
            if victim is None:
                return False
            victim.evict(tls.max_handshakes)
            if tls.handshaking >= before:  # pragma: no cover - evict() gives its slot back
                return False
        return True

    def evict(self, max_handshakes: int) -> None:
        """Closed to give its slot to a new connection: every slot of tls.max_handshakes was
        taken and this is the oldest handshake of the address holding the most. Counted as
        too_many_handshakes (that is why it is closed), logged rate-limited (a flood evicts
        thousands)."""
        gate = self.gate
        refused = gate.counters.refused
        refused["too_many_handshakes"] = refused.get("too_many_handshakes", 0) + 1
        gate.quiet.warning("tls_handshake_evicted", listener=gate.stats.name, peer=self.peer,
                           **self.via, age=round(time.monotonic() - self._started, 3),
                           max_handshakes=max_handshakes,
                           reason="tls.max_handshakes reached: the oldest handshake of the "
                                  "address holding the most makes room",
                           action="closed before any byte of it was read")
        self._end_handshake()
        self._drop()

    def _timed_out(self) -> None:
        self._timer = None
        if self.inner is None and self.raw is not None:
            self._refuse("handshake_timeout",
                         handshake_timeout=self.gate.server_tls.handshake_timeout)

    def _refuse(self, reason: str, **fields: Any) -> None:
        self.gate.refused(reason, self.peer, self.address, **self.via, **fields)
        self._end_handshake()
        self._drop(flush=reason in ("no_certificate", "untrusted", "protocol_error"))

    def _end_handshake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._slots is not None:
            self._slots.remove(self, self.address)
            self._slots = None
        self.gate.end_handshake(self)

    def _drop(self, flush: bool = False) -> None:
        """Refused: no byte of it is read any more. With an alert queued, a close (it goes
        out first); otherwise a reset."""
        raw = self.raw
        self.sslobj = None
        if raw is None:
            return
        if flush:
            raw.close()
        else:
            raw.abort()

    # -- after it -----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Decrypt what has arrived and hand it to the inner protocol, unless paused."""
        sslobj = self.sslobj
        if sslobj is None or self.paused:
            return
        chunks: list[bytes] = []
        closed = False
        while True:
            try:
                chunk = sslobj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: as a FIN
                closed = True
                break
            except ssl.SSLError as exc:
                # Rate-limited: without client certificates anyone can get this far.
                self.gate.quiet.warning("tls_error", listener=self.gate.stats.name,
                                        peer=self.peer, **self.via, error=_detail(exc),
                                        action="connection closed")
                self._deliver(chunks)
                self.abort()
                return
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
        self._flush()  # a TLS 1.3 key update answer, if any
        self._deliver(chunks)
        if (closed or self._eof) and not self.paused:
            self._inner_eof()

    def _inner_eof(self) -> None:
        """The peer is done (close_notify or FIN): told once; closed unless the inner
        protocol keeps it open for writing, as eof_received's answer means on any transport."""
        inner = self.inner
        if inner is None or self._eof_told or self.raw is None or self.raw.is_closing():
            return  # closed by the inner protocol itself (a framing error): nothing to tell
        self._eof_told = True
        if not inner.eof_received() and self.raw is not None:
            self.close()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self.inner is not None:
            self.inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flush(self) -> None:
        if self._out.pending and self.raw is not None and not self.raw.is_closing():
            self.raw.write(self._out.read())

    def write(self, data: bytes) -> None:
        if self.sslobj is None or self.raw is None or self.raw.is_closing():
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError as exc:
            self.gate.quiet.warning("tls_error", listener=self.gate.stats.name,
                                    peer=self.peer, **self.via, error=_detail(exc),
                                    action="connection closed")
            self.abort()
            return
        self._flush()

    def _close_notify(self) -> None:
        if self.sslobj is None:
            return
        try:
            self.sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's own close_notify is not waited for
        except ssl.SSLError:
            return
        self._flush()

    def write_eof(self) -> None:
        """close_notify, then a FIN; reading goes on (what the sender had in flight)."""
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        self._close_notify()
        if raw.can_write_eof():
            raw.write_eof()

    def pause_reading(self) -> None:
        self.paused = True
        if self.raw is not None and not self.raw.is_closing():
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.raw is None or self.raw.is_closing():
            return
        self.raw.resume_reading()
        # Records that arrived before the pause wait in the BIO: no new byte may ever come.
        asyncio.get_running_loop().call_soon(self._resumed)

    def _resumed(self) -> None:
        self._pump()

    def close(self) -> None:
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        self._close_notify()
        raw.close()

    def dismiss(self) -> None:
        """The PROXY layer below closes the connection for its own reason (a header from an
        address not in listen.proxy_protocol), counted there: no refusal of ours."""
        self.abort()

    def abort(self) -> None:
        self._end_handshake()
        if self.inner is None:
            self.sslobj = None  # closed by us: not a peer gone in its handshake
        if self.raw is not None:
            self.raw.abort()
