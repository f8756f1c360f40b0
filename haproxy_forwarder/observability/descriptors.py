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

import errno
import resource
from typing import Any, Protocol

from .counters import Counters

# Descriptors kept free for everything but syslog connections (FD_MARGIN in app.py is 64).
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
