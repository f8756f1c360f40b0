"""The TLS input's edges (issue 17): certificate names compared as ASCII only, and the
handshake slots (tls.max_handshakes) taken back from stalled handshakes, the address holding
the most giving first.

Real daemon, Python ssl clients over loopback sockets; the slot choice is also tested pure.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import run_cli
from devtools.probe import wait_until
from devtools.traffic import octet_counted
from haproxy_forwarder.tlscontext import HandshakeSlots, name_allowed
from tests.fake_intake import FakeIntake
from tests.test_hostile import _wait_events, hp
from tests.test_metrics import scrape, value
from tests.test_tls import (
    SERVER_NAME,
    MakeDaemon,
    Pki,
    _config,
    client_context,
    connect,
    listener,
    pki,  # noqa: F401 - the fixture
    refusals,
    send,
    start,
    tls_ports,
)

pytestmark = pytest.mark.timeout(90)

KELVIN = "\u212a"  # KELVIN SIGN: str.lower() turns it into "k"


def tag() -> str:
    return uuid.uuid4().hex[:10]


# -- names: ASCII only -----------------------------------------------------------------------


@pytest.mark.parametrize(("names", "patterns"), [
    ([f"{KELVIN}afka.example.org"], ["kafka.example.org"]),
    ([f"{KELVIN}afka.example.org"], ["*.example.org"]),
    ([f"{KELVIN}AFKA.example.org"], ["k*.example.org"]),
    (["kafka.example.org\x00.evil.net"], ["kafka.example.org*"]),  # NUL: not a DNS name
    (["a\x00.example.org"], ["*.example.org"]),
    (["\u0130stanbul.example.org"], ["i*.example.org"]),  # dotted capital I lowers to "i̇"
    (["kafka.example.org"], [f"{KELVIN}afka.example.org"]),  # a pattern not ASCII: nothing
])
def test_names_that_are_not_ascii_match_no_pattern(names: list[str],
                                                    patterns: list[str]) -> None:
    assert name_allowed(names, patterns) is False


def test_ascii_names_still_match_case_insensitively() -> None:
    assert name_allowed(["KAFKA.Example.ORG"], ["kafka.example.org"])
    # One name not ASCII does not spoil the others (CN odd, DNS SAN fine).
    assert name_allowed([f"{KELVIN}afka.example.org", "lb1.example.org"], ["lb*.example.org"])
    assert name_allowed(["xn--bcher-kva.example.org"], ["xn--bcher-kva.example.org"])


def _kelvin_leaf(p: Pki) -> tuple[Path, Path]:
    """A certificate of the trusted CA whose CN is KELVIN SIGN + "afka.example.org" (its one
    DNS SAN, needed by trustme, names another host)."""
    cert = p.ca.issue_cert("other.example.net", common_name=f"{KELVIN}afka.example.org")
    stem = p.dir / f"kelvin-{uuid.uuid4().hex[:6]}"
    crt, key = Path(f"{stem}.crt"), Path(f"{stem}.key")
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(crt), append=i > 0)
    cert.private_key_pem.write_to_path(str(key))
    return crt, key


def test_a_kelvin_sign_common_name_is_refused(intake: FakeIntake, daemon: MakeDaemon,
                                              pki: Pki) -> None:  # noqa: F811
    d = start(daemon, intake, pki, allowed_names=["kafka.example.org"])
    port = tls_ports(d)[0]
    t = tag()
    with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError), \
            connect(port, client_context(pki, _kelvin_leaf(pki)), timeout=5) as s:
        s.sendall(octet_counted([hp(f"{t} kelvin")]))
        s.recv(4096)
    assert wait_until(lambda: refusals(d, "name_not_allowed") == 1, 10)
    line = d.wait_log("tls_refused")
    assert line["reason"] == "name_not_allowed"
    assert f"{KELVIN}afka.example.org" in line["names"], line
    # The real kafka.example.org is admitted.
    send(port, client_context(pki, pki.leaf("kafka.example.org")),
         octet_counted([hp(f"{t} real")]))
    _wait_events(intake, [f"{t} real"], d=d)
    assert not [e for e in intake.event_texts() if "kelvin" in e]


@pytest.mark.parametrize("pattern", [f"{KELVIN}afka.example.org", "b\u00fccher.example.org"])
def test_a_pattern_that_is_not_ascii_is_a_config_error(pattern: str, tmp_path: Path,
                                                       pki: Pki) -> None:  # noqa: F811
    cert, key = pki.leaf(SERVER_NAME)
    path = _config(tmp_path, {"cert_file": str(cert), "key_file": str(key),
                              "client_ca_file": str(pki.ca_file),
                              "allowed_names": ["lb1.example.org", pattern]})
    res = run_cli("--config", str(path), "check-config", timeout=20)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: tls.allowed_names: "), lines
    assert "A-label" in lines[0]


# -- the handshake slots, pure -----------------------------------------------------------------


class _H:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_slots_the_victim_is_the_oldest_of_the_address_holding_the_most() -> None:
    slots: HandshakeSlots[_H] = HandshakeSlots()
    a = [_H(f"a{i}") for i in range(3)]
    b = [_H(f"b{i}") for i in range(2)]
    c0 = _H("c0")
    slots.add(b[0], "B")
    for h in a:
        slots.add(h, "A")
    slots.add(b[1], "B")
    slots.add(c0, "C")
    assert slots.count == 6
    # B's b0 is the oldest of all, but A holds the most.
    assert slots.victim("D") is a[0]
    assert slots.victim("A") is a[0]
    slots.remove(a[0], "A")
    # A and B hold 2 each: the oldest of the two goes; a newcomer of B counts as one more.
    assert slots.victim("D") is b[0]
    assert slots.victim("A") is a[1]
    assert slots.victim("B") is b[0]
    # C (one, the newest) never goes while others hold more.
    for h in (b[0], b[1], a[1]):
        slots.remove(h, h.name[0].upper())
    assert slots.count == 2 and slots.victim("C") is c0  # C: 1 + the newcomer = 2 > A's 1
    assert slots.victim("Z") is a[2]  # a tie at one: the oldest
    # Removing twice, or what was never added, changes nothing.
    assert not slots.remove(a[0], "A") and slots.count == 2
    slots.remove(a[2], "A")
    slots.remove(c0, "C")
    assert slots.count == 0 and slots.victim("A") is None and slots.by_address == {}


# -- the handshake slots, against the daemon ---------------------------------------------------


def _silent(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=10)


def _closed_by_daemon(s: socket.socket, timeout: float = 5.0) -> bool:
    """True if the daemon closed or reset `s` (what it sent first, if anything, is skipped)."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


def _open_now(s: socket.socket) -> bool:
    """Not closed by the daemon so far (no EOF, no reset waiting to be read)."""
    s.settimeout(0.0)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""  # b"": the daemon's FIN
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.settimeout(10)


def in_progress(d: Any) -> float:
    return value(scrape(d.status_port), "tls_handshakes_in_progress")


def test_a_full_handshake_cap_evicts_the_oldest_stalled_handshake(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:  # noqa: F811
    """Silent sockets from two addresses fill tls.max_handshakes: an honest client from a
    third gets in, and the one closed for it is the oldest of the addresses holding the most
    (before: refused, too_many_handshakes, for as long as the silent ones stay)."""
    d = start(daemon, intake, pki, listen={"max_connections_per_address": 4},
              max_handshakes=8, handshake_timeout=60.0)
    port = tls_ports(d)[0]
    stalled = [_silent(port, src) for src in ("127.0.0.2", "127.0.0.3") for _ in range(4)]
    assert wait_until(lambda: in_progress(d) == 8)
    t = tag()
    send(port, client_context(pki, pki.leaf("client1.example.org")),
         octet_counted([hp(f"{t} honest")]))
    _wait_events(intake, [f"{t} honest"], d=d)
    # The first silent socket of 127.0.0.2 (tied with .3 at four, and the oldest) went.
    assert _closed_by_daemon(stalled[0])
    assert all(_open_now(s) for s in stalled[1:]), "only the oldest is evicted"
    assert wait_until(lambda: in_progress(d) == 7)
    assert refusals(d, "too_many_handshakes") == 1
    assert refusals(d, "closed_in_handshake") == 0
    evicted = d.wait_log("tls_handshake_evicted")
    assert evicted["peer"].startswith("127.0.0.2:"), evicted
    assert evicted["listener"] == listener(d) and evicted["max_handshakes"] == 8
    assert not d.events("tls_refused")  # the honest client was never refused
    for s in stalled:
        s.close()


def test_an_address_holding_every_slot_makes_room_from_its_own(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:  # noqa: F811
    """One address holds every slot; a second address's socket takes one, and however many
    more the first opens, they displace its own oldest, never the other address's: that one
    later completes its handshake and delivers."""
    d = start(daemon, intake, pki, max_handshakes=6, handshake_timeout=60.0)
    port = tls_ports(d)[0]
    flood = [_silent(port, "127.0.0.2") for _ in range(6)]
    assert wait_until(lambda: in_progress(d) == 6)
    honest_raw = _silent(port, "127.0.0.3")  # its handshake is not started yet: stalled too
    assert _closed_by_daemon(flood[0])
    flood += [_silent(port, "127.0.0.2") for _ in range(12)]
    # Each new one evicted the oldest of 127.0.0.2: the last five are open, the rest closed.
    assert all(_closed_by_daemon(s) for s in flood[1:-5])
    assert all(_open_now(s) for s in flood[-5:])
    assert _open_now(honest_raw)
    t = tag()
    ctx = client_context(pki, pki.leaf("client1.example.org"))
    with ctx.wrap_socket(honest_raw, server_hostname=SERVER_NAME) as s:
        s.sendall(octet_counted([hp(f"{t} patient")]))
        _wait_events(intake, [f"{t} patient"], d=d)
    assert wait_until(lambda: refusals(d, "too_many_handshakes") == 13)
    for s in flood:
        s.close()


def test_honest_clients_get_in_while_four_addresses_keep_the_cap_full(
        intake: FakeIntake, daemon: MakeDaemon, pki: Pki) -> None:  # noqa: F811
    """The issue's figure, scaled down: four addresses keep reopening silent sockets at
    their per-address cap; every honest TLS client still delivers (it was 0-1 of 32)."""
    d = start(daemon, intake, pki, listen={"max_connections_per_address": 16},
              max_handshakes=32, handshake_timeout=60.0)
    port = tls_ports(d)[0]
    stop = threading.Event()
    opened = [0]

    def flood(source: str) -> None:
        held: list[socket.socket] = []
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline and opened[0] < 20_000:
            try:
                held.append(_silent(port, source))
                opened[0] += 1
            except OSError:
                time.sleep(0.01)  # refused: the attacker's own pace before the next one
            if len(held) > 32:  # the daemon closed most of these: keep our descriptors few
                held.pop(0).close()
        for s in held:
            s.close()

    threads = [threading.Thread(target=flood, args=(f"127.0.0.{i}",), daemon=True)
               for i in range(2, 6)]
    for th in threads:
        th.start()
    try:
        assert wait_until(lambda: in_progress(d) == 32, 20)
        ctx = client_context(pki, pki.leaf("client1.example.org"))
        t = tag()
        for i in range(16):
            send(port, ctx, octet_counted([hp(f"{t} honest {i}")]))
        _wait_events(intake, [f"{t} honest {i}" for i in range(16)], d=d)
        assert opened[0] > 64, opened  # the flood really ran meanwhile
    finally:
        stop.set()
        for th in threads:
            th.join(45)
    assert refusals(d, "too_many_handshakes") > 0


def test_the_slots_are_shared_with_relp_over_tls(intake: FakeIntake, daemon: MakeDaemon,
                                                 pki: Pki) -> None:  # noqa: F811
    """tls.max_handshakes is one cap for every TLS listener: silent sockets on the RELP over
    TLS port fill it; a syslog-over-TLS client still gets in, and the eviction is counted
    on the listener of the handshake that was closed."""
    d = start(daemon, intake, pki, listen={"relp": ["127.0.0.1:0"]},
              sections={"relp": {"tls": True}}, max_handshakes=4, handshake_timeout=60.0)
    relp_port = next(int(r["port"]) for r in d.events("listening") if r.get("proto") == "relp")
    stalled = [_silent(relp_port, "127.0.0.2") for _ in range(4)]
    assert wait_until(lambda: in_progress(d) == 4)
    t = tag()
    send(tls_ports(d)[0], client_context(pki, pki.leaf("client1.example.org")),
         octet_counted([hp(f"{t} over tls")]))
    _wait_events(intake, [f"{t} over tls"], d=d)
    assert _closed_by_daemon(stalled[0])
    m = scrape(d.status_port)
    relp = f"relp://127.0.0.1:{relp_port}"
    assert value(m, "tls_handshakes_refused_total", listener=relp,
                 reason="too_many_handshakes") == 1
    assert value(m, "tls_handshakes_refused_total", listener=listener(d),
                 reason="too_many_handshakes") == 0
    assert d.wait_log("tls_handshake_evicted")["listener"] == relp
    for s in stalled:
        s.close()
