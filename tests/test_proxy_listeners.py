"""listen.proxy_protocol on the TCP, TLS and RELP listeners, and the inlet of each connection.

In-process listeners over real loopback sockets (127.0.0.x: the balancer is 127.0.0.1, an
outsider 127.0.0.4), whose SourceContext has a recording route table: every origin an inlet
was made for, every event by the source of its origin, and a set of sources whose inlet is
held (per-connection backpressure). Then the PROXY layer alone over a scripted transport:
byte by byte, and any bytes, split anyhow, from a balancer and from an outsider.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.probe import until
from haproxy_forwarder.acks import Ack
from haproxy_forwarder.config import ListenConfig, RelpConfig, TlsConfig
from haproxy_forwarder.ingest import ChunkReader, ChunkResult, ProgramFilter, new_reader
from haproxy_forwarder.observability.counters import Counters, ListenerCounters
from haproxy_forwarder.observability.quiet import QuietLog
from haproxy_forwarder.proxyproto import Parsed, ProxyParser, Refused
from haproxy_forwarder.routing import Origin
from haproxy_forwarder.sources import Backpressure, RelpSource, SourceContext, TcpSource
from haproxy_forwarder.sources import udp as udp_source
from haproxy_forwarder.sources.proxylayer import ProxyGate, ProxyLayer, sniff
from haproxy_forwarder.sources.tcp import TcpConnection
from haproxy_forwarder.sources.udp import UdpSource
from haproxy_forwarder.tlscontext import ServerTls
from tests.recording import Log
from tests.test_listeners import Sink
from tests.test_proxyproto import inet_block, tlv, v2
from tests.test_relp_source import OFFERS, RelpClient

pytestmark = pytest.mark.timeout(60)

TS = b"2026-12-07T00:00:00.000Z"
BALANCER = "127.0.0.1"
OUTSIDER = "127.0.0.4"
SERVER_NAME = "forwarder.test"


# -- what the listeners are given -----------------------------------------------------------


class RecordingInlet:
    """One connection's inlet: its events recorded under its origin, answered at once."""

    def __init__(self, routes: Routes, origin: Origin, framing: str) -> None:
        self.routes = routes
        self.origin = origin
        self.reader: ChunkReader = new_reader(routes.filter, 4096, framing)

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        start = 0
        for end in result.ends:
            self.routes.events.append((self.origin, json.loads(result.data[start:end])))
            start = end
        if ack is not None:
            ack.durable()

    def flush(self) -> None:
        pass

    def received_at(self) -> bytes:
        return TS

    @property
    def held(self) -> bool:
        return self.origin.source in self.routes.held


class Routes:
    """A route table that records (sources.base.Inlets)."""

    def __init__(self) -> None:
        self.filter = ProgramFilter(["haproxy"])
        self.origins: list[Origin] = []
        self.events: list[tuple[Origin, str]] = []
        self.held: set[str] = set()

    def inlet(self, origin: Origin, framing: str) -> RecordingInlet:
        self.origins.append(origin)
        return RecordingInlet(self, origin, framing)

    def texts(self, source: str) -> list[str]:
        return [text for origin, text in self.events if origin.source == source]


def context(routes: Routes | None = None) -> SourceContext:
    return SourceContext(Sink(), Counters(), Log(), ProgramFilter(["haproxy"]), Backpressure(),
                         4096, routes=routes)


def listen(**kw: Any) -> ListenConfig:
    return ListenConfig(**{"tcp": [], "udp": [], "proxy_protocol": [f"{BALANCER}/32"], **kw})


def tcp_source(routes: Routes | None = None, **kw: Any) -> TcpSource:
    return TcpSource(context(routes), "127.0.0.1:0", listen(**kw))


def log_of(src: TcpSource | RelpSource | UdpSource) -> Log:
    log = src.ctx.log
    assert isinstance(log, Log)
    return log


def run(coro: Coroutine[Any, Any, None], loop_name: str = "asyncio") -> None:
    """Run `coro`; any exception the loop itself caught (a callback that raised) fails it."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(c))
        await asyncio.wait_for(coro, 30)

    if loop_name == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    assert not errors, errors


# -- what senders send ----------------------------------------------------------------------


def message(text: str) -> bytes:
    """One octet-counted HAProxy syslog message whose event is `text`."""
    msg = b"<134>Dec  7 00:00:00 lb haproxy[1]: " + text.encode()
    return b"%d %s" % (len(msg), msg)


def v1(source: str, port: int = 40001) -> bytes:
    proto = "TCP6" if ":" in source else "TCP4"
    dest = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {proto} {source} {dest} {port} 1514\r\n".encode()


def v2_proxy(source: str, port: int = 40001, tlvs: bytes = b"") -> bytes:
    if ipaddress.ip_address(source).version == 6:
        return v2(0x1, 0x21, inet_block(source, "::1", port, 1514) + tlvs)
    return v2(0x1, 0x11, inet_block(source, "127.0.0.1", port, 1514) + tlvs)


HEADERS: dict[str, Callable[[str], bytes]] = {"v1": v1, "v2": v2_proxy}


async def connect(port: int, source: str = BALANCER
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed(reader: asyncio.StreamReader) -> None:
    """Wait until the server closed (FIN or reset) what `reader` reads."""
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), 10):
            pass


async def send_and_close(port: int, data: bytes, source: str = BALANCER) -> None:
    """Send `data` then a FIN; return once the server closed its side."""
    r, w = await connect(port, source)
    w.write(data)
    with contextlib.suppress(ConnectionError):
        await w.drain()
        w.write_eof()
    await closed(r)
    w.close()


def connection_of(src: TcpSource, source: str) -> TcpConnection:
    [conn] = [c for c in src.connections if c.address == source]
    return conn


# -- TCP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_header_source_stands_for_the_sender_on_tcp(version: str, loop_name: str) -> None:
    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        _, port = await src.start()
        r, w = await connect(port)
        w.write(HEADERS[version]("10.9.8.7") + message("one") + message("two"))
        await until(lambda: len(routes.texts("10.9.8.7")) == 2, what="both events")
        assert routes.texts("10.9.8.7") == ["one", "two"]
        assert routes.origins == [Origin(listener=src.name, address="127.0.0.1:0",
                                         source="10.9.8.7")]
        conn = connection_of(src, "10.9.8.7")
        balancer_port = w.get_extra_info("sockname")[1]
        assert conn.peer == "10.9.8.7:40001"
        assert conn.via == {"via": f"127.0.0.1:{balancer_port}"}
        assert src.per_address == {"10.9.8.7": 1}
        assert src.stats.proxy_headers == 1 and src.stats.proxy_refused == {}
        # What the carried connection sends later, in other reads, arrives as ever.
        w.write(message("three"))
        await until(lambda: len(routes.texts("10.9.8.7")) == 3, what="the later event")
        w.close()
        await closed(r)
        await src.stop(0.1)

    run(main(), loop_name)


def test_without_routes_the_events_go_to_the_one_collector() -> None:
    async def main() -> None:
        src = tcp_source()
        sink = src.ctx.sink
        assert isinstance(sink, Sink)
        _, port = await src.start()
        await send_and_close(port, v2_proxy("10.1.1.1") + message("direct"))
        await until(lambda: sum(len(r) for r in sink.results) == 1, what="the event")
        assert src.stats.proxy_headers == 1
        await src.stop(0.1)

    run(main())


def test_allow_list_and_per_address_cap_apply_to_the_carried_source() -> None:
    async def main() -> None:
        routes = Routes()
        # The balancer itself is not in listen.allow: listen.proxy_protocol vouches for it.
        src = tcp_source(routes, allow=["10.0.0.0/8"], max_connections_per_address=1)
        log = log_of(src)
        _, port = await src.start()
        kept = []
        for source in ("10.0.0.1", "10.0.0.2"):
            r, w = await connect(port)
            w.write(v1(source))
            kept.append((r, w))
            await until(lambda s=source: s in src.per_address, what=f"{source} admitted")
        # 10.0.0.1 again: over its cap, though the balancer's socket address is shared.
        await send_and_close(port, v1("10.0.0.1", 40002))
        assert src.stats.connections_refused == 1
        [refused] = log.named("connection_refused")
        assert refused["peer"] == "10.0.0.1:40002" and refused["via"].startswith("127.0.0.1:")
        # Not in listen.allow: denied, the line names the sender and the balancer.
        await send_and_close(port, v2_proxy("192.0.2.9") + message("no"))
        assert src.stats.access_denied == 1
        [denied] = log.named("connection_denied")
        assert denied["peer"] == "192.0.2.9:40001" and denied["via"].startswith("127.0.0.1:")
        # LOCAL (the balancer's health check): its own connection, admitted.
        await send_and_close(port, v2(0x0, 0x00, b"") + message("check"))
        await until(lambda: routes.texts(BALANCER) == ["check"], what="the LOCAL event")
        assert src.stats.access_denied == 1
        assert src.stats.proxy_headers == 5 and src.stats.proxy_refused == {}
        assert routes.texts("192.0.2.9") == []
        for r, w in kept:
            w.close()
            await closed(r)
        await src.stop(0.1)

    run(main())


def test_a_narrowed_allow_list_on_reload_spares_the_balancers_own_connections() -> None:
    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        _, port = await src.start()
        r1, w1 = await connect(port)
        w1.write(v2(0x0, 0x11, inet_block("10.0.0.1", "127.0.0.1", 1, 2)))  # LOCAL
        r2, w2 = await connect(port)
        w2.write(v1("10.0.0.7"))
        await until(lambda: len(src.connections) == 2, what="both admitted")
        src.limit(listen(allow=["192.0.2.0/24"]))
        await closed(r2)  # the carried sender is no longer allowed
        assert src.per_address == {BALANCER: 1}
        [denied] = log_of(src).named("connection_denied")
        assert denied["peer"] == "10.0.0.7:40001" and "via" in denied
        w1.close()
        await closed(r1)
        await src.stop(0.1)

    run(main())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_from_outside_proxy_protocol_is_refused(version: str) -> None:
    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        log = log_of(src)
        _, port = await src.start()
        for _ in range(3):
            await send_and_close(port, HEADERS[version]("10.6.6.6") + message("spoofed"),
                                 source=OUTSIDER)
        assert src.stats.proxy_refused == {"not_allowed": 3}
        [line] = log.named("proxy_header_refused")  # once per address
        assert line["reason"] == "not_allowed" and line["peer"].startswith(f"{OUTSIDER}:")
        assert routes.events == [] and src.stats.proxy_headers == 0
        # Without a header, the outsider is an ordinary sender.
        await send_and_close(port, message("plain"), source=OUTSIDER)
        await until(lambda: routes.texts(OUTSIDER) == ["plain"], what="the plain event")
        assert src.stats.proxy_refused == {"not_allowed": 3}
        await src.stop(0.1)

    run(main())


def test_a_balancer_that_sends_no_header_is_refused_at_the_timeout() -> None:
    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        src.proxy.header_timeout = 0.3
        _, port = await src.start()
        started = time.monotonic()
        r, w = await connect(port)
        w.write(v1("10.0.0.1")[:10])  # a header begun, never ended
        await closed(r)
        assert time.monotonic() - started >= 0.3
        r2, _ = await connect(port)  # nothing at all
        await closed(r2)
        assert src.stats.proxy_refused == {"timeout": 2}
        lines = log_of(src).named("proxy_header_refused")
        assert lines[0]["reason"] == "timeout" and lines[0]["peer"].startswith("127.0.0.1:")
        assert src.stats.connections_accepted == 0 and routes.origins == []
        await src.stop(0.1)

    run(main())


def test_idle_timeout_shorter_than_the_header_timeout_bounds_it() -> None:
    src = tcp_source(idle_timeout=0.5)
    assert src.proxy.timeout == 0.5
    src.limit(listen(idle_timeout=60))
    assert src.proxy.timeout == 10.0


UNIX_BLOCK = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")

# (bytes from the balancer, the source its events must have) for headers that are accepted.
ACCEPTED: dict[str, tuple[bytes, str]] = {
    "v1_tcp4": (v1("10.1.2.3"), "10.1.2.3"),
    "v1_tcp6": (v1("2001:db8::1"), "2001:db8::1"),
    "v1_unknown": (b"PROXY UNKNOWN\r\n", BALANCER),
    "v1_unknown_with_addresses": (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", BALANCER),
    "v2_inet6": (v2_proxy("2001:db8::2"), "2001:db8::2"),
    "v2_tlvs": (v2_proxy("10.1.2.4", tlvs=tlv(0x01, b"h2") + tlv(0x05, b"x" * 300)),
                "10.1.2.4"),
    "v2_local": (v2(0x0, 0x00, b""), BALANCER),
    "v2_local_with_addresses": (v2(0x0, 0x11, inet_block("10.9.9.9", "10.0.0.1", 1, 2)),
                                BALANCER),
    "v2_unix": (v2(0x1, 0x31, UNIX_BLOCK), BALANCER),
    "v2_unspec": (v2(0x1, 0x00, b""), BALANCER),
}

# Bytes from the balancer that are refused, and the reason counted (then a FIN).
REFUSED: dict[str, tuple[bytes, str]] = {
    "no_header": (message("straight"), "bad_signature"),
    "tls_without_header": (b"\x16\x03\x01\x02\x00\x01", "bad_signature"),
    "truncated_v1": (v1("10.1.2.3")[:20], "truncated"),
    "truncated_v2": (v2_proxy("10.1.2.3")[:20], "truncated"),
    "signature_only": (b"\r\n\r\n\x00\r\nQUIT\n", "truncated"),
    "nothing": (b"", "truncated"),
    "oversized_v2": (v2(0x1, 0x11, b"", length=5000), "too_long"),
    "v1_without_crlf": (b"PROXY TCP4 " + b"1" * 120, "too_long"),
    "v1_bad_address": (b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n", "bad_address"),
    "v1_bad_protocol": (b"PROXY UDP4 10.0.0.1 127.0.0.1 1 2\r\n", "bad_v1"),
    "v2_version_1": (b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12), "bad_v2"),
    "v2_dgram": (v2(0x1, 0x12, inet_block("10.0.0.1", "127.0.0.1", 1, 2)), "unsupported"),
    "v2_short_block": (v2(0x1, 0x11, bytes(4)), "bad_v2"),
    "bad_signature_late": (b"PROXZ TCP4", "bad_signature"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_headers(name: str) -> None:
    head, source = ACCEPTED[name]

    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        _, port = await src.start()
        await send_and_close(port, head + message(name))
        await until(lambda: routes.texts(source) == [name], what=f"the event from {source}")
        assert src.stats.proxy_headers == 1 and src.stats.proxy_refused == {}
        await src.stop(0.1)

    run(main())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_headers(name: str) -> None:
    data, reason = REFUSED[name]

    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        _, port = await src.start()
        await send_and_close(port, data)
        await until(lambda: src.stats.proxy_refused == {reason: 1},
                    what=f"{reason} counted", detail=lambda: src.stats.proxy_refused)
        assert routes.origins == [] and src.stats.connections_accepted == 0
        [line] = log_of(src).named("proxy_header_refused")
        assert line["reason"] == reason and line["detail"]
        assert not src.proxy.pending
        await src.stop(0.1)

    run(main())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_sent_byte_by_byte(version: str) -> None:
    """Each byte in its own read: the layer is seen holding it before the next is sent."""

    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        _, port = await src.start()
        r, w = await connect(port)
        head = HEADERS[version]("10.4.4.4")
        await until(lambda: len(src.proxy.pending) == 1, what="the connection accepted")
        [layer] = src.proxy.pending
        for i, byte in enumerate(head[:-1]):
            w.write(bytes([byte]))
            await until(lambda n=i + 1: layer._parser is not None
                        and layer._parser.buffered == n, what=f"byte {i} read alone")
        w.write(head[-1:])
        await until(lambda: not src.proxy.pending, what="the header complete")
        w.write(message("slow"))
        await until(lambda: routes.texts("10.4.4.4") == ["slow"], what="the event")
        w.close()
        await closed(r)
        await src.stop(0.1)

    run(main())


def test_stop_resets_connections_waiting_for_their_header_without_counting_them() -> None:
    async def main() -> None:
        src = tcp_source(Routes())
        _, port = await src.start()
        r, w = await connect(port)
        w.write(b"PROXY ")
        await until(lambda: len(src.proxy.pending) == 1, what="a header begun")
        await src.stop(0.1)
        await closed(r)
        assert not src.proxy.pending and src.stats.proxy_refused == {}

    run(main())


def test_a_reload_turns_the_proxy_protocol_on_and_off_for_new_connections() -> None:
    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes, proxy_protocol=[])
        _, port = await src.start()
        await send_and_close(port, message("before"))
        await until(lambda: routes.texts(BALANCER) == ["before"], what="a plain sender")
        src.limit(listen())
        await send_and_close(port, message("refused"))
        await until(lambda: src.stats.proxy_refused == {"bad_signature": 1}, what="refused")
        await send_and_close(port, v1("10.3.3.3") + message("carried"))
        await until(lambda: routes.texts("10.3.3.3") == ["carried"], what="carried")
        src.limit(listen(proxy_protocol=[]))
        await send_and_close(port, message("after"))
        await until(lambda: routes.texts(BALANCER) == ["before", "after"], what="plain again")
        await src.stop(0.1)

    run(main())


# -- TLS --------------------------------------------------------------------------------------


def pki_files(tmp: Path) -> tuple[ServerTls, ssl.SSLContext]:
    """A ServerTls asking for client certificates of a trustme CA, and a client context
    with the certificate of client1.example.org."""
    ca = trustme.CA()
    paths: dict[str, Path] = {}
    for name in (SERVER_NAME, "client1.example.org"):
        cert = ca.issue_cert(name, common_name=name)
        paths[name] = tmp / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(paths[name]))
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ServerTls()
    server.load(TlsConfig(cert_file=paths[SERVER_NAME], key_file=paths[SERVER_NAME],
                          client_ca_file=ca_file, allowed_names=["*.example.org"]))
    client = ssl.create_default_context(cafile=str(ca_file))
    client.load_cert_chain(str(paths["client1.example.org"]))
    return server, client


async def tls_send(port: int, client: ssl.SSLContext, head: bytes, data: bytes,
                   source: str = BALANCER) -> None:
    """The PROXY header in clear, then TLS on the same connection, `data`, and a close."""
    _, w = await connect(port, source)
    w.write(head)
    await w.start_tls(client, server_hostname=SERVER_NAME)
    w.write(data)
    await w.drain()
    w.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await w.wait_closed()


def test_tls_runs_after_the_header_and_the_origin_has_both(tmp_path: Path) -> None:
    server, client = pki_files(tmp_path)

    async def main() -> None:
        routes = Routes()
        ctx = context(routes)
        src = TcpSource(ctx, "127.0.0.1:0", listen(), server)
        _, port = await src.start()
        await tls_send(port, client, v2_proxy("10.5.5.5"), message("secret"))
        await until(lambda: routes.texts("10.5.5.5") == ["secret"], what="the TLS event")
        assert routes.origins == [Origin(listener=src.name, address="127.0.0.1:0",
                                         source="10.5.5.5",
                                         tls_names=("client1.example.org",))]
        assert src.stats.tls is not None and src.stats.tls.handshakes == 1
        # An outsider's header on the TLS port: refused by the PROXY layer, not counted as
        # a handshake refusal too.
        r, w = await connect(port, OUTSIDER)
        w.write(v1("10.6.6.6"))
        await closed(r)
        assert src.stats.proxy_refused == {"not_allowed": 1}
        assert not any(src.stats.tls.refused.values())
        # Without a header the outsider is an ordinary TLS sender.
        await tls_send(port, client, b"", message("outsider"), source=OUTSIDER)
        await until(lambda: routes.texts(OUTSIDER) == ["outsider"], what="the outsider")
        await src.stop(0.1)

    run(main())


def test_a_refused_handshake_behind_a_header_names_the_sender_and_the_balancer(
        tmp_path: Path) -> None:
    server, _ = pki_files(tmp_path)
    anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    async def main() -> None:
        src = TcpSource(context(Routes()), "127.0.0.1:0", listen(), server)
        _, port = await src.start()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await tls_send(port, anonymous, v1("10.7.7.7"), message("x"))
        log = log_of(src)
        await until(lambda: log.named("tls_refused"), what="the refusal")
        [line] = log.named("tls_refused")
        assert line["peer"] == "10.7.7.7:40001" and line["via"].startswith("127.0.0.1:")
        await src.stop(0.1)

    run(main())


# -- RELP -------------------------------------------------------------------------------------


def relp_source(routes: Routes, **kw: Any) -> RelpSource:
    return RelpSource(context(routes), "127.0.0.1:0", listen(**kw), RelpConfig())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_relp_behind_a_header(version: str) -> None:
    async def main() -> None:
        routes = Routes()
        src = relp_source(routes)
        _, port = await src.start()
        c = await RelpClient.connect(port, open_session=False)
        c.raw(HEADERS[version]("10.8.8.8"))
        opened = c.send("open", OFFERS)
        sent = [c.send("syslog", b"<134>Dec  7 00:00:00 lb haproxy[1]: r%d" % i)
                for i in range(3)]
        await c.wait_for([opened, *sent])
        assert all(c.answers[t] == b"200 OK" for t in sent)
        assert routes.texts("10.8.8.8") == ["r0", "r1", "r2"]
        assert [o.source for o in routes.origins] == ["10.8.8.8"]
        assert src.stats.proxy_headers == 1
        await c.close()
        await src.stop(0.1)

    run(main())


def test_relp_refuses_an_outsiders_header() -> None:
    async def main() -> None:
        routes = Routes()
        src = relp_source(routes)
        _, port = await src.start()
        await send_and_close(port, v2_proxy("10.6.6.6"), source=OUTSIDER)
        assert src.stats.proxy_refused == {"not_allowed": 1} and routes.events == []
        await src.stop(0.1)

    run(main())


# -- per-connection backpressure --------------------------------------------------------------


def test_only_the_connections_whose_inlet_is_held_pause() -> None:
    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes)
        _, port = await src.start()
        routes.held = {"10.0.0.1"}
        ra, wa = await connect(port)
        wa.write(v1("10.0.0.1"))
        rb, wb = await connect(port)
        wb.write(v1("10.0.0.2"))
        await until(lambda: len(src.connections) == 2, what="both admitted")
        a, b = connection_of(src, "10.0.0.1"), connection_of(src, "10.0.0.2")
        assert a.paused and not b.paused  # created held: paused at once
        for w, n in ((wa, 1), (wb, 1), (wa, 2), (wb, 2)):
            w.write(message(f"m{n}"))
        await until(lambda: len(routes.texts("10.0.0.2")) == 2, what="b's events")
        assert routes.texts("10.0.0.1") == []
        # Another intake lags now: each connection follows its own inlet.
        routes.held = {"10.0.0.2"}
        src.ctx.pressure.set(True)
        assert b.paused and not a.paused
        await until(lambda: len(routes.texts("10.0.0.1")) == 2, what="a's events")
        wa.write(message("m3"))
        wb.write(message("m3"))
        await until(lambda: len(routes.texts("10.0.0.1")) == 3, what="a's third")
        assert len(routes.texts("10.0.0.2")) == 2
        routes.held = set()
        src.ctx.pressure.set(False)
        await until(lambda: len(routes.texts("10.0.0.2")) == 3, what="b's third")
        for r, w in ((ra, wa), (rb, wb)):
            w.close()
            await closed(r)
        await src.stop(0.1)

    run(main())


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("proxy", [True, False])
def test_a_connection_opened_while_its_inlet_is_held_is_not_read(proxy: bool,
                                                                  loop_name: str) -> None:
    """Paused from its start: uvloop starts reading right after connection_made, whatever
    was asked in it, so the pause is asked again once it has (a read may pass before)."""

    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes, proxy_protocol=[f"{BALANCER}/32"] if proxy else [])
        _, port = await src.start()
        held, free = ("10.0.0.1", "10.0.0.2") if proxy else ("127.0.0.2", "127.0.0.3")
        routes.held = {held}
        writers = {}
        for source in (held, free):
            r, w = await connect(port, BALANCER if proxy else source)
            w.write(v1(source) if proxy else b"")
            writers[source] = (r, w)
        await until(lambda: len(src.connections) == 2, what="both admitted")
        conn = connection_of(src, held)
        await until(lambda: conn.transport is not None and not conn.transport.is_reading(),
                    what="the held connection paused")
        # More than the socket buffers hold: the sender is stopped, not read to the end.
        payload = b"".join(message(f"h{n}") for n in range(20_000))
        writers[held][1].write(payload)
        writers[free][1].write(message("free"))
        await until(lambda: routes.texts(free) == ["free"], what="the free one's event")
        assert routes.texts(held) == [] and conn.paused
        routes.held = set()
        src.ctx.pressure.set(False)
        await until(lambda: len(routes.texts(held)) == 20_000, what="the held one, freed")
        for r, w in writers.values():
            w.close()
            await closed(r)
        await src.stop(0.1)

    run(main(), loop_name)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_relp_session_opened_while_its_inlet_is_held_is_not_read(loop_name: str) -> None:
    async def main() -> None:
        routes = Routes()
        src = relp_source(routes, proxy_protocol=[])
        _, port = await src.start()
        routes.held = {BALANCER}
        c = await RelpClient.connect(port, open_session=False)
        await until(lambda: len(src.connections) == 1, what="admitted")
        [conn] = src.connections
        await until(lambda: conn.transport is not None and not conn.transport.is_reading(),
                    what="the session paused")
        t = c.send("open", OFFERS)
        assert not await c.pump(0.2)  # not read: its `open` is not answered
        routes.held = set()
        src.ctx.pressure.set(False)
        await c.wait_for([t])
        await c.close()
        await src.stop(0.1)

    run(main(), loop_name)


def test_a_held_connection_is_not_swept_while_a_free_one_is() -> None:
    async def main() -> None:
        routes = Routes()
        src = tcp_source(routes, idle_timeout=0.3)
        _, port = await src.start()
        routes.held = {"10.0.0.1"}
        kept = []
        for source in ("10.0.0.1", "10.0.0.2"):
            r, w = await connect(port)
            w.write(v1(source))
            kept.append((r, w))
        await until(lambda: len(src.connections) == 2, what="both admitted")
        for (_, w), source in zip(kept, ("10.0.0.1", "10.0.0.2"), strict=True):
            w.write(message(source))
        await until(lambda: routes.texts("10.0.0.2") == ["10.0.0.2"], what="b framed")
        a = connection_of(src, "10.0.0.1")
        # b is idle past idle_timeout and closed; a, held, is not (it cannot frame).
        await closed(kept[1][0])
        assert src.stats.connections_idle_closed == 1
        assert list(src.connections) == [a] and not a.framed
        routes.held = set()
        kept[0][1].close()
        await closed(kept[0][0])
        await src.stop(0.1)

    run(main())


def test_a_held_relp_session_is_not_read_until_its_inlet_is_free() -> None:
    async def main() -> None:
        routes = Routes()
        src = relp_source(routes)
        _, port = await src.start()
        routes.held = {"10.0.0.1"}
        sessions = {}
        for source in ("10.0.0.1", "10.0.0.2"):
            c = await RelpClient.connect(port, open_session=False)
            c.raw(v2_proxy(source))
            sessions[source] = c
        held, free = sessions["10.0.0.1"], sessions["10.0.0.2"]
        t_free = free.send("open", OFFERS)
        await free.wait_for([t_free])
        t_held = held.send("open", OFFERS)
        assert not await held.pump(0.2)  # not read: not even its `open` is answered
        assert [o.source for o in routes.origins] == ["10.0.0.1", "10.0.0.2"]
        routes.held = set()
        src.ctx.pressure.set(False)
        await held.wait_for([t_held])
        for c in sessions.values():
            await c.close()
        await src.stop(0.1)

    run(main())


# -- UDP --------------------------------------------------------------------------------------


def udp_send(port: int, source: str, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.sendto(data, ("127.0.0.1", port))


def datagram(text: str) -> bytes:
    return b"<134>Dec  7 00:00:00 lb haproxy[1]: " + text.encode()


def test_udp_has_an_inlet_per_sender_and_drops_what_a_held_one_sends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        routes = Routes()
        src = UdpSource(context(routes), "127.0.0.1:0", listen())
        _, port = await src.start()
        routes.held = {"127.0.0.3"}
        for n in range(3):
            udp_send(port, "127.0.0.2", datagram(f"a{n}"))
            udp_send(port, "127.0.0.3", datagram(f"b{n}"))
        await until(lambda: src.stats.udp_dropped == 3 and len(routes.events) == 3,
                    what="three taken, three dropped")
        assert routes.texts("127.0.0.2") == ["a0", "a1", "a2"]
        assert routes.origins == [
            Origin(listener=src.name, address="127.0.0.1:0", source=s)
            for s in ("127.0.0.2", "127.0.0.3")]
        # Past INLETS_MAX senders the cache starts again.
        monkeypatch.setattr(udp_source, "INLETS_MAX", 2)
        udp_send(port, "127.0.0.5", datagram("c"))
        await until(lambda: routes.texts("127.0.0.5") == ["c"], what="a third sender")
        assert src._transport is not None
        proto = src._transport.get_protocol()
        assert isinstance(proto, udp_source._UdpProtocol)
        assert list(proto.inlets) == ["127.0.0.5"]
        await src.stop()

    run(main())


# -- the layer alone, over a scripted transport -------------------------------------------------


class Raw(asyncio.Transport):
    """The raw socket's transport, as the layer sees it."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = (peer, 40000)
        self.aborted = False
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def abort(self) -> None:
        self.aborted = self.closing = True

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


class Inner(asyncio.Protocol):
    """The protocol above the layer: what it was given."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.data = b""
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        self.eof = True
        return None


class Rig:
    def __init__(self, peer: str) -> None:
        self.stats = ListenerCounters("tcp://127.0.0.1:1514")
        self.log = Log()
        self.gate = ProxyGate(self.stats, QuietLog(self.log))
        self.gate.configure([f"{BALANCER}/32"], 300.0)
        self.inners: list[Inner] = []
        self.raw = Raw(peer)
        self.layer = ProxyLayer(self.gate, self.inner)
        self.layer.connection_made(self.raw)

    def inner(self) -> Inner:
        self.inners.append(Inner())
        return self.inners[-1]

    def feed(self, chunks: list[bytes], eof: bool = True) -> None:
        for chunk in chunks:
            if not self.raw.closing:
                self.layer.data_received(chunk)
        if eof and not self.raw.closing:
            self.layer.eof_received()
        self.layer.connection_lost(None)


def in_loop(fn: Callable[[], None]) -> None:
    async def main() -> None:
        fn()
    run(main())


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_layer_byte_by_byte_hands_on_exactly_what_follows_the_header(name: str) -> None:
    head, source = ACCEPTED[name]
    tail = message("after")

    def check() -> None:
        rig = Rig(BALANCER)
        stream = head + tail
        rig.feed([stream[i:i + 1] for i in range(len(stream))])
        [inner] = rig.inners
        assert inner.data == tail and inner.eof and not rig.raw.aborted
        assert inner.transport is not None
        assert inner.transport.get_extra_info("peername")[0] == source
        assert inner.transport.get_extra_info("proxy_peer") == (BALANCER, 40000)
        assert rig.stats.proxy_headers == 1

    in_loop(check)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


any_stream = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([h for h, _ in ACCEPTED.values()] + [d for d, _ in REFUSED.values()]),
    st.builds(lambda h, b: h + b, st.sampled_from([h for h, _ in ACCEPTED.values()]),
              st.binary(max_size=32)),
    st.builds(lambda h, n: h[:n], st.sampled_from([h for h, _ in ACCEPTED.values()]),
              st.integers(0, 60)),
)


@settings(max_examples=300, deadline=None)
@given(any_stream, st.lists(st.integers(0, 80), max_size=8), st.booleans())
def test_layer_from_a_balancer_any_bytes_any_split(stream: bytes, cuts: list[int],
                                                   eof: bool) -> None:
    """The outcome is the parser's on the whole stream, whatever the split; a refused or
    truncated stream reaches nothing above, counted once; nothing raises."""
    expected = _outcome(stream)

    def check() -> None:
        rig = Rig(BALANCER)
        rig.feed(chunked(stream, cuts), eof=eof)
        if isinstance(expected, Parsed):
            [inner] = rig.inners
            assert inner.data == expected.rest
            assert rig.stats.proxy_headers == 1 and rig.stats.proxy_refused == {}
        else:
            assert rig.inners == []
            assert rig.stats.proxy_refused == {expected.reason: 1}
        assert not rig.gate.pending

    in_loop(check)


def _outcome(stream: bytes) -> Parsed | Refused:
    """The parser's verdict on the whole stream, ended there."""
    p = ProxyParser()
    got = p.feed(stream)
    return got if isinstance(got, Parsed | Refused) else p.close()


@settings(max_examples=300, deadline=None)
@given(any_stream, st.lists(st.integers(0, 80), max_size=8))
def test_layer_from_an_outsider_any_bytes_any_split(stream: bytes, cuts: list[int]) -> None:
    """What starts a PROXY signature is refused (not_allowed) before any byte goes up;
    anything else reaches the protocol above whole, a signature's prefix included."""
    spoof = sniff(stream[:12]) == "proxy"

    def check() -> None:
        rig = Rig(OUTSIDER)
        rig.feed(chunked(stream, cuts))
        [inner] = rig.inners  # made at once: the outsider is admitted as any sender
        assert inner.transport is rig.raw
        if spoof:
            assert rig.raw.aborted and inner.data == b""
            assert rig.stats.proxy_refused == {"not_allowed": 1}
        else:
            assert inner.data == stream and inner.eof and not rig.raw.aborted
            assert rig.stats.proxy_refused == {}

    in_loop(check)


def test_layer_a_reset_mid_header_counts_as_truncated_once() -> None:
    def check() -> None:
        rig = Rig(BALANCER)
        rig.layer.data_received(b"PROXY TCP4 ")
        rig.layer.connection_lost(ConnectionResetError())
        rig.layer.connection_lost(None)
        assert rig.stats.proxy_refused == {"truncated": 1} and rig.inners == []

    in_loop(check)


def test_sniff_decides_on_the_signatures_only() -> None:
    assert sniff(b"") == "pending"
    assert sniff(b"PROX") == sniff(b"\r\n\r\n\x00") == "pending"
    assert sniff(b"PROXY ") == sniff(b"\r\n\r\n\x00\r\nQUIT\n") == "proxy"
    for stream in (b"<13>x", b"12 <13>x", b"\x16\x03\x01", b"1 open", b"PROXZ", b"\r\n<"):
        assert sniff(stream) == "stream"
