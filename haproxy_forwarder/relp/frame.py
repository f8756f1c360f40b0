"""RELP frames (rsyslog's Reliable Event Logging Protocol), as librelp reads and writes them.

    FRAME   = TXNR SP COMMAND SP DATALEN [SP DATA] LF
    TXNR    = 1*9DIGIT            (0 is reserved for server hints such as serverclose)
    COMMAND = 1*32ALPHA           (case matters: librelp compares with strcmp)
    DATALEN = 1*9DIGIT            DATA present (after one SP) only if DATALEN > 0

Sans-IO: `FrameParser.feed(bytes)` returns the frames completed so far, whatever the read
boundaries. Bounded: at most `max_data` bytes of data are ever held; a longer frame is skipped
as it streams past (its data never stored) and reported with `oversized` set, so a sender is
not stuck resending it forever. Anything else unreadable is an error (`FrameError`, with a
reason label for the counters and a sentence for the log), after which the parser reads no
more: RELP recovers from framing errors by closing the session (librelp does the same).

librelp (relpframe.c) is a little more lenient in two places, which no librelp client uses:
an empty COMMAND and an empty DATALEN are accepted there; both are errors here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TXNR = 999_999_999
MAX_DIGITS = 9
MAX_COMMAND = 32
# TXNR SP COMMAND SP DATALEN and the byte after it: what a header can take at most.
MAX_HEADER = MAX_DIGITS + 1 + MAX_COMMAND + 1 + MAX_DIGITS + 1
# Data of the other commands (open's offers: a hundred bytes from librelp), whatever max_data.
MAX_OTHER_DATA = 4096

_HEADER = re.compile(rb"([0-9]{1,9}) ([A-Za-z]{1,32}) ([0-9]{1,9})([ \n])")

# Error reasons (the `reason` label of relp_frame_errors_total).
TXNR = "txnr"
COMMAND = "command"
DATALEN = "datalen"
TRAILER = "trailer"
REASONS = (TXNR, COMMAND, DATALEN, TRAILER)


@dataclass(frozen=True, slots=True)
class Frame:
    txnr: int
    command: str
    data: bytes = b""
    # DATALEN of a frame over max_data: its data was skipped, `data` is empty.
    oversized: int = 0


class FrameError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def next_txnr(txnr: int) -> int:
    """The spec latches at 999,999,999 and goes on at 1."""
    return 1 if txnr >= MAX_TXNR else txnr + 1


def build_frame(txnr: int, command: str, data: bytes = b"") -> bytes:
    """One frame; the data part (and its SP) only when there is data, as librelp writes."""
    if not 0 <= txnr <= MAX_TXNR:
        raise ValueError(f"txnr {txnr} out of 0..{MAX_TXNR}")
    if not (0 < len(command) <= MAX_COMMAND and command.isascii() and command.isalpha()):
        raise ValueError(f"invalid command {command!r}")
    if len(data) > MAX_TXNR:
        raise ValueError("data too long")
    if data:
        return b"%d %s %d %s\n" % (txnr, command.encode("ascii"), len(data), data)
    return b"%d %s 0\n" % (txnr, command.encode("ascii"))


def rsp(txnr: int, code: int, text: str, data: bytes = b"") -> bytes:
    """A `rsp` frame: "CODE SP TEXT" [LF DATA]; librelp's client reads 80 text bytes at most."""
    body = b"%03d %s" % (code, text[:80].encode("ascii", "replace"))
    if data:
        body += b"\n" + data
    return build_frame(txnr, "rsp", body)


SERVERCLOSE = build_frame(0, "serverclose")


def _diagnose(head: bytes) -> FrameError:
    """Why `head` (the start of a frame) is no valid header: the cold path, byte by byte."""
    i, n = 0, len(head)
    while i < n and 48 <= head[i] <= 57:
        i += 1
    if i == 0:
        return FrameError(TXNR, f"expected a transaction number, found {head[:1]!r}")
    if i > MAX_DIGITS:
        return FrameError(TXNR, f"transaction number longer than {MAX_DIGITS} digits")
    if head[i] != 32:
        return FrameError(TXNR, f"expected SP after the transaction number, found "
                                f"{head[i:i + 1]!r}")
    i += 1
    start = i
    while i < n and (65 <= head[i] <= 90 or 97 <= head[i] <= 122):
        i += 1
    if i == start:
        return FrameError(COMMAND, f"expected a command name, found {head[i:i + 1]!r}")
    if i - start > MAX_COMMAND:
        return FrameError(COMMAND, f"command name longer than {MAX_COMMAND} letters")
    if head[i] != 32:
        return FrameError(COMMAND, f"expected SP after the command, found {head[i:i + 1]!r}")
    i += 1
    start = i
    while i < n and 48 <= head[i] <= 57:
        i += 1
    if i == start:
        return FrameError(DATALEN, f"expected a data length, found {head[i:i + 1]!r}")
    if i - start > MAX_DIGITS:
        return FrameError(DATALEN, f"data length longer than {MAX_DIGITS} digits")
    return FrameError(DATALEN, f"expected SP or LF after the data length, found "
                               f"{head[i:i + 1]!r}")


def _incomplete(head: bytes) -> bool:
    """True if `head` is a valid header cut short (more bytes may still make it valid)."""
    if len(head) >= MAX_HEADER:
        return False
    parts = head.split(b" ")
    if len(parts) > 3:
        return False
    limits = (MAX_DIGITS, MAX_COMMAND, MAX_DIGITS)
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if len(part) > limits[k] or (not part and not last):
            return False
        if part and not (part.isdigit() if k != 1 else part.isalpha()):
            return False
    return True


class FrameParser:
    """Frames of one connection, in order; cost linear in the bytes fed.

    `max_data` bounds the data of `syslog` frames, MAX_OTHER_DATA that of any other."""

    __slots__ = ("_buf", "_frame", "_need", "_skip", "error", "max_data")

    def __init__(self, max_data: int) -> None:
        self.max_data = max_data
        self.error: FrameError | None = None
        self._buf = bytearray()
        # Inside a frame: its header (txnr, command, datalen), and either the bytes of data
        # plus trailer still missing (`_need`) or, oversized, the data bytes still to skip.
        self._frame: tuple[int, str, int] | None = None
        self._need = 0
        self._skip = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        if self.error is not None or not data:
            return frames
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return frames
            data = data[self._skip:]
            self._skip = 0
        buf = self._buf
        buf += data
        if self._need and len(buf) < self._need:
            return frames  # the body is still incomplete: nothing to look at again
        pos = 0
        try:
            pos = self._frames(buf, frames)
        except FrameError as exc:
            self.error = exc
            buf.clear()
            return frames
        del buf[:pos]
        return frames

    def _frames(self, buf: bytearray, frames: list[Frame]) -> int:
        n = len(buf)
        pos = 0
        match = _HEADER.match
        max_syslog = self.max_data
        while pos < n:
            if self._frame is None:
                m = match(buf, pos)
                if m is None:
                    head = bytes(buf[pos:pos + MAX_HEADER])
                    if _incomplete(head):
                        return pos
                    raise _diagnose(head)
                txnr = int(m[1])
                length = int(m[3])
                sep = m[4]
                if length == 0:
                    if sep != b"\n":
                        raise FrameError(TRAILER, "data length 0 must be followed by LF")
                    frames.append(Frame(txnr, m[2].decode("ascii")))
                    pos = m.end()
                    continue
                if sep != b" ":
                    raise FrameError(DATALEN, f"data length {length} not followed by SP")
                pos = m.end()
                command = m[2].decode("ascii")
                self._frame = (txnr, command, length)
                max_data = max_syslog if command == "syslog" else MAX_OTHER_DATA
                if length > max_data:
                    # Skip the data as it comes, never held; then the trailer.
                    avail = n - pos
                    if avail < length:
                        self._skip = length - avail
                        self._need = 1
                        return n
                    pos += length
                    self._need = 1
                else:
                    self._need = length + 1
            txnr, command, length = self._frame
            max_data = max_syslog if command == "syslog" else MAX_OTHER_DATA
            need = self._need
            if n - pos < need:
                self._need = need  # bytes of the body still expected from this position
                # Keep only from the frame's body start: `_need` counts from `pos`.
                return pos
            end = pos + need - 1
            if buf[end] != 10:
                raise FrameError(TRAILER, f"no LF after the {length} octets of data "
                                          f"(found {bytes(buf[end:end + 1])!r})")
            if need == 1 and length > max_data:
                frames.append(Frame(txnr, command, b"", oversized=length))
            else:
                frames.append(Frame(txnr, command, bytes(buf[pos:end])))
            pos = end + 1
            self._frame = None
            self._need = 0
        return pos
