"""Write a daemon config as TOML, as a user would: top-level keys, then one table per section.

Only what the config needs (bools, numbers, strings, paths, flat lists, one level of tables).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    """One TOML value; strings are written as JSON strings, which TOML basic strings accept."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(config: dict[str, Any]) -> str:
    # Plain keys first: in TOML a key after a [table] header belongs to that table.
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_toml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(dumps(config))
