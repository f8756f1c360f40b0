"""Process plumbing: /proc readings, children that are always killed, the sendfile sender."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")

_children: list[subprocess.Popen[bytes]] = []


def spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, remembered so that it dies with us."""
    proc = subprocess.Popen(args, start_new_session=True, **kw)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc in _children:
        _children.remove(proc)
    return proc.returncode


@atexit.register
def kill_children() -> None:
    for proc in list(_children):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    _children.clear()


def _stat_fields(path: str) -> list[bytes]:
    """The fields of a /proc stat file after `comm`, from `state` on (field 3 is index 0)."""
    with open(path, "rb") as f:
        data = f.read()
    # comm may contain spaces: fields start after the last ")"
    return data[data.rindex(b")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """user + sys of the whole process (all threads), from /proc/<pid>/stat."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / TICK


def minor_faults(pid: int) -> int:
    """Minor page faults of the whole process so far (fresh pages touched: the cost of memory
    that is mapped and unmapped rather than reused), from /proc/<pid>/stat."""
    return int(_stat_fields(f"/proc/{pid}/stat")[7])


def thread_cpu(pid: int, tid: int) -> float:
    """user + sys of one thread (tid == pid: the main thread, the event loop)."""
    try:
        fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> float:
    """CPU-seconds the whole machine spent busy (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    # user nice system idle iowait irq softirq steal ...
    vals = [int(x) for x in parts[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / TICK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def status_kib(pid: int, name: str) -> int:
    """A `Vm*` line of /proc/<pid>/status, in KiB (VmHWM: peak RSS, VmRSS: current)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class Sender(threading.Thread):
    """Sends a pre-written file over loopback TCP with socket.sendfile (kernel copies it).

    rate=None: as fast as the receiver reads (a burst).  Otherwise paced: every `tick`
    seconds the frames due by then are sent in one sendfile call; frame i is due at
    t0 + i / rate, and that schedule is the send time used for latency (so a sender held
    up by backpressure counts against the receiver: no coordinated omission).
    """

    def __init__(self, port: int, path: Path, offsets: Any, rate: float | None = None,
                 tick: float = 0.005, timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.path = path
        self.offsets = offsets
        self.rate = rate
        self.tick = tick
        self.timeout = timeout
        self.t_first = 0.0  # monotonic, just before the first byte
        self.t_done = 0.0  # monotonic, after the last byte was handed to the kernel
        self.t0 = 0.0  # schedule origin (paced)
        self.sent = 0
        self.error: str | None = None
        self.max_lag = 0.0  # paced: worst delay of a sendfile call behind its schedule

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the caller
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        n = len(self.offsets) - 1
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as s, \
                self.path.open("rb") as f:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            if self.rate is None:
                self.t_first = time.monotonic()
                self.sent = s.sendfile(f)
                self.t_done = time.monotonic()
            else:
                per_tick = self.rate * self.tick
                self.t0 = self.t_first = time.monotonic()
                k = 0
                i = 0
                while i < n:
                    k += 1
                    due = self.t0 + k * self.tick
                    j = min(n, int(k * per_tick))
                    now = time.monotonic()
                    if now < due - self.tick:
                        time.sleep(due - self.tick - now)
                    lag = time.monotonic() - (due - self.tick)
                    self.max_lag = max(self.max_lag, lag)
                    if j > i:
                        start, end = self.offsets[i], self.offsets[j]
                        self.sent += s.sendfile(f, start, end - start)
                        i = j
                self.t_done = time.monotonic()
            s.shutdown(socket.SHUT_WR)
            # Keep the socket until the peer closes or we are told the run is over: closing
            # first could reset a connection with unread data.
            s.settimeout(self.timeout)
            with contextlib.suppress(OSError):
                while s.recv(65536):
                    pass

    def send_time(self, seq: int) -> float:
        """Scheduled send time of frame `seq` (paced mode): the tick that carries it."""
        assert self.rate is not None
        k = int(seq // (self.rate * self.tick)) + 1
        # frames [ (k-1)*per_tick, k*per_tick ) go out at t0 + (k-1)*tick
        return self.t0 + (k - 1) * self.tick


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()
