"""The fuzz corpus as regression tests: every committed seed and finding (tests/fuzz/) and the
seeds made from the shared conformance vectors go through the same differential checks as
`make fuzz` (devtools.fuzzing): compiled and pure-Python ingest must agree, byte for byte.
`make asan` runs this file under AddressSanitizer and UndefinedBehaviorSanitizer."""

from __future__ import annotations

import os

import pytest

from devtools import fuzzing
from haproxy_forwarder import ingest

if ingest.IMPLEMENTATION != "native":  # the pure-Python run of CI: nothing to compare with
    if os.environ.get("HAPROXY_FORWARDER_EXPECT_COMPILED") == "1":
        raise ImportError(f"compiled ingest expected but not in use: {ingest.IMPORT_ERROR}")
    pytest.skip("the compiled ingest is not in use", allow_module_level=True)

COMMITTED = {kind: list(fuzzing.corpus_files(kind)) for kind in ("ingest", "header")}
GENERATED = fuzzing.seeds(conformance=True)


def test_the_committed_corpus_is_there() -> None:
    # An empty folder would make the replays below pass vacuously.
    assert len(COMMITTED["ingest"]) >= 5 and len(COMMITTED["header"]) >= 5


@pytest.mark.parametrize("path", COMMITTED["ingest"], ids=lambda p: p.name)
def test_committed_ingest_input(path: os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        fuzzing.check_ingest(f.read())


@pytest.mark.parametrize("path", COMMITTED["header"], ids=lambda p: p.name)
def test_committed_header_input(path: os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        fuzzing.check_header(f.read())


def test_conformance_seeds_agree() -> None:
    n = sum(fuzzing.check_ingest(data) for data in GENERATED["ingest"].values())
    for frame in GENERATED["header"].values():
        fuzzing.check_header(frame)
    assert n > 50  # frames actually read: the seeds are not all empty or refused


def test_a_difference_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check must be able to fail: a "native" reader that drops what the reference keeps.
    def other(filt: ingest.ProgramFilter, max_size: int, framing: str) -> ingest.ChunkReader:
        return ingest.PyChunkReader(ingest.ProgramFilter(["nothing-matches"]), max_size, framing)

    monkeypatch.setattr(fuzzing, "_native_reader", other)
    data = fuzzing.encode(b"<134>Nov 26 21:58:51 lb1 haproxy[1]: hello\n", fuzzing.LF)
    with pytest.raises(AssertionError, match="native"):
        fuzzing.check_ingest(data)
