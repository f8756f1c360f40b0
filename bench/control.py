"""The driver's side of the bench's server processes: a CA, a child process, a command pipe."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trustme

from . import intake


class Child:
    """The driver's side of a bench server process (the intake, the concentrator's TLS sink):
    its CA and certificate, the process, and the command pipe it answers reset / stats /
    timeline / stop on, so that bench.runs measures through any of them."""

    def __init__(self, tmp: Path, what: str, ca_file: str, *names: str) -> None:
        self.tmp = tmp
        self.what = what  # for the errors: "bench intake"
        self.ca = trustme.CA()
        self.ca_file = tmp / ca_file
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert = self.ca.issue_cert(*names)
        self._cert = b"".join(p.bytes() for p in cert.cert_chain_pems)
        self._key = cert.private_key_pem.bytes()
        self.port = 0
        self.proc: Any = None
        self.conn: Any = None

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        """Start `target(pipe, cert, key, tmp, *args)` in a process; wait for its port."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, name=name, daemon=True,
                                args=(child, self._cert, self._key, str(self.tmp), *args))
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(30):
            raise RuntimeError(f"{self.what} did not start within 30 s")
        tag, port = parent.recv()
        assert tag == "port"
        self.port = int(port)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def _ask(self, *cmd: Any, timeout: float = 30.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"{self.what} did not answer {cmd[0]!r}")
        return self.conn.recv()

    def reset(self, mode: str = "count") -> None:
        self._ask("reset", mode)

    def stats(self) -> dict[str, Any]:
        return dict(self._ask("stats"))

    def timeline(self) -> list[tuple[float, float]]:
        a = array("d")
        a.frombytes(self._ask("timeline"))
        return list(zip(a[0::2], a[1::2], strict=True))

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self._ask("stop", timeout=5)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None


class Intake(Child):
    """The lean HTTPS intake (bench/intake.py)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "bench intake", "ca.pem", "127.0.0.1", "localhost")

    def start(self) -> Intake:
        self._spawn(intake.serve, "bench-intake")
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def latency(self) -> tuple[list[float], list[bytes]]:
        times, seqs = self._ask("latency", timeout=60)
        return times, seqs
