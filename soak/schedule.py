"""The fault schedule, drawn from the seed: pure (a seed and a duration in, episodes out).

The run is cut into episodes of a few seconds. During an episode the intake answers in one
mode; at its end the daemon may get a signal: SIGHUP with a changed config, SIGTERM and a
restart, or SIGKILL and a restart, and after a stop a byte may be flipped in a sealed spool
segment. Each restart draws a new config, the spool's settings included (size, when_full,
mode), so the spool fills up under block and under drop_oldest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

KIB = 1024
MIB = 1024 * KIB

#: How the intake answers during an episode (soak/intake.py): "ok" 2xx; "5xx" 503; "429";
#: "400" 400 for the bodies holding a marked event, 2xx for the others; "413" for bodies
#: over a size limit (the daemon splits them); "slow" answers after 1 s; "hang" answers
#: after intake.timeout (the daemon gives up first: an uncertain delivery); "down" refuses
#: connections; "reset" closes the connection without answering, nothing ingested.
INTAKE_MODES = ("ok", "5xx", "429", "400", "413", "slow", "hang", "down", "reset")
_MODE_WEIGHTS = (28, 9, 7, 10, 7, 8, 6, 15, 10)

#: What happens at the end of an episode: nothing, SIGHUP, SIGTERM or kill -9 and a restart,
#: or `spool replay-dead-letter` (the running daemon re-queues the dead letters).
ACTIONS = ("none", "hup", "term", "kill", "replay")
_ACTION_WEIGHTS = (34, 18, 18, 18, 12)

#: Fixed for the whole run: the soak tells an uncertain delivery by this timeout.
INTAKE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Episode:
    start: float  # seconds from the start of the chaos
    length: float
    intake: str  # one of INTAKE_MODES
    action: str  # one of ACTIONS, at the end of the episode
    flip: bool  # after a term/kill: flip a byte in a sealed spool segment

    @property
    def end(self) -> float:
        return self.start + self.length


def draw_schedule(seed: int, seconds: float) -> list[Episode]:
    """Episodes filling `seconds`; the last one ends with the intake healthy and no action
    (the final drain follows). Episodes last 5-15 s, the first starts healthy."""
    rng = random.Random(seed)
    out: list[Episode] = []
    t = 0.0
    while t < seconds:
        length = min(round(rng.uniform(5.0, 15.0), 1), max(seconds - t, 1.0))
        mode = "ok" if not out else rng.choices(INTAKE_MODES, _MODE_WEIGHTS)[0]
        action = rng.choices(ACTIONS, _ACTION_WEIGHTS)[0]
        flip = action in ("term", "kill") and rng.random() < 0.6
        out.append(Episode(round(t, 1), length, mode, action, flip))
        t += length
    if out:
        last = out[-1]
        out[-1] = Episode(last.start, last.length, last.intake, "none", False)
    return out


def draw_live(rng: random.Random) -> dict[str, dict[str, Any]]:
    """The settings SIGHUP applies live (reload.py's LIVE set), drawn anew at each reload."""
    return {
        "batch": {
            "max_events": rng.choice((100, 500, 2000)),
            "max_delay": rng.choice((0.2, 0.5, 1.0)),
            "max_in_flight": rng.choice((1, 2, 4)),
        },
        "intake": {
            "concurrency": rng.choice((1, 2, 4)),
            "retry_max": rng.choice((1.0, 2.0)),
        },
        "relp": {"max_window": rng.choice((32, 128))},
    }


def draw_spool(rng: random.Random) -> dict[str, Any]:
    """The spool's settings for one daemon run (they need a restart to change). 16 MiB is
    above the 8 MiB tmpfs: that run meets ENOSPC before its own limit."""
    return {
        "mode": rng.choice(("overflow", "always")),
        "when_full": rng.choice(("block", "drop_oldest")),
        "max_size": rng.choice((256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)),
        "dead_letter_max_size": rng.choice((256 * KIB, 4 * MIB)),
    }


def describe(episodes: list[Episode]) -> str:
    """One line per episode, for the run's log."""
    return "\n".join(
        f"  {e.start:7.1f}s +{e.length:4.1f}s intake={e.intake:<5} then {e.action}"
        f"{' +flip' if e.flip else ''}" for e in episodes)
