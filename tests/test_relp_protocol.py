"""The sans-IO RELP server (haproxy_forwarder/relp): frames and sessions, byte by byte.

Expectations come from the RELP specification (librelp doc/relp.md) and librelp's server
(relpframe.c, copen.c, cclose.c, scsyslog.c, relpsess.c): the frame grammar and its limits,
the offers answered at open, answers in txnr order, serverclose (txnr 0) before closing.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haproxy_forwarder.relp import (
    MAX_TXNR,
    SERVERCLOSE,
    Frame,
    FrameParser,
    ServerSession,
    build_frame,
    next_txnr,
    rsp,
)
from haproxy_forwarder.relp.frame import MAX_HEADER, MAX_OTHER_DATA

# What omrelp (librelp 1.11) sends at open.
LIBRELP_OFFERS = b"relp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\n" \
                 b"commands=syslog"
OPEN = build_frame(1, "open", LIBRELP_OFFERS)


def opened(max_data: int = 4096) -> ServerSession:
    s = ServerSession(max_data)
    got = s.receive(OPEN)
    assert got.opened and got.error is None
    s.outgoing()
    return s


def parse_answers(data: bytes) -> list[tuple[int, str, bytes]]:
    """Our own output read back with the parser: (txnr, command, data)."""
    p = FrameParser(1 << 20)
    frames = p.feed(data)
    assert p.error is None and p.buffered == 0, (p.error, data)
    return [(f.txnr, f.command, f.data) for f in frames]


# -- frames ---------------------------------------------------------------------------------


def test_build_frame_as_librelp_writes_it() -> None:
    assert build_frame(1, "syslog", b"hello") == b"1 syslog 5 hello\n"
    assert build_frame(7, "close") == b"7 close 0\n"
    assert SERVERCLOSE == b"0 serverclose 0\n"
    assert rsp(3, 200, "OK") == b"3 rsp 6 200 OK\n"
    assert rsp(2, 200, "OK", b"a=b") == b"2 rsp 10 200 OK\na=b\n"
    with pytest.raises(ValueError):
        build_frame(MAX_TXNR + 1, "syslog", b"x")
    with pytest.raises(ValueError):
        build_frame(1, "sys log")


def test_parser_reads_frames_and_data_with_any_bytes() -> None:
    data = b"line one\nline two \x00\xff"
    p = FrameParser(100)
    frames = p.feed(build_frame(1, "syslog", data) + b"2 close 0\n")
    assert frames == [Frame(1, "syslog", data), Frame(2, "close")]
    assert p.error is None and p.buffered == 0


def test_txnr_wraps_at_999999999() -> None:
    assert next_txnr(1) == 2
    assert next_txnr(MAX_TXNR) == 1


@pytest.mark.parametrize(("raw", "reason", "words"), [
    (b"x syslog 1 a\n", "txnr", "transaction number"),
    (b"1234567890 syslog 1 a\n", "txnr", "longer than 9"),
    (b"1\tsyslog 1 a\n", "txnr", "SP after the transaction"),
    (b"1 sys1og 1 a\n", "command", "SP after the command"),
    (b"1 " + b"a" * 33 + b" 0\n", "command", "longer than 32"),
    (b"1  0\n", "command", "command name"),
    (b"1 syslog x\n", "datalen", "data length"),
    (b"1 syslog 1234567890 a\n", "datalen", "longer than 9"),
    (b"1 syslog 3\nabc\n", "datalen", "not followed by SP"),
    (b"1 close 0 \n", "trailer", "followed by LF"),
    (b"1 syslog 3 abcd\n", "trailer", "no LF after the 3 octets"),
])
def test_malformed_frames_say_why(raw: bytes, reason: str, words: str) -> None:
    p = FrameParser(100)
    assert p.feed(raw) == []
    assert p.error is not None
    assert p.error.reason == reason
    assert words in p.error.message
    assert p.feed(b"2 close 0\n") == []  # nothing more is read after an error
    assert p.buffered == 0


def test_error_is_seen_at_once_not_after_a_full_header() -> None:
    p = FrameParser(100)
    assert p.feed(b"1") == [] and p.error is None  # a valid start: waits
    p.feed(b"Z")
    assert p.error is not None and p.error.reason == "txnr"


def test_oversized_data_is_skipped_not_held() -> None:
    p = FrameParser(10)
    big = b"y" * 5000
    frames = []
    raw = build_frame(1, "syslog", big) + build_frame(2, "syslog", b"small")
    for i in range(0, len(raw), 100):
        frames += p.feed(raw[i:i + 100])
        assert p.buffered <= 100  # never the 5000 bytes
    assert frames == [Frame(1, "syslog", b"", oversized=5000), Frame(2, "syslog", b"small")]


def test_oversized_frame_still_needs_its_trailer() -> None:
    p = FrameParser(10)
    p.feed(b"1 syslog 20 " + b"z" * 20 + b"X")
    assert p.error is not None and p.error.reason == "trailer"


# -- sessions -------------------------------------------------------------------------------


def test_open_is_answered_with_librelps_offers() -> None:
    s = ServerSession(4096)
    got = s.receive(OPEN)
    assert got.opened and got.commands == {"open": 1}
    [(txnr, cmd, data)] = parse_answers(s.outgoing())
    assert (txnr, cmd) == (1, "rsp")
    head, _, offers = data.partition(b"\n")
    assert head == b"200 OK"
    lines = offers.split(b"\n")
    assert lines[0] == b"relp_version=0"
    assert lines[1].startswith(b"relp_software=haproxy-forwarder,")
    assert lines[2] == b"commands=syslog"


def test_open_without_syslog_offer_leaves_syslog_disabled() -> None:
    s = ServerSession(4096)
    s.receive(build_frame(1, "open", b"relp_version=0\ncommands="))
    assert s.outgoing().endswith(b"commands=\n")
    got = s.receive(build_frame(2, "syslog", b"x"))
    assert got.error is not None and got.error.reason == "protocol"
    answers = parse_answers(s.outgoing())
    assert answers == [(2, "rsp", b"500 command disabled"), (0, "serverclose", b"")]
    assert s.close_after_write


def test_pipelined_syslog_answered_in_txnr_order_once_durable() -> None:
    s = opened()
    got = s.receive(b"".join(build_frame(n, "syslog", b"m%d" % n) for n in range(2, 7)))
    assert [t for t, _ in got.messages] == [2, 3, 4, 5, 6]
    assert s.unacked == 5
    assert s.outgoing() == b""  # nothing durable yet: nothing answered
    s.acknowledge([4, 5])
    assert s.outgoing() == b""  # 2 and 3 first
    assert s.unacked == 5 and s.answered == 0  # held answers still use the window
    s.acknowledge([2])
    assert parse_answers(s.outgoing()) == [(2, "rsp", b"200 OK")]
    assert s.unacked == 4 and s.answered == 1
    s.acknowledge([3, 6])
    assert [a[0] for a in parse_answers(s.outgoing())] == [3, 4, 5, 6]
    assert s.unacked == 0 and s.answered == 5


def test_close_answered_after_pending_messages_then_session_ends() -> None:
    s = opened()
    s.receive(build_frame(2, "syslog", b"a") + build_frame(3, "close") +
              build_frame(4, "syslog", b"after close"))
    assert s.outgoing() == b"" and not s.close_after_write
    s.acknowledge([2])
    assert parse_answers(s.outgoing()) == [(2, "rsp", b"200 OK"), (3, "rsp", b"200 OK")]
    assert s.close_after_write
    assert s.receive(build_frame(4, "syslog", b"x")).messages == []


def test_shutdown_sends_ready_answers_then_serverclose() -> None:
    s = opened()
    s.receive(build_frame(2, "syslog", b"a") + build_frame(3, "syslog", b"b"))
    s.acknowledge([2])
    s.shutdown()
    assert parse_answers(s.outgoing()) == [(2, "rsp", b"200 OK"), (0, "serverclose", b"")]
    assert s.close_after_write
    s.acknowledge([3])  # too late: the sender resends it to the next forwarder
    assert s.outgoing() == b""
    s.shutdown()
    assert s.outgoing() == b""


def test_shutdown_with_nothing_pending_sends_one_serverclose() -> None:
    s = opened()
    s.shutdown()
    s.shutdown()
    assert s.outgoing() == SERVERCLOSE


@pytest.mark.parametrize(("raw", "reason", "answer"), [
    (build_frame(2, "starttls"), "unknown_command", b"500 unknown command"),
    (build_frame(2, "SYSLOG", b"x"), "unknown_command", b"500 unknown command"),
    (build_frame(2, "rsp", b"200 OK"), "unknown_command", b"500 unknown command"),
    (build_frame(2, "open", LIBRELP_OFFERS), "protocol",
     b"500 protocol error: connection already open"),
    (build_frame(3, "syslog", b"x"), "sequence", None),
    (build_frame(1, "syslog", b"x"), "sequence", None),
    (build_frame(0, "syslog", b"x"), "txnr", None),
    (b"2 syslog 3 abcde\n", "trailer", None),
])
def test_protocol_errors_answered_or_closed(raw: bytes, reason: str,
                                            answer: bytes | None) -> None:
    s = opened()
    got = s.receive(raw)
    assert got.error is not None and got.error.reason == reason
    assert got.messages == []
    expected = ([(2, "rsp", answer)] if answer else []) + [(0, "serverclose", b"")]
    assert parse_answers(s.outgoing()) == expected
    assert s.close_after_write


def test_command_before_open() -> None:
    s = ServerSession(4096)
    got = s.receive(build_frame(1, "syslog", b"x"))
    assert got.error is not None and got.error.reason == "not_open"
    assert got.messages == []
    assert parse_answers(s.outgoing()) == [
        (1, "rsp", b"500 command disabled: no open yet"), (0, "serverclose", b"")]


def test_error_keeps_earlier_answers_and_drops_messages_of_the_same_chunk() -> None:
    s = opened()
    s.receive(build_frame(2, "syslog", b"a"))
    s.acknowledge([2])
    got = s.receive(build_frame(3, "syslog", b"b") + b"garbage")
    # Message 3 is never answered: not ingested either, so its resend is no duplicate.
    assert got.messages == [] and got.error is not None
    assert parse_answers(s.outgoing()) == [(2, "rsp", b"200 OK"), (0, "serverclose", b"")]


def test_invalid_offers_refuse_the_open() -> None:
    s = ServerSession(4096)
    got = s.receive(build_frame(1, "open", b"relp_version=abc\ncommands=syslog"))
    assert got.error is not None and got.error.reason == "offers"
    answers = parse_answers(s.outgoing())
    assert answers[0][2].startswith(b"500 ")
    assert answers[-1] == (0, "serverclose", b"")


def test_oversized_syslog_is_answered_at_once_and_not_ingested() -> None:
    s = opened(max_data=10)
    got = s.receive(build_frame(2, "syslog", b"x" * 50) + build_frame(3, "syslog", b"ok"))
    assert got.oversized == [50]
    assert got.messages == [(3, b"ok")]
    assert parse_answers(s.outgoing()) == [(2, "rsp", b"200 OK")]


# -- any split of a valid session gives the same commands -------------------------------------

messages = st.lists(st.binary(min_size=0, max_size=60), min_size=0, max_size=12)


def session_bytes(msgs: list[bytes]) -> bytes:
    frames = [OPEN]
    frames += [build_frame(i + 2, "syslog", m) for i, m in enumerate(msgs)]
    frames.append(build_frame(len(msgs) + 2, "close"))
    return b"".join(frames)


def run_split(raw: bytes, cuts: list[int]) -> tuple[list[tuple[int, bytes]], dict[str, int],
                                                    bytes]:
    s = ServerSession(64)
    got_msgs: list[tuple[int, bytes]] = []
    commands: dict[str, int] = {}
    out = b""
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    for a, b in itertools.pairwise(bounds):
        got = s.receive(raw[a:b])
        assert got.error is None
        got_msgs += got.messages
        for k, v in got.commands.items():
            commands[k] = commands.get(k, 0) + v
        s.acknowledge([t for t, _ in got.messages])
        out += s.outgoing()
    return got_msgs, commands, out


@settings(max_examples=200, deadline=None)
@given(msgs=messages, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_any_split_gives_the_same_commands(msgs: list[bytes], cuts: list[int]) -> None:
    raw = session_bytes(msgs)
    whole = run_split(raw, [])
    assert run_split(raw, cuts) == whole
    got_msgs, commands, out = whole
    assert got_msgs == [(i + 2, m) for i, m in enumerate(msgs)]
    assert commands == {"open": 1, "close": 1, **({"syslog": len(msgs)} if msgs else {})}
    answers = parse_answers(out)
    assert [a[0] for a in answers] == list(range(1, len(msgs) + 3))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_garbage_never_raises_and_stays_bounded(data: bytes, cuts: list[int]) -> None:
    s = ServerSession(32)
    raw = OPEN + data
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    for a, b in itertools.pairwise(bounds):
        got = s.receive(raw[a:b])
        s.acknowledge([t for t, _ in got.messages])
        # The data of one frame at most (syslog: max_data; other commands: 4096), plus a
        # header.
        assert s.buffered <= MAX_OTHER_DATA + MAX_HEADER
        for _, m in got.messages:
            assert len(m) <= 32
    s.outgoing()
