"""Fuzz the header reader: the compiled one (ingest/_header.pxi) must give the same 15 fields
as syslog.header.read_header for any frame."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["haproxy_forwarder", "devtools.fuzzing"]):
    from devtools import fuzzing


def one_input(data: bytes) -> None:
    fuzzing.check_header(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
