"""The ChunkReader contract as test helpers: run a reader over chunks, and the reference result.
`reference` restates the old hot path (Pipeline.ingest, UDP listener) on the syslog/ parsers."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from haproxy_forwarder.config import MAX_EVENT_BYTES
from haproxy_forwarder.ingest import DATAGRAM, ChunkReader, ChunkResult, ProgramFilter
from haproxy_forwarder.storage import LENS, TLENS
from haproxy_forwarder.syslog.framing import FrameDecoder
from haproxy_forwarder.syslog.header import event_text, read_header, valid_time

RECEIVED = b"2026-01-02T03:04:05.678Z"
EXPECT_COMPILED = os.environ.get("HAPROXY_FORWARDER_EXPECT_COMPILED") == "1"



def compiled_module(name: str) -> Any:
    """The compiled module `name`, or None where it is not built; under
    HAPROXY_FORWARDER_EXPECT_COMPILED=1 a missing one is an error, not a skip."""
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - depends on the build
        if EXPECT_COMPILED:
            raise
        return None


Factory = Callable[[ProgramFilter, int, str], ChunkReader]


def load(spec: str) -> Factory | None:
    """"module:Class" -> the reader class, or None when that module is not built/importable."""
    module, _, name = spec.partition(":")
    try:
        factory: Factory = getattr(importlib.import_module(module), name)
    except ImportError:
        return None
    return factory


def implementation_params(specs: Sequence[tuple[str, str]]) -> list[object]:
    """pytest params, one per implementation; one that did not load is skipped, not hidden."""
    out: list[object] = []
    for name, spec in specs:
        factory = load(spec)
        if factory is None:
            out.append(pytest.param(None, id=name, marks=pytest.mark.skip(f"{spec} not built")))
        else:
            out.append(pytest.param(factory, id=name))
    return out


@dataclass
class Outcome:
    """Everything a sequence of feed()/close() produced, concatenated and summed."""

    fragments: list[bytes] = field(default_factory=list)
    times: list[bytes] = field(default_factory=list)
    too_large: list[tuple[bytes, bytes]] = field(default_factory=list)
    frames: int = 0
    accepted: int = 0
    filtered: int = 0
    oversized: int = 0
    bad_times: int = 0
    framing_errors: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def events(self) -> list[str]:
        return [orjson.loads(f) for f in self.fragments]

    def add(self, r: ChunkResult) -> None:
        check_result(r)
        start = 0
        for end in r.ends:
            self.fragments.append(r.data[start:end])
            start = end
        self.times += r.times
        self.too_large += r.too_large
        self.frames += r.frames
        self.accepted += r.accepted
        self.filtered += r.filtered
        self.oversized += r.oversized
        self.bad_times += r.bad_times
        self.framing_errors += r.framing_errors
        if r.error is not None:
            self.errors.append(r.error)


def check_result(r: ChunkResult) -> None:
    """What holds for every single ChunkResult, whatever the input."""
    assert isinstance(r.data, bytes) and isinstance(r.tdata, bytes)
    # storage.py's typed parts: no Python object per event
    assert (r.lens.typecode, r.tlens.typecode) == (LENS, TLENS)
    assert sum(r.tlens) == len(r.tdata)
    assert len(r.ends) == len(r.times) == len(r.lens) == len(r.tlens) == len(r)
    assert r.ends == sorted(r.ends)
    assert (r.ends[-1] if r.ends else 0) == len(r.data)
    assert r.frames == r.accepted + r.filtered
    assert r.accepted >= len(r.ends) + len(r.too_large)
    assert r.framing_errors in (0, 1)
    assert (r.error is not None) == bool(r.framing_errors)
    for ts in r.times:
        assert isinstance(ts, bytes)
        ts.decode("ascii")


def run(
    reader: ChunkReader,
    chunks: Iterable[bytes],
    received_at: bytes = RECEIVED,
    close: bool = True,
) -> Outcome:
    out = Outcome()
    for chunk in chunks:
        out.add(reader.feed(chunk, received_at))
    if close:
        out.add(reader.close(received_at))
    return out


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# -- the reference: what the old path (HEAD: pipeline.py / listeners.py) put in batches ---------


def reference(
    frames: Sequence[bytes], filt: ProgramFilter, received_at: bytes = RECEIVED
) -> Outcome:
    """Pipeline.ingest restated: header, program filter, event text, orjson, 250 KiB cap."""
    out = Outcome(frames=len(frames))
    for frame in frames:
        h = read_header(frame)
        if not frame.startswith(filt.programs, h.prog_start, h.prog_end):
            out.filtered += 1
            continue
        out.accepted += 1
        keep = bool(filt.keep_tag) and frame.startswith(filt.keep_tag, h.prog_start, h.prog_end)
        text = event_text(frame, h, keep)
        ts = frame[h.ts_start : h.ts_end] if h.ts_zoned else received_at
        if h.ts_zoned and not valid_time(ts):
            out.bad_times += 1
            ts = received_at
        if len(text.encode("utf-8")) > MAX_EVENT_BYTES:
            out.too_large.append((orjson.dumps(text), ts))
            continue
        out.fragments.append(orjson.dumps(text))
        out.times.append(ts)
    return out


def reference_stream(
    chunks: Sequence[bytes],
    filt: ProgramFilter,
    max_message_size: int,
    framing: str,
    received_at: bytes = RECEIVED,
) -> Outcome:
    """The old TCP / UDP listeners in front of `reference` (counts, first framing error)."""
    frames: list[bytes] = []
    oversized = 0
    error: str | None = None
    if framing == DATAGRAM:
        for d in chunks:
            if len(d) > max_message_size:
                oversized += 1
                continue
            d = d[:-1] if d.endswith(b"\n") else d
            if d:
                frames.append(d)
    else:
        dec = FrameDecoder(max_message_size, framing=framing)
        for c in chunks:
            frames += dec.feed(c)
        frames += dec.close()
        oversized, error = dec.oversized, dec.error
    out = reference(frames, filt, received_at)
    out.oversized = oversized
    if error is not None:
        out.framing_errors = 1
        out.errors = [error]
    return out


def octet(*messages: bytes) -> bytes:
    return b"".join(b"%d %s" % (len(m), m) for m in messages)
