"""Running out of file descriptors, made visible: counted (`accept_errors`) and logged,
rate-limited.

Under uvloop an accept() failing with EMFILE is handled inside libuv (pending connections are
accepted and closed at once) and never reported: senders are refused with no log line. So
the TCP listeners look at each new connection's descriptor instead: Linux hands out the
lowest free number, so a descriptor within RESERVE of the soft limit means nearly all are in
use. That connection is closed (and counted), which keeps the last RESERVE descriptors for
the spool, the intake's HTTPS connections and the status endpoint, so delivery and /metrics
go on. The asyncio loop does report EMFILE at accept, through its exception handler: the
daemon passes it to `exhausted()`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
from collections.abc import Callable
from typing import Any, Protocol

from .counters import Counters

# Descriptors kept free for everything but syslog connections (wiring.FD_MARGIN is 64).
RESERVE = 32
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class Warner(Protocol):
    def warning(self, event: str, **fields: Any) -> None: ...


class Descriptors:
    def __init__(self, counters: Counters, quiet: Warner, reserve: int = RESERVE) -> None:
        self.counters = counters
        self.quiet = quiet
        self.reserve = reserve

    def admit(self, transport: Any, listener: str) -> bool:
        """False (counted, logged) when this connection's descriptor leaves too few free."""
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if fd < 0 or soft == resource.RLIM_INFINITY or fd < soft - self.reserve:
            return True
        self.exhausted(listener=listener, reason=f"descriptor {fd} of nofile {soft}: fewer "
                       f"than {self.reserve} left", action="connection closed")
        return False

    def exhausted(self, **fields: Any) -> None:
        self.counters.accept_errors += 1
        # QuietLog: the first at once, then one line per interval with `suppressed`.
        self.quiet.warning("descriptors_exhausted", **fields,
                           accept_errors=self.counters.accept_errors,
                           hint="raise LimitNOFILE (systemd) / ulimit -n, or lower "
                                "listen.max_connections")


def loop_error_handler(counters: Counters, quiet: Warner,
                       log: Any) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The event loop's exception handler: errors asyncio would print as bare text become
    log lines like every other, so they are seen and grepped for."""
    descriptors = Descriptors(counters, quiet)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_DESCRIPTORS:
            # accept() out of descriptors (the asyncio loop retries each second): counted,
            # one line per few seconds.
            descriptors.exhausted(reason=os.strerror(exc.errno), action="accept retried in 1 s")
            return
        log.error("event_loop_error", message=context.get("message", ""),
                  error=repr(exc) if exc else None)

    return handle
