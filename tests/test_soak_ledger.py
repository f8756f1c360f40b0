"""The soak's ledger (soak/ledger.py) on hand-made inputs: it must fail on a loss no counter
explains, an unexplained duplicate, a dead letter no 400 carried, an event never sent; and pass
what a counter, a kill's bound or a down daemon explains. The schedule is a function of its
seed."""

from __future__ import annotations

from array import array

from soak.events import MAYBE, SENT, SentLog, key
from soak.intake import Request
from soak.ledger import DeadLetter, Inputs, Ledger, Report, RunInfo
from soak.metrics import parse
from soak.schedule import draw_schedule

TIMEOUT = 3.0


def logs(tcp: int = 0, relp: int = 0, udp: int = 0, run: int = 0) -> dict[str, SentLog]:
    out = {}
    for src, n in (("T", tcp), ("R", relp), ("U", udp)):
        log = SentLog(src)
        for i in range(n):
            log.add(10.0 + i * 0.01, run, SENT, offset=(i + 1) * 100)
        out[src] = log
    return out


def request(no: int, t0: float, ids: list[int], status: int = 200, t1: float | None = None,
            answered: bool = True) -> Request:
    return Request(no, t0, t1 if t1 is not None else t0 + 0.05, status, answered,
                   array("q", ids))


def clean_run(index: int = 0, dropped: dict[str, int] | None = None, **stopped: int) -> RunInfo:
    run = RunInfo(index, {"spool": {}}, t_spawn=float(index * 100), t_started=index * 100 + 1,
                  t_signal=index * 100 + 90, t_exit=index * 100 + 91, end="term")
    text = "".join(f'haproxy_forwarder_dropped_events_total{{reason="{r}"}} {n}\n'
                   for r, n in (dropped or {}).items())
    run.last = parse(text, 80.0)
    run.stopped = {"dropped_events": sum((dropped or {}).values()), **stopped}
    return run


def build(**kw: object) -> Report:
    base: dict[str, object] = {"logs": logs(), "delivered": [], "refused_400": [],
                               "dead_letters": [], "runs": [clean_run()], "flips": [],
                               "intake_timeout": TIMEOUT}
    base.update(kw)
    return Ledger(Inputs(**base)).build()  # type: ignore[arg-type]


def test_all_delivered_once_passes() -> None:
    rep = build(logs=logs(tcp=3, relp=2, udp=1), delivered=[
        request(0, 20.0, [key("T", 0), key("T", 1), key("R", 0)]),
        request(1, 21.0, [key("T", 2), key("R", 1), key("U", 0)])])
    assert rep.delivered_once == 6
    assert not rep.failed, rep


def test_a_tcp_event_lost_without_a_counter_is_unaccounted() -> None:
    rep = build(logs=logs(tcp=2), delivered=[request(0, 20.0, [key("T", 0)])])
    assert rep.unaccounted["lost, counted by no drop reason of that run or later"] == 1
    assert rep.failed


def test_a_counted_drop_accounts_for_a_loss() -> None:
    rep = build(logs=logs(tcp=2), delivered=[request(0, 20.0, [key("T", 0)])],
                runs=[clean_run(dropped={"spool_full": 1})])
    assert rep.missing["dropped"] == 1
    assert not rep.failed, rep


def test_a_duplicate_needs_a_cause() -> None:
    ids = [key("T", 0)]
    rep = build(logs=logs(tcp=1), delivered=[request(0, 20.0, ids), request(1, 30.0, ids)])
    assert rep.extra_copies["UNEXPLAINED"] == 1
    assert rep.failed
    # The first copy answered after intake.timeout: the daemon gave up on it, a retry is due.
    rep = build(logs=logs(tcp=1), delivered=[request(0, 20.0, ids, t1=20.0 + TIMEOUT),
                                              request(1, 30.0, ids)])
    assert rep.extra_copies["after an uncertain delivery"] == 1
    assert not rep.failed, rep


def test_a_duplicate_across_a_kill_is_explained() -> None:
    killed = clean_run(0)
    killed.end, killed.stopped = "kill", None
    ids = [key("T", 0)]
    rep = build(logs=logs(tcp=1), runs=[killed, clean_run(1)],
                delivered=[request(0, 20.0, ids), request(1, 120.0, ids)])
    assert rep.extra_copies["after kill -9"] == 1
    assert not rep.failed, rep


def test_a_kill_loses_at_most_what_it_held_in_memory() -> None:
    def killed(held: int) -> RunInfo:
        run = clean_run(0)
        run.end, run.stopped = "kill", None
        # Everything sent (offsets up to 1000) had been read at the last scrape.
        run.before_kill = parse(
            'haproxy_forwarder_received_bytes_total{listener="tcp://127.0.0.1:1"} 1000\n'
            f'haproxy_forwarder_events_held{{where="memory"}} {held}\n', 89.0)
        return run
    lost_four = [request(0, 20.0, [key("T", i) for i in range(6)])]
    rep = build(logs=logs(tcp=10), delivered=lost_four, runs=[killed(4)])
    assert rep.missing["kill_in_memory"] == 4
    assert not rep.failed, rep
    rep = build(logs=logs(tcp=10), delivered=lost_four, runs=[killed(3)])
    assert rep.unaccounted["lost, counted by no drop reason of that run or later"] == 1


def test_kill_in_flight_and_failed_writes_need_no_counter() -> None:
    run = clean_run(0)
    run.end, run.stopped = "kill", None
    run.before_kill = parse(
        'haproxy_forwarder_received_bytes_total{listener="tcp://127.0.0.1:1"} 100\n', 89.0)
    sent = logs(tcp=3)
    sent["T"].set(2, 12.0, MAYBE, 300)
    rep = build(logs=sent, runs=[run], delivered=[request(0, 20.0, [key("T", 0)])])
    assert rep.missing == {"kill_in_flight": 1, "send_failed": 1}
    assert not rep.failed, rep


def test_relp_has_no_kill_excuse() -> None:
    run = clean_run(0)
    run.end, run.stopped = "kill", None
    rep = build(logs=logs(relp=2), runs=[run], delivered=[request(0, 20.0, [key("R", 0)])])
    assert rep.unaccounted["lost, counted by no drop reason of that run or later"] == 1


def test_udp_losses_against_the_udp_counters() -> None:
    rep = build(logs=logs(udp=3), delivered=[request(0, 20.0, [key("U", 0)])],
                runs=[clean_run(udp_dropped=1, udp_kernel_dropped=1)])
    assert rep.missing["udp_counted"] == 2
    assert not rep.failed, rep
    rep = build(logs=logs(udp=3), delivered=[request(0, 20.0, [key("U", 0)])],
                runs=[clean_run(udp_dropped=1)])
    assert rep.failed


def test_dead_letters_for_400_must_come_from_a_refused_body() -> None:
    refused = [request(0, 20.0, [key("T", 0)], status=400)]
    ok = build(logs=logs(tcp=1), refused_400=refused,
               dead_letters=[DeadLetter(key("T", 0), "intake answered 400", 400)])
    assert not ok.failed, ok
    bad = build(logs=logs(tcp=2), refused_400=refused,
                delivered=[request(1, 21.0, [key("T", 0)])],
                dead_letters=[DeadLetter(key("T", 1), "intake answered 400", 400)])
    assert bad.dead_letter_not_carried == 1
    assert bad.failed


def test_an_event_never_sent_fails() -> None:
    rep = build(logs=logs(tcp=1), delivered=[request(0, 20.0, [key("T", 0), key("T", 5)])])
    assert rep.phantom == 1
    assert rep.failed


def test_the_schedule_is_the_seed_s() -> None:
    a, b = draw_schedule(7, 120), draw_schedule(7, 120)
    assert a == b and a != draw_schedule(8, 120)
    assert a[0].intake == "ok" and a[-1].action == "none"
    assert abs(a[-1].end - 120) < 1e-6


def test_a_drop_counts_only_for_events_sent_before_it() -> None:
    # Run 1 lost an event; run 0's drop cannot stand for it (the spool carries events forward).
    sent = logs(tcp=2)
    sent["T"].runs[1] = 1
    rep = build(logs=sent, delivered=[request(0, 20.0, [key("T", 0)])],
                runs=[clean_run(0, dropped={"spool_full": 1}), clean_run(1)])
    assert rep.unaccounted["lost, counted by no drop reason of that run or later"] == 1
    # The other way round, a later run's drop may count an earlier run's event.
    sent["T"].runs[1] = 0
    rep = build(logs=sent, delivered=[request(0, 20.0, [key("T", 0)])],
                runs=[clean_run(0), clean_run(1, dropped={"spool_full": 1})])
    assert not rep.failed, rep


def test_a_replayed_dead_letter_allows_one_more_copy() -> None:
    ids = [key("T", 0)]
    refused = [request(0, 20.0, ids, status=400)]
    again = [request(1, 30.0, ids)]
    rep = build(logs=logs(tcp=1), refused_400=refused, delivered=again,
                dead_letters=[DeadLetter(key("T", 0), "intake answered 400", 400,
                                         replayed=True)])
    assert rep.extra_copies["after a dead-letter replay"] == 1
    assert not rep.failed, rep
    # Not replayed: delivered after being dead-lettered is a copy without a cause.
    rep = build(logs=logs(tcp=1), refused_400=refused, delivered=again,
                dead_letters=[DeadLetter(key("T", 0), "intake answered 400", 400)])
    assert rep.extra_copies["UNEXPLAINED"] == 1


def test_a_kill_excuses_only_copies_taken_from_the_killed_run() -> None:
    # First copy in run 0 (stopped cleanly, so acked), run 1 killed, second copy in run 2.
    killed = clean_run(1)
    killed.end, killed.stopped = "kill", None
    ids = [key("T", 0)]
    rep = build(logs=logs(tcp=1), runs=[clean_run(0), killed, clean_run(2)],
                delivered=[request(0, 20.0, ids), request(1, 220.0, ids)])
    assert rep.extra_copies["UNEXPLAINED"] == 1


def test_relp_fed_while_the_daemon_starts_belongs_to_that_run() -> None:
    # Run 1 was spawned at 100 and up at 101; an event fed into rsyslog at 100.5 (no daemon
    # up) goes to run 1, whose drop may count it.
    sent = logs(relp=1)
    sent["R"].runs[0] = -1
    sent["R"].times[0] = 100.5
    rep = build(logs=sent, runs=[clean_run(0), clean_run(1, dropped={"spool_full": 1}),
                                 clean_run(2)])
    assert not rep.failed, rep
