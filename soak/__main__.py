"""`python -m soak [--minutes N] [--seed S] [--work DIR]`: exit 0 when every event is
accounted for, 1 otherwise (the ledger is printed either way)."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from devtools import REPO

from .run import main_run, replay


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0,
                   help="length of the fault schedule (the final drain comes after)")
    p.add_argument("--seed", type=int, default=None,
                   help="draws the schedule and the configs (default: random, printed)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for logs, configs and the spool (default build/soak/<seed>-<time>)")
    p.add_argument("--tcp-rate", type=float, default=300.0, help="events/s over TCP")
    p.add_argument("--relp-rate", type=float, default=200.0, help="events/s through rsyslog")
    p.add_argument("--udp-rate", type=float, default=100.0, help="events/s over UDP")
    p.add_argument("--no-tmpfs", action="store_true",
                   help="keep the spool on disk (else an 8 MiB tmpfs when root may mount)")
    p.add_argument("--daemon-tree", type=Path, default=None,
                   help="run the daemon from this copy of the sources (to try a fix)")
    p.add_argument("--replay", type=Path, default=None,
                   help="rebuild the ledger from a run's ledger-inputs.pickle, print it")
    a = p.parse_args(argv)
    if a.replay is not None:
        return replay(a.replay)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1, 10**6)
    work = a.work or REPO / "build" / "soak" / f"{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    rates = {"tcp": a.tcp_rate, "relp": a.relp_rate, "udp": a.udp_rate}
    return main_run(seed, a.minutes, work.resolve(), rates, not a.no_tmpfs,
                    a.daemon_tree.resolve() if a.daemon_tree else None)


if __name__ == "__main__":
    sys.exit(main())
