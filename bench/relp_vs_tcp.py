"""What a forwarder crash costs with each rsyslog rule: RELP against plain TCP.

    .venv/bin/python -m bench.relp_vs_tcp [--repeat N] [--rules relp,tcp-reliable,tcp-basic]

The schedule of tests/test_relp_rsyslog.py: 100k HAProxy lines into a private rsyslogd at a
steady rate while the real daemon is SIGKILLed and restarted twice (at 30 % and 65 % of the
stream, 1 s down each time); the FakeIntake counts what arrived. One line per run, then a
markdown table of the figures for docs/inputs.md. Needs rsyslog (and rsyslog-relp for RELP).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
from pathlib import Path
from typing import Any


def _tests(name: str) -> Any:
    """A module of the test suite, imported at run time: `mypy bench` (make lint) then does
    not type-check the tests through this file."""
    return importlib.import_module(f"tests.{name}")


def main() -> None:
    sched = _tests("test_relp_rsyslog")
    fake_intake = _tests("fake_intake")
    n, rate, kills, all_rules = sched.N, sched.RATE, sched.KILLS, sched.RULES
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rules", default=",".join(all_rules))
    args = ap.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    results: dict[str, list[Any]] = {r: [] for r in rules}
    for i in range(args.repeat):
        for rule in rules:
            with tempfile.TemporaryDirectory(prefix="relp-vs-tcp-") as tmp, \
                    fake_intake.FakeIntake() as fi:
                out = sched.run_schedule(Path(tmp), fi, rule)
            results[rule].append(out)
            print(f"run {i + 1}: " + out.line(rule), flush=True)
    print(f"\n{n} lines at {rate}/s, forwarder SIGKILLed at "
          f"{', '.join(f'{k:.0%}' for k in kills)} of the stream, {args.repeat} runs:\n")
    print("| rsyslog rule | lost (per run) | duplicates (per run) |")
    print("|---|---|---|")
    for rule, outs in results.items():
        lost = ", ".join(str(o.lost) for o in outs)
        dup = ", ".join(str(o.duplicates) for o in outs)
        med = statistics.median(o.lost for o in outs)
        print(f"| {rule} | {lost} (median {med:g}) | {dup} |")


if __name__ == "__main__":
    main()
