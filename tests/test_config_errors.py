"""Bad configurations end in one readable line and exit 2, never in a traceback.

Each row was found by trying (issue 11, item 6): before, they were accepted by check-config and
failed at `run` / `send-test` with a traceback, or exited 1 as if the fault were at run time.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import run_cli, write_toml
from tests.fake_intake import VALID_KEY

EXIT_CONFIG = 2


def _config(tmp: Path, **sections: dict[str, Any]) -> Path:
    """A config that would run (loopback, port 0, its own spool) but for `sections`."""
    cfg: dict[str, Any] = {
        "shutdown_timeout": 1.0,
        "listen": {"tcp": ["127.0.0.1:0"], "udp": ["127.0.0.1:0"]},
        "spool": {"dir": str(tmp / "spool")},
        "log": {"format": "json"},
        "status": {"listen": "127.0.0.1:0"},
        "intake": {"key": VALID_KEY, "url": "https://127.0.0.1:9", "timeout": 1.0},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    path = tmp / "config.toml"
    write_toml(path, cfg)
    return path


# (command, section, values, what the one line must name)
ROWS: list[tuple[str, str, dict[str, Any], str]] = [
    ("run", "intake", {"proxy": "not a url"}, "intake.proxy"),
    ("check-config", "intake", {"proxy": "socks5://127.0.0.1:1080"}, "intake.proxy"),
    ("run", "intake", {"proxy": "socks5://127.0.0.1:1080"}, "intake.proxy"),
    ("send-test", "intake", {"proxy": "ftp://127.0.0.1:21"}, "intake.proxy"),
    ("run", "intake", {"proxy": "http://127.0.0.1:99999"}, "intake.proxy"),
    ("check-config", "spool", {"max_size": 10**30}, "spool.max_size"),
    ("check-config", "spool", {"dead_letter_max_size": 10**30}, "spool.dead_letter_max_size"),
    ("run", "spool", {"dir": "/tmp/a\x00b"}, "spool.dir"),
    ("send-test", "intake", {"url": "https://127.0.0.1:99999"}, "intake.url"),
    ("send-test", "intake", {"url": "https://127.0.0.1:0"}, "intake.url"),
    ("send-test", "intake", {"url": "https://[::1"}, "intake.url"),
    ("check-config", "intake", {"url": "https://"}, "intake.url"),
    ("check-config", "intake", {"url": "https://exa mple.com"}, "intake.url"),
    ("run", "intake", {"ca_file": "{not_pem}"}, "intake.ca_file"),
    ("check-config", "listen", {"tcp": ["[::1"]}, "listen.tcp"),
    ("run", "listen", {"udp": ["999.1.1.1:1514"]}, "listen.udp"),
    ("check-config", "listen", {"tcp": [":99999"]}, "listen.tcp"),
    ("check-config", "listen", {"max_connections": 2**63 - 1}, "listen.max_connections"),
    ("run", "status", {"listen": "[::1"}, "status.listen"),
    ("run", "status", {"listen": "256.0.0.1:9514"}, "status.listen"),
]


@pytest.mark.parametrize(("command", "section", "values", "names"), ROWS,
                         ids=[f"{r[0]}-{r[1]}-{next(iter(r[2]))}-{i}"
                              for i, r in enumerate(ROWS)])
def test_bad_value_is_one_config_error_line(tmp_path: Path, command: str, section: str,
                                            values: dict[str, Any], names: str) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is not a certificate\n")
    values = {k: (str(not_pem) if v == "{not_pem}" else v) for k, v in values.items()}
    cfg = _config(tmp_path, **{section: values})
    res = run_cli("--config", str(cfg), command, timeout=20)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == EXIT_CONFIG, out
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {names}: "), res.stderr
    assert VALID_KEY not in out


def test_proxy_password_is_not_echoed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, intake={"proxy": "socks5://user:Hunter2secret@127.0.0.1:1080"})
    res = run_cli("--config", str(cfg), "check-config")
    assert res.returncode == EXIT_CONFIG
    assert "Hunter2secret" not in res.stdout + res.stderr


def test_valid_proxy_and_ipv6_listen_still_accepted(tmp_path: Path) -> None:
    cfg = _config(tmp_path, intake={"proxy": "http://user:pw@127.0.0.1:3128"},
                  listen={"tcp": ["[::1]:0", "localhost:0"], "udp": ["::1:0"]})
    res = run_cli("--config", str(cfg), "check-config")
    assert res.returncode == 0, res.stderr


def _busy(kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


@pytest.mark.parametrize(("section", "key"), [("listen", "tcp"), ("listen", "udp"),
                                              ("status", "listen"), ("listen", "unassigned")])
def test_address_not_bindable_exits_2_naming_it(tmp_path: Path, section: str,
                                                key: str) -> None:
    kind = socket.SOCK_DGRAM if key == "udp" else socket.SOCK_STREAM
    with _busy(kind) as busy:
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        if key == "unassigned":  # TEST-NET-1: on no interface of this host
            key, address = "tcp", "192.0.2.1:1514"
        cfg = _config(tmp_path, **{section: {key: address if section == "status" else [address]}})
        res = run_cli("--config", str(cfg), "run", timeout=20)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == EXIT_CONFIG, out
    records = [json.loads(line) for line in res.stderr.splitlines()]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1, res.stderr
    assert errors[0]["event"] == "startup_failed"
    assert f"{section}.{key} {address}: " in errors[0]["error"], errors[0]
    assert not any(r["event"] == "started" for r in records)
