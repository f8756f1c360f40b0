"""What the soak borrows from tests/: the fake intake and the real-rsyslog helpers.

Imported by name at run time: tests/ is ruff-checked only, not type-checked, and a static
import would make `mypy soak` check (and fail on) those files. The wrappers below give the
soak typed signatures for what it uses.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

_fake_intake: Any = importlib.import_module("tests.fake_intake")
_realpeers: Any = importlib.import_module("tests.realpeers")

#: tests.fake_intake.FakeIntake, its request handler and its "answer this" exception.
FakeIntake: Any = _fake_intake.FakeIntake
Reject: Any = _fake_intake._Reject


def free_port(kind: str = "tcp") -> int:
    return int(_realpeers.free_port(kind))


def have(program: str) -> bool:
    return bool(_realpeers.have(program))


def imptcp_input(port: int) -> str:
    return str(_realpeers.imptcp_input(port))


def relp_rsyslog(tmpdir: Path, forward_port: int, substitutions: dict[str, str],
                 extra_config: str) -> Any:
    """tests.realpeers.RelpRsyslogProcess (started): the shipped omrelp rule, forwarding
    to 127.0.0.1:forward_port; `.stop()` ends it."""
    return _realpeers.RelpRsyslogProcess(tmpdir, "127.0.0.1", forward_port,
                                         substitutions=substitutions, extra_config=extra_config)
