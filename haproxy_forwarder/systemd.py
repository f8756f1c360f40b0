"""systemd supervision: the sd_notify protocol, spoken directly, and the two loops that use it.

The protocol is one datagram of newline-separated KEY=VALUE lines to the AF_UNIX socket named
by $NOTIFY_SOCKET ("@name" is the abstract socket "\\0name"). Without that variable (not run
by systemd, or Type= is not notify) every call is a no-op. Written here rather than taken from
libsystemd or python-systemd: a dozen lines of socket code, and no C library to install.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from .observability import logs

# A datagram to a socket whose receive queue is full blocks; never hold the event loop
# longer than this for systemd (sd_notify would block with no limit at all).
SEND_TIMEOUT = 1.0


def notify_address(value: str | None) -> str | None:
    """The socket address $NOTIFY_SOCKET names, or None when there is nothing to talk to.

    Only paths and abstract names: systemd ≥ 254 also accepts "vsock:CID:PORT", which is for
    virtual machines, not for a service on the host.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """$WATCHDOG_USEC when it is meant for this process ($WATCHDOG_PID unset or ours)."""
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None  # set for a parent (e.g. a wrapper script): its watchdog, not ours
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """sd_notify for this process. Failures to send are logged once, never raised.

    `watchdog_interval` is how often to send WATCHDOG=1 (half of $WATCHDOG_USEC, as
    sd_watchdog_enabled(3) advises), or None when systemd expects no pings from us.
    """

    def __init__(self, log: Any = None, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.log = log if log is not None else logs.get_logger("haproxy_forwarder.systemd")
        raw = env.get("NOTIFY_SOCKET")
        self.address = notify_address(raw)
        if raw and self.address is None:
            self.log.warning("notify_socket_unsupported", notify_socket=raw,
                             action="not notifying systemd: only paths and @abstract names")
        usec = watchdog_usec(env, os.getpid()) if self.address is not None else None
        self.watchdog_interval: float | None = usec / 2e6 if usec else None
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of `lines`; True if the kernel took it."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            if not self._failed:
                # Once: a watchdog ping every few seconds would otherwise flood the log.
                self._failed = True
                self.log.error("notify_failed", error=str(exc),
                               notify_socket=self.address.replace("\0", "@"),
                               hint="systemd may consider the service failed")
            return False
        return True

    def ready(self) -> bool:
        return self.send("READY=1")

    def reloading(self) -> bool:
        # systemd ≥ 253 (Type=notify-reload) wants the time the reload began; older ones
        # ignore the field, so it is always sent.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        # One line: a newline would start another KEY=VALUE assignment.
        return self.send("STATUS=" + " ".join(text.split()))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def keep_status(notifier: Notifier, line: Callable[[], str], every: float) -> None:
    """STATUS= refreshed every `every` seconds (what `systemctl status` shows)."""
    while True:
        await asyncio.sleep(every)
        notifier.status(line())


async def keep_watchdog(notifier: Notifier, stalled: Callable[[], str | None], log: Any) -> None:
    """WATCHDOG=1 from the event loop, withheld while `stalled()` gives a reason.

    Sent from a task, so a blocked event loop stops the pings too; withheld while delivery is
    stalled, so systemd restarts a daemon that is up but no longer forwarding.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    withheld: str | None = None
    while True:
        reason = stalled()
        if reason is None:
            notifier.watchdog()
            if withheld is not None:
                log.info("watchdog_resumed")
        elif withheld is None:
            log.error("watchdog_withheld", reason=reason,
                      action=f"systemd restarts the service within {2 * interval:.0f} s")
        withheld = reason
        await asyncio.sleep(interval)
