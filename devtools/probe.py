"""Looking at a running daemon from a test: wait for a condition, read its metrics, peak RSS.

`wait_until` (and its async twin `until`) is the one way the tests wait: for a condition, with
a deadline, and a failure that names what was waited for. No test sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PREFIX = "haproxy_forwarder_"


def _describe(cond: Callable[[], object]) -> str:
    """What `cond` checks, for a failure message when the caller did not say: its source."""
    target: object = cond
    while isinstance(target, functools.partial):
        target = target.func
    try:
        text = " ".join(inspect.getsource(target).split())  # type: ignore[arg-type]
    except (OSError, TypeError):
        return getattr(target, "__qualname__", repr(target))
    if "lambda" in text:
        text = text[text.index("lambda"):]
    return text if len(text) <= 200 else text[:197] + "..."


def _timed_out(cond: Callable[[], object], timeout: float, what: str | None, last: object,
               detail: Callable[[], object] | None) -> AssertionError:
    msg = f"waited {timeout:g} s for {what or _describe(cond)}; last answer {last!r:.300}"
    if detail is not None:
        text = str(detail())  # a daemon's log can be long: its end is what says why
        msg += "\n" + (text if len(text) <= 4000 else "..." + text[-4000:])
    return AssertionError(msg)


def wait_until(cond: Callable[[], T | None], timeout: float = 15.0, what: str | None = None, *,
               step: float = 0.02, detail: Callable[[], object] | None = None) -> T:
    """Poll `cond` until its answer is true and return that answer.

    Past `timeout` seconds, AssertionError naming `what` was waited for (the condition's
    source when not given), its last answer and `detail()` (e.g. the daemon's log) if given.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise _timed_out(cond, timeout, what, got, detail)
        time.sleep(step)


async def until(cond: Callable[[], T | None], timeout: float = 15.0, what: str | None = None, *,
                step: float = 0.005, detail: Callable[[], object] | None = None) -> T:
    """`wait_until` inside an event loop: the loop runs while `cond` is not true yet."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise _timed_out(cond, timeout, what, got, detail)
        await asyncio.sleep(step)


def steady(value: Callable[[], object], quiet: float) -> Callable[[], bool]:
    """A condition for `wait_until`: true once `value()` has not changed for `quiet` seconds.

    For what has no end to wait for (a peer that may still send, or has discarded for
    good): the absence of change over a window, under wait_until's own deadline.
    """
    seen: object = object()
    since = 0.0

    def cond() -> bool:
        nonlocal seen, since
        now, v = time.monotonic(), value()
        if v != seen:
            seen, since = v, now
        return now - since >= quiet

    return cond


def samples(port: int) -> dict[str, float]:
    """Every sample of the status endpoint on `port` by name without the prefix, its labelled
    series summed (`events_held` is memory + spool)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        name = line[len(PREFIX):].split("{", 1)[0].split(" ", 1)[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def metric(port: int, name: str) -> float:
    """The sample `haproxy_forwarder_<name>` of the status endpoint on `port`, its labelled
    series (per intake, per listener...) summed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith((f"{PREFIX}{name} ", f"{PREFIX}{name}{{"))]
    if not found:
        raise AssertionError(f"{name} not on /metrics")
    return sum(found)


def at_rest(port: int, frames: int = 0, closed: bool = True) -> dict[str, float] | None:
    """The daemon's samples once it has nothing left to send, else None.

    At rest: it has read at least `frames` messages, no event is held (memory or spool), every
    event it took is delivered, dead-lettered or dropped and, if `closed`, no TCP connection is
    open. From there nothing more can reach the intake: waiting for it is how a test makes
    sure no duplicate (or filtered message) is still on its way, instead of sleeping.
    """
    m = samples(port)
    came = m.get("accepted_events_total", 0) + m.get("spool_recovered_events_total", 0) \
        + m.get("requeued_events_total", 0)
    went = m.get("delivered_events_total", 0) + m.get("dead_lettered_events_total", 0) \
        + m.get("dropped_events_total", 0)
    ok = (m.get("received_frames_total", 0) >= frames
          and (not closed or m.get("connections_open", 0) == 0)
          and m.get("events_held", 0) == 0 and m.get("in_memory_batches", 0) == 0
          and came == went)
    return m if ok else None


def wait_at_rest(port: int, frames: int = 0, timeout: float = 30.0, closed: bool = True,
                 detail: Callable[[], object] | None = None) -> dict[str, float]:
    """`at_rest` waited for; its samples."""
    return wait_until(lambda: at_rest(port, frames, closed), timeout,
                      f"the daemon at rest (read {frames}+ frames, nothing held or "
                      f"unaccounted{', no connection open' if closed else ''})",
                      step=0.05, detail=detail)


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
