"""The senders: threads writing id-carrying events at a steady rate, recording each one.

- TCP: octet-counted frames on one connection per daemon run, as rsyslog's omfwd writes
  them; before each write it checks whether the daemon half-closed (a FIN at shutdown), as
  omfwd does, and reconnects. Writes are non-blocking, so the bytes handed to the kernel are
  known exactly: each event is SENT once its whole frame is, MAYBE when the write failed
  part-way (the connection reset by a kill).
- UDP: one datagram per event (sendto), whatever the daemon's state.
- RELP: LF lines into a real rsyslogd's imptcp input; rsyslog forwards them with omrelp
  (the shipped rule), resending whatever the forwarder did not acknowledge.
"""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from collections.abc import Callable

from devtools.traffic import octet_frame

from .events import MAYBE, SENT, SentLog, syslog_line

#: Events per write: a write every 1/20 s at the configured rate.
TICKS = 20


class Sender(threading.Thread):
    """Paced: `rate` events per second, never catching up more than a second late (a sender
    held back by the daemon resumes at its rate instead of bursting)."""

    src = "?"

    def __init__(self, port: int, rate: float, run_index: Callable[[], int]) -> None:
        super().__init__(daemon=True, name=f"soak-{self.src}")
        self.port = port
        self.rate = rate
        self.run_index = run_index
        self.log = SentLog(self.src)
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def batch_size(self) -> int:
        return max(1, round(self.rate / TICKS))

    def run(self) -> None:
        try:
            start = time.monotonic()
            done = 0
            while not self.stop_flag.is_set():
                done += self.tick(self.batch_size())
                ahead = start + done / self.rate - time.monotonic()
                if ahead > 0:
                    self.stop_flag.wait(ahead)
                elif ahead < -1.0:
                    start, done = time.monotonic(), 0
            self.close()
        except BaseException as exc:  # reported by the runner
            self.error = exc

    def tick(self, n: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(30)


class TcpSender(Sender):
    src = "T"

    def __init__(self, port: int, rate: float, run_index: Callable[[], int]) -> None:
        super().__init__(port, rate, run_index)
        self.sock: socket.socket | None = None
        self.sock_run = -1
        self.offset = 0  # bytes of this run's stream handed to the kernel
        self.connections = 0

    def _connect(self) -> bool:
        run = self.run_index()
        if run < 0:
            return False
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
        except OSError:
            return False
        s.setblocking(False)
        self.sock, self.connections = s, self.connections + 1
        if run != self.sock_run:
            self.sock_run, self.offset = run, 0
        return True

    def _peer_closed(self) -> bool:
        # The daemon half-closes at shutdown and reads on until we close: check first.
        assert self.sock is not None
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def tick(self, n: int) -> int:
        if self.sock is not None and self._peer_closed():
            self.close()
        if self.sock is None and not self._connect():
            self.stop_flag.wait(0.05)
            return 0
        assert self.sock is not None
        seqs = [self.log.add(0.0, self.sock_run, 0) for _ in range(n)]
        frames = [octet_frame(syslog_line("T", seq)) for seq in seqs]
        ok = self._write(b"".join(frames))
        now = time.monotonic()
        end = self.offset
        for seq, frame in zip(seqs, frames, strict=True):
            end += len(frame)
            self.log.set(seq, now, SENT if ok else MAYBE, end)
        if ok:
            self.offset = end
        else:
            self.close()
        return n

    def _write(self, data: bytes) -> bool:
        """All of `data` into the socket (waiting while the daemon holds input back), or
        False when the connection broke."""
        assert self.sock is not None
        view = memoryview(data)
        while view:
            if self.stop_flag.is_set() and not select.select([], [self.sock], [], 5)[1]:
                return False
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                select.select([], [self.sock], [], 0.2)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    return False
                raise
        return True


class UdpSender(Sender):
    src = "U"

    def __init__(self, port: int, rate: float, run_index: Callable[[], int]) -> None:
        super().__init__(port, rate, run_index)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def tick(self, n: int) -> int:
        for _ in range(n):
            seq = self.log.add(0.0, self.run_index(), 0)
            try:
                self.sock.sendto(syslog_line("U", seq), ("127.0.0.1", self.port))
                self.log.set(seq, time.monotonic(), SENT)
            except OSError:
                self.log.set(seq, time.monotonic(), MAYBE)
        return n

    def close(self) -> None:
        self.sock.close()


class RelpFeeder(Sender):
    """Into rsyslog (always running), which forwards with omrelp: every line is SENT once
    rsyslog's imptcp took it; from there rsyslog keeps it until the forwarder acknowledges."""

    src = "R"

    def __init__(self, port: int, rate: float, run_index: Callable[[], int]) -> None:
        super().__init__(port, rate, run_index)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def tick(self, n: int) -> int:
        seqs = [self.log.add(0.0, self.run_index(), 0) for _ in range(n)]
        self.sock.sendall(b"".join(syslog_line("R", s) + b"\n" for s in seqs))
        now = time.monotonic()
        for seq in seqs:
            self.log.set(seq, now, SENT)
        return n

    def close(self) -> None:
        self.sock.close()
