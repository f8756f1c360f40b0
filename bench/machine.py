"""The machine a benchmark ran on, as every bench program prints it."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path

from devtools import REPO


def commit() -> str:
    """`git rev-parse --short HEAD`, plus " + uncommitted changes" when `git status
    --porcelain` lists anything (anywhere in the work tree: what ran is not that commit)."""
    rev = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=REPO, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                               text=True, cwd=REPO, timeout=30).stdout.strip()
        if dirty:
            rev += " + uncommitted changes"
    return rev


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (os.getloadavg)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    rev = commit()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": rev,
        "loadavg": loadavg(),
    }
