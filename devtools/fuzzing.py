"""Differential checks of the compiled ingest against the pure-Python reference, on any bytes.

One input format for the fuzz harnesses (fuzz/), the corpus replay test and `make asan`:

    byte 0   framing (bits 0-1: auto, octet-counted, lf, datagram) and filter (bits 2-3)
    byte 1   max_message_size, an index into MAX_SIZES
    byte 2-3 seed of the cut points: the stream is fed in pieces of 1..CUT_MAX bytes
    rest     the stream (or, in datagram mode, the datagrams: one per piece)

`check_ingest` feeds both readers the same pieces and asserts equal results after every call
(ChunkResult, `buffered`); `check_header` compares the compiled header reader with
syslog.header.read_header. An AssertionError is a finding: the input goes into the corpus.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from haproxy_forwarder.ingest import AUTO, DATAGRAM, LF, OCTET, ChunkReader, ProgramFilter
from haproxy_forwarder.ingest._py import PyChunkReader
from haproxy_forwarder.syslog.header import read_header

from . import REPO

FRAMINGS = (AUTO, OCTET, LF, DATAGRAM)
# Small limits reach the oversize and resync paths with short inputs; 262144 is the default.
MAX_SIZES = (16, 64, 100, 255, 256, 1000, 4096, 262144)
# (programs, keep_tag): the default, one that keeps every tag, a one-letter prefix, no keep.
FILTERS = (
    (("haproxy", "hapee"), ("hapee",)),
    (("haproxy", "hapee"), ("haproxy", "hapee")),
    (("h",), ()),
    (("haproxy",), ()),
)
CUT_MAX = 64
# Two reception times, alternating, so a change of the clock between chunks is covered.
RECEIVED = (b"2026-11-26T21:58:51.000Z", b"2026-11-26T21:58:52.001Z")
#: Seeds and findings, committed; tests/test_fuzz_corpus.py replays every file.
CORPUS = REPO / "tests" / "fuzz"


@dataclass(frozen=True)
class Case:
    framing: str
    max_size: int
    programs: tuple[str, ...]
    keep_tag: tuple[str, ...]
    pieces: tuple[bytes, ...]


def decode(data: bytes) -> Case:
    """The case a fuzz input stands for (any bytes are a valid case)."""
    head = data[:4].ljust(4, b"\0")
    programs, keep = FILTERS[(head[0] >> 2) & 3]
    stream = data[4:]
    rng = random.Random(int.from_bytes(head[2:4], "big"))
    pieces: list[bytes] = []
    i = 0
    while i < len(stream):
        k = rng.randint(1, CUT_MAX)
        pieces.append(stream[i : i + k])
        i += k
    return Case(FRAMINGS[head[0] & 3], MAX_SIZES[head[1] % len(MAX_SIZES)], programs, keep,
                tuple(pieces))


def encode(stream: bytes, framing: str = AUTO, max_size: int = 262144, filt: int = 0,
           seed: int = 0) -> bytes:
    """The fuzz input for a stream (seeds are written with it)."""
    head = bytes([FRAMINGS.index(framing) | (filt << 2), MAX_SIZES.index(max_size)])
    return head + seed.to_bytes(2, "big") + stream


def _native_reader(filt: ProgramFilter, max_size: int, framing: str) -> ChunkReader:
    from haproxy_forwarder.ingest._native import NativeChunkReader

    return NativeChunkReader(filt, max_size, framing)


def compare(pieces: Sequence[bytes], filt: ProgramFilter, max_size: int, framing: str) -> int:
    """Feed both readers the same calls; AssertionError at the first difference. Returns the
    number of frames read (for the harness's statistics)."""
    py: ChunkReader = PyChunkReader(filt, max_size, framing)
    nat = _native_reader(filt, max_size, framing)
    frames = 0
    for i, piece in enumerate(pieces):
        at = RECEIVED[i & 1]
        want, got = py.feed(piece, at), nat.feed(piece, at)
        assert got == want, f"feed #{i} ({piece!r}): native {got!r} != python {want!r}"
        assert nat.buffered == py.buffered, f"feed #{i}: buffered {nat.buffered} != {py.buffered}"
        frames += want.frames
    for _ in range(2):  # a second close must be harmless in both
        want, got = py.close(RECEIVED[0]), nat.close(RECEIVED[0])
        assert got == want, f"close: native {got!r} != python {want!r}"
        assert nat.buffered == py.buffered
        frames += want.frames
    fallbacks = getattr(nat, "fallbacks", 0)
    assert fallbacks == 0, f"{fallbacks} frames fell back to the Python path"
    return frames


def check_ingest(data: bytes) -> int:
    case = decode(data)
    return compare(case.pieces, ProgramFilter(case.programs, case.keep_tag), case.max_size,
                   case.framing)


def check_header(frame: bytes) -> None:
    from haproxy_forwarder.ingest._header import read_header as native_read_header

    want, got = tuple(read_header(frame)), native_read_header(frame)
    assert got == want, f"header of {frame!r}: native {got!r} != python {want!r}"


def corpus_files(kind: str) -> Iterator[Path]:
    """Every committed input of one harness ("ingest" or "header")."""
    folder = CORPUS / kind
    if folder.is_dir():
        yield from sorted(p for p in folder.iterdir() if p.is_file())


def seeds(conformance: bool = True) -> dict[str, dict[str, bytes]]:
    """Seed inputs: {"ingest": {name: input}, "header": {name: frame}}. The generated ones
    (devtools.traffic) are committed under tests/fuzz (`python -m devtools.fuzzing`); those
    made from the conformance vectors are built where they are used, from tests/conformance."""
    from . import conformance as cf
    from .traffic import haproxy_line, lf_framed, octet_counted, rfc5424, traditional

    frames: dict[str, bytes] = {
        "hapee-5424": rfc5424("hapee-lb", haproxy_line(1)),
        "haproxy-5424-sd": rfc5424("haproxy", haproxy_line(2), sd='[x@1 a="b\\]"]'),
        "traditional": traditional("haproxy", haproxy_line(3)),
        "hapee-traditional": traditional("hapee-lb", haproxy_line(4)),
        "other-program": traditional("sshd", "Accepted publickey for root", pri=86),
        "haproxy-local": f"<134>Nov 26 21:58:51 haproxy[12]: {haproxy_line(5)}".encode(),
        "rfc3339-3164":
            f"<134>2026-11-26T21:58:51+01:00 lb1 haproxy[7]: {haproxy_line(6)}".encode(),
        "utf8-bom-invalid":
            b"<134>1 - lb1 haproxy - - - \xef\xbb\xbfok \xff\xfe \xe2\x82 end\r\n\x00",
    }
    ingest: dict[str, bytes] = {}
    if conformance:
        for name in (cf.RFC5424_VECTORS, cf.RFC3164_VECTORS):
            for row in cf.rows(name):
                frames[row["id"]] = cf.wire(row)
        for row in cf.rows(cf.FRAMING_VECTORS):
            stream = row["stream"].encode("utf-8")
            framing = {"octet-counting": OCTET, "non-transparent": LF}.get(
                row.get("framing"), AUTO)
            ingest[row["id"]] = encode(stream, framing)
            ingest[f"{row['id']}-auto-small"] = encode(stream, AUTO, 64, seed=7)
    some = list(frames.values())[:24]
    ingest["octet-mixed"] = encode(octet_counted(some), OCTET)
    ingest["lf-mixed"] = encode(lf_framed(some), LF, filt=1, seed=3)
    ingest["auto-mixed-small"] = encode(octet_counted(some), AUTO, 256, filt=2, seed=11)
    ingest["auto-lf-tiny"] = encode(lf_framed(some), AUTO, 64, filt=0, seed=13)
    ingest["datagrams"] = encode(b"".join(some[:6]), DATAGRAM, 1000, filt=3, seed=5)
    return {"ingest": ingest, "header": frames}


def write_seeds(root: Path = CORPUS, conformance: bool = False) -> int:
    n = 0
    for kind, inputs in seeds(conformance).items():
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in inputs.items():
            (folder / f"seed-{name}").write_bytes(data)
            n += 1
    return n


if __name__ == "__main__":
    print(f"wrote {write_seeds()} seed files under {CORPUS}")
