"""The soak's events: one unique id in each, and what the senders record about them.

An event is a HAProxy-shaped line ending in `sid=<source><seq:09d>` (T: TCP, R: RELP through
rsyslog, U: UDP); one in POISON_EVERY also carries `mark=POISON`, which the intake refuses with
400 while an episode asks it to (so dead letters happen on known events). The text is a pure
function of (source, seq): the ledger checks every delivered event byte for byte.
"""

from __future__ import annotations

import re
import threading
from array import array
from dataclasses import dataclass, field

SOURCES = ("T", "R", "U")
SOURCE_NAMES = {"T": "tcp", "R": "relp", "U": "udp"}
ID_RE = re.compile(rb"sid=([TRU])(\d{9})")
POISON = b"mark=POISON"
POISON_EVERY = 997
SHIFT = 40

# What a sender knows of one event it tried to send.
UNSENT = 0
SENT = 1  # handed to the kernel whole (sendall returned, sendto succeeded)
MAYBE = 2  # part of a write that failed (connection reset at a kill): may or may not be in


def message(src: str, seq: int) -> str:
    """The event text the intake must receive for (src, seq): the syslog MSG."""
    mark = " mark=POISON" if seq % POISON_EVERY == POISON_EVERY - 1 else ""
    return (f"10.{seq % 250}.0.7:{40000 + seq % 20000} [02/Dec/2026:03:00:00.000] fe_soak "
            f"be/srv{seq % 7} 0/0/1/2/3 200 {100 + seq % 9000} - - ---- sid={src}{seq:09d}{mark}")


def syslog_line(src: str, seq: int) -> bytes:
    """RSYSLOG_TraditionalForwardFormat: `<PRI>Mmm dd hh:mm:ss host tag[pid]: msg`."""
    return f"<134>Dec  2 03:00:00 web1 haproxy[4242]: {message(src, seq)}".encode()


def key(src: str, seq: int) -> int:
    return (SOURCES.index(src) << SHIFT) | seq


def unkey(k: int) -> tuple[str, int]:
    return SOURCES[k >> SHIFT], k & ((1 << SHIFT) - 1)


@dataclass
class SentLog:
    """Per source, indexed by seq: when each event was sent, to which daemon run, its state,
    and for TCP the offset in that run's byte stream just after it."""

    src: str
    times: array[float] = field(default_factory=lambda: array("d"))
    runs: array[int] = field(default_factory=lambda: array("h"))
    states: array[int] = field(default_factory=lambda: array("b"))
    offsets: array[int] = field(default_factory=lambda: array("q"))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __getstate__(self) -> dict[str, object]:
        # Saved with the ledger's inputs (--replay); the lock is not.
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.states)

    def add(self, t: float, run: int, state: int, offset: int = 0) -> int:
        """A new seq (the next one): the caller builds its event from it."""
        with self.lock:
            self.times.append(t)
            self.runs.append(run)
            self.states.append(state)
            self.offsets.append(offset)
            return len(self.states) - 1

    def set(self, seq: int, t: float, state: int, offset: int = 0) -> None:
        with self.lock:
            self.times[seq] = t
            self.states[seq] = state
            self.offsets[seq] = offset
