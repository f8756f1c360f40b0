"""Start the real daemon through its CLI with a TOML config, as users do, and watch its logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_toml(path: Path, config: dict[str, Any]) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")


def base_config(tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Loopback, OS-chosen ports, spool in the test's folder; sections merge over it."""
    cfg: dict[str, Any] = {
        "shutdown_timeout": 5.0,
        "listen": {"tcp": ["127.0.0.1:0"], "udp": ["127.0.0.1:0"]},
        "batch": {"max_delay": 0.2},
        "spool": {"dir": str(tmp / "spool")},
        "log": {"format": "json", "stats_interval": 1.0},
        "status": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


class Daemon:
    def __init__(self, tmp: Path, config: dict[str, Any], args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.config_path = tmp / "config.toml"
        write_toml(self.config_path, config)
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.env.pop("HAPROXY_FORWARDER_CONFIG", None)
        self.stderr_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.stdout_path = self.stderr_path.with_suffix(".out")
        self.proc: subprocess.Popen[bytes] | None = None
        self.tcp_port = 0
        self.udp_port = 0
        self.status_port = 0

    def start(self, timeout: float = 20.0) -> Daemon:
        self._err = self.stderr_path.open("wb")
        self._out = self.stdout_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "haproxy_forwarder", "--config", str(self.config_path),
             "run", *self.args],
            stdout=self._out, stderr=self._err, env=self.env, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.logs():
                if rec.get("event") == "listening":
                    if rec["proto"] == "tcp" and not self.tcp_port:
                        self.tcp_port = rec["port"]
                    if rec["proto"] == "udp" and not self.udp_port:
                        self.udp_port = rec["port"]
                    if rec["proto"] == "http" and not self.status_port:
                        self.status_port = rec["port"]
                if rec.get("event") == "started":
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.stderr_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start: {self.stderr_text()}")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == name]

    def stdout_lines(self) -> list[dict[str, Any]]:
        text = self.stdout_path.read_text() if self.stdout_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_log(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} log line within {timeout}s: {self.stderr_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._err.close()
        self._out.close()
        return rc

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HAPROXY_FORWARDER_CONFIG", None) if env is None or \
        "HAPROXY_FORWARDER_CONFIG" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "haproxy_forwarder", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO,
    )
