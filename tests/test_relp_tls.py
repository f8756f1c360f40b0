"""RELP over TLS (relp.tls = true, as omrelp tls="on" sends it), with the [tls] of listen.tls.

Against the real daemon (devtools/daemon.py, with its spool) and the FakeIntake: a Python
RELP client over ssl (the client of test_relp_source.py on an ssl stream) is answered only
once its messages are durable, and the intake gets them byte for byte; clients without a
certificate, or with a name outside tls.allowed_names, are refused at the handshake (counted
for the relp:// listener, nothing delivered); a plain RELP client on the TLS port is closed;
handshakes in progress count against listen.max_connections_per_address; a listener added by
SIGHUP speaks TLS too. Then real rsyslog: omrelp with the shipped rule
config/rsyslog/haproxy-forwarder-relp-tls.conf, with each of librelp's TLS libraries
(Debian's librelp 1.11 is built with both: `tls.tlslib="bogus"` makes rsyslogd -N1 say it
"only supports 'gnutls', 'openssl'"), 10k events exactly once; refused by the forwarder
(tls.allowed_names) and refusing it (tls.permittedPeer).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from devtools.daemon import Daemon, run_cli, write_toml
from devtools.probe import metric, until, wait_at_rest, wait_until
from devtools.traffic import haproxy_line as traffic_line
from haproxy_forwarder.relp import build_frame
from tests.fake_intake import VALID_KEY, FakeIntake
from tests.realpeers import RelpTlsRsyslogProcess, needs
from tests.test_hostile import hp
from tests.test_metrics import scrape, value
from tests.test_relp_source import OFFERS, RelpClient
from tests.test_tls import SERVER_NAME, Pki, client_context, refused, tag, tls_section

pytestmark = pytest.mark.timeout(60)

MakeDaemon = Callable[..., Daemon]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    return Pki(d, trustme.CA(), trustme.CA())


def relp_tls_daemon(daemon: MakeDaemon, intake: FakeIntake, pki: Pki,
                    listen: dict[str, Any] | None = None, **tls: Any) -> Daemon:
    return daemon(intake, listen={"tcp": [], "udp": [], "relp": ["127.0.0.1:0"], **(listen or {})},
                  relp={"tls": True}, tls=tls_section(pki, **tls))


def relp_ports(d: Daemon) -> list[int]:
    return [int(r["port"]) for r in d.events("listening") if r.get("proto") == "relp"]


def relp_listener(port: int) -> str:
    return f"relp://127.0.0.1:{port}"


async def tls_client(port: int, ctx: ssl.SSLContext) -> RelpClient:
    """A RELP session over TLS, opened (answered 200 OK)."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                         server_hostname=SERVER_NAME)
    c = RelpClient(r, w)
    t = c.send("open", OFFERS)
    await c.wait_for([t])
    assert c.answers[t].startswith(b"200 OK\n"), c.answers[t]
    return c


def messages(t: str) -> list[str]:
    """What the intake must get back exactly: spaces, UTF-8, quotes, frames larger than a TLS
    record (16 KiB)."""
    out = [f"{t} {i} GET /p?q=\"x y\" \u00e9t\u00e9 \u2713" for i in range(200)]
    out += [f"{t} big {i} " + "z" * 60_000 for i in range(3)]
    return out


# -- a Python client over ssl --------------------------------------------------------------------


def test_answered_once_durable_and_delivered_byte_for_byte(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    intake.set_down(True)
    d = relp_tls_daemon(daemon, intake, pki)
    port = relp_ports(d)[0]
    line = next(r for r in d.events("listening") if r.get("proto") == "relp")
    assert line["tls"] is True and line["client_certificates"] is True
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    want = messages(tag())

    async def main() -> None:
        c = await tls_client(port, ctx)
        ts = [c.send("syslog", hp(m)) for m in want]
        await c.wait_for(ts, timeout=20)
        assert all(c.answers[t] == b"200 OK" for t in ts)
        # Answered with the intake down: in the spool, fsync'd.
        assert metric(d.status_port, "spool_appended_events_total") >= len(want)
        assert intake.events == []
        t = c.send("close")
        await c.wait_for([t])
        await c.wait_eof()

    asyncio.run(main())
    intake.set_down(False)
    assert intake.wait_for(len(want), timeout=20)
    wait_at_rest(d.status_port, detail=d.stderr_text)  # nothing held: no duplicate to come
    assert Counter(intake.event_texts()) == Counter(want)
    m = scrape(d.status_port)
    name = relp_listener(port)
    assert value(m, "tls_handshakes_total", listener=name) == 1
    assert value(m, "relp_acks_total", listener=name) == len(want)
    assert value(m, "connections_accepted_total", listener=name) == 1
    assert d.stop() == 0


@pytest.mark.parametrize("case", ["no_certificate", "name_not_allowed", "untrusted"])
def test_refused_at_the_handshake_nothing_delivered(
        case: str, intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    d = relp_tls_daemon(daemon, intake, pki)
    port = relp_ports(d)[0]
    cert = {"no_certificate": None,
            "name_not_allowed": pki.leaf("intruder.example.net"),
            "untrusted": pki.leaf("client1.example.org", pki.other_ca)}[case]
    t = tag()
    # What librelp sends at once: open, then syslog pipelined behind it.
    session = build_frame(1, "open", OFFERS) + build_frame(2, "syslog", hp(f"{t} refused"))
    for _ in range(2):
        refused(port, client_context(pki, cert), session)
    name = relp_listener(port)
    assert wait_until(
        lambda: value(scrape(d.status_port), "tls_handshakes_refused_total",
                      listener=name, reason=case) == 2, 10)
    lines = [r for r in d.events("tls_refused") if r["reason"] == case]
    assert len(lines) == 1 and lines[0]["listener"] == name, lines
    # A good client on the same listener meanwhile.
    good = client_context(pki, pki.leaf("client2.example.org"))

    async def main() -> None:
        c = await tls_client(port, good)
        s = c.send("syslog", hp(f"{t} good"))
        await c.wait_for([s])
        await c.close()

    asyncio.run(main())
    assert intake.wait_for(1, timeout=10), f"events at the intake: want 1, got {len(intake.events)}"
    wait_at_rest(d.status_port, detail=d.stderr_text)  # a refused one would be there now
    assert intake.event_texts() == [f"{t} good"]
    m = scrape(d.status_port)
    # Refused before any RELP byte was read: no session, no command.
    assert value(m, "connections_accepted_total", listener=name) == 1
    assert value(m, "relp_commands_total", listener=name, command="open") == 1
    assert value(m, "tls_handshakes_total", listener=name) == 1


def plain_relp_closed(port: int, message: bytes) -> None:
    """A RELP session in clear: not TLS, closed, never answered (at most a TLS alert comes
    back, no RELP frame). Closed at once, not by the handshake timeout: the callers check
    the refusal's reason, protocol_error."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(build_frame(1, "open", OFFERS) + build_frame(2, "syslog", message))
        data = b""
        try:
            while chunk := plain.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    assert b"rsp" not in data and b"200 OK" not in data, data


def test_plain_relp_client_on_the_tls_port_is_closed(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    d = relp_tls_daemon(daemon, intake, pki, handshake_timeout=2.0)
    port = relp_ports(d)[0]
    t = tag()
    # Connected, waiting (for a server greeting RELP has not): closed by the timeout.
    # (By the timeout, not for anything it did: the refusal's reason, checked below.)
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert silent.recv(1) == b""
    silent.close()
    # Sending its open in clear, as omrelp without tls="on" does: closed at once.
    plain_relp_closed(port, hp(f"{t} plain"))
    name = relp_listener(port)
    m = scrape(d.status_port)
    assert value(m, "tls_handshakes_refused_total", listener=name,
                 reason="handshake_timeout") == 1
    assert value(m, "tls_handshakes_refused_total", listener=name,
                 reason="protocol_error") == 1
    assert intake.event_texts() == []


def test_handshakes_count_against_the_per_address_cap_and_end_at_sigterm(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    """An open session and a handshake in progress are two of
    listen.max_connections_per_address; at SIGTERM the session gets serverclose and the
    handshake is aborted."""
    d = relp_tls_daemon(daemon, intake, pki, listen={"max_connections_per_address": 2},
                        handshake_timeout=30.0)
    port = relp_ports(d)[0]
    name = relp_listener(port)
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()

    async def main() -> None:
        c = await tls_client(port, ctx)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        await until(lambda: value(scrape(d.status_port), "tls_handshakes_in_progress") == 1,
                    15, "the stalled handshake in progress")
        third = socket.create_connection(("127.0.0.1", port), timeout=5)
        with contextlib.suppress(ConnectionResetError):
            assert third.recv(1) == b""
        third.close()
        m = scrape(d.status_port)
        assert value(m, "connections_refused_total", listener=name) == 1
        assert value(m, "tls_handshakes_total", listener=name) == 1
        # Another address is not held back.
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                             server_hostname=SERVER_NAME,
                                             local_addr=("127.0.0.2", 0))
        other = RelpClient(r, w)
        await other.wait_for([other.send("open", OFFERS)])
        s = other.send("syslog", hp(f"{t} other host"))
        await other.wait_for([s])
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        await c.wait_eof()
        assert [h.command for h in c.hints] == ["serverclose"]
        with contextlib.suppress(ConnectionResetError):
            assert stalled.recv(1) == b""
        stalled.close()
        await other.close()
        await c.close()

    asyncio.run(main())
    assert d.stop() == 0
    assert "Traceback" not in d.stderr_text()


def test_sighup_adds_a_tls_relp_listener(intake: FakeIntake, daemon: MakeDaemon,
                                         pki: Pki) -> None:
    """relp.tls is restart-only; a listener added by SIGHUP speaks TLS like the others."""
    d = relp_tls_daemon(daemon, intake, pki)
    cfg = d.config
    cfg["listen"]["relp"] = ["127.0.0.1:0", "127.0.0.1:0"]
    write_toml(d.config_path, cfg)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("reloaded")
    added = [int(r["port"]) for r in d.events("listening")
             if r.get("proto") == "relp" and r.get("reload")]
    assert len(added) == 1
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()

    async def main() -> None:
        c = await tls_client(added[0], ctx)
        s = c.send("syslog", hp(f"{t} added"))
        await c.wait_for([s])
        await c.close()

    asyncio.run(main())
    assert intake.wait_for(1, timeout=10), f"events at the intake: want 1, got {len(intake.events)}"
    # In clear on the new listener: refused as on the first.
    plain_relp_closed(added[0], hp(f"{t} plain"))
    name = relp_listener(added[0])
    assert wait_until(lambda: value(scrape(d.status_port), "tls_handshakes_refused_total",
                                    listener=name, reason="protocol_error") == 1, 5)
    assert value(scrape(d.status_port), "tls_handshakes_total", listener=name) == 1
    assert intake.event_texts() == [f"{t} added"]
    assert d.stop() == 0


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_relp_tls_without_certificate_is_one_config_line(command: str, tmp_path: Path) -> None:
    cfg = {"listen": {"tcp": [], "udp": [], "relp": ["127.0.0.1:0"]},
           "relp": {"tls": True},
           "spool": {"dir": str(tmp_path / "spool")},
           "log": {"format": "json"},
           "intake": {"key": VALID_KEY, "url": "https://127.0.0.1:9", "timeout": 1.0}}
    path = tmp_path / "config.toml"
    write_toml(path, cfg)
    res = run_cli("--config", str(path), command, timeout=20)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == 2, out
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: tls.cert_file: missing"), out
    assert VALID_KEY not in out
    # Without listen.relp, relp.tls needs no certificate.
    cfg["listen"] = {"tcp": ["127.0.0.1:0"], "udp": []}
    write_toml(path, cfg)
    assert run_cli("--config", str(path), "check-config").returncode == 0


# -- real rsyslog: omrelp tls="on" -----------------------------------------------------------------

N = 10_000


def feed(socket_path: Path, lines: list[str]) -> None:
    """Into rsyslog's imuxsock socket as a local program writes; a blocking unix datagram
    send waits while rsyslog's queue is full instead of dropping."""
    stamp = time.strftime("%b %e %H:%M:%S").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(20)
        s.connect(str(socket_path))
        for line in lines:
            s.send(b"<134>" + stamp + b" haproxy[4242]: " + line.encode())


def rsyslog_certs(ca: trustme.CA, certs: Path) -> None:
    """ca.pem, client.pem, client.key as the shipped rule names them, and the forwarder's."""
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    client = ca.issue_cert("rsyslog1.example.org", common_name="rsyslog1.example.org")
    client.cert_chain_pems[0].write_to_path(str(certs / "client.pem"))
    client.private_key_pem.write_to_path(str(certs / "client.key"))
    (certs / "client.key").chmod(0o600)
    server = ca.issue_cert("forwarder.example.org", common_name="forwarder.example.org")
    server.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    server.private_key_pem.write_to_path(str(certs / "server.key"))


def start_relp_tls(tmp_path: Path, intake: FakeIntake, daemon: MakeDaemon,
                   server_name: str | None = None,
                   allowed: list[str] | None = None) -> tuple[Daemon, int, Path]:
    """Certificates for rsyslog and the forwarder (named `server_name` if given, in place of
    the one rsyslog expects) and the daemon with one RELP-over-TLS listener requiring client
    certificates (named `allowed`, if given): (daemon, port, certificates folder)."""
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    rsyslog_certs(ca, certs)
    if server_name is not None:
        other = ca.issue_cert(server_name, common_name=server_name)
        other.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
        other.private_key_pem.write_to_path(str(certs / "server.key"))
    tls: dict[str, Any] = {"cert_file": str(certs / "server.pem"),
                           "key_file": str(certs / "server.key"),
                           "client_ca_file": str(certs / "ca.pem")}
    if allowed is not None:
        tls["allowed_names"] = allowed
    d = daemon(intake, listen={"tcp": [], "udp": [], "relp": ["127.0.0.1:0"]},
               relp={"tls": True}, tls=tls)
    return d, relp_ports(d)[0], certs


@needs("rsyslogd")
@pytest.mark.parametrize("tlslib", ["openssl", "gnutls"])
def test_rsyslog_omrelp_tls_10k_exactly_once(tlslib: str, tmp_path: Path, intake: FakeIntake,
                                             daemon: MakeDaemon) -> None:
    d, port, certs = start_relp_tls(tmp_path, intake, daemon, allowed=["*.example.org"])
    lines = [f"{tlslib} {i:05d} {traffic_line(i)}" for i in range(N)]
    with RelpTlsRsyslogProcess(tmp_path / "rsyslog", "127.0.0.1", port, certs, tlslib,
                               substitutions={'action.resumeInterval="10"':
                                              'action.resumeInterval="1"'}) as rs:
        feed(rs.socket_path, lines)
        ok = intake.wait_for(N, 20)
        assert ok, (f"{len(intake.events)} of {N}; rsyslog: "
                    f"{rs.all_log_path.read_text()[-2000:] if rs.all_log_path.exists() else ''}")
        # rsyslog still connected: nothing held by the forwarder, so no duplicate to come.
        wait_at_rest(d.status_port, closed=False, detail=d.stderr_text)
    got = Counter(intake.event_texts())
    assert got == Counter(lines), (
        f"missing {len(set(lines) - set(got))}, duplicates {sum(n - 1 for n in got.values())}")
    m = scrape(d.status_port)
    name = relp_listener(port)
    assert value(m, "tls_handshakes_total", listener=name) >= 1
    assert value(m, "relp_acks_total", listener=name) >= N
    assert sum(v for (n, _), v in m.items() if n.endswith("tls_handshakes_refused_total")) == 0
    assert d.stop() == 0


@needs("rsyslogd")
def test_rsyslog_omrelp_tls_name_not_allowed_is_refused(tmp_path: Path, intake: FakeIntake,
                                                       daemon: MakeDaemon) -> None:
    d, port, certs = start_relp_tls(tmp_path, intake, daemon, allowed=["rsyslog2.example.org"])
    name = relp_listener(port)
    with RelpTlsRsyslogProcess(tmp_path / "rsyslog", "127.0.0.1", port, certs,
                               substitutions={'action.resumeInterval="10"':
                                              'action.resumeInterval="1"'}) as rs:
        feed(rs.socket_path, [f"refused {i}" for i in range(10)])
        assert wait_until(lambda: value(scrape(d.status_port), "tls_handshakes_refused_total",
                                        listener=name, reason="name_not_allowed") >= 1, 15)
    assert intake.event_texts() == []
    lines = [r for r in d.events("tls_refused") if r["reason"] == "name_not_allowed"]
    assert lines and lines[0]["names"] == ["rsyslog1.example.org"], lines


@needs("rsyslogd")
@pytest.mark.parametrize("tlslib", ["openssl", "gnutls"])
def test_rsyslog_omrelp_tls_checks_the_forwarder_name(tlslib: str, tmp_path: Path,
                                                      intake: FakeIntake,
                                                      daemon: MakeDaemon) -> None:
    """The shipped rule's tls.authMode="name": a forwarder certificate of the right CA but
    another name is refused by omrelp, with either library (the GnuTLS one says so: which
    library runs is the one the rule names)."""
    d, port, certs = start_relp_tls(tmp_path, intake, daemon, server_name="other.example.org")
    with RelpTlsRsyslogProcess(tmp_path / "rsyslog", "127.0.0.1", port, certs, tlslib,
                               substitutions={'action.resumeInterval="10"':
                                              'action.resumeInterval="1"'}) as rs:
        feed(rs.socket_path, [f"wrong server {i}" for i in range(10)])

        def rsyslog_says() -> str:
            return rs.all_log_path.read_text() if rs.all_log_path.exists() else ""

        assert wait_until(lambda: "no permited name found" in rsyslog_says(), 15)
        assert ("gnutls error" in rsyslog_says()) == (tlslib == "gnutls"), rsyslog_says()[-1500:]
    assert intake.event_texts() == []
    # GnuTLS fails the handshake; OpenSSL's librelp checks the name after it and closes: no
    # RELP command came either way.
    m = scrape(d.status_port)
    assert sum(v for (n, labels), v in m.items() if n.endswith("relp_commands_total")) == 0
