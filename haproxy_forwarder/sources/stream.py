"""The stream listener: what TCP syslog and RELP share, TLS included as an option.

The connections, per peer address and in connect order while they never completed a frame;
the checks at accept (descriptors, listen.allow, listen.max_connections_per_address, then
listen.max_connections); the server socket; the idle sweep's timer; and, given the daemon's
ServerTls, a TLS layer (sources/tls.py) in front of every connection, so TLS is a setting of
a listener and not a kind of its own; with listen.proxy_protocol, a PROXY layer
(sources/proxylayer.py) below it, so the connection stands for the sender the balancer
names. What differs by protocol (the connection's protocol object, which connection to evict,
what idleness means, how to stop) is the subclasses'.

Each connection, once its origin is known (after the PROXY header and the TLS handshake),
gets its `Inlet` (SourceContext.inlet): its reader and where its events go. Backpressure is
per inlet: on every change `Backpressure` announces, each connection pauses if its inlet is
held and resumes otherwise, so only the senders routed to a lagging intake wait.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from ..config import ListenConfig, Settings
from ..observability.counters import ListenerCounters
from ..observability.descriptors import Descriptors
from ..routing import Origin
from ..tlscontext import ServerTls, peer_names
from .base import SourceContext, listener_name, split_hostport
from .guard import Allow, Holder
from .proxylayer import ProxyGate, ProxyLayer, stands_for_balancer, via_of
from .tls import TlsGate, TlsLayer


class StreamConnection(Holder, Protocol):
    """A connection as its listener's bookkeeping (and the budget) sees it."""

    peer: str
    address: str
    # {"via": the balancer} behind a PROXY header, else {}: extra fields of its log lines.
    via: dict[str, str]
    last_frame: float
    framed: bool

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def inlet_held(self) -> bool:
        """Its inlet says wait (its intake's delivery is full)."""
        ...

    def pressure_changed(self, now: float) -> None:
        """`Backpressure` announced a change: pause if its inlet is held, else resume."""
        ...

    def drop(self) -> None: ...


C = TypeVar("C", bound=StreamConnection)


class StreamSource(Generic[C]):
    # Its kind (the listen.<kind> setting it comes from, the scheme of its `listener`
    # label): without TLS, and with it.
    plain_kind = "tcp"
    tls_kind = "tls"

    def __init__(self, ctx: SourceContext, address: str, listen: ListenConfig,
                 tls: ServerTls | None = None) -> None:
        self.ctx = ctx
        self.kind = self.tls_kind if tls is not None else self.plain_kind
        self.address = address  # as the config lists it: the ListenerSet's key
        self.host, self.port = split_hostport(address)
        self.connections: set[C] = set()
        self.per_address: dict[str, int] = {}
        # Connections that never completed a frame, oldest first: the first to be evicted,
        # found in O(1) however fast a flood connects.
        self.frameless: dict[C, None] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.stopping = False
        # Its `listener` label gets the bound port at start() (port 0 in tests), and it is
        # shown from then on: a listener that failed to bind has no series.
        self.stats = ListenerCounters(listener_name(self.kind, self.host, self.port))
        # With TLS: the screen runs before the handshake, which counts against the caps.
        self.gate = (TlsGate(tls, self.stats, ctx.quiet, ctx.log, screen=self.screen)
                     if tls is not None else None)
        self.descriptors = Descriptors(ctx.counters, ctx.quiet)
        # listen.proxy_protocol: set by limit(), as it may change on SIGHUP.
        self.proxy = ProxyGate(self.stats, ctx.quiet)
        self.limit(listen)
        ctx.pressure.subscribe(self._on_pressure)

    @property
    def tls(self) -> bool:
        return self.gate is not None

    def configure(self, settings: Settings) -> None:
        """SIGHUP: the listen.* limits, and a narrowed tls.client_ca_file or
        tls.allowed_names applied to the peers already connected, as a narrowed
        listen.allow is (the new TLS settings are in force in the ServerTls already)."""
        self.limit(settings.listen)
        if self.gate is not None:
            self.gate.recheck(self.connections)

    def describe(self, settings: Settings) -> dict[str, Any]:
        """The fields of its `listening` line."""
        if self.gate is None:
            return {}
        return {"client_certificates": settings.tls.client_ca_file is not None}

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def limit(self, listen: ListenConfig) -> None:
        """The listen.* limits, at start and on SIGHUP."""
        self.max_connections = listen.max_connections
        self.max_connections_per_address = listen.max_connections_per_address
        self.idle_timeout = listen.idle_timeout
        self.allow = Allow(listen.allow)
        self.ctx.budget.cap = listen.max_buffered_bytes
        self.proxy.configure(listen.proxy_protocol, listen.idle_timeout)
        # A narrowed allow-list also applies to the peers already connected (not to a
        # balancer's own connections: listen.proxy_protocol vouches for those).
        for conn in [c for c in self.connections
                     if c.transport is not None and not self.allow.permits(c.address)
                     and not stands_for_balancer(c.transport)]:
            self.stats.access_denied += 1
            self.ctx.quiet.warning("connection_denied", listener=self.stats.name,
                                   peer=conn.peer, **conn.via,
                                   reason="not in listen.allow (reload)")
            conn.drop()

    def _on_pressure(self, on: bool) -> None:
        # `on` is whether any intake lags; each connection asks its own inlet.
        now = time.monotonic()
        for conn in list(self.connections):
            conn.pressure_changed(now)

    def origin(self, transport: asyncio.BaseTransport, source: str) -> Origin:
        """A connection as the routes see it: this listener, its sender's address (the
        PROXY header's source behind a balancer), its verified client certificate's names."""
        cert = transport.get_extra_info("peercert")
        names = tuple(peer_names(cert)) if cert else ()
        return Origin(listener=self.stats.name, address=self.address, source=source,
                      tls_names=names)

    # -- admission --------------------------------------------------------------------------------

    def screen(self, transport: asyncio.BaseTransport, peer: str, address: str) -> bool:
        """The checks that cost nothing: descriptors left, listen.allow, the per-address cap.
        False: counted and logged; the caller aborts. TLS runs them before its handshake."""
        c = self.stats
        if not self.descriptors.admit(transport, c.name):
            return False
        if not self.allow.permits(address) and not stands_for_balancer(transport):
            c.access_denied += 1
            self.ctx.quiet.warning("connection_denied", listener=c.name, peer=peer,
                                   **via_of(transport), reason="not in listen.allow")
            return False
        if self.held(address) >= self.max_connections_per_address:
            c.connections_refused += 1
            self.ctx.quiet.warning("connection_refused", listener=c.name, peer=peer,
                                   **via_of(transport),
                                   reason="listen.max_connections_per_address reached")
            return False
        return True

    def admit(self, transport: asyncio.BaseTransport, peer: str, address: str) -> bool:
        """`screen`, then a slot under listen.max_connections (evicting if need be)."""
        if not self.screen(transport, peer, address):
            return False
        if len(self.connections) >= self.max_connections and not self.evict_one():
            # Refuse instead of buffering: an unbounded number of paused connections is
            # how peers ran out of memory (Vector #8238).
            self.stats.connections_refused += 1
            self.ctx.quiet.warning("connection_refused", listener=self.stats.name, peer=peer,
                                   **via_of(transport), reason="listen.max_connections reached")
            return False
        return True

    def held(self, address: str) -> int:
        """Connections `address` holds, as listen.max_connections_per_address counts them:
        with TLS its handshakes in progress too (one host cannot take every handshake slot)."""
        n = self.per_address.get(address, 0)
        if self.gate is not None:
            n += self.gate.pending_by_address.get(address, 0)
        return n

    def evict_one(self) -> bool:
        raise NotImplementedError

    def evict(self, conn: C) -> bool:
        """Close `conn` to make room at listen.max_connections (counted, logged)."""
        self.stats.connections_evicted += 1
        self.ctx.quiet.warning("connection_evicted_idle", listener=self.stats.name,
                               peer=conn.peer, **conn.via,
                               idle=round(time.monotonic() - conn.last_frame, 1),
                               complete_frames=conn.framed,
                               reason="listen.max_connections reached")
        conn.drop()
        return True

    def idle_close(self, conn: C) -> None:
        """listen.idle_timeout: no complete frame from `conn` for that long."""
        self.stats.connections_idle_closed += 1
        self.ctx.quiet.warning("connection_idle_closed", listener=self.stats.name,
                               peer=conn.peer, **conn.via, idle_timeout=self.idle_timeout)
        conn.drop()

    def add(self, conn: C) -> None:
        self.connections.add(conn)
        self.frameless[conn] = None
        self.per_address[conn.address] = self.per_address.get(conn.address, 0) + 1

    def remove(self, conn: C) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.frameless.pop(conn, None)
        self.ctx.budget.release(conn)
        n = self.per_address.get(conn.address, 0) - 1
        if n > 0:
            self.per_address[conn.address] = n
        else:
            self.per_address.pop(conn.address, None)

    # -- lifecycle --------------------------------------------------------------------------------

    def connection(self) -> asyncio.Protocol:
        """One accepted connection's protocol object, plain or behind the TLS layer."""
        raise NotImplementedError

    def protocol(self) -> asyncio.Protocol:
        """The factory given to create_server: with listen.proxy_protocol, the PROXY layer
        first (the header is first on the wire); with TLS, the TLS layer next; the
        connection's own protocol only once the header was read and the handshake and the
        name check passed. A reload's listen.proxy_protocol applies from the next accept."""
        inner: Callable[[], asyncio.Protocol] = self.connection
        if self.gate is not None:
            inner = functools.partial(TlsLayer, self.gate, self.connection)
        if self.proxy.enabled:
            return ProxyLayer(self.proxy, inner)
        return inner()

    async def stop(self, grace: float) -> None:
        raise NotImplementedError

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.protocol, self.host, self.port, reuse_address=True, backlog=1024
        )
        addr = self._server.sockets[0].getsockname()
        self.stats.name = listener_name(self.kind, addr[0], addr[1])
        self.ctx.counters.add_listener(self.stats)
        self._schedule_sweep()
        return addr[0], addr[1]

    @property
    def name(self) -> str:
        return self.stats.name

    @property
    def listening(self) -> bool:
        """Bound and accepting: False before start(), after stop(), or if the socket closed."""
        return self._server is not None and self._server.is_serving()

    @property
    def down(self) -> bool:
        """Started, not stopped by us, and yet not accepting any more."""
        return self._server is not None and not self.stopping and not self._server.is_serving()

    def _schedule_sweep(self) -> None:
        # Often enough that a connection outlives idle_timeout by a tenth at most.
        delay = min(max(self.idle_timeout / 10, 0.05), 5.0)
        self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        raise NotImplementedError

    def _stop_accepting(self) -> None:
        """First step of stop(): no more sweeps, accepts, handshakes, pressure calls."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        # A listener closed by a reload must not stay subscribed (kept alive, called).
        self.ctx.pressure.unsubscribe(self._on_pressure)
        if self._server is not None:
            self._server.close()
        self.proxy.close_pending()  # waiting for their PROXY header: nothing of theirs read
        if self.gate is not None:
            self.gate.close_pending()  # handshakes: nothing of theirs was read yet
