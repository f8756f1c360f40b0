"""Real rsyslog (8.2302, gtls and ossl drivers) and HAProxy 2.6 -> listen.tls -> the intake.

The SHIPPED rules config/rsyslog/haproxy-forwarder-tls-{gtls,ossl}.conf, with mutual TLS: a
trustme CA signs the forwarder's certificate (forwarder.example.org, the rule's
StreamDriverPermittedPeers, checked by rsyslog in x509/name mode) and rsyslog's client
certificate (allowed by tls.allowed_names). Messages enter rsyslog through its unix socket,
as HAProxy's do, written with a blocking send so that none is dropped before rsyslog: what
the intake must get is every line exactly once, byte for byte.

HAProxy 2.6 sends its own logs over TLS too: a `ring` whose `server` line has `ssl` (with
`crt` for the client certificate, `ca-file` + `verify required` + `sni` for the server's).
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from devtools import REPO
from devtools.daemon import Daemon
from devtools.probe import wait_at_rest, wait_until
from devtools.traffic import haproxy_line
from tests.fake_intake import FakeIntake
from tests.realpeers import (
    HaproxyProcess,
    RsyslogProcess,
    free_port,
    haproxy_cfg,
    http_get,
    needs,
)
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.timeout(60)

MakeDaemon = Callable[..., Daemon]
N = 10_000
SHIPPED = {d: REPO / "config" / "rsyslog" / f"haproxy-forwarder-tls-{d}.conf"
           for d in ("gtls", "ossl")}
FILES = "/etc/rsyslog.d/haproxy-forwarder-tls/"


def rule_for_test(driver: str, tmp: Path, ca: trustme.CA) -> Path:
    """The shipped rule with the certificate paths of this test and the port placeholder
    tests/realpeers.py substitutes (the shipped rule says 6514, the RFC 5425 port)."""
    client = ca.issue_cert("rsyslog1.example.org", common_name="rsyslog1.example.org")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(tmp / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp / "client.key"))
    text = SHIPPED[driver].read_text()
    for old, new in ((FILES, f"{tmp}/"), ('port="6514"', 'port="1514"'),
                     ('action.resumeInterval="10"', 'action.resumeInterval="1"')):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / f"rule-{driver}.conf"
    path.write_text(text)
    return path


def feed(socket_path: Path, lines: list[str]) -> None:
    """Into rsyslog's imuxsock socket as a local program writes (`<PRI>TIMESTAMP TAG: MSG`);
    a blocking unix datagram send waits while rsyslog's queue is full instead of dropping."""
    stamp = time.strftime("%b %e %H:%M:%S").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(20)
        s.connect(str(socket_path))
        for line in lines:
            s.send(b"<134>" + stamp + b" haproxy[4242]: " + line.encode())


def forwarder_certs(tmp_path: Path) -> tuple[trustme.CA, Path]:
    """A CA and, in tmp_path/certs, the forwarder's certificate (server.pem, server.key)."""
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    server = ca.issue_cert("forwarder.example.org", common_name="forwarder.example.org")
    server.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    server.private_key_pem.write_to_path(str(certs / "server.key"))
    return ca, certs


def start_tls(driver: str, tmp_path: Path, intake: FakeIntake, daemon: MakeDaemon,
              allowed: str) -> tuple[Daemon, int, Path]:
    """A CA, the forwarder's certificate, the rsyslog rule for `driver` and the daemon with
    one TLS listener requiring client certificates named `allowed`: (daemon, port, rule)."""
    ca, certs = forwarder_certs(tmp_path)
    rule = rule_for_test(driver, certs, ca)
    d = daemon(intake, listen={"tcp": [], "udp": [], "tls": ["127.0.0.1:0"]},
               tls={"cert_file": str(certs / "server.pem"), "key_file": str(certs / "server.key"),
                    "client_ca_file": str(certs / "ca.pem"), "allowed_names": [allowed]})
    port = next(int(r["port"]) for r in d.events("listening") if r.get("proto") == "tls")
    return d, port, rule


@needs("rsyslogd")
@pytest.mark.parametrize("driver", ["gtls", "ossl"])
def test_rsyslog_tls_client_certificate_10k_exactly_once(
        driver: str, tmp_path: Path, intake: FakeIntake, daemon: MakeDaemon) -> None:
    d, port, rule = start_tls(driver, tmp_path, intake, daemon, "*.example.org")
    lines = [f"{driver} {i:05d} {haproxy_line(i)}" for i in range(N)]
    with RsyslogProcess(tmp_path / "rsyslog", "127.0.0.1", port, rule_file=rule) as rs:
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
    name = f"tls://127.0.0.1:{port}"
    assert value(m, "tls_handshakes_total", listener=name) >= 1
    assert value(m, "received_frames_total", listener=name, framing="octet") == N
    assert sum(v for (n, labels), v in m.items()
               if n.endswith("tls_handshakes_refused_total")) == 0
    assert d.stop() == 0


@needs("rsyslogd")
@pytest.mark.parametrize("driver", ["gtls", "ossl"])
def test_rsyslog_with_a_name_not_allowed_is_refused(
        driver: str, tmp_path: Path, intake: FakeIntake, daemon: MakeDaemon) -> None:
    """rsyslog1.example.org's certificate is valid, but tls.allowed_names wants another name."""
    d, port, rule = start_tls(driver, tmp_path, intake, daemon, "lb*.example.org")
    name = f"tls://127.0.0.1:{port}"
    with RsyslogProcess(tmp_path / "rsyslog", "127.0.0.1", port, rule_file=rule) as rs:
        feed(rs.socket_path, [f"{driver} refused {haproxy_line(i)}" for i in range(10)])
        wait_until(lambda: value(scrape(d.status_port), "tls_handshakes_refused_total",
                                 listener=name, reason="name_not_allowed") >= 1, 15,
                   "rsyslog's handshake refused (name_not_allowed)")
    refused = d.events("tls_refused")
    assert len(refused) == 1 and refused[0]["names"] == ["rsyslog1.example.org"], refused
    assert intake.event_texts() == []
    assert value(scrape(d.status_port), "connections_accepted_total", listener=name) == 0
    assert d.stop() == 0


RING = """
ring forwarder
    format rfc5424
    maxlen 8192
    size 1048576
    timeout connect 5s
    timeout server 10s
    server fwd 127.0.0.1:{port} log-proto octet-count {ssl}
"""
SSL = "ssl verify required ca-file {ca} crt {crt} sni str(forwarder.example.org)"


@needs("haproxy")
def test_haproxy_ring_over_tls_with_client_certificate(
        tmp_path: Path, intake: FakeIntake, daemon: MakeDaemon) -> None:
    ca, certs = forwarder_certs(tmp_path)
    client = ca.issue_cert("lb1.example.org", common_name="lb1.example.org")
    # HAProxy's `crt`: the certificate and its key in one file.
    client.cert_chain_pems[0].write_to_path(str(certs / "lb1.pem"))
    client.private_key_pem.write_to_path(str(certs / "lb1.pem"), append=True)
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    d = daemon(intake, listen={"tcp": [], "udp": [], "tls": ["127.0.0.1:0"]},
               tls={"cert_file": str(certs / "server.pem"), "key_file": str(certs / "server.key"),
                    "client_ca_file": str(certs / "ca.pem"), "allowed_names": ["lb*.example.org"]})
    port = next(int(r["port"]) for r in d.events("listening") if r.get("proto") == "tls")
    http = free_port()
    ring = RING.format(port=port, ssl=SSL.format(ca=certs / "ca.pem", crt=certs / "lb1.pem"))
    paths = [f"/tls-{i}" for i in range(300)]
    with HaproxyProcess(tmp_path / "haproxy", haproxy_cfg(http, "log ring@forwarder local0",
                                                         sections=ring)):
        for path in paths:
            assert http_get(http, path).endswith(b"\r\n\r\nok"), path
        assert intake.wait_for(len(paths), 20), f"{len(intake.events)} of {len(paths)}"
        wait_at_rest(d.status_port, closed=False, detail=d.stderr_text)  # no duplicate to come
    got = Counter(e.split('"GET ', 1)[1].split(" ", 1)[0] for e in intake.event_texts())
    assert got == Counter(paths)
    assert all(e.startswith("127.0.0.1:") and " fe fe/<NOSRV> " in e
               for e in intake.event_texts())
    name = f"tls://127.0.0.1:{port}"
    m = scrape(d.status_port)
    assert value(m, "tls_handshakes_total", listener=name) >= 1
    assert value(m, "received_frames_total", listener=name, framing="octet") == len(paths)
    assert d.stop() == 0
