"""The accounting identity on a real daemon: accepted + spool_recovered + requeued =
delivered + dead_lettered + dropped + held, read from /metrics, the stats line and `status`.

Each test drives a path that moves events into another term (delivered, dead-lettered, held on
the spool across a restart, recovered) and checks the sum to the event once the daemon is at
rest, and that every term is the one expected (a sum that holds because two terms are both
wrong would not do). The identity holds per intake too (tests/test_metrics_intakes.py): with
a single [intake], the series of intake "default" are the totals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from devtools.daemon import Daemon, base_config, run_cli
from devtools.probe import wait_until
from devtools.traffic import octet_counted, send_tcp, traditional
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake
from tests.test_metrics import Samples, scrape, total, value

MakeDaemon = Callable[..., Daemon]


def frames(n: int, tag: str) -> tuple[list[bytes], list[str]]:
    texts = [f"{tag} event {i}" for i in range(n)]
    return [traditional("haproxy", t) for t in texts], texts


DEFAULT = "default"  # the one intake of a config with a single [intake]
COUNTER_TERMS = {"accepted": "accepted_events_total", "recovered": "spool_recovered_events_total",
                 "requeued": "requeued_events_total", "delivered": "delivered_events_total",
                 "dead": "dead_lettered_events_total", "dropped": "dropped_events_total"}


def terms(m: Samples) -> dict[str, float]:
    """The identity's terms over every intake (each summed over its labels)."""
    got = {term: total(m, name) for term, name in COUNTER_TERMS.items()}
    # The one intake's series are the totals (and carry its name).
    for term, name in COUNTER_TERMS.items():
        assert total(m, name, intake=DEFAULT) == got[term], term
    assert value(m, "accepted_events_total", intake=DEFAULT) == got["accepted"]
    got["memory"] = total(m, "events_held", where="memory")
    got["spool"] = total(m, "events_held", where="spool")
    return got


def unaccounted(t: dict[str, float]) -> float:
    came = t["accepted"] + t["recovered"] + t["requeued"]
    return came - (t["delivered"] + t["dead"] + t["dropped"] + t["memory"] + t["spool"])


def at_rest(d: Daemon, check: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    got: dict[str, float] = {}

    def ok() -> bool:
        got.clear()
        got.update(terms(scrape(d.status_port)))
        return check(got)

    assert wait_until(ok, 30), got
    return got


def test_delivered_and_dead_lettered_add_up(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake, batch={"max_events": 50, "max_delay": 0.2})
    good, _ = frames(500, "good")
    send_tcp(d.tcp_port, octet_counted(good))
    assert intake.wait_for(500, 30)
    # The intake refuses the next request for good: its events are dead-lettered.
    intake.inject(400, body=b'{"message": "bad payload"}')
    bad, _ = frames(30, "refused")
    send_tcp(d.tcp_port, octet_counted(bad))
    t = at_rest(d, lambda t: t["accepted"] == 530 and t["delivered"] + t["dead"] == 530)
    assert t["dead"] == 30 and t["delivered"] == 500
    assert t["memory"] == t["spool"] == t["dropped"] == 0
    assert unaccounted(t) == 0
    d.stop()
    stopped = d.events("stopped")[-1]
    assert stopped["events_in"] == 530 == stopped["events_out"]
    assert stopped["events_held"] == 0 and stopped["events_unaccounted"] == 0


def test_held_on_the_spool_then_recovered(tmp_path: Path, intake: FakeIntake) -> None:
    """Intake down: the events are held on the spool, the sum holds with held > 0; a
    restart finds them (spool_recovered_events) and delivers them: the sum holds again."""
    cfg = base_config(tmp_path, intake=intake_section(intake), batch={"max_events": 40})
    intake.set_down(True)
    with Daemon(tmp_path, cfg) as d:
        sent, texts = frames(400, "outage")
        send_tcp(d.tcp_port, octet_counted(sent))
        t = at_rest(d, lambda t: t["accepted"] == 400 and t["spool"] == 400)
        assert t["delivered"] == t["dead"] == t["dropped"] == t["memory"] == 0
        assert unaccounted(t) == 0
        stats = d.wait_log("stats")
        assert {"events_in", "events_out", "events_held", "events_unaccounted"} <= set(stats)
        d.stop()
    intake.set_down(False)
    with Daemon(tmp_path, cfg, file_prefix="second") as d:
        # At rest: delivered, and the spool told of the last acks (its thread reports them
        # just after the delivery is counted: the sum may be off by that batch till then).
        t = at_rest(d, lambda t: t["delivered"] == 400 and t["spool"] == t["memory"] == 0)
        assert t["recovered"] == 400 and t["accepted"] == 0
        assert t["spool"] == t["memory"] == 0 and unaccounted(t) == 0
        assert sorted(e.event for e in intake.events) == sorted(texts)
        # `status` prints the same identity for the operator.
        res = run_cli("status", "--url", f"http://127.0.0.1:{d.status_port}", "--once",
                      "--json")
        report = json.loads(res.stdout)
        assert report["accounting"] == {"events_in": 400, "events_out": 400,
                                        "events_held": 0, "events_unaccounted": 0}
        d.stop()
