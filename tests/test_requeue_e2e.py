"""Re-queued dead letters on a real daemon (issue 17): a small spool, `spool replay-dead-letter`
run as an operator would, events counted at the fake intake and on /metrics.

- A dead-letter file several times larger than the spool goes out whole, each event once, with
  or without other input meanwhile (it used to deliver nothing in 25 s alone, and up to 15
  copies of each event with 20 events/s of other input; the file was never removed).
- An intake that takes nothing while a file is re-queued: the file waits, says so
  (`requeue_stalled`), and carries on without duplicates once the intake is back.
- After a replay emptied the dead-letter folder, a new refusal is dead-lettered, not dropped
  as `dead_letter_full` on the size counted before the replay.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson

from devtools.daemon import Daemon
from devtools.probe import wait_until
from devtools.traffic import send_tcp
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.sinks.deadletter import dead_letter_lines
from tests.fake_intake import FakeIntake
from tests.test_accounting import terms, unaccounted
from tests.test_metrics import http_get, scrape, value
from tests.test_spool_e2e import (
    KIB,
    MakeDaemon,
    PacedSender,
    assert_delivered_once,
    cli,
    spool_stats,
    stream,
)

SPOOL = {"max_size": 256 * KIB}
TS = "2026-01-01T00:00:00.000Z"


def plant_dead_letters(d: Daemon, n: int, pad: int = 150) -> list[str]:
    """A dead-letter file of `n` events in the daemon's dead-letter folder (as if the intake
    had refused them); returns their texts."""
    texts = [f"rq {i:05d} " + "p" * pad for i in range(n)]
    folder = d.tmp / "spool" / "dead-letter"
    folder.mkdir(mode=0o700, exist_ok=True)
    lines = dead_letter_lines(Batch.from_events(texts, [TS] * n), "intake answered 400", 400,
                              '{"message": "refused"}', time.gmtime(0))
    (folder / "dead-letter-20260101.jsonl").write_bytes(lines)
    return texts


def replay(d: Daemon) -> None:
    r = cli(d, "replay-dead-letter")
    assert r.returncode == 0, r.stderr


def requeue_folder(d: Daemon) -> list[Path]:
    folder = d.tmp / "spool" / "requeue"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_dead_letter_file_far_larger_than_the_spool_is_delivered_once(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    d = daemon(intake, spool=SPOOL, batch={"max_events": 500})
    texts = plant_dead_letters(d, 6000)
    size = (d.tmp / "spool" / "dead-letter" / "dead-letter-20260101.jsonl").stat().st_size
    assert size > 1_800_000  # 7 times the spool
    replay(d)
    # Created by the replay with the spool's own folders' mode: they hold log data.
    assert (d.tmp / "spool" / "requeue").stat().st_mode & 0o777 == 0o700
    assert_delivered_once(intake, texts, d, timeout=60)
    done = d.wait_log("dead_letters_requeued", timeout=10)
    assert done["events"] == 6000 and done["dead_lettered_again"] == 0
    assert requeue_folder(d) == []  # the file and its progress are gone
    assert spool_stats(d)["requeue"] == {"files": [], "events": 0}
    wait_until(lambda: unaccounted(terms(scrape(d.status_port))) == 0, 10,
               "the accounting identity balanced", detail=lambda: terms(scrape(d.status_port)))
    t = terms(scrape(d.status_port))
    assert t["requeued"] == 6000 and t["delivered"] == 6000 and t["spool"] == 0
    assert d.events("requeue_stalled") == []
    assert d.stop() == 0


def test_with_other_input_meanwhile_each_event_is_delivered_once(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    d = daemon(intake, spool=SPOOL, batch={"max_events": 500})
    texts = plant_dead_letters(d, 6000)
    stop = threading.Event()
    sender = PacedSender(d.tcp_port, 0, 20, stop, limit=60)
    sender.start()
    wait_until(lambda: sender.sent >= 20, 10, "the paced sender's first 20 events")
    replay(d)
    d.wait_log("dead_letters_requeued", timeout=60)
    wait_until(lambda: sum(e.startswith("rq ") for e in intake.event_texts()) >= 6000, 60,
               "the 6000 re-queued events at the intake")
    stop.set()
    sender.join(30)
    assert sender.error is None, sender.error
    _, live = stream(0, sender.sent)
    assert_delivered_once(intake, texts + live, d, timeout=30)
    assert requeue_folder(d) == []
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    assert stopped["requeued_events"] == 6000 and stopped["events_unaccounted"] == 0


def test_an_intake_taking_nothing_makes_the_file_wait_said_then_resume(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, spool=SPOOL, batch={"max_events": 500}, status={"stall_after": 1.0})
    texts = plant_dead_letters(d, 3000)
    replay(d)
    stalled = d.wait_log("requeue_stalled", timeout=20)
    assert stalled["file"].startswith("dead-letter-20260101-")
    assert "spool" in stalled["waiting_for"]
    # /healthz names it (a stalled re-queue is not only the intake's stall) and the gauges
    # show it.
    code, _, body = http_get(d.status_port, "/healthz")
    assert code == 503
    assert any("re-queued dead-letter file(s) not moving" in r
               for r in orjson.loads(body)["reasons"])
    m = scrape(d.status_port)
    assert value(m, "requeue_files", intake="default") == 1 \
        and value(m, "requeue_idle_seconds", intake="default") > 1.0
    # Part of the file is in the spool, counted once; it stays there, and so does the file.
    held = terms(scrape(d.status_port))
    assert 0 < held["requeued"] < 3000 and held["requeued"] == held["spool"]
    assert [p.suffix for p in requeue_folder(d)] == [".jsonl", ".progress"]
    # `spool stats` shows what is still to go: the rest of the file, after its progress.
    waiting = spool_stats(d)["requeue"]
    assert waiting["files"] == [str(requeue_folder(d)[0])]
    assert waiting["events"] == 3000 - held["requeued"]
    intake.set_down(False)
    assert_delivered_once(intake, texts, d, timeout=60)
    d.wait_log("dead_letters_requeued", timeout=10)
    d.wait_log("requeue_moving_again", timeout=10)
    assert requeue_folder(d) == []
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    assert stopped["requeued_events"] == 3000 and stopped["events_unaccounted"] == 0


def test_a_refusal_after_a_replay_emptied_a_full_folder_is_dead_lettered(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    """dead_letter_max_size 64 KiB: ~45 KB of refusals, replayed (delivered this time), then
    ~45 KB more refusals. They fit in the emptied folder: dead-lettered, not dropped."""
    answer = b'{"message": "event rejected"}'
    d = daemon(intake, batch={"max_delay": 0.5}, spool={"dead_letter_max_size": 64 * KIB})
    intake.inject(400, body=answer)
    first, first_texts = stream(1, 100)
    send_tcp(d.tcp_port, first)
    assert d.wait_log("dead_lettered")["events"] == 100
    folder = d.tmp / "spool" / "dead-letter"
    assert 32 * KIB < sum(p.stat().st_size for p in folder.iterdir()) < 64 * KIB
    replay(d)
    d.wait_log("dead_letters_requeued", timeout=10)
    assert_delivered_once(intake, first_texts, d)
    intake.inject(400, body=answer)
    second, second_texts = stream(2, 100)
    send_tcp(d.tcp_port, second)
    wait_until(lambda: len(d.events("dead_lettered")) == 2 or d.events("dead_letter_full"), 20,
               "the second refusal dead-lettered (or dropped as full)")
    assert d.events("dead_letter_full") == []
    kept = [orjson.loads(x)["event"] for p in sorted(folder.iterdir())
            for x in p.read_bytes().splitlines()]
    assert kept == second_texts
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    assert stopped["dropped_events"] == 0 and stopped["dead_lettered_events"] == 200
