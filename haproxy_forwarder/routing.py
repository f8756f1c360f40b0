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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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


def check_routes(routes: Sequence[Route], intakes: Sequence[str], programs: Sequence[str],
                 listeners: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a route table, one line each, naming the route ("routes[2]",
    counted from 1 in config order). Problems (the config is refused): a route to an intake
    not in `intakes`; a listener matcher naming no listener of `listeners` ((kind, address)
    as the config lists them); a program prefix no event passing `programs` (filter.programs)
    can have; a route that can never match because an earlier one covers it. Warnings: an
    intake no route reaches."""
    return [], []  # TODO(issue 19): filled in by the routing work
