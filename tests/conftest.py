"""Shared fixtures: the fake Sekoia intake (HTTPS, own CA) and the daemon started via its CLI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon, base_config
from tests.fake_intake import VALID_KEY, FakeIntake


@pytest.fixture
def intake() -> Iterator[FakeIntake]:
    with FakeIntake() as fi:
        yield fi


def intake_section(fi: FakeIntake, **extra: Any) -> dict[str, Any]:
    return {"url": fi.url, "ca_file": fi.ca_file, "key": VALID_KEY, **extra}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: daemon(intake=..., args=..., env=..., **sections) -> a started Daemon."""
    started: list[Daemon] = []

    def make(fi: FakeIntake | None = None, args: tuple[str, ...] = (),
             env: dict[str, str] | None = None, **sections: Any) -> Daemon:
        if fi is not None:
            sections["intake"] = {**intake_section(fi), **sections.get("intake", {})}
        d = Daemon(tmp_path, base_config(tmp_path, **sections), args=args, env=env)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
