"""What orchestrators see of the daemon (Kubernetes): /livez, and the service-link variables.

- /livez fails only for what a restart could cure, by the watchdog's rule: nothing delivered
  anywhere for status.stall_after while batches wait. With one intake down among two, /healthz
  fails (it names the intake) while /livez stays 200: restarting would not cure a refused key
  and would interrupt the intake that works. With the only intake down, both fail.
- Kubernetes service links (HAPROXY_FORWARDER_SERVICE_HOST, ..._PORT_1514_TCP_ADDR) for a
  Service named haproxy-forwarder are no settings: the daemon starts, where a misspelt
  setting is still refused.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from devtools.daemon import Daemon, base_config, run_cli
from devtools.probe import wait_until
from devtools.traffic import octet_counted, traditional
from tests.fake_intake import FakeIntake

KEY_A = "A3" * 16
KEY_B = "B4" * 16


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def send_from(source: str, port: int, texts: list[str]) -> None:
    with socket.socket() as s:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(octet_counted(traditional("haproxy", t) for t in texts))


def intake(fi: FakeIntake, key: str) -> dict[str, Any]:
    return {"url": fi.url, "ca_file": fi.ca_file, "key": key}


def test_livez_fails_only_when_no_intake_delivers(tmp_path: Path) -> None:
    with FakeIntake(key=KEY_A) as a, FakeIntake(key=KEY_B) as b:
        b.set_down(True)
        cfg = base_config(tmp_path, status={"listen": "127.0.0.1:0", "stall_after": 1.0},
                          intakes={"a": intake(a, KEY_A), "b": intake(b, KEY_B)},
                          routes=[{"source": ["127.0.0.3/32"], "intake": "b"},
                                  {"intake": "a"}])
        with Daemon(tmp_path, cfg) as d:
            send_from("127.0.0.3", d.tcp_port, ["to b"])
            wait_until(lambda: get(d.status_port, "/healthz")[0] == 503, 15,
                       "/healthz failing for intake b")
            # a keeps delivering: the daemon is alive, a restart would cure nothing.
            for n in range(3):
                send_from("127.0.0.2", d.tcp_port, [f"to a {n}"])
                wait_until(lambda n=n: f"to a {n}" in a.event_texts(), 10)
                code, body = get(d.status_port, "/livez")
                assert (code, body["status"]) == (200, "live"), body
            reasons = get(d.status_port, "/healthz")[1]["reasons"]
            assert reasons and all(r.startswith("intake b:") for r in reasons)
            # Nothing delivered anywhere for stall_after: now a restart is what is left.
            wait_until(lambda: get(d.status_port, "/livez")[0] == 503, 15, "/livez failing")
            assert get(d.status_port, "/livez")[1]["reasons"][0].startswith("intake b:")


def test_service_links_are_no_settings(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, intake={"dry_run": True})
    links = {"HAPROXY_FORWARDER_SERVICE_HOST": "10.96.0.7",
             "HAPROXY_FORWARDER_PORT": "tcp://10.96.0.7:1514",
             "HAPROXY_FORWARDER_PORT_1514_TCP_ADDR": "10.96.0.7",
             "HAPROXY_FORWARDER_SYSLOG_UDP_SERVICE_PORT_SYSLOG_UDP": "1514"}
    with Daemon(tmp_path, cfg, env=links) as d:
        assert d.wait_log("started")
    path = tmp_path / "config.toml"
    bad = run_cli("--config", str(path), "check-config",
                  env={**links, "HAPROXY_FORWARDER_LISTEN_TCP": "x"})
    assert bad.returncode == 2
    assert "HAPROXY_FORWARDER_LISTEN_TCP: unknown setting" in bad.stderr
    assert "SERVICE_HOST" not in bad.stderr
