"""The ListenerSet: what a new config adds and removes (multisets), all-or-nothing binding,
draining, and the settings each listener applies itself. Real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from devtools.probe import until
from haproxy_forwarder.config import Settings
from haproxy_forwarder.ingest import ChunkResult, ProgramFilter
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sources import (
    Backpressure,
    ListenError,
    ListenerSet,
    SourceContext,
    TcpSource,
    UdpSource,
)
from haproxy_forwarder.sources.listeners import KINDS, diff, wanted
from tests.recording import Log


def settings(**listen: Any) -> Settings:
    return Settings(listen={"tcp": [], **listen}, intake={"dry_run": True})


class Sink:
    def __init__(self) -> None:
        self.results: list[ChunkResult] = []

    def take(self, result: ChunkResult, ack: object = None) -> None:
        self.results.append(result)

    def flush(self) -> None:
        pass

    def received_at(self) -> bytes:
        return b"2026-12-07T00:00:00.000Z"


def context() -> SourceContext:
    return SourceContext(Sink(), Counters(), Log(), ProgramFilter(["haproxy"]), Backpressure(),
                         4096)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- diff: pure ---------------------------------------------------------------------------------


def test_every_kind_is_a_listen_setting() -> None:
    assert set(KINDS) <= set(Settings.model_fields["listen"].annotation.model_fields)  # type: ignore[union-attr]


def test_wanted_lists_every_listener_in_start_up_order() -> None:
    s = settings(tcp=["127.0.0.1:1"], udp=["127.0.0.1:2"], relp=["127.0.0.1:3"])
    assert wanted(s) == [("tcp", "127.0.0.1:1"), ("relp", "127.0.0.1:3"), ("udp", "127.0.0.1:2")]


def test_diff_is_a_multiset_difference_per_kind() -> None:
    old = settings(tcp=["127.0.0.1:1", "127.0.0.1:2"], udp=["127.0.0.1:1"])
    new = settings(tcp=["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:3"], udp=["127.0.0.1:1"],
                   relp=["127.0.0.1:1"])
    added, removed = diff(old, new)
    # The same address under another kind is another listener; listed twice, two of them.
    assert sorted(added) == [("relp", "127.0.0.1:1"), ("tcp", "127.0.0.1:3"),
                             ("tcp", "127.0.0.1:3")]
    assert removed == [("tcp", "127.0.0.1:1")]
    assert diff(new, new) == ([], [])
    # One of two copies removed: one listener goes, the other stays.
    twice = settings(tcp=["127.0.0.1:3", "127.0.0.1:3"])
    once = settings(tcp=["127.0.0.1:3"])
    assert diff(twice, once) == ([], [("tcp", "127.0.0.1:3")])


# -- open, add, take_out, drain: real sockets --------------------------------------------------


def test_open_binds_all_or_none_and_names_every_address_that_failed() -> None:
    async def main() -> None:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ctx = context()
        listeners = ListenerSet(ctx)
        s = settings()
        keys = [("tcp", "127.0.0.1:0"), ("tcp", f"127.0.0.1:{taken}"), ("udp", "127.0.0.1:0"),
                ("relp", f"127.0.0.1:{taken}")]
        built = listeners.build(keys, s)
        with pytest.raises(ListenError) as err:
            await listeners.open(built)
        assert err.value.problems == [
            f"listen.tcp 127.0.0.1:{taken}: cannot bind: Address already in use",
            f"listen.relp 127.0.0.1:{taken}: cannot bind: Address already in use",
        ]
        # Rolled back: the ones that were bound are closed again, none is a member.
        first = built[0]
        assert isinstance(first, TcpSource) and not first.listening
        assert not built[2].listening
        assert len(listeners) == 0
        assert listeners.up() == {}
        # Nothing of theirs is subscribed any more (a stopped listener must not be called).
        assert ctx.pressure._listeners == []
        busy.close()

    asyncio.run(main())


def test_opened_listeners_become_members_and_drain_closes_them() -> None:
    async def main() -> None:
        ctx = context()
        listeners = ListenerSet(ctx)
        s = settings()
        opened = await listeners.open(listeners.build(
            [("tcp", "127.0.0.1:0"), ("udp", "127.0.0.1:0")], s))
        assert len(listeners) == 0  # not members until added
        listeners.add(listener for listener, _, _ in opened)
        (tcp, _, tcp_port), (udp, _, udp_port) = opened
        assert tcp.name == f"tcp://127.0.0.1:{tcp_port}"
        assert udp.name == f"udp://127.0.0.1:{udp_port}"
        assert listeners.up() == {tcp.name: 1.0, udp.name: 1.0}
        conn = socket.create_connection(("127.0.0.1", tcp_port))
        await until(lambda: listeners.connections() == {tcp.name: 1.0}, what="one TCP connection")
        # UDP has no connections: it is not in the connections_open gauge at all.
        [gone] = listeners.take_out([("tcp", "127.0.0.1:0")])
        assert gone is tcp and list(listeners) == [udp]
        conn.close()
        await ListenerSet.drain([tcp], 1.0)
        assert refused(tcp_port) and not tcp.listening and not tcp.down
        await ListenerSet.drain(list(listeners), 0.0)
        assert not udp.listening and not udp.down
        assert listeners.unbound() == [udp.name]

    asyncio.run(main())


def test_configure_applies_the_filter_and_each_listeners_own_settings() -> None:
    async def main() -> None:
        ctx = context()
        listeners = ListenerSet(ctx)
        s = settings(allow=["127.0.0.0/8"])
        opened = await listeners.open(listeners.build(
            [("tcp", "127.0.0.1:0"), ("udp", "127.0.0.1:0")], s))
        listeners.add(listener for listener, _, _ in opened)
        (tcp, _, tcp_port), (udp, _, _) = opened
        assert isinstance(tcp, TcpSource) and isinstance(udp, UdpSource)
        conn = socket.create_connection(("127.0.0.1", tcp_port))
        await until(lambda: tcp.open_connections == 1, what="the connection accepted")
        narrowed = Settings(listen={"tcp": [], "allow": ["10.0.0.0/8"], "max_connections": 7},
                            filter={"programs": ["hapee"]}, intake={"dry_run": True})
        listeners.configure(narrowed)
        assert ctx.filter.programs == (b"hapee",)
        assert tcp.max_connections == 7
        assert not udp.allow.permits("127.0.0.1")
        # The narrowed allow-list applies to the peer already connected too.
        await until(lambda: tcp.open_connections == 0,
                    what="the connection no longer allowed closed")
        assert tcp.stats.access_denied == 1
        conn.close()
        await ListenerSet.drain(list(listeners), 0.0)

    asyncio.run(main())
