"""What keeps hostile peers from locking honest senders out or pinning memory.

Two small pieces shared by the sources: the allow-list (`Allow`) and the total budget of bytes
held in partial frames across every TCP connection (`BufferBudget`). The log lines for events
a flood repeats thousands of times are observability/quiet.py's `QuietLog`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

# One line per event name, then at most one summary per this many seconds saying how many
# were suppressed: 5,000 refused connects must not write 5,000 log lines.
# Shedding stops once the total is back under this share of the cap: every close then buys
# room for many more bytes, instead of sorting all connections again at each byte over it.
SHED_TO = 0.9

SEEN_MAX = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Allow:
    """`listen.allow`: the CIDR blocks peers may come from; empty means everyone."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._seen: dict[str, bool] = {}

    def permits(self, host: str) -> bool:
        if not self.networks:
            return True
        # UDP asks per datagram: remember the answer per address (bounded, spoofed sources
        # could otherwise grow it without end).
        known = self._seen.get(host)
        if known is None:
            if len(self._seen) >= SEEN_MAX:
                self._seen.clear()
            known = self._seen[host] = self._check(host)
        return known

    def _check(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d: match them as IPv4.
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


class Holder(Protocol):
    """A connection as the budget sees it."""

    buffered: int

    def shed(self) -> None: ...


@dataclass(eq=False)
class BufferBudget:
    """`listen.max_buffered_bytes`: bytes held in unfinished frames, summed over connections.

    Each connection reports its reader's `buffered` after every read; past the cap, the
    connections holding the most are closed first (`on_shed` is told each one)."""

    cap: int = 32 * 1024 * 1024
    total: int = 0
    holders: set[Any] = field(default_factory=set)
    _shedding: bool = False

    def update(self, holder: Holder, buffered: int) -> None:
        self.total += buffered - holder.buffered
        holder.buffered = buffered
        if buffered:
            self.holders.add(holder)
        else:
            self.holders.discard(holder)
        if self.total > self.cap:
            self._shed()

    def release(self, holder: Holder) -> None:
        self.update(holder, 0)

    def _shed(self) -> None:
        if self._shedding:  # a shed connection releases itself: no second pass from there
            return
        self._shedding = True
        try:
            goal = int(self.cap * SHED_TO)
            for holder in sorted(self.holders, key=lambda h: h.buffered, reverse=True):
                if self.total <= goal:
                    break
                self.total -= holder.buffered
                holder.buffered = 0
                self.holders.discard(holder)
                holder.shed()
        finally:
            self._shedding = False
