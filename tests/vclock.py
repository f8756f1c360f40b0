"""An asyncio event loop on a virtual clock, for tests of timers that must not sleep.

`VirtualLoop.time()` is a number the loop moves itself: whenever nothing is runnable and the
loop would wait only for its next timer, the clock jumps to that timer at once (trio's
`MockClock` with `autojump_threshold=0`). So `await asyncio.sleep(0.4)` takes no real time,
timers fire exactly when due, and a steady input every 10 ms never stretches to 50 ms.

Threads and sockets are real: while an executor job runs (`run_in_executor`, which
`asyncio.to_thread` and delivery's spool, dead-letter and encoder threads all go through) or a
socket other than the loop's own wake-up pipe is registered, the loop waits for them in real
time, up to its next timer, and the clock moves by what it waited. Nothing the code under test
can observe happens faster than it could on a real clock; only idle time is skipped.

`settle()` and `advance(dt)` drive it by hand (the delivery model: the test decides when time
passes); `run(coro)` runs a coroutine with the clock jumping as needed, and the module's
`run(coro)` is `asyncio.run` on a fresh `VirtualLoop`.

Code that reads another clock (`time.monotonic()`) does not see the virtual one: give it
`loop.time` where it takes a clock (`Delivery(clock=...)`, `Router(now=...)`).
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

START = 1000.0
# With nothing runnable, no timer and no thread at work, how long (real seconds) the loop
# waits for something from outside before calling it a deadlock.
DEADLOCK_AFTER = 10.0


class _Selector(selectors.BaseSelector):
    """The real selector (the loop's self-pipe, any socket), asked without waiting first; when
    the loop would wait, `on_idle(timeout)` decides how (see VirtualLoop._idle)."""

    def __init__(self, on_idle: Callable[[float | None], list[tuple[selectors.SelectorKey, int]]],
                 ) -> None:
        self.inner = selectors.DefaultSelector()
        self._on_idle = on_idle

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self.inner.select(0)
        if ready or timeout == 0:
            return ready
        return self._on_idle(timeout)  # nothing runnable: the next timer is `timeout` away

    def get_map(self) -> Any:
        return self.inner.get_map()

    def close(self) -> None:
        self.inner.close()


class VirtualLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose `time()` is virtual (see the module's docstring)."""

    def __init__(self, start: float = START) -> None:
        self.now = start
        self.jobs = 0  # executor jobs not finished yet: real work the clock must wait for
        # Driven by hand: None while settling (stop when idle), else the time to advance to.
        self._until: float | None = None
        self._manual = False
        self._sel = _Selector(self._idle)
        super().__init__(self._sel)

    def time(self) -> float:
        return self.now

    # -- real work: executor jobs and sockets --------------------------------------------------

    def run_in_executor(self, executor: Executor | None, func: Callable[[*Ts], T],
                        *args: *Ts) -> asyncio.Future[T]:
        fut = super().run_in_executor(executor, func, *args)
        self.jobs += 1
        fut.add_done_callback(self._job_done)
        return fut

    def _job_done(self, _: asyncio.Future[Any]) -> None:
        self.jobs -= 1

    def _outside(self) -> bool:
        """Something outside the loop may wake it: a thread at work, or a socket (beyond the
        loop's own wake-up pipe)."""
        return self.jobs > 0 or len(self._sel.get_map()) > 1

    def _real_wait(self, timeout: float | None) -> list[tuple[selectors.SelectorKey, int]]:
        t0 = time.monotonic()
        ready = self._sel.inner.select(timeout)
        waited = time.monotonic() - t0
        self.now += waited if timeout is None else min(waited, timeout)
        return ready

    # -- when the loop would wait ---------------------------------------------------------------

    def _idle(self, timeout: float | None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._manual:
            return self._idle_manual(timeout)
        if self._outside():
            return self._real_wait(timeout)
        if timeout is None:
            # Nothing to run, no timer, no thread known to be at work: a thread of its own
            # (shutdown_default_executor) may still report; else it is a deadlock.
            ready = self._real_wait(DEADLOCK_AFTER)
            if not ready:
                raise RuntimeError("deadlock: nothing runnable, no timer, no thread at work")
            return ready
        self.now += timeout  # the jump: straight to the next timer
        return []

    def _idle_manual(self, timeout: float | None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._outside():
            # Real work first: its outcome is part of "what is runnable now". The clock moves
            # only as far as advance() allows.
            limit = None if self._until is None else max(0.0, self._until - self.now)
            wait = limit if timeout is None else timeout if limit is None else min(timeout, limit)
            t0 = time.monotonic()
            ready = self._sel.inner.select(wait)
            if self._until is not None:
                self.now = min(self._until, self.now + (time.monotonic() - t0))
            return ready
        if self._until is not None and timeout is not None and self.now + timeout <= self._until:
            self.now += timeout
        else:
            if self._until is not None:
                self.now = max(self.now, self._until)
            self.stop()
        return []

    # -- driving it ----------------------------------------------------------------------------

    def settle(self) -> None:
        """Run what is runnable now (and the threads' work), the clock standing still."""
        self._until, self._manual = None, True
        try:
            self.run_forever()
        finally:
            self._manual = False

    def advance(self, dt: float) -> None:
        """Fire the timers of the next `dt` seconds, the clock moving from one to the next;
        then settle."""
        self._until, self._manual = self.now + dt, True
        try:
            self.run_forever()
        finally:
            self._until, self._manual = None, False
        self.settle()

    def run(self, coro: Coroutine[Any, Any, T], limit: float = 3600.0) -> T:
        """Run `coro` to its end, the clock moving as needed, but not past `limit` (virtual)
        seconds: a coroutine that never ends fails the test instead of spinning for ever."""
        task = self.create_task(coro)
        deadline = self.call_at(self.now + limit, task.cancel)
        try:
            return self.run_until_complete(task)
        except asyncio.CancelledError:
            name = getattr(coro, "__qualname__", repr(coro))
            raise AssertionError(f"{name} still running after {limit} s") from None
        finally:
            deadline.cancel()


def run(coro: Coroutine[Any, Any, T], limit: float = 60.0) -> T:
    """`asyncio.run(coro)` on a fresh VirtualLoop, failing after `limit` virtual seconds."""
    loop = VirtualLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run(coro, limit)
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does with the tasks left when its coroutine ends."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if not tasks:
        return
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during vclock.run()",
                                         "exception": t.exception(), "task": t})
