"""Fuzz the ChunkReader: any stream, any cut points, every framing mode, several limits and
filters; the compiled reader must give exactly what the pure-Python reader gives."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["haproxy_forwarder", "devtools.fuzzing"]):
    from devtools import fuzzing


def one_input(data: bytes) -> None:
    fuzzing.check_ingest(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
