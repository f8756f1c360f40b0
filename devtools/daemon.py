"""Start the real daemon through its CLI with a TOML config, as users do, and watch its logs.

Used by the end-to-end tests (`Daemon`, `base_config`, `run_cli`) and by the benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import REPO
from .probe import wait_until
from .toml import write_toml

__all__ = ["ENV_PREFIX", "REPO", "Daemon", "Spawn", "base_config", "run_cli", "write_toml"]

ENV_PREFIX = "HAPROXY_FORWARDER_"

#: How a child is started: subprocess.Popen, or a wrapper that also tracks it (the bench's).
Spawn = Callable[..., "subprocess.Popen[bytes]"]


def base_config(tmp: Path, **sections: Any) -> dict[str, Any]:
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


def _child_env(env: Mapping[str, str] | None, isolate: bool) -> dict[str, str]:
    # A config path or setting exported in the developer's shell must not leak into a run.
    base = {
        k: v for k, v in os.environ.items()
        if not (k.startswith(ENV_PREFIX) if isolate else k == ENV_PREFIX + "CONFIG")
    }
    return {**base, **(env or {})}


class Daemon:
    """One `python -m haproxy_forwarder --config <toml> run` child with JSON logs on stderr.

    `start()` returns once the daemon logged "started", with the ports it logged in
    "listening" lines (`tcp_port`, `udp_port`, `status_port`); stdout (dry-run events) and
    stderr go to files in `tmp`. `isolate_env` drops every HAPROXY_FORWARDER_* variable of
    this process before `env` is applied (the bench: nothing from the shell changes a run).
    """

    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        file_prefix: str = "daemon",
        config_path: Path | None = None,
        isolate_env: bool = False,
        spawn: Spawn = subprocess.Popen,
    ) -> None:
        self.tmp = tmp
        self.config = config
        self.config_path = config_path or tmp / "config.toml"
        write_toml(self.config_path, config)
        self.args = tuple(args)
        self.env = _child_env(env, isolate_env)
        self.stderr_path = tmp / f"{file_prefix}-{time.monotonic_ns()}.log"
        self.stdout_path = self.stderr_path.with_suffix(".out")
        self.spawn = spawn
        self.proc: subprocess.Popen[bytes] | None = None
        self.tcp_port = 0
        self.udp_port = 0
        self.status_port = 0
        self.t_spawn = 0.0  # time.monotonic() when the process was started
        self.t_started = 0.0  # time.monotonic() when its "started" line was seen
        self._files: list[Any] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "haproxy_forwarder", "--config", str(self.config_path),
                "run", *self.args]

    def start(self, timeout: float = 20.0, poll: float = 0.05) -> Daemon:
        """Spawn the daemon and wait for its "started" line; RuntimeError if it exits first
        or does not get there within `timeout` seconds (with its stderr)."""
        err = self.stderr_path.open("wb")
        out = self.stdout_path.open("wb")
        self._files = [err, out]
        self.t_spawn = time.monotonic()
        proc = self.proc = self.spawn(self.command(), stdout=out, stderr=err, env=self.env,
                                      cwd=REPO)

        def started() -> bool:
            for rec in self.logs():
                if rec.get("event") == "listening":
                    self._note_port(rec)
                if rec.get("event") == "started":
                    return True
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode}: {self.stderr_text()}")
            return False

        try:
            wait_until(started, timeout, "the daemon's 'started' log line", step=poll)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}: {self.stderr_text()}") from None
        self.t_started = time.monotonic()
        return self

    def _note_port(self, rec: dict[str, Any]) -> None:
        # The first listener of each kind is the one tests and the bench send to.
        attr = {"tcp": "tcp_port", "udp": "udp_port", "http": "status_port"}.get(
            str(rec.get("proto")))
        if attr and not getattr(self, attr):
            setattr(self, attr, int(rec["port"]))

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (anything else on stderr, e.g. a traceback, is skipped)."""
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
        """The last `name` log line, waited for."""
        found = wait_until(lambda: self.events(name), timeout, f"a {name!r} log line",
                           step=0.05, detail=self.stderr_text)
        return found[-1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.close_files()
        return rc

    def close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """One CLI command to completion; HAPROXY_FORWARDER_CONFIG only if `env` sets it."""
    return subprocess.run(
        [sys.executable, "-m", "haproxy_forwarder", *args],
        capture_output=True, text=True, env=_child_env(env, isolate=False), timeout=timeout,
        cwd=REPO,
    )
