"""Routes: which intake an event goes to, by where it came from and its program. Pure.

A route table is the ordered `[[routes]]` of the config; the first route whose every matcher
matches wins. Matchers: `listener` (a listener's name, "tcp://0.0.0.0:1514", or its address
as the config lists it, "0.0.0.0:1514", which names every kind on it), `source` (CIDR blocks
holding the sender's address: the PROXY-protocol source when there is one), `tls_name`
(patterns on the client certificate's CN or DNS SANs, as tls.allowed_names), `program`
(prefixes of the program name). An empty matcher matches anything; a route with none is a
catch-all (the default route). The target is an intake's name, or nothing (`drop = true`).
An event no route matches is not delivered either, and counted as such.

Only what the config lists chooses an intake (vectordotdev/vector#25820): the connection's
listener, its sender address and certificate, and the program the filter already reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from .tlscontext import name_allowed

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

# Why an event is not delivered: a `drop = true` route matched it, or no route did.
UnroutedReason = Literal["drop", "no_route"]


@dataclass(frozen=True, slots=True)
class Route:
    """One `[[routes]]` entry; `intake` None is `drop = true`."""

    listener: tuple[str, ...] = ()
    source: tuple[Network, ...] = ()
    tls_name: tuple[str, ...] = ()
    program: tuple[str, ...] = ()
    intake: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where events go: `intake` (a name), or nowhere (`intake` None) for `why`."""

    intake: str | None
    why: UnroutedReason | None = None


@dataclass(frozen=True, slots=True)
class Origin:
    """A connection (or datagram) as routes see it."""

    listener: str  # its name: "tcp://127.0.0.1:1514"
    address: str  # as the config lists it: "127.0.0.1:1514"
    source: str  # the sender's address (the PROXY-protocol source behind a balancer)
    tls_names: tuple[str, ...] = ()  # CN and DNS SANs of a verified client certificate


# Targets that deliver nothing, and why: shared, as every decision hands the same ones out.
DROP = Target(None, "drop")
NO_ROUTE = Target(None, "no_route")

# The kinds of listener a name can have ("tcp://..."): the sections of [listen].
KINDS = ("tcp", "udp", "tls", "relp")

# An address as routes compare them: (host, port), the host an IP address in its compressed
# form ("[::1]" and "::1" alike) or a lower-case host name.
Address = tuple[str, int]
# A listener matcher read: (kind, address); kind None for an address alone (every kind).
ListenerKey = tuple[str | None, Address]


def _address(value: str) -> Address | None:
    """`host:port` (IPv6 in brackets or not) as routes compare it; None if it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        host = host.lower()
    return host, int(port)


def listener_key(value: str) -> ListenerKey | None:
    """A listener matcher, "tcp://0.0.0.0:1514" or "0.0.0.0:1514", read; None: it is
    neither (an unknown kind, no port), so it matches no listener."""
    kind: str | None = None
    if "://" in value:
        kind, _, value = value.partition("://")
        kind = kind.lower()
        if kind not in KINDS:
            return None
    address = _address(value)
    return None if address is None else (kind, address)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv4-mapped IPv6 addresses: how a dual-stack socket ("[::]:1514") spells an IPv4 peer.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _source_address(source: str) -> tuple[IPAddress, ...]:
    """The sender's address as routes compare it: an IPv4 peer is its IPv4 address, whether
    the socket spelled it "10.0.0.1" or "::ffff:10.0.0.1"; () if `source` is no IP address
    (a unix socket path): then no source matcher matches."""
    try:
        ip = ipaddress.ip_address(source.strip("[]"))
    except ValueError:
        return ()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    return (ip,)


def source_network(network: Network) -> Network:
    """A source matcher as routes compare it: a block of IPv4-mapped addresses
    ("::ffff:10.0.0.0/104") is that IPv4 block (10.0.0.0/8), as the senders in it are IPv4
    peers. ("::/0" is then IPv6 senders only, as "0.0.0.0/0" is IPv4 ones.)"""
    if (isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96
            and network.subnet_of(_MAPPED)):
        base = network.network_address.ipv4_mapped
        assert base is not None
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


@dataclass(frozen=True, slots=True)
class _OriginKeys:
    """An origin, read once for every route: its kind and the addresses it is known by."""

    kind: str
    addresses: frozenset[Address]
    sources: tuple[IPAddress, ...]
    tls_names: tuple[str, ...]

    @classmethod
    def of(cls, origin: Origin) -> _OriginKeys:
        kind, sep, named = origin.listener.partition("://")
        found = {_address(origin.address), _address(named) if sep else None}
        return cls(kind.lower() if sep else "", frozenset(a for a in found if a is not None),
                   _source_address(origin.source), origin.tls_names)


@dataclass(frozen=True, slots=True)
class _Rule:
    """A route read for matching."""

    listeners: tuple[ListenerKey | None, ...]
    sources: tuple[Network, ...]
    tls_names: list[str]
    programs: tuple[str, ...]
    target: Target

    @classmethod
    def of(cls, route: Route) -> _Rule:
        target = DROP if route.intake is None else Target(route.intake)
        return cls(tuple(listener_key(v) for v in route.listener),
                   tuple(source_network(n) for n in route.source), list(route.tls_name),
                   route.program, target)

    def origin_matches(self, o: _OriginKeys) -> bool:
        """Every matcher but `program` matches."""
        if self.listeners and not any(
                key is not None and (key[0] is None or key[0] == o.kind)
                and key[1] in o.addresses for key in self.listeners):
            return False
        if self.sources and not any(ip in net for ip in o.sources for net in self.sources):
            return False
        # name_allowed: no pattern matches a peer without names (no certificate).
        return not self.tls_names or name_allowed(o.tls_names, self.tls_names)


class Decision:
    """The routes, once the origin is known: what is left to decide by program.

    `fixed` is the target of every event of this origin when its program cannot change it
    (then `target` returns it at once). `intakes` holds every intake this origin's events
    can reach: the ones whose backpressure holds its connection."""

    __slots__ = ("_otherwise", "_rules", "fixed", "intakes")

    def __init__(self, rules: Sequence[tuple[tuple[str, ...], Target]],
                 otherwise: Target) -> None:
        self._rules = tuple(rules)
        self._otherwise = otherwise
        self.fixed: Target | None = None if self._rules else otherwise
        self.intakes: frozenset[str] = frozenset(
            t.intake for t in (otherwise, *(target for _, target in self._rules))
            if t.intake is not None)

    def target(self, program: str) -> Target:
        """Where an event of this origin with `program` goes: the first route left whose
        prefixes `program` starts with, else what the origin alone decides."""
        if self.fixed is not None:
            return self.fixed
        for prefixes, target in self._rules:
            if program.startswith(prefixes):
                return target
        return self._otherwise

    def __repr__(self) -> str:
        return f"Decision(rules={self._rules!r}, otherwise={self._otherwise!r})"


class Table:
    """A route table (the ordered `[[routes]]`): `decide(origin)` once per connection (or
    datagram sender), then `Decision.target(program)` per event.

    Decisions are kept by origin (at most `cache_size`, the oldest forgotten first): a UDP
    sender's datagrams, or a sender reconnecting, cost a dict look-up."""

    __slots__ = ("_cache", "_rules", "cache_size", "intakes", "routes")

    def __init__(self, routes: Sequence[Route], cache_size: int = 4096) -> None:
        self.routes = tuple(routes)
        self._rules = tuple(_Rule.of(r) for r in self.routes)
        # Every intake a route names (the ones a decision can reach are among them).
        self.intakes: frozenset[str] = frozenset(
            r.intake for r in self.routes if r.intake is not None)
        self.cache_size = max(1, cache_size)
        self._cache: dict[Origin, Decision] = {}

    def decide(self, origin: Origin) -> Decision:
        decision = self._cache.get(origin)
        if decision is None:
            decision = self._decide(_OriginKeys.of(origin))
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[origin] = decision
        return decision

    def _decide(self, o: _OriginKeys) -> Decision:
        rules: list[tuple[tuple[str, ...], Target]] = []
        earlier: tuple[str, ...] = ()  # prefixes of the routes left so far
        otherwise = NO_ROUTE
        for rule in self._rules:
            if not rule.origin_matches(o):
                continue
            if not rule.programs:
                otherwise = rule.target  # no later route is ever reached
                break
            # A prefix starting with an earlier one is shadowed by it: those events went there.
            live = tuple(p for p in rule.programs if not p.startswith(earlier))
            earlier += rule.programs
            if live:
                rules.append((live, rule.target))
        # Last routes that send where the rest goes anyway change nothing.
        while rules and rules[-1][1] == otherwise:
            rules.pop()
        return Decision(rules, otherwise)


# -- the check of a route table (config validation, check-config) ----------------------------

def _quoted(values: Iterable[str]) -> str:
    return ", ".join(f'"{v}"' for v in values)


def _listener_name(kind: str, address: str) -> str:
    host = address.rpartition(":")[0]
    if ":" in host and not host.startswith("["):  # a bare IPv6 address: bracketed in a name
        return f"{kind}://[{host}]:{address.rpartition(':')[2]}"
    return f"{kind}://{address}"


def _listener_covers(a: ListenerKey | None, b: ListenerKey | None, a_raw: str,
                     b_raw: str) -> bool:
    if a is None or b is None:
        return a is None and b is None and a_raw == b_raw  # both match nothing
    return a[1] == b[1] and (a[0] is None or a[0] == b[0])


def _tls_covers(a: str, b: str) -> bool:
    """Every name pattern `b` matches, `a` matches: the same pattern, or `b` a plain name."""
    if a.lower() == b.lower():
        return True
    return "*" not in b and "?" not in b and name_allowed([b], [a])


def _source_covers(a: Network, b: Network) -> bool:
    a, b = source_network(a), source_network(b)
    return a.version == b.version and b.subnet_of(a)  # type: ignore[arg-type]


def _all_covered(a: Sequence[T], b: Sequence[T], within: Callable[[T, T], bool]) -> bool:
    """One matcher: `a`'s is empty (anything), or `b`'s is not and each value of `b` is
    within some value of `a`."""
    if not a:
        return True
    return bool(b) and all(any(within(x, y) for x in a) for y in b)


def _program_covers(a: str, b: str) -> bool:
    return b.startswith(a)


def _listener_value_covers(a: str, b: str) -> bool:
    return _listener_covers(listener_key(a), listener_key(b), a, b)


def covers(a: Route, b: Route) -> bool:
    """Every event `b` matches, `a` matches too: each matcher of `a` is empty, or `b`'s is not
    and each of its values is within one of `a`'s (an address holds the names of every kind
    on it, a CIDR its subnets, a name pattern itself and the plain names it matches, a program
    prefix the longer ones). True is certain; False may miss a cover that takes several of
    `a`'s values together."""
    return (_all_covered(a.listener, b.listener, _listener_value_covers)
            and _all_covered(a.source, b.source, _source_covers)
            and _all_covered(a.tls_name, b.tls_name, _tls_covers)
            and _all_covered(a.program, b.program, _program_covers))


def is_catch_all(route: Route) -> bool:
    """A route without matchers: it takes every event that reaches it."""
    return not (route.listener or route.source or route.tls_name or route.program)


def check_routes(routes: Sequence[Route], intakes: Sequence[str], programs: Sequence[str],
                 listeners: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a route table, one line each, naming the route ("routes[2]",
    counted from 1 in config order). Problems (the config is refused): a route to an intake
    not in `intakes`; a listener matcher naming no listener of `listeners` ((kind, address)
    as the config lists them); a program prefix no event passing `programs` (filter.programs)
    can have; a route that can never match because an earlier one covers it (`covers`: a
    catch-all before the last route is one). Warnings: a `drop = true` route (its events are
    counted); an intake no route reaches."""
    problems: list[str] = []
    warnings: list[str] = []
    configured = {key for kind, address in listeners
                  if (key := listener_key(f"{kind}://{address}")) is not None}
    configured_addresses = {address for _, address in configured}
    names = _quoted(_listener_name(kind, address) for kind, address in listeners)
    for n, route in enumerate(routes, 1):
        at = f"routes[{n}]"
        if route.intake is not None and route.intake not in intakes:
            problems.append(f"{at}: intake \"{route.intake}\" is not defined "
                            f"([intakes.{route.intake}] missing; defined: {_quoted(intakes)})")
        for value in route.listener:
            key = listener_key(value)
            known = key is not None and (
                key in configured if key[0] is not None else key[1] in configured_addresses)
            if not known:
                problems.append(
                    f"{at}: listener \"{value}\" names no listener of listen.tcp, listen.udp, "
                    f"listen.tls or listen.relp; write one of {names or '(none)'} (KIND://"
                    "HOST:PORT), or its HOST:PORT alone for every kind on that address")
        for prefix in route.program:
            if not any(prefix.startswith(f) or f.startswith(prefix) for f in programs):
                problems.append(
                    f"{at}: program \"{prefix}\" can never match: filter.programs "
                    f"({_quoted(programs)}) lets no such program through; add a prefix of it "
                    "to filter.programs, or correct the route")
        for m, earlier in enumerate(routes[:n - 1], 1):
            if not covers(earlier, route):
                continue
            if is_catch_all(earlier):
                problems.append(
                    f"{at}: can never match: routes[{m}] before it is a catch-all (no "
                    "listener, source, tls_name or program) and takes every event first; "
                    "a catch-all must be the last route")
            else:
                problems.append(
                    f"{at}: can never match: routes[{m}] before it matches every event it "
                    f"would (each of its matchers is empty or wider); move {at} before "
                    f"routes[{m}], or remove it")
            break
        if route.intake is None:
            warnings.append(f"{at}: drop = true: the events it matches are discarded, "
                            "counted as unrouted_events{reason=\"drop\"}")
    reached = {r.intake for r in routes}
    for name in intakes:
        if name not in reached:
            warnings.append(f"intakes.{name}: no route sends events to it; add a [[routes]] "
                            f"entry with intake = \"{name}\", or remove [intakes.{name}]")
    return problems, warnings


# -- the table as check-config prints it -----------------------------------------------------

ANY = "*"
NO_ROUTE_LINE = "dropped, counted as unrouted_events{reason=\"no_route\"}"


def _network_text(network: Network) -> str:
    """A CIDR as written: IPv4-mapped ones in dotted form ("::ffff:10.0.0.0/104")."""
    v4 = source_network(network)
    if v4 is not network:
        return f"::ffff:{v4.network_address}/{network.prefixlen}"
    return str(network)


def _target_text(route: Route) -> str:
    if route.intake is None:
        return "dropped (drop = true), counted as unrouted_events{reason=\"drop\"}"
    return route.intake


def describe(routes: Sequence[Route]) -> list[str]:
    """The route table as aligned lines: `routes[N]`, listener, source, tls name, program
    (`*`: any) → the intake (or dropped), in order; then what no route matches, unless the
    last route is a catch-all."""
    rows = [[f"routes[{n}]", ", ".join(r.listener) or ANY,
             ", ".join(_network_text(net) for net in r.source) or ANY,
             ", ".join(r.tls_name) or ANY, ", ".join(r.program) or ANY]
            for n, r in enumerate(routes, 1)]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
             + f" → {_target_text(route)}" for row, route in zip(rows, routes, strict=True)]
    if not routes or not is_catch_all(routes[-1]):
        width = sum(widths) + 2 * (len(widths) - 1)
        lines.append(f"{'(no route)'.ljust(width)} → {NO_ROUTE_LINE}")
    return lines
