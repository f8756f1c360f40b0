"""listen.allow against the real daemon: peers from outside it are closed (TCP) or dropped (UDP),
counted per listener on /metrics, logged rate-limited; a SIGHUP that widens it lets them in.

Linux routes all of 127.0.0.0/8 to lo: a client socket bound to 127.0.0.2 before connecting is
a second host as far as the daemon can tell.
"""

from __future__ import annotations

import socket
import uuid

from devtools.daemon import write_toml
from devtools.probe import wait_until
from devtools.traffic import octet_counted
from tests.fake_intake import FakeIntake
from tests.test_hostile import MakeDaemon, _wait_events, closed_by_peer, hp, stop_counters
from tests.test_metrics import scrape, value
from tests.test_reload import hup

OTHER = "127.0.0.2"


def tcp_from(source: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def udp_from(source: str, port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


def send_one(source: str, port: int, text: str) -> bool:
    """One frame from `source`; True if the daemon read it and closed after our FIN, False if it
    closed the connection before reading anything."""
    s = tcp_from(source, port)
    try:
        s.sendall(octet_counted([hp(text)]))
        s.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    finally:
        closed = closed_by_peer(s)
        s.close()
    assert closed
    return True


def wait_metric(port: int, name: str, want: float, **labels: str) -> None:
    wait_until(lambda: value(scrape(port), name, **labels) == want, 10,
               f"{name}{labels or ''} at {want}", step=0.05,
               detail=lambda: value(scrape(port), name, **labels))


def test_allow_list_denies_and_a_reload_admits(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake, listen={"allow": ["127.0.0.1/32"]})
    t = uuid.uuid4().hex[:10]
    tcp_l, udp_l = f"tcp://127.0.0.1:{d.tcp_port}", f"udp://127.0.0.1:{d.udp_port}"

    # Denied: closed at once, before anything is read; 20 of them, one log line so far.
    for _ in range(20):
        s = tcp_from(OTHER, d.tcp_port)
        assert closed_by_peer(s, 2)
        s.close()
    send_one(OTHER, d.tcp_port, f"{t} denied tcp")  # whatever it wrote is never read
    udp_from(OTHER, d.udp_port, [hp(f"{t} denied udp {i}") for i in range(5)])
    # Allowed: the same port from 127.0.0.1.
    assert send_one("127.0.0.1", d.tcp_port, f"{t} allowed tcp")
    udp_from("127.0.0.1", d.udp_port, [hp(f"{t} allowed udp")])
    _wait_events(intake, [f"{t} allowed tcp", f"{t} allowed udp"], d=d)
    wait_metric(d.status_port, "access_denied_total", 21, listener=tcp_l)
    wait_metric(d.status_port, "access_denied_total", 5, listener=udp_l)
    assert not [e for e in intake.event_texts() if "denied" in e]
    assert len(d.events("connection_denied")) == 1  # the rest are in its summary (rate limit)
    assert d.events("connection_denied")[0]["peer"].startswith(OTHER + ":")

    # Widened on SIGHUP (applied live, to new connections and datagrams).
    cfg = dict(d.config)
    cfg["listen"] = {**cfg["listen"], "allow": ["127.0.0.1/32", "127.0.0.2/32"]}
    write_toml(d.config_path, cfg)
    hup(d)
    reloaded = d.wait_log("reloaded")
    assert "listen.allow" in reloaded["changes"]
    assert send_one(OTHER, d.tcp_port, f"{t} admitted tcp")
    udp_from(OTHER, d.udp_port, [hp(f"{t} admitted udp")])
    _wait_events(intake, [f"{t} allowed tcp", f"{t} allowed udp",
                          f"{t} admitted tcp", f"{t} admitted udp"], d=d)
    staying = tcp_from(OTHER, d.tcp_port)
    staying.sendall(octet_counted([hp(f"{t} before narrowing")]))
    _wait_events(intake, [f"{t} allowed tcp", f"{t} allowed udp", f"{t} admitted tcp",
                          f"{t} admitted udp", f"{t} before narrowing"], d=d)

    # Narrowed again: the open connection from 127.0.0.2 is closed too.
    write_toml(d.config_path, {**cfg, "listen": {**cfg["listen"], "allow": ["127.0.0.1/32"]}})
    hup(d)
    wait_until(lambda: len(d.events("reloaded")) >= 2, 10, "the second 'reloaded' line")
    assert closed_by_peer(staying, 5)
    staying.close()
    c = stop_counters(d)
    assert c["access_denied"] == 27
    # At stop the suppressed ones are said, with their count.
    tcp_lines = d.events("connection_denied")
    assert sum(e.get("suppressed", 1) for e in tcp_lines) == 22
    assert sum(e.get("suppressed", 1) for e in d.events("datagram_denied")) == 5


def test_default_allows_everyone(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    t = uuid.uuid4().hex[:10]
    assert send_one(OTHER, d.tcp_port, f"{t} from other")
    udp_from(OTHER, d.udp_port, [hp(f"{t} udp from other")])
    _wait_events(intake, [f"{t} from other", f"{t} udp from other"], d=d)
    assert stop_counters(d)["access_denied"] == 0


def test_an_invalid_cidr_is_a_config_error(intake: FakeIntake, daemon: MakeDaemon) -> None:
    try:
        daemon(intake, listen={"allow": ["10.0.0.0/33"]})
    except RuntimeError as exc:
        assert "listen.allow" in str(exc) and "10.0.0.0/33" in str(exc)
    else:
        raise AssertionError("the daemon started with an invalid CIDR block")
