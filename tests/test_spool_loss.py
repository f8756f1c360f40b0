"""Issue 17: the spool's losses are counted, once each, and said; none is silent.

- corruption in a sealed segment is corruption, not a torn tail: quarantined, counted in
  records and events, every intact record still delivered (the v1 fixture's records);
- corruption found while running is counted in events too, said in a rate-limited line,
  and not counted (nor replayed) again at the next open;
- drop_oldest deleting records a worker holds: the batch becomes memory-only (a shutdown
  writes it again), and what drop_oldest deletes reaches `Counters.dropped("spool_full")`
  exactly once, whatever path the append took.

What is asserted: records and files on disk, the spool's and the daemon's counters, the
events a (fake) intake accepted, log lines.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from devtools.probe import until
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.delivery import Delivery
from haproxy_forwarder.delivery.router import Router
from haproxy_forwarder.delivery.writer import LOSS_LOG_INTERVAL, LOSS_POLL, LossLine, SpoolAppends
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sinks import Kind, Outcome
from haproxy_forwarder.sinks.deadletter import DeadLetters
from haproxy_forwarder.spool import HEADER_SIZE, Spool, SpoolWriteError
from haproxy_forwarder.spool import format as fmt
from tests.test_delivery import Log
from tests.test_spool import FaultyFs

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "spool-v1"
TS = b"2024-05-01T12:00:00.000Z"
OK = Outcome(Kind.DELIVERED, 200)


# -- helpers ---------------------------------------------------------------------------------------


def events(tag: str, n: int, pad: int = 0) -> Batch:
    return Batch.from_events([f"{tag}-{i}" + " " * pad for i in range(n)], [TS] * n)


def drain(sp: Spool) -> list[tuple[int, Batch]]:
    out: list[tuple[int, Batch]] = []
    while (item := sp.next_batch()) is not None:
        out.append(item)
    return out


def seg_path(d: Path, seq: int) -> Path:
    return d / "segments" / f"{seq:012d}.seg"


def v1_records() -> list[tuple[bytes, dict[str, Any]]]:
    """The records the previous release wrote (tests/fixtures/spool-v1), with what they hold."""
    data = (FIXTURE_V1 / "segments" / "000000000000.seg").read_bytes()
    expected = json.loads((FIXTURE_V1 / "expected.json").read_text())
    out = []
    for e in expected:
        parsed = fmt.parse_at(data, e["record_id"])
        assert parsed is not None and parsed.version == 1
        out.append((data[e["record_id"] : e["record_id"] + parsed.length], e))
    return out


def v1_spool(d: Path, segments: int = 11) -> list[dict[str, Any]]:
    """`segments` sealed segments of one version-1 record each (as the previous release left
    them after a restart or two); returns what segment i holds, in order."""
    records = v1_records()
    (d / "segments").mkdir(parents=True)
    held = []
    for seq in range(segments):
        raw, e = records[(seq + 1) % len(records)]
        seg_path(d, seq).write_bytes(raw)
        held.append(e)
    return held


def flip_middle(path: Path, offset: int = 0) -> None:
    """One bit flipped in the middle of the payload of the record at `offset`."""
    raw = bytearray(path.read_bytes())
    parsed = fmt.parse_at(raw, offset)
    assert parsed is not None
    raw[offset + HEADER_SIZE + (parsed.length - HEADER_SIZE) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def router() -> Router:
    return Router(now=lambda: 0.0, spool_ready=lambda: False, write_ahead=False,
                  max_in_flight=100, on_pressure=lambda on: None)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


class GatedSink:
    """Accepts everything, but each send waits for `gate` (a slow intake) when it is set up."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.sending: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        self.sending.append(batch.events())
        if self.gate is not None:
            await self.gate.wait()
        self.accepted += batch.events()
        return [(batch, OK)]

    async def aclose(self) -> None:
        pass


class NoWait:
    def delay(self, attempt: int, outcome: Outcome) -> float:
        return 0.001


def delivery(tmp_path: Path, spool: Spool, sink: GatedSink, counters: Counters, log: Log,
             **kw: Any) -> Delivery:
    return Delivery(sink, spool, DeadLetters(tmp_path, 1 << 20), counters, log, workers=1,
                    backoff=NoWait(), max_in_flight=100, on_pressure=lambda on: None,
                    **{"write_ahead": False, **kw})


# -- 1. corruption in a sealed segment (recovery) ------------------------------------------------


def test_flipped_byte_in_a_sealed_v1_segment_is_quarantined_and_counted(tmp_path: Path) -> None:
    """The issue's case: a bit flipped in the middle of the only record of segment 5 of 11
    (records of the previous release) was cut as a "torn tail", the file removed, nothing
    counted. Only the newest segment can hold a torn write."""
    d = tmp_path / "spool"
    held = v1_spool(d)
    bad = seg_path(d, 4)
    original = bad.read_bytes()
    flip_middle(bad)
    damaged = bad.read_bytes()
    lost = held[4]
    assert len(lost["events"]) == 4  # its header (intact) says so
    total = sum(len(e["events"]) for e in held)

    sp = Spool(d)
    report = sp.open()
    assert report.truncated == []
    (q,) = report.quarantined
    assert q.segment == bad.name and (q.lost_records, q.lost_events) == (1, 4)
    assert (report.corrupt_records, report.corrupt_events) == (1, 4)
    kept = Path(q.moved_to)
    assert kept == d / "quarantine" / bad.name and kept.read_bytes() == damaged != original
    c = sp.counters
    assert (c.corrupt_records, c.corrupt_events, c.quarantined_segments) == (1, 4, 1)
    # Input of this run: every un-acked event found, the lost ones included (they are
    # counted as dropped).
    assert c.recovered_events == total
    got = drain(sp)
    assert [b.events() for _, b in got] == [e["events"] for i, e in enumerate(held) if i != 4]
    assert [b.times for _, b in got] == [
        [t.encode() for t in e["times"]] for i, e in enumerate(held) if i != 4]
    sp.close()
    # Counted once: the next open finds a clean spool.
    sp = Spool(d)
    again = sp.open()
    assert again.clean and sp.counters.corrupt_records == 0
    assert len(drain(sp)) == 10
    sp.close()


def test_sealed_segment_keeps_records_before_and_after_the_damage(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    sp = Spool(d, segment_size=1000)
    sp.open()
    ids = [sp.append(events(f"b{i}", 3, pad=40)).record_id for i in range(8)]
    sp.close()
    first_seq = ids[0] >> fmt.ID_SHIFT
    in_first = [r for r in ids if r >> fmt.ID_SHIFT == first_seq]
    assert 3 <= len(in_first) < len(ids)  # several records, and newer segments after it
    path = seg_path(d, first_seq)
    offs = [r & fmt.OFFSET_MASK for r in in_first]
    flip_middle(path, offs[1])  # a record in the middle: resynchronised after it
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # and the last record of this sealed segment: no resync possible
    path.write_bytes(bytes(raw))
    sp = Spool(d, segment_size=1000)
    report = sp.open()
    assert report.truncated == []
    (q,) = report.quarantined
    assert (q.lost_records, q.lost_events, q.good_records) == (2, 6, 1)
    lost = {f"b{in_first.index(r)}" for r in (in_first[1], in_first[-1])}
    kept = [b.events()[0].split("-")[0] for _, b in drain(sp)]
    assert kept == [f"b{i}" for i in range(8) if f"b{i}" not in lost]
    assert (sp.counters.corrupt_records, sp.counters.corrupt_events) == (2, 6)
    sp.close()


def test_torn_tail_of_the_newest_segment_is_still_a_torn_tail(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    held = v1_spool(d, segments=3)
    newest = seg_path(d, 2)
    raw = newest.read_bytes()
    newest.write_bytes(raw[: len(raw) - 5])  # the append a crash cut short
    sp = Spool(d)
    report = sp.open()
    assert report.quarantined == [] and [t.segment for t in report.truncated] == [newest.name]
    assert sp.counters.corrupt_records == sp.counters.corrupt_events == 0
    assert sp.counters.recovered_events == len(held[0]["events"]) + len(held[1]["events"])
    assert not (d / "quarantine").exists()
    sp.close()


def test_damage_to_records_delivered_before_is_no_loss(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    sp = Spool(d, segment_size=400)
    sp.open()
    ids = [sp.append(events(f"b{i}", 2, pad=30)).record_id for i in range(6)]
    first = [r for r in ids if r >> fmt.ID_SHIFT == ids[0] >> fmt.ID_SHIFT]
    assert len(first) >= 2
    drain(sp)
    sp.ack(first[0])  # delivered: its bytes are on disk until the segment goes
    sp.close()
    flip_middle(seg_path(d, ids[0] >> fmt.ID_SHIFT), first[0] & fmt.OFFSET_MASK)
    sp = Spool(d, segment_size=400)
    report = sp.open()
    (q,) = report.quarantined  # damaged all the same: kept for forensics
    assert (q.lost_records, report.corrupt_records, report.corrupt_events) == (0, 0, 0)
    assert len(drain(sp)) == 5
    sp.close()


def test_open_losses_reach_dropped_spool_corrupt_once(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    v1_spool(d)
    flip_middle(seg_path(d, 4))
    sp = Spool(d)
    sp.open()
    counters, log = Counters(), Log()
    SpoolAppends(sp, router(), log, counters=counters)
    assert counters.drop_reasons["spool_corrupt"] == counters.dropped_events == 4
    assert log.lines == []  # open_spool said it already (spool_recovered_with_corruption)
    SpoolAppends(sp, router(), log, counters=counters)  # nothing left to take: not twice
    assert counters.dropped_events == 4
    sp.close()


def test_the_daemons_delivery_counts_open_losses_as_dropped(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    v1_spool(d)
    flip_middle(seg_path(d, 4))
    sp = Spool(d)
    sp.open()
    counters = Counters()
    delivery(tmp_path, sp, GatedSink(), counters, Log())
    try:
        assert counters.drop_reasons["spool_corrupt"] == 4
    finally:
        sp.close()


# -- 2. corruption found while running -----------------------------------------------------------


def corrupt_on_disk(sp: Spool, rid: int) -> None:
    seq, off = fmt.split_id(rid)
    with seg_path(sp.directory, seq).open("r+b") as f:
        f.seek(off + HEADER_SIZE + 3)
        f.write(b"!")


def test_runtime_corruption_counts_events_once_and_is_not_counted_again(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    sp = Spool(d)
    sp.open()
    sp.append(events("a", 2))
    bad = sp.append(events("b", 5)).record_id
    sp.append(events("c", 2))
    corrupt_on_disk(sp, bad)
    assert [b.events()[0] for _, b in drain(sp)] == ["a-0", "c-0"]
    assert (sp.counters.corrupt_records, sp.counters.corrupt_events) == (1, 5)
    losses = sp.take_losses()
    assert (losses.corrupt_records, losses.corrupt_events) == (1, 5)
    assert losses.corrupt_segments == [seg_path(d, 0).name]
    assert not sp.take_losses()  # returned once
    sp.close()
    # The next run neither counts it again nor replays it (its ack was written); the
    # original is in quarantine/, the segment repaired.
    sp = Spool(d)
    report = sp.open()
    assert (report.corrupt_records, sp.counters.corrupt_records) == (0, 0)
    assert [b.events()[0] for _, b in drain(sp)] == ["a-0", "c-0"]
    assert sp.counters.recovered_events == 4
    assert (d / "quarantine" / seg_path(d, 0).name).exists()
    sp.close()


def test_runtime_corruption_is_counted_dropped_and_said_rate_limited(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    sp.open()
    ids = [sp.append(events(f"r{i}", 2 + i)).record_id for i in range(4)]
    counters, log, clock = Counters(), Log(), Clock()
    appends = SpoolAppends(sp, router(), log, counters=counters, clock=clock)
    for rid in ids[:3]:
        corrupt_on_disk(sp, rid)
    assert sp.next_batch() is not None  # r0..r2 skipped, r3 handed out
    appends.report_losses()
    (line,) = log.named("spool_corrupt_records")
    assert (line["records"], line["events"]) == (3, 2 + 3 + 4)
    assert line["segments"] == [seg_path(sp.directory, 0).name]
    assert counters.drop_reasons["spool_corrupt"] == counters.dropped_events == 9
    # Again within the interval: counted at once, said later, summed.
    sp.append(events("x", 7))
    rid = sp.append(events("y", 1)).record_id
    corrupt_on_disk(sp, rid)
    drain(sp)
    clock.t += 1
    appends.report_losses()
    assert len(log.named("spool_corrupt_records")) == 1
    assert counters.drop_reasons["spool_corrupt"] == 10
    clock.t += LOSS_LOG_INTERVAL
    appends.report_losses()
    assert log.named("spool_corrupt_records")[1]["records"] == 1
    appends.report_losses()
    assert len(log.named("spool_corrupt_records")) == 2
    sp.close()


def test_delivery_says_runtime_corruption_while_it_delivers_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        sp = Spool(tmp_path / "spool")
        sp.open()
        sp.append(events("a", 2))
        corrupt_on_disk(sp, sp.append(events("b", 3)).record_id)
        sp.append(events("c", 2))
        sink, log = GatedSink(), Log()
        d = delivery(tmp_path, sp, sink, Counters(), log)
        d.start()
        await until(lambda: len(sink.accepted) == 4 and sp.pending_batches == 0)
        assert sink.accepted == ["a-0", "a-1", "c-0", "c-1"]
        # Said by the writer task's poll, within about LOSS_POLL, nothing else happening.
        await until(lambda: bool(log.named("spool_corrupt_records")), timeout=LOSS_POLL + 2)
        (line,) = log.named("spool_corrupt_records")
        assert (line["records"], line["events"]) == (1, 3)
        await d.stop()
        sp.close()

    run(main())


def test_delivery_counts_runtime_corruption_as_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        sp = Spool(tmp_path / "spool")
        sp.open()
        corrupt_on_disk(sp, sp.append(events("b", 3)).record_id)
        counters = Counters()
        d = delivery(tmp_path, sp, GatedSink(), counters, Log())
        d.start()
        await until(lambda: sp.pending_batches == 0)
        await until(lambda: counters.drop_reasons["spool_corrupt"] == 3, timeout=LOSS_POLL + 2)
        await d.stop()
        sp.close()

    run(main())


def test_loss_line_first_at_once_then_totals_per_interval() -> None:
    said: list[tuple[str, dict[str, Any]]] = []
    clock = Clock()
    line = LossLine(lambda event, **kw: said.append((event, kw)), "lost", clock=clock, why="x")
    line.add(["s1"], events=3)
    line.add(["s1", "s2"], events=4)
    line.flush()
    assert said == [("lost", {"events": 3, "segments": ["s1"], "why": "x"})]
    clock.t += LOSS_LOG_INTERVAL
    line.flush()
    assert said[1] == ("lost", {"events": 4, "segments": ["s1", "s2"], "why": "x"})
    line.add(events=1)
    line.add(events=2)
    line.flush(force=True)
    assert said[2] == ("lost", {"events": 3, "occurrences": 2, "why": "x"})
    line.flush(force=True)
    assert len(said) == 3


# -- 3. drop_oldest: in-flight records, and counting what it deletes -------------------------------


def small_spool(d: Path, fs: FaultyFs | None = None) -> Spool:
    rl = len(fmt.encode_record(events("x0", 4), 0))
    # Room for four records, two per segment: the fifth append drops the oldest segment.
    sp = Spool(d, max_size=4 * rl, segment_size=2 * rl, when_full="drop_oldest", fs=fs)
    sp.open()
    return sp


def test_sigterm_after_drop_oldest_deleted_a_held_batch_writes_it_again(tmp_path: Path) -> None:
    """Issue 17: a worker held a spooled batch (slow intake), drop_oldest deleted its record,
    a SIGTERM came: the batch was neither spooled again nor counted (4,000 events lost)."""

    async def main() -> None:
        sp = small_spool(tmp_path / "spool")
        sink, log, counters = GatedSink(), Log(), Counters()
        sink.gate = asyncio.Event()  # the intake takes the request and never answers
        d = delivery(tmp_path, sp, sink, counters, log, write_ahead=True)
        d.start()
        d.submit(events("held", 4))
        await until(lambda: sink.sending == [events("held", 4).events()])
        assert d.in_memory == 0 and d.backlog == 1  # on disk, handed out
        for i in range(4):  # fills the spool: drop_oldest deletes the held batch's segment
            d.submit(events(f"n{i}", 4))
        await until(lambda: sp.counters.appended_batches == 5 and not d.router.to_spool
                    and d.router.spooling is None)
        assert sp.counters.evicted_inflight == 1
        # The backlog still sees it: in memory only now.
        assert d.in_memory == 1 and d.backlog == 1 + sp.pending_batches
        spooled, lost = await d.stop()
        assert (spooled, lost) == (4, 0)  # written again at the stop
        assert counters.uncertain_deliveries == 1  # (its request may have gone through)
        sp.close()
        again = Spool(tmp_path / "spool")
        again.open()
        on_disk = [e for _, b in drain(again) for e in b.events()]
        again.close()
        assert set(events("held", 4).events()) <= set(on_disk)
        # Every event is on disk once, or counted as dropped by drop_oldest: none is missing.
        assert len(on_disk) == len(set(on_disk))
        assert len(on_disk) + sp.counters.dropped_events == 5 * 4

    run(main())


def test_held_batch_deleted_by_drop_oldest_is_delivered_from_memory_not_acked(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        sp = small_spool(tmp_path / "spool")
        sink, log = GatedSink(), Log()
        sink.gate = asyncio.Event()
        d = delivery(tmp_path, sp, sink, Counters(), log, write_ahead=True)
        d.start()
        d.submit(events("held", 4))
        await until(lambda: len(sink.sending) == 1)
        for i in range(4):
            d.submit(events(f"n{i}", 4))
        await until(lambda: sp.counters.evicted_inflight == 1 and d.in_memory == 1)
        sink.gate.set()
        await until(lambda: sp.pending_batches == 0 and d.in_memory == 0)
        assert sink.accepted[:4] == events("held", 4).events()
        assert sp.counters.acked_batches == 4  # n0..n3; the deleted record was not acked
        await d.stop()
        sp.close()

    run(main())


def test_drop_oldest_counted_once_as_dropped_spool_full(tmp_path: Path) -> None:
    async def main() -> None:
        sp = small_spool(tmp_path / "spool")
        counters, log, clock = Counters(), Log(), Clock()
        appends = SpoolAppends(sp, router(), log, counters=counters, clock=clock)
        for i in range(6):
            result = await appends.append(events(f"b{i}", 4))
            appends.appended(result)  # what Delivery.stop does after each shutdown append
        c = sp.counters
        assert (c.dropped_batches, c.dropped_events) == (2, 8)
        assert counters.drop_reasons["spool_full"] == counters.dropped_events == 8
        (line,) = log.named("spool_full_dropped_oldest")  # the second within the interval
        assert (line["batches"], line["events"]) == (2, 8)
        clock.t += LOSS_LOG_INTERVAL
        for i in range(6, 8):
            await appends.append(events(f"b{i}", 4))
        assert counters.drop_reasons["spool_full"] == c.dropped_events == 16
        appends.report_losses(flush=True)
        said = log.named("spool_full_dropped_oldest")
        assert sum(x["events"] for x in said) == 16  # every dropped event said, once
        sp.close()

    run(main())


def test_drop_oldest_during_an_append_that_then_fails_is_counted(tmp_path: Path) -> None:
    async def main() -> None:
        fs = FaultyFs()
        sp = small_spool(tmp_path / "spool", fs)
        counters, log = Counters(), Log()
        appends = SpoolAppends(sp, router(), log, counters=counters)
        for i in range(4):
            await appends.append(events(f"b{i}", 4))
        fs.fail("pwrite", errno.EIO)  # the oldest segment is deleted, then the write fails
        with pytest.raises(SpoolWriteError):
            await appends.append(events("b4", 4))
        assert sp.counters.dropped_events == 8
        assert counters.drop_reasons["spool_full"] == 8
        assert [x["events"] for x in log.named("spool_full_dropped_oldest")] == [8]
        fs.heal()
        await appends.append(events("b5", 4))
        assert counters.drop_reasons["spool_full"] == 8  # not twice
        sp.close()

    run(main())


def test_held_records_deleted_after_the_stop_are_counted_lost(tmp_path: Path) -> None:
    async def main() -> None:
        sp = small_spool(tmp_path / "spool")
        counters, log = Counters(), Log()
        r = router()
        appends = SpoolAppends(sp, r, log, counters=counters)
        for i in range(4):
            await appends.append(events(f"b{i}", 4))
        drain(sp)  # every record handed out (workers hold them)
        r.stop()  # their workers are gone: nobody will deliver them from memory
        await appends.append(events("b4", 4))
        assert sp.counters.evicted_inflight == 2 and sp.counters.dropped_events == 0
        assert counters.drop_reasons["spool_full"] == 8
        (line,) = log.named("spool_full_dropped_in_flight")
        assert (line["batches"], line["events"]) == (2, 8)
        sp.close()

    run(main())

