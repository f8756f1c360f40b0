"""RELP source (rsyslog's omrelp): each message answered "200 OK" only once it is durable.

The protocol is in relp/ (sans-IO); here bytes move, and each chunk's syslog messages go
through the same ingest as TCP: one reader per connection (its `Inlet`'s, made once the
session's origin is known), fed the messages as octet-counted frames (so a message is exactly
one frame, whatever bytes it holds), `inlet.take()` with an `Ack` whose callback answers
them. Answers leave in txnr order.

Flow control: a session with `relp.max_window` unanswered messages is not read from until
answers go out (its sender's own window then fills and it waits); a session whose inlet is
held (its intake's delivery lags) is not read, as on TCP. Limits (allow-list, connection
caps, idle timeout, buffered bytes) are the listen.* ones of TCP. The window counts every
answer not sent yet, the ones ready but held behind an older pending one included, so what
a session holds is bounded.

A message the delivery loses (Waiter.lose(): a bug, the spool refusing it while the intake
does too, ...) would hold back every later answer of its session (they leave in txnr
order): the session is aborted at once instead, so the sender resends its unanswered window
on a new session (duplicates at worst). A session we close (serverclose, close) whose peer
does not read its last answers is aborted after CLOSE_GRACE, or at once when writing to it
is blocked already; it counts against the connection caps until its socket is closed. A
session in `close` (not read any more) still waiting for answers after CLOSE_DEADLINE (or
listen.idle_timeout if shorter) is aborted.

RelpConnection only uses transport.write / pause_reading / resume_reading / close / abort /
is_closing / get_extra_info("peername" / "peercert" / "proxy_peer"), so the PROXY layer of
sources/proxylayer.py can sit below it (listen.proxy_protocol), and with relp.tls (omrelp
tls="on") each accepted socket gets the TLS layer of sources/tls.py, with the [tls] settings
of listen.tls: the screen (allow-list, per-address cap, descriptors) runs before the
handshake, the client certificate and its name are checked, and only then is a
RelpConnection made. A handshake in progress counts against
listen.max_connections_per_address, as on listen.tls.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from ..acks import Ack
from ..config import ListenConfig, RelpConfig, Settings
from ..ingest import OCTET
from ..observability.counters import RelpCounters
from ..relp import CLOSE_TIMEOUT, NOT_DURABLE, ServerSession
from ..tlscontext import ServerTls
from .base import Inlet, SourceContext, peer_of
from .proxylayer import via_of
from .stream import StreamSource

# The parser holds at most this much above listen.max_message_size: what is longer than
# max_message_size is the reader's to count as oversized (as on TCP), what is far longer is
# skipped unread by the parser.
DATA_HEADROOM = 1024
# The `framing` label of a RELP listener's frame counters.
RELP_FRAMING = "relp"
# A session we closed whose last answers its peer has not read by then is aborted.
CLOSE_GRACE = 2.0
# A session in `close` still waiting for answers after this long (or listen.idle_timeout if
# shorter) is aborted: it is not read any more, so a sender gone meanwhile is not seen.
CLOSE_DEADLINE = 30.0


class RelpConnection(asyncio.Protocol):
    def __init__(self, source: RelpSource) -> None:
        self.source = source
        self.ctx = source.ctx
        self.stats = source.stats
        self.relp = source.relp
        self.frames = source.stats.framing(RELP_FRAMING)
        self.session = ServerSession(source.max_data)
        # Set once admitted (its origin is known then): its reader, where its events go.
        self.inlet: Inlet | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.address = "?"
        self.via: dict[str, str] = {}
        # Its inlet was held at the last pressure change: idle credit once it is not.
        self.was_held = False
        self.last_frame = time.monotonic()
        self.framed = False
        self.buffered = 0  # what the parser holds, as last reported to the budget
        self.reading = True
        # The peer does not read its answers (the transport's write buffer is over its
        # high-water mark): read nothing more from it, or the answers would pile up here.
        self.write_blocked = False
        self.acks_counted = 0  # session.answered already added to relp_acks
        self.closing_since: float | None = None  # monotonic time `close` was read
        # Closed by us (transport is None from then on) while its last bytes drain: still
        # counted by the source until connection_lost; aborted when _grace fires.
        self.draining: asyncio.Transport | None = None
        self._grace: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.peer, self.address = peer_of(transport)
        self.via = via_of(transport)
        src = self.source
        if not src.admit(transport, self.peer, self.address):
            transport.abort()
            return
        self.transport = transport
        self.inlet = self.ctx.inlet(src.origin(transport, self.address), OCTET)
        self.was_held = self.inlet.held
        src.add(self)
        self.stats.connections_accepted += 1
        self.update_reading()
        if not self.reading:
            # uvloop starts reading right after connection_made, whatever was asked in it
            # (asyncio does not): pause again once it has.
            asyncio.get_running_loop().call_soon(self._repause)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.stats.received_bytes += len(data)
        session = self.session
        got = session.receive(data)
        relp = self.relp
        for name, n in got.commands.items():
            relp.command(name, n)
        # received_frames: the syslog messages (what TCP counts), not the other commands.
        self.frames.frames += len(got.messages) + len(got.oversized)
        if got.frames:
            self.last_frame = time.monotonic()
            if not self.framed:
                self.framed = True
                self.source.frameless.pop(self, None)
        if got.opened:
            relp.sessions += 1
        if session.closing and self.closing_since is None:
            self.closing_since = time.monotonic()
        if got.oversized:
            self._oversized(len(got.oversized))
            relp.acked(0, 0.0)  # the latency sample; the answers count once sent (_flush)
        if got.messages:
            self._ingest(got.messages)
        if self.transport is None:
            return  # aborted by a loss reported from the ingest itself
        if got.error is not None:
            err = got.error
            relp.frame_errors[err.reason] = relp.frame_errors.get(err.reason, 0) + 1
            self.frames.framing_errors += 1
            self.ctx.quiet.warning("relp_protocol_error", listener=self.stats.name,
                                   peer=self.peer, **self.via, reason=err.reason, error=err.message,
                                   action="session closed")
        self._flush()
        if self.transport is not None:
            self.ctx.budget.update(self, session.buffered)
            self.update_reading()

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.update_reading()

    def eof_received(self) -> bool | None:
        # A sender gone without `close`: what it has not seen answered, it sends again.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self.transport is not None or self.draining is not None:
            self.source.remove(self)
            self.transport = self.draining = None

    # -- ingest and answers -------------------------------------------------------------------

    def _ingest(self, messages: list[tuple[int, bytes]]) -> None:
        """One feed for the chunk's messages, each an octet-counted frame; one durability
        wait for all of them."""
        parts: list[bytes] = []
        for _, msg in messages:
            if msg.endswith(b"\n"):
                msg = msg[:-1]  # a sender's trailing LF, as UDP drops it: not the message
            if msg:
                parts.append(b"%d %s" % (len(msg), msg))
        txnrs = [txnr for txnr, _ in messages]
        started = time.monotonic()
        if not parts:  # empty messages only: nothing to ingest, nothing to wait for
            self._durable(txnrs, started)
            return
        inlet = self.inlet
        assert inlet is not None  # read only once admitted
        result = inlet.reader.feed(b"".join(parts), inlet.received_at())
        inlet.take(result, Ack(lambda: self._durable(txnrs, started), self._lost))
        if result.oversized:
            self._oversized(result.oversized)

    def _durable(self, txnrs: list[int], started: float) -> None:
        if self.transport is None:
            return  # gone: the sender resends what it did not see answered
        self.session.acknowledge(txnrs)
        self.relp.acked(0, time.monotonic() - started)  # counted in relp_acks once sent
        self._flush()
        if self.transport is not None:
            self.update_reading()
        if self.source.stopping:
            self.source.settled.set()

    def _lost(self) -> None:
        """A message of this session will never be durable: its answer, and so every later
        one (txnr order), would never go. Abort: the sender resends its unanswered window
        on a new session at once, instead of after its own timeout."""
        if self.transport is None:
            return  # closed already (by us or the peer): nothing waits for that answer
        self.abort(NOT_DURABLE, "a message was lost before it was durable")

    def abort(self, reason: str, why: str) -> None:
        """End the session now, without its pending answers (counted by `reason`)."""
        relp = self.relp
        relp.frame_errors[reason] = relp.frame_errors.get(reason, 0) + 1
        self.ctx.quiet.warning("relp_session_aborted", listener=self.stats.name,
                               peer=self.peer, **self.via, reason=reason, error=why,
                               unanswered=self.session.unacked,
                               action="session aborted: the sender resends what was not "
                                      "answered")
        self.discard()
        if self.source.stopping:
            self.source.settled.set()

    def discard(self) -> None:
        """Close it now, nothing more written or read; what it held is freed."""
        t = self.transport or self.draining
        if t is not None:
            t.abort()
        self.source.remove(self)
        self.transport = self.draining = None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self.session = ServerSession(self.source.max_data)  # free what it held now

    def _oversized(self, n: int) -> None:
        self.stats.oversized_frames += n  # counted always; logged rate-limited
        self.ctx.quiet.warning("frame_too_large", listener=self.stats.name, peer=self.peer,
                               **self.via, max_message_size=self.ctx.max_message_size,
                               action="discarded and acknowledged, session kept")

    def _flush(self) -> None:
        t = self.transport
        if t is None:
            return
        session = self.session
        out = session.outgoing()
        if out:
            t.write(out)
        if session.answered != self.acks_counted:
            self.relp.acks += session.answered - self.acks_counted
            self.acks_counted = session.answered
        if session.close_after_write:
            self._close(t)

    def _close(self, t: asyncio.Transport) -> None:
        """Everything is written: close. close() sends what is buffered first, then the FIN;
        it waits for a peer that reads nothing forever, so that wait is bounded."""
        self.transport = None
        self.source.closing(self)
        if self.write_blocked:
            # It reads nothing already: its last answers would never drain.
            self.draining = t
            self.discard()
            return
        t.close()
        # connection_lost comes once the buffer is written (next loop turn if it is empty)
        # and cancels the timer.
        self.draining = t
        self._grace = asyncio.get_running_loop().call_later(CLOSE_GRACE, self._undrained)

    def _undrained(self) -> None:
        self._grace = None
        if self.draining is None:
            return
        self.ctx.quiet.warning("relp_session_aborted", listener=self.stats.name,
                               peer=self.peer, **self.via, reason="answers_unread",
                               error=f"its last answers not read {CLOSE_GRACE:g} s after "
                                     "the session was closed",
                               action="connection aborted")
        self.discard()

    # -- flow control -------------------------------------------------------------------------

    @property
    def window_full(self) -> bool:
        return self.session.unacked >= self.source.max_window

    @property
    def inlet_held(self) -> bool:
        return self.inlet is not None and self.inlet.held

    def update_reading(self) -> None:
        """Read only when there is room in the window, its inlet is not held, and not
        stopping."""
        t = self.transport
        if t is None:
            return
        held = self.inlet_held
        want = not (self.window_full or held or self.source.stopping
                    or self.session.closing or self.write_blocked)
        if want == self.reading:
            if not want and not t.is_closing():
                # Paused already, as far as we know; but a pause asked in connection_made
                # does not hold on uvloop: ask again (nothing to do when it held).
                t.pause_reading()
            return
        self.reading = want
        if want:
            if not t.is_closing():
                t.resume_reading()
        else:
            t.pause_reading()
            if (self.window_full and not (held or self.write_blocked)
                    and self.inlet is not None):
                # Its sender can send nothing more until answered: close the open batch now
                # rather than after batch.idle_flush (the answers then cost one fsync).
                self.inlet.flush()

    def _repause(self) -> None:
        t = self.transport
        if t is not None and not self.reading and not t.is_closing():
            t.pause_reading()

    def pressure_changed(self, now: float) -> None:
        held = self.inlet_held
        if self.was_held and not held and self.framed:
            # Time spent held is not idleness; a session that never framed gets no credit.
            self.last_frame = max(self.last_frame, now)
        self.was_held = held
        self.update_reading()

    # -- closing for the source's reasons -----------------------------------------------------

    def drop(self) -> None:
        """Idle, evicted, no longer allowed, shutdown: the answers ready, serverclose, close."""
        if self.transport is None:
            return
        self.session.shutdown()
        self._flush()

    def shed(self) -> None:
        """Called by the budget: this session holds the most of listen.max_buffered_bytes."""
        self.stats.connections_shed += 1
        self.ctx.quiet.warning("connection_shed", listener=self.stats.name, peer=self.peer,
                               **self.via, buffered=self.buffered,
                               reason="listen.max_buffered_bytes reached")
        self.discard()


class RelpSource(StreamSource[RelpConnection]):
    """listen.relp; with relp.tls, given the daemon's ServerTls (the [tls] of listen.tls)."""

    plain_kind = tls_kind = "relp"

    def __init__(self, ctx: SourceContext, address: str, listen: ListenConfig,
                 relp: RelpConfig, tls: ServerTls | None = None) -> None:
        self.max_data = listen.max_message_size + DATA_HEADROOM
        self.max_window = relp.max_window
        self.settled = asyncio.Event()  # set by an answer during stop(): look again
        super().__init__(ctx, address, listen, tls)
        self.relp = self.stats.relp = RelpCounters()

    def configure(self, settings: Settings) -> None:
        """SIGHUP: relp.max_window (a narrower one pauses open sessions sooner), then the
        listen.* limits and TLS names, as every stream listener."""
        self.max_window = settings.relp.max_window
        for conn in self.connections:
            conn.update_reading()
        super().configure(settings)

    def describe(self, settings: Settings) -> dict[str, Any]:
        return {"max_window": self.max_window, "tls": self.tls, **super().describe(settings)}

    # -- admission ----------------------------------------------------------------------------

    def admit(self, transport: asyncio.BaseTransport, peer: str, address: str) -> bool:
        return not self.stopping and super().admit(transport, peer, address)

    def connection(self) -> asyncio.Protocol:
        return RelpConnection(self)

    def closing(self, conn: RelpConnection) -> None:
        """`conn` is closed by us and drains its last bytes: no longer a session (idle sweep,
        eviction, the budget), still counted (connections, per address) until its socket is
        closed (remove)."""
        self.frameless.pop(conn, None)
        self.ctx.budget.release(conn)

    def remove(self, conn: RelpConnection) -> None:
        super().remove(conn)
        if self.stopping:
            self.settled.set()

    def evict_one(self) -> bool:
        """At max_connections: the session that never framed, else the longest idle, goes;
        not one whose messages wait for their answer, nor a framed one whose inlet is held.
        A session closed by us still draining its last answers goes first (aborted)."""
        for c in self.connections:
            if c.draining is not None:
                c.discard()
                return True
        candidates = [c for c in self.frameless if c.transport is not None]
        if not candidates:
            candidates = [c for c in self.connections
                          if c.transport is not None and not c.session.unacked
                          and not c.inlet_held]
        if not candidates:
            return False
        oldest = candidates[0] if not candidates[0].framed else min(
            candidates, key=lambda c: c.last_frame)
        return self.evict(oldest)

    # -- lifecycle ----------------------------------------------------------------------------

    def _sweep(self) -> None:
        """listen.idle_timeout: sessions with no complete frame for that long, and nothing
        waiting for an answer (a full window is not idleness), get serverclose."""
        if self.stopping:
            return
        now = time.monotonic()
        limit = now - self.idle_timeout
        for conn in [c for c in self.connections if c.transport is not None
                     and c.last_frame < limit and not c.session.unacked
                     and not c.inlet_held]:
            self.idle_close(conn)
        # Not read any more since its `close`: a sender gone meanwhile would not be seen.
        deadline = now - min(CLOSE_DEADLINE, self.idle_timeout)
        for conn in [c for c in self.connections if c.transport is not None
                     and c.closing_since is not None and c.closing_since < deadline]:
            conn.abort(CLOSE_TIMEOUT, "`close` still waiting for earlier answers after "
                       f"{min(CLOSE_DEADLINE, self.idle_timeout):g} s")
        self._schedule_sweep()

    @property
    def unacked(self) -> int:
        return sum(c.session.unacked for c in self.connections)

    async def stop(self, grace: float) -> None:
        """Stop reading; answer what becomes durable within `grace`; then serverclose.

        Messages still unanswered then are the sender's to resend to the next forwarder
        (duplicates at worst: they may be in the spool already)."""
        self._stop_accepting()  # handshakes under way: no RELP session yet, nothing to answer
        for conn in list(self.connections):
            conn.update_reading()
        for conn in self.connections:
            if conn.session.unacked and conn.inlet is not None:
                conn.inlet.flush()  # nothing more will come in: answers after one fsync
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.unacked and loop.time() < deadline:
            self.settled.clear()
            try:
                await asyncio.wait_for(self.settled.wait(), deadline - loop.time())
            except TimeoutError:
                break
        for conn in list(self.connections):
            conn.drop()
        self.ctx.quiet.flush()
