"""A REAL HAProxy (Debian's, `mode tcp`) in front of a forwarder TCP listener with
listen.proxy_protocol = ["127.0.0.1/32"]: `server ... send-proxy-v2` (with health checks,
which HAProxy sends as LOCAL headers) and `send-proxy` (v1).

Senders bound to 127.0.0.2 and 127.0.0.3 (plain sockets: rsyslog's omfwd cannot bind its
TCP source address) connect to HAProxy; the forwarder must see them, not HAProxy, as the
source of their events. A direct connection from 127.0.0.4 sending a PROXY header of its own
is refused and counted. In-process (a recording route table, as in test_proxy_listeners),
then once through the real daemon: its config, its log lines, the events at the intake.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon
from devtools.probe import until, wait_until
from devtools.traffic import octet_counted
from haproxy_forwarder.sources import TcpSource
from tests.fake_intake import FakeIntake
from tests.realpeers import HaproxyProcess, free_port, needs
from tests.test_hostile import hp
from tests.test_proxy_listeners import (
    OUTSIDER,
    Routes,
    closed,
    connect,
    context,
    listen,
    message,
    run,
    v1,
)

pytestmark = [pytest.mark.timeout(90), needs("haproxy")]

SENDERS = ("127.0.0.2", "127.0.0.3")
# Through HAProxy, but not in listen.allow: denied on its real address.
DENIED = "127.0.0.5"


def haproxy_cfg(forwarder: int, fe_v2: int, fe_v1: int) -> str:
    """Two TCP frontends to the one forwarder port: PROXY v2 (health checks every 100 ms,
    so several LOCAL headers come during a test) and PROXY v1."""
    return f"""global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe_v2
    bind 127.0.0.1:{fe_v2}
    default_backend be_v2

backend be_v2
    server fwd 127.0.0.1:{forwarder} send-proxy-v2 check inter 100ms

frontend fe_v1
    bind 127.0.0.1:{fe_v1}
    default_backend be_v1

backend be_v1
    server fwd 127.0.0.1:{forwarder} send-proxy
"""


def send_via(port: int, source: str, data: bytes) -> None:
    """One connection from `source` to HAProxy: `data`, then a FIN, then wait for HAProxy to
    close (the forwarder closed its side: everything was read)."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_haproxy_in_front_the_sources_are_the_senders(version: str, tmp_path: Path) -> None:
    async def main() -> None:
        routes = Routes()
        allow = [f"{s}/32" for s in (*SENDERS, OUTSIDER)]
        src = TcpSource(context(routes), "127.0.0.1:0", listen(allow=allow))
        _, port = await src.start()
        fe_v2, fe_v1 = free_port(), free_port()
        hap = await asyncio.to_thread(HaproxyProcess, tmp_path / "hap",
                                      haproxy_cfg(port, fe_v2, fe_v1), port=fe_v2)
        try:
            front = fe_v2 if version == "v2" else fe_v1
            for n in range(3):
                for sender in SENDERS:
                    data = message(f"{sender}-{n}")
                    await asyncio.to_thread(send_via, front, sender, data)
            for sender in SENDERS:
                await until(lambda s=sender: len(routes.texts(s)) == 3,
                            what=f"the events of {sender}", detail=hap.output)
                assert routes.texts(sender) == [f"{sender}-{n}" for n in range(3)]
            # HAProxy's own address is the source of no event.
            assert routes.texts("127.0.0.1") == []
            # Through HAProxy but not in listen.allow: denied on the sender's address; the
            # line names HAProxy too.
            await asyncio.to_thread(send_via, front, DENIED, message("denied"))
            log = src.ctx.log
            await until(lambda: log.named("connection_denied"), what="the denial")
            [denied] = log.named("connection_denied")
            assert denied["peer"].startswith(f"{DENIED}:")
            assert denied["via"].startswith("127.0.0.1:")
            # Straight to the forwarder with a header of its own: refused, counted.
            r, w = await connect(port, OUTSIDER)
            w.write(v1("10.6.6.6") + message("spoofed"))
            await closed(r)
            assert src.stats.proxy_refused.get("not_allowed") == 1
            [line] = [f for f in log.named("proxy_header_refused")
                      if f["reason"] == "not_allowed"]
            assert line["peer"].startswith(f"{OUTSIDER}:")
            # HAProxy's health checks (LOCAL headers) are read, admitted as HAProxy itself
            # (though not in listen.allow), and refused nothing.
            if version == "v2":
                await until(lambda: src.stats.proxy_headers >= 7 + 3,
                            what="a few health checks", detail=hap.output)
            assert set(src.stats.proxy_refused) == {"not_allowed"}
            assert src.stats.access_denied == 1
            assert "DOWN" not in hap.output()
        finally:
            await asyncio.to_thread(hap.stop)
            await src.stop(0.1)

    run(main())


def test_daemon_behind_haproxy(intake: FakeIntake, daemon: Any, tmp_path: Path) -> None:
    """listen.proxy_protocol in the daemon's config: events through HAProxy delivered, an
    outsider's header refused and logged."""
    d: Daemon = daemon(intake, listen={"tcp": ["127.0.0.1:0"], "udp": [],
                                       "proxy_protocol": ["127.0.0.1/32"]})
    fe_v2, fe_v1 = free_port(), free_port()
    with HaproxyProcess(tmp_path / "hap", haproxy_cfg(d.tcp_port, fe_v2, fe_v1), port=fe_v2):
        send_via(fe_v2, SENDERS[0], octet_counted([hp("via-v2")]))
        send_via(fe_v1, SENDERS[1], octet_counted([hp("via-v1")]))
        wait_until(lambda: sorted(intake.event_texts()) == ["via-v1", "via-v2"],
                   what="both events at the intake", detail=d.stderr_text)
        send_via(d.tcp_port, OUTSIDER, v1("10.6.6.6") + octet_counted([hp("spoofed")]))
        [line] = wait_until(lambda: d.events("proxy_header_refused"),
                            what="the outsider refused", detail=d.stderr_text)
        assert line["reason"] == "not_allowed" and line["peer"].startswith(f"{OUTSIDER}:")
        assert d.events("connection_denied") == []
    assert "spoofed" not in intake.event_texts()
