"""Sources → intakes (dispatch.py) and the reader that splits a stream by program
(ingest/split.py), in-process.

- SplitReader is the reference reader with the frames grouped: one destination gives exactly
  the reference reader's result, any chunking; several give each destination its events, in
  order, and together the reference's events, and the same counts.
- A routed inlet hands a chunk whole to its intake's collector when the origin decides; splits
  it by program otherwise, with one acknowledgement given once every part is durable (or lost
  once); counts and settles what no route takes; follows a new table at its next take; is
  held only by the intakes its routes reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.traffic import octet_counted, traditional
from haproxy_forwarder.acks import Ack
from haproxy_forwarder.dispatch import Routes
from haproxy_forwarder.ingest import OCTET, ChunkResult, ProgramFilter, PyChunkReader
from haproxy_forwarder.ingest.split import SplitReader, SplitResult
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.routing import Origin, Route, Table
from haproxy_forwarder.sources import Backpressure
from haproxy_forwarder.storage import new_lens, new_tlens
from tests.recording import Log

FILTER = ProgramFilter(["haproxy", "hapee"], ["hapee"])
MAX = 262144
TS = b"2026-12-07T10:00:00.000Z"
PROGRAMS = ["haproxy", "haproxy-b", "hapee-lb", "nginx", "haproxyc"]


def events(result: ChunkResult) -> list[bytes]:
    out, start = [], 0
    for end in result.ends:
        out.append(result.data[start:end])
        start = end
    return out


def feed_all(reader: Any, stream: bytes, cuts: list[int]) -> list[ChunkResult]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    results = [reader.feed(p, TS) for p in pieces if p]
    results.append(reader.close(TS))
    return results


messages = st.lists(st.tuples(st.sampled_from(PROGRAMS), st.text(min_size=0, max_size=30)),
                    max_size=25)


@settings(max_examples=150, deadline=None)
@given(msgs=messages, cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8))
def test_one_destination_is_the_reference_reader(msgs: list[tuple[str, str]],
                                                 cuts: list[int]) -> None:
    stream = octet_counted(traditional(p, m) for p, m in msgs)
    ref = feed_all(PyChunkReader(FILTER, MAX, OCTET), stream, cuts)
    got = feed_all(SplitReader(FILTER, MAX, OCTET, lambda program: "only"), stream, cuts)
    ref_events = [e for r in ref for e in events(r)]
    parts = [part for r in got for _, part in r.parts]
    assert [e for p in parts for e in events(p)] == ref_events
    assert [t for p in parts for t in p.times] == [t for r in ref for t in r.times]
    for name in ("frames", "accepted", "filtered", "bad_times", "oversized", "framing_errors"):
        assert sum(getattr(r, name) for r in got) == sum(getattr(r, name) for r in ref), name
    assert all(isinstance(r, SplitResult) and r.ends == [] for r in got)


@settings(max_examples=150, deadline=None)
@given(msgs=messages, cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8))
def test_each_destination_gets_its_programs_events_in_order(msgs: list[tuple[str, str]],
                                                            cuts: list[int]) -> None:
    stream = octet_counted(traditional(p, m) for p, m in msgs)
    got = feed_all(SplitReader(FILTER, MAX, OCTET, lambda program: program), stream, cuts)
    by_dest: dict[str, list[bytes]] = {}
    for r in got:
        for dest, part in r.parts:
            by_dest.setdefault(dest, []).extend(events(part))
    for program in PROGRAMS:
        expected = events(PyChunkReader(FILTER, MAX, OCTET).feed(
            octet_counted(traditional(p, m) for p, m in msgs if p == program), TS))
        assert by_dest.get(program, []) == expected, program


# -- inlets -----------------------------------------------------------------------------------


@dataclass
class FakeCollector:
    takes: list[tuple[ChunkResult, Ack | None]] = field(default_factory=list)
    flushed: int = 0

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        self.takes.append((result, ack))

    def flush(self) -> None:
        self.flushed += 1

    def events(self) -> list[bytes]:
        return [e for r, _ in self.takes for e in events(r)]


@dataclass
class FakePipe:
    name: str
    collector: FakeCollector = field(default_factory=FakeCollector)
    pressure: Backpressure = field(default_factory=Backpressure)
    closing: bool = False


def routes(table: list[Route], names: tuple[str, ...] = ("a", "b")) -> tuple[Routes, Counters]:
    counters = Counters()
    pipes = {n: FakePipe(n) for n in names}
    r = Routes(Table(table), pipes, counters, FILTER, lambda: MAX,  # type: ignore[arg-type]
               lambda framing: PyChunkReader(FILTER, MAX, framing), Log())
    return r, counters


def origin(source: str = "127.0.0.2") -> Origin:
    return Origin("tcp://127.0.0.1:1514", "127.0.0.1:1514", source)


def collector(r: Routes, name: str) -> FakeCollector:
    return r.pipelines[name].collector  # type: ignore[return-value]


def chunk(*msgs: tuple[str, str]) -> bytes:
    return octet_counted(traditional(p, m) for p, m in msgs)


def test_an_origin_that_decides_hands_the_chunk_whole_to_its_intake() -> None:
    r, _ = routes([Route(source=(ip_network("127.0.0.2/32"),),
                         intake="a"), Route(intake="b")])
    inlet = r.inlet(origin("127.0.0.2"), OCTET)
    assert isinstance(inlet.reader, PyChunkReader)  # the plain reader: nothing per message
    result = inlet.reader.feed(chunk(("haproxy", "x"), ("nginx", "y")), TS)
    inlet.take(result)
    assert collector(r, "a").takes == [(result, None)] and collector(r, "b").takes == []
    other = r.inlet(origin("127.0.0.3"), OCTET)
    other.take(other.reader.feed(chunk(("haproxy", "z")), TS))
    assert collector(r, "b").events() == [b'"z"']


def test_program_routes_split_a_take_and_its_acknowledgement() -> None:
    r, counters = routes([Route(program=("haproxy-b",), intake="b"),
                          Route(program=("hapee",), intake=None), Route(intake="a")])
    inlet = r.inlet(origin(), OCTET)
    assert isinstance(inlet.reader, SplitReader)
    acked: list[str] = []
    result = inlet.reader.feed(chunk(("haproxy", "1"), ("haproxy-b", "2"), ("hapee-x", "3"),
                                     ("haproxy", "4"), ("nginx", "5")), TS)
    inlet.take(result, Ack(lambda: acked.append("durable"), lambda: acked.append("lost")))
    assert collector(r, "a").events() == [b'"1"', b'"4"']
    assert collector(r, "b").events() == [b'"2"']
    # The drop route's event is counted and settled; the filtered one goes with a part, for
    # its collector to count as filtered.
    assert counters.unrouted_reasons["drop"] == 1
    assert sum(res.filtered for n in ("a", "b") for res, _ in collector(r, n).takes) == 1
    assert acked == []  # two intakes still hold parts of it
    ack_a = collector(r, "a").takes[0][1]
    ack_b = collector(r, "b").takes[0][1]
    assert ack_a is not None and ack_b is not None
    ack_a.durable()
    assert acked == []
    ack_b.durable()
    assert acked == ["durable"]


def test_one_lost_part_loses_the_take_once() -> None:
    r, _ = routes([Route(program=("haproxy-b",), intake="b"), Route(intake="a")])
    inlet = r.inlet(origin(), OCTET)
    acked: list[str] = []
    inlet.take(inlet.reader.feed(chunk(("haproxy", "1"), ("haproxy-b", "2")), TS),
               Ack(lambda: acked.append("durable"), lambda: acked.append("lost")))
    ack_a, ack_b = (collector(r, n).takes[0][1] for n in ("a", "b"))
    assert ack_a is not None and ack_b is not None and ack_a.lost is not None
    ack_a.lost()
    ack_b.durable()
    assert acked == ["lost"]


def test_what_no_route_takes_is_counted_and_settled_at_once() -> None:
    r, counters = routes([Route(program=("haproxy-b",), intake="b")])
    inlet = r.inlet(origin(), OCTET)
    acked: list[str] = []
    inlet.take(inlet.reader.feed(chunk(("haproxy", "1"), ("haproxy-b", "2")), TS),
               Ack(lambda: acked.append("durable")))
    assert counters.unrouted_reasons["no_route"] == 1 and collector(r, "b").events() == [b'"2"']
    inlet.take(inlet.reader.feed(chunk(("nginx", "0")), TS), Ack(lambda: acked.append("d2")))
    b_ack = collector(r, "b").takes[0][1]
    assert b_ack is not None
    b_ack.durable()
    assert acked == ["d2", "durable"]


def test_each_sender_no_route_matches_is_said_once_until_the_next_reload() -> None:
    r, counters = routes([Route(source=(ip_network("127.0.0.9/32"),), intake=None),
                          Route(source=(ip_network("127.0.0.8/32"),), intake="a")])
    log: Log = r.log
    for _ in range(3):
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.9"):
            inlet = r.inlet(origin(source), OCTET)
            inlet.take(inlet.reader.feed(chunk(("haproxy", "x"), ("haproxy", "y")), TS))
    # A drop route is what the config asks for: counted, not said. No route at all is a
    # gap in the table: the first events of each such sender are said, once.
    assert counters.unrouted_reasons == {"no_route": 12, "drop": 6}
    said = log.named("events_unrouted")
    assert [(f["source"], f["listener"], f["events"]) for f in said] == [
        ("127.0.0.2", "tcp://127.0.0.1:1514", 2), ("127.0.0.3", "tcp://127.0.0.1:1514", 2)]
    assert "add a route" in said[0]["action"]
    r.use(Table([Route(source=(ip_network("127.0.0.3/32"),), intake="a")]))
    for source in ("127.0.0.2", "127.0.0.3"):
        inlet = r.inlet(origin(source), OCTET)
        inlet.take(inlet.reader.feed(chunk(("haproxy", "z")), TS))
    # After the reload, the sender the new table still misses is said again; the one it
    # routes now is not.
    assert [f["source"] for f in log.named("events_unrouted")] == [
        "127.0.0.2", "127.0.0.3", "127.0.0.2"]
    assert collector(r, "a").events() == [b'"z"']


def test_an_inlet_follows_a_new_table_at_its_next_take() -> None:
    r, _ = routes([Route(intake="a")])
    inlet = r.inlet(origin(), OCTET)
    inlet.take(inlet.reader.feed(chunk(("haproxy", "before")), TS))
    r.use(Table([Route(intake="b")]))
    inlet.take(inlet.reader.feed(chunk(("haproxy", "after")), TS))
    assert collector(r, "a").events() == [b'"before"']
    assert collector(r, "b").events() == [b'"after"']


def test_an_inlet_changes_readers_at_a_frame_boundary_when_routes_come_to_read_programs(
        ) -> None:
    r, _ = routes([Route(intake="a")])
    inlet = r.inlet(origin(), OCTET)
    plain = inlet.reader
    whole = chunk(("haproxy-b", "x"))
    # A frame cut in two: the first half stays in the plain reader when the table changes.
    inlet.take(inlet.reader.feed(whole[:5], TS))
    r.use(Table([Route(program=("haproxy-b",), intake="b"), Route(intake="a")]))
    inlet.take(inlet.reader.feed(whole[5:] + chunk(("haproxy-b", "y"))[:4], TS))
    # Read by the plain reader, which knows no program: the intake it had, not a guess.
    assert collector(r, "a").events() == [b'"x"'] and collector(r, "b").events() == []
    assert inlet.reader is plain
    log: Log = r.log
    assert [e for e, _ in log.lines].count("routes_switch_pending") == 1
    inlet.take(inlet.reader.feed(chunk(("haproxy-b", "y"))[4:], TS))  # a boundary now
    assert isinstance(inlet.reader, SplitReader)
    inlet.take(inlet.reader.feed(chunk(("haproxy-b", "z"), ("haproxy", "w")), TS))
    assert collector(r, "b").events() == [b'"z"']
    assert collector(r, "a").events() == [b'"x"', b'"y"', b'"w"']
    # And back to the plain (compiled) reader once the routes no longer read programs.
    r.use(Table([Route(intake="b")]))
    inlet.take(inlet.reader.feed(chunk(("haproxy", "v")), TS))
    assert collector(r, "b").events()[-1] == b'"v"' and not isinstance(inlet.reader, SplitReader)


def test_events_on_their_way_to_a_removed_intake_still_reach_it_while_it_drains() -> None:
    r, counters = routes([Route(intake="a")])
    retired = {"a": r.pipelines["a"]}
    r.retired = retired
    r.pipelines = {"b": FakePipe("b")}  # type: ignore[dict-item]
    r.deliver(r.table.decide(origin()).target(""), ChunkResult(data=b'"q"', lens=new_lens([3]),
              tdata=TS, tlens=new_tlens([len(TS)]), accepted=1), None,
              origin())
    assert retired["a"].collector.events() == [b'"q"']  # type: ignore[attr-defined]
    assert counters.unrouted_events == 0


def test_only_the_intakes_an_origin_reaches_hold_it() -> None:
    r, _ = routes([Route(source=(ip_network("127.0.0.2/32"),),
                         intake="a"), Route(intake="b")])
    to_a, to_b = r.inlet(origin("127.0.0.2"), OCTET), r.inlet(origin("127.0.0.3"), OCTET)
    r.pipelines["b"].pressure.set(True)
    assert to_b.held and not to_a.held
    r.pipelines["b"].pressure.set(False)
    assert not to_b.held
    both = routes([Route(program=("haproxy-b",), intake="b"), Route(intake="a")])[0]
    split_inlet = both.inlet(origin(), OCTET)
    both.pipelines["b"].pressure.set(True)
    assert split_inlet.held  # one stream cannot wait for one intake only
    split_inlet.flush()
    assert [both.pipelines[n].collector.flushed for n in ("a", "b")] == [1, 1]  # type: ignore[attr-defined]
