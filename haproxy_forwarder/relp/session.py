"""One RELP server session, sans-IO: bytes in, messages out, answers queued in txnr order.

The asyncio source feeds what it reads (`receive`), hands the returned syslog messages to
the ingest, calls `acknowledge` once they are durable, and writes `outgoing()` to the socket;
`close_after_write` tells it to close once that is written. Nothing here does IO or knows
about time.

Behaviour, after librelp's server (copen.c, cclose.c, scsyslog.c, relpframe.c, relpsess.c):
- `open` first, with the client's offers; the answer is "200 OK" followed by our offers
  (relp_version, relp_software, commands=syslog when the client offered syslog). A second
  `open` is answered "500 protocol error: connection already open" and the session closed.
- `syslog`: answered "200 OK" once `acknowledge`d. The answers go out in txnr order (the
  spec requires it), so an early durable message waits for the older ones.
- `close`: answered "200 OK" after every earlier answer, then the session closes. (librelp
  answers an empty rsp there, which its own client cannot parse: the spec's answer here.)
- Transaction numbers: each command must carry the next one (1, 2, ... 999999999, 1);
  txnr 0 is for server hints. A wrong one ends the session (librelp does the same).
- Unknown commands, `syslog` before `open` (or not offered): answered "500 ..." and the
  session ends; librelp answers the latter too and closes on the former without a word.
  A `rsp 500` makes librelp's client drop that one command and break the session, which
  is what a command we will never run should do.
- On any error the answers ready so far are sent, then the `serverclose` hint, then the
  connection closes; answers still pending are never sent: the client resends those
  messages on its next session (a duplicate, never a loss).
- `shutdown()`: the answers ready so far, then `serverclose` (txnr 0), then close.

A RELP answer "500" to a syslog message would make the client discard it: never sent for a
message we read correctly; if we cannot make it durable we close without answering.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .. import __version__
from .frame import (
    SERVERCLOSE,
    TXNR,
    Frame,
    FrameError,
    FrameParser,
    next_txnr,
    rsp,
)

PROTOCOL_VERSION = 0  # librelp's RELP_CURR_PROTOCOL_VERSION: what omrelp speaks
# librelp reads at most 32 name bytes and 255 value bytes per offer, 10 values per offer.
MAX_OFFER_NAME = 32
MAX_OFFER_VALUE = 255
MAX_OFFER_VALUES = 10
MAX_OFFERS = 32

# Frame error reasons beyond the parser's (frame.REASONS).
SEQUENCE = "sequence"  # a transaction number out of order
NOT_OPEN = "not_open"  # a command before `open`
UNKNOWN = "unknown_command"
OFFERS = "offers"  # an `open` whose offers cannot be read
PROTOCOL = "protocol"  # a second open, syslog not offered, a command after close
SESSION_REASONS = (SEQUENCE, NOT_OPEN, UNKNOWN, OFFERS, PROTOCOL)
# Sessions the server aborts (sources/relp.py), no protocol error of the client's.
NOT_DURABLE = "not_durable"  # one of its messages was lost before it was durable
CLOSE_TIMEOUT = "close_timeout"  # `close` still waiting for earlier answers too long
ABORT_REASONS = (NOT_DURABLE, CLOSE_TIMEOUT)

OK = "OK"


@dataclass(frozen=True, slots=True)
class Problem:
    reason: str
    message: str


@dataclass(slots=True)
class Received:
    """What one `receive` brought: messages for the ingest and what the counters need."""

    # (txnr, message): syslog commands to ingest, then to `acknowledge`.
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    # Syslog commands over max_data: skipped unread and answered at once (as TCP drops a
    # frame over max_message_size): DATALEN of each.
    oversized: list[int] = field(default_factory=list)
    commands: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    opened: bool = False
    error: Problem | None = None


def parse_offers(data: bytes) -> dict[str, list[str]]:
    """`name=value,value` lines, as librelp's relpOffersConstructFromFrame reads them."""
    offers: dict[str, list[str]] = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        name, _, values = line.partition(b"=")
        if len(name) > MAX_OFFER_NAME:
            raise ValueError(f"offer name longer than {MAX_OFFER_NAME} bytes")
        vals = [v for v in values.split(b",") if v] if values else []
        if len(vals) > MAX_OFFER_VALUES:
            raise ValueError(f"offer {name!r} has more than {MAX_OFFER_VALUES} values")
        if any(len(v) > MAX_OFFER_VALUE for v in vals):
            raise ValueError(f"offer {name!r}: a value longer than {MAX_OFFER_VALUE} bytes")
        offers[name.decode("latin-1")] = [v.decode("latin-1") for v in vals]
        if len(offers) > MAX_OFFERS:
            raise ValueError(f"more than {MAX_OFFERS} offers")
    return offers


class ServerSession:
    """The server side of one RELP connection."""

    def __init__(self, max_data: int, software: str = "haproxy-forwarder") -> None:
        self.parser = FrameParser(max_data)
        self.software = software
        self.opened = False
        self.syslog_enabled = False
        self.expected = 1  # the next txnr the client must use
        # Commands answered in txnr order: [txnr, answer or None while pending, syslog?].
        self._answers: deque[list[object]] = deque()
        self._pending: dict[int, list[object]] = {}
        self._out: list[bytes] = []
        # After the answers queued so far: close (a `close` command, an error, shutdown).
        self._closing = False
        self._final = b""  # written last when closing: serverclose, or nothing after close
        self.done = False  # everything that will ever be written has been handed out
        self.error: Problem | None = None
        self.answered = 0  # syslog answers handed out (what relp_acks counts)

    # -- state --------------------------------------------------------------------------------

    @property
    def unacked(self) -> int:
        """Answers not handed out yet: pending ones and those ready but held behind an older
        pending one (txnr order). The window in use: what the session holds is bounded by
        it, whatever order durability comes in."""
        return len(self._answers)

    @property
    def buffered(self) -> int:
        return self.parser.buffered

    @property
    def closing(self) -> bool:
        return self._closing

    # -- input --------------------------------------------------------------------------------

    def receive(self, data: bytes) -> Received:
        out = Received()
        if self._closing:
            return out  # after close, an error or shutdown, nothing more is read
        frames = self.parser.feed(data)
        for frame in frames:
            out.frames += 1
            out.commands[frame.command] = out.commands.get(frame.command, 0) + 1
            problem = self._command(frame, out)
            if problem is not None:
                self._fail(problem, out)
                return out
            if self._closing:
                return out  # `close`: what follows it is not read
        if self.parser.error is not None:
            self._fail(_problem(self.parser.error), out)
        return out

    def _command(self, frame: Frame, out: Received) -> Problem | None:
        txnr = frame.txnr
        if txnr == 0:
            return Problem(TXNR, f"txnr 0 is for server hints, not {frame.command!r}")
        if txnr != self.expected:
            return Problem(SEQUENCE, f"txnr {txnr} where {self.expected} was expected")
        self.expected = next_txnr(txnr)
        cmd = frame.command
        if cmd == "syslog":
            if not self.opened:
                self._answer(txnr, rsp(txnr, 500, "command disabled: no open yet"))
                return Problem(NOT_OPEN, "syslog before open")
            if not self.syslog_enabled:
                self._answer(txnr, rsp(txnr, 500, "command disabled"))
                return Problem(PROTOCOL, "syslog, which the client did not offer at open")
            if frame.oversized:
                out.oversized.append(frame.oversized)
                self._answer(txnr, rsp(txnr, 200, OK), syslog=True)
            else:
                entry: list[object] = [txnr, None, True]
                self._answers.append(entry)
                self._pending[txnr] = entry
                out.messages.append((txnr, frame.data))
            return None
        if cmd == "open":
            return self._open(frame, out)
        if cmd == "close":
            if not self.opened:
                self._answer(txnr, rsp(txnr, 500, "no session open"))
                return Problem(NOT_OPEN, "close before open")
            self._answer(txnr, rsp(txnr, 200, OK))
            self._close_after(b"")
            return None
        self._answer(txnr, rsp(txnr, 500, "unknown command"))
        if not self.opened:
            return Problem(NOT_OPEN, f"command {cmd[:32]!r} before open")
        return Problem(UNKNOWN, f"unknown command {cmd[:32]!r}")

    def _open(self, frame: Frame, out: Received) -> Problem | None:
        txnr = frame.txnr
        if self.opened:
            self._answer(txnr, rsp(txnr, 500, "protocol error: connection already open"))
            return Problem(PROTOCOL, "open on an open session")
        if frame.oversized:
            self._answer(txnr, rsp(txnr, 500, "error on connect: offers too long"))
            return Problem(OFFERS, f"offers of {frame.oversized} bytes")
        try:
            offers = parse_offers(frame.data)
        except ValueError as exc:
            self._answer(txnr, rsp(txnr, 500, "error on connect: invalid offers"))
            return Problem(OFFERS, str(exc))
        version = offers.get("relp_version")
        if version is not None and (not version or not version[0].isdigit()):
            self._answer(txnr, rsp(txnr, 500, "error on connect: invalid relp_version"))
            return Problem(OFFERS, f"relp_version {version!r} is not a number")
        self.syslog_enabled = "syslog" in offers.get("commands", [])
        ours = (f"relp_version={PROTOCOL_VERSION}\n"
                f"relp_software={self.software},{__version__}\n"
                f"commands={'syslog' if self.syslog_enabled else ''}")
        self._answer(txnr, rsp(txnr, 200, OK, ours.encode("ascii")))
        self.opened = True
        out.opened = True
        return None

    # -- answers ------------------------------------------------------------------------------

    def acknowledge(self, txnrs: list[int]) -> None:
        """These syslog messages are durable: their "200 OK" may go (in txnr order)."""
        for txnr in txnrs:
            entry = self._pending.pop(txnr, None)
            if entry is not None:
                entry[1] = rsp(txnr, 200, OK)
        self._release()

    def _answer(self, txnr: int, answer: bytes, syslog: bool = False) -> None:
        self._answers.append([txnr, answer, syslog])
        self._release()

    def _release(self) -> None:
        """Move the answers that are ready, oldest first, to the output."""
        answers = self._answers
        while answers and answers[0][1] is not None:
            _, ready, syslog = answers.popleft()
            assert isinstance(ready, bytes)
            self._out.append(ready)
            if syslog:
                self.answered += 1
        if self._closing and not self.done and (not answers or self.error is not None):
            self._finish()

    def _finish(self) -> None:
        # What is still pending is abandoned: the client resends it on its next session.
        self._answers.clear()
        self._pending.clear()
        if self._final:
            self._out.append(self._final)
        self.done = True

    def _close_after(self, final: bytes) -> None:
        self._closing = True
        self._final = final
        self._release()

    def _fail(self, problem: Problem, out: Received) -> None:
        self.error = out.error = problem
        # Read in the same chunk as the error, never answered: not ingested either, so the
        # client's resend on its next session is no duplicate.
        out.messages.clear()
        self._close_after(SERVERCLOSE)

    def shutdown(self) -> None:
        """The server stops: answers ready so far, then serverclose; pending ones dropped."""
        if self.done:
            return
        self._closing = True
        self._final = SERVERCLOSE
        self._release()
        if not self.done:
            self._finish()

    def outgoing(self) -> bytes:
        """Bytes to write now (answers, the final hint); empty if none."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    @property
    def close_after_write(self) -> bool:
        """Everything has been handed out: close once `outgoing()` is written."""
        return self.done


def _problem(exc: FrameError) -> Problem:
    return Problem(exc.reason, exc.message)

