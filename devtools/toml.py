"""Write a daemon config as TOML, as a user would: top-level keys, then one table per section.

Only what the config needs: bools, numbers, strings, paths, flat lists, tables, tables of
tables ([intakes.NAME]) and arrays of tables ([[routes]]).
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


def _tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(name: str, values: dict[str, Any]) -> list[str]:
    # Plain keys first: in TOML a key after a [table] header belongs to that table.
    lines = [f"\n[{name}]"] if name else []
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()
              if not isinstance(v, dict) and not _tables(v)]
    for k, v in values.items():
        if isinstance(v, dict):
            lines += _table(f"{name}.{k}" if name else k, v)
        elif _tables(v):
            for item in v:
                lines.append(f"\n[[{name}.{k}]]" if name else f"\n[[{k}]]")
                lines += _table("", item)
    return lines


def dumps(config: dict[str, Any]) -> str:
    return "\n".join(_table("", config)) + "\n"


def write_toml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(dumps(config))
