"""Every listener of the daemon behind one interface, and the set of them a config asks for.

A listener is known by its kind (the `listen.<kind>` setting it comes from) and its address
as the config writes it. `ListenerSet` holds the running ones: `build` makes what a config
lists, `diff` says (as multisets: an address listed twice is two listeners) what a new
config adds and removes, `open` binds additions and undoes them all if one cannot be bound,
`drain` closes removals as at shutdown. Start-up, SIGHUP, shutdown, the gauges and /healthz
all go through it: a new kind of listener is one entry in `KINDS`.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from ..config import Settings, TlsConfig
from ..tlscontext import ServerTls
from .base import SourceContext, split_hostport
from .relp import RelpSource
from .tcp import TcpSource
from .udp import UdpSource

# (kind, address as the config lists it)
Key = tuple[str, str]


class Listener(Protocol):
    """One bound socket of listen.tcp / tls / relp / udp, as the daemon drives it."""

    kind: str
    address: str  # as the config lists it
    host: str  # of `address`
    port: int  # of `address` (0: any; `start` says which one was bound)

    @property
    def name(self) -> str:
        """Its `listener` label (kind://host:port, the bound port once started)."""
        ...

    @property
    def listening(self) -> bool:
        """Bound and accepting (or reading)."""
        ...

    @property
    def down(self) -> bool:
        """Started, not stopped by us, and yet closed."""
        ...

    @property
    def open_connections(self) -> int | None:
        """Connections open now; None for a kind without connections (UDP)."""
        ...

    async def start(self) -> tuple[str, int]:
        """Bind; the address bound. OSError if it cannot be."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop accepting; what senders already wrote is read for up to `grace` seconds."""
        ...

    def configure(self, settings: Settings) -> None:
        """Apply the settings of its own that SIGHUP may change."""
        ...

    def describe(self, settings: Settings) -> dict[str, Any]:
        """The fields of its `listening` line beside kind and address."""
        ...


def _tcp(ctx: SourceContext, address: str, s: Settings) -> Listener:
    return TcpSource(ctx, address, s.listen)


def _tls(ctx: SourceContext, address: str, s: Settings) -> Listener:
    return TcpSource(ctx, address, s.listen, ctx.server_tls)


def _relp(ctx: SourceContext, address: str, s: Settings) -> Listener:
    # relp.tls is restart-only: a reload's settings keep the running value, so listeners
    # added by SIGHUP speak what the ones started with do.
    return RelpSource(ctx, address, s.listen, s.relp, ctx.server_tls if s.relp.tls else None)


def _udp(ctx: SourceContext, address: str, s: Settings) -> Listener:
    return UdpSource(ctx, address, s.listen)


# In start-up order: the stream listeners first, as before (UDP last).
KINDS: dict[str, Callable[[SourceContext, str, Settings], Listener]] = {
    "tcp": _tcp,
    "tls": _tls,
    "relp": _relp,
    "udp": _udp,
}


def wanted(settings: Settings) -> list[Key]:
    """Every listener `settings` lists, in start-up order."""
    return [(kind, address) for kind in KINDS
            for address in getattr(settings.listen, kind)]


def diff(old: Settings, new: Settings) -> tuple[list[Key], list[Key]]:
    """(added, removed) between two configs, as multisets of (kind, address)."""
    a, b = Counter(wanted(old)), Counter(wanted(new))
    return list((b - a).elements()), list((a - b).elements())


class ListenError(Exception):
    """Addresses of the config that cannot be bound (in use, not on this host, no such
    name): a configuration problem (exit 2 at start-up, the reload refused on SIGHUP), one
    line per address in `problems`, naming the setting and the address."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def bind_problem(setting: str, host: str, port: int, exc: OSError) -> str:
    """The line for an address that cannot be bound."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # uvloop wraps the errno text in a sentence of its own, or gives none (UDP).
    err = exc.__cause__ if not exc.errno and isinstance(exc.__cause__, OSError) else exc
    reason = (os.strerror(err.errno) if err.errno and err.errno > 0
              else err.strerror or str(err))
    return f"{setting} {address}: cannot bind: {reason}"


class ListenerSet:
    """The running listeners, keyed by (kind, address)."""

    def __init__(self, context: SourceContext) -> None:
        self.context = context
        self._members: list[Listener] = []

    def __iter__(self) -> Iterator[Listener]:
        return iter(list(self._members))

    def __len__(self) -> int:
        return len(self._members)

    def build(self, keys: Iterable[Key], settings: Settings) -> list[Listener]:
        """New listeners for `keys` (not started, not members yet)."""
        return [KINDS[kind](self.context, address, settings) for kind, address in keys]

    @staticmethod
    async def open(additions: list[Listener]) -> list[tuple[Listener, str, int]]:
        """Bind every one of `additions`: (listener, host, port) each, not members yet
        (`add` makes them so). If any cannot be bound, every one of them is closed again and
        ListenError names each address that failed: all or nothing."""
        opened: list[tuple[Listener, str, int]] = []
        problems: list[str] = []
        for listener in additions:
            try:
                host, port = await listener.start()
            except OSError as exc:
                # Never listening; stop() also ends what it subscribed to (backpressure).
                await listener.stop(0.0)
                problems.append(bind_problem(f"listen.{listener.kind}",
                                             *split_hostport(listener.address), exc))
                continue
            opened.append((listener, host, port))
        if problems:
            await asyncio.gather(*(listener.stop(0.0) for listener, _, _ in opened))
            raise ListenError(problems)
        return opened

    def add(self, listeners: Iterable[Listener]) -> None:
        self._members.extend(listeners)

    def take_out(self, keys: Iterable[Key]) -> list[Listener]:
        """Remove (no longer members, still open) one listener per key."""
        out: list[Listener] = []
        for key in keys:
            for listener in self._members:
                if (listener.kind, listener.address) == key:
                    self._members.remove(listener)
                    out.append(listener)
                    break
        return out

    @staticmethod
    async def drain(removals: Iterable[Listener], grace: float) -> None:
        """Close `removals` as at shutdown: no more accepts, a FIN, then what senders
        already wrote is read, for up to `grace` seconds."""
        await asyncio.gather(*(listener.stop(grace) for listener in removals))

    def configure(self, settings: Settings) -> None:
        """SIGHUP: the program filter every reader holds (open connections follow from their
        next chunk, a frame cut across the reload included), then each listener's own."""
        self.context.filter.update(settings.filter.programs, settings.filter.keep_tag)
        for listener in self._members:
            listener.configure(settings)

    def swap_tls(self, context: ssl.SSLContext, tls: TlsConfig) -> tuple[bool, ServerTls]:
        """New handshakes from now on use `context` (open connections keep theirs): whether
        the files changed, and the settings before, for `restore_tls` (a refused reload)."""
        before = self.context.server_tls.copy()
        return self.context.server_tls.install(context, tls), before

    def restore_tls(self, before: ServerTls) -> None:
        self.context.server_tls.restore(before)

    @property
    def tls_fingerprint(self) -> str:
        return self.context.server_tls.fingerprint

    def connections(self) -> dict[str, float]:
        """The connections_open gauge: per listener that has connections."""
        return {listener.name: float(n) for listener in self._members
                if (n := listener.open_connections) is not None}

    def up(self) -> dict[str, float]:
        """The listener_up gauge."""
        return {listener.name: float(listener.listening) for listener in self._members}

    def down(self) -> list[str]:
        return [listener.name for listener in self._members if listener.down]

    def unbound(self) -> list[str]:
        return [listener.name for listener in self._members if not listener.listening]

