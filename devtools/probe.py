"""Looking at a running daemon from a test: wait for a condition, read one metric, peak RSS."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def wait_until(cond: Callable[[], object], timeout: float = 15.0, step: float = 0.02) -> bool:
    """Poll `cond` until it is true or `timeout` passes; its last answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def metric(port: int, name: str) -> float:
    """The unlabelled sample `haproxy_forwarder_<name>` of the status endpoint on `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f"haproxy_forwarder_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
