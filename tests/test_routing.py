"""routing.py: which intake an event goes to (Table, Decision), the check of a route table
(check_routes) and the table as check-config prints it (describe).

The two Hypothesis properties hold the table to a naive reading of the rules (every route in
order, first match wins), over every origin and program of a small universe.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_forwarder.routing import (
    DROP,
    NO_ROUTE,
    Origin,
    Route,
    Table,
    Target,
    check_routes,
    covers,
    describe,
)
from haproxy_forwarder.tlscontext import name_allowed


def net(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def origin(listener: str = "tcp://127.0.0.1:1514", address: str = "127.0.0.1:1514",
           source: str = "10.1.2.3", tls_names: tuple[str, ...] = ()) -> Origin:
    return Origin(listener, address, source, tls_names)


def to(intake: str) -> Target:
    return Target(intake)


def route_of(table: Sequence[Route], o: Origin, program: str = "haproxy") -> Target:
    return Table(table).decide(o).target(program)


# -- Table and Decision ---------------------------------------------------------------------

def test_first_matching_route_wins() -> None:
    routes = [Route(program=("haproxy",), intake="a"), Route(program=("hap",), intake="b"),
              Route(intake="c")]
    d = Table(routes).decide(origin())
    assert d.target("haproxy") == to("a")
    assert d.target("hapee") == to("b")
    assert d.target("sshd") == to("c")


def test_every_matcher_of_a_route_must_match() -> None:
    routes = [Route(listener=("tcp://127.0.0.1:1514",), source=net("10.0.0.0/8"),
                    program=("haproxy",), intake="a"), Route(intake="b")]
    assert route_of(routes, origin()) == to("a")
    assert route_of(routes, origin(source="192.168.0.1")) == to("b")
    assert route_of(routes, origin(listener="udp://127.0.0.1:1514")) == to("b")
    assert route_of(routes, origin(), "hapee") == to("b")


@pytest.mark.parametrize(("matcher", "listener", "address", "hit"), [
    # A name: that listener.
    ("tcp://127.0.0.1:1514", "tcp://127.0.0.1:1514", "127.0.0.1:1514", True),
    ("tcp://127.0.0.1:1514", "udp://127.0.0.1:1514", "127.0.0.1:1514", False),
    ("tcp://127.0.0.1:1514", "tcp://127.0.0.1:1515", "127.0.0.1:1515", False),
    # An address alone: every kind on it.
    ("127.0.0.1:1514", "tcp://127.0.0.1:1514", "127.0.0.1:1514", True),
    ("127.0.0.1:1514", "udp://127.0.0.1:1514", "127.0.0.1:1514", True),
    ("127.0.0.1:1514", "relp://127.0.0.1:2514", "127.0.0.1:2514", False),
    # Port 0 in the config: the name carries the bound port, the matcher the config's.
    ("tcp://127.0.0.1:0", "tcp://127.0.0.1:40000", "127.0.0.1:0", True),
    ("udp://127.0.0.1:0", "tcp://127.0.0.1:40000", "127.0.0.1:0", False),
    ("127.0.0.1:0", "tcp://127.0.0.1:40000", "127.0.0.1:0", True),
    ("tcp://127.0.0.1:40000", "tcp://127.0.0.1:40000", "127.0.0.1:0", True),
    # A host name in the config: its name holds the address it was bound to.
    ("tcp://localhost:1514", "tcp://127.0.0.1:1514", "localhost:1514", True),
    ("LocalHost:1514", "tcp://127.0.0.1:1514", "localhost:1514", True),
    # IPv6: in brackets in a name; the config may write it bare or bracketed.
    ("tcp://[::1]:1514", "tcp://[::1]:1514", "[::1]:1514", True),
    ("tcp://[::1]:1514", "tcp://[::1]:1514", "::1:1514", True),
    ("[0:0::1]:1514", "tls://[::1]:1514", "::1:1514", True),
    ("tcp://[::1]:1514", "tcp://127.0.0.1:1514", "127.0.0.1:1514", False),
    # What names no listener matches none.
    ("http://127.0.0.1:1514", "tcp://127.0.0.1:1514", "127.0.0.1:1514", False),
    ("127.0.0.1", "tcp://127.0.0.1:1514", "127.0.0.1:1514", False),
])
def test_listener_matcher(matcher: str, listener: str, address: str, hit: bool) -> None:
    routes = [Route(listener=(matcher,), intake="a"), Route(intake="b")]
    assert route_of(routes, origin(listener, address)) == to("a" if hit else "b")


@pytest.mark.parametrize(("cidrs", "source", "hit"), [
    (("10.0.0.0/8",), "10.1.2.3", True),
    (("10.0.0.0/8",), "11.1.2.3", False),
    (("192.168.0.0/16", "10.1.2.3/32"), "10.1.2.3", True),
    (("2001:db8::/32",), "2001:db8::5", True),
    (("2001:db8::/32",), "2001:db9::5", False),
    (("fe80::/10",), "fe80::1%eth0", True),
    # A dual-stack socket's IPv4 peer is an IPv4-mapped IPv6 address: an IPv4 sender still.
    (("10.0.0.0/8",), "::ffff:10.1.2.3", True),
    (("10.0.0.0/8",), "::ffff:11.1.2.3", False),
    (("::ffff:10.0.0.0/104",), "10.1.2.3", True),
    (("::ffff:10.0.0.0/104",), "::ffff:10.1.2.3", True),
    (("0.0.0.0/0",), "2001:db8::1", False),
    (("::/0",), "10.1.2.3", False),
    (("::/0",), "::ffff:10.1.2.3", False),  # ::/0 is the IPv6 senders
    (("0.0.0.0/0",), "[::ffff:10.1.2.3]", True),
    # Not an IP address (a unix socket): no source matcher.
    (("0.0.0.0/0", "::/0"), "/run/haproxy/log.sock", False),
    (("0.0.0.0/0",), "", False),
])
def test_source_matcher(cidrs: tuple[str, ...], source: str, hit: bool) -> None:
    routes = [Route(source=net(*cidrs), intake="a"), Route(intake="b")]
    assert route_of(routes, origin(source=source)) == to("a" if hit else "b")


@pytest.mark.parametrize(("patterns", "names", "hit"), [
    (("*.example.org",), ("fw1.example.org",), True),
    (("*.example.org",), ("a.fw1.example.org",), False),  # a * stays within one label
    (("*.example.org",), ("FW1.Example.ORG",), True),
    (("fw?.example.org",), ("fw2.example.org",), True),
    (("fw1.example.org",), ("cn-only", "fw1.example.org"), True),  # CN or any DNS SAN
    (("fw1.example.org", "*.other.net"), ("b.other.net",), True),
    (("fw1.example.org",), ("fw2.example.org",), False),
    (("*.example.org",), (), False),  # no certificate: no tls_name matcher
])
def test_tls_name_matcher(patterns: tuple[str, ...], names: tuple[str, ...], hit: bool) -> None:
    routes = [Route(tls_name=patterns, intake="a"), Route(intake="b")]
    assert route_of(routes, origin(tls_names=names)) == to("a" if hit else "b")


def test_program_matcher_is_prefixes() -> None:
    routes = [Route(program=("hapee", "nginx"), intake="a"), Route(intake="b")]
    d = Table(routes).decide(origin())
    assert [d.target(p).intake for p in ("hapee-lb", "hapee", "nginx", "hap", "haproxy", "")] \
        == ["a", "a", "a", "b", "b", "b"]


def test_catch_all_drop_and_no_route() -> None:
    routes = [Route(source=net("10.0.0.0/8"), intake=None), Route(program=("haproxy",),
                                                                  intake="a")]
    t = Table(routes)
    assert t.decide(origin()).target("haproxy") == DROP == Target(None, "drop")
    d = t.decide(origin(source="192.168.0.1"))
    assert d.target("haproxy") == to("a")
    assert d.target("sshd") == NO_ROUTE == Target(None, "no_route")
    assert Table([]).decide(origin()).fixed == NO_ROUTE
    assert Table([Route(intake="z")]).decide(origin(source="/x")).fixed == to("z")


def test_fixed_when_the_program_cannot_change_the_answer() -> None:
    # A route without program matcher first: fixed.
    assert Table([Route(intake="a"), Route(program=("h",), intake="b")]) \
        .decide(origin()).fixed == to("a")
    # A program route before it: not fixed...
    t = Table([Route(program=("hap",), intake="b"), Route(intake="a")])
    d = t.decide(origin())
    assert d.fixed is None
    assert (d.target("haproxy"), d.target("x")) == (to("b"), to("a"))
    # ...unless that route does not match the origin,
    t = Table([Route(source=net("192.168.0.0/16"), program=("hap",), intake="b"),
               Route(intake="a")])
    assert t.decide(origin()).fixed == to("a")
    assert t.decide(origin(source="192.168.1.1")).fixed is None
    # or sends where the rest goes anyway.
    assert Table([Route(program=("hap",), intake="a"), Route(intake="a")]) \
        .decide(origin()).fixed == to("a")
    assert Table([Route(program=("x",)), Route(intake=None)]).decide(origin()).fixed == DROP
    # Program routes only: what none matches is no_route.
    d = Table([Route(program=("hap",), intake="a")]).decide(origin())
    assert d.fixed is None
    assert (d.target("hapee"), d.target("sshd")) == (to("a"), NO_ROUTE)


def test_shadowed_prefixes_leave_the_decision() -> None:
    # "haproxy" starts with "hap": those events went to routes[1] already.
    t = Table([Route(program=("hap",), intake="a"), Route(program=("haproxy",), intake="b"),
               Route(intake="a")])
    d = t.decide(origin())
    assert d.fixed == to("a")
    assert d.intakes == frozenset({"a"})


def test_decision_intakes() -> None:
    t = Table([Route(listener=("udp://127.0.0.1:1514",), intake="u"),
               Route(program=("hapee",), intake="e"), Route(program=("x",), intake=None),
               Route(tls_name=("*.example.org",), intake="t"),
               Route(source=net("10.0.0.0/8"), intake="ten")])
    assert t.intakes == frozenset({"u", "e", "t", "ten"})
    assert t.decide(origin()).intakes == frozenset({"e", "ten"})
    assert t.decide(origin(listener="udp://127.0.0.1:1514")).intakes == frozenset({"u"})
    assert t.decide(origin(source="8.8.8.8")).intakes == frozenset({"e"})
    assert t.decide(origin(source="8.8.8.8", tls_names=("a.example.org",))).intakes \
        == frozenset({"e", "t"})


def test_decisions_are_kept_per_origin_and_bounded() -> None:
    t = Table([Route(source=net("10.0.0.0/8"), intake="a")], cache_size=2)
    first = t.decide(origin())
    assert t.decide(origin()) is first  # an equal origin: the same decision
    t.decide(origin(source="10.0.0.2"))
    t.decide(origin(source="10.0.0.3"))  # forgets the oldest
    assert t.decide(origin()) is not first
    assert t.decide(origin()).fixed == to("a")


# -- check_routes ---------------------------------------------------------------------------

LISTENERS = [("tcp", "0.0.0.0:1514"), ("udp", "0.0.0.0:1514"), ("tls", "[::]:6514"),
             ("relp", "::1:2514")]
INTAKES = ["eu", "us"]
PROGRAMS = ["haproxy", "hapee"]


def check(*routes: Route, intakes: Sequence[str] = INTAKES,
          programs: Sequence[str] = PROGRAMS) -> tuple[list[str], list[str]]:
    return check_routes(routes, intakes, programs, LISTENERS)


def test_a_good_table_has_no_problem() -> None:
    assert check(
        Route(listener=("tls://[::]:6514",), tls_name=("*.eu.example.org",), intake="eu"),
        Route(listener=("relp://[::1]:2514", "0.0.0.0:1514"), program=("hapee-lb",),
              intake="us"),
        Route(source=net("10.0.0.0/8"), program=("h",), intake="us"),
        Route(intake="eu")) == ([], [])


def test_unknown_intake() -> None:
    problems, _ = check(Route(listener=("0.0.0.0:1514",), intake="x"),
                        Route(program=("hapee",), intake="us"), Route(intake="eu"))
    assert problems == ['routes[1]: intake "x" is not defined ([intakes.x] missing; '
                        'defined: "eu", "us")']


def test_unknown_listener() -> None:
    problems, _ = check(
        Route(listener=("tcp://0.0.0.0:1514", "udp://0.0.0.0:9999", "tls://[::]:6514",
                        "relp://[::1]:2514", "[::1]:2514", "tcp://[::]:6514", "1514"),
              intake="eu"), Route(intake="us"))
    tail = ("names no listener of listen.tcp, listen.udp, listen.tls or listen.relp; write "
            'one of "tcp://0.0.0.0:1514", "udp://0.0.0.0:1514", "tls://[::]:6514", '
            '"relp://[::1]:2514" (KIND://HOST:PORT), or its HOST:PORT alone for every kind '
            "on that address")
    assert problems == [f'routes[1]: listener "udp://0.0.0.0:9999" {tail}',
                        f'routes[1]: listener "tcp://[::]:6514" {tail}',
                        f'routes[1]: listener "1514" {tail}']


def test_program_no_event_can_have() -> None:
    problems, _ = check(Route(program=("ha", "haproxy-x", "nginx"), intake="eu"),
                        Route(intake="us"))
    assert problems == [
        'routes[1]: program "nginx" can never match: filter.programs ("haproxy", "hapee") '
        "lets no such program through; add a prefix of it to filter.programs, or correct "
        "the route"]


CATCH_ALL_FIRST = ("can never match: routes[1] before it is a catch-all (no listener, source, "
                   "tls_name or program) and takes every event first; a catch-all must be the "
                   "last route")


def test_catch_all_before_the_end() -> None:
    problems, _ = check(Route(intake="eu"), Route(program=("haproxy",), intake="us"),
                        Route(intake=None))
    assert problems == [f"routes[2]: {CATCH_ALL_FIRST}", f"routes[3]: {CATCH_ALL_FIRST}"]


def covered(n: int, m: int) -> str:
    return (f"routes[{n}]: can never match: routes[{m}] before it matches every event it "
            f"would (each of its matchers is empty or wider); move routes[{n}] before "
            f"routes[{m}], or remove it")


@pytest.mark.parametrize(("earlier", "later", "hidden"), [
    (Route(listener=("0.0.0.0:1514",)), Route(listener=("tcp://0.0.0.0:1514",)), True),
    (Route(listener=("tcp://0.0.0.0:1514",)), Route(listener=("0.0.0.0:1514",)), False),
    (Route(listener=("tcp://0.0.0.0:1514",)), Route(listener=("udp://0.0.0.0:1514",)), False),
    (Route(listener=("tls://[::]:6514",)), Route(listener=("tls://[0::0]:6514",)), True),
    (Route(listener=("0.0.0.0:1514",)), Route(), False),
    (Route(source=net("10.0.0.0/8")), Route(source=net("10.1.0.0/16", "10.2.3.4/32")), True),
    (Route(source=net("10.0.0.0/8")), Route(source=net("10.1.0.0/16", "11.0.0.0/8")), False),
    (Route(source=net("10.0.0.0/8", "2001:db8::/32")), Route(source=net("2001:db8:1::/48")),
     True),
    (Route(source=net("10.0.0.0/8")), Route(source=net("::ffff:10.0.0.0/104")), True),
    (Route(source=net("::ffff:0:0/96")), Route(source=net("192.168.0.0/16")), True),
    (Route(source=net("::/0")), Route(source=net("::ffff:10.0.0.0/104")), False),
    (Route(tls_name=("*.example.org",)), Route(tls_name=("fw1.example.org",)), True),
    (Route(tls_name=("*.example.org",)), Route(tls_name=("*.Example.org",)), True),
    (Route(tls_name=("*.example.org",)), Route(tls_name=("fw*.example.org",)), False),
    (Route(tls_name=("*.example.org",)), Route(tls_name=("a.b.example.org",)), False),
    (Route(program=("hap",)), Route(program=("haproxy", "hapee")), True),
    (Route(program=("haproxy",)), Route(program=("hap",)), False),
    (Route(listener=("0.0.0.0:1514",), program=("hap",)),
     Route(listener=("udp://0.0.0.0:1514",), source=net("10.0.0.0/8"), program=("hapee",)),
     True),
    (Route(listener=("0.0.0.0:1514",), program=("hap",)), Route(program=("hapee",)), False),
    (Route(source=net("10.0.0.0/8"), tls_name=("x",)), Route(source=net("10.0.0.0/8")), False),
])
def test_route_hidden_by_an_earlier_one(earlier: Route, later: Route, hidden: bool) -> None:
    a = Route(earlier.listener, earlier.source, earlier.tls_name, earlier.program, "eu")
    b = Route(later.listener, later.source, later.tls_name, later.program, "us")
    assert covers(a, b) is hidden
    problems, _ = check(a, b)
    assert problems == ([covered(2, 1)] if hidden else [])


def test_covered_names_the_first_route_that_hides_it() -> None:
    problems, _ = check(Route(program=("hapee",), intake="eu"),
                        Route(program=("hap",), intake="us"),
                        Route(program=("hapee-lb",), intake="us"), Route(intake="eu"))
    assert problems == [covered(3, 1)]


def test_problems_of_one_route_in_order() -> None:
    problems, _ = check(Route(program=("nginx",), intake="eu"),
                        Route(listener=("udp://0.0.0.0:9",), program=("nginx-x",), intake="x"),
                        Route(intake="us"))
    assert [p.split(": ", 2)[:2] for p in problems] == [
        ["routes[1]", 'program "nginx" can never match'],
        ["routes[2]", 'intake "x" is not defined ([intakes.x] missing; defined'],
        ["routes[2]", 'listener "udp://0.0.0.0:9" names no listener of listen.tcp, listen.udp,'
         " listen.tls or listen.relp; write one of \"tcp://0.0.0.0:1514\", \"udp://0.0.0.0:1514\""
         ', "tls://[::]:6514", "relp://[::1]:2514" (KIND://HOST:PORT), or its HOST:PORT alone '
         "for every kind on that address"],
        ["routes[2]", 'program "nginx-x" can never match'],
        ["routes[2]", "can never match"],
    ]


def test_warnings() -> None:
    problems, warnings = check(Route(source=net("10.0.0.0/8"), intake=None), Route(intake="eu"),
                               intakes=["eu", "us", "spare"])
    assert problems == []
    assert warnings == [
        'routes[1]: drop = true: the events it matches are discarded, counted as '
        'unrouted_events{reason="drop"}',
        'intakes.us: no route sends events to it; add a [[routes]] entry with intake = "us", '
        "or remove [intakes.us]",
        'intakes.spare: no route sends events to it; add a [[routes]] entry with intake = '
        '"spare", or remove [intakes.spare]',
    ]


# -- describe -------------------------------------------------------------------------------

def test_describe() -> None:
    lines = describe([
        Route(listener=("tls://[::]:6514",), tls_name=("*.eu.example.org", "fw1.example.org"),
              intake="eu"),
        Route(source=net("10.0.0.0/8", "2001:db8::/32"), program=("hapee",), intake="us"),
        Route(listener=("0.0.0.0:1514",), source=net("::ffff:10.0.0.0/104"), intake=None),
    ])
    assert lines == [
        "routes[1]  tls://[::]:6514  *                          *.eu.example.org, "
        "fw1.example.org  *     → eu",
        "routes[2]  *                10.0.0.0/8, 2001:db8::/32  *                                "
        "  hapee → us",
        "routes[3]  0.0.0.0:1514     ::ffff:10.0.0.0/104        *                                "
        "  *     → dropped (drop = true), counted as unrouted_events{reason=\"drop\"}",
        "(no route)                                                                              "
        "        → dropped, counted as unrouted_events{reason=\"no_route\"}",
    ]
    assert len({line.index("→") for line in lines}) == 1


def test_describe_ends_at_a_catch_all() -> None:
    assert describe([Route(program=("hap",), intake="a"), Route(intake="b")]) == [
        "routes[1]  *  *  *  hap → a",
        "routes[2]  *  *  *  *   → b",
    ]
    assert describe([]) == ['(no route) → dropped, counted as unrouted_events{reason="no_route"}']


# -- properties: the table against a naive reading of the rules ------------------------------

# A small universe where every spelling is canonical, so the reference can compare strings.
# (name, address as the config lists it)
LISTENER_UNIVERSE = [
    ("tcp://127.0.0.1:1514", "127.0.0.1:1514"),
    ("udp://127.0.0.1:1514", "127.0.0.1:1514"),
    ("tls://[::1]:6514", "[::1]:6514"),
    ("relp://[::1]:2514", "[::1]:2514"),
    ("tcp://127.0.0.1:40000", "127.0.0.1:0"),  # port 0: bound to 40000
    ("tcp://127.0.0.1:1515", "localhost:1515"),
]
LISTENER_VALUES = sorted(
    {name for name, _ in LISTENER_UNIVERSE} | {a for _, a in LISTENER_UNIVERSE}
    | {name.partition("://")[2] for name, _ in LISTENER_UNIVERSE}
    | {f"{name.partition('://')[0]}://{a}" for name, a in LISTENER_UNIVERSE}
    | {"udp://[::1]:6514", "tcp://10.0.0.1:1"})
CIDRS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "192.168.0.0/16", "0.0.0.0/0", "::1/128",
         "2001:db8::/32", "2001:db8:1::/48", "::ffff:10.0.0.0/104", "::/0"]
SOURCES = ["10.1.2.3", "10.2.0.1", "192.168.1.1", "8.8.8.8", "::ffff:10.1.2.3", "::1",
           "2001:db8:1::5", "2001:db8:2::1", "/run/log.sock"]
PATTERNS = ["*.example.org", "a.example.org", "A.Example.org", "?.example.org", "*.other.net",
            "b.other.net", "x.*.example.org"]
NAME_SETS: list[tuple[str, ...]] = [(), ("a.example.org",), ("b.example.org", "b.other.net"),
                                    ("x.y.example.org",), ("AB.other.net",)]
PREFIXES = ["h", "hap", "haproxy", "hapee", "hapee-lb", "ngx"]
PROGRAM_UNIVERSE = ["haproxy", "hapee-lb", "hapee", "hap", "ha", "ngxx", "sshd", ""]
ORIGINS = [Origin(name, address, source, names) for name, address in LISTENER_UNIVERSE
           for source in SOURCES for names in NAME_SETS]


def _naive_listener(m: str, o: Origin) -> bool:
    kind, _, named = o.listener.partition("://")
    if m in (o.listener, o.address, named):
        return True
    m_kind, sep, m_address = m.partition("://")
    return bool(sep) and m_kind == kind and m_address in (o.address, named)


def _ipv4(value: str) -> ipaddress.IPv4Address | None:
    """The IPv4 sender an address is ("10.0.0.1" or "::ffff:10.0.0.1"); None: not one."""
    ip = ipaddress.ip_address(value)
    return ip if isinstance(ip, ipaddress.IPv4Address) else ip.ipv4_mapped


def _naive_source(cidrs: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
                  source: str) -> bool:
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return False
    for n in cidrs:
        first, last = str(n.network_address), str(n.broadcast_address)
        if _ipv4(first) is not None and _ipv4(last) is not None:  # an IPv4 block
            v4 = _ipv4(source)
            if v4 is not None and _ipv4(first) <= v4 <= _ipv4(last):  # type: ignore[operator]
                return True
        elif _ipv4(source) is None and ip in n:  # an IPv6 block: IPv6 senders
            return True
    return False


def naive_index(routes: Sequence[Route], o: Origin, program: str) -> int | None:
    """The index of the first route whose every matcher matches; None: none."""
    for i, r in enumerate(routes):
        if ((not r.listener or any(_naive_listener(m, o) for m in r.listener))
                and (not r.source or _naive_source(r.source, o.source))
                and (not r.tls_name or name_allowed(o.tls_names, list(r.tls_name)))
                and (not r.program or any(program.startswith(p) for p in r.program))):
            return i
    return None


def naive(routes: Sequence[Route], o: Origin, program: str) -> Target:
    i = naive_index(routes, o, program)
    if i is None:
        return NO_ROUTE
    intake = routes[i].intake
    return DROP if intake is None else Target(intake)


def _matcher(values: Sequence[str]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.one_of(st.just(()), st.lists(st.sampled_from(values), min_size=1, max_size=2,
                                           unique=True).map(tuple))


routes_strategy = st.lists(st.builds(
    Route,
    listener=_matcher(LISTENER_VALUES),
    source=_matcher(CIDRS).map(lambda cs: tuple(ipaddress.ip_network(c) for c in cs)),
    tls_name=_matcher(PATTERNS),
    program=_matcher(PREFIXES),
    intake=st.sampled_from(["a", "b", "c", None]),
), max_size=6)


@settings(max_examples=200, deadline=None)
@given(routes_strategy)
def test_table_is_the_naive_first_match(routes: list[Route]) -> None:
    table = Table(routes)
    for o in ORIGINS:
        d = table.decide(o)
        expected = [naive(routes, o, p) for p in PROGRAM_UNIVERSE]
        assert [d.target(p) for p in PROGRAM_UNIVERSE] == expected, o
        if d.fixed is not None:
            assert set(expected) == {d.fixed}, o
        assert {t.intake for t in expected if t.intake is not None} <= d.intakes, o
        assert d.intakes <= table.intakes


@settings(max_examples=200, deadline=None)
@given(routes_strategy)
def test_a_covered_route_is_never_hit_first(routes: list[Route]) -> None:
    listeners = [(name.partition("://")[0], address) for name, address in LISTENER_UNIVERSE]
    problems, _ = check_routes(routes, ["a", "b", "c"], ["h", "ngx"], listeners)
    hidden = {int(m.group(1)) - 1 for line in problems
              if (m := re.match(r"routes\[(\d+)\]: can never match: routes", line))}
    for o in ORIGINS:
        for p in PROGRAM_UNIVERSE:
            assert naive_index(routes, o, p) not in hidden, (o, p)
