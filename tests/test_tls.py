"""listen.tls (RFC 5425) against the real daemon, with Python ssl clients over real sockets.

A trustme CA signs the daemon's certificate and the clients' (CN and DNS SAN
`<name>.example.org`); a second CA signs the intruder's. Refused peers must be closed before
any byte of theirs is read (nothing at the intake), counted on /metrics by reason and logged
once per address.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from devtools.daemon import Daemon, run_cli, write_toml
from devtools.probe import wait_until
from devtools.traffic import lf_framed, octet_counted
from haproxy_forwarder.tlscontext import name_allowed
from tests.fake_intake import VALID_KEY, FakeIntake
from tests.test_hostile import _wait_events, hp, stop_counters
from tests.test_metrics import scrape, value
from tests.test_reload import hup

pytestmark = pytest.mark.timeout(60)

MakeDaemon = Callable[..., Daemon]
SERVER_NAME = "forwarder.test"


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA
    other_ca: trustme.CA

    def leaf(self, name: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        """(cert, key) files of a certificate for `name` (CN and DNS SAN)."""
        cert = (ca or self.ca).issue_cert(name, common_name=name)
        stem = self.dir / f"{name}-{uuid.uuid4().hex[:6]}"
        cert.cert_chain_pems[0].write_to_path(str(stem) + ".crt")
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(stem) + ".crt", append=True)
        cert.private_key_pem.write_to_path(str(stem) + ".key")
        return Path(str(stem) + ".crt"), Path(str(stem) + ".key")

    @property
    def ca_file(self) -> Path:
        path = self.dir / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    return Pki(d, trustme.CA(), trustme.CA())


def tls_section(pki: Pki, **extra: Any) -> dict[str, Any]:
    cert, key = pki.leaf(SERVER_NAME)
    return {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(pki.ca_file),
            "allowed_names": ["*.example.org"], "handshake_timeout": 1.0, **extra}


def start(daemon: MakeDaemon, intake: FakeIntake, pki: Pki, listen: dict[str, Any] | None = None,
          sections: dict[str, Any] | None = None, **tls: Any) -> Daemon:
    return daemon(intake, listen={"tcp": ["127.0.0.1:0"], "udp": [], "tls": ["127.0.0.1:0"],
                                  **(listen or {})},
                  tls=tls_section(pki, **tls), **(sections or {}))


def tls_ports(d: Daemon) -> list[int]:
    return [int(r["port"]) for r in d.events("listening") if r.get("proto") == "tls"]


def listener(d: Daemon, port: int | None = None) -> str:
    return f"tls://127.0.0.1:{port or tls_ports(d)[0]}"


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def connect(port: int, ctx: ssl.SSLContext, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname=SERVER_NAME)


def send(port: int, ctx: ssl.SSLContext, payload: bytes) -> None:
    """Send over one TLS connection, then wait for the daemon to close after our close_notify
    and FIN: everything was read before we return."""
    with connect(port, ctx) as s:
        s.sendall(payload)
        raw = s.unwrap()
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(10)
        while raw.recv(4096):
            pass
        raw.close()


def refused(port: int, ctx: ssl.SSLContext, payload: bytes) -> str:
    """Try to send; the daemon must close on us. What the client saw, for messages."""
    try:
        with connect(port, ctx, timeout=5) as s:
            s.sendall(payload)
            data = s.recv(4096)  # the alert or the close: never an answer
            assert not data, data
            return "closed"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return type(exc).__name__
    except TimeoutError:  # pragma: no cover - what the test must catch
        raise AssertionError("the daemon kept a refused peer open") from None


def refusals(d: Daemon, reason: str, port: int | None = None) -> float:
    m = scrape(d.status_port)
    return value(m, "tls_handshakes_refused_total", listener=listener(d, port), reason=reason)


def tag() -> str:
    return uuid.uuid4().hex[:10]


# -- delivery ------------------------------------------------------------------------------------


def test_octet_counted_and_lf_delivered_with_client_certificate(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    d = start(daemon, intake, pki)
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()
    octet = [f"{t} octet {i} " + "x" * (i * 37 % 3000) for i in range(300)]
    lf = [f"{t} lf {i}" for i in range(300)]
    send(port, ctx, octet_counted(hp(x) for x in octet))
    send(port, ctx, lf_framed(hp(x) for x in lf))
    _wait_events(intake, octet + lf)
    m = scrape(d.status_port)
    name = listener(d)
    assert value(m, "tls_handshakes_total", listener=name) == 2
    assert value(m, "received_frames_total", listener=name, framing="octet") == 300
    assert value(m, "received_frames_total", listener=name, framing="lf") == 300
    assert value(m, "connections_accepted_total", listener=name) == 2
    assert value(m, "buffered_bytes") == 0
    c = stop_counters(d)
    assert c["tls_handshakes"] == 2 and c["tls_handshakes_refused"] == 0


def test_big_frames_across_records_and_a_slow_writer(intake: FakeIntake, daemon: MakeDaemon,
                                                     pki: Pki) -> None:
    """Frames larger than a TLS record (16 KiB), and bytes written one record at a time."""
    d = start(daemon, intake, pki)
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()
    lines = [f"{t} big {i} " + "y" * 60_000 for i in range(5)]
    payload = octet_counted(hp(x) for x in lines)
    with connect(port, ctx) as s:
        for off in range(0, len(payload), 7000):
            s.sendall(payload[off:off + 7000])
    _wait_events(intake, lines)
    assert d.proc is not None and d.proc.poll() is None


# -- refused peers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no_certificate", "untrusted", "name_not_allowed"])
def test_refused_at_the_handshake(case: str, intake: FakeIntake, daemon: MakeDaemon,
                                  pki: Pki) -> None:
    d = start(daemon, intake, pki)
    port = tls_ports(d)[0]
    cert = {"no_certificate": None,
            "untrusted": pki.leaf("client1.example.org", pki.other_ca),
            "name_not_allowed": pki.leaf("intruder.example.net")}[case]
    ctx = client_context(pki, cert)
    t = tag()
    for i in range(3):  # three tries from the same address: counted thrice, logged once
        refused(port, ctx, octet_counted([hp(f"{t} refused {i}")]))
    assert wait_until(lambda: refusals(d, case) == 3, 10)
    # A good client on the same listener meanwhile.
    good = client_context(pki, pki.leaf("client2.example.org"))
    send(port, good, octet_counted([hp(f"{t} good")]))
    _wait_events(intake, [f"{t} good"])
    assert not [e for e in intake.event_texts() if "refused" in e]
    lines = [r for r in d.events("tls_refused") if r["reason"] == case]
    assert len(lines) == 1, lines
    assert lines[0]["peer"].startswith("127.0.0.1:")
    if case == "name_not_allowed":
        assert lines[0]["names"] == ["intruder.example.net"]
    m = scrape(d.status_port)
    assert value(m, "tls_handshakes_total", listener=listener(d)) == 1
    # Refused before any byte was read: none counted.
    assert value(m, "connections_accepted_total", listener=listener(d)) == 1


def test_plain_tcp_client_closed_after_the_timeout_others_unharmed(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    d = start(daemon, intake, pki, handshake_timeout=3.0)
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()
    # Silent plain-TCP client: closed by the handshake timeout.
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened = time.monotonic()
    # Meanwhile a TLS client delivers, handshaking while the silent one waits.
    with connect(port, ctx) as s:
        s.sendall(octet_counted([hp(f"{t} meanwhile {i}") for i in range(50)]))
        _wait_events(intake, [f"{t} meanwhile {i}" for i in range(50)])
        # Served while the silent one still held its handshake: it is open yet.
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)
        silent.settimeout(10)
        assert silent.recv(1) == b""  # blocks until the daemon closes it (or 10 s: fails)
        # Not before tls.handshake_timeout: a timer never fires early, so this cannot flake.
        assert time.monotonic() - opened >= 2.8
        # The TLS connection is still open and delivering.
        s.sendall(octet_counted([hp(f"{t} after")]))
        _wait_events(intake, [f"{t} meanwhile {i}" for i in range(50)] + [f"{t} after"])
    silent.close()
    # A plain-TCP client talking syslog: not TLS, closed at once.
    # Closed at once, not by the 3 s handshake timeout: a recv blocked for 2 s fails the test.
    talker = socket.create_connection(("127.0.0.1", port), timeout=2)
    talker.sendall(octet_counted([hp(f"{t} plain")]))
    data = b""
    try:
        while chunk := talker.recv(4096):
            data += chunk  # at most a TLS alert
    except ConnectionResetError:
        pass
    talker.close()
    assert wait_until(lambda: refusals(d, "handshake_timeout") == 1, 5)
    assert wait_until(lambda: refusals(d, "protocol_error") == 1, 5)
    assert not [e for e in intake.event_texts() if "plain" in e]
    reasons = sorted(r["reason"] for r in d.events("tls_refused"))
    assert reasons == ["handshake_timeout", "protocol_error"]


def test_handshake_cap(intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    """At tls.max_handshakes a new connection takes the slot of the oldest stalled handshake
    (of the address holding the most: here the only one); the cap itself holds."""
    d = start(daemon, intake, pki, max_handshakes=3, handshake_timeout=30.0)
    port = tls_ports(d)[0]
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    assert wait_until(lambda: value(scrape(d.status_port), "tls_handshakes_in_progress") == 3)
    stalled.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    oldest = stalled.pop(0)
    with contextlib.suppress(ConnectionResetError):
        assert oldest.recv(1) == b""  # closed (reset) for the newcomer
    oldest.close()
    assert wait_until(lambda: refusals(d, "too_many_handshakes") == 1, 5)
    assert value(scrape(d.status_port), "tls_handshakes_in_progress") == 3
    # A slot freed, a real client gets in.
    stalled.pop().close()
    assert wait_until(lambda: value(scrape(d.status_port), "tls_handshakes_in_progress") == 2)
    t = tag()
    send(port, client_context(pki, pki.leaf("client1.example.org")),
         octet_counted([hp(f"{t} in")]))
    _wait_events(intake, [f"{t} in"])
    for s in stalled:
        s.close()
    assert wait_until(lambda: value(scrape(d.status_port), "tls_handshakes_in_progress") == 0)
    assert wait_until(lambda: refusals(d, "closed_in_handshake") == 3, 5)


def test_one_host_cannot_take_every_handshake_slot(intake: FakeIntake, daemon: MakeDaemon,
                                                   pki: Pki) -> None:
    """Handshakes in progress count against listen.max_connections_per_address."""
    d = start(daemon, intake, pki, listen={"max_connections_per_address": 2},
              max_handshakes=10, handshake_timeout=30.0)
    port = tls_ports(d)[0]
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    assert wait_until(lambda: value(scrape(d.status_port), "tls_handshakes_in_progress") == 2)
    third = socket.create_connection(("127.0.0.1", port), timeout=5)
    with contextlib.suppress(ConnectionResetError):
        assert third.recv(1) == b""
    third.close()
    m = scrape(d.status_port)
    assert value(m, "connections_refused_total", listener=listener(d)) == 1
    t = tag()
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0),
                                  timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s:
        s.sendall(octet_counted([hp(f"{t} other host")]))
        _wait_events(intake, [f"{t} other host"])
    for sock in stalled:
        sock.close()


def test_min_version_13_refuses_a_12_only_client(intake: FakeIntake, daemon: MakeDaemon,
                                                 pki: Pki) -> None:
    d = start(daemon, intake, pki, min_version="1.3")
    port = tls_ports(d)[0]
    cert = pki.leaf("client1.example.org")
    t = tag()
    old = client_context(pki, cert, ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError), connect(port, old) as s:
        s.sendall(octet_counted([hp(f"{t} old")]))
        s.recv(1)
    assert wait_until(lambda: refusals(d, "protocol_error") == 1, 5)
    with connect(port, client_context(pki, cert)) as s:
        assert s.version() == "TLSv1.3"
    send(port, client_context(pki, cert), octet_counted([hp(f"{t} new")]))
    _wait_events(intake, [f"{t} new"])


def test_without_client_ca_any_client_is_served(intake: FakeIntake, daemon: MakeDaemon,
                                                pki: Pki) -> None:
    cert, key = pki.leaf(SERVER_NAME)
    d = daemon(intake, listen={"tcp": [], "udp": [], "tls": ["127.0.0.1:0"]},
               tls={"cert_file": str(cert), "key_file": str(key)})
    t = tag()
    send(tls_ports(d)[0], client_context(pki), lf_framed([hp(f"{t} anonymous")]))
    _wait_events(intake, [f"{t} anonymous"])


# -- the TCP source's limits, behind TLS -----------------------------------------------------------


def test_allow_list_checked_before_the_handshake(intake: FakeIntake, daemon: MakeDaemon,
                                                 pki: Pki) -> None:
    d = start(daemon, intake, pki, listen={"allow": ["127.0.0.1/32"]})
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    raw = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0),
                                   timeout=5)
    # Closed at once, before any ServerHello: no handshake was spent on it.
    with contextlib.suppress(ConnectionResetError):
        assert raw.recv(4096) == b""
    raw.close()
    t = tag()
    send(port, ctx, octet_counted([hp(f"{t} allowed")]))
    _wait_events(intake, [f"{t} allowed"])
    m = scrape(d.status_port)
    assert value(m, "access_denied_total", listener=listener(d)) == 1
    assert value(m, "tls_handshakes_total", listener=listener(d)) == 1
    assert sum(v for (n, _), v in m.items() if n.endswith("tls_handshakes_refused_total")) == 0
    assert len(d.events("connection_denied")) == 1


def test_partial_frames_count_in_the_budget_and_the_biggest_is_shed(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    d = start(daemon, intake, pki, listen={"max_buffered_bytes": 64 * 1024})
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    small = connect(port, ctx)
    small.sendall(b"40000 " + b"s" * 20_000)  # a frame of 40000 bytes, half of it sent
    assert wait_until(lambda: value(scrape(d.status_port), "buffered_bytes") >= 20_000)
    big = connect(port, ctx)
    big.sendall(b"100000 " + b"b" * 50_000)  # the two together: over 64 KiB
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        assert big.recv(1) == b""  # shed: the one holding the most
    big.close()
    m = scrape(d.status_port)
    assert value(m, "connections_shed_total", listener=listener(d)) == 1
    assert 20_000 <= value(m, "buffered_bytes") < 64 * 1024
    t = tag()
    small.sendall(b"x" * 20_000)  # completes its frame (not HAProxy: filtered), under the cap
    small.sendall(octet_counted([hp(f"{t} small one")]))
    assert wait_until(lambda: any(e == f"{t} small one" for e in intake.event_texts()))
    assert wait_until(lambda: value(scrape(d.status_port), "buffered_bytes") == 0)
    small.close()


def test_framing_errors_close_that_connection_rate_limited(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    d = start(daemon, intake, pki)
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()
    steady = connect(port, ctx)
    steady.sendall(octet_counted([hp(f"{t} steady before")]))
    for i in range(5):
        with connect(port, ctx) as s:
            s.sendall(octet_counted([hp(f"{t} ok {i}")]) + b"12x <13>bad\n")
            with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                assert s.recv(1) == b""
    steady.sendall(octet_counted([hp(f"{t} steady after")]))
    _wait_events(intake, [f"{t} steady before", f"{t} steady after"]
                 + [f"{t} ok {i}" for i in range(5)])
    steady.close()
    assert len(d.events("framing_error")) == 1  # the rest in one summary (rate limit)
    c = stop_counters(d)
    assert c["framing_errors"] == 5
    assert sum(e.get("suppressed", 1) for e in d.events("framing_error")) == 5


def test_sigterm_reads_what_the_sender_still_writes(intake: FakeIntake, daemon: MakeDaemon,
                                                    pki: Pki) -> None:
    """At shutdown a TLS peer gets close_notify and a FIN, and what it still writes is read
    (as on TCP, where rsyslog stops writing at the FIN)."""
    import signal

    d = start(daemon, intake, pki)
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()
    s = connect(port, ctx)
    s.sendall(octet_counted([hp(f"{t} before {i}") for i in range(100)]))
    _wait_events(intake, [f"{t} before {i}" for i in range(100)])
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    d.wait_log("stopping")
    s.sendall(octet_counted([hp(f"{t} during {i}") for i in range(100)]))
    s.settimeout(5)
    with contextlib.suppress(ssl.SSLError, OSError):
        assert s.recv(1) == b""  # the daemon's close_notify
    s.close()
    assert d.proc.wait(20) == 0
    got = intake.event_texts()
    assert all(f"{t} during {i}" in got for i in range(100))


def test_backpressure_pauses_tls_readers_and_loses_nothing(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    """Intake down, spool full (block): TLS reading pauses with records left undecrypted;
    once the intake is back every event arrives exactly once."""
    import threading

    intake.set_down(True)
    d = start(daemon, intake, pki, sections={
        "intake": {"retry_max": 1.0}, "batch": {"max_events": 500},
        "spool": {"max_size": 256 * 1024, "when_full": "block"}})
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    t = tag()
    lines = [f"{t} {i:05d} " + "p" * 300 for i in range(6000)]
    payload = octet_counted(hp(x) for x in lines)
    errors: list[BaseException] = []

    def push() -> None:
        try:
            send(port, ctx, payload)
        except BaseException as exc:
            errors.append(exc)

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    d.wait_log("backpressure_on", timeout=30)
    intake.set_down(False)
    pusher.join(60)
    assert not pusher.is_alive() and not errors, errors
    _wait_events(intake, lines, timeout=60)


# -- SIGHUP ----------------------------------------------------------------------------------------


def server_serial(port: int, ctx: ssl.SSLContext) -> int:
    with connect(port, ctx) as s:
        der = s.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_new_certificate_and_listeners(intake: FakeIntake, daemon: MakeDaemon,
                                             pki: Pki, tmp_path: Path) -> None:
    d = start(daemon, intake, pki)
    port = tls_ports(d)[0]
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    cert_file = Path(d.config["tls"]["cert_file"])
    key_file = Path(d.config["tls"]["key_file"])
    first = server_serial(port, ctx)
    t = tag()
    staying = connect(port, ctx)
    staying.sendall(octet_counted([hp(f"{t} before")]))
    _wait_events(intake, [f"{t} before"])

    # Same paths, new files: new connections see the new certificate, the open one stays.
    new_cert, new_key = pki.leaf(SERVER_NAME)
    cert_file.write_bytes(new_cert.read_bytes())
    key_file.write_bytes(new_key.read_bytes())
    hup(d)
    d.wait_log("tls_certificate_loaded")
    second = server_serial(port, ctx)
    assert second != first
    staying.sendall(octet_counted([hp(f"{t} open one")]))
    _wait_events(intake, [f"{t} before", f"{t} open one"])
    assert staying.getpeercert(binary_form=True) is not None

    # A bad new certificate: refused, the running one stays in force.
    cert_file.write_text("not a certificate\n")
    hup(d)
    failed = d.wait_log("reload_failed")
    assert failed["problem"].startswith("tls.cert_file: "), failed
    assert server_serial(port, ctx) == second

    # A key of another certificate: refused too.
    cert_file.write_bytes(new_cert.read_bytes())
    key_file.write_bytes(pki.leaf(SERVER_NAME)[1].read_bytes())
    hup(d)
    assert wait_until(lambda: len(d.events("reload_failed")) == 2)
    assert "is not the key of" in d.events("reload_failed")[-1]["problem"]
    key_file.write_bytes(new_key.read_bytes())

    # A second TLS listener added, the first removed.
    cfg = dict(d.config)
    cfg["listen"] = {**cfg["listen"], "tls": ["127.0.0.2:0"]}
    write_toml(d.config_path, cfg)
    hup(d)
    assert wait_until(lambda: any(r.get("reload") and r.get("proto") == "tls"
                                  for r in d.events("listening")))
    added = [r for r in d.events("listening") if r.get("reload")][-1]
    closed = d.wait_log("listener_closed")
    assert closed["proto"] == "tls"
    with (socket.create_connection(("127.0.0.2", added["port"]), timeout=5) as raw,
          ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s):
        s.sendall(octet_counted([hp(f"{t} new listener")]))
    _wait_events(intake, [f"{t} before", f"{t} open one", f"{t} new listener"])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    staying.close()
    assert d.stop() == 0


def test_sighup_narrowed_allowed_names_closes_open_connections_no_longer_allowed(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:
    d = start(daemon, intake, pki, allowed_names=["*.example.org"])
    port = tls_ports(d)[0]
    t = tag()
    kept = connect(port, client_context(pki, pki.leaf("lb1.example.org")))
    gone = connect(port, client_context(pki, pki.leaf("old.example.org")))
    kept.sendall(octet_counted([hp(f"{t} kept")]))
    gone.sendall(octet_counted([hp(f"{t} gone")]))
    _wait_events(intake, [f"{t} kept", f"{t} gone"])

    cfg = dict(d.config)
    cfg["tls"] = {**cfg["tls"], "allowed_names": ["lb*.example.org"]}
    write_toml(d.config_path, cfg)
    hup(d)
    denied = d.wait_log("connection_denied")
    assert "tls.allowed_names (reload)" in denied["reason"], denied
    gone.settimeout(5)
    # Closed by the daemon: EOF or a reset; a timeout (still open) fails the test.
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        assert gone.recv(4096) == b""
    kept.sendall(octet_counted([hp(f"{t} still open")]))
    _wait_events(intake, [f"{t} kept", f"{t} gone", f"{t} still open"])
    kept.close()
    gone.close()
    assert d.stop() == 0


# -- config errors ---------------------------------------------------------------------------------


def _config(tmp: Path, tls: dict[str, Any], listen_tls: bool = True) -> Path:
    cfg: dict[str, Any] = {
        "listen": {"tcp": ["127.0.0.1:0"], "udp": [],
                   "tls": ["127.0.0.1:0"] if listen_tls else []},
        "spool": {"dir": str(tmp / "spool")},
        "log": {"format": "json"},
        "status": {"listen": "127.0.0.1:0"},
        "intake": {"key": VALID_KEY, "url": "https://127.0.0.1:9", "timeout": 1.0},
        "tls": tls,
    }
    path = tmp / "config.toml"
    write_toml(path, cfg)
    return path


@pytest.mark.parametrize("case", ["missing_cert", "missing_key", "not_pem_cert", "not_pem_key",
                                  "unreadable", "mismatch", "encrypted_key", "ca_not_pem",
                                  "names_without_ca"])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_config_errors_one_line_exit_2(case: str, command: str, tmp_path: Path,
                                       pki: Pki) -> None:
    cert, key = pki.leaf(SERVER_NAME)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    tls: dict[str, Any] = {"cert_file": str(cert), "key_file": str(key)}
    setting = "tls.cert_file"
    if case == "missing_cert":
        del tls["cert_file"]
    elif case == "missing_key":
        del tls["key_file"]
        setting = "tls.key_file"
    elif case == "not_pem_cert":
        tls["cert_file"] = str(junk)
    elif case == "not_pem_key":
        tls["key_file"] = str(junk)
        setting = "tls.key_file"
    elif case == "unreadable":
        tls["cert_file"] = str(tmp_path / "nowhere.pem")
    elif case == "mismatch":
        tls["key_file"] = str(pki.leaf(SERVER_NAME)[1])
        setting = "tls.key_file"
    elif case == "encrypted_key":
        from cryptography.hazmat.primitives import serialization

        k = serialization.load_pem_private_key(key.read_bytes(), None)
        key.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(b"secret")))
        setting = "tls.key_file"
    elif case == "ca_not_pem":
        tls["client_ca_file"] = str(junk)
        setting = "tls.client_ca_file"
    else:
        tls["allowed_names"] = ["*.example.org"]
        setting = "tls.allowed_names"
    res = run_cli("--config", str(_config(tmp_path, tls)), command, timeout=20)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == 2, out
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {setting}: "), res.stderr
    assert VALID_KEY not in out


def test_no_tls_listener_needs_no_certificate(tmp_path: Path) -> None:
    res = run_cli("--config", str(_config(tmp_path, {}, listen_tls=False)), "check-config")
    assert res.returncode == 0, res.stderr


def test_shipped_example_uncommented_is_valid(tmp_path: Path, pki: Pki) -> None:
    """config/haproxy-forwarder.toml's commented-out TLS example, enabled with real files."""
    from devtools import REPO

    text = (REPO / "config" / "haproxy-forwarder.toml").read_text()
    cert, key = pki.leaf(SERVER_NAME)
    out = []
    in_tls = False
    for line in text.splitlines():
        if line.startswith("#[tls]"):
            in_tls = True
        elif in_tls and not line.startswith("#"):
            in_tls = False
        if (in_tls or line.startswith("#tls = ")) and not line.startswith("##"):
            line = line[1:]
        out.append(line)
    enabled = "\n".join(out)
    for old, new in (("/etc/haproxy-forwarder/tls/forwarder.pem", cert),
                     ("/etc/haproxy-forwarder/tls/forwarder.key", key),
                     ("/etc/haproxy-forwarder/tls/ca.pem", pki.ca_file)):
        assert old in enabled, old
        enabled = enabled.replace(old, str(new))
    path = tmp_path / "c.toml"
    path.write_text(enabled)
    res = run_cli("--config", str(path), "check-config",
                  env={"HAPROXY_FORWARDER_INTAKE__KEY": VALID_KEY})
    assert res.returncode == 0, res.stderr
    assert '"tls": [' in res.stdout and '"allowed_names": [' in res.stdout, res.stdout


def test_check_config_warns_about_a_tls_listener_without_client_ca(tmp_path: Path,
                                                                   pki: Pki) -> None:
    cert, key = pki.leaf(SERVER_NAME)
    path = _config(tmp_path, {"cert_file": str(cert), "key_file": str(key)})
    res = run_cli("--config", str(path), "check-config")
    assert res.returncode == 0, res.stderr
    assert [ln for ln in res.stderr.splitlines() if "tls.client_ca_file" in ln] != []
    path = _config(tmp_path, {"cert_file": str(cert), "key_file": str(key),
                              "client_ca_file": str(pki.ca_file)})
    res = run_cli("--config", str(path), "check-config")
    assert res.returncode == 0 and "client_ca_file" not in res.stderr, res.stderr


@pytest.mark.parametrize(("names", "patterns", "allowed"), [
    (["lb1.example.org"], ["*.example.org"], True),
    (["LB1.Example.ORG"], ["*.example.org"], True),  # DNS names are case-insensitive
    (["a.b.example.org"], ["*.example.org"], False),  # `*` stays within one label
    (["example.org"], ["*.example.org"], False),
    (["lb12.example.org"], ["lb?.example.org"], False),
    (["lb1.example.org"], ["lb?.example.org"], True),
    (["lb1.example.org"], ["lb*.example.org"], True),
    (["lb1.example.orgx"], ["lb1.example.org"], False),  # the whole name, not a prefix
    (["lb1-example.org"], ["lb1.example.org"], False),  # `.` is literal
    (["rsyslog", "lb1.example.org"], ["lb1.example.org"], True),  # CN or any DNS SAN
    (["anything"], [], True),
])
def test_allowed_names_patterns(names: list[str], patterns: list[str], allowed: bool) -> None:
    assert name_allowed(names, patterns) is allowed
