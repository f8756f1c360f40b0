"""The RELP source over real sockets, with a small RELP client written here.

In-process (a scripted sink that says when takes are durable): answers only once durable and
in txnr order, the window, two sessions where one sends garbage, the ingest byte-identical to
TCP's. With the real daemon (devtools/daemon.py) and its spool: the answer comes once the
event is in the spool or at the intake, filtered messages are answered at once, serverclose
at SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon, write_toml
from devtools.probe import metric, until
from haproxy_forwarder.acks import Ack
from haproxy_forwarder.config import ListenConfig, RelpConfig
from haproxy_forwarder.ingest import AUTO, ChunkResult, ProgramFilter, new_reader
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.relp import Frame, FrameParser, build_frame
from haproxy_forwarder.sources import Backpressure, RelpSource, SourceContext
from haproxy_forwarder.sources import relp as relp_source
from haproxy_forwarder.sources.relp import RelpConnection
from tests.fake_intake import FakeIntake
from tests.recording import Log

OFFERS = b"relp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\n" \
         b"commands=syslog"
TS = b"2026-12-02T00:00:00.000Z"


def haproxy_line(n: int) -> bytes:
    return (b"<134>Dec  2 03:00:00 web1 haproxy[4242]: 10.0.0.%d:5%04d "
            b"[02/Dec/2026:03:00:00.000] fe be/srv 0/0/1/2/3 200 123 - - ---- "
            b"1/1/0/0/0 0/0 \"GET /%d HTTP/1.1\"" % (n % 250, n % 10000, n))


class RelpClient:
    """A RELP client as librelp's: open, pipelined syslog commands, answers by txnr."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = FrameParser(1 << 20)
        self.txnr = 1
        self.answers: dict[int, bytes] = {}
        self.hints: list[Frame] = []
        self.order: list[int] = []  # txnrs in the order their answers came
        self.eof = False

    @classmethod
    async def connect(cls, port: int, open_session: bool = True) -> RelpClient:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = cls(r, w)
        if open_session:
            t = c.send("open", OFFERS)
            await c.wait_for([t])
            assert c.answers[t].startswith(b"200 OK\n"), c.answers[t]
        return c

    def send(self, command: str, data: bytes = b"") -> int:
        t = self.txnr
        self.txnr += 1
        self.writer.write(build_frame(t, command, data))
        return t

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def pump(self, timeout: float) -> bool:
        """Read what arrives within `timeout`; False on timeout."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""  # aborted by the server: gone all the same
        if not data:
            self.eof = True
            return True
        for f in self.parser.feed(data):
            if f.txnr == 0:
                self.hints.append(f)
            else:
                self.answers[f.txnr] = f.data
                self.order.append(f.txnr)
        return True

    async def wait_for(self, txnrs: list[int], timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(t in self.answers for t in txnrs):
            left = deadline - loop.time()
            if left <= 0 or self.eof:
                missing = [t for t in txnrs if t not in self.answers]
                raise AssertionError(f"no answer for txnr {missing[:5]}... (eof={self.eof})")
            await self.pump(left)

    async def wait_eof(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.eof:
            left = deadline - loop.time()
            assert left > 0, "the server did not close the session"
            await self.pump(left)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# -- in-process: a scripted sink ------------------------------------------------------------


class ScriptedSink:
    """take() keeps the events; the callbacks of its Ack wait for `release()` (or run at once
    for a take that added no event, as the Collector does)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.events = 0
        self.waiting: list[Callable[[], None]] = []
        self.losers: dict[Callable[[], None], Callable[[], None] | None] = {}
        self.flushes = 0
        self.immediate = False  # every take durable at once (a sink that never holds back)

    def flush(self) -> None:
        self.flushes += 1

    def received_at(self) -> bytes:
        return TS

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        self.data.append(result.data)
        self.events += len(result.ends)
        if ack is None:
            return
        if self.immediate or (not result.ends and not result.too_large):
            ack.durable()
        else:
            self.waiting.append(ack.durable)
            self.losers[ack.durable] = ack.lost

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for cb in waiting:
            self.losers.pop(cb, None)
            cb()

    def lose(self, i: int = 0) -> None:
        """The i-th waiting take is lost (as Waiter.lose()): its on_lost, never its callback."""
        on_lost = self.losers.pop(self.waiting.pop(i), None)
        if on_lost is not None:
            on_lost()


def make_source(sink: ScriptedSink, max_window: int = 128,
                **listen: Any) -> tuple[RelpSource, SourceContext]:
    ctx = SourceContext(sink, Counters(), Log(), ProgramFilter(["haproxy", "hapee"], ["hapee"]),
                        Backpressure(), 4096)
    src = RelpSource(ctx, "127.0.0.1:0", ListenConfig(**listen),
                     RelpConfig(max_window=max_window))
    return src, ctx


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_answers_only_once_durable_and_in_order() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, _ = make_source(sink)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        first = [c.send("syslog", haproxy_line(i)) for i in range(3)]
        await until(lambda: sink.events == 3)
        assert not await c.pump(0.2)  # taken, not durable: no answer
        assert c.answers.keys() == {1}
        second = [c.send("syslog", haproxy_line(i)) for i in range(3, 5)]
        await until(lambda: sink.events == 5)
        # Durable in the opposite order: the answers still come in txnr order.
        later = sink.waiting.pop()
        sink.release()
        later()
        await c.wait_for(first + second)
        assert c.order == [1, *first, *second]
        assert all(c.answers[t] == b"200 OK" for t in first + second)
        assert src.relp.acks == 5 and src.relp.commands["syslog"] == 5
        await c.close()
        await src.stop(0.1)

    run(main())


def test_filtered_and_oversized_answered_at_once() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, ctx = make_source(sink)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        t1 = c.send("syslog", b"<13>Dec  2 03:00:00 host sshd[1]: not for us")
        t2 = c.send("syslog", b"<13>Dec  2 03:00:00 host haproxy[1]: " + b"x" * 9000)
        t3 = c.send("syslog", b"")  # an empty message: nothing to keep
        await c.wait_for([t1, t2, t3])
        assert sink.events == 0 and not sink.waiting
        assert src.stats.oversized_frames == 1
        assert any(e == "frame_too_large" for e, _ in ctx.log.lines)
        await c.close()
        await src.stop(0.1)

    run(main())


def test_window_pauses_reading_until_answers_go() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, _ = make_source(sink, max_window=4)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        batch1 = [c.send("syslog", haproxy_line(i)) for i in range(4)]
        await until(lambda: sink.events == 4)
        [conn] = src.connections
        assert conn.transport is not None and not conn.transport.is_reading()
        assert sink.flushes == 1  # the sender must wait: the open batch is closed at once
        batch2 = [c.send("syslog", haproxy_line(i)) for i in range(4, 6)]
        await c.writer.drain()
        assert not await c.pump(0.2)
        assert sink.events == 4  # the window is full: not read
        sink.release()
        await c.wait_for(batch1)
        await until(lambda: sink.events == 6)  # reading again: the next ones come in
        sink.release()
        await c.wait_for(batch2)
        await c.close()
        await src.stop(0.1)

    run(main())


def test_a_sender_that_reads_no_answers_is_not_read_either() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        sink.immediate = True
        src, _ = make_source(sink)
        _, port = await src.start()
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", port))
        raw.setblocking(False)
        r, w = await asyncio.open_connection(sock=raw)
        c = RelpClient(r, w)
        await until(lambda: len(src.connections) == 1)
        [conn] = src.connections
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        c.send("open", OFFERS)
        ts = [c.send("syslog", haproxy_line(i)) for i in range(20_000)]
        # Answers pile up unread: past the write buffer's high-water mark, reading stops.
        await until(lambda: conn.write_blocked, timeout=10)
        assert conn.transport.get_write_buffer_size() < 1 << 20
        taken = sink.events
        assert taken < 20_000
        await c.wait_for(ts, timeout=20)  # reading the answers lets it go on
        assert sink.events == 20_000 and not conn.write_blocked
        await c.close()
        await src.stop(0.1)

    run(main())


def test_garbage_on_one_session_leaves_the_other_unharmed() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, ctx = make_source(sink)
        _, port = await src.start()
        good = await RelpClient.connect(port)
        bad = await RelpClient.connect(port)
        t = good.send("syslog", haproxy_line(1))
        bad.send("syslog", haproxy_line(2))
        bad.raw(b"3 syslog 4 toolong\n")  # DATALEN 4, then no LF: framing error
        await bad.wait_eof()
        assert [h.command for h in bad.hints] == ["serverclose"]
        await until(lambda: sink.events >= 1)
        sink.release()
        t2 = good.send("syslog", haproxy_line(3))
        await until(lambda: bool(sink.waiting))
        sink.release()
        await good.wait_for([t, t2])
        assert src.relp.frame_errors == {"trailer": 1}
        assert any(e == "relp_protocol_error" and kw["reason"] == "trailer"
                   for e, kw in ctx.log.lines)
        assert len(src.connections) == 1
        await good.close()
        await src.stop(0.1)

    run(main())


def test_unknown_command_and_bad_txnr_close_the_session() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, _ = make_source(sink)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        t = c.send("starttls")
        await c.wait_eof()
        assert c.answers[t] == b"500 unknown command"
        assert [h.command for h in c.hints] == ["serverclose"]
        c2 = await RelpClient.connect(port)
        c2.raw(build_frame(7, "syslog", haproxy_line(1)))
        await c2.wait_eof()
        assert 7 not in c2.answers
        assert src.relp.frame_errors == {"unknown_command": 1, "sequence": 1}
        await src.stop(0.1)

    run(main())


def test_stop_answers_what_becomes_durable_then_serverclose() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, _ = make_source(sink)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        ts = [c.send("syslog", haproxy_line(i)) for i in range(3)]
        await until(lambda: sink.events == 3)
        stopping = asyncio.create_task(src.stop(5.0))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waiting for the answers
        sink.release()
        await stopping
        await c.wait_eof()
        assert all(c.answers[t] == b"200 OK" for t in ts)
        assert [h.command for h in c.hints] == ["serverclose"]

    run(main())


@pytest.mark.parametrize("message", [
    haproxy_line(7),
    haproxy_line(8) + b"\n",  # a sender's trailing LF
    b"<134>1 2026-12-02T03:00:00.123+01:00 web1 haproxy 4242 - - GET / 200",
    b"<134>Dec  2 03:00:00 web1 hapee-lb[1]: with \"quotes\" and \xc3\xa9 utf-8",
    b"<134>Dec  2 03:00:00 web1 haproxy[1]: 12 starts with digits",
])
def test_ingest_is_byte_identical_to_tcp(message: bytes) -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, ctx = make_source(sink)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        t = c.send("syslog", message)
        await until(lambda: sink.events == 1)
        sink.release()
        await c.wait_for([t])
        tcp = new_reader(ctx.filter, 4096, AUTO)
        line = message if message.endswith(b"\n") else message + b"\n"
        expected = tcp.feed(line, TS)
        assert b"".join(sink.data) == expected.data
        await c.close()
        await src.stop(0.1)

    run(main())


# -- losses, closing, limits ---------------------------------------------------------------


def test_a_lost_message_aborts_its_session_instead_of_holding_later_answers() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, ctx = make_source(sink)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        other = await RelpClient.connect(port)
        c.send("syslog", haproxy_line(1))
        await until(lambda: len(sink.waiting) == 1)
        c.send("syslog", haproxy_line(2))
        await until(lambda: len(sink.waiting) == 2)
        sink.waiting[1]()  # the second is durable: its answer waits behind the first
        sink.losers.pop(sink.waiting.pop(1))
        sink.lose(0)  # the first is lost (Waiter.lose())
        # Aborted at once: the sender resends both on a new session, no timeout to wait out.
        await c.wait_eof(timeout=2)
        assert sorted(c.answers) == [1] and not c.hints  # only `open` was ever answered
        assert src.relp.frame_errors == {"not_durable": 1}
        assert src.relp.acks == 0  # nothing answered: relp_acks counts no held answer
        assert [kw["reason"] for e, kw in ctx.log.lines
                if e == "relp_session_aborted"] == ["not_durable"]
        assert len(src.connections) == 1 and src.per_address == {"127.0.0.1": 1}
        t = other.send("syslog", haproxy_line(3))  # the other session is unharmed
        await until(lambda: len(sink.waiting) == 1)
        sink.release()
        await other.wait_for([t])
        await other.close()
        await c.close()
        await src.stop(0.1)

    run(main())


def test_a_loss_reported_for_a_session_already_gone_is_ignored() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, _ = make_source(sink)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        c.send("syslog", haproxy_line(1))
        await until(lambda: len(sink.waiting) == 1)
        await c.close()
        await until(lambda: not src.connections)
        sink.lose(0)
        assert src.relp.frame_errors == {}
        await src.stop(0.1)

    run(main())


def test_the_window_counts_answers_held_behind_an_older_pending_one() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, _ = make_source(sink, max_window=3)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        first = c.send("syslog", haproxy_line(1))
        await until(lambda: sink.events == 1)
        held = [c.send("syslog", haproxy_line(i)) for i in (2, 3)]
        await until(lambda: sink.events == 3)
        for cb in sink.waiting[1:]:  # durable, but answered only after the first
            cb()
        del sink.waiting[1:]
        late = c.send("syslog", haproxy_line(4))
        await c.writer.drain()
        assert not await c.pump(0.2)  # nothing answered...
        assert sink.events == 3  # ...so nothing more is read: three answers are held
        sink.release()
        await c.wait_for([first, *held])
        await until(lambda: sink.events == 4)
        sink.release()
        await c.wait_for([late])
        assert c.order == [1, first, *held, late]
        await c.close()
        await src.stop(0.1)

    run(main())


def test_a_closing_session_behind_a_never_settled_answer_is_aborted() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, _ = make_source(sink, idle_timeout=0.3)
        _, port = await src.start()
        c = await RelpClient.connect(port)
        c.send("syslog", haproxy_line(1))
        await until(lambda: len(sink.waiting) == 1)
        sink.waiting.clear()  # never settled, not even reported lost
        c.send("close")  # rsyslog at its own HUP or shutdown: reading stops
        await until(lambda: bool(src.relp.commands["close"]))
        await c.close()  # the sender times out and goes: not seen, nothing is read
        await until(lambda: not src.connections, timeout=3)
        assert src.per_address == {}
        assert src.relp.frame_errors == {"close_timeout": 1}
        await src.stop(0.1)

    run(main())


def test_frame_too_large_is_rate_limited_across_sessions() -> None:
    async def main() -> None:
        sink = ScriptedSink()
        src, ctx = make_source(sink)
        _, port = await src.start()
        for _ in range(3):  # a peer that reconnects: one line, not one per session
            c = await RelpClient.connect(port)
            t = c.send("syslog", b"<13>Dec  2 03:00:00 host haproxy[1]: " + b"x" * 9000)
            await c.wait_for([t])
            await c.close()
        assert src.stats.oversized_frames == 3
        assert len([kw for e, kw in ctx.log.lines if e == "frame_too_large"]) == 1
        await src.stop(0.1)  # says what was suppressed
        lines = [kw for e, kw in ctx.log.lines if e == "frame_too_large"]
        assert len(lines) == 2 and lines[1]["suppressed"] == 2

    run(main())


class UnreadPeer:
    """A RELP sender that never reads its answers: a tiny receive buffer, filtered messages
    (answered at once), the server side's send buffer made tiny too."""

    def __init__(self, src: RelpSource, port: int) -> None:
        self.src = src
        self.port = port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def start(self, messages: int, high_water: int) -> RelpConnection:
        loop = asyncio.get_running_loop()
        before = set(self.src.connections)
        self.sock.connect(("127.0.0.1", self.port))
        self.sock.setblocking(False)
        await loop.sock_sendall(self.sock, build_frame(1, "open", OFFERS))
        await until(lambda: len(set(self.src.connections) - before) == 1)
        [conn] = set(self.src.connections) - before
        t = conn.transport
        assert t is not None
        t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        t.set_write_buffer_limits(high=high_water)
        self.server_socket = t.get_extra_info("socket")
        line = b"<13>Dec  2 03:00:00 h cron[1]: x"
        blob = b"".join(build_frame(n, "syslog", line) for n in range(2, messages + 2))
        with contextlib.suppress(TimeoutError):  # the server may stop reading: as expected
            await asyncio.wait_for(loop.sock_sendall(self.sock, blob), 0.5)
        return conn

    @property
    def server_closed(self) -> bool:
        return self.server_socket.fileno() == -1

    def close(self) -> None:
        self.sock.close()


def run_on(loop_name: str, coro: Coroutine[Any, Any, None]) -> None:
    if loop_name == "uvloop":
        import uvloop
        uvloop.run(asyncio.wait_for(coro, 30))
    else:
        run(coro)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_closed_session_whose_peer_reads_nothing_is_aborted(
        loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Swept (serverclose, close) while its answers are unread: counted against
    max_connections_per_address until its socket is closed, which is within CLOSE_GRACE
    (at once when writing to it is blocked already), so such a peer cannot pile up sockets."""
    monkeypatch.setattr(relp_source, "CLOSE_GRACE", 0.3)

    async def main() -> None:
        sink = ScriptedSink()
        src, ctx = make_source(sink, idle_timeout=0.3, max_connections_per_address=2)
        _, port = await src.start()
        peers: list[UnreadPeer] = []
        # Answers over the write buffer's high-water mark: writing blocked, aborted at once.
        blocked = UnreadPeer(src, port)
        peers.append(blocked)
        conn = await blocked.start(20_000, high_water=16_384)
        assert conn.write_blocked
        await until(lambda: blocked.server_closed, timeout=2)
        assert conn not in src.connections
        async def unread_after_close() -> None:
            # Answers under it (not blocked), never read: close(), aborted after the grace.
            peer = UnreadPeer(src, port)
            peers.append(peer)
            conn = await peer.start(3_000, high_water=1 << 20)
            assert not conn.write_blocked
            await until(lambda: conn.draining is not None, timeout=2)  # swept: closing
            assert not peer.server_closed and conn.transport is None
            assert src.per_address == {"127.0.0.1": 1}  # still counted while it is open
            await until(lambda: peer.server_closed, timeout=2)
            await until(lambda: not src.connections)

        for _ in range(2):  # three sessions in all, one at a time: the cap of 2 holds
            await unread_after_close()
        assert src.stats.connections_refused == 0
        assert src.stats.connections_idle_closed == 3
        assert "answers_unread" in {kw["reason"] for e, kw in ctx.log.lines
                                    if e == "relp_session_aborted"}
        for p in peers:
            p.close()
        await src.stop(0.1)

    run_on(loop_name, main())


# -- the real daemon ------------------------------------------------------------------------


def relp_port(d: Daemon) -> int:
    for rec in d.events("listening"):
        if rec.get("proto") == "relp":
            return int(rec["port"])
    raise AssertionError("no relp listener logged")


def relp_daemon(daemon: Callable[..., Daemon], intake: FakeIntake, **sections: Any) -> Daemon:
    listen = {"tcp": [], "udp": [], "relp": ["127.0.0.1:0"], **sections.pop("listen", {})}
    return daemon(intake, listen=listen, **sections)


def test_daemon_answers_once_in_the_spool_while_the_intake_is_down(
        daemon: Callable[..., Daemon], intake: FakeIntake) -> None:
    intake.set_down(True)
    d = relp_daemon(daemon, intake)
    port = relp_port(d)

    async def main() -> None:
        c = await RelpClient.connect(port)
        ts = [c.send("syslog", haproxy_line(i)) for i in range(20)]
        await c.wait_for(ts, timeout=15)
        # Answered: durable in the spool (the intake has nothing).
        assert metric(d.status_port, "spool_appended_events_total") >= 20
        assert intake.events == []
        await c.close()

    asyncio.run(main())
    intake.set_down(False)
    assert intake.wait_for(20, timeout=30)
    texts = intake.event_texts()
    assert len(set(texts)) == 20


def test_daemon_filtered_answered_at_once_haproxy_after_the_batch(
        daemon: Callable[..., Daemon], intake: FakeIntake) -> None:
    # A batch held open for 20 s: only what needs no durability can be answered before.
    d = relp_daemon(daemon, intake, batch={"max_delay": 20.0, "idle_flush": 20.0})
    port = relp_port(d)

    async def main() -> None:
        c = await RelpClient.connect(port)
        kept = c.send("syslog", haproxy_line(1))
        dropped = c.send("syslog", b"<13>Dec  2 03:00:00 host sshd[1]: not for us")
        # In txnr order: the filtered one waits behind the kept one; a second session shows
        # it answered at once on its own.
        c2 = await RelpClient.connect(port)
        alone = c2.send("syslog", b"<13>Dec  2 03:00:00 host cron[1]: not for us either")
        await c2.wait_for([alone], timeout=5)
        assert kept not in c.answers and dropped not in c.answers
        assert metric(d.status_port, "filtered_out_total") == 2
        await c.close()
        await c2.close()

    asyncio.run(main())


def test_daemon_sigterm_answers_then_serverclose(
        daemon: Callable[..., Daemon], intake: FakeIntake) -> None:
    d = relp_daemon(daemon, intake)
    port = relp_port(d)

    async def main() -> None:
        c = await RelpClient.connect(port)
        ts = [c.send("syslog", haproxy_line(i)) for i in range(50)]
        await c.writer.drain()
        await c.wait_for(ts[:1], timeout=10)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        await c.wait_eof(timeout=15)
        assert all(c.answers.get(t) == b"200 OK" for t in ts)
        assert [h.command for h in c.hints] == ["serverclose"]

    asyncio.run(main())
    assert d.stop() == 0
    # Answered means durable: delivered now, or from the spool at the next start.
    if not intake.wait_for(50, timeout=1):
        d.start()
    assert intake.wait_for(50, timeout=15)
    assert len(set(intake.event_texts())) == 50


def test_daemon_answers_an_event_dropped_for_full_dead_letters_and_what_follows(
        daemon: Callable[..., Daemon], intake: FakeIntake) -> None:
    # An event over 250 KiB (the intake's limit) in a frame under max_message_size goes to
    # the dead letters; they are full: dropped and counted. Answered all the same (resending
    # it cannot help), and the session's later messages are not held behind it.
    d = relp_daemon(daemon, intake, relp={"max_window": 3},
                    spool={"dead_letter_max_size": 64 * 1024})
    port = relp_port(d)
    big = haproxy_line(1) + b" " + b"x" * (251 * 1024)

    async def main() -> None:
        c = await RelpClient.connect(port)
        ts = [c.send("syslog", big), c.send("syslog", haproxy_line(2)),
              c.send("syslog", haproxy_line(3))]
        await c.wait_for(ts, timeout=10)
        assert [c.answers[t] for t in ts] == [b"200 OK"] * 3
        assert metric(d.status_port, "acks_pending") == 0
        await c.close()

    asyncio.run(main())
    assert d.wait_log("dead_letter_full", 5)["events"] == 1
    assert intake.wait_for(2, timeout=10)
    texts = intake.event_texts()
    assert len(texts) == 2 and "GET /2 " in texts[0] and "GET /3 " in texts[1]


def test_daemon_metrics_name_the_relp_listener(
        daemon: Callable[..., Daemon], intake: FakeIntake, tmp_path: Path) -> None:
    d = relp_daemon(daemon, intake)
    port = relp_port(d)

    async def main() -> None:
        c = await RelpClient.connect(port)
        t = c.send("syslog", haproxy_line(1))
        await c.wait_for([t])
        c.raw(b"x\n")
        await c.wait_eof()

    asyncio.run(main())
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{d.status_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    listener = f'listener="relp://127.0.0.1:{port}"'
    assert f'haproxy_forwarder_relp_commands_total{{command="syslog",{listener}}} 1.0' in text \
        or f'haproxy_forwarder_relp_commands_total{{{listener},command="syslog"}} 1.0' in text
    assert f'haproxy_forwarder_relp_frame_errors_total{{{listener},reason="txnr"}} 1.0' in text
    assert f'haproxy_forwarder_relp_acks_total{{{listener}}} 1.0' in text
    assert f"haproxy_forwarder_connections_accepted_total{{{listener}}} 1.0" in text
    assert "haproxy_forwarder_relp_ack_latency_seconds_count" in text


def test_daemon_reload_adds_and_removes_a_relp_listener(
        daemon: Callable[..., Daemon], intake: FakeIntake) -> None:
    d = relp_daemon(daemon, intake)
    first = relp_port(d)
    cfg = d.config
    cfg["listen"]["relp"] = ["127.0.0.1:0", "127.0.0.1:0"]
    cfg["relp"] = {"max_window": 64}
    write_toml(d.config_path, cfg)
    assert d.proc is not None

    async def session(port: int, text: bytes) -> RelpClient:
        c = await RelpClient.connect(port)
        t = c.send("syslog", text)
        await c.wait_for([t])
        return c

    async def main() -> None:
        kept = await session(first, haproxy_line(1))
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        reloaded = d.wait_log("reloaded")
        assert set(reloaded["changes"]) == {"listen.relp", "relp.max_window"}
        added = [int(r["port"]) for r in d.events("listening")
                 if r.get("proto") == "relp" and r.get("reload")]
        assert len(added) == 1
        new = await session(added[0], haproxy_line(2))
        t = kept.send("syslog", haproxy_line(3))  # the open session goes on
        await kept.wait_for([t])
        cfg["listen"]["relp"] = ["127.0.0.1:0"]
        write_toml(d.config_path, cfg)
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        # Of the two listeners on 127.0.0.1:0, the first listed goes (the original one): its
        # session gets serverclose; the other's goes on.
        await kept.wait_eof()
        assert [h.command for h in kept.hints] == ["serverclose"]
        t = new.send("syslog", haproxy_line(4))
        await new.wait_for([t])
        await until(lambda: any(r.get("proto") == "relp" and r.get("port") == 0
                                for r in d.events("listener_closed")))

    asyncio.run(main())
    assert intake.wait_for(4, timeout=10)
