"""Events stored without a Python object each (storage.py): the compiled and pure-Python
`cut`/`offsets` agree on any input, and Batch / Batcher built on them keep every event, in
order, with its timestamp, at every boundary, whichever implementation runs."""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haproxy_forwarder import batching, storage
from haproxy_forwarder.batching import Batch, Batcher
from haproxy_forwarder.storage import new_lens, new_tlens, pack_times, pieces
from tests.ingest_contract import compiled_module

native: Any = compiled_module("haproxy_forwarder._storage")

IMPLS = ["python", "native"]
# `impl` only swaps two functions, the same for every example: no reset between them needed.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Batch and Batcher on the compiled helpers, then on the pure-Python twins."""
    if request.param == "native":
        if native is None:
            pytest.skip("haproxy_forwarder._storage is not built")
        cut, offsets = native.cut, native.offsets
    else:
        cut, offsets = storage.py_cut, storage.py_offsets
    monkeypatch.setattr(batching, "cut", cut)
    monkeypatch.setattr(batching, "offsets", offsets)
    yield request.param


def test_the_chosen_implementation_is_named() -> None:
    assert storage.IMPLEMENTATION in ("native", "python")
    if native is not None and not os.environ.get("HAPROXY_FORWARDER_NO_EXTENSIONS"):
        assert storage.IMPLEMENTATION == "native"


# -- cut and offsets: one contract, two implementations ---------------------------------------

lengths = st.lists(st.integers(0, 2**32 - 1), max_size=40)


@pytest.mark.skipif(native is None, reason="haproxy_forwarder._storage is not built")
@settings(max_examples=500, deadline=None)
@given(lengths, st.data())
def test_cut_and_offsets_agree(lens_list: list[int], data: st.DataObject) -> None:
    n = len(lens_list)
    lens = new_lens(lens_list)
    tlens = new_tlens(data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n)))
    i = data.draw(st.integers(-2, n + 2))
    j = data.draw(st.integers(-2, n + 2))
    budget = data.draw(st.integers(-5, 2**34))
    k = data.draw(st.integers(-2, n + 2))
    for py, nat, args in ((storage.py_cut, native.cut, (i, j, budget)),
                          (storage.py_offsets, native.offsets, (k,))):
        try:
            want: Any = py(lens, tlens, *args)
        except ValueError:
            with pytest.raises(ValueError):
                nat(lens, tlens, *args)
        else:
            assert nat(lens, tlens, *args) == want


def test_cut_takes_the_event_that_reaches_the_budget() -> None:
    lens, tlens = new_lens([10, 20, 30, 40]), new_tlens([1, 2, 3, 4])
    for cut in filter(None, (storage.py_cut, native and native.cut)):
        assert cut(lens, tlens, 0, 4, 25) == (2, 30, 3)  # 10 + 20 reaches 25: both taken
        assert cut(lens, tlens, 1, 4, 20) == (2, 20, 2)  # exactly the budget: taken
        assert cut(lens, tlens, 1, 3, 1000) == (3, 50, 5)  # the count stops first
        assert cut(lens, tlens, 2, 2, 1) == (2, 0, 0)
        with pytest.raises(ValueError):
            cut(lens, new_tlens([1]), 0, 1, 5)  # parts of different lengths


# -- Batch: slice, split, join at every boundary ----------------------------------------------


def make_batch(texts: list[str]) -> tuple[Batch, list[bytes], list[bytes]]:
    frags = [orjson.dumps(t) for t in texts]
    # Timestamps of several lengths: their offsets matter as much as the events'.
    times = [f"2026-12-07T10:00:{i % 60:02d}{'.123456'[: i % 7]}Z".encode()
             for i in range(len(texts))]
    tdata, tlens = pack_times(times)
    return Batch(b"".join(frags), new_lens(map(len, frags)), tdata, tlens), frags, times


texts = st.lists(st.text(max_size=12), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(texts)
def test_slice_split_join_at_every_boundary(impl: str, events: list[str]) -> None:
    b, frags, times = make_batch(events)
    n = len(b)
    assert (b.fragments(), b.times, b.events()) == (frags, times, events)
    for lo in range(n + 1):
        for hi in range(lo, n + 1):
            s = b.slice(lo, hi)
            assert (s.fragments(), s.times, len(s)) == (frags[lo:hi], times[lo:hi], hi - lo)
            rest = b.slice(hi, n)
            joined = Batch.join([b.slice(0, lo), s, rest])
            assert (bytes(joined.data), joined.lens, bytes(joined.tdata), joined.tlens) == (
                bytes(b.data), b.lens, bytes(b.tdata), b.tlens)
    left, right = b.split()
    assert (len(left), len(right)) == (n // 2, n - n // 2)
    assert left.fragments() + right.fragments() == frags
    assert left.times + right.times == times


def test_the_lists_are_made_on_demand_from_the_typed_parts() -> None:
    b = Batch.from_lists(b'"a""bc"', [3, 7], [b"T1", b"T22"])
    assert (b.lens, b.tlens, bytes(b.tdata)) == (array("I", [3, 4]), array("H", [2, 3]),
                                                 b"T1T22")
    assert (b.ends, b.times, b.events()) == ([3, 7], [b"T1", b"T22"], ["a", "bc"])
    b.append(b'"d"', b"T3")
    assert (b.ends, b.times, b.events()) == ([3, 7, 10], [b"T1", b"T22", b"T3"], ["a", "bc", "d"])
    with pytest.raises(ValueError):
        Batch(b'"a"', new_lens([3]), b"", new_tlens())  # a timestamp length per event
    with pytest.raises(ValueError):
        Batch.from_lists(b'"a""b"', [3, 2], [b"t", b"t"])  # ends going backwards
    with pytest.raises(ValueError):
        pack_times([b"x" * 0x10000])


# -- Batcher: the same cut points as adding one event at a time --------------------------------


def reference_cuts(sizes: list[int], max_events: int, max_bytes: int) -> list[int]:
    """Batch sizes (events) closed by adding the events one at a time."""
    closed, count, nbytes = [], 0, 0
    for size in sizes:
        count += 1
        nbytes += size
        if count >= max_events or nbytes >= max_bytes:
            closed.append(count)
            count = nbytes = 0
    return closed


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(st.text(max_size=30), max_size=60), st.integers(1, 12), st.integers(1, 200),
       st.lists(st.integers(0, 60), max_size=8))
def test_batcher_closes_where_one_at_a_time_would(impl: str, events: list[str], max_events: int,
                                                  max_bytes: int, cuts: list[int]) -> None:
    src, frags, times = make_batch(events)
    batcher = Batcher(max_events, max_bytes)
    closed: list[Batch] = []
    points = sorted({c % (len(src) + 1) for c in cuts} | {0, len(src)})
    for lo, hi in pairwise(points):  # the events, in runs of any size
        run = src.slice(lo, hi)
        closed += batcher.add(bytes(run.data), run.lens, bytes(run.tdata), run.tlens)
    assert [len(b) for b in closed] == reference_cuts(list(map(len, frags)), max_events,
                                                      max_bytes)
    rest = batcher.take()
    out = closed + ([rest] if rest is not None else [])
    assert [f for b in out for f in b.fragments()] == frags
    assert [t for b in out for t in b.times] == times


def test_a_batcher_holds_no_python_object_per_event(impl: str) -> None:
    """100,000 events in the open batch: a handful of heap blocks, not one per event (the
    per-chunk objects come and go; only the four buffers grow). Pure Python too: its cut
    makes ints as it sums, but holds none."""
    frags = [orjson.dumps(f"event {i} " + "x" * (i % 300)) for i in range(500)]
    tdata, tlens = pack_times([b"2026-12-07T10:00:00.000Z"] * 500)
    data, lens = b"".join(frags), new_lens(map(len, frags))
    batcher = Batcher(max_events=10**9, max_bytes=2**40)
    batcher.add(data, lens, tdata, tlens)
    before = sys.getallocatedblocks()
    for _ in range(200):
        batcher.add(data, lens, tdata, tlens)
    held = sys.getallocatedblocks() - before
    assert len(batcher.current) == 100_500
    assert held < 100, f"{held} heap blocks held for 100,000 events"


def test_pieces_and_ends() -> None:
    assert pieces(b"abcdef", new_lens([1, 0, 2, 3])) == [b"a", b"", b"bc", b"def"]
    assert storage.ends_of(new_lens([1, 0, 2])) == [1, 1, 3]
    assert storage.lens_of([1, 1, 3]) == new_lens([1, 0, 2])
