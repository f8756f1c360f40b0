"""The driver's side of the lean intake: a CA, a child process, and a command pipe."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from pathlib import Path
from typing import Any

import trustme

from . import intake


class Intake:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self._cert = b"".join(p.bytes() for p in cert.cert_chain_pems)
        self._key = cert.private_key_pem.bytes()
        self.port = 0
        self.proc: Any = None
        self.conn: Any = None

    def start(self) -> Intake:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=intake.serve, args=(child, self._cert, self._key, str(self.tmp)),
            name="bench-intake", daemon=True,
        )
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(30):
            raise RuntimeError("bench intake did not start within 30 s")
        tag, port = parent.recv()
        assert tag == "port"
        self.port = port
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def _ask(self, *cmd: Any, timeout: float = 30.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"bench intake did not answer {cmd[0]!r}")
        return self.conn.recv()

    def reset(self, mode: str = "count") -> None:
        self._ask("reset", mode)

    def stats(self) -> dict[str, Any]:
        return dict(self._ask("stats"))

    def latency(self) -> tuple[list[float], list[bytes]]:
        times, seqs = self._ask("latency", timeout=60)
        return times, seqs

    def timeline(self) -> list[tuple[float, float]]:
        from array import array

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
