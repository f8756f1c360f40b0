"""RFC 6587 stream de-framing (octet-counted or LF-delimited) for one TCP connection.
Sans-IO: feed() the bytes as they arrive, get back the complete SYSLOG-MSG frames."""

from __future__ import annotations

from typing import Final

OCTET: Final = "octet-counted"
LF: Final = "lf"
AUTO: Final = "auto"

# Default 256 KiB, the same limit as Sekoia's rsyslog concentrator.
DEFAULT_MAX_MESSAGE_SIZE: Final = 262144


class FrameDecoder:
    """De-framer for one connection; cost is O(bytes fed), whatever the read boundaries.

    The framing is decided once per connection, from its first byte (digit: octet
    counting, anything else: LF), and then kept: deciding per frame is what made
    Vector read LF messages starting with a digit as a length (Vector #4852).

    No byte is examined twice, except the at most ``len(str(max)) + 2`` digits of a
    length prefix cut by a read boundary, so the total work is linear in the bytes
    fed.  Retained state never exceeds ``max_message_size`` bytes: over-long frames
    are counted in ``oversized`` and dropped as they stream past, never buffered.
    """

    __slots__ = (
        "_buf",
        "_closed",
        "_discard",
        "_flen",
        "_max",
        "_maxdig",
        "_need",
        "_nul",
        "_skip",
        "error",
        "mode",
        "oversized",
    )

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        *,
        framing: str = AUTO,
        nul_delimiter: bool = False,
    ) -> None:
        """``framing``: "auto" (first byte decides), "octet-counted" or "lf" (forced, like
        rsyslog's supportOctetCountedFraming=off).  ``nul_delimiter``: NUL also ends a
        frame in LF mode (rsyslog AddtlFrameDelimiter=0, off by default there too)."""
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        if framing not in (AUTO, OCTET, LF):
            raise ValueError(f"unknown framing {framing!r}")
        self.mode: str | None = None if framing == AUTO else framing
        self.error: str | None = None
        self.oversized = 0
        self._max = max_message_size
        # Lengths of up to 100x the limit are skipped and resynced; a longer prefix
        # cannot come from a sane sender, so it is treated as a framing error.
        self._maxdig = len(str(max_message_size)) + 2
        self._nul = nul_delimiter
        # LF mode: the start of an unfinished line (never holds a LF).
        # Octet mode: an unfinished length prefix, or the unfinished frame body.
        self._buf = bytearray()
        self._need = 0  # octet mode: body bytes still missing for the frame in _buf
        self._flen = 0  # octet mode: length of that frame, for the truncation message
        self._skip = 0  # octet mode: bytes of an oversized frame still to drop
        self._discard = False  # LF mode: dropping an over-long line up to its LF
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes retained between calls (bounded by max_message_size + a few)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Return the frames completed by ``data``, in order."""
        if self.error is not None or self._closed or not data:
            return []
        mode = self.mode
        if mode is None:
            mode = self.mode = OCTET if 48 <= data[0] <= 57 else LF
        if mode == OCTET:
            return self._feed_octet(data)
        if self._nul:
            data = data.replace(b"\0", b"\n")
        return self._feed_lf(data)

    def close(self) -> list[bytes]:
        """End of stream: flush an unterminated LF line; report a cut octet frame."""
        if self._closed:
            return []
        self._closed = True
        if self.error is not None:
            return []
        buf = self._buf
        if self.mode == LF:
            if self._discard or not buf:
                return []
            frame = bytes(buf)
            buf.clear()
            return [frame]
        if self._need:
            got = self._flen - self._need
            self.error = f"EOF inside frame ({got} of {self._flen} octets)"
        elif self._skip:
            self.error = f"EOF inside oversized frame ({self._skip} octets missing)"
        elif buf:
            self.error = "EOF inside MSG-LEN"
        buf.clear()
        return []

    # -- LF-delimited -------------------------------------------------------

    def _feed_lf(self, data: bytes) -> list[bytes]:
        buf = self._buf
        maxlen = self._max
        frames: list[bytes] = []
        pos = 0
        if self._discard or buf:
            # Only the new bytes are searched: what is in _buf was scanned already.
            i = data.find(b"\n")
            if i < 0:
                if self._discard:
                    return frames
                if len(buf) + len(data) > maxlen:
                    self.oversized += 1
                    self._discard = True
                    buf.clear()
                else:
                    buf += data
                return frames
            if self._discard:
                self._discard = False
            elif len(buf) + i > maxlen:
                self.oversized += 1
                buf.clear()
            else:
                frames.append(b"".join((buf, memoryview(data)[:i])))
                buf.clear()
            pos = i + 1
        find = data.find
        append = frames.append
        while True:
            i = find(b"\n", pos)
            if i < 0:
                break
            if i - pos > maxlen:
                self.oversized += 1
            elif i > pos:  # empty frames are skipped (RFC 6587 3.4.2 senders pad with LF)
                append(data[pos:i])
            pos = i + 1
        rest = len(data) - pos
        if rest > maxlen:
            self.oversized += 1
            self._discard = True
        elif rest:
            buf += memoryview(data)[pos:]
        return frames

    # -- octet-counted -------------------------------------------------------

    def _feed_octet(self, data: bytes) -> list[bytes]:
        buf = self._buf
        pos = 0
        n = len(data)
        frames: list[bytes] = []
        if self._skip:
            if n <= self._skip:
                self._skip -= n
                return frames
            pos = self._skip
            self._skip = 0
        elif self._need:
            need = self._need
            if n < need:
                buf += data
                self._need = need - n
                return frames
            frames.append(b"".join((buf, memoryview(data)[:need])))
            buf.clear()
            self._need = 0
            pos = need
        elif buf:
            # A length prefix cut by the read boundary: at most _maxdig bytes re-read.
            data = bytes(buf) + data
            buf.clear()
            n = len(data)
        if pos >= n:
            return frames
        maxlen = self._max
        span = self._maxdig + 1
        find = data.find
        append = frames.append
        while pos < n:
            sp = find(b" ", pos, pos + span)
            if sp > pos and data[pos] != 48:
                digits = data[pos:sp]
                if digits.isdigit():
                    start = sp + 1
                    length = int(digits)
                    end = start + length
                    if length > maxlen:
                        self.oversized += 1
                        if end > n:
                            self._skip = end - n
                            return frames
                        pos = end
                        continue
                    if end <= n:
                        append(data[start:end])
                        pos = end
                        continue
                    buf += memoryview(data)[start:]
                    self._need = end - n
                    self._flen = length
                    return frames
            if self._prefix_error(data, pos, sp):
                return frames
            buf += memoryview(data)[pos:]  # unfinished length prefix
            return frames
        return frames

    def _prefix_error(self, data: bytes, pos: int, sp: int) -> bool:
        """Explain why data[pos:] is not a valid MSG-LEN SP; False if merely unfinished."""
        c = data[pos]
        if not 48 <= c <= 57:
            self.error = f"expected MSG-LEN, found {chr(c)!r}"
            return True
        if c == 48:
            self.error = "MSG-LEN must start with NONZERO-DIGIT"
            return True
        end = min(len(data), pos + self._maxdig + 1) if sp < 0 else sp
        i = pos
        while i < end and 48 <= data[i] <= 57:
            i += 1
        if i - pos > self._maxdig:
            self.error = f"MSG-LEN longer than {self._maxdig} digits"
            return True
        if i < end:
            self.error = f"expected SP after MSG-LEN, found {chr(data[i])!r}"
            return True
        return False
